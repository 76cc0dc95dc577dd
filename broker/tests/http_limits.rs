//! The management HTTP server's limits over real sockets: body size (413), the node-wide body
//! budget (503), slow bodies (408) and headers, the connection cap, deeply nested JSON (400),
//! the UI's security headers and the failed-login limit (429 on HTTP, 403 on AMQP).

mod support;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::FieldTable;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::http::{b64, http, raw_http, raw_http_prefixed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::codec;
use warren_broker::config::Config;

fn config() -> Config {
    Config {
        mgmt: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Config::for_tests()
    }
}

fn mgmt_addr(b: &support::TestBroker) -> SocketAddr {
    b.shared
        .listeners
        .iter()
        .find(|(p, _)| *p == "http")
        .map(|(_, a)| *a)
        .expect("mgmt listener")
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

/// Sends a request's head (as guest) announcing `content_length` bytes of body, and `body_start`
/// of them; the rest is up to the caller.
async fn start_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_length: usize,
    body_start: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Basic {}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n",
        b64(b"guest:guest")
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body_start).await.expect("body start");
    s
}

/// Status code of the response on `s`, read within `within` (None: the connection closed
/// without a response, or nothing came in time).
async fn status_within(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut tmp = [0u8; 4096];
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let head = String::from_utf8_lossy(&buf);
    head.split(' ').nth(1).and_then(|c| c.parse().ok())
}

/// A JSON vhost body of exactly `len` bytes.
fn padded_body(len: usize) -> String {
    let base = json!({"description": ""}).to_string();
    let pad = "x".repeat(len - base.len());
    let b = json!({ "description": pad }).to_string();
    assert_eq!(b.len(), len);
    b
}

/// `levels` nested arrays around a string.
fn nested(levels: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..levels {
        v = json!([v]);
    }
    v
}

