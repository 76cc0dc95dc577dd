//! The `/api` endpoints. JSON field names follow RabbitMQ 3.10's management plugin for what
//! clients read.

use super::json as conv;
use super::{created, json_resp, no_content, ApiError, Req, Resp};
use crate::exchange::{Binding, Destination, ExchangeKind};
use crate::policy::PolicyKind;
use crate::queue::{QueueArgs, QueueCmd, QueueHandle};
use crate::stats::{ChannelSnapshot, ConnEntry, Counts, Rates};
use crate::vhost::{QueueSpec, Vhost};
use crate::BrokerShared;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// The RabbitMQ release whose management API shapes this one follows.
pub const COMPAT_VERSION: &str = "3.10.8";

type R = Result<Resp, ApiError>;

fn ok(v: Value) -> R {
    Ok(json_resp(StatusCode::OK, &v))
}

/// Dispatches one authenticated request.
pub async fn route(shared: &Arc<BrokerShared>, r: &Req) -> R {
    let segs: Vec<&str> = r.segs.iter().map(String::as_str).collect();
    let m = &r.method;
    let get = m == Method::GET;
    match segs.as_slice() {
        ["overview"] if get => ok(overview(shared)),
        ["cluster-name"] if get => ok(json!({"name": cluster_name(shared)})),
        ["nodes"] if get => ok(json!([node(shared)])),
        ["nodes", name] if get => {
            if *name == shared.config.node_name {
                ok(node(shared))
            } else {
                Err(ApiError::NotFound)
            }
        }
        ["whoami"] if get => ok(json!({"name": r.caller.name, "tags": r.caller.tags})),
        ["connections"] if get => ok(Value::Array(
            visible_conns(shared, r)
                .iter()
                .map(|e| connection(shared, e))
                .collect(),
        )),
        ["connections", name] => {
            let e = visible_conns(shared, r)
                .into_iter()
                .find(|e| e.name == *name)
                .ok_or(ApiError::NotFound)?;
            match *m {
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
        ["connections", name, "channels"] if get => {
            let conns: Vec<_> = visible_conns(shared, r)
                .into_iter()
                .filter(|e| e.name == *name)
                .collect();
            if conns.is_empty() {
                return Err(ApiError::NotFound);
            }
            ok(Value::Array(
                inspect(&conns)
                    .await
                    .iter()
                    .flat_map(|(e, chans)| chans.iter().map(|c| channel(shared, e, c)))
                    .collect(),
            ))
        }
        ["channels"] if get => {
            let conns = visible_conns(shared, r);
            ok(Value::Array(
                inspect(&conns)
                    .await
                    .iter()
                    .flat_map(|(e, chans)| chans.iter().map(|c| channel(shared, e, c)))
                    .collect(),
            ))
        }
        ["channels", name] if get => {
            let conns = visible_conns(shared, r);
            inspect(&conns)
                .await
                .iter()
                .flat_map(|(e, chans)| chans.iter().map(|c| channel(shared, e, c)))
                .find(|c| c["name"] == *name)
                .map_or(Err(ApiError::NotFound), ok)
        }
        ["consumers"] if get => ok(consumers(shared, r, None).await),
        ["consumers", vh] if get => {
            let v = vhost(shared, r, vh)?;
            ok(consumers(shared, r, Some(&v.name)).await)
        }
        ["exchanges"] if get => ok(Value::Array(
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| exchanges(v))
                .collect(),
        )),
        ["exchanges", vh] if get => ok(Value::Array(exchanges(&*vhost(shared, r, vh)?))),
        ["exchanges", vh, name] => exchange_ep(shared, r, vh, name).await,
        ["exchanges", vh, name, "publish"] if m == Method::POST => {
            publish(shared, r, vh, name).await
        }
        ["exchanges", vh, name, "bindings", dir @ ("source" | "destination")] if get => {
            let v = vhost(shared, r, vh)?;
            let name = exchange_url_name(name);
            if v.exchange(name).is_none() {
                return Err(ApiError::NotFound);
            }
            ok(Value::Array(
                bindings(&v)
                    .into_iter()
                    .filter(|b| {
                        if *dir == "source" {
                            b["source"] == name
                        } else {
                            b["destination"] == name && b["destination_type"] == "exchange"
                        }
                    })
                    .collect(),
            ))
        }
        ["queues"] if get => ok(Value::Array(
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| queues(shared, v))
                .collect(),
        )),
        ["queues", vh] if get => ok(Value::Array(queues(shared, &*vhost(shared, r, vh)?))),
        ["queues", vh, name] => queue_ep(shared, r, vh, name).await,
        ["queues", vh, name, "get"] if m == Method::POST => get_messages(shared, r, vh, name).await,
        ["queues", vh, name, "contents"] if m == Method::DELETE => {
            let v = vhost(shared, r, vh)?;
            check_perm(shared, r, &v, Perm::Read, name)?;
            let q = v.queue(name).ok_or(ApiError::NotFound)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            if q.send(QueueCmd::Purge { reply: tx }).await {
                let _ = rx.await;
            }
            Ok(no_content())
        }
        ["queues", vh, name, "bindings"] if get => {
            let v = vhost(shared, r, vh)?;
            if v.queue(name).is_none() {
                return Err(ApiError::NotFound);
            }
            ok(Value::Array(
                bindings(&v)
                    .into_iter()
                    .filter(|b| b["destination"] == *name && b["destination_type"] == "queue")
                    .collect(),
            ))
        }
        ["bindings"] if get => ok(Value::Array(
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| bindings(v))
                .collect(),
        )),
        ["bindings", vh] if get => ok(Value::Array(bindings(&*vhost(shared, r, vh)?))),
        ["bindings", vh, "e", src, kind @ ("q" | "e"), dst] => {
            binding_pair(shared, r, vh, src, kind, dst).await
        }
        ["bindings", vh, "e", src, kind @ ("q" | "e"), dst, props] => {
            binding_one(shared, r, vh, src, kind, dst, props).await
        }
        ["vhosts"] if get => ok(Value::Array(
            visible_vhosts(shared, r)
                .iter()
                .map(|v| vhost_json(shared, v))
                .collect(),
        )),
        ["vhosts", vh] if get => ok(vhost_json(shared, &*vhost(shared, r, vh)?)),
        ["users"] if get => {
            admin(r)?;
            ok(Value::Array(
                shared.auth.users().iter().map(user_json).collect(),
            ))
        }
        ["users", name] if get => {
            admin(r)?;
            shared
                .auth
                .user(name)
                .map_or(Err(ApiError::NotFound), |u| ok(user_json(&u)))
        }
        ["permissions"] if get => {
            admin(r)?;
            ok(permission_list(shared, |_, _| true))
        }
        ["vhosts", vh, "permissions"] if get => {
            admin(r)?;
            let v = vhost(shared, r, vh)?;
            ok(permission_list(shared, |_, pv| pv == &*v.name))
        }
        ["users", name, "permissions"] if get => {
            admin(r)?;
            if shared.auth.user(name).is_none() {
                return Err(ApiError::NotFound);
            }
            ok(permission_list(shared, |u, _| u == *name))
        }
        ["vhosts", name] => vhost_ep(shared, r, name).await,
        ["users", name] => user_ep(shared, r, name),
        ["permissions", vh, user] => permission_ep(shared, r, vh, user),
        ["policies"] if get => policy_list(shared, r, PolicyKind::User, None),
        ["policies", vh] if get => policy_list(shared, r, PolicyKind::User, Some(vh)),
        ["policies", vh, name] => policy_ep(shared, r, PolicyKind::User, vh, name),
        ["operator-policies"] if get => policy_list(shared, r, PolicyKind::Operator, None),
        ["operator-policies", vh] if get => policy_list(shared, r, PolicyKind::Operator, Some(vh)),
        ["operator-policies", vh, name] => policy_ep(shared, r, PolicyKind::Operator, vh, name),
        ["definitions"] => match r.method {
            Method::GET => {
                admin(r)?;
                let d = shared.export_definitions(crate::definitions::ExportScope::All);
                ok(serde_json::to_value(&d).map_err(|e| ApiError::bad(e.to_string()))?)
            }
            Method::POST => {
                admin(r)?;
                let d = crate::definitions::parse_definitions(&r.body).map_err(def_err)?;
                shared.import_definitions(&d).map_err(def_err)?;
                Ok(no_content())
            }
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["health", "checks", "alarms"] if get => health_alarms(shared),
        ["health", "checks", "node-is-quorum-critical"] if get => {
            ok(json!({"status": "ok", "reason": "single node cluster"}))
        }
        ["aliveness-test", vh] if get => aliveness(shared, r, vh).await,
        ["warren", "app"] => match *m {
            Method::GET => ok(json!({"running": shared.registry.running()})),
            Method::PUT => {
                admin(r)?;
                let body = r.json()?;
                let running = body
                    .get("running")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| ApiError::bad("'running' must be a boolean"))?;
                set_running(shared, running);
                ok(json!({"running": running}))
            }
            _ => Err(ApiError::MethodNotAllowed),
        },
        _ => Err(ApiError::NotFound),
    }
}

