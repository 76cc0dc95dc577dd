//! Child processes: start one with its output appended to a log file, read the addresses it
//! reports (`listening proto=amqp addr=...` from warren-broker, `listening listener=amqp
//! addr=...` from warren-lb), signal it, and learn when it exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A started process. Its exit is sent on the channel given to [`spawn`] as `(tag, status)`.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    pub log: PathBuf,
    /// Where this start's output begins in the log (earlier starts precede it).
    pub log_start: u64,
}

/// How a process ended, as said to a user.
pub fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => "ended".into(),
        },
        Err(e) => format!("lost ({e})"),
    }
}

/// Start `bin args` with its output appended to `log`; its exit goes to `exits`. The child stays
/// in warren-up's process group: a Ctrl-C in the terminal, or a signal to the group, reaches
/// every process of the topology, so none is left behind even if warren-up itself is killed.
pub fn spawn(
    bin: &Path,
    args: &[String],
    log: &Path,
    env: &[(&str, &str)],
    tag: String,
    exits: mpsc::UnboundedSender<(String, u32, std::io::Result<ExitStatus>)>,
) -> std::io::Result<Proc> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let log_start = file.metadata()?.len();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", bin.display())))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let st = child.wait().await;
        let _ = exits.send((tag, pid, st));
    });
    Ok(Proc {
        pid,
        log: log.to_path_buf(),
        log_start,
    })
}

/// The `key=addr` pairs of the `listening` lines in `text` (`proto=` for brokers, `listener=`
/// for warren-lb).
pub fn listening(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(at) = line.find("listening") else {
            continue;
        };
        let rest = &line[at + "listening".len()..];
        let mut key = None;
        let mut addr = None;
        for tok in rest.split_whitespace() {
            if let Some(v) = tok
                .strip_prefix("proto=")
                .or_else(|| tok.strip_prefix("listener="))
            {
                key = Some(v.trim_matches('"').to_string());
            } else if let Some(v) = tok.strip_prefix("addr=") {
                addr = Some(v.trim_matches('"').to_string());
            }
        }
        if let (Some(k), Some(a)) = (key, addr) {
            out.insert(k, a);
        }
    }
    out
}

/// Wait until `p`'s log (this start's part) reports every listener in `want`; an error with the
/// log's tail if the process exits first or `within` passes.
pub async fn wait_listening(
    p: &Proc,
    want: &[&str],
    within: Duration,
) -> Result<HashMap<String, String>, String> {
    let end = Instant::now() + within;
    loop {
        let text = read_from(&p.log, p.log_start);
        let found = listening(&text);
        if want.iter().all(|w| found.contains_key(*w)) {
            return Ok(found);
        }
        if !alive(p.pid) {
            // Read again: what it wrote after the read above and before it exited is there now.
            let text = read_from(&p.log, p.log_start);
            return Err(format!("exited before listening:\n{}", tail(&text, 20)));
        }
        if Instant::now() >= end {
            return Err(format!(
                "not listening on {want:?} after {within:?}:\n{}",
                tail(&text, 20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log from `start` on (lossy UTF-8).
pub fn read_from(log: &Path, start: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let from = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether a process (not yet reaped) exists.
pub fn alive(pid: u32) -> bool {
    pid != 0 && kill(pid_of(pid), None).is_ok() && !zombie(pid)
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(0))
}

/// Send `sig` to `pid` (nothing if it is gone).
pub fn signal(pid: u32, sig: Signal) {
    if pid != 0 {
        let _ = kill(pid_of(pid), sig);
    }
}

/// SIGTERM, then SIGKILL if it is still there after `grace`.
pub async fn stop(pid: u32, grace: Duration) {
    signal(pid, Signal::SIGTERM);
    let end = Instant::now() + grace;
    while alive(pid) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if alive(pid) {
        signal(pid, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_of_both_programs_are_read() {
        let log = "2026-12-05T10:00:00Z  INFO warren_broker: listening proto=amqp addr=127.0.0.1:4000\n\
                   noise\n\
                   2026-12-05T10:00:00Z  INFO warren_lb: listening listener=admin addr=127.0.0.1:9901\n\
                   INFO x: listening proto=cluster addr=[::1]:25672 extra=1\n";
        let m = listening(log);
        assert_eq!(m["amqp"], "127.0.0.1:4000");
        assert_eq!(m["admin"], "127.0.0.1:9901");
        assert_eq!(m["cluster"], "[::1]:25672");
        assert_eq!(m.len(), 3);
    }

    #[tokio::test]
    async fn a_process_that_exits_before_listening_is_reported_with_its_output() {
        let dir = std::env::temp_dir().join(format!("warren-up-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("sh.log");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo cannot bind; exit 3".into()],
            &log,
            &[],
            "sh".into(),
            tx,
        )
        .expect("spawn");
        let e = wait_listening(&p, &["amqp"], Duration::from_secs(10))
            .await
            .expect_err("no listener");
        assert!(e.contains("cannot bind"), "{e}");
        let (tag, pid, st) = rx.recv().await.expect("exit");
        assert_eq!((tag.as_str(), pid), ("sh", p.pid));
        assert_eq!(describe(&st), "exit code 3");
        let _ = std::fs::remove_dir_all(dir);
    }
}
