//! The admin API's defences: token, browser (Origin, Sec-Fetch-Site, Host), body type, slow and
//! many clients, and backends that would reach warren-lb itself.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_lb::config::{AdminConfig, Config};
use warren_lb::Lb;

const TOKEN: &str = "correct-horse-battery-staple";

fn token_file(tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-lb-admin-sec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.token"));
    std::fs::write(&p, text).unwrap();
    p
}

/// A config with one listener and an admin API whose settings `f` adjusts.
fn with_admin(backend: SocketAddr, f: impl FnOnce(&mut AdminConfig)) -> Config {
    let mut cfg = config(vec![listener("a", &[backend])]);
    f(cfg.admin.as_mut().unwrap());
    cfg
}

fn basic(user: &str, pass: &str) -> String {
    // Test-side base64 (standard alphabet, padded).
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

// ---------------------------------------------------------------- token

#[tokio::test]
async fn a_configured_token_is_required_everywhere_but_healthz() {
    let b = echo_backend().await;
    let file = token_file("required", &format!("  {TOKEN}\n"));
    let lb = start(with_admin(b.addr, |a| a.token_file = Some(file))).await;
    let admin = lb.admin();
    let bearer = format!("Bearer {TOKEN}");

    // No token: 401 with a Bearer challenge, on reads and writes alike.
    for (method, path) in [
        ("GET", "/listeners"),
        ("GET", "/metrics"),
        ("GET", "/events"),
        ("GET", "/connections"),
        ("POST", "/listeners/a/reset"),
    ] {
        let r = request(admin, method, path, &[], None).await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
    }
    // A live connection was not reset by the refused POST.
    let mut live = connect_echo(lb.addr("a"), b"x").await;
    roundtrip(&mut live, b"still here").await;

    // Wrong tokens.
    for auth in [
        "Bearer wrong".to_string(),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        basic("admin", "wrong"),
        format!("Token {TOKEN}"),
    ] {
        let r = request(
            admin,
            "GET",
            "/listeners",
            &[("Authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(r.status, 401, "{auth}");
    }

    // The right one, as a bearer token or as a basic-auth password with any user name.
    let r = request(
        admin,
        "GET",
        "/listeners",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for user in ["admin", "", "anyone at all"] {
        let auth = basic(user, TOKEN);
        let r = request(
            admin,
            "GET",
            "/listeners/a",
            &[("Authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "user `{user}`: {}", r.body);
    }
    let r = request(
        admin,
        "POST",
        "/listeners/a/reset",
        &[("Authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Reset));

    // Health probes need none.
    let r = request(admin, "GET", "/healthz", &[], None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    lb.stop().await;
}

#[tokio::test]
async fn an_empty_or_missing_token_file_stops_bind() {
    let b = echo_backend().await;
    let empty = token_file("empty", " \n\t\n");
    let err = Lb::bind(with_admin(b.addr, |a| a.token_file = Some(empty.clone())))
        .await
        .err()
        .expect("an empty token file is refused")
        .to_string();
    assert!(
        err.contains("is empty") && err.contains(&*empty.to_string_lossy()),
        "{err}"
    );

    let missing = PathBuf::from("/nonexistent/warren-lb.token");
    let err = Lb::bind(with_admin(b.addr, |a| a.token_file = Some(missing)))
        .await
        .err()
        .expect("a missing token file is refused")
        .to_string();
    assert!(err.contains("/nonexistent/warren-lb.token"), "{err}");

    let spaced = token_file("spaced", "two words\n");
    let err = Lb::bind(with_admin(b.addr, |a| a.token_file = Some(spaced)))
        .await
        .err()
        .expect("a token that cannot travel in a header is refused")
        .to_string();
    assert!(err.contains("printable ASCII"), "{err}");
}

#[tokio::test]
async fn a_non_loopback_admin_without_token_never_binds() {
    let b = echo_backend().await;
    // 0.0.0.0:0 is never bound: validation refuses first.
    let cfg = with_admin(b.addr, |a| a.listen = "0.0.0.0:0".parse().unwrap());
    let err = Lb::bind(cfg).await.err().expect("refused").to_string();
    assert!(
        err.contains("not a loopback address") && err.contains("token_file"),
        "{err}"
    );
    // The same address is accepted by validation once a token file is set.
    let file = token_file("public", TOKEN);
    let cfg = with_admin(b.addr, |a| {
        a.listen = "0.0.0.0:0".parse().unwrap();
        a.token_file = Some(file);
    });
    assert_eq!(cfg.validate(), Ok(()));
}

// ---------------------------------------------------------------- browsers

#[tokio::test]
async fn bodies_that_are_not_json_get_415() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("ct", &[b.addr])])).await;
    let admin = lb.admin();
    let rule = r#"{"name": "deny", "kind": "refuse"}"#;
    for ct in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = ct.iter().map(|c| ("Content-Type", *c)).collect();
        let r = request(admin, "POST", "/listeners/ct/faults", &headers, Some(rule)).await;
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
        let r = request(admin, "PUT", "/listeners/ct/faults", &headers, Some("[]")).await;
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
        let r = request(admin, "POST", "/listeners/ct/reset", &headers, Some("{}")).await;
        assert_eq!(r.status, 415, "{ct:?}: {}", r.body);
    }
    // Nothing was installed: a new connection is still proxied.
    let v = get_json(admin, "/listeners/ct/faults").await;
    assert_eq!(v, serde_json::json!([]));
    drop(connect_echo(lb.addr("ct"), b"served").await);

    // JSON with parameters is fine, and so is a bodiless POST without any type.
    let r = request(
        admin,
        "POST",
        "/listeners/ct/faults",
        &[("Content-Type", "application/json; charset=utf-8")],
        Some(r#"{"name": "slow", "kind": "latency", "latency": "1ms"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(admin, "POST", "/listeners/ct/reset", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    lb.stop().await;
}

#[tokio::test]
async fn a_foreign_origin_gets_403_and_the_own_origin_passes() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("o", &[b.addr])])).await;
    let admin = lb.admin();
    let mut live = connect_echo(lb.addr("o"), b"x").await;
    let own = format!("http://{admin}");
    let other_port = format!("http://127.0.0.1:{}", admin.port() ^ 1);
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", other_port.as_str())],
        vec![("Origin", "null")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Origin", own.as_str()), ("Sec-Fetch-Site", "cross-site")],
    ] {
        // The empty-body form POST of a cross-site page.
        let mut h = headers.clone();
        h.push(("Content-Type", "application/x-www-form-urlencoded"));
        let r = request(admin, "POST", "/listeners/o/reset", &h, None).await;
        assert_eq!(r.status, 403, "{headers:?}: {}", r.body);
        let r = request(admin, "GET", "/listeners", &headers, None).await;
        assert_eq!(r.status, 403, "{headers:?}: {}", r.body);
    }
    roundtrip(&mut live, b"not reset").await;

    // The admin's own origin, and no Origin at all (curl), pass.
    let r = request(
        admin,
        "GET",
        "/listeners",
        &[("Origin", &own), ("Sec-Fetch-Site", "same-origin")],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(admin, "POST", "/listeners/o/reset", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Reset));
    lb.stop().await;
}

#[tokio::test]
async fn without_a_token_a_rebound_host_name_gets_403() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("h", &[b.addr])])).await;
    let admin = lb.admin();
    let port = admin.port();
    let send = |host: String| async move {
        let req = format!("GET /listeners HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        raw(admin, &req).await.status
    };
    assert_eq!(send(format!("attacker.example:{port}")).await, 403);
    assert_eq!(send(format!("localhost:{port}")).await, 200);
    assert_eq!(send(format!("127.0.0.1:{port}")).await, 200);
    // A same-origin page on a rebound name is refused too.
    let host = format!("attacker.example:{port}");
    let origin = format!("http://{host}");
    let req = format!(
        "GET /listeners HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(admin, &req).await.status, 403);
    lb.stop().await;
}

// ---------------------------------------------------------------- slow and many clients

#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    let b = echo_backend().await;
    let cfg = with_admin(b.addr, |a| a.request_timeout = Duration::from_millis(300));
    let lb = start(cfg).await;
    // Half a request line, then nothing: the server closes the connection.
    let mut s = TcpStream::connect(lb.admin()).await.unwrap();
    s.write_all(b"GET /listen").await.unwrap();
    let end = read_end(&mut s, WAIT).await;
    assert!(
        matches!(end, Some(ReadEnd::Eof | ReadEnd::Reset | ReadEnd::Data(_))),
        "closed within {WAIT:?}: {end:?}"
    );
    // Same for a connection that never sends a byte, and an idle keep-alive one.
    let mut idle = TcpStream::connect(lb.admin()).await.unwrap();
    assert!(read_end(&mut idle, WAIT).await.is_some());
    let mut ka = TcpStream::connect(lb.admin()).await.unwrap();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", lb.admin());
    ka.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(WAIT, ka.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "idle keep-alive connection closed");
    assert!(got.starts_with(b"HTTP/1.1 200"));
    lb.stop().await;
}

#[tokio::test]
async fn a_slow_request_body_is_cut_off() {
    let b = echo_backend().await;
    let cfg = with_admin(b.addr, |a| a.request_timeout = Duration::from_millis(300));
    let lb = start(cfg).await;
    let mut s = TcpStream::connect(lb.admin()).await.unwrap();
    let head = format!(
        "PUT /listeners/a/faults HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[",
        lb.admin()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("answered and closed in time")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    lb.stop().await;
}

#[tokio::test]
async fn a_body_over_1_mib_gets_413_before_it_is_read() {
    let b = echo_backend().await;
    let lb = start(config(vec![listener("big", &[b.addr])])).await;
    // The head only: the declared length is enough to refuse.
    let req = format!(
        "PUT /listeners/big/backends HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        lb.admin(),
        2 << 20
    );
    let r = raw(lb.admin(), &req).await;
    assert_eq!(r.status, 413, "{}", r.body);
    lb.stop().await;
}

#[tokio::test]
async fn follow_streams_outlive_the_request_timeout() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let mut cfg = config(vec![listener("f", &[a.addr, b.addr])]);
    cfg.admin.as_mut().unwrap().request_timeout = Duration::from_millis(200);
    let lb = start(cfg).await;
    let mut s = TcpStream::connect(lb.admin()).await.unwrap();
    let req = format!(
        "GET /events?follow=1 HTTP/1.1\r\nHost: {}\r\n\r\n",
        lb.admin()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    // Several request timeouts later, the stream still delivers.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, _) = http(
        lb.admin(),
        "POST",
        &format!("/listeners/f/backends/{}/drain", a.addr),
        None,
    )
    .await;
    assert_eq!(status, 200);
    while !String::from_utf8_lossy(&got).contains("backend_draining") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream stays open");
        got.extend_from_slice(&buf[..n]);
    }
    lb.stop().await;
}

#[tokio::test]
async fn admin_connections_beyond_the_cap_are_closed() {
    let b = echo_backend().await;
    let cfg = with_admin(b.addr, |a| a.max_connections = 2);
    let lb = start(cfg).await;
    let admin = lb.admin();
    let held1 = TcpStream::connect(admin).await.unwrap();
    let held2 = TcpStream::connect(admin).await.unwrap();
    // Make sure both are accepted (and hold their slots) before the third.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(admin).await.unwrap();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let _ = third.write_all(req.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, third.read_to_end(&mut got))
        .await
        .expect("closed at once");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // A freed slot serves again.
    drop((held1, held2));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let _ = s.write_all(req.as_bytes()).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
        if got.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a slot came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lb.stop().await;
}

// ---------------------------------------------------------------- backends

async fn put_backends(admin: SocketAddr, listener: &str, list: &[&str]) -> (u16, String) {
    let body = serde_json::to_string(list).unwrap();
    http(
        admin,
        "PUT",
        &format!("/listeners/{listener}/backends"),
        Some(&body),
    )
    .await
}

#[tokio::test]
async fn put_backends_refuses_warren_lb_itself_and_invalid_addresses() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = start(config(vec![
        listener("p", &[a.addr]),
        listener("q", &[a.addr]),
    ]))
    .await;
    let admin = lb.admin();
    let own_p = lb.addr("p").to_string();
    let own_q = lb.addr("q").to_string();
    let own_admin = admin.to_string();
    let localhost_admin = format!("localhost:{}", admin.port());
    let mapped_alias = format!("[::ffff:127.0.0.1]:{}", lb.addr("p").port());
    let long_host = format!("{}:5672", "a".repeat(5000));
    let cases: Vec<(&str, &str)> = vec![
        (own_p.as_str(), "own listener `p`"),
        (own_q.as_str(), "own listener `q`"),
        (mapped_alias.as_str(), "own listener `p`"),
        (own_admin.as_str(), "own admin API"),
        (localhost_admin.as_str(), "own admin API"),
        ("999.1.1.1:1", "invalid IPv4 address"),
        (long_host.as_str(), "5000 characters"),
        ("127.0.0.1:0", "port"),
        ("127.0.0.1:65536", "invalid port"),
        ("127.0.0.1:http", "invalid port"),
        ("bad_host:80", "invalid host name"),
        ("0.0.0.0:5672", "unspecified"),
        ("no-such-host.invalid:5672", "does not resolve"),
    ];
    for (backend, why) in cases {
        let (status, text) = put_backends(admin, "p", &[&b.addr.to_string(), backend]).await;
        assert_eq!(status, 400, "{}: {text}", &backend[..backend.len().min(40)]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON error");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(why), "{why}: {msg}");
        assert!(
            msg.len() < 400,
            "the message stays readable: {} bytes",
            msg.len()
        );
    }
    // Nothing changed: the listener still proxies to `a` only.
    let v = get_json(admin, "/listeners/p").await;
    assert_eq!(v["backends"].as_array().unwrap().len(), 1);
    drop(connect_echo(lb.addr("p"), b"x").await);
    assert_eq!(a.served(), 1);

    // Valid backends, a name among them, are accepted.
    let by_name = format!("localhost:{}", b.addr.port());
    let (status, text) = put_backends(admin, "p", &[&b.addr.to_string(), &by_name]).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = put_backends(admin, "p", &[&b.addr.to_string()]).await;
    assert_eq!(status, 200, "{text}");
    drop(connect_echo(lb.addr("p"), b"y").await);
    assert_eq!(b.served(), 1);
    lb.stop().await;
}

#[tokio::test]
async fn bind_refuses_a_backend_on_its_own_listener() {
    // A port nobody holds right now, used as the listener's bind and its own backend.
    let port = dead_addr().await.port();
    let mut l = listener("loop", &[]);
    l.bind = format!("127.0.0.1:{port}").parse().unwrap();
    l.backends = vec![format!("localhost:{port}")];
    let err = Lb::bind(config(vec![l.clone()]))
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(err.is_config(), "{msg}");
    assert!(
        msg.contains("resolves to 127.0.0.1:") && msg.contains("own listener `loop`"),
        "{msg}"
    );
    // An IP literal is caught by validation alone.
    l.backends = vec![format!("127.0.0.1:{port}")];
    let err = config(vec![l]).validate().unwrap_err().to_string();
    assert!(err.contains("loop connections back"), "{err}");
}

#[tokio::test]
async fn reload_with_a_bad_backend_keeps_the_running_configuration() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let cfg = config(vec![listener("r", &[a.addr])]);
    let lb = start(cfg.clone()).await;
    let own = lb.addr("r");
    for bad in [
        own.to_string(),
        lb.admin().to_string(),
        "999.1.1.1:1".to_string(),
    ] {
        let mut next = cfg.clone();
        next.listeners[0].backends = vec![b.addr.to_string(), bad.clone()];
        let err = lb.handle.reload(next).await.expect_err(&bad).to_string();
        assert!(err.contains(&bad), "{err}");
    }
    // Still `a`, on the same address.
    assert_eq!(lb.addr("r"), own);
    drop(connect_echo(own, b"x").await);
    assert_eq!((a.served(), b.served()), (1, 0));
    lb.stop().await;
}
