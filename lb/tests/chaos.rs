//! The chaos engine through real sockets: every reset trigger and style, in_flight, the other
//! fault kinds, runtime rule changes, toxicity and seeded replay.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use warren_lb::config::{Config, FaultRule, ListenerConfig};

fn rule(text: &str) -> FaultRule {
    toml::from_str(text).unwrap()
}

/// A backend that hands each accepted socket to the test.
async fn socket_backend() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

async fn next_backend(rx: &mut mpsc::UnboundedReceiver<TcpStream>) -> TcpStream {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("backend connection in time")
        .unwrap()
}

fn with_rules(name: &str, backends: &[SocketAddr], rules: &[&str]) -> ListenerConfig {
    let mut l = listener(name, backends);
    l.faults = rules.iter().map(|r| rule(r)).collect();
    l
}

/// Reads until EOF or error; returns the bytes and how it ended.
async fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<ReadEnd>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) => return (got, Some(ReadEnd::Eof)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (got, Some(ReadEnd::Reset))
            }
            Ok(Err(e)) => return (got, Some(ReadEnd::OtherError(e.kind()))),
        }
    }
}

async fn faults_metric(lb: &Running, listener: &str, rule: &str, kind: &str) -> f64 {
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    metric(
        &text,
        "warren_lb_faults_total",
        &[("listener", listener), ("rule", rule), ("kind", kind)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn lifetime_rst_is_a_reset_on_both_sides() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "life",
        &[baddr],
        &["name='old'\nkind='reset'\nlifetime='200ms'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut c = TcpStream::connect(lb.addr("life")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Reset));
    assert_eq!(read_end(&mut b, WAIT).await, Some(ReadEnd::Reset));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["rule"], "old");
    assert_eq!(e["cause"], "lifetime");
    assert_eq!(e["style"], "rst");
    assert_eq!(e["side"], "both");
    assert_eq!(faults_metric(&lb, "life", "old", "reset").await, 1.0);
    lb.stop().await;
}

#[tokio::test]
async fn fin_style_is_an_eof_on_both_sides() {
    let (baddr, mut brx) = socket_backend().await;
    let lb = start(config(vec![listener("fin", &[baddr])])).await;
    let mut c = TcpStream::connect(lb.addr("fin")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    until("registered", || {
        lb.handle.shared().listener("fin").unwrap().active() == 1
    })
    .await;
    let (status, _) = http(
        lb.admin(),
        "POST",
        "/listeners/fin/reset",
        Some(r#"{"style":"fin"}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Eof));
    assert_eq!(read_end(&mut b, WAIT).await, Some(ReadEnd::Eof));
    lb.stop().await;
}

#[tokio::test]
async fn drop_style_is_silence_with_the_sockets_open() {
    let (baddr, mut brx) = socket_backend().await;
    let lb = start(config(vec![listener("blackhole", &[baddr])])).await;
    let mut ev = lb.events();
    let mut c = TcpStream::connect(lb.addr("blackhole")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    c.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    b.read_exact(&mut buf).await.unwrap();
    let (status, _) = http(
        lb.admin(),
        "POST",
        "/listeners/blackhole/reset",
        Some(r#"{"style":"drop"}"#),
    )
    .await;
    assert_eq!(status, 200);
    let e = ev.wait("reset", None).await;
    assert_eq!(e["style"], "drop");
    assert_eq!(e["cause"], "admin");
    c.write_all(b"lost").await.unwrap();
    b.write_all(b"lost too").await.unwrap();
    let quiet = Duration::from_millis(300);
    assert_eq!(read_end(&mut b, quiet).await, None, "backend hears nothing");
    assert_eq!(read_end(&mut c, quiet).await, None, "client hears nothing");
    // A second order ends the hold in its style.
    let (status, _) = http(lb.admin(), "POST", "/listeners/blackhole/reset", None).await;
    assert_eq!(status, 200);
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Reset));
    assert_eq!(read_end(&mut b, WAIT).await, Some(ReadEnd::Reset));
    lb.stop().await;
}

#[tokio::test]
async fn half_closes_only_the_chosen_side() {
    let (baddr, mut brx) = socket_backend().await;
    let lb = start(config(vec![listener("half", &[baddr])])).await;
    for (side, client_closed) in [("client", true), ("backend", false)] {
        let mut c = TcpStream::connect(lb.addr("half")).await.unwrap();
        let mut b = next_backend(&mut brx).await;
        until("registered", || {
            lb.handle.shared().listener("half").unwrap().active() == 1
        })
        .await;
        let body = format!(r#"{{"style":"half","side":"{side}"}}"#);
        let (status, _) = http(lb.admin(), "POST", "/listeners/half/reset", Some(&body)).await;
        assert_eq!(status, 200);
        let quiet = Duration::from_millis(300);
        let (closed, open) = if client_closed {
            (&mut c, &mut b)
        } else {
            (&mut b, &mut c)
        };
        assert_eq!(read_end(closed, WAIT).await, Some(ReadEnd::Eof), "{side}");
        assert_eq!(
            read_end(open, quiet).await,
            None,
            "other side of {side} stays open"
        );
        drop(c);
        drop(b);
        until("closed", || {
            lb.handle.shared().listener("half").unwrap().active() == 0
        })
        .await;
    }
    lb.stop().await;
}

#[tokio::test]
async fn rst_on_one_side_gives_the_other_an_orderly_close() {
    let (baddr, mut brx) = socket_backend().await;
    let lb = start(config(vec![listener("rs", &[baddr])])).await;
    for (side, client_end, backend_end) in [
        ("client", ReadEnd::Reset, ReadEnd::Eof),
        ("backend", ReadEnd::Eof, ReadEnd::Reset),
    ] {
        let mut c = TcpStream::connect(lb.addr("rs")).await.unwrap();
        let mut b = next_backend(&mut brx).await;
        until("registered", || {
            lb.handle.shared().listener("rs").unwrap().active() == 1
        })
        .await;
        let body = format!(r#"{{"style":"rst","side":"{side}"}}"#);
        let (status, _) = http(lb.admin(), "POST", "/listeners/rs/reset", Some(&body)).await;
        assert_eq!(status, 200);
        assert_eq!(read_end(&mut c, WAIT).await, Some(client_end), "{side}");
        assert_eq!(read_end(&mut b, WAIT).await, Some(backend_end), "{side}");
        until("closed", || {
            lb.handle.shared().listener("rs").unwrap().active() == 0
        })
        .await;
    }
    lb.stop().await;
}

#[tokio::test]
async fn after_bytes_with_in_flight_drop_discards_what_the_proxy_holds() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "ab",
        &[baddr],
        &["name='cut'\nkind='reset'\nafter_bytes=100\ndirection='upstream'\nin_flight='drop'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut c = TcpStream::connect(lb.addr("ab")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    c.write_all(&[7u8; 1000]).await.unwrap();
    let (got, end) = read_all(&mut b).await;
    assert_eq!(
        got.len(),
        100,
        "the backend gets exactly the bytes before the cut"
    );
    assert_eq!(end, Some(ReadEnd::Reset));
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Reset));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["cause"], "after_bytes");
    let discarded = e["discarded_upstream"].as_u64().unwrap();
    assert!(discarded > 0, "{e}");
    assert_eq!(got.len() as u64 + discarded, 1000, "{e}");
    lb.stop().await;
}

#[tokio::test]
async fn in_flight_flush_writes_the_held_bytes_first() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "fl",
        &[baddr],
        &["name='cut'\nkind='reset'\nafter_bytes=100\ndirection='upstream'\nin_flight='flush'\nstyle='fin'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut c = TcpStream::connect(lb.addr("fl")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    c.write_all(&[7u8; 1000]).await.unwrap();
    let (got, end) = read_all(&mut b).await;
    assert_eq!(got.len(), 1000);
    assert_eq!(end, Some(ReadEnd::Eof));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["discarded_upstream"], 0);
    lb.stop().await;
}

#[tokio::test]
async fn limit_data_cuts_at_the_byte_then_closes() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "lim",
        &[baddr],
        &["name='lim'\nkind='limit_data'\nbytes=10\ndirection='downstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = TcpStream::connect(lb.addr("lim")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    b.write_all(&[1u8; 100]).await.unwrap();
    let (got, end) = read_all(&mut c).await;
    assert_eq!(got, vec![1u8; 10]);
    assert_eq!(end, Some(ReadEnd::Eof));
    assert_eq!(faults_metric(&lb, "lim", "lim", "limit_data").await, 1.0);
    lb.stop().await;
}

#[tokio::test]
async fn latency_delays_each_response() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "lat",
        &[b.addr],
        &["name='slow'\nkind='latency'\nlatency='150ms'\ndirection='downstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut c = TcpStream::connect(lb.addr("lat")).await.unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        roundtrip(&mut c, b"ping").await;
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(150), "{rtt:?}");
        assert!(rtt < Duration::from_secs(3), "{rtt:?}");
    }
    let e = ev.wait("latency", None).await;
    assert_eq!(e["rule"], "slow");
    lb.stop().await;
}

#[tokio::test]
async fn latency_delays_bytes_without_capping_the_throughput() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "latbulk",
        &[b.addr],
        &["name='far'\nkind='latency'\nlatency='200ms'\ndirection='downstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = connect_echo(lb.addr("latbulk"), b"x").await;
    // 2 MiB: one 64 KiB buffer per 200 ms would take 6.4 s; chunks in flight together take ~0.2 s.
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 241) as u8).collect();
    let t = Instant::now();
    let (mut r, mut w) = c.split();
    let (_, got) = tokio::join!(w.write_all(&data), async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    });
    let took = t.elapsed();
    assert!(got == data, "bytes differ");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    lb.stop().await;
}

