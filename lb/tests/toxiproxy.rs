//! Toxiproxy's HTTP API on the admin port: proxies made at run time in front of real echo
//! backends, toxics that act on real traffic, and Toxiproxy's JSON and error shapes.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// warren-lb with one configured listener (`seed`, in front of `backend`) and its admin API.
async fn lb_with_seed(backend: SocketAddr) -> Running {
    start(config(vec![listener("seed", &[backend])])).await
}

/// A Toxiproxy API call: (status, JSON body or Null when empty).
async fn api(lb: &Running, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let text = body.map(|b| b.to_string());
    let (status, text) = http(lb.admin(), method, path, text.as_deref()).await;
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    };
    (status, v)
}

/// Creates proxy `name` on 127.0.0.1:0 to `upstream`; returns its bound address.
async fn create(lb: &Running, name: &str, upstream: SocketAddr) -> SocketAddr {
    let (status, v) = api(
        lb,
        "POST",
        "/proxies",
        Some(json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream.to_string()})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], name);
    assert_eq!(v["upstream"], upstream.to_string());
    assert_eq!(v["enabled"], true);
    assert_eq!(v["toxics"], json!([]));
    let listen: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(listen.port(), 0, "the answer carries the bound port");
    listen
}

/// Round trip time of `msg` on a live connection.
async fn rtt(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t0 = Instant::now();
    roundtrip(s, msg).await;
    t0.elapsed()
}

/// Waits until connecting to `addr` is refused (a stopped listener's socket closes when its
/// accept task next runs).
async fn until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ if Instant::now() > deadline => panic!("{addr} still accepts connections"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn a_proxy_made_through_the_api_carries_traffic() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let listen = create(&lb, "echo", b.addr).await;
    let mut s = connect_echo(listen, b"hello through the proxy").await;
    roundtrip(&mut s, b"again").await;
    assert_eq!(b.served(), 1);

    // GET /proxies: every listener as a proxy, keyed by name.
    let (status, all) = api(&lb, "GET", "/proxies", None).await;
    assert_eq!(status, 200);
    assert_eq!(all["echo"]["listen"], listen.to_string());
    assert_eq!(all["seed"]["upstream"], b.addr.to_string());
    assert_eq!(all["seed"]["listen"], lb.addr("seed").to_string());
    let (status, one) = api(&lb, "GET", "/proxies/echo", None).await;
    assert_eq!((status, &one), (200, &all["echo"]));
    // It is a listener like the others.
    let (status, _) = http(lb.admin(), "GET", "/listeners/echo", None).await;
    assert_eq!(status, 200);
    lb.stop().await;
}

#[tokio::test]
async fn a_latency_toxic_delays_data_until_removed() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let listen = create(&lb, "slow", b.addr).await;
    let mut live = connect_echo(listen, b"warm").await;
    let base = rtt(&mut live, b"x").await;
    assert!(base < Duration::from_millis(200), "{base:?}");

    let (status, t) = api(
        &lb,
        "POST",
        "/proxies/slow/toxics",
        Some(json!({"type": "latency", "attributes": {"latency": 400, "jitter": 0}})),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        t,
        json!({"name": "latency_downstream", "type": "latency", "stream": "downstream",
               "toxicity": 1.0, "attributes": {"latency": 400, "jitter": 0}})
    );
    // On a new connection, and at once on the live one.
    let mut fresh = connect_echo(listen, b"first").await;
    let d = rtt(&mut fresh, b"y").await;
    assert!(d >= Duration::from_millis(400), "new connection: {d:?}");
    let d = rtt(&mut live, b"z").await;
    assert!(d >= Duration::from_millis(400), "live connection: {d:?}");
    // The listener's fault rule, seen through the admin API.
    let (_, rules) = http(lb.admin(), "GET", "/listeners/slow/faults", None).await;
    let rules: Value = serde_json::from_str(&rules).unwrap();
    assert_eq!(rules[0]["kind"], "latency");
    assert_eq!(rules[0]["direction"], "downstream");
    assert_eq!(rules[0]["latency"], "400ms");

    let (status, v) = api(&lb, "GET", "/proxies/slow/toxics/latency_downstream", None).await;
    assert_eq!((status, &v), (200, &t));
    let (status, v) = api(&lb, "GET", "/proxies/slow/toxics", None).await;
    assert_eq!((status, v), (200, json!([t])));
    // Updated (attributes merged), then removed.
    let (status, v) = api(
        &lb,
        "PATCH",
        "/proxies/slow/toxics/latency_downstream",
        Some(json!({"attributes": {"latency": 600}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["attributes"], json!({"latency": 600, "jitter": 0}));
    let d = rtt(&mut live, b"w").await;
    assert!(d >= Duration::from_millis(600), "after update: {d:?}");
    let (status, v) = api(
        &lb,
        "DELETE",
        "/proxies/slow/toxics/latency_downstream",
        None,
    )
    .await;
    assert_eq!((status, v), (204, Value::Null));
    let d = rtt(&mut live, b"v").await;
    assert!(d < Duration::from_millis(300), "after removal: {d:?}");
    let (status, v) = api(
        &lb,
        "DELETE",
        "/proxies/slow/toxics/latency_downstream",
        None,
    )
    .await;
    assert_eq!(
        (status, v),
        (404, json!({"error": "toxic not found", "status": 404}))
    );
    lb.stop().await;
}

#[tokio::test]
async fn a_reset_peer_toxic_resets_connections() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let listen = create(&lb, "rst", b.addr).await;
    let (status, t) = api(
        &lb,
        "POST",
        "/proxies/rst/toxics",
        Some(
            json!({"name": "cut", "type": "reset_peer", "stream": "upstream",
                    "attributes": {"timeout": 0}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["attributes"], json!({"timeout": 0}));
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(b"doomed").await.unwrap();
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Reset));
    assert_eq!(
        b.served(),
        0,
        "the data that triggered the reset never reached the backend"
    );

    // With a timeout: reset that long after the connection opened.
    api(&lb, "DELETE", "/proxies/rst/toxics/cut", None).await;
    let (status, _) = api(
        &lb,
        "POST",
        "/proxies/rst/toxics",
        Some(json!({"type": "reset_peer", "attributes": {"timeout": 300}})),
    )
    .await;
    assert_eq!(status, 200);
    let t0 = Instant::now();
    let mut s = connect_echo(listen, b"lives a while").await;
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Reset));
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    lb.stop().await;
}

