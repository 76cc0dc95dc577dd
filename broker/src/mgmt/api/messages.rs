//! The endpoints that move messages, through the queues' typed API as AMQP clients do:
//! - `POST /api/exchanges/{vhost}/{name}/publish`: route one message as a mandatory publish
//!   with a publisher confirm (alternate exchanges followed, persistent messages on disk before
//!   the answer), answer `{"routed": bool}` as RabbitMQ's management plugin does
//! - `POST /api/queues/{vhost}/{name}/get`: take up to `count` messages, then ack or reject
//!   them as `ackmode` says
//! - `DELETE /api/queues/{vhost}/{name}/contents`: purge
//! - `GET /api/aliveness-test/{vhost}`: declare `aliveness-test`, publish to it through the
//!   default exchange and get the message back.

use super::{check_perm, exchange_url_name, ok, required_str, vhost, Perm, R};
use crate::mgmt::json as conv;
use crate::mgmt::{no_content, ApiError, Req};
use crate::queue::{ClientEvent, ConfirmTicket, QueueArgs, Settle};
use crate::vhost::{QueueSpec, Vhost};
use crate::BrokerShared;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// POST /api/exchanges/{vhost}/{name}/publish.
pub(super) async fn publish(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    let name = exchange_url_name(name);
    if !name.is_empty() && v.exchange(name).is_none() {
        return Err(ApiError::NotFound);
    }
    check_perm(
        shared,
        r,
        &v,
        Perm::Write,
        if name.is_empty() { "amq.default" } else { name },
    )?;
    let body = r.json()?;
    let rk = required_str(&body, "routing_key")?;
    let payload = required_str(&body, "payload")?;
    let bytes = match body.get("payload_encoding").and_then(Value::as_str) {
        None | Some("string") => payload.into_bytes(),
        Some("base64") => {
            conv::b64_decode(&payload).ok_or_else(|| ApiError::bad("payload is not base64"))?
        }
        Some(other) => {
            return Err(ApiError::bad(format!(
                "payload_encoding '{other}' is not 'string' or 'base64'"
            )))
        }
    };
    if rk.len() > 255 {
        return Err(ApiError::bad("routing_key longer than 255 bytes"));
    }
    let props = conv::to_properties(body.get("properties").unwrap_or(&Value::Null))
        .map_err(ApiError::bad)?;
    if bytes.len() as u64 > shared.config.max_message_size {
        return Err(ApiError::bad(format!(
            "message size {} is larger than configured max size {}",
            bytes.len(),
            shared.config.max_message_size
        )));
    }
    let routed = publish_message(&v, name, &rk, props, Bytes::from(bytes)).await?;
    ok(json!({ "routed": routed }))
}

/// Routes one message to its queues; Ok(false) when nothing took it.
async fn publish_message(
    v: &Vhost,
    exchange: &str,
    rk: &str,
    props: amq_protocol::protocol::basic::AMQPProperties,
    body: Bytes,
) -> Result<bool, ApiError> {
    if let Some(e) = v.exchange(exchange) {
        if e.internal {
            return Err(ApiError::Forbidden(format!(
                "cannot publish to internal exchange '{exchange}'"
            )));
        }
    }
    let msg = crate::queue::Message::new(v.node().memory, exchange.into(), rk.into(), props, body)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let mut targets = Vec::new();
    v.route(&msg, &mut targets);
    if targets.is_empty() {
        // Mandatory: nothing took it.
        return Ok(false);
    }
    // Confirmed like a publish on a confirm channel: every queue reports on its copy.
    let msg = Arc::new(msg);
    let (events, mut confirms) = tokio::sync::mpsc::unbounded_channel();
    let n = targets.len();
    for (seq, q) in targets.into_iter().enumerate() {
        let ticket = ConfirmTicket {
            events: events.clone(),
            conn_id: 0,
            channel: 0,
            generation: 0,
            seq: seq as u64,
        };
        q.publish(vec![(msg.clone(), Some(ticket))], None).await;
    }
    drop(events);
    let mut acked = 0;
    let wait = tokio::time::timeout(CONFIRM_TIMEOUT, async {
        while let Some(ev) = confirms.recv().await {
            if let ClientEvent::Confirm { ok, .. } = ev {
                if !ok {
                    // RabbitMQ's answer to a nacked publish (a full reject-publish queue).
                    return Err(ApiError::bad(
                        "rejected Unable to publish message. Check queue limits.",
                    ));
                }
                acked += 1;
                if acked == n {
                    break;
                }
            }
        }
        Ok(())
    });
    match wait.await {
        Ok(r) => r.map(|()| true),
        Err(_) => Err(ApiError::Unavailable(
            "the message was not confirmed in time".into(),
        )),
    }
}

