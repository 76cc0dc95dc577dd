//! Toxiproxy's HTTP API on the admin port, so that Toxiproxy's clients (toxiproxy-python,
//! Testcontainers, toxiproxy-cli, the Go client) drive warren-lb unchanged:
//!
//! | method, path | what |
//! |---|---|
//! | GET `/proxies` | every listener as a proxy: `{name: proxy}` |
//! | POST `/proxies` | create a proxy (a listener, started unless `enabled` is false): 201 |
//! | POST `/populate` | create, or replace when `listen`/`upstream` differ, a list of proxies: 201 |
//! | GET, POST (PATCH), DELETE `/proxies/{name}` | show, change (`listen`, `upstream`, `enabled`), delete |
//! | GET, POST `/proxies/{name}/toxics` | list, add a toxic (a fault rule) |
//! | GET, POST (PATCH), DELETE `/proxies/{name}/toxics/{toxic}` | show, update, remove one |
//! | POST `/reset` | start every stopped listener, remove every fault rule: 204 |
//! | GET `/version` | `{"version": "warren-lb X.Y.Z"}` |
//!
//! The JSON mapping is `toxiproxy`; listeners made, stopped and removed at run time are
//! `listener_set`. Errors have Toxiproxy's shape and codes (`{"error", "status"}`: 404 proxy or
//! toxic not found, 409 already exists, 400 bad input, 500 when a listener cannot bind). The
//! guard of the admin API runs before these routes as before any other (token, JSON bodies,
//! browser origins), with one exception: a JSON body typed as a form by a client that is not a
//! browser (`toxiproxy::form_typed_json_allowed`: Testcontainers' Java client).
//!
//! The whole listener set is what this API sees: `/reset` removes the fault rules of listeners
//! from the configuration file too, as Toxiproxy's removes every toxic.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::toxiproxy::{self as tp, ApiError, Listen};
use super::{json_resp, read_body, Body};
use crate::backend::addr::{shown, RESOLVE_TIMEOUT};
use crate::config::ListenerConfig;
use crate::listener_set::{Entry, SetError};
use crate::Shared;

/// True for the paths this API owns.
pub(super) fn serves(segs: &[&str]) -> bool {
    segs.first().is_some_and(|s| tp::PATHS.contains(s))
}

pub(super) async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    segs: &[&str],
) -> Response<Body> {
    let method = req.method().clone();
    let body = if method == Method::POST || method == Method::PATCH {
        match read_body(shared, req).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    } else {
        Bytes::new()
    };
    let update = method == Method::POST || method == Method::PATCH;
    let r = match (&method, segs) {
        (&Method::GET, ["version"]) => Ok(version()),
        (&Method::POST, ["reset"]) => reset(shared).await,
        (&Method::POST, ["populate"]) => Ok(populate(shared, &body).await),
        (&Method::GET, ["proxies"]) => {
            let all: Map<String, Value> = shared
                .entries()
                .iter()
                .map(|e| (e.cfg.name.clone(), proxy_json(e)))
                .collect();
            Ok(json_resp(StatusCode::OK, &Value::Object(all)))
        }
        (&Method::POST, ["proxies"]) => create(shared, &body).await,
        (&Method::GET, ["proxies", name]) => proxy(shared, name).map(|e| ok(&proxy_json(&e))),
        (_, ["proxies", name]) if update => change(shared, name, &body).await,
        (&Method::DELETE, ["proxies", name]) => shared
            .remove_listener(name, "toxiproxy api: proxy deleted")
            .await
            .map(|()| no_content())
            .map_err(set_error),
        (&Method::GET, ["proxies", name, "toxics"]) => proxy(shared, name).map(|e| {
            let list: Vec<Value> = e.cfg.faults.iter().map(tp::toxic_json).collect();
            ok(&Value::Array(list))
        }),
        (&Method::POST, ["proxies", name, "toxics"]) => {
            let added = shared
                .edit_faults(name, |rules| {
                    let r = tp::new_toxic(&body, rules)?;
                    rules.push(r.clone());
                    Ok::<_, ApiError>(r)
                })
                .await;
            flatten(added).map(|r| ok(&tp::toxic_json(&r)))
        }
        (&Method::GET, ["proxies", name, "toxics", toxic]) => proxy(shared, name).and_then(|e| {
            e.cfg
                .faults
                .iter()
                .find(|r| r.name == *toxic)
                .map(|r| ok(&tp::toxic_json(r)))
                .ok_or_else(ApiError::toxic_not_found)
        }),
        (_, ["proxies", name, "toxics", toxic]) if update => {
            let changed = shared
                .edit_faults(name, |rules| {
                    let i = position(rules, toxic)?;
                    let r = tp::update_toxic(&rules[i], &body)?;
                    rules[i] = r.clone();
                    Ok::<_, ApiError>(r)
                })
                .await;
            flatten(changed).map(|r| ok(&tp::toxic_json(&r)))
        }
        (&Method::DELETE, ["proxies", name, "toxics", toxic]) => {
            let removed = shared
                .edit_faults(name, |rules| {
                    let i = position(rules, toxic)?;
                    rules.remove(i);
                    Ok::<_, ApiError>(())
                })
                .await;
            flatten(removed).map(|()| no_content())
        }
        (_, ["proxies"] | ["proxies", _] | ["proxies", _, "toxics"])
        | (_, ["proxies", _, "toxics", _] | ["reset"] | ["version"] | ["populate"]) => Err(
            ApiError::new(405, format!("method {method} not allowed here")),
        ),
        _ => Err(ApiError::new(404, "not found")),
    };
    r.unwrap_or_else(|e| error(&e))
}

