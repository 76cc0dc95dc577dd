//! A small HTTP/1.1 client for the nodes' management API and warren-lb's admin API: one
//! connection per request (hyper's low-level client), basic auth, JSON, a timeout per request.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Answers larger than this are refused.
const MAX_BODY: usize = 64 << 20;
/// Timeout of one request.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON, for a 2xx answer.
    pub fn json(&self) -> Result<Value, String> {
        if !(200..300).contains(&self.status) {
            return Err(format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ));
        }
        serde_json::from_slice(&self.body).map_err(|e| format!("bad JSON: {e}"))
    }
}

/// `method path` on `addr`, with guest's credentials and `body` as JSON.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    match tokio::time::timeout(TIMEOUT, request(addr, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no answer within {TIMEOUT:?}")),
    }
}

/// GET `path` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    call(addr, "GET", path, None).await?.json()
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("guest:guest")
    );
    let payload = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, auth)
        .header(hyper::header::USER_AGENT, "warren-up");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(payload))
        .map_err(|e| format!("cannot build request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{addr}: reading the answer: {e}"))?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok(Reply { status, body })
}
