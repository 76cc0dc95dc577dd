//! The admin API: HTTP/1.1, JSON (hyper 1).
//!
//! | method, path | what |
//! |---|---|
//! | GET `/listeners` | listeners with their backends (address, healthy, active, draining) |
//! | GET `/listeners/{name}` | one listener |
//! | PUT `/listeners/{name}/backends` | replace the backend list (`["host:port", ...]`); removed ones drain |
//! | POST `/listeners/{name}/backends/{addr}/drain` | deregister one backend with draining |
//! | GET, PUT `/listeners/{name}/faults` | list / replace the fault rules (JSON, same shape as TOML) |
//! | POST `/listeners/{name}/faults`, DELETE `/listeners/{name}/faults/{rule}` | add / remove one rule |
//! | POST `/listeners/{name}/reset` | reset live connections now; body may set `style`, `side`, `in_flight` |
//! | GET `/connections` | live connections |
//! | GET `/events` | recent events as JSON lines; `?follow=1` streams |
//! | GET `/metrics` | Prometheus text |
//! | GET `/healthz` | 200 while serving |
//! | `/proxies...`, `/reset`, `/version`, `/populate` | Toxiproxy's API (`toxiproxy_api`) |
//!
//! # Security
//! The API can reconfigure every listener (backends, fault rules that refuse or reset every
//! connection), so:
//! - Token: with `[admin] token_file` (or `--admin-token-file`), every request but `GET /healthz`
//!   needs `Authorization: Bearer <token>` or basic auth with the token as password (`curl -u
//!   any:TOKEN`); 401 otherwise. Without a token the API must listen on loopback (`config`
//!   refuses anything else) and accepts only `Host`s that are IP literals or `localhost`.
//! - Browsers: a foreign or `null` `Origin` and `Sec-Fetch-Site: cross-site` get 403; a body that
//!   is not `application/json` gets 415 (see `guard`, which runs before any route; on
//!   Toxiproxy's paths, JSON typed as a form by a client that is not a browser is taken:
//!   `toxiproxy::form_typed_json_allowed`).
//! - Slow or many clients: headers must arrive within `[admin] request_timeout` (also the idle
//!   keep-alive limit), bodies within it too and up to 1 MiB; at most `[admin] max_connections`
//!   connections, beyond which a new one is closed at once. `/events?follow=1` streams as long as
//!   the client reads: the timeouts limit requests, not responses.
//! - Backends given through the API are validated like the configuration's, resolved, and refused
//!   when they point at warren-lb's own listeners or admin address (`backend::addr`): 400 with
//!   `{"error": "..."}`.

pub mod guard;
pub mod toxiproxy;
mod toxiproxy_api;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Semaphore};

use crate::config::{
    validate_backends, CloseStyle, FaultRule, Side, ADMIN_MAX_CONNECTIONS, ADMIN_REQUEST_TIMEOUT,
};
use crate::listener::{CloseCmd, ListenerState};
use crate::Shared;

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body.
const MAX_BODY: usize = 1 << 20;
/// hyper's read buffer: bounds the request line and headers.
const MAX_HEAD: usize = 64 * 1024;

/// Accepts admin connections until the task is aborted (at the end of `run`).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let max = shared
        .admin_cfg
        .as_ref()
        .map_or(ADMIN_MAX_CONNECTIONS, |a| a.max_connections);
    let timeout = request_timeout(&shared);
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap, close at once: a flood costs no more than `max` descriptors.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(max, "admin connection closed: too many open");
            drop(tcp);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(MAX_HEAD);
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn request_timeout(shared: &Shared) -> Duration {
    shared
        .admin_cfg
        .as_ref()
        .map_or(ADMIN_REQUEST_TIMEOUT, |a| a.request_timeout)
}