/// stop_app / start_app: stopping closes every client connection with 320 and refuses new
/// ones until started again.
pub fn set_running(shared: &BrokerShared, running: bool) {
    shared.registry.set_running(running);
    if !running {
        for e in shared.registry.connections() {
            let _ = e.events.send(crate::queue::ClientEvent::Close(
                crate::error::ConnectionError::forced(
                    "broker forced connection closure with reason 'shutdown'",
                ),
            ));
        }
        tracing::info!("application stopped (stop_app): AMQP connections refused");
    } else {
        tracing::info!("application started (start_app)");
    }
}

fn forbidden() -> ApiError {
    ApiError::Forbidden("Not administrator user".into())
}

fn admin(r: &Req) -> Result<(), ApiError> {
    if r.caller.is_admin() {
        Ok(())
    } else {
        Err(forbidden())
    }
}

fn owns(r: &Req, e: &ConnEntry) -> bool {
    e.opened
        .lock()
        .as_ref()
        .is_some_and(|o| o.user == r.caller.name)
}

fn cluster_name(shared: &BrokerShared) -> String {
    shared.config.node_name.clone()
}

/// May the caller see this vhost's objects?
fn can_see(shared: &BrokerShared, r: &Req, vhost: &str) -> bool {
    r.caller.is_monitor() || shared.auth.permissions(&r.caller.name, vhost).is_some()
}

fn visible_vhosts(shared: &BrokerShared, r: &Req) -> Vec<Arc<Vhost>> {
    shared
        .vhost_list()
        .into_iter()
        .filter(|v| can_see(shared, r, &v.name))
        .collect()
}

/// A vhost the caller may see, or 404.
fn vhost(shared: &BrokerShared, r: &Req, name: &str) -> Result<Arc<Vhost>, ApiError> {
    let v = shared.vhost(name).ok_or(ApiError::NotFound)?;
    if !can_see(shared, r, name) {
        return Err(ApiError::Forbidden(format!(
            "access to vhost '{name}' refused for user '{}'",
            r.caller.name
        )));
    }
    Ok(v)
}

