//! The HTTP side of `warren-ctl`: one HTTP/1.1 connection per request
//! (hyper's low-level client), basic auth, JSON bodies, a timeout per request.
//! A CLI makes a handful of calls, so a connection pool would buy nothing.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::args::Target;
use super::{basic_auth, Api, Method, Reply, TransportError};

/// Timeout per request when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Answers larger than this are refused (a definitions export is far smaller).
const MAX_BODY: usize = 256 * 1024 * 1024;

pub struct HttpApi {
    rt: tokio::runtime::Runtime,
    target: Target,
    auth: String,
    timeout: Duration,
}

impl HttpApi {
    pub fn new(
        target: Target,
        user: &str,
        password: &str,
        timeout: Duration,
    ) -> std::io::Result<HttpApi> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(HttpApi {
            rt,
            target,
            auth: basic_auth(user, password),
            timeout,
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, TransportError> {
        let stream = tokio::net::TcpStream::connect((self.target.connect_host(), self.target.port))
            .await
            .map_err(|e| {
                TransportError::Unreachable(format!(
                    "{}:{}: {e}",
                    self.target.host, self.target.port
                ))
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        // Drives the connection; ends when the request is done and the sender dropped.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut req = hyper::Request::builder()
            .method(method.as_str())
            .uri(format!("{}{path}", self.target.prefix))
            .header(hyper::header::HOST, self.target.host_header())
            .header(hyper::header::AUTHORIZATION, &self.auth)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "warren-ctl");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| TransportError::Protocol(format!("cannot build request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| TransportError::Protocol(format!("reading the answer: {e}")))?
            .to_bytes();
        drop(sender);
        driver.abort();
        Ok(Reply {
            status,
            body: body.to_vec(),
        })
    }
}

impl Api for HttpApi {
    fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, TransportError> {
        let this = &*self;
        this.rt.block_on(async {
            match tokio::time::timeout(this.timeout, this.request(method, path, body)).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }
}
