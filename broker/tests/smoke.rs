//! Process-level smoke test: run the real binary on port 0, read the bound address from its
//! log, use it with lapin, SIGTERM it: the client sees close 320 and the process exits 0.

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn binary_binds_port_zero_serves_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--amqp", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn broker");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let re = regex::Regex::new(r"listening (?:proto|listener)=(\S+) addr=(\S+)").expect("re");
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if let Some(c) = re.captures(&line) {
                assert_eq!(&c[1], "amqp");
                return c[2].to_string();
            }
        }
        panic!("broker exited before logging its address");
    })
    .await
    .expect("address logged in time");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let conn = Connection::connect(
        &format!("amqp://guest:guest@{addr}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "smoke".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        "smoke".into(),
        BasicPublishOptions::default(),
        b"hi",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    let got = ch
        .basic_get("smoke".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("message");
    assert_eq!(got.delivery.data, b"hi");

    let mut events = conn.events_listener();
    let pid = child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match futures_lite::StreamExt::next(&mut events).await {
                Some(lapin::Event::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("event stream ended without an error"),
            }
        }
    })
    .await
    .expect("client notified in time");
    match err.kind() {
        lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 320, "{err:?}"),
        other => panic!("expected a 320 close, got {other:?}"),
    }
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exited in time")
        .expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
}
