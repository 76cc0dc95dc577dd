//! Client connections and what lives on them:
//! - `GET /api/connections`, `GET|DELETE /api/connections/{name}` (DELETE closes it with 320,
//!   the reason from `X-Reason`)
//! - `GET /api/connections/{name}/channels`, `GET /api/channels`, `GET /api/channels/{name}`
//! - `GET /api/consumers`, `GET /api/consumers/{vhost}`
//!
//! Callers see every connection with the monitoring tag, otherwise their own. Channels and
//! consumers are not kept here: each connection task is asked for them with
//! `ClientEvent::Inspect` ([`inspect`]).

use super::{forbidden, ok, owns, visible_conns, R};
use crate::connection::registry::ConnEntry;
use crate::mgmt::{no_content, ApiError, Req};
use crate::stats::ChannelSnapshot;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};

/// GET /api/connections.
pub(super) fn list(shared: &BrokerShared, r: &Req) -> Value {
    Value::Array(
        visible_conns(shared, r)
            .iter()
            .map(|e| connection(shared, e))
            .collect(),
    )
}

/// GET|DELETE /api/connections/{name}.
pub(super) fn one(shared: &BrokerShared, r: &Req, name: &str) -> R {
    let e = visible_conns(shared, r)
        .into_iter()
        .find(|e| e.name == name)
        .ok_or(ApiError::NotFound)?;
    match r.method {
        Method::GET => ok(connection(shared, &e)),
        Method::DELETE => {
            if !r.caller.is_admin() && !owns(r, &e) {
                return Err(forbidden());
            }
            let reason = r
                .headers
                .get("x-reason")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("Closed via management plugin");
            let _ = e.events.send(crate::queue::ClientEvent::Close(
                crate::error::ConnectionError::forced(reason.to_owned()),
            ));
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// GET /api/connections/{name}/channels.
pub(super) async fn channels_of(
    shared: &BrokerShared,
    r: &Req,
    name: &str,
) -> Result<Vec<Value>, ApiError> {
    let conns: Vec<_> = visible_conns(shared, r)
        .into_iter()
        .filter(|e| e.name == name)
        .collect();
    if conns.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(crate::connection::registry::inspect(&conns)
        .await
        .iter()
        .flat_map(|(e, chans)| chans.iter().map(|c| channel_json(shared, e, c)))
        .collect())
}

/// GET /api/channels.
pub(super) async fn channels(shared: &BrokerShared, r: &Req) -> Value {
    let conns = visible_conns(shared, r);
    Value::Array(
        crate::connection::registry::inspect(&conns)
            .await
            .iter()
            .flat_map(|(e, chans)| chans.iter().map(|c| channel_json(shared, e, c)))
            .collect(),
    )
}

/// GET /api/channels/{name}.
pub(super) async fn channel(shared: &BrokerShared, r: &Req, name: &str) -> R {
    let conns = visible_conns(shared, r);
    crate::connection::registry::inspect(&conns)
        .await
        .iter()
        .flat_map(|(e, chans)| chans.iter().map(|c| channel_json(shared, e, c)))
        .find(|c| c["name"] == name)
        .map_or(Err(ApiError::NotFound), ok)
}

fn connection(shared: &BrokerShared, e: &ConnEntry) -> Value {
    let c = e.stats.counts();
    let rates = shared.sampler.conn_rates(e.id);
    let opened = e.opened.lock().clone();
    let o = opened.clone().unwrap_or_default();
    let provided = o
        .client_properties
        .get("connection_name")
        .cloned()
        .unwrap_or(Value::Null);
    let ld = std::sync::atomic::Ordering::Relaxed;
    json!({
        "name": e.name,
        "node": shared.config.node_name,
        "type": "network",
        // RabbitMQ's states: "flow" while a queue holds the publisher back.
        "state": match opened {
            None => "starting",
            Some(_) if e.conn_shared.flow.is_blocked() => "flow",
            Some(_) => "running",
        },
        "protocol": "AMQP 0-9-1",
        "auth_mechanism": o.auth_mechanism,
        "user": o.user,
        "user_who_performed_action": o.user,
        "vhost": o.vhost,
        "host": e.local.ip().to_string(),
        "port": e.local.port(),
        "peer_host": e.peer.ip().to_string(),
        "peer_port": e.peer.port(),
        "ssl": e.tls,
        "ssl_protocol": null,
        "ssl_key_exchange": null,
        "ssl_cipher": null,
        "ssl_hash": null,
        "peer_cert_subject": null,
        "peer_cert_issuer": null,
        "peer_cert_validity": null,
        "channels": e.stats.channels.load(ld),
        "channel_max": o.channel_max,
        "frame_max": o.frame_max,
        "timeout": o.heartbeat,
        "connected_at": e.connected_at,
        "client_properties": o.client_properties,
        "user_provided_name": provided,
        "recv_oct": c.recv_oct,
        "recv_oct_details": {"rate": rates.recv_oct},
        "recv_cnt": e.stats.recv_cnt.load(ld),
        "send_oct": c.send_oct,
        "send_oct_details": {"rate": rates.send_oct},
        "send_cnt": e.stats.send_cnt.load(ld),
        "send_pend": 0,
    })
}

fn channel_name(e: &ConnEntry, number: u16) -> String {
    format!("{} ({number})", e.name)
}

fn channel_json(shared: &BrokerShared, e: &ConnEntry, c: &ChannelSnapshot) -> Value {
    let o = e.opened.lock().clone().unwrap_or_default();
    let stats = e.stats.channel_stats.get(c.number).and_then(|s| {
        super::grouped_message_stats(&s.counts(), &shared.sampler.channel_rates(e.id, c.number))
    });
    let mut v = json!({
        "name": channel_name(e, c.number),
        "number": c.number,
        "node": shared.config.node_name,
        "connection_details": {
            "name": e.name,
            "peer_host": e.peer.ip().to_string(),
            "peer_port": e.peer.port(),
        },
        "user": o.user,
        "user_who_performed_action": o.user,
        "vhost": o.vhost,
        "consumer_count": c.consumers.len(),
        "messages_unacknowledged": c.unacked,
        "messages_unconfirmed": c.unconfirmed,
        "messages_uncommitted": 0,
        "acks_uncommitted": 0,
        "pending_raft_commands": 0,
        "prefetch_count": c.prefetch,
        "global_prefetch_count": c.global_prefetch,
        "confirm": c.confirm,
        "transactional": c.transactional,
        "state": "running",
    });
    if let (Some(s), Value::Object(m)) = (stats, &mut v) {
        m.insert("message_stats".into(), s);
    }
    v
}

/// The consumers on the caller's visible connections, of one vhost or all; also a queue's
/// `consumer_details` (`queues`).
pub(super) async fn consumers(shared: &BrokerShared, r: &Req, vhost: Option<&str>) -> Value {
    let conns = visible_conns(shared, r);
    let mut out = Vec::new();
    for (e, chans) in crate::connection::registry::inspect(&conns).await {
        let o = e.opened.lock().clone().unwrap_or_default();
        if vhost.is_some_and(|v| v != o.vhost) {
            continue;
        }
        for c in &chans {
            for k in &c.consumers {
                out.push(json!({
                    "consumer_tag": k.tag,
                    "queue": {"name": k.queue, "vhost": o.vhost},
                    "channel_details": {
                        "name": channel_name(&e, c.number),
                        "number": c.number,
                        "connection_name": e.name,
                        "peer_host": e.peer.ip().to_string(),
                        "peer_port": e.peer.port(),
                        "user": o.user,
                        "node": shared.config.node_name,
                    },
                    "ack_required": !k.no_ack,
                    "exclusive": k.exclusive,
                    "prefetch_count": k.prefetch,
                    "arguments": {},
                    "active": true,
                    "activity_status": "up",
                }));
            }
        }
    }
    Value::Array(out)
}
