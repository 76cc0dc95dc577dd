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

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::config::{CloseStyle, FaultRule, Side};
use crate::listener::{CloseCmd, ListenerState};
use crate::Shared;

type Body = BoxBody<Bytes, Infallible>;

/// Accepts admin connections until the task is aborted (at the end of `run`).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
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

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read body: {e}"),
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
            let body = match read_body(req).await {
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
            let body = match read_body(req).await {
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
            let body = match read_body(req).await {
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
            let body = match read_body(req).await {
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
