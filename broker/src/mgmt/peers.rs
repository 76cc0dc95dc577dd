//! The management API of the other nodes, as this node asks it when it answers for the whole
//! cluster (a load balancer sends port 15672 to any node).
//!
//! Each node publishes where its API is (`node/<name>` in the replicated state, see
//! [`crate::cluster::status::announce`]). A request that lists what lives on nodes (connections,
//! channels, consumers, the nodes' own figures) is answered with this node's part and, for each
//! other member up as this node sees it, that member's part, asked over plain HTTP with the
//! caller's own `Authorization` header (the peer checks the same user and tags: users are
//! replicated) and [`LOCAL_PARAM`]`=true`, which makes the peer answer for itself only.
//!
//! Bounded: one connection per request, [`PEER_TIMEOUT`] for the whole exchange,
//! [`PEER_MAX_BODY`] bytes of answer at most. A peer that does not answer in time (or answers
//! something else than 200) is left out of the listing, not an error: the answer carries
//! [`MISSING_HEADER`] with the nodes whose part is missing, and the log says why at debug.
//!
//! With `proxy-protocol` on, every management connection must start with a PROXY header: this
//! node sends `PROXY UNKNOWN` (the peer keeps the socket's address), which the peer accepts
//! when this node's address is in its `proxy-protocol-from`.

use crate::cluster::status::{self, Peer};
use crate::BrokerShared;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, HOST, USER_AGENT};
use hyper::Method;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::debug;

/// The query parameter that makes a node answer for itself only (`?node-local=true`).
pub const LOCAL_PARAM: &str = "node-local";
/// How long a peer has to answer (connect, request, whole body). A peer inspects its
/// connections' channels for up to 2 s; this leaves it room.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer taken from a peer.
pub const PEER_MAX_BODY: usize = 32 << 20;
/// Response header naming the nodes whose part of a cluster-wide listing is missing.
pub const MISSING_HEADER: &str = "x-warren-missing-nodes";

/// Path segments are encoded except RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `/api/<segs...>?node-local=true`, each segment percent-encoded.
pub fn local_path(segs: &[&str]) -> String {
    let mut p = String::from("/api");
    for s in segs {
        p.push('/');
        p.extend(utf8_percent_encode(s, SEGMENT));
    }
    p.push('?');
    p.push_str(LOCAL_PARAM);
    p.push_str("=true");
    p
}

/// One peer's answer.
#[derive(Debug)]
pub struct Answer {
    pub node: String,
    pub status: u16,
    pub body: Bytes,
}

/// What a fan-out got: the answers (any status), and the nodes whose part is missing with
/// why.
#[derive(Debug, Default)]
pub struct Gathered {
    pub answers: Vec<Answer>,
    pub missing: Vec<(String, String)>,
}

impl Gathered {
    /// The JSON bodies of the 200 answers, by node; other answers are missing parts.
    pub fn ok_json(&mut self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for a in std::mem::take(&mut self.answers) {
            if a.status != 200 {
                self.missing
                    .push((a.node, format!("answered {}", a.status)));
                continue;
            }
            match serde_json::from_slice(&a.body) {
                Ok(v) => out.push((a.node, v)),
                Err(_) => self
                    .missing
                    .push((a.node, "answered something not JSON".into())),
            }
        }
        out
    }

    /// The value of [`MISSING_HEADER`], None when nothing is missing.
    pub fn header(&self) -> Option<HeaderValue> {
        if self.missing.is_empty() {
            return None;
        }
        for (n, why) in &self.missing {
            debug!(node = %n, reason = %why, "a node's part of a cluster-wide listing is missing");
        }
        let names: Vec<&str> = self.missing.iter().map(|(n, _)| n.as_str()).collect();
        HeaderValue::from_str(&names.join(", ")).ok()
    }
}

/// (node, address) to ask, or (node, why it is missing).
type NodeAnd = Vec<(String, String)>;

/// The members to ask: up, and with a published management address. The others are missing
/// (witnesses only when they were asked: they hold no connections).
fn targets(shared: &BrokerShared) -> (NodeAnd, NodeAnd) {
    let Some(link) = shared.cluster() else {
        return (Vec::new(), Vec::new());
    };
    let mut ask = Vec::new();
    let mut missing = Vec::new();
    for Peer {
        name,
        running,
        witness,
        mgmt,
    } in status::peers(link)
    {
        match (running, mgmt) {
            (true, Some(addr)) => ask.push((name, addr)),
            _ if witness => {}
            (false, _) => missing.push((name, "not running".into())),
            (true, None) => missing.push((name, "no management listener".into())),
        }
    }
    (ask, missing)
}

/// `GET path` on every other member that is up, at once.
pub async fn get_all(shared: &BrokerShared, auth: Option<&HeaderValue>, path: &str) -> Gathered {
    let (ask, missing) = targets(shared);
    let proxy = shared.config.proxy_protocol;
    let calls = ask.into_iter().map(|(node, addr)| {
        let path = path.to_owned();
        let auth = auth.cloned();
        async move {
            let r = request(&addr, Method::GET, &path, auth.as_ref(), None, proxy).await;
            (node, r)
        }
    });
    let mut g = Gathered {
        answers: Vec::new(),
        missing,
    };
    for (node, r) in futures_join(calls).await {
        match r {
            Ok((status, body)) => g.answers.push(Answer { node, status, body }),
            Err(why) => g.missing.push((node, why)),
        }
    }
    g
}

/// `method path` on one member, by name.
pub async fn call(
    shared: &BrokerShared,
    node: &str,
    method: Method,
    path: &str,
    auth: Option<&HeaderValue>,
    reason: Option<&HeaderValue>,
) -> Result<(u16, Bytes), String> {
    let (ask, _) = targets(shared);
    let Some((_, addr)) = ask.into_iter().find(|(n, _)| n == node) else {
        return Err(format!("{node} is not reachable"));
    };
    request(
        &addr,
        method,
        path,
        auth,
        reason,
        shared.config.proxy_protocol,
    )
    .await
}

/// Runs the futures concurrently, results in their order.
async fn futures_join<F, T>(calls: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// One request on a fresh connection, within [`PEER_TIMEOUT`].
async fn request(
    addr: &str,
    method: Method,
    path: &str,
    auth: Option<&HeaderValue>,
    reason: Option<&HeaderValue>,
    proxy: bool,
) -> Result<(u16, Bytes), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        if proxy {
            stream
                .write_all(b"PROXY UNKNOWN\r\n")
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr)
            .header(USER_AGENT, "warren-broker (cluster-wide listing)")
            .header(CONTENT_LENGTH, "0");
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        if let Some(r) = reason {
            req = req.header("x-reason", r.clone());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), PEER_MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{addr}: reading the answer: {e}"))?
            .to_bytes();
        drop(sender);
        driver.abort();
        Ok((status, body))
    };
    match tokio::time::timeout(PEER_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer from {addr} within {} ms",
            PEER_TIMEOUT.as_millis()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_encode_each_segment() {
        assert_eq!(
            local_path(&["connections", "127.0.0.1:5 -> 127.0.0.1:6", "channels"]),
            "/api/connections/127.0.0.1%3A5%20-%3E%20127.0.0.1%3A6/channels?node-local=true"
        );
        assert_eq!(
            local_path(&["consumers", "/"]),
            "/api/consumers/%2F?node-local=true"
        );
    }
}
