//! splice(2) forwarding: used for bulk plain-TCP directions, byte exact, off when configured off.
//! One test in its own binary: it counts the process's pipe descriptors, which concurrent tests of
//! the same process (under `cargo test`) would disturb.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pipe_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Sends `len` patterned bytes through `s` and checks the echo.
async fn bulk_echo(s: &mut TcpStream, len: u32) {
    let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
    };
    let mut got = vec![0u8; payload.len()];
    let (_, n) = tokio::join!(send, r.read_exact(&mut got));
    n.unwrap();
    assert!(got == payload, "bytes differ");
}

#[tokio::test]
async fn bulk_transfers_use_splice_only_when_allowed_and_stay_byte_exact() {
    let b = echo_backend().await;

    // Splice off: a bulk transfer opens no pipe.
    let mut cfg = config(vec![listener("nosplice", &[b.addr])]);
    cfg.runtime.splice = Some(false);
    let lb = start(cfg).await;
    let before = pipe_fds();
    let mut s = connect_echo(lb.addr("nosplice"), b"warm up").await;
    bulk_echo(&mut s, 1 << 20).await;
    assert_eq!(pipe_fds(), before);
    drop(s);
    lb.stop().await;

    // Splice on (default): 4 MiB each way switches both directions to a pipe each.
    let lb = start(config(vec![listener("bulk", &[b.addr])])).await;
    let before = pipe_fds();
    let mut s = connect_echo(lb.addr("bulk"), b"warm up").await;
    bulk_echo(&mut s, 4 << 20).await;
    assert!(
        pipe_fds() >= before + 4,
        "pipes: {} -> {}",
        before,
        pipe_fds()
    );
    // Half-close still propagates on the spliced path.
    s.shutdown().await.unwrap();
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Eof));
    lb.stop().await;
}
