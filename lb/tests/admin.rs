//! The admin API, one test per endpoint.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn healthz_answers_200() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("h", &[b.addr])])).await;
    let (status, body) = http(lb.admin(), "GET", "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http(lb.admin(), "GET", "/nope", None).await;
    assert_eq!(status, 404);
    lb.stop().await;
}

#[tokio::test]
async fn get_listeners_lists_backends_with_state() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![
        listener("one", &[a.addr, b.addr]),
        listener("two", &[b.addr]),
    ]))
    .await;
    let _c = connect_echo(lb.addr("one"), b"x").await;
    let v = get_json(lb.admin(), "/listeners").await;
    let ls = v.as_array().unwrap();
    assert_eq!(ls.len(), 2);
    assert_eq!(ls[0]["name"], "one");
    assert_eq!(ls[0]["addr"], lb.addr("one").to_string());
    assert_eq!(ls[0]["balance"], "round-robin");
    assert_eq!(ls[0]["active"], 1);
    let bs = ls[0]["backends"].as_array().unwrap();
    assert_eq!(bs.len(), 2);
    assert_eq!(bs[0]["address"], a.addr.to_string());
    assert_eq!(bs[0]["healthy"], true);
    assert_eq!(bs[0]["active"], 1);
    assert_eq!(bs[0]["draining"], false);
    assert_eq!(bs[1]["active"], 0);
    assert_eq!(ls[1]["name"], "two");
    let (status, _) = http(lb.admin(), "GET", "/listeners/missing", None).await;
    assert_eq!(status, 404);
    lb.stop().await;
}

#[tokio::test]
async fn put_backends_replaces_the_list() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![listener("p", &[a.addr])])).await;
    let body = format!("[\"{}\"]", b.addr);
    let (status, text) = http(lb.admin(), "PUT", "/listeners/p/backends", Some(&body)).await;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["backends"][0]["address"], b.addr.to_string());
    drop(connect_echo(lb.addr("p"), b"x").await);
    assert_eq!((a.accepted(), b.accepted()), (0, 1));
    let (status, text) = http(lb.admin(), "PUT", "/listeners/p/backends", Some("[]")).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = http(
        lb.admin(),
        "PUT",
        "/listeners/p/backends",
        Some("[\"nope\"]"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(text.contains("nope"), "{text}");
    let (status, _) = http(lb.admin(), "PUT", "/listeners/p/backends", Some("{")).await;
    assert_eq!(status, 400);
    let (status, _) = http(lb.admin(), "PUT", "/listeners/zz/backends", Some("[]")).await;
    assert_eq!(status, 404);
    lb.stop().await;
}

#[tokio::test]
async fn post_drain_deregisters_one_backend() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![listener("d", &[a.addr, b.addr])])).await;
    let path = format!("/listeners/d/backends/{}/drain", a.addr);
    let (status, _) = http(lb.admin(), "POST", &path, None).await;
    assert_eq!(status, 200);
    for _ in 0..2 {
        drop(connect_echo(lb.addr("d"), b"x").await);
    }
    assert_eq!((a.accepted(), b.accepted()), (0, 2));
    // Not a member any more.
    let (status, _) = http(lb.admin(), "POST", &path, None).await;
    assert_eq!(status, 404);
    // Percent-encoded addresses work too.
    let enc = format!(
        "/listeners/d/backends/{}/drain",
        b.addr.to_string().replace(':', "%3A")
    );
    let (status, _) = http(lb.admin(), "POST", &enc, None).await;
    assert_eq!(status, 200);
    lb.stop().await;
}

#[tokio::test]
async fn get_connections_lists_live_connections_with_bytes() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("c", &[b.addr])])).await;
    let c = connect_echo(lb.addr("c"), b"12345").await;
    let v = get_json(lb.admin(), "/connections").await;
    let conns = v.as_array().unwrap();
    assert_eq!(conns.len(), 1);
    let c0 = &conns[0];
    assert_eq!(c0["listener"], "c");
    assert_eq!(c0["client"], c.local_addr().unwrap().to_string());
    assert_eq!(c0["backend"], b.addr.to_string());
    assert_eq!(c0["bytes_upstream"], 5);
    assert_eq!(c0["bytes_downstream"], 5);
    assert!(c0["age_secs"].as_f64().unwrap() >= 0.0);
    assert!(c0["id"].as_u64().unwrap() >= 1);
    lb.stop().await;
}

#[tokio::test]
async fn get_events_returns_json_lines() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![listener("e", &[a.addr])])).await;
    let body = format!("[\"{}\"]", b.addr);
    let mut ev = lb.events();
    http(lb.admin(), "PUT", "/listeners/e/backends", Some(&body)).await;
    ev.wait("backend_removed", Some(a.addr)).await;
    let (status, text) = http(lb.admin(), "GET", "/events", None).await;
    assert_eq!(status, 200);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["backend_registered", "backend_draining", "backend_removed"]
    );
    for key in [
        "ts",
        "listener",
        "conn",
        "event",
        "rule",
        "cause",
        "style",
        "side",
        "discarded_upstream",
        "discarded_downstream",
    ] {
        assert!(events[0].get(key).is_some(), "key {key} in {}", events[0]);
    }
    assert_eq!(events[0]["listener"], "e");
    lb.stop().await;
}