#[tokio::test]
async fn bandwidth_caps_the_rate() {
    let b = echo_backend().await;
    // 100 KB/s downstream: 60 KiB take at least ~0.59 s (the first 10 ms slice goes at once).
    let cfg = with_rules(
        "bw",
        &[b.addr],
        &["name='thin'\nkind='bandwidth'\nrate=100\ndirection='downstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = TcpStream::connect(lb.addr("bw")).await.unwrap();
    let data = vec![3u8; 60 * 1024];
    let t = Instant::now();
    let (mut r, mut w) = c.split();
    let (_, got) = tokio::join!(w.write_all(&data), async {
        let mut got = vec![0u8; data.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    });
    let took = t.elapsed();
    assert_eq!(got, data);
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    lb.stop().await;
}

#[tokio::test]
async fn slicer_splits_and_spaces_writes() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "sl",
        &[baddr],
        &["name='sl'\nkind='slicer'\naverage_size=10\nsize_variation=5\ndelay='20ms'\ndirection='upstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = TcpStream::connect(lb.addr("sl")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    let t = Instant::now();
    c.write_all(&[9u8; 100]).await.unwrap();
    let mut got = 0;
    let mut reads = 0;
    let mut buf = [0u8; 1024];
    while got < 100 {
        let n = tokio::time::timeout(WAIT, b.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got += n;
        reads += 1;
    }
    // At least 100/15 slices, each 20 ms after the previous.
    assert!(reads >= 2, "{reads}");
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    lb.stop().await;
}

#[tokio::test]
async fn timeout_stops_data_and_closes_after_the_timeout() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "to",
        &[b.addr],
        &["name='to'\nkind='timeout'\ntimeout='300ms'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = TcpStream::connect(lb.addr("to")).await.unwrap();
    let t = Instant::now();
    c.write_all(b"anyone?").await.unwrap();
    let (got, end) = read_all(&mut c).await;
    assert!(got.is_empty());
    assert_eq!(end, Some(ReadEnd::Eof));
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    lb.stop().await;
}

#[tokio::test]
async fn slow_close_delays_the_close() {
    let (baddr, mut brx) = socket_backend().await;
    let cfg = with_rules(
        "sc",
        &[baddr],
        &["name='sc'\nkind='slow_close'\ndelay='300ms'\ndirection='downstream'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = TcpStream::connect(lb.addr("sc")).await.unwrap();
    let mut b = next_backend(&mut brx).await;
    b.write_all(b"bye").await.unwrap();
    let t = Instant::now();
    b.shutdown().await.unwrap();
    let (got, end) = read_all(&mut c).await;
    assert_eq!(got, b"bye");
    assert_eq!(end, Some(ReadEnd::Eof));
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    lb.stop().await;
}

#[tokio::test]
async fn refuse_turns_new_connections_away_and_keeps_live_ones() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("rf", &[b.addr])])).await;
    let mut live = connect_echo(lb.addr("rf"), b"x").await;
    let (status, text) = http(
        lb.admin(),
        "POST",
        "/listeners/rf/faults",
        Some(r#"{"name":"down","kind":"refuse"}"#),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    for _ in 0..3 {
        let mut s = TcpStream::connect(lb.addr("rf")).await.unwrap();
        let _ = s.write_all(b"hello").await;
        let end = read_end(&mut s, WAIT).await;
        assert!(
            matches!(end, Some(ReadEnd::Reset) | Some(ReadEnd::Eof)),
            "{end:?}"
        );
    }
    roundtrip(&mut live, b"still here").await;
    assert_eq!(faults_metric(&lb, "rf", "down", "refuse").await, 3.0);
    let (status, _) = http(lb.admin(), "DELETE", "/listeners/rf/faults/down", None).await;
    assert_eq!(status, 200);
    drop(connect_echo(lb.addr("rf"), b"back").await);
    lb.stop().await;
}

#[tokio::test]
async fn runtime_rules_act_on_live_connections() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("rt", &[b.addr])])).await;
    let mut c = connect_echo(lb.addr("rt"), b"x").await;
    // Added: the live connection gets slower at once.
    let (status, _) = http(
        lb.admin(),
        "POST",
        "/listeners/rt/faults",
        Some(r#"{"name":"lag","kind":"latency","latency":"1s","direction":"downstream"}"#),
    )
    .await;
    assert_eq!(status, 200);
    let t = Instant::now();
    roundtrip(&mut c, b"slow").await;
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    // Changed (replaced): a byte trigger on the same live connection.
    let (status, _) = http(
        lb.admin(),
        "PUT",
        "/listeners/rt/faults",
        Some(r#"[{"name":"cut","kind":"reset","after_bytes":5,"direction":"upstream"}]"#),
    )
    .await;
    assert_eq!(status, 200);
    c.write_all(b"0123456789").await.unwrap();
    let (got, end) = read_all(&mut c).await;
    // The echo of the 5 bytes before the cut may or may not beat the reset back.
    assert!(b"01234".starts_with(&got), "{got:?}");
    assert_eq!(end, Some(ReadEnd::Reset));
    // Removed: connections pass untouched.
    let (status, _) = http(lb.admin(), "DELETE", "/listeners/rt/faults/cut", None).await;
    assert_eq!(status, 200);
    let mut c = connect_echo(lb.addr("rt"), b"0123456789").await;
    let t = Instant::now();
    roundtrip(&mut c, b"fast again").await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    lb.stop().await;
}

#[tokio::test]
async fn toxicity_zero_never_fires() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "tz",
        &[b.addr],
        &["name='never'\nkind='reset'\nafter_bytes=1\ntoxicity=0.0"],
    );
    let lb = start(config(vec![cfg])).await;
    for _ in 0..40 {
        let mut c = connect_echo(lb.addr("tz"), b"hello").await;
        roundtrip(&mut c, b"again").await;
    }
    assert_eq!(faults_metric(&lb, "tz", "never", "reset").await, 0.0);
    lb.stop().await;
}