#[derive(Clone, Copy)]
enum Perm {
    Configure,
    Write,
    Read,
}

/// Object permissions for changes through the API (administrators included, as RabbitMQ).
fn check_perm(
    shared: &BrokerShared,
    r: &Req,
    v: &Vhost,
    perm: Perm,
    name: &str,
) -> Result<(), ApiError> {
    let Some(p) = shared.auth.permissions(&r.caller.name, &v.name) else {
        return Err(ApiError::Forbidden(format!(
            "access to vhost '{}' refused for user '{}'",
            v.name, r.caller.name
        )));
    };
    let (pat, what) = match perm {
        Perm::Configure => (&p.configure, "configure"),
        Perm::Write => (&p.write, "write"),
        Perm::Read => (&p.read, "read"),
    };
    if pat.allows(name) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "{what} access to '{name}' in vhost '{}' refused for user '{}'",
            v.name, r.caller.name
        )))
    }
}

fn visible_conns(shared: &BrokerShared, r: &Req) -> Vec<Arc<ConnEntry>> {
    shared
        .registry
        .connections()
        .into_iter()
        .filter(|e| r.caller.is_monitor() || owns(r, e))
        .collect()
}

// === message stats ===

fn details(m: &mut Map<String, Value>, k: &str, count: u64, rate: f64) {
    m.insert(k.into(), json!(count));
    m.insert(format!("{k}_details"), json!({ "rate": rate }));
}

/// RabbitMQ's message_stats object for the given keys.
fn message_stats(c: &Counts, r: &Rates, keys: &[&str]) -> Value {
    let mut m = Map::new();
    for k in keys {
        let (n, rate) = match *k {
            "publish" => (c.publish, r.publish),
            "confirm" => (c.confirm, r.confirm),
            "deliver" => (c.deliver, r.deliver),
            "deliver_no_ack" => (c.deliver_no_ack, r.deliver_no_ack),
            "get" => (c.get, r.get),
            "get_no_ack" => (c.get_no_ack, r.get_no_ack),
            "get_empty" => (c.get_empty, r.get_empty),
            "deliver_get" => (c.deliver_get(), r.deliver_get),
            "ack" => (c.ack, r.ack),
            "redeliver" => (c.redeliver, r.redeliver),
            "return_unroutable" => (c.return_unroutable, r.return_unroutable),
            "drop_unroutable" => (c.drop_unroutable, r.drop_unroutable),
            _ => (0, 0.0),
        };
        details(&mut m, k, n, rate);
    }
    Value::Object(m)
}

const NODE_KEYS: &[&str] = &[
    "ack",
    "confirm",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "disk_reads",
    "disk_writes",
    "drop_unroutable",
    "get",
    "get_empty",
    "get_no_ack",
    "publish",
    "redeliver",
    "return_unroutable",
];

const QUEUE_KEYS: &[&str] = &[
    "ack",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "get",
    "get_empty",
    "get_no_ack",
    "publish",
    "redeliver",
];

fn exchange_types() -> Value {
    json!(["direct", "fanout", "headers", "topic"]
        .iter()
        .map(|t| json!({
            "name": t,
            "description": format!("AMQP {t} exchange, as per the AMQP specification"),
            "enabled": true
        }))
        .collect::<Vec<_>>())
}

fn all_queues(shared: &BrokerShared) -> Vec<QueueHandle> {
    shared
        .vhost_list()
        .iter()
        .flat_map(|v| v.snapshot().queues.values().cloned().collect::<Vec<_>>())
        .collect()
}