#[tokio::test]
async fn disabling_closes_the_listener_and_enabling_reopens_it_on_the_same_port() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let listen = create(&lb, "flappy", b.addr).await;
    api(
        &lb,
        "POST",
        "/proxies/flappy/toxics",
        Some(json!({"type": "latency", "attributes": {"latency": 1}})),
    )
    .await;
    let mut live = connect_echo(listen, b"before").await;

    let (status, v) = api(
        &lb,
        "POST",
        "/proxies/flappy",
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["enabled"], false);
    assert_eq!(v["listen"], listen.to_string());
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Eof));
    until_refused(listen).await;
    // Disabled, it keeps its toxics and stays listed.
    let (_, v) = api(&lb, "GET", "/proxies/flappy", None).await;
    assert_eq!(v["enabled"], false);
    assert_eq!(v["toxics"][0]["type"], "latency");
    let (status, _) = http(lb.admin(), "GET", "/listeners/flappy", None).await;
    assert_eq!(status, 404, "a stopped listener is not a running one");
    // Toxics of a disabled proxy can change.
    let (status, _) = api(
        &lb,
        "DELETE",
        "/proxies/flappy/toxics/latency_downstream",
        None,
    )
    .await;
    assert_eq!(status, 204);

    let (status, v) = api(
        &lb,
        "PATCH",
        "/proxies/flappy",
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["enabled"], true);
    assert_eq!(v["listen"], listen.to_string());
    assert_eq!(v["toxics"], json!([]));
    let (_, all) = api(&lb, "GET", "/proxies", None).await;
    assert_eq!(all["flappy"], v, "listed once, running");
    connect_echo(listen, b"after").await;
    lb.stop().await;
}

#[tokio::test]
async fn changing_the_upstream_moves_new_connections() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = lb_with_seed(a.addr).await;
    let listen = create(&lb, "mover", a.addr).await;
    connect_echo(listen, b"to a").await;
    // The Go client saves the whole proxy back, toxics included.
    let (status, v) = api(
        &lb,
        "POST",
        "/proxies/mover",
        Some(json!({"name": "mover", "listen": listen.to_string(),
                    "upstream": b.addr.to_string(), "enabled": true, "toxics": []})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["upstream"], b.addr.to_string());
    assert_eq!(v["listen"], listen.to_string());
    connect_echo(listen, b"to b").await;
    assert_eq!((a.served(), b.served()), (1, 1));
    lb.stop().await;
}

#[tokio::test]
async fn deleting_a_proxy_removes_its_listener() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let listen = create(&lb, "gone", b.addr).await;
    let mut live = connect_echo(listen, b"x").await;
    let (status, v) = api(&lb, "DELETE", "/proxies/gone", None).await;
    assert_eq!((status, v), (204, Value::Null));
    assert_eq!(read_end(&mut live, WAIT).await, Some(ReadEnd::Eof));
    until_refused(listen).await;
    let (status, v) = api(&lb, "GET", "/proxies/gone", None).await;
    assert_eq!(
        (status, v),
        (404, json!({"error": "proxy not found", "status": 404}))
    );
    let (status, _) = api(&lb, "DELETE", "/proxies/gone", None).await;
    assert_eq!(status, 404);
    // The name is free again.
    create(&lb, "gone", b.addr).await;
    lb.stop().await;
}