/// Runs `n` sequential connections through a listener with random rules under `seed`; returns
/// the fault events as (conn, rule, cause) and which connections survived.
async fn replay(seed: u64, n: usize) -> (Vec<(u64, String, String)>, Vec<bool>) {
    let b = echo_backend().await;
    let l = with_rules(
        "rp",
        &[b.addr],
        &[
            "name='coin'\nkind='reset'\nafter_bytes=1\ntoxicity=0.4\ndirection='upstream'",
            "name='lag'\nkind='latency'\nlatency='1ms'\ntoxicity=0.5",
        ],
    );
    let mut cfg = config(vec![l]);
    cfg.chaos.seed = Some(seed);
    let lb = start(cfg).await;
    let (_, mut rx) = lb.handle.shared().events().follow();
    let mut survived = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(lb.addr("rp")).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        let ok = tokio::time::timeout(WAIT, c.read_exact(&mut buf))
            .await
            .unwrap()
            .is_ok();
        survived.push(ok);
        drop(c);
        until("closed", || {
            lb.handle.shared().listener("rp").unwrap().active() == 0
        })
        .await;
    }
    let mut events = Vec::new();
    while let Ok(line) = rx.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["rule"].is_string() {
            events.push((
                v["conn"].as_u64().unwrap(),
                v["rule"].as_str().unwrap().to_string(),
                v["cause"].as_str().unwrap().to_string(),
            ));
        }
    }
    lb.stop().await;
    (events, survived)
}

