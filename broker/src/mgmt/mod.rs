//! The management HTTP API (RabbitMQ compatible JSON under `/api`), the web UI files and the
//! Prometheus endpoint, on hyper 1.
//!
//! The shell here accepts connections, reads requests, authenticates them (HTTP basic against
//! the broker's users) and turns [`ApiError`]s into RabbitMQ's error bodies. The endpoints
//! live in [`api`], the metrics text in [`prometheus`], JSON conversions in [`json`], the UI's files
//! and the overview's sample history (`?msg_rates_age=`) in [`ui`], and the client side that
//! asks the other nodes of a cluster for their part of a listing in [`peers`].
//!
//! Limits on hostile or broken clients, all from the config:
//! - connections: at most `mgmt-max-connections` per listener at once (beyond it the listener
//!   stops accepting and clients wait in the backlog); request headers must arrive within
//!   `mgmt-header-timeout-ms`, which also ends idle keep-alive connections;
//! - bodies are read only after authentication, must be at most `mgmt-max-body-size` (413) and
//!   arrive within `mgmt-body-timeout-ms` (408). The bytes of bodies being read or handled at
//!   once come out of one node-wide budget (`BrokerShared::mgmt_body_budget`, 4 times the
//!   per-request limit): a request reserves its Content-Length (or each chunk as it comes) before
//!   reading, waits at most [`BUDGET_WAIT`] for it, and gets 503 otherwise. So twenty 20 MiB
//!   imports at once hold at most 80 MiB of bodies, not 400;
//! - a JSON body nested deeper than `nesting::MAX_DEPTH + 4` levels is refused (400) before any
//!   handler walks it;
//! - with `proxy-protocol` on, the management listener takes the client address from the PROXY
//!   header (see [`crate::proxied`]); the guest loopback rule and the failed-login limit
//!   (`auth-failure-limit`, 429) use it;
//! - every API/UI response carries `X-Frame-Options: DENY`, a `Content-Security-Policy` of
//!   `default-src 'self'; frame-ancestors 'none'` (the UI has no inline script or style),
//!   `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.

mod api;
pub mod json;
mod peers;
mod prometheus;
mod ui;

use crate::BrokerShared;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a request waits for its share of the body budget before it gets 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// How much deeper than field tables (`nesting::MAX_DEPTH`) a JSON request body may nest: room
/// for the object that carries arguments or a policy definition.
pub const JSON_DEPTH_SLACK: usize = 4;