#[tokio::test]
async fn reset_enables_every_proxy_and_removes_every_toxic() {
    let b = echo_backend().await;
    let mut seed = listener("seed", &[b.addr]);
    seed.faults
        .push(toml::from_str("name='periodic'\nkind='reset'\nevery='1h'").unwrap());
    let lb = start(config(vec![seed])).await;
    let listen = create(&lb, "p", b.addr).await;
    api(
        &lb,
        "POST",
        "/proxies/p/toxics",
        Some(json!({"type": "timeout", "stream": "upstream", "attributes": {"timeout": 0}})),
    )
    .await;
    api(&lb, "POST", "/proxies/p", Some(json!({"enabled": false}))).await;
    until_refused(listen).await;
    let (_, seed) = api(&lb, "GET", "/proxies/seed", None).await;
    assert_eq!(seed["toxics"][0]["type"], "reset", "{seed}");

    // As toxiproxy-python sends it: no body, no Content-Type.
    let r = request(lb.admin(), "POST", "/reset", &[], None).await;
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    let (_, all) = api(&lb, "GET", "/proxies", None).await;
    assert_eq!(all["p"]["enabled"], true);
    assert_eq!(all["p"]["toxics"], json!([]));
    assert_eq!(all["seed"]["toxics"], json!([]));
    connect_echo(listen, b"back").await;
    lb.stop().await;
}

#[tokio::test]
async fn version_and_populate() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let lb = lb_with_seed(a.addr).await;
    let r = request(lb.admin(), "GET", "/version", &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json;charset=utf-8")
    );
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        v["version"].as_str().unwrap().starts_with("warren-lb "),
        "{v}"
    );

    let list = json!([
        {"name": "one", "listen": "127.0.0.1:0", "upstream": a.addr.to_string()},
        {"name": "two", "listen": "127.0.0.1:0", "upstream": b.addr.to_string(), "enabled": false},
    ]);
    let (status, v) = api(&lb, "POST", "/populate", Some(list)).await;
    assert_eq!(status, 201, "{v}");
    let proxies = v["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2);
    assert_eq!(
        (proxies[0]["name"].clone(), proxies[0]["enabled"].clone()),
        (json!("one"), json!(true))
    );
    assert_eq!(proxies[1]["enabled"], false);
    let one: SocketAddr = proxies[0]["listen"].as_str().unwrap().parse().unwrap();
    connect_echo(one, b"populated").await;

    // The same list with one's bound address: kept as it is (same port, toxics kept).
    api(
        &lb,
        "POST",
        "/proxies/one/toxics",
        Some(json!({"type": "latency", "attributes": {"latency": 1}})),
    )
    .await;
    let again = json!([{"name": "one", "listen": one.to_string(), "upstream": a.addr.to_string()}]);
    let (status, v) = api(&lb, "POST", "/populate", Some(again)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["proxies"][0]["listen"], one.to_string());
    assert_eq!(v["proxies"][0]["toxics"][0]["type"], "latency");
    // A different upstream replaces it.
    let moved = json!([{"name": "one", "listen": one.to_string(), "upstream": b.addr.to_string()}]);
    let (status, v) = api(&lb, "POST", "/populate", Some(moved)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["proxies"][0]["upstream"], b.addr.to_string());
    assert_eq!(v["proxies"][0]["toxics"], json!([]));
    connect_echo(one, b"to b").await;
    assert_eq!(b.served(), 1);

    let (status, v) = api(
        &lb,
        "POST",
        "/populate",
        Some(json!([{"name": "x", "upstream": a.addr.to_string()}, {"name": "y"}])),
    )
    .await;
    assert_eq!(
        (status, v),
        (
            400,
            json!({"error": "missing required field: upstream at proxy 2", "status": 400})
        )
    );
    assert_eq!(
        api(&lb, "GET", "/proxies/x", None).await.0,
        404,
        "nothing made"
    );
    lb.stop().await;
}