fn ok(v: &Value) -> Response<Body> {
    json_resp(StatusCode::OK, v)
}

fn no_content() -> Response<Body> {
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn error(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_resp(status, &e.to_json())
}

fn version() -> Response<Body> {
    let mut r = json_resp(
        StatusCode::OK,
        &json!({ "version": format!("warren-lb {}", env!("CARGO_PKG_VERSION")) }),
    );
    // Toxiproxy's exact type (its clients read the body as they get it).
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=utf-8"),
    );
    r
}

fn proxy_json(e: &Entry) -> Value {
    tp::proxy_json(
        &e.cfg.name,
        e.addr,
        &e.cfg.backends,
        e.running,
        &e.cfg.faults,
    )
}

fn proxy(shared: &Shared, name: &str) -> Result<Entry, ApiError> {
    shared.entry(name).ok_or_else(ApiError::proxy_not_found)
}

fn position(rules: &[crate::config::FaultRule], toxic: &str) -> Result<usize, ApiError> {
    rules
        .iter()
        .position(|r| r.name == toxic)
        .ok_or_else(ApiError::toxic_not_found)
}

/// Toxiproxy's status for a refused change of the listener set.
fn set_error(e: SetError) -> ApiError {
    match e {
        SetError::NotFound(_) => ApiError::proxy_not_found(),
        SetError::Exists(_) => ApiError::proxy_exists(),
        SetError::ShuttingDown => ApiError::new(503, e.to_string()),
        // Toxiproxy answers 500 when its listener cannot bind.
        SetError::Start(_) => ApiError::new(500, e.to_string()),
        SetError::TooMany | SetError::BadName | SetError::Invalid(_) => {
            ApiError::new(400, e.to_string())
        }
    }
}

fn flatten<T>(r: Result<Result<T, ApiError>, SetError>) -> Result<T, ApiError> {
    r.map_err(set_error)?
}