#[tokio::test]
async fn the_same_seed_replays_the_same_faults() {
    let a = replay(42, 24).await;
    let b = replay(42, 24).await;
    let c = replay(43, 24).await;
    assert_eq!(a, b);
    assert!(
        a.1.iter().any(|x| *x) && a.1.iter().any(|x| !*x),
        "{:?}",
        a.1
    );
    assert_ne!(a, c);
}

/// An AMQP-shaped stream: protocol header, then `n` publishes (method, header, body frames).
fn publishes(n: usize) -> Vec<u8> {
    let mut s = b"AMQP\x00\x00\x09\x01".to_vec();
    for _ in 0..n {
        s.extend([1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 40, 0xCE]);
        s.extend([
            2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0xCE,
        ]);
        s.extend([3, 0, 1, 0, 0, 0, 3, b'a', b'b', b'c', 0xCE]);
    }
    s
}

/// For each of `n` sequential connections sending 20 publishes, how many bytes reached the
/// backend before an `on_amqp` rule with probability 0.2 reset it (all of them if none fired).
async fn replay_amqp(seed: u64, n: usize) -> Vec<usize> {
    let (baddr, mut brx) = socket_backend().await;
    let l = with_rules(
        "pp",
        &[baddr],
        &["name='p'\nkind='reset'\non_amqp='basic.publish'\nprobability=0.2\ndirection='upstream'"],
    );
    let mut cfg = config(vec![l]);
    cfg.chaos.seed = Some(seed);
    let lb = start(cfg).await;
    let data = publishes(20);
    let mut got = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(lb.addr("pp")).await.unwrap();
        c.write_all(&data).await.unwrap();
        let mut b = next_backend(&mut brx).await;
        let mut acc = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends at the reset, or once everything arrived (no fault on this connection).
        while acc.len() < data.len() {
            match tokio::time::timeout(WAIT, b.read(&mut buf)).await.unwrap() {
                Ok(0) | Err(_) => break,
                Ok(k) => acc.extend_from_slice(&buf[..k]),
            }
        }
        assert!(data.starts_with(&acc));
        got.push(acc.len());
        drop(c);
        drop(b);
        until("closed", || {
            lb.handle.shared().listener("pp").unwrap().active() == 0
        })
        .await;
    }
    lb.stop().await;
    got
}