#[tokio::test]
async fn errors_have_toxiproxys_shape() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let up = b.addr.to_string();
    create(&lb, "p", b.addr).await;
    let err = |status: u16, msg: &str| json!({"error": msg, "status": status});

    let (s, v) = api(
        &lb,
        "POST",
        "/proxies",
        Some(json!({"name": "p", "upstream": up})),
    )
    .await;
    assert_eq!((s, v), (409, err(409, "proxy already exists")));
    let (s, v) = api(&lb, "POST", "/proxies", Some(json!({"upstream": up}))).await;
    assert_eq!((s, v), (400, err(400, "missing required field: name")));
    let (s, v) = api(&lb, "POST", "/proxies", Some(json!({"name": "q"}))).await;
    assert_eq!((s, v), (400, err(400, "missing required field: upstream")));
    let (s, v) = http(lb.admin(), "POST", "/proxies", Some("{not json")).await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request body: "),
        "{v}"
    );
    assert_eq!(v["status"], 400);
    let (s, v) = api(&lb, "GET", "/proxies/nope/toxics", None).await;
    assert_eq!((s, v), (404, err(404, "proxy not found")));
    let (s, _) = api(
        &lb,
        "POST",
        "/proxies/nope/toxics",
        Some(json!({"type": "latency"})),
    )
    .await;
    assert_eq!(s, 404);

    // Upstreams are checked as backends: syntax, and never warren-lb itself.
    for bad in [
        "nohost",
        &lb.admin().to_string(),
        &lb.addr("seed").to_string(),
    ] {
        let (s, v) = api(
            &lb,
            "POST",
            "/proxies",
            Some(json!({"name": "q", "upstream": bad})),
        )
        .await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["status"], 400);
    }
    let (s, v) = api(
        &lb,
        "POST",
        "/proxies",
        Some(json!({"name": "admin", "upstream": up})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api(
        &lb,
        "POST",
        "/proxies",
        Some(json!({"name": "q", "listen": "nowhere", "upstream": up})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // A port in use: 500, as Toxiproxy answers when its listener cannot bind.
    let taken = lb.addr("seed").to_string();
    let (s, v) = api(
        &lb,
        "POST",
        "/proxies",
        Some(json!({"name": "q", "listen": taken, "upstream": up})),
    )
    .await;
    assert_eq!(s, 500, "{v}");
    assert_eq!(
        api(&lb, "GET", "/proxies/q", None).await.0,
        404,
        "not added"
    );

    // Toxics.
    let t = |body: Value| api(&lb, "POST", "/proxies/p/toxics", Some(body));
    let (s, v) = t(json!({"type": "noop"})).await;
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid toxic type"),
        "{v}"
    );
    let (s, v) = t(json!({"type": "latency", "stream": "both"})).await;
    assert_eq!(
        (s, v),
        (
            400,
            err(
                400,
                "stream was invalid, can be either upstream or downstream"
            )
        )
    );
    let (s, v) = t(json!({"type": "latency", "attributes": {"latency": "1s"}})).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(t(json!({"type": "latency"})).await.0, 200);
    let (s, v) = t(json!({"type": "latency"})).await;
    assert_eq!((s, v), (409, err(409, "toxic already exists")));
    let (s, v) = api(&lb, "GET", "/proxies/p/toxics/nope", None).await;
    assert_eq!((s, v), (404, err(404, "toxic not found")));
    let (s, _) = api(&lb, "PATCH", "/proxies/p/toxics/nope", Some(json!({}))).await;
    assert_eq!(s, 404);
    let (s, v) = api(&lb, "PUT", "/proxies/p", Some(json!({}))).await;
    assert_eq!(s, 405, "{v}");
    lb.stop().await;
}

#[tokio::test]
async fn the_admin_guard_still_applies() {
    let b = echo_backend().await;
    let lb = lb_with_seed(b.addr).await;
    let body = json!({"name": "p", "upstream": b.addr.to_string()}).to_string();
    let r = request(
        lb.admin(),
        "POST",
        "/proxies",
        &[("Content-Type", "text/plain")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 415);
    let r = request(
        lb.admin(),
        "POST",
        "/proxies",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "http://evil.example"),
        ],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(api(&lb, "GET", "/proxies/p", None).await.0, 404);

    // Toxiproxy's Java client (Testcontainers) sends its JSON typed as a form: taken from a
    // client that is not a browser, refused from a browser.
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let firefox = (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0",
    );
    let r = request(
        lb.admin(),
        "POST",
        "/proxies",
        &[form, firefox],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 415);
    let java = ("User-Agent", "Java/17.0.9");
    let r = request(
        lb.admin(),
        "POST",
        "/proxies",
        &[form, java, ("Origin", "http://evil.example")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = request(lb.admin(), "POST", "/proxies", &[form, java], Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let toxic = r#"{"name": "lat", "stream": "upstream", "toxicity": 1.0, "type": "latency",
                    "attributes": {"latency": 5, "jitter": 0}}"#;
    let r = request(
        lb.admin(),
        "POST",
        "/proxies/p/toxics",
        &[form, java],
        Some(toxic),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Still JSON or nothing: a real form body is a bad body.
    let r = request(
        lb.admin(),
        "POST",
        "/proxies",
        &[form, java],
        Some("name=q&upstream=x"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // Elsewhere on the admin API the rule holds.
    let r = request(
        lb.admin(),
        "PUT",
        "/listeners/seed/faults",
        &[form, java],
        Some("[]"),
    )
    .await;
    assert_eq!(r.status, 415);
    lb.stop().await;
}
