//! Data path: balancing, half-close, idle timeout styles, connect failover, max_connections,
//! PROXY protocol headers, periodic reset.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_lb::config::{Balance, CloseStyle, FaultRule, ProxyProtocol};

#[tokio::test]
async fn round_robin_spread_over_three_backends_is_exact() {
    let b: Vec<_> = [
        echo_backend().await,
        echo_backend().await,
        echo_backend().await,
    ]
    .into();
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let lb = start(config(vec![listener("rr", &addrs)])).await;
    let addr = lb.addr("rr");
    for i in 0..9 {
        let mut s = connect_echo(addr, b"hello").await;
        s.shutdown().await.unwrap();
        // Each connection goes to backend i % 3, in configuration order.
        assert_eq!(b[i % 3].accepted(), i / 3 + 1, "connection {i}");
    }
    assert_eq!(
        b.iter().map(|b| b.accepted()).collect::<Vec<_>>(),
        vec![3, 3, 3]
    );
    lb.stop().await;
}

#[tokio::test]
async fn least_conn_sends_new_connections_to_the_least_loaded_backend() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("lc", &[a.addr, b.addr]);
    cfg.balance = Balance::LeastConn;
    let lb = start(config(vec![cfg])).await;
    let addr = lb.addr("lc");
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for k in 1..=4 {
        let before = a.accepted();
        let s = connect_echo(addr, b"x").await;
        if a.accepted() > before {
            on_a.push(s);
        } else {
            on_b.push(s);
        }
        let (na, nb) = (a.accepted() as i64, b.accepted() as i64);
        assert!((na - nb).abs() <= 1, "after {k}: {na} vs {nb}");
    }
    assert_eq!((on_a.len(), on_b.len()), (2, 2));
    // Free `a` entirely while `b` keeps its two.
    drop(on_a);
    let ls = lb.handle.shared().listener("lc").unwrap();
    let a_member = ls.pool.members()[0].clone();
    assert_eq!(a_member.addr, a.addr.to_string());
    until("a idle", || a_member.active() == 0).await;
    // Now a has 0 live and b has 2: the next two must both go to a.
    let a_before = a.accepted();
    let _n1 = connect_echo(addr, b"z").await;
    let _n2 = connect_echo(addr, b"z").await;
    assert_eq!(
        a.accepted(),
        a_before + 2,
        "both new connections on the idle backend"
    );
    lb.stop().await;
}

#[tokio::test]
async fn random_balance_reaches_every_backend() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("rnd", &[a.addr, b.addr]);
    cfg.balance = Balance::Random;
    let lb = start(config(vec![cfg])).await;
    for _ in 0..40 {
        drop(connect_echo(lb.addr("rnd"), b"r").await);
    }
    assert_eq!(a.accepted() + b.accepted(), 40);
    assert!(a.accepted() > 0 && b.accepted() > 0);
    lb.stop().await;
}

#[tokio::test]
async fn client_half_close_still_gets_the_full_response() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("hc", &[b.addr])])).await;
    let mut s = TcpStream::connect(lb.addr("hc")).await.unwrap();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = r.read_to_end(&mut got);
    let (_, n) = tokio::join!(send, recv);
    n.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    lb.stop().await;
}

#[tokio::test]
async fn backend_half_close_lets_the_client_keep_sending() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let b = backend_on(
        "127.0.0.1:0".parse().unwrap(),
        move |mut s: TcpStream, _| {
            let tx = tx.clone();
            async move {
                s.write_all(b"greeting").await.unwrap();
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                tx.send(rest).unwrap();
            }
        },
    )
    .await;
    let lb = start(config(vec![listener("bhc", &[b.addr])])).await;
    let mut s = TcpStream::connect(lb.addr("bhc")).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"greeting");
    s.write_all(b"late words").await.unwrap();
    s.shutdown().await.unwrap();
    let rest = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"late words");
    lb.stop().await;
}

async fn idle_case(style: CloseStyle) -> (Option<ReadEnd>, TcpStream) {
    let b = echo_backend().await;
    let mut cfg = listener("idle", &[b.addr]);
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.idle_close = style;
    let lb = start(config(vec![cfg])).await;
    let mut s = connect_echo(lb.addr("idle"), b"ping").await;
    let end = read_end(&mut s, WAIT).await;
    std::mem::forget(lb);
    (end, s)
}

#[tokio::test]
async fn idle_close_fin_gives_the_client_eof() {
    let (end, _) = idle_case(CloseStyle::Fin).await;
    assert_eq!(end, Some(ReadEnd::Eof));
}

#[tokio::test]
async fn idle_close_rst_gives_the_client_a_reset() {
    let (end, _) = idle_case(CloseStyle::Rst).await;
    assert_eq!(end, Some(ReadEnd::Reset));
}