#[tokio::test]
async fn get_events_follow_streams_new_events() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![listener("f", &[a.addr, b.addr])])).await;
    let mut s = TcpStream::connect(lb.admin()).await.unwrap();
    let req = format!(
        "GET /events?follow=1 HTTP/1.1\r\nHost: {}\r\n\r\n",
        lb.admin()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The response head arrives first.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    // An event that happens after subscribing is streamed.
    let (status, _) = http(
        lb.admin(),
        "POST",
        &format!("/listeners/f/backends/{}/drain", a.addr),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let want = format!("\"backend\":\"{}\"", a.addr);
    while !String::from_utf8_lossy(&got).contains("backend_removed") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream stays open");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("backend_draining") && text.contains(&want),
        "{text}"
    );
    lb.stop().await;
}

#[tokio::test]
async fn get_metrics_renders_prometheus_text() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("m", &[b.addr])])).await;
    drop(connect_echo(lb.addr("m"), b"0123456789").await);
    let ls = lb.handle.shared().listener("m").unwrap();
    until("connection closed", || ls.active() == 0).await;
    let (status, text) = http(lb.admin(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let bk = b.addr.to_string();
    let lbl = [("listener", "m"), ("backend", bk.as_str())];
    assert_eq!(
        metric(&text, "warren_lb_connections_total", &lbl),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "warren_lb_connections_active", &lbl),
        Some(0.0)
    );
    assert_eq!(metric(&text, "warren_lb_backend_up", &lbl), Some(1.0));
    assert_eq!(
        metric(
            &text,
            "warren_lb_bytes_total",
            &[("listener", "m"), ("direction", "upstream")]
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &text,
            "warren_lb_bytes_total",
            &[("listener", "m"), ("direction", "downstream")]
        ),
        Some(10.0)
    );
    assert!(
        text.contains("warren_lb_connect_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("# TYPE warren_lb_connections_total counter"));
    lb.stop().await;
}

#[tokio::test]
async fn post_reset_resets_live_connections() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("r", &[b.addr])])).await;
    let mut ev = lb.events();
    let mut c1 = connect_echo(lb.addr("r"), b"a").await;
    let mut c2 = connect_echo(lb.addr("r"), b"b").await;
    let (status, text) = http(
        lb.admin(),
        "POST",
        "/listeners/r/reset",
        Some("{\"style\":\"fin\"}"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(text.trim(), "{\"reset\":2}");
    assert_eq!(read_end(&mut c1, WAIT).await, Some(ReadEnd::Eof));
    assert_eq!(read_end(&mut c2, WAIT).await, Some(ReadEnd::Eof));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["cause"], "admin");
    assert_eq!(e["style"], "fin");
    let mut c3 = connect_echo(lb.addr("r"), b"c").await;
    let (status, _) = http(lb.admin(), "POST", "/listeners/r/reset", None).await;
    assert_eq!(status, 200);
    assert_eq!(read_end(&mut c3, WAIT).await, Some(ReadEnd::Reset));
    let _ = Duration::ZERO;
    lb.stop().await;
}

#[tokio::test]
async fn get_faults_lists_the_rules() {
    let b = echo_backend().await;
    let mut cfg = listener("fl", &[b.addr]);
    cfg.faults.push(warren_lb::config::FaultRule::reset_every(
        Duration::from_secs(30),
    ));
    let lb = start(config(vec![cfg])).await;
    let v = get_json(lb.admin(), "/listeners/fl/faults").await;
    assert_eq!(v[0]["name"], "reset-every");
    assert_eq!(v[0]["kind"], "reset");
    assert_eq!(v[0]["every"], "30s");
    lb.stop().await;
}

#[tokio::test]
async fn fault_rules_can_be_added_replaced_and_removed_at_runtime() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("rt", &[b.addr])])).await;
    let mut ev = lb.events();
    let mut live = connect_echo(lb.addr("rt"), b"x").await;
    // A periodic reset added through the API acts on the live connection.
    let rule = r#"{"name": "api-reset", "kind": "reset", "every": "200ms", "style": "fin"}"#;
    let (status, text) = http(lb.admin(), "POST", "/listeners/rt/faults", Some(rule)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Eof));
    let e = ev.wait("reset", None).await;
    assert_eq!(e["rule"], "api-reset");
    // Duplicate names are refused.
    let (status, text) = http(lb.admin(), "POST", "/listeners/rt/faults", Some(rule)).await;
    assert_eq!(status, 400, "{text}");
    // Replace, then delete.
    let (status, _) = http(
        lb.admin(),
        "PUT",
        "/listeners/rt/faults",
        Some(r#"[{"name": "calm", "kind": "latency", "latency": "10ms"}]"#),
    )
    .await;
    assert_eq!(status, 200);
    let v = get_json(lb.admin(), "/listeners/rt/faults").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "calm");
    let (status, _) = http(lb.admin(), "DELETE", "/listeners/rt/faults/calm", None).await;
    assert_eq!(status, 200);
    let (status, _) = http(lb.admin(), "DELETE", "/listeners/rt/faults/calm", None).await;
    assert_eq!(status, 404);
    // With the reset rule gone, a new connection lives on.
    let mut s = connect_echo(lb.addr("rt"), b"y").await;
    assert_eq!(read_end(&mut s, Duration::from_millis(500)).await, None);
    lb.stop().await;
}
