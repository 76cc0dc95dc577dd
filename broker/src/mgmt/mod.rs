//! The management HTTP API (RabbitMQ compatible JSON under `/api`), the web UI files and the
//! Prometheus endpoint, on hyper 1.
//!
//! The shell here accepts connections, reads requests, authenticates them (HTTP basic against
//! the broker's users) and turns [`ApiError`]s into RabbitMQ's error bodies. The endpoints
//! live in [`api`], the metrics text in [`prometheus`], JSON conversions in [`json`].

mod api;
pub mod json;
mod prometheus;

use crate::BrokerShared;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted (definitions imports can be large).
const MAX_BODY: usize = 64 << 20;

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
    loop {
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
                        Kind::Api => handle(&shared, peer, req).await,
                        Kind::Prometheus => prometheus::handle(&shared, req).await,
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
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
        serde_json::from_slice(&self.body).map_err(|_| ApiError::bad("not_json"))
    }

    pub fn query_flag(&self, k: &str) -> bool {
        self.query.get(k).is_some_and(|v| v == "true")
    }
}

static INDEX_HTML: &[u8] = include_bytes!("../../ui/index.html");
static APP_JS: &[u8] = include_bytes!("../../ui/app.js");
static STYLE_CSS: &[u8] = include_bytes!("../../ui/style.css");

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
    match (method.clone(), path.as_str()) {
        (Method::GET, "/" | "/index.html") => {
            return full(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
        }
        (Method::GET, "/app.js") => {
            return full(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS)
        }
        (Method::GET, "/style.css") => {
            return full(StatusCode::OK, "text/css; charset=utf-8", STYLE_CSS)
        }
        _ => {}
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
    let query = parse_query(req.uri().query().unwrap_or(""));
    let headers = req.headers().clone();
    let caller = match authenticate(shared, peer, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return ApiError::bad(format!("cannot read body: {e}")).into_response(),
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
        Ok(resp) => resp,
        Err(e) => e.into_response(),
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
