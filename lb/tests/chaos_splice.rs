//! Fault rules and the zero-copy path: time-only rules keep splice(2) on both directions; a
//! byte-level rule keeps only its own direction buffered. One test in its own binary: it counts the
//! process's pipe descriptors (two per spliced direction).

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

async fn bulk_echo(s: &mut TcpStream, len: u32) {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
    };
    let mut got = vec![0u8; payload.len()];
    let (_, n) = tokio::join!(send, r.read_exact(&mut got));
    n.unwrap();
    assert!(got == payload, "bytes differ");
}

/// Pipes opened by one bulk echo through a listener with `rules`.
async fn pipes_with(rules: &[&str]) -> usize {
    let b = echo_backend().await;
    let mut l = listener("sp", &[b.addr]);
    l.faults = rules.iter().map(|r| toml::from_str(r).unwrap()).collect();
    let lb = start(config(vec![l])).await;
    let before = pipe_fds();
    let mut s = connect_echo(lb.addr("sp"), b"warm up").await;
    bulk_echo(&mut s, 4 << 20).await;
    let opened = pipe_fds() - before;
    drop(s);
    lb.stop().await;
    opened
}

#[tokio::test]
async fn time_rules_keep_splice_and_byte_rules_keep_only_their_direction_buffered() {
    let time_only = [
        "name='tick'\nkind='reset'\nevery='1h'",
        "name='age'\nkind='reset'\nlifetime='1h'",
        "name='rate'\nkind='reset'\nrate='1/day'",
    ];
    assert_eq!(pipes_with(&time_only).await, 4, "both directions spliced");
    let up_bytes = ["name='far'\nkind='reset'\nafter_bytes=1000000000000\ndirection='upstream'"];
    assert_eq!(pipes_with(&up_bytes).await, 2, "only downstream spliced");
    let both = ["name='lim'\nkind='limit_data'\nbytes=1000000000000"];
    assert_eq!(pipes_with(&both).await, 0, "both directions buffered");
}