/// The node-wide budget of request body bytes: 4 times `mgmt-max-body-size`.
pub(crate) fn body_budget(cfg: &crate::config::Config) -> usize {
    usize::try_from(cfg.mgmt_max_body_size.saturating_mul(4))
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// Headers on every management API and UI response.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("x-frame-options", "DENY"),
    (
        "content-security-policy",
        "default-src 'self'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// Which service a listener runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Management API and UI (`--mgmt`).
    Api,
    /// Prometheus metrics (`--prometheus`).
    Prometheus,
}

type Resp = Response<Full<Bytes>>;

/// Accepts HTTP connections until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<BrokerShared>,
    stop: CancellationToken,
) {
    let cfg = &shared.config;
    let slots = (cfg.mgmt_max_connections > 0)
        .then(|| Arc::new(Semaphore::new(cfg.mgmt_max_connections as usize)));
    let header_timeout = Duration::from_millis(cfg.mgmt_header_timeout_ms);
    loop {
        // At the connection cap the listener stops accepting; clients wait in the backlog.
        let slot = match &slots {
            Some(s) => tokio::select! {
                _ = stop.cancelled() => return,
                p = s.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
            },
            None => None,
        };
        let (tcp, sock_peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let local = tcp.local_addr().unwrap_or(sock_peer);
            let accepted = match kind {
                // proxy-protocol applies to the management listener, not to Prometheus.
                Kind::Api => tokio::select! {
                    a = crate::proxied::accept(tcp, sock_peer, local, &shared.config, "mgmt") => a,
                    _ = stop.cancelled() => None,
                },
                Kind::Prometheus => Some(crate::proxied::Accepted {
                    stream: crate::proxied::Prefixed::new(tcp, Bytes::new()),
                    peer: sock_peer,
                    local,
                    via: None,
                }),
            };
            let Some(accepted) = accepted else {
                return;
            };
            let peer = accepted.peer;
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    let r = match kind {
                        Kind::Api => {
                            let mut r = handle(&shared, peer, req).await;
                            let h = r.headers_mut();
                            for (k, v) in SECURITY_HEADERS {
                                h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
                            }
                            r
                        }
                        Kind::Prometheus => prometheus::handle(&shared, req).await,
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(accepted.stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection ended");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// An error answer, rendered as RabbitMQ renders it.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no or wrong credentials.
    Unauthorized(String),
    /// 403: authenticated but not allowed.
    Forbidden(String),
    /// 404.
    NotFound,
    /// 400 with a reason.
    BadRequest(String),
    /// 405.
    MethodNotAllowed,
    /// 503 (for example the app is stopped for an aliveness test).
    Unavailable(String),
    /// 500 (definitions could not be written).
    Internal(String),
    /// 413: the body is larger than `mgmt-max-body-size`.
    PayloadTooLarge(String),
    /// 408: the body did not arrive within `mgmt-body-timeout-ms`.
    RequestTimeout(String),
    /// 503: no room in the body budget in time; worth retrying.
    Busy(String),
    /// 429: the source is over the failed-login limit.
    TooManyRequests(String),
}

impl ApiError {
    pub fn bad(reason: impl Into<String>) -> Self {
        Self::BadRequest(reason.into())
    }

    fn into_response(self) -> Resp {
        match self {
            ApiError::Unauthorized(reason) => {
                let mut r = json_resp(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "not_authorized", "reason": reason}),
                );
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
                );
                r
            }
            ApiError::Forbidden(reason) => json_resp(
                StatusCode::FORBIDDEN,
                &json!({"error": "not_authorised", "reason": reason}),
            ),
            ApiError::NotFound => json_resp(
                StatusCode::NOT_FOUND,
                &json!({"error": "Object Not Found", "reason": "Not Found"}),
            ),
            ApiError::BadRequest(reason) => json_resp(
                StatusCode::BAD_REQUEST,
                &json!({"error": "bad_request", "reason": reason}),
            ),
            ApiError::MethodNotAllowed => json_resp(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "Method Not Allowed", "reason": "method not allowed"}),
            ),
            ApiError::Internal(reason) => json_resp(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal_error", "reason": reason}),
            ),
            ApiError::Unavailable(reason) => json_resp(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "failed", "reason": reason}),
            ),
            // The body was not read to its end: the connection cannot carry another request.
            ApiError::PayloadTooLarge(reason) => closing(json_resp(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": "payload_too_large", "reason": reason}),
            )),
            ApiError::RequestTimeout(reason) => closing(json_resp(
                StatusCode::REQUEST_TIMEOUT,
                &json!({"error": "request_timeout", "reason": reason}),
            )),
            ApiError::Busy(reason) => {
                let mut r = closing(json_resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "service_unavailable", "reason": reason}),
                ));
                r.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            ApiError::TooManyRequests(reason) => {
                let mut r = json_resp(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"error": "too_many_requests", "reason": reason}),
                );
                r.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("60"));
                r
            }
        }
    }
}

