//! Shared helpers of the lb integration tests: in-process warren-lb, test backends on port 0,
//! a raw HTTP/1.1 client for the admin API, and event waiting.
#![allow(dead_code, clippy::unwrap_used)] // test-only helpers: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use warren_lb::config::{AdminConfig, Config, HealthConfig, ListenerConfig};
use warren_lb::{Handle, Lb};

pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- warren-lb in process

pub struct Running {
    pub handle: Handle,
    pub admin: Option<SocketAddr>,
    shutdown: CancellationToken,
    join: JoinHandle<()>,
}

impl Running {
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.handle.addr(name).expect("listener bound")
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("admin bound")
    }

    /// Subscribes to events (backlog + later ones).
    pub fn events(&self) -> EventWaiter {
        let (_, rx) = self.handle.shared().events().follow();
        EventWaiter { rx }
    }

    /// Starts the graceful shutdown and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("run returned in time")
            .expect("run did not panic");
    }
}

pub async fn start(cfg: Config) -> Running {
    let bound = Lb::bind(cfg).await.expect("bind");
    let handle = bound.handle();
    let admin = bound.admin_addr();
    let shutdown = CancellationToken::new();
    let join = tokio::spawn(bound.run(shutdown.clone()));
    Running {
        handle,
        admin,
        shutdown,
        join,
    }
}

/// A listener on 127.0.0.1:0 in front of `backends`, health checks too slow to matter,
/// drain_timeout 300ms.
pub fn listener(name: &str, backends: &[SocketAddr]) -> ListenerConfig {
    ListenerConfig {
        name: name.to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        backends: backends.iter().map(|a| a.to_string()).collect(),
        connect_timeout: Duration::from_secs(2),
        // Tests stop the balancer with connections still open: keep the shutdown drain short.
        drain_timeout: Duration::from_millis(300),
        health: HealthConfig {
            interval: Duration::from_secs(3600),
            ..HealthConfig::default()
        },
        ..ListenerConfig::default()
    }
}

/// Fast health checks: interval 50ms, timeout 1s (generous: a loaded CI machine must not fail a
/// check of a live backend; dead ones are refused at once on loopback).
pub fn fast_health(healthy: u32, unhealthy: u32) -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(1),
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
        ..HealthConfig::default()
    }
}

pub fn config(listeners: Vec<ListenerConfig>) -> Config {
    Config {
        admin: Some(AdminConfig::new("127.0.0.1:0".parse().unwrap())),
        listeners,
        ..Config::default()
    }
}

// ---------------------------------------------------------------- events

pub struct EventWaiter {
    rx: broadcast::Receiver<Arc<str>>,
}

