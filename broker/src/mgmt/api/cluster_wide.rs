//! What lives on one node, listed by any node: a load balancer sends the management port to
//! any member, and the answer must not depend on which.
//! - `GET /api/connections`, `/api/channels`, `/api/consumers[/{vhost}]`: this node's list
//!   merged with every other running member's (each item names its `node`);
//! - `GET /api/overview`: this node's overview with the other members' connections, channels,
//!   message and churn counts and rates added, and their listeners listed (queues, exchanges
//!   and their message counts are the cluster's on every node already);
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

/// `/api/overview` for the whole cluster (see the module docs).
pub(super) async fn overview(shared: &BrokerShared, r: &Req) -> R {
    let mut v = super::overview::overview(shared);
    if local_only(shared, r) {
        return super::ok(v);
    }
    let auth = r.headers.get(AUTHORIZATION);
    let mut g = peers::get_all(shared, auth, &peers::local_path(&["overview"])).await;
    for (_, theirs) in g.ok_json() {
        add_overview(&mut v, &theirs);
    }
    let mut resp = super::ok(v)?;
    if let Some(h) = g.header() {
        resp.headers_mut().insert(MISSING_HEADER, h);
    }
    Ok(resp)
}

/// Adds another node's share of an overview to `into`: what each node counts for itself.
fn add_overview(into: &mut Value, other: &Value) {
    for key in ["connections", "channels"] {
        add_numbers(
            &mut into["object_totals"][key],
            &other["object_totals"][key],
        );
    }
    for key in ["message_stats", "churn_rates"] {
        add_numbers(&mut into[key], &other[key]);
    }
    if let (Some(mine), Some(theirs)) = (
        into["listeners"].as_array_mut(),
        other["listeners"].as_array(),
    ) {
        mine.extend(theirs.iter().cloned());
    }
}

/// `into += other` for numbers, and key by key for objects of numbers (counts and their
/// `{"rate": ..}` details); anything else in `into` stays as it is.
fn add_numbers(into: &mut Value, other: &Value) {
    match (into, other) {
        (Value::Number(a), Value::Number(b)) => {
            *a = match (a.as_u64(), b.as_u64()) {
                (Some(x), Some(y)) => x.saturating_add(y).into(),
                _ => match serde_json::Number::from_f64(
                    a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0),
                ) {
                    Some(n) => n,
                    None => return,
                },
            };
        }
        (Value::Object(a), Value::Object(b)) => {
            for (k, bv) in b {
                match a.get_mut(k) {
                    Some(av) => add_numbers(av, bv),
                    None if bv.is_number() || bv.is_object() => {
                        a.insert(k.clone(), bv.clone());
                    }
                    None => {}
                }
            }
        }
        _ => {}
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overviews_add_what_each_node_counts_and_keep_the_rest() {
        let mut a = json!({
            "node": "a",
            "object_totals": {"connections": 2, "channels": 3, "queues": 5},
            "queue_totals": {"messages": 10},
            "message_stats": {"publish": 7, "publish_details": {"rate": 1.5}},
            "churn_rates": {"connection_created": 1},
            "listeners": [{"node": "a"}],
        });
        let b = json!({
            "node": "b",
            "object_totals": {"connections": 1, "channels": 1, "queues": 5},
            "queue_totals": {"messages": 10},
            "message_stats": {"publish": 3, "publish_details": {"rate": 0.5}, "ack": 4},
            "churn_rates": {"connection_created": 2},
            "listeners": [{"node": "b"}],
        });
        add_overview(&mut a, &b);
        assert_eq!(
            a,
            json!({
                "node": "a",
                "object_totals": {"connections": 3, "channels": 4, "queues": 5},
                "queue_totals": {"messages": 10},
                "message_stats": {"publish": 10, "publish_details": {"rate": 2.0}, "ack": 4},
                "churn_rates": {"connection_created": 3},
                "listeners": [{"node": "a"}, {"node": "b"}],
            })
        );
    }
}