/// How long an HTTP publish waits for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// POST /api/queues/{vhost}/{name}/get.
pub(super) async fn get(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    let q = v.queue(name).ok_or(ApiError::NotFound)?;
    check_perm(shared, r, &v, Perm::Read, name)?;
    let body = r.json()?;
    let count = match body.get("count") {
        None => return Err(ApiError::bad("Missing key: count")),
        Some(c) => c
            .as_u64()
            .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| ApiError::bad("'count' must be a non-negative integer"))?,
    };
    let (ack, requeue) = match body.get("ackmode").and_then(Value::as_str) {
        Some("ack_requeue_true") | Some("reject_requeue_true") => (false, true),
        Some("ack_requeue_false") => (true, false),
        Some("reject_requeue_false") => (false, false),
        Some(other) => return Err(ApiError::bad(format!("invalid ackmode '{other}'"))),
        None => return Err(ApiError::bad("Missing key: ackmode")),
    };
    let base64 = match body.get("encoding").and_then(Value::as_str) {
        None | Some("auto") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad(format!("invalid encoding '{other}'"))),
    };
    let truncate = body.get("truncate").and_then(|t| {
        t.as_u64()
            .or_else(|| t.as_str().and_then(|s| s.parse().ok()))
    });
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..count.min(10_000) {
        let Some(g) = q.get(false).await else {
            break;
        };
        ids.push(g.msg_id);
        let full = g.msg.body();
        let shown = match truncate {
            Some(t) if (t as usize) < full.len() => &full[..t as usize],
            _ => full,
        };
        let (payload, enc) = match (base64, std::str::from_utf8(shown)) {
            (false, Ok(s)) => (s.to_owned(), "string"),
            _ => (conv::b64_encode(shown), "base64"),
        };
        out.push(json!({
            "payload_bytes": full.len(),
            "redelivered": g.redelivered,
            "exchange": g.msg.exchange(),
            "routing_key": g.msg.routing_key(),
            "message_count": g.remaining,
            "properties": conv::properties(&g.msg.properties()),
            "payload": payload,
            "payload_encoding": enc,
        }));
    }
    if !ids.is_empty() {
        let how = match (ack, requeue) {
            (true, _) => Settle::Ack,
            (false, true) => Settle::Requeue,
            (false, false) => Settle::Discard,
        };
        q.settle(ids, how).await;
    }
    ok(Value::Array(out))
}

/// DELETE /api/queues/{vhost}/{name}/contents.
pub(super) async fn purge(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    check_perm(shared, r, &v, Perm::Read, name)?;
    let q = v.queue(name).ok_or(ApiError::NotFound)?;
    q.purge().await;
    Ok(no_content())
}

/// POST /api/queues/{vhost}/{name}/actions: `{"action": "sync"}` synchronises the queue's
/// mirrors that are not in sync (`sync_queue`), `{"action": "cancel_sync"}` stops that
/// (`cancel_sync_queue`); carried out by the queue's master, wherever it runs. On a single
/// node (nothing to synchronise) both succeed.
pub(super) async fn action(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    check_perm(shared, r, &v, Perm::Configure, name)?;
    let body = r.json()?;
    let cancel = match body.get("action").and_then(Value::as_str) {
        Some("sync") => false,
        Some("cancel_sync") => true,
        Some(other) => return Err(ApiError::bad(format!("unknown action: {other}"))),
        None => return Err(ApiError::bad("Missing key: action")),
    };
    v.queue(name).ok_or(ApiError::NotFound)?;
    if let Some(link) = shared.cluster() {
        link.sync_queue(vh, name, cancel)
            .await
            .map_err(ApiError::Unavailable)?;
    }
    Ok(no_content())
}

/// GET /api/aliveness-test/{vhost}.
pub(super) async fn aliveness(shared: &BrokerShared, r: &Req, vh: &str) -> R {
    let v = vhost(shared, r, vh)?;
    let name = "aliveness-test";
    let args = QueueArgs::parse(&Default::default(), name, &v.name)?;
    let (q, _) = v.declare_queue(QueueSpec {
        name: name.into(),
        durable: false,
        exclusive_owner: None,
        auto_delete: false,
        arguments: Default::default(),
        args,
    })?;
    let body = Bytes::from_static(b"test_message");
    publish_message(&v, "", name, Default::default(), body.clone()).await?;
    match tokio::time::timeout(Duration::from_secs(5), q.get(true)).await {
        Ok(Some(g)) if g.msg.body() == &body[..] => ok(json!({"status": "ok"})),
        _ => Err(ApiError::Unavailable("aliveness test failed".into())),
    }
}
