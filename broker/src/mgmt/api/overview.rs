//! The node as a whole:
//! - `GET /api/overview`
//! - `GET /api/cluster-name`
//! - `GET /api/whoami` (answered in the route table from the caller alone)
//! - `GET /api/health/checks/alarms`
//! - `GET|PUT /api/warren/app`: warren's stop_app / start_app switch.
//!
//! The aliveness test moves messages, so it lives in `messages`.

use super::{admin, details, message_stats, ok, COMPAT_VERSION, R};
use crate::mgmt::{json_resp, ApiError, Req};
use crate::queue::QueueHandle;
use crate::BrokerShared;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};

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

/// As RabbitMQ's default: the name of the node that formed the cluster (this node when alone).
pub fn cluster_name(shared: &BrokerShared) -> String {
    shared
        .cluster()
        .and_then(|c| {
            let st = c.state();
            let by = st
                .get(crate::cluster::link::SEEDED_KEY)?
                .value
                .get("by")?
                .as_str()?;
            Some(by.to_owned())
        })
        .unwrap_or_else(|| shared.config.node_name.clone())
}

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

pub(super) fn overview(shared: &BrokerShared) -> Value {
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
    let churn = &shared.node.stats.churn;
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

/// Open file descriptors and their limit (the soft limit; when it reads "unlimited", the
/// kernel's per-process ceiling `fs.nr_open`).
pub fn fds() -> (u64, u64) {
    let used = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let limit = proc_limit("Max open files")
        .or_else(|| read_number("/proc/sys/fs/nr_open"))
        .unwrap_or(1024);
    (used, limit)
}

/// A soft limit of this process from /proc/self/limits (None when unlimited or unknown).
fn proc_limit(name: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with(name))?
        .get(name.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Threads of this process and how many it may have: RabbitMQ's `proc_used` / `proc_total`
/// count Erlang processes against their limit; warren's units of execution that the system
/// limits are threads (tasks are not limited). The limit is `RLIMIT_NPROC`, or the kernel's
/// `threads-max` when that is unlimited.
fn threads() -> (u64, u64) {
    let used = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(1);
    let limit = proc_limit("Max processes")
        .or_else(|| read_number("/proc/sys/kernel/threads-max"))
        .unwrap_or(used)
        .max(1);
    (used, limit)
}

/// `GET /api/nodes/{node}/memory`: RabbitMQ's breakdown, as far as warren knows it. Message
/// bodies and headers held by queues are `queue_procs`; the rest of the resident set is
/// `other_proc`; the Erlang-only categories (atoms, code, ETS, ...) are 0.
pub(super) fn memory(shared: &BrokerShared) -> Value {
    let rss = rss_bytes();
    let messages = shared.node.alarms.state().mem_used.min(rss);
    let mut m = Map::new();
    for k in [
        "connection_readers",
        "connection_writers",
        "connection_channels",
        "connection_other",
        "queue_slave_procs",
        "quorum_queue_procs",
        "quorum_queue_dlx_procs",
        "stream_queue_procs",
        "stream_queue_replica_reader_procs",
        "stream_queue_coordinator_procs",
        "plugins",
        "metrics",
        "mgmt_db",
        "mnesia",
        "quorum_ets",
        "other_ets",
        "binary",
        "msg_index",
        "code",
        "atom",
        "other_system",
        "allocated_unused",
        "reserved_unallocated",
    ] {
        m.insert(k.into(), json!(0));
    }
    m.insert("queue_procs".into(), json!(messages));
    m.insert("other_proc".into(), json!(rss - messages));
    m.insert("strategy".into(), json!("rss"));
    m.insert(
        "total".into(),
        json!({"erlang": rss, "rss": rss, "allocated": rss}),
    );
    json!({ "memory": m })
}

pub(super) fn node(shared: &BrokerShared) -> Value {
    let (fd_used, fd_total) = fds();
    let (proc_used, proc_total) = threads();
    let sockets_total = match shared.config.max_connections {
        0 => fd_total,
        n => u64::from(n).min(fd_total),
    };
    let uptime = shared.started_at.elapsed().as_millis() as u64;
    let alarms = shared.node.alarms.state();
    json!({
        "name": shared.config.node_name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "uptime": uptime,
        "os_pid": std::process::id().to_string(),
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        // mem_used is the process's memory (resident set), as RabbitMQ's; the memory alarm
        // compares the bytes held by messages (mem_messages) with mem_limit.
        "mem_used": rss_bytes(),
        "mem_messages": alarms.mem_used,
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
        "sockets_total": sockets_total,
        "proc_used": proc_used,
        "proc_total": proc_total,
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

/// RabbitMQ's alarms health check: 200 without alarms, 503 listing them.
pub(super) fn health_alarms(shared: &BrokerShared) -> R {
    let a = shared.node.alarms.state();
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

/// GET|PUT /api/warren/app: whether the application runs; PUT `{"running": bool}` (admin).
pub(super) fn app(shared: &BrokerShared, r: &Req) -> R {
    match r.method {
        Method::GET => ok(json!({
            "running": shared.registry.running(),
            "paused_by_partition": shared.registry.paused(),
        })),
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
    }
}

/// stop_app / start_app: stopping closes every client connection with 320 and refuses new
/// ones until started again.
fn set_running(shared: &BrokerShared, running: bool) {
    shared.registry.set_running(running);
    if !running {
        shared
            .registry
            .close_all("broker forced connection closure with reason 'shutdown'");
        tracing::info!("application stopped (stop_app): AMQP connections refused");
    } else {
        tracing::info!("application started (start_app)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Counts, Rates};

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