/// Marks a response as the connection's last.
fn closing(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

impl From<crate::error::AmqpError> for ApiError {
    fn from(e: crate::error::AmqpError) -> Self {
        match e {
            crate::error::AmqpError::Channel(e) => e.into(),
            // Only the cluster's unavailability comes this way.
            crate::error::AmqpError::Connection(e) => ApiError::Unavailable(e.reply_text()),
        }
    }
}

impl From<crate::error::ChannelError> for ApiError {
    fn from(e: crate::error::ChannelError) -> Self {
        match e.reply_code() {
            404 => ApiError::NotFound,
            403 => ApiError::Forbidden(e.reply_text().to_owned()),
            _ => ApiError::BadRequest(e.reply_text().to_owned()),
        }
    }
}

pub(crate) fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub(crate) fn json_resp(status: StatusCode, v: &Value) -> Resp {
    full(status, "application/json", v.to_string())
}

pub(crate) fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

pub(crate) fn created() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::CREATED;
    r
}

/// Decodes %XX escapes (a `+` stays a `+`, as in paths).
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Query string as a map (later keys win).
fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub tags: Vec<String>,
}

impl Caller {
    pub fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
    pub fn is_admin(&self) -> bool {
        self.has("administrator")
    }
    /// May read everything (administrator or monitoring).
    pub fn is_monitor(&self) -> bool {
        self.is_admin() || self.has("monitoring")
    }
    /// May use the management API at all.
    pub fn is_mgmt(&self) -> bool {
        self.is_monitor() || self.has("management") || self.has("policymaker")
    }
}

/// One parsed request.
pub struct Req {
    pub method: Method,
    /// Path segments after `/api`, percent-decoded.
    pub segs: Vec<String>,
    pub query: HashMap<String, String>,
    pub body: Bytes,
    pub caller: Caller,
    pub headers: hyper::HeaderMap,
}

impl Req {
    /// The body as JSON (an empty body is `{}`).
    pub fn json(&self) -> Result<Value, ApiError> {
        if self.body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(json!({}));
        }
        // serde_json itself stops at 128 levels; handlers walk values recursively, so anything
        // deeper than they could need is refused here, whatever the endpoint.
        let v: Value = serde_json::from_slice(&self.body).map_err(|_| ApiError::bad("not_json"))?;
        let limit = crate::nesting::MAX_DEPTH + JSON_DEPTH_SLACK;
        if crate::nesting::json_exceeds(&v, limit) {
            return Err(ApiError::bad(format!(
                "request body nested deeper than {limit} levels"
            )));
        }
        Ok(v)
    }

    pub fn query_flag(&self, k: &str) -> bool {
        self.query.get(k).is_some_and(|v| v == "true")
    }
}