#[tokio::test]
async fn idle_close_drop_stops_forwarding_but_holds_the_socket() {
    let b = echo_backend().await;
    let mut cfg = listener("drop", &[b.addr]);
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.idle_close = CloseStyle::Drop;
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut s = connect_echo(lb.addr("drop"), b"ping").await;
    // Past the idle timeout the connection is blackholed: bytes vanish, nothing closes.
    let e = ev.wait("idle_timeout", None).await;
    assert_eq!(e["style"], "drop");
    s.write_all(b"anyone?").await.unwrap();
    assert_eq!(read_end(&mut s, Duration::from_millis(500)).await, None);
    assert_eq!(b.live.load(std::sync::atomic::Ordering::SeqCst), 1);
    // When the client goes, the backend side is closed too.
    drop(s);
    until("backend connection closed", || {
        b.live.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    lb.stop().await;
}

#[tokio::test]
async fn payload_resets_the_idle_timer() {
    let b = echo_backend().await;
    let mut cfg = listener("busy", &[b.addr]);
    cfg.idle_timeout = Duration::from_secs(2);
    let lb = start(config(vec![cfg])).await;
    let mut s = connect_echo(lb.addr("busy"), b"0").await;
    // 3s of traffic with 250ms gaps: never idle for 2s.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        roundtrip(&mut s, b"tick").await;
    }
    lb.stop().await;
}

#[tokio::test]
async fn a_dead_backend_is_skipped_by_trying_the_next() {
    let dead = dead_addr().await;
    let live = echo_backend().await;
    let lb = start(config(vec![listener("fo", &[dead, live.addr])])).await;
    for _ in 0..4 {
        drop(connect_echo(lb.addr("fo"), b"hi").await);
    }
    assert_eq!(live.accepted(), 4);
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    let errors = metric(
        &text,
        "warren_lb_connect_errors_total",
        &[("listener", "fo"), ("backend", &dead.to_string())],
    )
    .unwrap_or(0.0);
    assert!(errors >= 2.0, "connect errors counted: {errors}\n{text}");
    lb.stop().await;
}

#[tokio::test]
async fn max_connections_refuses_beyond_the_limit() {
    let b = echo_backend().await;
    let mut cfg = listener("max", &[b.addr]);
    cfg.max_connections = 2;
    let lb = start(config(vec![cfg])).await;
    let mut one = connect_echo(lb.addr("max"), b"1").await;
    let mut two = connect_echo(lb.addr("max"), b"2").await;
    let mut three = TcpStream::connect(lb.addr("max")).await.unwrap();
    let _ = three.write_all(b"3").await;
    let end = read_end(&mut three, WAIT).await;
    assert!(
        matches!(end, Some(ReadEnd::Eof) | Some(ReadEnd::Reset)),
        "third connection refused: {end:?}"
    );
    assert_eq!(b.accepted(), 2);
    roundtrip(&mut one, b"still").await;
    roundtrip(&mut two, b"fine").await;
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    assert_eq!(
        metric(&text, "warren_lb_refused_total", &[("listener", "max")]),
        Some(1.0),
        "{text}"
    );
    lb.stop().await;
}

#[tokio::test]
async fn proxy_protocol_v1_header_is_byte_exact() {
    let (b, mut rx) = capture_backend(b"ping").await;
    let mut cfg = listener("pp1", &[b.addr]);
    cfg.proxy_protocol = ProxyProtocol::V1;
    let lb = start(config(vec![cfg])).await;
    let lb_addr = lb.addr("pp1");
    let mut s = TcpStream::connect(lb_addr).await.unwrap();
    let me = s.local_addr().unwrap();
    roundtrip(&mut s, b"ping").await;
    let got = rx.recv().await.unwrap();
    let want = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nping",
        me.port(),
        lb_addr.port()
    );
    assert_eq!(String::from_utf8_lossy(&got), want);
    lb.stop().await;
}

#[tokio::test]
async fn proxy_protocol_v2_header_is_byte_exact() {
    let (b, mut rx) = capture_backend(b"ping").await;
    let mut cfg = listener("pp2", &[b.addr]);
    cfg.proxy_protocol = ProxyProtocol::V2;
    let lb = start(config(vec![cfg])).await;
    let lb_addr = lb.addr("pp2");
    let mut s = TcpStream::connect(lb_addr).await.unwrap();
    let me = s.local_addr().unwrap();
    roundtrip(&mut s, b"ping").await;
    let got = rx.recv().await.unwrap();
    let mut want = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // v2, PROXY
        0x11, // TCP over IPv4
        0x00, 0x0C, // 12 address bytes
        127, 0, 0, 1, 127, 0, 0, 1,
    ];
    want.extend_from_slice(&me.port().to_be_bytes());
    want.extend_from_slice(&lb_addr.port().to_be_bytes());
    want.extend_from_slice(b"ping");
    assert_eq!(got, want);
    lb.stop().await;
}

#[tokio::test]
async fn reset_every_rule_resets_live_connections_with_rst() {
    let b = echo_backend().await;
    let mut cfg = listener("periodic", &[b.addr]);
    cfg.faults
        .push(FaultRule::reset_every(Duration::from_millis(300)));
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut s = connect_echo(lb.addr("periodic"), b"hi").await;
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Reset));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["rule"], "reset-every");
    assert_eq!(e["style"], "rst");
    assert_eq!(e["listener"], "periodic");
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    let n = metric(
        &text,
        "warren_lb_faults_total",
        &[
            ("listener", "periodic"),
            ("rule", "reset-every"),
            ("kind", "reset"),
        ],
    );
    assert!(n.is_some_and(|n| n >= 1.0), "{text}");
    lb.stop().await;
}

#[tokio::test]
async fn connect_timeout_moves_on_to_the_next_backend() {
    // A listener with a full accept queue: the kernel drops further SYNs, so connects hang.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    hole.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(hole_addr)).await
    {
        fillers.push(s);
        assert!(fillers.len() < 64, "accept queue never filled");
    }
    let live = echo_backend().await;
    let mut cfg = listener("cto", &[hole_addr, live.addr]);
    cfg.connect_timeout = Duration::from_millis(300);
    let lb = start(config(vec![cfg])).await;
    // Round robin starts with the black hole: this connection times out there, then succeeds.
    drop(connect_echo(lb.addr("cto"), b"patience").await);
    assert_eq!(live.served(), 1);
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    let errors = metric(
        &text,
        "warren_lb_connect_errors_total",
        &[("listener", "cto"), ("backend", &hole_addr.to_string())],
    );
    assert_eq!(errors, Some(1.0), "{text}");
    drop(fillers);
    lb.stop().await;
}