#[tokio::test]
async fn on_amqp_probability_replays_with_the_seed() {
    let a = replay_amqp(5, 12).await;
    assert_eq!(a, replay_amqp(5, 12).await);
    assert_ne!(a, replay_amqp(6, 12).await);
    // Every cut is right after a basic.publish method frame (8 + k*45 + 12 bytes).
    let all = publishes(20).len();
    for &n in &a {
        assert!(n == all || (n - 8) % 45 == 12, "{n}: {a:?}");
    }
    assert!(a.iter().any(|n| *n < all), "{a:?}");
}

#[tokio::test]
async fn rate_resets_each_connection_at_a_random_time() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "rate",
        &[b.addr],
        &["name='poisson'\nkind='reset'\nrate='20/s'\nstyle='fin'"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut c = connect_echo(lb.addr("rate"), b"x").await;
    assert_eq!(read_end(&mut c, WAIT).await, Some(ReadEnd::Eof));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["rule"], "poisson");
    assert_eq!(e["cause"], "rate");
    lb.stop().await;
}

#[tokio::test]
async fn every_with_toxicity_zero_spares_every_connection() {
    let b = echo_backend().await;
    let cfg = with_rules(
        "ev0",
        &[b.addr],
        &["name='tick'\nkind='reset'\nevery='50ms'\ntoxicity=0.0"],
    );
    let lb = start(config(vec![cfg])).await;
    let mut c = connect_echo(lb.addr("ev0"), b"x").await;
    assert_eq!(read_end(&mut c, Duration::from_millis(400)).await, None);
    roundtrip(&mut c, b"still").await;
    assert_eq!(faults_metric(&lb, "ev0", "tick", "reset").await, 0.0);
    lb.stop().await;
}

#[test]
fn the_chaos_examples_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chaos");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = Config::from_toml_str(&text) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 5, "{n} examples");
}