/// The checks of `guard`, then the route.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let token = shared.admin_token.load_full();
    // Only the body's Content-Type check depends on `has_body`: waived for Toxiproxy's Java
    // client (see `toxiproxy::form_typed_json_allowed`).
    let has_body = !req.body().is_end_stream()
        && !toxiproxy::form_typed_json_allowed(req.uri().path(), req.headers());
    let verdict = guard::check(
        req.uri().path(),
        req.headers(),
        has_body,
        token.as_deref().map(String::as_str),
    );
    match verdict {
        Ok(()) => route(shared, req).await,
        Err(refusal) => {
            tracing::debug!(
                method = %req.method(),
                path = %crate::backend::addr::shown(req.uri().path()),
                status = refusal.status().as_u16(),
                reason = %refusal.message(),
                "admin request refused"
            );
            let mut r = error(refusal.status(), refusal.message());
            if let guard::Refusal::Unauthorized(_) = refusal {
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"warren-lb\""),
                );
            }
            // The body (if any) is not read: the connection cannot be reused.
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Response<Body> {
    let mut text = v.to_string();
    text.push('\n');
    full(status, "application/json", text)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json_resp(status, &json!({ "error": msg.into() }))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The whole body, within the request timeout and [`MAX_BODY`].
async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let timeout = request_timeout(shared);
    let closing = |status, msg: String| {
        let mut r = error(status, msg);
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let too_large = || {
        closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        )
    };
    // A declared length over the limit is refused before reading a byte of it.
    if req.body().size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(timeout, collect).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read body: {e}"),
        )),
        Err(_) => Err(closing(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {}",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let listener = |name: &str| shared.listener(name);
    let no_listener = |name: &str| error(StatusCode::NOT_FOUND, format!("no listener `{name}`"));
    match (&method, segs.as_slice()) {
        (&Method::GET, ["healthz"]) => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["metrics"]) => match &shared.prom {
            Some(h) => full(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => full(StatusCode::OK, "text/plain; version=0.0.4", ""),
        },
        (&Method::GET, ["listeners"]) => {
            let v: Vec<Value> = shared
                .listeners()
                .iter()
                .map(|l| listener_json(l))
                .collect();
            json_resp(StatusCode::OK, &Value::Array(v))
        }
        (&Method::GET, ["listeners", name]) => match listener(name) {
            Some(l) => json_resp(StatusCode::OK, &listener_json(&l)),
            None => no_listener(name),
        },
        (&Method::PUT, ["listeners", name, "backends"]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            let body = match read_body(shared, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let list: Vec<String> = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("expected a JSON list of \"host:port\": {e}"),
                    )
                }
            };
            // Syntax first (cheap, and no DNS query for garbage), then resolution and the
            // own-address check.
            let checked = match validate_backends(name, &list) {
                Ok(()) => shared.check_backends(name, &list).await,
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            match l.set_backends(list) {
                Ok(()) => json_resp(StatusCode::OK, &listener_json(&l)),
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        (&Method::POST, ["listeners", name, "backends", addr, "drain"]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            if l.drain_backend(addr) {
                json_resp(StatusCode::OK, &listener_json(&l))
            } else {
                error(
                    StatusCode::NOT_FOUND,
                    format!("backend `{addr}` is not in rotation on `{name}`"),
                )
            }
        }
        (&Method::GET, ["listeners", name, "faults"]) => match listener(name) {
            Some(l) => match serde_json::to_value(&l.snapshot().cfg.faults) {
                Ok(v) => json_resp(StatusCode::OK, &v),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            None => no_listener(name),
        },
        (&Method::PUT, ["listeners", name, "faults"]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            let body = match read_body(shared, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let rules: Vec<FaultRule> = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
            };
            faults_result(&l, l.set_faults(rules))
        }
        (&Method::POST, ["listeners", name, "faults"]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            let body = match read_body(shared, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let rule: FaultRule = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let mut rules = l.snapshot().cfg.faults.clone();
            rules.push(rule);
            faults_result(&l, l.set_faults(rules))
        }
        (&Method::DELETE, ["listeners", name, "faults", rule]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            let mut rules = l.snapshot().cfg.faults.clone();
            let before = rules.len();
            rules.retain(|r| r.name != *rule);
            if rules.len() == before {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no fault rule `{rule}` on `{name}`"),
                );
            }
            faults_result(&l, l.set_faults(rules))
        }
        (&Method::POST, ["listeners", name, "reset"]) => {
            let Some(l) = listener(name) else {
                return no_listener(name);
            };
            let body = match read_body(shared, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            #[derive(Deserialize, Default)]
            #[serde(default, deny_unknown_fields)]
            struct ResetBody {
                style: Option<CloseStyle>,
                side: Option<Side>,
                in_flight: Option<crate::config::InFlight>,
            }
            let rb: ResetBody = if body.iter().all(u8::is_ascii_whitespace) {
                ResetBody::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
                }
            };
            let mut cmd = CloseCmd::plain(rb.style.unwrap_or(CloseStyle::Rst), "reset", "admin");
            cmd.side = rb.side.unwrap_or(Side::Both);
            cmd.in_flight = rb.in_flight.unwrap_or_default();
            cmd.kind = Some(crate::config::FaultKind::Reset);
            let n = l.reset_all(&cmd);
            json_resp(StatusCode::OK, &json!({ "reset": n }))
        }
        (&Method::GET, ["connections"]) => {
            let mut v = Vec::new();
            for l in shared.listeners() {
                for c in l.connections() {
                    v.push(json!({
                        "id": c.id,
                        "listener": l.name,
                        "client": c.client.to_string(),
                        "backend": c.backend,
                        "age_secs": c.started.elapsed().as_secs_f64(),
                        "bytes_upstream": c.bytes.upstream.load(std::sync::atomic::Ordering::Relaxed),
                        "bytes_downstream": c.bytes.downstream.load(std::sync::atomic::Ordering::Relaxed),
                    }));
                }
            }
            json_resp(StatusCode::OK, &Value::Array(v))
        }
        (&Method::GET, ["events"]) => {
            let follow = query
                .split('&')
                .any(|kv| kv == "follow=1" || kv == "follow=true" || kv == "follow");
            if follow {
                let (backlog, rx) = shared.events().follow();
                let mut r = Response::new(follow_body(backlog, rx));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                r
            } else {
                let mut text = String::new();
                for line in shared.events().recent() {
                    text.push_str(&line);
                    text.push('\n');
                }
                full(StatusCode::OK, "application/x-ndjson", text)
            }
        }
        (_, s) if toxiproxy_api::serves(s) => toxiproxy_api::handle(shared, req, s).await,
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

fn faults_result(
    l: &ListenerState,
    r: Result<(), crate::config::ValidationError>,
) -> Response<Body> {
    match r {
        Ok(()) => match serde_json::to_value(&l.snapshot().cfg.faults) {
            Ok(v) => json_resp(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn listener_json(l: &ListenerState) -> Value {
    let snap = l.snapshot();
    let mut backends: Vec<Value> = l
        .pool
        .members()
        .iter()
        .map(|b| {
            json!({
                "address": b.addr,
                "healthy": b.is_healthy(),
                "active": b.active(),
                "draining": false,
            })
        })
        .collect();
    backends.extend(l.pool.draining().iter().map(|b| {
        json!({
            "address": b.addr,
            "healthy": b.is_healthy(),
            "active": b.active(),
            "draining": true,
        })
    }));
    json!({
        "name": l.name,
        "addr": l.addr.to_string(),
        "balance": snap.cfg.balance,
        "idle_timeout": humantime::format_duration(snap.cfg.idle_timeout).to_string(),
        "idle_close": snap.cfg.idle_close,
        "proxy_protocol": snap.cfg.proxy_protocol,
        "tls": snap.cfg.tls.is_some(),
        "backend_tls": snap.cfg.backend_tls.is_some(),
        "max_connections": snap.cfg.max_connections,
        "active": l.active(),
        "fail_open": l.pool.is_fail_open(),
        "backends": backends,
    })
}

/// A streaming body of JSON lines fed by a forwarding task.
struct FollowBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for FollowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn follow_body(backlog: Vec<Arc<str>>, mut events: broadcast::Receiver<Arc<str>>) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let line = |s: &str| Bytes::from(format!("{s}\n"));
    tokio::spawn(async move {
        for l in backlog {
            if tx.send(line(&l)).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                r = events.recv() => match r {
                    Ok(l) => {
                        if tx.send(line(&l)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "event follower lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    FollowBody { rx }.boxed()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("127.0.0.1%3A80"), "127.0.0.1:80");
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A80"), "[::1]:80");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
