//! Nodes as child processes, killed with SIGKILL: the survivor of a two-node cluster goes on,
//! a killed node restarts from its data dir (torn tail cut) and rejoins, and no acknowledged
//! proposal is lost.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    addr: String,
}

impl Node {
    async fn spawn(name: &str, dir: &Path, join: Option<&str>) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren-cluster-node"));
        cmd.args(["--name", name, "--fast", "--data-dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(j) = join {
            cmd.args(["--join", j]);
        }
        let mut child = cmd.spawn().expect("spawn warren-cluster-node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(15), lines.recv())
            .await
            .expect("node started in time")
            .expect("LISTEN line");
        let addr = first
            .strip_prefix("LISTEN ")
            .expect("LISTEN line")
            .to_string();
        Node {
            child,
            stdin,
            lines,
            addr,
        }
    }

    async fn ask(&mut self, cmd: &str) -> String {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
            .await
            .expect("answer in time")
            .expect("answer")
    }

    async fn until(&mut self, cmd: &str, want: &str) {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.ask(cmd).await;
            if got == want {
                return;
            }
            assert!(Instant::now() < end, "{cmd}: wanted {want}, still {got}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_two_nodes_survivor_goes_on_and_the_dead_one_catches_up() {
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let mut a = Node::spawn("a@proc", da.path(), None).await;
    let mut b = Node::spawn("b@proc", db.path(), Some(&a.addr)).await;
    assert!(b.ask("put k1 1").await.starts_with("OK "));
    a.until("get k1", "VAL 1").await;
    b.kill9().await;
    // a goes on alone (ignore mode: after failure detection it forces a one-voter cluster).
    assert!(a.ask("put k2 2").await.starts_with("OK "));
    a.until("voters", "VOTERS 1").await;
    // b restarts from its data dir, learns it was evicted and rejoins under a.
    let mut b = Node::spawn("b@proc", db.path(), None).await;
    b.until("get k2", "VAL 2").await;
    b.until("voters", "VOTERS 2").await;
    // Now kill -9 a in the middle of a burst of proposals.
    for i in 0..200 {
        a.stdin
            .write_all(format!("put burst{i} {i}\n").as_bytes())
            .await
            .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 20 {
        let l = a.lines.recv().await.unwrap();
        if l.starts_with("OK ") {
            acked.push(acked.len());
        }
    }
    a.kill9().await;
    // Every acknowledged proposal survives on b (which goes on alone) ...
    for i in &acked {
        b.until(&format!("get burst{i}"), &format!("VAL {i}")).await;
    }
    assert!(b.ask("put after 1").await.starts_with("OK "));
    // ... and a restarts from a log it was killed writing, then catches up under b.
    let mut a = Node::spawn("a@proc", da.path(), None).await;
    a.until("get after", "VAL 1").await;
    for i in &acked {
        a.until(&format!("get burst{i}"), &format!("VAL {i}")).await;
    }
    a.until("voters", "VOTERS 2").await;
    a.stdin.write_all(b"quit\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), a.child.wait())
        .await
        .expect("a exits on quit")
        .unwrap();
    assert!(status.success());
}
