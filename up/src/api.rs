//! The nodes' management API and warren-lb's admin API, through warren-ctl's HTTP client (one
//! connection per request, basic auth as guest, a timeout per request), run on a blocking thread.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use warren_ctl::args::Target;
use warren_ctl::http::HttpApi;
use warren_ctl::{Api, Method, Reply};

/// Timeout of one request.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `method path` on `addr`, as guest, with `body` as JSON.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let (path, body) = (path.to_string(), body.cloned());
    tokio::task::spawn_blocking(move || {
        let target = Target::parse(&format!("http://{addr}")).map_err(|e| e.message)?;
        let mut api = HttpApi::new(target, "guest", "guest", TIMEOUT).map_err(|e| e.to_string())?;
        api.call(method, &path, body.as_ref())
            .map_err(|e| format!("{addr}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The body of a 2xx answer as JSON.
pub fn json(r: &Reply) -> Result<Value, String> {
    if !(200..300).contains(&r.status) {
        return Err(format!(
            "HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("bad JSON: {e}"))
}

/// GET `path` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    json(&call(addr, Method::Get, path, None).await?)
}