fn overview(shared: &BrokerShared) -> Value {
    let totals = shared.sampler.totals(shared);
    let rates = shared.sampler.node_rates();
    let qs = all_queues(shared);
    let ready: u64 = qs.iter().map(|q| u64::from(q.message_count())).sum();
    let unacked: u64 = qs
        .iter()
        .map(|q| q.stats.unacked.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let consumers: u64 = qs.iter().map(|q| u64::from(q.consumer_count())).sum();
    let conns = shared.registry.connections();
    let channels: u64 = conns
        .iter()
        .map(|e| u64::from(e.stats.channels.load(std::sync::atomic::Ordering::Relaxed)))
        .sum();
    let exchanges: usize = shared
        .vhost_list()
        .iter()
        .map(|v| v.snapshot().exchanges.len() + 1)
        .sum();
    let churn = &crate::stats::CHURN;
    let mut churn_rates = Map::new();
    for (k, c) in [
        ("channel_closed", &churn.channel_closed),
        ("channel_created", &churn.channel_created),
        ("connection_closed", &churn.connection_closed),
        ("connection_created", &churn.connection_created),
        ("queue_created", &churn.queue_created),
        ("queue_declared", &churn.queue_declared),
        ("queue_deleted", &churn.queue_deleted),
    ] {
        details(
            &mut churn_rates,
            k,
            c.load(std::sync::atomic::Ordering::Relaxed),
            0.0,
        );
    }
    let mut qt = Map::new();
    details(&mut qt, "messages", ready + unacked, 0.0);
    details(&mut qt, "messages_ready", ready, 0.0);
    details(&mut qt, "messages_unacknowledged", unacked, 0.0);
    let node = &shared.config.node_name;
    json!({
        "management_version": COMPAT_VERSION,
        "rates_mode": "basic",
        "sample_retention_policies": {"global": [600, 3600, 28800, 86400], "basic": [600, 3600], "detailed": [600]},
        "exchange_types": exchange_types(),
        // `server-identity`, as in connection.start; rabbitmq_version is the RabbitMQ release
        // whose behaviour warren follows, under either identity.
        "product_version": shared.config.server_identity.version(),
        "product_name": shared.config.server_identity.product(),
        "rabbitmq_version": COMPAT_VERSION,
        "cluster_name": cluster_name(shared),
        "disable_stats": false,
        "enable_queue_totals": false,
        "message_stats": message_stats(&totals, &rates, NODE_KEYS),
        "churn_rates": churn_rates,
        "queue_totals": qt,
        "object_totals": {
            "channels": channels,
            "connections": conns.len(),
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": qs.len(),
        },
        "statistics_db_event_queue": 0,
        "node": node,
        "listeners": shared.listeners.iter().map(|(p, a)| json!({
            "node": node,
            "protocol": p,
            "ip_address": a.ip().to_string(),
            "port": a.port(),
            "socket_opts": {},
        })).collect::<Vec<_>>(),
        "contexts": [],
    })
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Open file descriptors and their limit.
pub fn fds() -> (u64, u64) {
    let used = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (used, limit)
}

fn node(shared: &BrokerShared) -> Value {
    let (fd_used, fd_total) = fds();
    let uptime = shared.started_at.elapsed().as_millis() as u64;
    let alarms = crate::alarm::state();
    json!({
        "name": shared.config.node_name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "uptime": uptime,
        "os_pid": std::process::id().to_string(),
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        // mem_used is what the memory alarm compares with mem_limit (message memory);
        // mem_rss is the process's resident set.
        "mem_used": alarms.mem_used,
        "mem_used_details": {"rate": 0.0},
        "mem_rss": rss_bytes(),
        "mem_limit": alarms.mem_limit,
        "mem_alarm": alarms.memory,
        "mem_calculation_strategy": "allocated",
        "disk_free_alarm": alarms.disk,
        "disk_free": alarms.disk_free.unwrap_or(0),
        "disk_free_details": {"rate": 0.0},
        "disk_free_limit": alarms.disk_free_limit,
        "fd_used": fd_used,
        "fd_total": fd_total,
        "sockets_used": shared.registry.connections().len(),
        "sockets_total": fd_total,
        "proc_used": 0,
        "proc_total": 0,
        "run_queue": 0,
        "rates_mode": "basic",
        "net_ticktime": 60,
        "partitions": [],
        "cluster_links": [],
        "applications": [],
        "enabled_plugins": ["rabbitmq_management", "rabbitmq_prometheus"],
        "exchange_types": exchange_types(),
        "auth_mechanisms": [
            {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
        ],
        "contexts": [],
        "log_files": [],
        "config_files": [],
        "db_dir": shared.config.data_dir.display().to_string(),
    })
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
        "state": if opened.is_some() { "running" } else { "starting" },
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

/// Asks each connection for its channels (concurrently, bounded in time).
async fn inspect(conns: &[Arc<ConnEntry>]) -> Vec<(Arc<ConnEntry>, Vec<ChannelSnapshot>)> {
    let mut waiting = Vec::new();
    for e in conns {
        if e.stats.channels.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if e.events
            .send(crate::queue::ClientEvent::Inspect(tx))
            .is_ok()
        {
            waiting.push((e.clone(), rx));
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    for (e, rx) in waiting {
        if let Ok(Ok(chans)) = tokio::time::timeout_at(deadline, rx).await {
            out.push((e, chans));
        }
    }
    out
}

fn channel_name(e: &ConnEntry, number: u16) -> String {
    format!("{} ({number})", e.name)
}

fn channel(shared: &BrokerShared, e: &ConnEntry, c: &ChannelSnapshot) -> Value {
    let o = e.opened.lock().clone().unwrap_or_default();
    json!({
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
    })
}

async fn consumers(shared: &BrokerShared, r: &Req, vhost: Option<&str>) -> Value {
    let conns = visible_conns(shared, r);
    let mut out = Vec::new();
    for (e, chans) in inspect(&conns).await {
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

fn vhost_json(shared: &BrokerShared, v: &Vhost) -> Value {
    let qs: Vec<_> = v.snapshot().queues.values().cloned().collect();
    let ready: u64 = qs.iter().map(|q| u64::from(q.message_count())).sum();
    let unacked: u64 = qs
        .iter()
        .map(|q| q.stats.unacked.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let mut m = Map::new();
    m.insert("name".into(), json!(&*v.name));
    m.insert("description".into(), json!(""));
    m.insert("tags".into(), json!([]));
    m.insert("metadata".into(), json!({"description": "", "tags": []}));
    m.insert("tracing".into(), json!(false));
    m.insert("default_queue_type".into(), json!("classic"));
    m.insert(
        "cluster_state".into(),
        json!({ shared.config.node_name.clone(): "running" }),
    );
    details(&mut m, "messages", ready + unacked, 0.0);
    details(&mut m, "messages_ready", ready, 0.0);
    details(&mut m, "messages_unacknowledged", unacked, 0.0);
    Value::Object(m)
}

fn user_json(u: &crate::auth::User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password.hash,
        "hashing_algorithm": u.password.algorithm.as_str(),
        "tags": u.tags,
        "limits": {},
    })
}

fn def_err(e: crate::definitions::DefError) -> ApiError {
    match e {
        crate::definitions::DefError::NotFound(_) => ApiError::NotFound,
        crate::definitions::DefError::Invalid(m) => ApiError::BadRequest(m),
        crate::definitions::DefError::Io(m) => ApiError::Internal(m),
    }
}

/// Tags as RabbitMQ accepts them: a list or a comma-separated string.
fn tags_of(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("tags must be strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad("'tags' must be a string or a list")),
    }
}

async fn vhost_ep(shared: &BrokerShared, r: &Req, name: &str) -> R {
    match r.method {
        Method::PUT => {
            admin(r)?;
            let body = r.json()?;
            let description = optional_str(&body, "description")?;
            let tags = tags_of(body.get("tags"))?;
            let is_new = shared
                .add_vhost(name, crate::auth::VhostMeta { description, tags })
                .map_err(def_err)?;
            Ok(if is_new { created() } else { no_content() })
        }
        Method::DELETE => {
            admin(r)?;
            shared.delete_vhost(name).await.map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn user_ep(shared: &BrokerShared, r: &Req, name: &str) -> R {
    admin(r)?;
    match r.method {
        Method::PUT => {
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            let tags = tags_of(body.get("tags"))?;
            let cred = match (body.get("password"), body.get("password_hash")) {
                (Some(Value::String(p)), _) => Some(crate::auth::PasswordHash::new(p)),
                (Some(_), _) => return Err(ApiError::bad("'password' must be a string")),
                (None, Some(Value::String(h))) => {
                    let alg = match body.get("hashing_algorithm").and_then(Value::as_str) {
                        None => crate::auth::HashAlgorithm::default(),
                        Some(a) => crate::auth::HashAlgorithm::parse(a).ok_or_else(|| {
                            ApiError::bad(format!("unsupported hashing_algorithm '{a}'"))
                        })?,
                    };
                    if h.is_empty() {
                        None
                    } else {
                        Some(
                            crate::auth::PasswordHash::from_stored(alg, h)
                                .map_err(ApiError::BadRequest)?,
                        )
                    }
                }
                (None, Some(_)) => return Err(ApiError::bad("'password_hash' must be a string")),
                (None, None) => {
                    if shared.auth.user(name).is_none() {
                        return Err(ApiError::bad(
                            "Must specify either password or password_hash",
                        ));
                    }
                    None
                }
            };
            let is_new = shared.put_user(name, cred, tags).map_err(def_err)?;
            Ok(if is_new { created() } else { no_content() })
        }
        Method::DELETE => {
            shared.delete_user(name).map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn permission_ep(shared: &BrokerShared, r: &Req, vh: &str, user: &str) -> R {
    admin(r)?;
    match r.method {
        Method::GET => shared
            .auth
            .permissions(user, vh)
            .map_or(Err(ApiError::NotFound), |p| ok(perm_json(user, vh, &p))),
        Method::PUT => {
            let body = r.json()?;
            let field = |k: &str| required_str(&body, k);
            let spec = crate::auth::PermissionSpec {
                configure: field("configure")?,
                write: field("write")?,
                read: field("read")?,
            };
            let existed = shared.auth.permissions(user, vh).is_some();
            shared.set_permissions(user, vh, spec).map_err(def_err)?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            shared.clear_permissions(user, vh).map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn policy_json(p: &crate::policy::Policy) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to.as_str(),
        "definition": p.definition,
        "priority": p.priority,
    })
}

/// GET /api/policies[/{vhost}] and /api/operator-policies[/{vhost}].
fn policy_list(shared: &BrokerShared, r: &Req, kind: PolicyKind, vh: Option<&str>) -> R {
    let only = match vh {
        Some(vh) => Some(vhost(shared, r, vh)?.name.to_string()),
        None => None,
    };
    ok(Value::Array(
        shared
            .policies
            .list_kind(kind, only.as_deref())
            .iter()
            .filter(|p| can_see(shared, r, &p.vhost))
            .map(policy_json)
            .collect(),
    ))
}

fn policy_ep(shared: &BrokerShared, r: &Req, kind: PolicyKind, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    // Operator policies are for administrators only, as in RabbitMQ.
    let may_change = match kind {
        PolicyKind::User => r.caller.is_admin() || r.caller.has("policymaker"),
        PolicyKind::Operator => r.caller.is_admin(),
    };
    match r.method {
        Method::GET => shared
            .policies
            .get_kind(kind, &v.name, name)
            .map_or(Err(ApiError::NotFound), |p| ok(policy_json(&p))),
        Method::PUT => {
            if !may_change {
                return Err(forbidden());
            }
            let body = r.json()?;
            let pattern = required_str(&body, "pattern")?;
            let definition = match body.get("definition") {
                Some(Value::Object(m)) => m.clone(),
                None => return Err(ApiError::bad("Missing key: definition")),
                Some(_) => return Err(ApiError::bad("'definition' must be an object")),
            };
            let priority = match body.get("priority") {
                None | Some(Value::Null) => 0,
                Some(p) => p
                    .as_i64()
                    .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| ApiError::bad("'priority' must be an integer"))?,
            };
            let apply_to = match body.get("apply-to").and_then(Value::as_str) {
                None => crate::policy::ApplyTo::All,
                Some(a) => crate::policy::ApplyTo::parse(a)
                    .ok_or_else(|| ApiError::bad(format!("invalid apply-to '{a}'")))?,
            };
            let existed = shared.policies.get_kind(kind, &v.name, name).is_some();
            shared
                .set_policy_kind(
                    kind,
                    crate::policy::Policy {
                        vhost: v.name.to_string(),
                        name: name.to_owned(),
                        pattern,
                        apply_to,
                        priority,
                        definition,
                    },
                )
                .map_err(def_err)?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            if !may_change {
                return Err(forbidden());
            }
            shared
                .clear_policy_kind(kind, &v.name, name)
                .map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// A string field of a request body that must be there (400 naming the key otherwise).
fn required_str(body: &Value, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(ApiError::bad(format!("Missing key: {key}"))),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a string"))),
    }
}

/// A string field of a request body that may be absent or null (empty then).
fn optional_str(body: &Value, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a string"))),
    }
}

/// Permission entries `(user, vhost)` accepted by `keep`, as RabbitMQ lists them.
fn permission_list(shared: &BrokerShared, keep: impl Fn(&str, &str) -> bool) -> Value {
    Value::Array(
        shared
            .auth
            .permission_entries()
            .into_iter()
            .filter(|(u, v, _)| keep(u, v))
            .map(|(u, v, p)| perm_json(&u, &v, &p))
            .collect(),
    )
}

fn perm_json(user: &str, vhost: &str, p: &crate::auth::Permissions) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "configure": p.configure.as_str(),
        "write": p.write.as_str(),
        "read": p.read.as_str(),
    })
}

// === exchanges ===

/// "amq.default" in a URL names the default exchange.
fn exchange_url_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

fn exchange_json(vhost: &str, e: &crate::exchange::Exchange) -> Value {
    let mut v = json!({
        "name": &*e.name,
        "vhost": vhost,
        "type": e.kind.as_str(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": conv::table(&e.arguments),
        "user_who_performed_action": "rmq-internal",
    });
    // Present only when a policy applies, as in RabbitMQ.
    if let (Some(p), Value::Object(m)) = (&e.policy, &mut v) {
        m.insert("policy".into(), json!(p.name));
    }
    v
}

fn default_exchange_json(vhost: &str) -> Value {
    json!({
        "name": "",
        "vhost": vhost,
        "type": "direct",
        "durable": true,
        "auto_delete": false,
        "internal": false,
        "arguments": {},
        "user_who_performed_action": "rmq-internal",
    })
}

fn exchanges(v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut names: Vec<_> = topo.exchanges.keys().cloned().collect();
    names.sort();
    let mut out = vec![default_exchange_json(&v.name)];
    for n in names {
        if let Some(e) = topo.exchanges.get(&n) {
            if !e.name.is_empty() {
                out.push(exchange_json(&v.name, e));
            }
        }
    }
    out
}

fn body_bool(body: &Value, k: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(ApiError::bad(format!("'{k}' must be a boolean"))),
    }
}

fn body_arguments(body: &Value) -> Result<amq_protocol::types::FieldTable, ApiError> {
    conv::input_table(body.get("arguments").unwrap_or(&Value::Null), "arguments")
        .map_err(ApiError::bad)
}

async fn exchange_ep(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    let name = exchange_url_name(name);
    match r.method {
        Method::GET => {
            if name.is_empty() {
                return ok(default_exchange_json(&v.name));
            }
            let e = v.exchange(name).ok_or(ApiError::NotFound)?;
            ok(exchange_json(&v.name, &e))
        }
        Method::PUT => {
            let body = r.json()?;
            if name.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            let t = required_str(&body, "type")?;
            let kind = ExchangeKind::parse(&t)
                .ok_or_else(|| ApiError::bad(format!("invalid exchange type '{t}'")))?;
            if name.starts_with("amq.") && v.exchange(name).is_none() {
                return Err(ApiError::Forbidden(format!(
                    "exchange name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            let durable = body_bool(&body, "durable", true)?;
            let auto_delete = body_bool(&body, "auto_delete", false)?;
            let internal = body_bool(&body, "internal", false)?;
            let args = body_arguments(&body)?;
            let existed = v.exchange(name).is_some();
            v.declare_exchange(name, kind, durable, auto_delete, internal, args)?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            if name.is_empty() || name.starts_with("amq.") {
                return Err(ApiError::Forbidden(format!(
                    "operation not permitted on exchange '{name}'"
                )));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            if v.exchange(name).is_none() {
                return Err(ApiError::NotFound);
            }
            v.delete_exchange(name, r.query_flag("if-unused"))?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn publish(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
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
    let msg = crate::queue::Message::new(exchange.into(), rk.into(), props, body)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let mut targets = Vec::new();
    v.route(
        exchange,
        rk,
        msg.properties.headers().as_ref(),
        &mut targets,
    );
    let msg = Arc::new(msg);
    let mut routed = false;
    for q in targets {
        routed |= q
            .send(QueueCmd::Publish {
                msg: msg.clone(),
                confirm: None,
            })
            .await;
    }
    Ok(routed)
}

// === queues ===

fn queue_json(shared: &BrokerShared, q: &crate::queue::QueueInfo) -> Value {
    let ld = std::sync::atomic::Ordering::Relaxed;
    let ready = u64::from(q.message_count());
    let unacked = q.stats.unacked.load(ld);
    let bytes = q.stats.ready_bytes.load(ld);
    let paged = q.stats.paged_out.load(ld).min(ready);
    let paged_bytes = q.stats.paged_out_bytes.load(ld).min(bytes);
    let rates = shared.sampler.queue_rates(&q.vhost, &q.name);
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    put("name", json!(&*q.name));
    put("vhost", json!(&*q.vhost));
    put("durable", json!(q.durable));
    put("auto_delete", json!(q.auto_delete));
    put("exclusive", json!(q.exclusive_owner.is_some()));
    put("arguments", conv::table(&q.arguments));
    put("node", json!(shared.config.node_name));
    put("type", json!("classic"));
    put("state", json!("running"));
    let policy = q.policy();
    put("policy", json!(policy.applied.policy_name()));
    put(
        "operator_policy",
        json!(policy.applied.operator_policy_name()),
    );
    put(
        "effective_policy_definition",
        Value::Object(policy.applied.definition.clone()),
    );
    put("exclusive_consumer_tag", Value::Null);
    put("single_active_consumer_tag", Value::Null);
    put("consumers", json!(q.consumer_count()));
    put("message_bytes", json!(bytes));
    put("message_bytes_ready", json!(bytes));
    put("message_bytes_unacknowledged", json!(0));
    put("message_bytes_ram", json!(bytes - paged_bytes));
    put("message_bytes_persistent", json!(0));
    put("message_bytes_paged_out", json!(paged_bytes));
    put("messages_ram", json!(ready - paged + unacked));
    put("messages_ready_ram", json!(ready - paged));
    put("messages_unacknowledged_ram", json!(unacked));
    put("messages_persistent", json!(0));
    put("messages_paged_out", json!(paged));
    put("memory", json!(bytes));
    put("head_message_timestamp", Value::Null);
    put(
        "message_stats",
        message_stats(&q.stats.counts(), &rates, QUEUE_KEYS),
    );
    details(&mut m, "messages", ready + unacked, 0.0);
    details(&mut m, "messages_ready", ready, 0.0);
    details(&mut m, "messages_unacknowledged", unacked, 0.0);
    Value::Object(m)
}

fn queues(shared: &BrokerShared, v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut qs: Vec<_> = topo.queues.values().cloned().collect();
    qs.sort_by(|a, b| a.name.cmp(&b.name));
    qs.iter().map(|q| queue_json(shared, q)).collect()
}

async fn queue_ep(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    match r.method {
        Method::GET => {
            let q = v.queue(name).ok_or(ApiError::NotFound)?;
            let mut j = queue_json(shared, &q);
            let cons = consumers(shared, r, Some(&v.name)).await;
            if let (Some(obj), Value::Array(all)) = (j.as_object_mut(), cons) {
                let mine: Vec<_> = all
                    .into_iter()
                    .filter(|c| c["queue"]["name"] == *name)
                    .collect();
                obj.insert("consumer_details".into(), Value::Array(mine));
                obj.insert("deliveries".into(), json!([]));
                obj.insert("incoming".into(), json!([]));
            }
            ok(j)
        }
        Method::PUT => {
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            if name.is_empty() || name.len() > 255 {
                return Err(ApiError::bad("queue name must be 1 to 255 bytes"));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            if name.starts_with("amq.") && v.queue(name).is_none() {
                return Err(ApiError::Forbidden(format!(
                    "queue name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            let durable = body_bool(&body, "durable", true)?;
            let auto_delete = body_bool(&body, "auto_delete", false)?;
            let arguments = body_arguments(&body)?;
            let args = QueueArgs::parse(&arguments, name, &v.name)?;
            let (_, created_now) = v.declare_queue(QueueSpec {
                name: name.to_owned(),
                durable,
                exclusive_owner: None,
                auto_delete,
                arguments,
                args,
            })?;
            Ok(if created_now { created() } else { no_content() })
        }
        Method::DELETE => {
            check_perm(shared, r, &v, Perm::Configure, name)?;
            let q = v.queue(name).ok_or(ApiError::NotFound)?;
            v.delete_queue(&q, r.query_flag("if-unused"), r.query_flag("if-empty"))
                .await?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn get_messages(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !q
            .send(QueueCmd::Get {
                no_ack: false,
                reply: tx,
            })
            .await
        {
            break;
        }
        let Some(g) = rx.await.ok().flatten() else {
            break;
        };
        ids.push(g.msg_id);
        let full = &g.msg.body[..];
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
            "exchange": g.msg.exchange.as_str(),
            "routing_key": g.msg.routing_key.as_str(),
            "message_count": g.remaining,
            "properties": conv::properties(&g.msg.properties),
            "payload": payload,
            "payload_encoding": enc,
        }));
    }
    if !ids.is_empty() {
        let cmd = if ack {
            QueueCmd::Ack { ids }
        } else {
            QueueCmd::Reject { ids, requeue }
        };
        q.send(cmd).await;
    }
    ok(Value::Array(out))
}

// === bindings ===

/// RabbitMQ's properties key: the routing key, URL-quoted, plus "~" and a hash of the
/// arguments when there are any.
pub fn properties_key(rk: &str, args: &Value) -> String {
    let mut k = String::new();
    for b in rk.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            k.push(b as char);
        } else {
            k.push_str(&format!("%{b:02X}"));
        }
    }
    if args.as_object().is_some_and(|m| !m.is_empty()) {
        // FNV-1a of the canonical JSON text: stable across calls and restarts.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in args.to_string().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        k.push('~');
        k.push_str(&conv::b64_encode(&h.to_be_bytes()).replace(['+', '/', '='], ""));
    }
    if k.is_empty() {
        k.push('~');
    }
    k
}

fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (dest, kind) = match &b.destination {
        Destination::Queue(q) => (q, "queue"),
        Destination::Exchange(e) => (e, "exchange"),
    };
    let args = conv::table(&b.arguments);
    json!({
        "source": source,
        "vhost": vhost,
        "destination": &**dest,
        "destination_type": kind,
        "routing_key": b.routing_key,
        "arguments": args,
        "properties_key": properties_key(&b.routing_key, &args),
    })
}

fn bindings(v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut qn: Vec<_> = topo.queues.keys().cloned().collect();
    qn.sort();
    let mut out: Vec<Value> = qn
        .iter()
        .map(|q| {
            json!({
                "source": "",
                "vhost": &*v.name,
                "destination": &**q,
                "destination_type": "queue",
                "routing_key": &**q,
                "arguments": {},
                "properties_key": properties_key(q, &json!({})),
            })
        })
        .collect();
    let mut en: Vec<_> = topo.exchanges.keys().cloned().collect();
    en.sort();
    for n in en {
        if let Some(e) = topo.exchanges.get(&n) {
            for b in e.bindings() {
                out.push(binding_json(&v.name, &e.name, b));
            }
        }
    }
    out
}

fn destination(kind: &str, name: &str) -> Destination {
    if kind == "q" {
        Destination::Queue(name.into())
    } else {
        Destination::Exchange(name.into())
    }
}

/// Both ends must exist (404 otherwise).
fn binding_ends(v: &Vhost, src: &str, kind: &str, dst: &str) -> Result<(), ApiError> {
    let src_ok = src.is_empty() || v.exchange(src).is_some();
    let dst_ok = if kind == "q" {
        v.queue(dst).is_some()
    } else {
        v.exchange(dst).is_some()
    };
    if src_ok && dst_ok {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}

fn pair_bindings(v: &Vhost, src: &str, kind: &str, dst: &str) -> Vec<Value> {
    let want = if kind == "q" { "queue" } else { "exchange" };
    bindings(v)
        .into_iter()
        .filter(|b| b["source"] == src && b["destination"] == dst && b["destination_type"] == want)
        .collect()
}

async fn binding_pair(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    src: &str,
    kind: &str,
    dst: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    let src = exchange_url_name(src);
    binding_ends(&v, src, kind, dst)?;
    match r.method {
        Method::GET => ok(Value::Array(pair_bindings(&v, src, kind, dst))),
        Method::POST => {
            if src.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            let rk = optional_str(&body, "routing_key")?;
            let args = body_arguments(&body)?;
            check_perm(shared, r, &v, Perm::Write, dst)?;
            check_perm(shared, r, &v, Perm::Read, src)?;
            let key = properties_key(&rk, &conv::table(&args));
            v.bind(src, destination(kind, dst), &rk, args)?;
            let mut resp = created();
            let loc = format!(
                "/api/bindings/{}/e/{}/{kind}/{}/{}",
                quote(&v.name),
                quote(src),
                quote(dst),
                quote(&key)
            );
            if let Ok(h) = hyper::header::HeaderValue::from_str(&loc) {
                resp.headers_mut().insert(hyper::header::LOCATION, h);
            }
            Ok(resp)
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn quote(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

async fn binding_one(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    src: &str,
    kind: &str,
    dst: &str,
    props: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    let src = exchange_url_name(src);
    binding_ends(&v, src, kind, dst)?;
    let b = pair_bindings(&v, src, kind, dst)
        .into_iter()
        .find(|b| {
            // The key as listed (clients quote it once more in the URL, as for RabbitMQ),
            // or the key's own unquoted form.
            b["properties_key"]
                .as_str()
                .is_some_and(|k| k == props || super::percent_decode(k) == props)
        })
        .ok_or(ApiError::NotFound)?;
    match r.method {
        Method::GET => ok(b),
        Method::DELETE => {
            if src.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            check_perm(shared, r, &v, Perm::Write, dst)?;
            check_perm(shared, r, &v, Perm::Read, src)?;
            let rk = b["routing_key"].as_str().unwrap_or("").to_owned();
            let args = conv::to_table(&b["arguments"]).unwrap_or_default();
            v.unbind(src, destination(kind, dst), &rk, args)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

// === health ===

/// RabbitMQ's alarms health check: 200 without alarms, 503 listing them.
fn health_alarms(shared: &BrokerShared) -> R {
    let a = crate::alarm::state();
    if !a.memory && !a.disk {
        return ok(json!({"status": "ok"}));
    }
    let node = &shared.config.node_name;
    let mut list = Vec::new();
    if a.memory {
        list.push(json!({"node": node, "resource": "memory"}));
    }
    if a.disk {
        list.push(json!({"node": node, "resource": "disk"}));
    }
    Ok(json_resp(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "status": "failed",
            "reason": "resource alarm(s) in effect in the cluster",
            "alarms": list,
        }),
    ))
}

async fn aliveness(shared: &BrokerShared, r: &Req, vh: &str) -> R {
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
    let (tx, rx) = tokio::sync::oneshot::channel();
    q.send(QueueCmd::Get {
        no_ack: true,
        reply: tx,
    })
    .await;
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Some(g))) if g.msg.body == body => ok(json!({"status": "ok"})),
        _ => Err(ApiError::Unavailable("aliveness test failed".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_keys_like_rabbitmq() {
        assert_eq!(properties_key("a.#", &json!({})), "a.%23");
        assert_eq!(properties_key("", &json!({})), "~");
        let k = properties_key("k", &json!({"x-match": "all"}));
        assert!(k.starts_with("k~") && k.len() > 3, "{k}");
        assert_eq!(k, properties_key("k", &json!({"x-match": "all"})));
        assert_ne!(k, properties_key("k", &json!({"x-match": "any"})));
    }

    #[test]
    fn message_stats_has_counts_and_rates() {
        let c = Counts {
            publish: 3,
            get: 1,
            deliver: 2,
            ..Counts::default()
        };
        let r = Rates {
            publish: 1.5,
            ..Rates::default()
        };
        let v = message_stats(&c, &r, NODE_KEYS);
        assert_eq!(v["publish"], 3);
        assert_eq!(v["publish_details"]["rate"], 1.5);
        assert_eq!(v["deliver_get"], 3);
        assert_eq!(v["disk_reads"], 0);
    }
}