/// HTTP basic credentials from the Authorization header.
fn basic_credentials(headers: &hyper::HeaderMap) -> Option<(String, String)> {
    let h = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = json::b64_decode(rest.trim())?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// Checks the caller's credentials and management tags. `peer` is the client (from the PROXY
/// header when `proxy-protocol` is on).
fn authenticate(
    shared: &BrokerShared,
    peer: SocketAddr,
    headers: &hyper::HeaderMap,
) -> Result<Caller, ApiError> {
    let Some((user, pass)) = basic_credentials(headers) else {
        return Err(ApiError::Unauthorized("Login failed".into()));
    };
    let loopback = crate::auth::is_loopback(peer.ip());
    match shared
        .auth
        .login(&user, &pass, peer.ip(), loopback, Instant::now())
    {
        Ok(()) => {}
        Err(crate::auth::AuthError::BadCredentials) => {
            return Err(ApiError::Unauthorized("Login failed".into()))
        }
        Err(e @ crate::auth::AuthError::TooManyFailures) => {
            return Err(ApiError::TooManyRequests(e.to_string()))
        }
        Err(e) => return Err(ApiError::Unauthorized(e.to_string())),
    }
    let tags = shared
        .auth
        .user(&user)
        .map(|u| u.tags.clone())
        .unwrap_or_default();
    let caller = Caller { name: user, tags };
    if !caller.is_mgmt() {
        return Err(ApiError::Forbidden("Not management user".into()));
    }
    Ok(caller)
}

async fn handle(shared: &Arc<BrokerShared>, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if let Some(resp) = ui::asset(&method, &path) {
        return resp;
    }
    let Some(rest) = path.strip_prefix("/api") else {
        return ApiError::NotFound.into_response();
    };
    // Empty segments are kept: "/api/exchanges/%2F//publish" names the default exchange.
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segs: Vec<String> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').map(percent_decode).collect()
    };
    // The login page reads how to log in before anyone has: answered without credentials, as
    // RabbitMQ does (nothing in it is secret).
    if method == Method::GET && segs == ["auth"] {
        return json_resp(StatusCode::OK, &api::auth_settings());
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let headers = req.headers().clone();
    let caller = match authenticate(shared, peer, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // Held until the response is built: the body's bytes stay in use until then.
    let (body, _budget) = match read_body(shared, req.into_body()).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let r = Req {
        method,
        segs,
        query,
        body,
        caller,
        headers,
    };
    match api::route(shared, &r).await {
        Ok(resp) => ui::with_samples(shared, &r, resp).await,
        Err(e) => e.into_response(),
    }
}

/// Reads a request body within the per-request limit, the body timeout and the node-wide
/// budget; returns it with the budget it holds.
async fn read_body(
    shared: &BrokerShared,
    mut body: Incoming,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let cfg = &shared.config;
    let limit = cfg.mgmt_max_body_size;
    let timeout = Duration::from_millis(cfg.mgmt_body_timeout_ms);
    let deadline = Instant::now() + timeout;
    let too_large = || ApiError::PayloadTooLarge(format!("request body larger than {limit} bytes"));
    // Content-Length (0 when there is no body); None for a chunked body.
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    if declared == Some(0) {
        return Ok((Bytes::new(), None));
    }
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut buf = BytesMut::new();
    if let Some(n) = declared {
        // n <= limit <= 1 GiB (validated), so it fits in a usize and a u32.
        let n = usize::try_from(n).map_err(|_| too_large())?;
        held = Some(reserve(shared, n, deadline).await?);
        buf.reserve(n);
    }
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "request body not received within {} ms",
                    timeout.as_millis()
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::bad(format!("cannot read body: {e}"))),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let total = buf.len() + data.len();
        if total as u64 > limit {
            return Err(too_large());
        }
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        if total > have {
            let more = reserve(shared, total - have, deadline).await?;
            match &mut held {
                Some(h) => h.merge(more),
                None => held = Some(more),
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), held))
}

/// `n` bytes of the node-wide body budget, waiting at most [`BUDGET_WAIT`] (and not past the
/// body deadline).
async fn reserve(
    shared: &BrokerShared,
    n: usize,
    deadline: Instant,
) -> Result<OwnedSemaphorePermit, ApiError> {
    let busy = || ApiError::Busy("too many request bodies are being read; retry later".into());
    let n = u32::try_from(n).map_err(|_| busy())?;
    let wait_until = (Instant::now() + BUDGET_WAIT).min(deadline);
    let acquire = shared.mgmt_body_budget.clone().acquire_many_owned(n);
    match tokio::time::timeout_at(wait_until, acquire).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(busy()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2F"), "/");
        assert_eq!(percent_decode("a%2fb%"), "a/b%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("x%4"), "x%4");
        assert_eq!(percent_decode("a+b"), "a+b");
    }

    #[test]
    fn basic_auth_header() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            hyper::header::AUTHORIZATION,
            HeaderValue::from_static("Basic Z3Vlc3Q6Z3Vlc3Q="),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("guest".into(), "guest".into()))
        );
        h.insert(
            hyper::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x"),
        );
        assert_eq!(basic_credentials(&h), None);
    }

    #[test]
    fn query_parsing() {
        let q = parse_query("if-unused=true&name=a%2Fb&x");
        assert_eq!(q.get("if-unused").map(String::as_str), Some("true"));
        assert_eq!(q.get("name").map(String::as_str), Some("a/b"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
    }
}