#[tokio::test]
async fn a_body_over_mgmt_max_body_size_gets_413() {
    let b = support::start_with(Config {
        mgmt_max_body_size: 1024,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let r = raw_http(
        mgmt,
        "PUT",
        "/api/vhosts/big",
        GUEST,
        Some(padded_body(2048)),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "payload_too_large");
    // Refused from the Content-Length alone, before the body is sent.
    let mut s = start_request(mgmt, "PUT", "/api/vhosts/big", 10 << 20, b"").await;
    assert_eq!(
        status_within(&mut s, Duration::from_secs(5)).await,
        Some(413)
    );
    // A chunked body is counted as it comes.
    let mut s = TcpStream::connect(mgmt).await.expect("connect");
    let chunk = "y".repeat(600);
    let req = format!(
        "PUT /api/vhosts/big HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        b64(b"guest:guest"),
        chunk.len(),
        chunk.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    assert_eq!(
        status_within(&mut s, Duration::from_secs(5)).await,
        Some(413)
    );
    // Within the limit all is well, and nothing was created by the refused requests.
    let r = raw_http(
        mgmt,
        "PUT",
        "/api/vhosts/small",
        GUEST,
        Some(padded_body(1000)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = http(mgmt, "GET", "/api/vhosts/big", GUEST, None).await;
    assert_eq!(r.status, 404);
    b.shutdown().await;
}

#[tokio::test]
async fn bodies_being_read_share_a_node_wide_budget() {
    // Budget: 4 x 64 KiB.
    let b = support::start_with(Config {
        mgmt_max_body_size: 64 << 10,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let full = padded_body(64 << 10);
    // Four slow clients announce 64 KiB each and send a little of it.
    let mut slow = Vec::new();
    for i in 0..4 {
        let s = start_request(
            mgmt,
            "PUT",
            &format!("/api/vhosts/slow{i}"),
            full.len(),
            b"{",
        )
        .await;
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The budget is taken: a fifth body waits a little, then gets 503 (and may retry).
    let t0 = tokio::time::Instant::now();
    let r = raw_http(
        mgmt,
        "PUT",
        "/api/vhosts/fifth",
        GUEST,
        Some(padded_body(1024)),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "service_unavailable");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    // Requests without a body do not need any.
    let r = http(mgmt, "GET", "/api/overview", GUEST, None).await;
    assert_eq!(r.status, 200);
    // One slow client finishes its body: its share comes back once it is answered.
    let mut done = slow.pop().expect("slow client");
    done.write_all(&full.as_bytes()[1..])
        .await
        .expect("rest of body");
    assert_eq!(
        status_within(&mut done, Duration::from_secs(5)).await,
        Some(201)
    );
    let r = raw_http(
        mgmt,
        "PUT",
        "/api/vhosts/fifth",
        GUEST,
        Some(padded_body(1024)),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // Clients that go away give their share back too.
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let r = raw_http(
            mgmt,
            "PUT",
            &format!("/api/vhosts/again{i}"),
            GUEST,
            Some(full.clone()),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    b.shutdown().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let b = support::start_with(Config {
        mgmt_body_timeout_ms: 500,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let mut s = start_request(mgmt, "PUT", "/api/vhosts/slow", 100, b"{\"desc").await;
    let t0 = tokio::time::Instant::now();
    assert_eq!(
        status_within(&mut s, Duration::from_secs(5)).await,
        Some(408)
    );
    assert!(t0.elapsed() >= Duration::from_millis(400));
    let r = http(mgmt, "GET", "/api/vhosts/slow", GUEST, None).await;
    assert_eq!(r.status, 404);
    b.shutdown().await;
}

#[tokio::test]
async fn headers_that_do_not_arrive_in_time_end_the_connection() {
    let b = support::start_with(Config {
        mgmt_header_timeout_ms: 500,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let mut s = TcpStream::connect(mgmt).await.expect("connect");
    s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("partial head");
    let t0 = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the broker ended the connection")
        .ok();
    assert!(t0.elapsed() >= Duration::from_millis(400));
    // An idle keep-alive connection is ended the same way.
    let mut s = TcpStream::connect(mgmt).await.expect("connect");
    let t0 = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the broker ended the idle connection")
        .ok();
    assert!(t0.elapsed() >= Duration::from_millis(400));
    b.shutdown().await;
}

#[tokio::test]
async fn connections_past_mgmt_max_connections_wait_for_a_free_slot() {
    let b = support::start_with(Config {
        mgmt_max_connections: 2,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let idle1 = TcpStream::connect(mgmt).await.expect("idle 1");
    let _idle2 = TcpStream::connect(mgmt).await.expect("idle 2");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Connects (the kernel's backlog) but is not served while both slots are taken.
    let mut third = TcpStream::connect(mgmt).await.expect("third");
    third
        .write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    assert_eq!(
        status_within(&mut third, Duration::from_millis(700)).await,
        None
    );
    drop(idle1);
    assert_eq!(
        status_within(&mut third, Duration::from_secs(5)).await,
        Some(401)
    );
    b.shutdown().await;
}

#[tokio::test]
async fn json_bodies_nested_too_deep_get_400() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    let r = http(
        mgmt,
        "PUT",
        "/api/queues/%2f/q",
        GUEST,
        Some(json!({"durable": false, "arguments": {"x-deep": nested(50)}})),
    )
    .await;
    r.bad_request("request body nested deeper than 20 levels");
    // Whatever the endpoint, and even in a field the endpoint ignores.
    let r = http(
        mgmt,
        "PUT",
        "/api/vhosts/deep",
        GUEST,
        Some(json!({"description": "d", "junk": nested(50)})),
    )
    .await;
    r.bad_request("request body nested deeper than 20 levels");
    let r = http(mgmt, "GET", "/api/vhosts/deep", GUEST, None).await;
    assert_eq!(r.status, 404);
    // 20 levels in all (the top object and 19 arrays) are fine.
    let r = http(
        mgmt,
        "PUT",
        "/api/vhosts/deep",
        GUEST,
        Some(json!({"description": "d", "junk": nested(19)})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = http(mgmt, "GET", "/api/overview", GUEST, None).await;
    assert_eq!(r.status, 200);
    b.shutdown().await;
}

#[tokio::test]
async fn ui_and_api_responses_carry_security_headers() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    for (path, auth) in [
        ("/", None),
        ("/index.html", None),
        ("/app.js", None),
        ("/style.css", None),
        ("/api/overview", GUEST),
        ("/api/overview", None),
        ("/api/nothing-here", GUEST),
    ] {
        let r = http(mgmt, "GET", path, auth, None).await;
        let h = |k: &str| r.headers.get(k).map(String::as_str);
        assert_eq!(h("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            h("content-security-policy"),
            Some("default-src 'self'; frame-ancestors 'none'"),
            "{path}"
        );
        assert_eq!(h("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(h("referrer-policy"), Some("no-referrer"), "{path}");
    }
    // The CSP forbids inline script and style: the UI must not rely on them.
    let ui = |f: &str| {
        std::fs::read_to_string(format!("{}/ui/{f}", env!("CARGO_MANIFEST_DIR"))).expect("ui")
    };
    let html = ui("index.html");
    assert!(!html.contains("<style"), "inline <style> in index.html");
    assert!(
        html.matches("<script").count() == html.matches("<script src=").count(),
        "inline <script> in index.html"
    );
    assert!(!html.contains(" style="), "style attribute in index.html");
    let js = ui("app.js");
    for bad in [
        "style:",
        "\"style\"",
        "setAttribute(\"style\"",
        "eval(",
        "new Function",
    ] {
        assert!(!js.contains(bad), "app.js uses {bad} (blocked by the CSP)");
    }
    b.shutdown().await;
}

async fn next_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> AMQPFrame {
    loop {
        if let Some((f, n)) = codec::decode(buf, 0).expect("frame") {
            buf.drain(..n);
            return f;
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .expect("read in time")
            .expect("read");
        assert!(n > 0, "closed early");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// PLAIN login over AMQP from `stream`: Ok on connection.tune, else the close's code and text.
async fn amqp_login(s: &mut TcpStream, user: &str, pass: &str) -> Result<(), (u16, String)> {
    s.write_all(codec::PROTOCOL_HEADER).await.expect("header");
    let mut buf = Vec::new();
    assert!(matches!(
        next_frame(s, &mut buf).await,
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
    ));
    let mut out = Vec::new();
    codec::encode(
        &AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{user}\0{pass}").into(),
                locale: "en_US".into(),
            })),
        ),
        &mut out,
    )
    .expect("encode");
    s.write_all(&out).await.expect("start-ok");
    match next_frame(s, &mut buf).await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => Ok(()),
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            Err((c.reply_code, c.reply_text.to_string()))
        }
        other => panic!("expected tune or close, got {other:?}"),
    }
}

#[tokio::test]
async fn failed_logins_from_one_source_are_limited_on_http_and_amqp() {
    let b = support::start_with(Config {
        auth_failure_limit: 3,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    for _ in 0..2 {
        let r = http(mgmt, "GET", "/api/whoami", Some(("guest", "wrong")), None).await;
        assert_eq!(r.status, 401);
    }
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    let (code, _) = amqp_login(&mut s, "guest", "wrong")
        .await
        .expect_err("bad password");
    assert_eq!(code, 403);
    // Three failures from 127.0.0.1 within a minute: the right password is not checked now.
    let r = http(mgmt, "GET", "/api/whoami", GUEST, None).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "too_many_requests");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("60"));
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    let (code, text) = amqp_login(&mut s, "guest", "guest")
        .await
        .expect_err("limited");
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("too many failed logins"), "{text}");
    // Requests without credentials are not logins: still a plain 401.
    let r = http(mgmt, "GET", "/api/whoami", None, None).await;
    assert_eq!(r.status, 401);
    b.shutdown().await;
}

#[tokio::test]
async fn the_failed_login_limit_counts_the_proxied_client_not_the_balancer() {
    let b = support::start_with(Config {
        auth_failure_limit: 2,
        proxy_protocol: true,
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let from = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 15672\r\n").into_bytes();
    let get = |ip: &'static str, pass: &'static str| {
        let h = from(ip);
        async move {
            raw_http_prefixed(mgmt, &h, "GET", "/api/whoami", Some(("guest", pass)), None)
                .await
                .status
        }
    };
    assert_eq!(get("127.0.0.2", "wrong").await, 401);
    assert_eq!(get("127.0.0.2", "wrong").await, 401);
    assert_eq!(get("127.0.0.2", "guest").await, 429);
    // Another client behind the same balancer is not affected.
    assert_eq!(get("127.0.0.3", "guest").await, 200);
    b.shutdown().await;
}
