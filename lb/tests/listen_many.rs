//! Process level: `--listen` repeated, an IPv4 and an IPv6 loopback address, each bound and
//! proxying to the same backends (a client that resolves `localhost` to ::1 first must reach
//! warren-lb too), each with its `listening listener=<name> addr=<ip:port>` line.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_warren-lb");

/// `listening listener=<name> addr=<addr>` (docs/CONTRACTS.md).
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening listener=")? + "listening listener=".len()..];
    let (name, rest) = rest.split_once(' ')?;
    let addr = rest.strip_prefix("addr=")?.split_whitespace().next()?;
    Some((name.to_string(), addr.parse().ok()?))
}

#[tokio::test]
async fn repeated_listen_binds_ipv4_and_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this machine has no IPv6 loopback (cannot bind [::1]:0)");
        return;
    }
    let b = echo_backend().await;
    let backend = b.addr.to_string();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--backend",
            &backend,
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn warren-lb");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut found: HashMap<String, SocketAddr> = HashMap::new();
    while found.len() < 2 {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("listening lines in time")
            .unwrap()
            .expect("warren-lb exited before logging both listeners");
        eprintln!("[warren-lb] {l}");
        if let Some((name, addr)) = parse_listening(&l) {
            found.insert(name, addr);
        }
    }
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("[warren-lb] {l}");
        }
    });
    let v4 = found["default"];
    let v6 = found["default-2"];
    assert!(v4.is_ipv4() && v4.ip().is_loopback(), "{v4}");
    assert!(v6.is_ipv6() && v6.ip().is_loopback(), "{v6}");
    let mut a = connect_echo(v4, b"over IPv4").await;
    let mut c = connect_echo(v6, b"over IPv6").await;
    roundtrip(&mut a, b"again 4").await;
    roundtrip(&mut c, b"again 6").await;
    assert_eq!(b.served(), 2);
    child.kill().await.unwrap();
}