/// The address a proxy's `listen` names (a host name resolved, its first address).
async fn listen_addr(listen: &str) -> Result<SocketAddr, ApiError> {
    match tp::parse_listen(listen)? {
        Listen::Addr(a) => Ok(a),
        Listen::Name(host, port) => {
            let what =
                |why: String| ApiError::bad_body(format!("listen `{}:{port}` {why}", shown(&host)));
            let lookup = tokio::net::lookup_host((host.as_str(), port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Err(_) => Err(what("does not resolve in time".to_string())),
                Ok(Err(e)) => Err(what(format!("does not resolve: {e}"))),
                Ok(Ok(mut addrs)) => addrs
                    .next()
                    .ok_or_else(|| what("resolves to no address".to_string())),
            }
        }
    }
}

/// `POST /proxies`.
async fn create(shared: &Shared, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let p = tp::parse_new_proxy(body)?;
    let name = p.name.unwrap_or_default();
    let upstream = p.upstream.unwrap_or_default();
    if shared.entry(&name).is_some() {
        return Err(ApiError::proxy_exists());
    }
    let bind = listen_addr(p.listen.as_deref().unwrap_or("")).await?;
    let cfg = tp::proxy_listener(&name, bind, &upstream, Vec::new());
    let e = shared
        .add_listener(cfg, p.enabled.unwrap_or(true))
        .await
        .map_err(set_error)?;
    Ok(json_resp(StatusCode::CREATED, &proxy_json(&e)))
}

/// `POST`/`PATCH /proxies/{name}`: fields not given keep their value. A new `listen` or
/// `upstream` restarts the listener (its connections close, as in Toxiproxy); `enabled` starts
/// or stops it. A listener that cannot bind stays stopped (500).
async fn change(shared: &Shared, name: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let cur = proxy(shared, name)?;
    let p = tp::parse_proxy(body)?;
    let cur_upstream = cur.cfg.backends.first().cloned().unwrap_or_default();
    let listen = match p.listen.as_deref().filter(|l| !l.is_empty()) {
        Some(l) => listen_addr(l).await?,
        None => cur.addr,
    };
    let upstream = p
        .upstream
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| cur_upstream.clone());
    let enabled = p.enabled.unwrap_or(cur.running);
    let e = if listen != cur.addr || upstream != cur_upstream {
        let cfg = ListenerConfig {
            bind: listen,
            backends: vec![upstream],
            ..cur.cfg
        };
        shared
            .replace_listener(cfg, enabled, "toxiproxy api: proxy changed")
            .await
    } else if enabled && !cur.running {
        shared.start_listener(name).await
    } else if !enabled && cur.running {
        shared
            .stop_listener(name, "toxiproxy api: proxy disabled")
            .await
    } else {
        Ok(cur)
    };
    e.map(|e| ok(&proxy_json(&e))).map_err(set_error)
}

/// `POST /reset`: every fault rule removed, every stopped listener started; the first listener
/// that cannot start is the error (the others are reset all the same).
async fn reset(shared: &Shared) -> Result<Response<Body>, ApiError> {
    for e in shared.entries() {
        let cleared = shared
            .edit_faults(&e.cfg.name, |rules| {
                rules.clear();
                Ok::<_, ApiError>(())
            })
            .await;
        match cleared {
            // Removed meanwhile: nothing to reset.
            Err(SetError::NotFound(_)) => {}
            other => flatten(other)?,
        }
    }
    let mut first_error = None;
    for e in shared.entries().into_iter().filter(|e| !e.running) {
        match shared.start_listener(&e.cfg.name).await {
            Ok(_) | Err(SetError::NotFound(_)) => {}
            Err(err) => {
                first_error.get_or_insert(set_error(err));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(no_content()),
    }
}

/// `POST /populate`: 201 `{"proxies": [...]}`; on an error, its status and `{"error", "status",
/// "proxies"}` with the proxies made before it.
async fn populate(shared: &Shared, body: &[u8]) -> Response<Body> {
    let list = match tp::parse_populate(body) {
        Ok(l) => l,
        Err(e) => return error(&e),
    };
    let mut done = Vec::new();
    let mut failed = None;
    for p in list {
        match populate_one(shared, p).await {
            Ok(e) => done.push(proxy_json(&e)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    match failed {
        None => json_resp(StatusCode::CREATED, &json!({ "proxies": done })),
        Some(e) => {
            let mut v = e.to_json();
            v["proxies"] = Value::Array(done);
            let status =
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_resp(status, &v)
        }
    }
}

/// One proxy of `/populate`: kept when its `listen` and `upstream` match, else replaced (its
/// toxics go), or created.
async fn populate_one(shared: &Shared, p: tp::ProxyInput) -> Result<Entry, ApiError> {
    let name = p.name.unwrap_or_default();
    let upstream = p.upstream.unwrap_or_default();
    let listen = listen_addr(p.listen.as_deref().unwrap_or("")).await?;
    let enabled = p.enabled.unwrap_or(true);
    let cfg = tp::proxy_listener(&name, listen, &upstream, Vec::new());
    let r = match shared.entry(&name) {
        Some(cur) if cur.addr == listen && cur.cfg.backends.first() == Some(&upstream) => {
            return Ok(cur)
        }
        Some(_) => {
            shared
                .replace_listener(cfg, enabled, "toxiproxy api: proxy replaced by /populate")
                .await
        }
        None => shared.add_listener(cfg, enabled).await,
    };
    r.map_err(set_error)
}
