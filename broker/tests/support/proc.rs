//! The real `warren-broker` binary as a child process: started on port 0, its listening
//! addresses read back from its log, its stderr kept for assertions, killed or stopped at will.

use lapin::{Channel, Connection, ConnectionProperties};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct BrokerProc {
    pub child: Child,
    /// proto (`amqp`, `mgmt`, `prometheus`, ...) -> address, from `listening proto=.. addr=..`.
    addrs: HashMap<String, String>,
    /// Every line the broker wrote to stderr so far (RUST_LOG=info).
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts the broker with `args` and extra `env`, and waits (30 s at most) until it has logged
/// a listening address for each of `protos`.
pub async fn spawn<I, S>(args: I, env: &[(&str, &str)], protos: &[&str]) -> BrokerProc
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn broker");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let log = Arc::new(Mutex::new(Vec::new()));
    let re = regex::Regex::new(r"listening proto=(\w+) addr=(\S+)").expect("re");
    let addrs = tokio::time::timeout(Duration::from_secs(30), async {
        let mut addrs = HashMap::new();
        while let Some(line) = lines.next_line().await.expect("read log") {
            log.lock().push(line.clone());
            if let Some(c) = re.captures(&line) {
                addrs.insert(c[1].to_string(), c[2].to_string());
            }
            if protos.iter().all(|p| addrs.contains_key(*p)) {
                return addrs;
            }
        }
        panic!(
            "broker exited before logging its addresses: {:?}",
            log.lock()
        );
    })
    .await
    .unwrap_or_else(|_| panic!("addresses not logged in time: {:?}", log.lock()));
    let l2 = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            l2.lock().push(line);
        }
    });
    BrokerProc { child, addrs, log }
}

impl BrokerProc {
    /// The address the broker logged for `proto`.
    pub fn addr(&self, proto: &str) -> &str {
        self.addrs
            .get(proto)
            .unwrap_or_else(|| panic!("no {proto} listener logged"))
    }

    /// A lapin connection as guest to "/" on the AMQP listener, and a channel.
    pub async fn connect(&self) -> (Connection, Channel) {
        let c = Connection::connect(
            &format!("amqp://guest:guest@{}/%2f", self.addr("amqp")),
            ConnectionProperties::default(),
        )
        .await
        .expect("connect");
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }

    /// SIGKILL to every process first, then waits for each: they die together, with no time
    /// for one of them to notice another's death (a whole cluster losing power).
    pub async fn kill9_together(procs: Vec<BrokerProc>) {
        let mut procs = procs;
        for p in &mut procs {
            p.child.start_kill().expect("SIGKILL");
        }
        for mut p in procs {
            let _ = p.child.wait().await;
        }
    }

    pub async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// Sends the signal `kill` calls `sig` (`TERM`, `STOP`, `CONT`): SIGSTOP freezes the
    /// process (its sockets stay open, nothing is answered), SIGCONT thaws it.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("pid");
        let st = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} {pid}");
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 20 s.
    pub async fn term(mut self) {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exit in time")
            .expect("wait");
        assert!(status.success(), "broker exit status {status}");
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log_count(needle) > 0
    }
}
