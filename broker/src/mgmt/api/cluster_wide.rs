//! What lives on one node, listed by any node: a load balancer sends the management port to
//! any member, and the answer must not depend on which.
//! - `GET /api/connections`, `/api/channels`, `/api/consumers[/{vhost}]`: this node's list
//!   merged with every other running member's (each item names its `node`);
//! - `GET|DELETE /api/connections/{name}`, `GET /api/connections/{name}/channels`,
//!   `GET /api/channels/{name}`: served here when the connection is here, else by the member
//!   that has it (a DELETE closes it there).
//!
//! The other members are asked through [`crate::mgmt::peers`] with `?node-local=true`, which
//! is also how a node answers for itself only. A member that does not answer is left out and
//! named in the `x-warren-missing-nodes` header.

use super::{listed, ListSpec, R};
use crate::mgmt::peers::{self, LOCAL_PARAM, MISSING_HEADER};
use crate::mgmt::{full, ApiError, Req, Resp};
use crate::BrokerShared;
use hyper::header::AUTHORIZATION;
use hyper::{Method, StatusCode};
use serde_json::Value;

/// Whether `r` wants this node's part only (or there is no other node).
fn local_only(shared: &BrokerShared, r: &Req) -> bool {
    r.query_flag(LOCAL_PARAM) || shared.cluster().is_none()
}

/// This node's items plus every running member's, as the other members list them at
/// `/api/<segs>`; and who is missing.
pub(super) async fn gather(
    shared: &BrokerShared,
    r: &Req,
    segs: &[&str],
    local: Value,
) -> (Value, peers::Gathered) {
    if local_only(shared, r) {
        return (local, peers::Gathered::default());
    }
    let Value::Array(mut items) = local else {
        return (local, peers::Gathered::default());
    };
    let auth = r.headers.get(AUTHORIZATION);
    let mut g = peers::get_all(shared, auth, &peers::local_path(segs)).await;
    for (_, v) in g.ok_json() {
        if let Value::Array(theirs) = v {
            items.extend(theirs);
        }
    }
    (Value::Array(items), g)
}

/// [`gather`] as an answer under the request's list parameters (sorted, paged, ... as
/// `spec` says: see `listing`), with the missing nodes in a header.
pub(super) async fn merged(
    shared: &BrokerShared,
    r: &Req,
    segs: &[&str],
    local: Value,
    spec: &ListSpec,
) -> R {
    let (items, g) = gather(shared, r, segs, local).await;
    let items = match items {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut resp = listed(r, items, spec)?;
    if let Some(h) = g.header() {
        resp.headers_mut().insert(MISSING_HEADER, h);
    }
    Ok(resp)
}

/// One object that lives on one node: `here` when this node has it; otherwise the member that
/// answers `GET /api/<segs>` with something else than 404 serves the request (`DELETE`
/// included: it is sent to that member only).
pub(super) async fn on_its_node(shared: &BrokerShared, r: &Req, segs: &[&str], here: R) -> R {
    match here {
        Err(ApiError::NotFound) if !local_only(shared, r) => {}
        other => return other,
    }
    let auth = r.headers.get(AUTHORIZATION);
    let path = peers::local_path(segs);
    let mut g = peers::get_all(shared, auth, &path).await;
    let Some(found) = g.answers.iter().position(|a| a.status != 404) else {
        return Err(ApiError::NotFound);
    };
    let a = g.answers.swap_remove(found);
    if r.method == Method::GET {
        return Ok(relay(a.status, a.body));
    }
    let reason = r.headers.get("x-reason");
    match peers::call(shared, &a.node, r.method.clone(), &path, auth, reason).await {
        Ok((status, body)) => Ok(relay(status, body)),
        Err(why) => Err(ApiError::Unavailable(format!(
            "the object is on {}, which did not answer: {why}",
            a.node
        ))),
    }
}

/// A member's answer, passed on as it is.
fn relay(status: u16, body: bytes::Bytes) -> Resp {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if body.is_empty() {
        let mut r = full(status, "application/json", body);
        r.headers_mut().remove(hyper::header::CONTENT_TYPE);
        return r;
    }
    full(status, "application/json", body)
}