impl EventWaiter {
    /// Waits for the next event named `event` (optionally for `backend`); returns it as JSON.
    pub async fn wait(&mut self, event: &str, backend: Option<SocketAddr>) -> serde_json::Value {
        let want_backend = backend.map(|b| b.to_string());
        let fut = async {
            loop {
                let line = self.rx.recv().await.expect("event bus open");
                let v: serde_json::Value = serde_json::from_str(&line).expect("event is JSON");
                if v["event"] == event
                    && want_backend
                        .as_deref()
                        .is_none_or(|b| v["backend"].as_str() == Some(b))
                {
                    return v;
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .unwrap_or_else(|_| panic!("no `{event}` event within {WAIT:?}"))
    }
}

// ---------------------------------------------------------------- backends

/// A test backend: counts accepted connections, live ones, and served ones (that carried
/// payload, unlike health checks); `kill` closes everything.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub served: Arc<AtomicUsize>,
    pub live: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that carried payload (health checks excluded).
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every connection; returns the address for a revival.
    pub async fn kill(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

/// Runs `serve` for every connection accepted on `addr`; `serve` counts payload connections on
/// the counter it is given.
pub async fn backend_on<F, Fut>(addr: SocketAddr, serve: F) -> Backend
where
    F: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(addr).await.expect("bind backend");
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (a, lv, sv) = (accepted.clone(), live.clone(), served.clone());
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                r = l.accept() => {
                    let Ok((s, _)) = r else { continue };
                    a.fetch_add(1, Ordering::SeqCst);
                    lv.fetch_add(1, Ordering::SeqCst);
                    let lv = lv.clone();
                    let f = serve(s, sv.clone());
                    conns.spawn(async move {
                        f.await;
                        lv.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Some(_) = conns.join_next() => {}
            }
        }
    });
    Backend {
        addr,
        accepted,
        served,
        live,
        task,
    }
}

/// Echoes until EOF, then shuts down its write side (half-close aware).
pub async fn echo(mut s: TcpStream, served: Arc<AtomicUsize>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut first = true;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if std::mem::take(&mut first) {
                    served.fetch_add(1, Ordering::SeqCst);
                }
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

pub async fn echo_backend() -> Backend {
    backend_on("127.0.0.1:0".parse().unwrap(), echo).await
}

pub async fn echo_backend_on(addr: SocketAddr) -> Backend {
    backend_on(addr, echo).await
}

/// An HTTP backend for health checks: answers `GET /health` with `status`, echoes anything else.
pub async fn http_backend(status: Arc<AtomicU16>) -> Backend {
    backend_on(
        "127.0.0.1:0".parse().unwrap(),
        move |mut s: TcpStream, served| {
            let status = status.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                if buf[..n].starts_with(b"GET /health") {
                    let code = status.load(Ordering::SeqCst);
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    return;
                }
                if n == 0 {
                    return;
                }
                served.fetch_add(1, Ordering::SeqCst);
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                echo(s, Arc::new(AtomicUsize::new(0))).await
            }
        },
    )
    .await
}

/// A fake AMQP server: answers the protocol header with `reply`.
pub async fn amqp_backend(reply: &'static [u8]) -> Backend {
    backend_on(
        "127.0.0.1:0".parse().unwrap(),
        move |mut s: TcpStream, _| async move {
            let mut hdr = [0u8; 8];
            if s.read_exact(&mut hdr).await.is_err() {
                return;
            }
            if &hdr == b"AMQP\x00\x00\x09\x01" {
                let _ = s.write_all(reply).await;
            }
            let mut rest = [0u8; 64];
            let _ = s.read(&mut rest).await;
        },
    )
    .await
}

/// The start of a connection.start method frame (type 1, channel 0, class 10, method 10).
pub const CONNECTION_START: &[u8] = &[1, 0, 0, 0, 0, 0, 4, 0, 10, 0, 10, 0xCE];

/// A backend that reports, on `tx`, everything received before the first `\n` of the payload
/// `marker`, then echoes.
pub async fn capture_backend(marker: &'static [u8]) -> (Backend, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let b = backend_on(
        "127.0.0.1:0".parse().unwrap(),
        move |mut s: TcpStream, served| {
            let tx = tx.clone();
            async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.ends_with(marker) {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(got);
                let _ = s.write_all(marker).await;
                echo(s, served).await
            }
        },
    )
    .await;
    (b, rx)
}

/// An address nobody listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------- clients

/// Connects, writes `msg`, reads the echo; returns the stream for more.
pub async fn connect_echo(addr: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect to lb");
    roundtrip(&mut s, msg).await;
    s
}

pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, msg);
}

/// What a read ends with.
#[derive(Debug, PartialEq)]
pub enum ReadEnd {
    Eof,
    Reset,
    Data(usize),
    OtherError(std::io::ErrorKind),
}

pub async fn read_end(s: &mut TcpStream, within: Duration) -> Option<ReadEnd> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(0)) => Some(ReadEnd::Eof),
        Ok(Ok(n)) => Some(ReadEnd::Data(n)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(ReadEnd::Reset),
        Ok(Err(e)) => Some(ReadEnd::OtherError(e.kind())),
    }
}

/// One HTTP/1.1 request to the admin API; returns (status, body). `Connection: close`,
/// `Content-Type: application/json`, `Host` the address.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let r = request(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .await;
    (r.status, r.body)
}

/// An admin API response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Lowercased header names, values as sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Host: addr`, `Connection: close`, `extra` headers and, given a
/// body, its `Content-Length` (no `Content-Type` unless in `extra`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    raw(addr, &req).await
}

/// Sends `req` as is and reads the response to EOF.
pub async fn raw(addr: SocketAddr, req: &str) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("admin answered in time")
        .unwrap();
    let text = String::from_utf8(out).expect("utf8");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("json")
}

/// The value of the first sample of `name` whose label set contains every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Stops `lb` while `live` (connected through `addr`) is open: the listener closes, `live` is
/// still served, and the stop waits for it, returning once it is dropped.
pub async fn stop_draining(lb: Running, addr: SocketAddr, mut live: TcpStream) {
    let stopping = tokio::spawn(lb.stop());
    until_not_listening(addr).await;
    roundtrip(&mut live, b"still draining").await;
    assert!(!stopping.is_finished(), "run waits for the live connection");
    drop(live);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("run returns once drained")
        .unwrap();
}

/// Waits until nothing listens on `addr` any more (a stopping listener); panics after `WAIT`.
pub async fn until_not_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener on {addr} closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `cond` every 10ms until true; panics after `WAIT`. For states that have no event.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
