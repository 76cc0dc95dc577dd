//! Draining: deregistered backends keep live connections until they end or drain_timeout;
//! in-process graceful shutdown.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn a_drained_backend_keeps_its_live_connection_until_it_ends() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("dr", &[a.addr, b.addr]);
    cfg.drain_timeout = Duration::from_secs(60);
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut live = connect_echo(lb.addr("dr"), b"first").await;
    assert_eq!(a.accepted(), 1, "round robin starts with the first backend");

    let (status, _) = http(
        lb.admin(),
        "POST",
        &format!("/listeners/dr/backends/{}/drain", a.addr),
        None,
    )
    .await;
    assert_eq!(status, 200);
    ev.wait("backend_draining", Some(a.addr)).await;

    // The live connection still works; new ones go to the remaining backend.
    roundtrip(&mut live, b"still served").await;
    for _ in 0..3 {
        drop(connect_echo(lb.addr("dr"), b"new").await);
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 3));
    let l = get_json(lb.admin(), "/listeners/dr").await;
    let drained = l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == a.addr.to_string())
        .cloned()
        .expect("draining backend listed");
    assert_eq!(drained["draining"], true);
    assert_eq!(drained["active"], 1);

    drop(live);
    let removed = ev.wait("backend_removed", Some(a.addr)).await;
    assert_eq!(removed["cause"], "drained");
    lb.stop().await;
}

#[tokio::test]
async fn drain_timeout_closes_a_connection_that_outlives_it() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("dt", &[a.addr, b.addr]);
    cfg.drain_timeout = Duration::from_millis(300);
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut live = connect_echo(lb.addr("dt"), b"first").await;
    assert!(lb
        .handle
        .shared()
        .listener("dt")
        .unwrap()
        .drain_backend(&a.addr.to_string()));
    // The connection works until the deadline...
    roundtrip(&mut live, b"before the deadline").await;
    // ...and is then closed.
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Eof));
    let removed = ev.wait("backend_removed", Some(a.addr)).await;
    assert_eq!(removed["cause"], "drain_timeout");
    lb.stop().await;
}

#[tokio::test]
async fn replacing_backends_drains_the_removed_ones() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("rep", &[a.addr]);
    cfg.drain_timeout = Duration::from_secs(60);
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let mut live = connect_echo(lb.addr("rep"), b"on a").await;
    lb.handle
        .shared()
        .listener("rep")
        .unwrap()
        .set_backends(vec![b.addr.to_string()])
        .unwrap();
    ev.wait("backend_registered", Some(b.addr)).await;
    roundtrip(&mut live, b"still on a").await;
    drop(connect_echo(lb.addr("rep"), b"on b").await);
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
    drop(live);
    ev.wait("backend_removed", Some(a.addr)).await;
    lb.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_waits_for_live_connections() {
    let b = echo_backend().await;
    let mut cfg = listener("sd", &[b.addr]);
    cfg.drain_timeout = Duration::from_secs(60);
    let lb = start(config(vec![cfg])).await;
    let addr = lb.addr("sd");
    let live = connect_echo(addr, b"hi").await;
    stop_draining(lb, addr, live).await;
}

#[tokio::test]
async fn reload_removes_and_adds_listeners_without_dropping_connections() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut old = listener("old", &[a.addr]);
    old.drain_timeout = Duration::from_secs(60);
    let keep = listener("keep", &[a.addr]);
    let lb = start(config(vec![old, keep.clone()])).await;
    let mut ev = lb.events();
    let old_addr = lb.addr("old");
    let keep_addr = lb.addr("keep");
    let mut live = connect_echo(old_addr, b"on old").await;

    let mut keep2 = keep.clone();
    keep2.backends = vec![b.addr.to_string()];
    let new = listener("new", &[b.addr]);
    lb.handle.reload(config(vec![keep2, new])).await.unwrap();
    // New listeners come up before old ones go.
    ev.wait("listener_added", None).await;
    ev.wait("listener_removed", None).await;

    // The removed listener no longer accepts, but its live connection goes on.
    until_not_listening(old_addr).await;
    roundtrip(&mut live, b"still on old").await;
    // The kept listener keeps its address and uses the new backends; the new one serves.
    assert_eq!(lb.addr("keep"), keep_addr);
    drop(connect_echo(keep_addr, b"keep").await);
    drop(connect_echo(lb.addr("new"), b"new").await);
    assert_eq!(b.served(), 2);
    assert!(lb.handle.shared().listener("old").is_none());
    drop(live);
    lb.stop().await;
}

#[tokio::test]
async fn a_reload_with_a_bad_certificate_changes_nothing() {
    let a = echo_backend().await;
    let lb = start(config(vec![listener("x", &[a.addr])])).await;
    let mut bad = listener("x", &[a.addr]);
    bad.tls = Some(warren_lb::config::TlsServerConfig {
        cert: "/nonexistent.pem".into(),
        key: "/nonexistent.key".into(),
    });
    let extra = listener("y", &[a.addr]);
    assert!(lb.handle.reload(config(vec![bad, extra])).await.is_err());
    assert!(lb.handle.shared().listener("y").is_none());
    drop(connect_echo(lb.addr("x"), b"plain still").await);
    lb.stop().await;
}
