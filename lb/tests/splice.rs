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

/// `count` request/response round trips of `len` bytes each.
async fn small_exchanges(s: &mut TcpStream, count: usize, len: usize) {
    let mut got = vec![0u8; len];
    for i in 0..count {
        let msg = vec![(i % 251) as u8; len];
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut got).await.unwrap();
        assert!(got == msg, "exchange {i}: bytes differ");
    }
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

    // Splice on (default). Many small request/response exchanges (well over 256 KiB each way on
    // one connection) stay on the buffered path: no pipe.
    let lb = start(config(vec![listener("bulk", &[b.addr])])).await;
    let before = pipe_fds();
    let mut s = connect_echo(lb.addr("bulk"), b"warm up").await;
    small_exchanges(&mut s, 600, 1024).await;
    assert_eq!(pipe_fds(), before, "small exchanges must not splice");
    // 4 MiB each way switches both directions to a pipe each.
    bulk_echo(&mut s, 4 << 20).await;
    assert!(
        pipe_fds() >= before + 4,
        "pipes: {} -> {}",
        before,
        pipe_fds()
    );
    // Small exchanges again: both directions leave splice and drop their pipes.
    small_exchanges(&mut s, 20, 512).await;
    assert_eq!(
        pipe_fds(),
        before,
        "small chunks go back to the buffered path"
    );
    bulk_echo(&mut s, 4 << 20).await;
    assert!(pipe_fds() >= before + 4, "bulk splices again");
    // Half-close still propagates on the spliced path.
    s.shutdown().await.unwrap();
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Eof));
    lb.stop().await;
}
