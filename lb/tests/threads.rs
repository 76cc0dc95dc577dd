//! Connection threads (`[runtime] threads`): a connection placed on another thread than the
//! accepting one (it was busy when the connection arrived) is served there, reset by the admin
//! API, and waited for by the shutdown drain like any other.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use warren_lb::workers::SAMPLE;

/// CPU time (user + system, clock ticks) of this process's thread named `name` (the kernel
/// keeps the first 15 bytes of a thread's name).
fn thread_ticks(name: &str) -> Option<u64> {
    let kept = name.get(..15).unwrap_or(name);
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != kept {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the command (which ends with the last ')'): utime and stime are the
        // 12th and 13th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

/// Keeps this runtime's only worker (the accepting thread) busy for longer than a sample, then
/// lets it park so that its busy time is reported.
async fn make_the_accepting_thread_busy() {
    tokio::spawn(async {
        let t0 = Instant::now();
        while t0.elapsed() < 3 * SAMPLE {
            std::hint::spin_loop();
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Sends `total` bytes through `s` and reads them back (an echo backend behind the proxy).
async fn push(s: &mut TcpStream, total: usize) {
    let chunk = vec![7u8; 1 << 20];
    let (mut rd, mut wr) = s.split();
    let write = async {
        for _ in 0..total / chunk.len() {
            wr.write_all(&chunk).await.unwrap();
        }
    };
    let read = async {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < total {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "echo ended after {got} of {total} bytes");
            got += n;
        }
    };
    tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("bulk echo in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_connection_on_another_thread_is_served_reset_and_drained() {
    let b = echo_backend().await;
    let mut l = listener("th", &[b.addr]);
    l.drain_timeout = Duration::from_secs(60);
    let mut cfg = config(vec![l]);
    cfg.runtime.threads = Some(2);
    let lb = start(cfg).await;
    let addr = lb.addr("th");
    // The runtime starts its worker thread on its own; wait until it is there.
    let deadline = Instant::now() + WAIT;
    let before = loop {
        if let Some(t) = thread_ticks("warren-lb-conn-1") {
            break t;
        }
        assert!(Instant::now() < deadline, "connection thread 1 started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // Served on thread 1: 256 MiB through the proxy cost that thread CPU time.
    make_the_accepting_thread_busy().await;
    let mut c = connect_echo(addr, b"spilled").await;
    push(&mut c, 256 << 20).await;
    let after = thread_ticks("warren-lb-conn-1").unwrap();
    assert!(
        after > before,
        "connection thread 1 did the copying ({before} -> {after} ticks)"
    );

    // Reset by the admin API from the accepting thread.
    let (status, text) = http(lb.admin(), "POST", "/listeners/th/reset", None).await;
    assert_eq!(status, 200);
    assert_eq!(text.trim(), "{\"reset\":1}");
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Reset));

    // Waited for by the shutdown drain, and still served while it waits.
    make_the_accepting_thread_busy().await;
    let live = connect_echo(addr, b"spilled again").await;
    stop_draining(lb, addr, live).await;
}
