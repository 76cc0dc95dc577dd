//! Health checks: thresholds, tcp / http / amqp checks, rotation, fail open.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use support::*;
use warren_lb::config::HealthCheck;

fn checks(text: &str, listener: &str, backend: &str, result: &str) -> f64 {
    metric(
        text,
        "warren_lb_health_checks_total",
        &[
            ("listener", listener),
            ("backend", backend),
            ("result", result),
        ],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn health_transitions_follow_the_thresholds() {
    let b = echo_backend().await;
    let baddr = b.addr.to_string();
    let mut cfg = listener("th", &[b.addr]);
    cfg.health = fast_health(3, 2);
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let addr = b.kill().await;

    let (_, before) = http(lb.admin(), "GET", "/metrics", None).await;
    let fails_before = checks(&before, "th", &baddr, "fail");
    ev.wait("backend_down", Some(addr)).await;
    let (_, at_down) = http(lb.admin(), "GET", "/metrics", None).await;
    assert!(
        checks(&at_down, "th", &baddr, "fail") - fails_before >= 1.0,
        "down needs failed checks"
    );
    assert_eq!(
        metric(
            &at_down,
            "warren_lb_backend_up",
            &[("listener", "th"), ("backend", &baddr)]
        ),
        Some(0.0)
    );
    let ls = lb.handle.shared().listener("th").unwrap();
    assert!(!ls.pool.members()[0].is_healthy());

    let (_, pre_revive) = http(lb.admin(), "GET", "/metrics", None).await;
    let oks_before = checks(&pre_revive, "th", &baddr, "ok");
    let _b = echo_backend_on(addr).await;
    ev.wait("backend_up", Some(addr)).await;
    let (_, at_up) = http(lb.admin(), "GET", "/metrics", None).await;
    let oks = checks(&at_up, "th", &baddr, "ok") - oks_before;
    assert!(
        oks >= 3.0,
        "up only after healthy_threshold (3) passes, saw {oks}"
    );
    assert!(ls.pool.members()[0].is_healthy());
    assert_eq!(
        metric(
            &at_up,
            "warren_lb_backend_up",
            &[("listener", "th"), ("backend", &baddr)]
        ),
        Some(1.0)
    );
    lb.stop().await;
}

#[tokio::test]
async fn one_failed_check_below_the_threshold_keeps_the_backend_in_rotation() {
    // unhealthy_threshold is large: a dead backend stays "healthy" (in rotation) for a while,
    // which shows that a single failure does not take it out.
    let b = echo_backend().await;
    let mut cfg = listener("slow", &[b.addr]);
    cfg.health = fast_health(1, 1000);
    let lb = start(config(vec![cfg])).await;
    let baddr = b.addr.to_string();
    b.kill().await;
    let admin = lb.admin();
    let mut fails = 0.0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while fails < 3.0 {
        assert!(tokio::time::Instant::now() < deadline, "health checks run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (_, text) = http(admin, "GET", "/metrics", None).await;
        fails = checks(&text, "slow", &baddr, "fail");
    }
    let ls = lb.handle.shared().listener("slow").unwrap();
    assert!(ls.pool.members()[0].is_healthy());
    lb.stop().await;
}

#[tokio::test]
async fn a_killed_backend_leaves_rotation_and_a_revived_one_returns() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = listener("rot", &[a.addr, b.addr]);
    cfg.health = fast_health(2, 2);
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    let b_addr = b.kill().await;
    ev.wait("backend_down", Some(b_addr)).await;
    let a0 = a.served();
    for _ in 0..4 {
        drop(connect_echo(lb.addr("rot"), b"q").await);
    }
    assert_eq!(a.served() - a0, 4, "all traffic on the healthy backend");
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    // Unhealthy backends are not even tried.
    assert_eq!(
        metric(
            &text,
            "warren_lb_connect_errors_total",
            &[("listener", "rot"), ("backend", &b_addr.to_string())]
        )
        .unwrap_or(0.0),
        0.0
    );

    let b2 = echo_backend_on(b_addr).await;
    ev.wait("backend_up", Some(b_addr)).await;
    let a1 = a.served();
    for _ in 0..4 {
        drop(connect_echo(lb.addr("rot"), b"q").await);
    }
    assert_eq!((a.served() - a1, b2.served()), (2, 2), "back in rotation");
    lb.stop().await;
}

#[tokio::test]
async fn http_check_needs_a_2xx() {
    let status = Arc::new(AtomicU16::new(200));
    let b = http_backend(status.clone()).await;
    let mut cfg = listener("http", &[b.addr]);
    cfg.health = fast_health(2, 2);
    cfg.health.check = HealthCheck::Http;
    cfg.health.path = "/health".to_string();
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    status.store(503, Ordering::SeqCst);
    let down = ev.wait("backend_down", Some(b.addr)).await;
    assert!(down["cause"].as_str().unwrap().contains("503"), "{down}");
    status.store(204, Ordering::SeqCst);
    ev.wait("backend_up", Some(b.addr)).await;
    lb.stop().await;
}

/// A management API's health endpoint: 401 unless the check sends guest's basic auth.
async fn authenticated_backend() -> Backend {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    backend_on("127.0.0.1:0".parse().unwrap(), |mut s, _| async move {
        let mut buf = vec![0u8; 4096];
        let Ok(n) = s.read(&mut buf).await else {
            return;
        };
        let req = String::from_utf8_lossy(&buf[..n]);
        // base64("guest:guest")
        let code = if req.contains("\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n") {
            200
        } else {
            401
        };
        let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(resp.as_bytes()).await;
    })
    .await
}

#[tokio::test]
async fn an_http_check_sends_its_basic_auth() {
    let (with, without) = (authenticated_backend().await, authenticated_backend().await);
    let mut a = listener("auth", &[with.addr]);
    a.health = fast_health(2, 2);
    a.health.check = HealthCheck::Http;
    a.health.path = "/api/health/checks/alarms".to_string();
    a.health.auth = Some("guest:guest".to_string());
    let mut b = listener("noauth", &[without.addr]);
    b.health = a.health.clone();
    b.health.auth = None;
    let lb = start(config(vec![a, b])).await;
    let mut ev = lb.events();
    let down = ev.wait("backend_down", Some(without.addr)).await;
    assert!(down["cause"].as_str().unwrap().contains("401"), "{down}");
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    assert!(
        checks(&text, "auth", &with.addr.to_string(), "ok") >= 1.0,
        "{text}"
    );
    assert_eq!(checks(&text, "auth", &with.addr.to_string(), "fail"), 0.0);
    // The password is not shown by the admin API.
    let (_, listing) = http(lb.admin(), "GET", "/listeners/auth", None).await;
    assert!(!listing.contains("guest:guest"), "{listing}");
    lb.stop().await;
}

#[tokio::test]
async fn amqp_check_expects_connection_start() {
    let good = amqp_backend(CONNECTION_START).await;
    let bad = amqp_backend(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    let mut cfg = listener("amqp", &[good.addr, bad.addr]);
    cfg.health = fast_health(2, 2);
    cfg.health.check = HealthCheck::Amqp;
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    ev.wait("backend_down", Some(bad.addr)).await;
    let (_, text) = http(lb.admin(), "GET", "/metrics", None).await;
    let good_ok = checks(&text, "amqp", &good.addr.to_string(), "ok");
    assert!(good_ok >= 1.0, "{text}");
    assert_eq!(checks(&text, "amqp", &good.addr.to_string(), "fail"), 0.0);
    let ls = lb.handle.shared().listener("amqp").unwrap();
    let m = ls.pool.members();
    assert!(m[0].is_healthy());
    assert!(!m[1].is_healthy());
    lb.stop().await;
}

#[tokio::test]
async fn all_unhealthy_fails_open_and_still_routes() {
    let status = Arc::new(AtomicU16::new(500));
    let (a, b) = (
        http_backend(status.clone()).await,
        http_backend(status.clone()).await,
    );
    let mut cfg = listener("fo", &[a.addr, b.addr]);
    cfg.health = fast_health(2, 2);
    cfg.health.check = HealthCheck::Http;
    cfg.health.path = "/health".to_string();
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    ev.wait("fail_open", None).await;
    let l = get_json(lb.admin(), "/listeners/fo").await;
    assert_eq!(l["fail_open"], true);
    assert!(l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["healthy"] == false));
    // Traffic still flows to every backend.
    for _ in 0..4 {
        drop(connect_echo(lb.addr("fo"), b"still here").await);
    }
    // Round robin over both, although neither is healthy.
    assert_eq!((a.served(), b.served()), (2, 2));
    status.store(200, Ordering::SeqCst);
    ev.wait("fail_open_ended", None).await;
    lb.stop().await;
}
