//! The control socket of a running `warren-up` (`<data-dir>/control.sock`): `warren-up kill r1`,
//! `stop r1`, `start r1` and `status` send one line and print the answer. The protocol is one
//! request line (`VERB [NODE]`) and a text answer; the server closes after it. The first answer
//! line is `ok` or `error: why`.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// A request from a client, with where to send the answer.
#[derive(Debug)]
pub struct Request {
    pub verb: Verb,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// SIGKILL the node.
    Kill(String),
    /// SIGTERM the node (a clean stop).
    Stop(String),
    /// Start a node that is down, with its data dir and addresses.
    Start(String),
    /// The table and the status line.
    Status,
}

impl Verb {
    /// Parse a request line.
    pub fn parse(line: &str) -> Result<Verb, String> {
        let mut it = line.split_whitespace();
        let verb = it.next().unwrap_or_default();
        let node = it.next().map(str::to_string);
        if it.next().is_some() {
            return Err(format!("too many words in '{line}'"));
        }
        match (verb, node) {
            ("kill", Some(n)) => Ok(Verb::Kill(n)),
            ("stop", Some(n)) => Ok(Verb::Stop(n)),
            ("start", Some(n)) => Ok(Verb::Start(n)),
            ("status", None) => Ok(Verb::Status),
            ("kill" | "stop" | "start", None) => Err(format!("{verb}: which node?")),
            _ => Err(format!(
                "unknown request '{line}' (kill|stop|start NODE, status)"
            )),
        }
    }

    /// The request line.
    pub fn line(&self) -> String {
        match self {
            Verb::Kill(n) => format!("kill {n}"),
            Verb::Stop(n) => format!("stop {n}"),
            Verb::Start(n) => format!("start {n}"),
            Verb::Status => "status".into(),
        }
    }
}

/// Serve the socket at `path` (replacing a stale one) until `requests` closes.
pub fn serve(path: &Path, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            if requests.is_closed() {
                return;
            }
            let requests = requests.clone();
            tokio::spawn(async move {
                let _ = answer(sock, requests).await;
            });
        }
    });
    Ok(())
}

async fn answer(sock: UnixStream, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut line = String::new();
    // One short line; a client sending more is cut off there.
    BufReader::new(r.take(4096)).read_line(&mut line).await?;
    let out = match Verb::parse(line.trim()) {
        Err(e) => Err(e),
        Ok(verb) => {
            let (tx, rx) = oneshot::channel();
            if requests.send(Request { verb, reply: tx }).await.is_err() {
                Err("warren-up is stopping".into())
            } else {
                rx.await
                    .unwrap_or_else(|_| Err("warren-up is stopping".into()))
            }
        }
    };
    let text = match out {
        Ok(t) => format!("ok\n{t}"),
        Err(e) => format!("error: {e}\n"),
    };
    w.write_all(text.as_bytes()).await?;
    w.shutdown().await
}

/// Where the control socket of the topology in `data_dir` is.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(crate::plan::CONTROL_SOCKET)
}

/// Send `verb` to the warren-up whose data dir is `data_dir`; its answer (after `ok`), or why not.
pub async fn send(data_dir: &Path, verb: &Verb) -> Result<String, String> {
    let path = socket_path(data_dir);
    let mut sock = UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "no warren-up runs with data dir {} ({}: {e})",
            data_dir.display(),
            path.display()
        )
    })?;
    sock.write_all(format!("{}\n", verb.line()).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    sock.read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    match text.split_once('\n') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        Some((first, _)) => Err(first.strip_prefix("error: ").unwrap_or(first).to_string()),
        None => Err(format!("unexpected answer '{text}'")),
    }
}

/// The data dir of the last warren-up started without `--data-dir` (a pointer file in the temp
/// dir), so that `warren-up kill r1` finds it.
pub fn pointer_file() -> PathBuf {
    std::env::temp_dir().join("warren-up.current")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_print_back() {
        for v in [
            Verb::Kill("r1".into()),
            Verb::Stop("r2@localhost".into()),
            Verb::Start("r3".into()),
            Verb::Status,
        ] {
            assert_eq!(Verb::parse(&v.line()), Ok(v));
        }
        assert!(Verb::parse("kill")
            .expect_err("no node")
            .contains("which node"));
        assert!(Verb::parse("reboot r1")
            .expect_err("verb")
            .contains("unknown"));
        assert!(Verb::parse("kill r1 r2").is_err());
    }

    #[tokio::test]
    async fn a_request_reaches_the_server_and_its_answer_the_client() {
        let dir = std::env::temp_dir().join(format!("warren-up-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (tx, mut rx) = mpsc::channel(4);
        serve(&socket_path(&dir), tx).expect("serve");
        let server = tokio::spawn(async move {
            let req: Request = rx.recv().await.expect("request");
            assert_eq!(req.verb, Verb::Kill("r1".into()));
            let _ = req.reply.send(Ok("killed r1 (pid 7)\n".into()));
            let req: Request = rx.recv().await.expect("request");
            let _ = req.reply.send(Err("no node r9".into()));
        });
        assert_eq!(
            send(&dir, &Verb::Kill("r1".into())).await,
            Ok("killed r1 (pid 7)\n".into())
        );
        assert_eq!(
            send(&dir, &Verb::Kill("r9".into())).await,
            Err("no node r9".into())
        );
        server.await.expect("server");
        let e = send(&dir.join("nowhere"), &Verb::Status)
            .await
            .expect_err("no server");
        assert!(e.contains("no warren-up runs"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
