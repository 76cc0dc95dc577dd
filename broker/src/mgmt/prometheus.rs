//! Prometheus text exposition with RabbitMQ's metric names (rabbitmq_prometheus): node
//! aggregates at `/metrics`, per-queue series at `/metrics/per-object`. Warren's own gauges
//! start with `warren_`: message memory, and the cluster as this node sees it (members,
//! running, quorum, the queues it masters and mirrors; see `cluster_gauges`).

use super::{full, Resp};
use crate::BrokerShared;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use std::fmt::Write;
use std::sync::atomic::Ordering;

const CTYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn handle(shared: &BrokerShared, req: Request<Incoming>) -> Resp {
    if req.method() != Method::GET {
        return full(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => full(StatusCode::OK, CTYPE, render(shared, false)),
        "/metrics/per-object" => full(StatusCode::OK, CTYPE, render(shared, true)),
        _ => {
            let mut r = hyper::Response::new(Full::new(bytes::Bytes::from_static(
                b"not found; try /metrics\n",
            )));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// Writes one metric family.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}\n# HELP {name} {help}");
    }
    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &str, v: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, labels, v);
    }
}

/// Escapes a label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The cluster as this node sees it, and its share of the queues. Not clustered: a cluster of
/// one that masters every queue.
fn cluster_gauges(o: &mut Out, shared: &BrokerShared, local_queues: u64) {
    let me = &shared.config.node_name;
    let (members, quorum, copies) = match shared.cluster() {
        Some(link) => (
            link.members()
                .into_iter()
                .map(|m| (m.name, m.running))
                .collect::<Vec<_>>(),
            link.cluster.has_quorum(),
            crate::cluster::status::copies(link),
        ),
        None => (
            vec![(me.clone(), true)],
            true,
            crate::cluster::status::Copies {
                masters: local_queues,
                ..Default::default()
            },
        ),
    };
    o.one(
        "warren_cluster_members",
        "gauge",
        "Members of the cluster (witnesses included), this node's view",
        "",
        members.len(),
    );
    o.one(
        "warren_cluster_members_running",
        "gauge",
        "Members this node reaches within the failure-detection time (itself included)",
        "",
        members.iter().filter(|(_, up)| *up).count(),
    );
    o.family(
        "warren_cluster_member_running",
        "gauge",
        "1 if this node reaches the member within the failure-detection time",
    );
    let mut sorted = members.clone();
    sorted.sort();
    for (name, up) in &sorted {
        o.sample(
            "warren_cluster_member_running",
            &format!("member=\"{}\"", esc(name)),
            u8::from(*up),
        );
    }
    o.one(
        "warren_cluster_has_quorum",
        "gauge",
        "1 if this node reaches a majority of the cluster's voters",
        "",
        u8::from(quorum),
    );
    o.one(
        "warren_queue_masters",
        "gauge",
        "Queues whose master is this node",
        "",
        copies.masters,
    );
    o.one(
        "warren_queue_mirrors",
        "gauge",
        "Queues this node holds a mirror of",
        "",
        copies.mirrors,
    );
    o.one(
        "warren_queue_mirrors_synchronised",
        "gauge",
        "Queues this node holds an in-sync mirror of",
        "",
        copies.in_sync,
    );
}

/// The metrics text.
pub fn render(shared: &BrokerShared, per_object: bool) -> String {
    let mut o = Out(String::with_capacity(8192));
    let totals = shared.sampler.totals(shared);
    let conns = shared.registry.connections();
    let queues: Vec<_> = {
        let mut v: Vec<_> = shared
            .vhost_list()
            .iter()
            .flat_map(|v| v.snapshot().queues.values().cloned().collect::<Vec<_>>())
            .collect();
        v.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        v
    };
    let channels: u64 = conns
        .iter()
        .map(|e| u64::from(e.stats.channels.load(Ordering::Relaxed)))
        .sum();
    let consumers: u64 = queues.iter().map(|q| u64::from(q.consumer_count())).sum();

    let churn = &shared.node.stats.churn;
    for (name, help, c) in [
        (
            "rabbitmq_connections_opened_total",
            "Total number of connections opened",
            &churn.connection_created,
        ),
        (
            "rabbitmq_connections_closed_total",
            "Total number of connections closed or terminated",
            &churn.connection_closed,
        ),
        (
            "rabbitmq_channels_opened_total",
            "Total number of channels opened",
            &churn.channel_created,
        ),
        (
            "rabbitmq_channels_closed_total",
            "Total number of channels closed",
            &churn.channel_closed,
        ),
        (
            "rabbitmq_queues_declared_total",
            "Total number of queues declared",
            &churn.queue_declared,
        ),
        (
            "rabbitmq_queues_created_total",
            "Total number of queues created",
            &churn.queue_created,
        ),
        (
            "rabbitmq_queues_deleted_total",
            "Total number of queues deleted",
            &churn.queue_deleted,
        ),
    ] {
        o.one(name, "counter", help, "", c.load(Ordering::Relaxed));
    }
    let (fd_used, fd_max) = super::api::fds();
    o.one(
        "rabbitmq_process_resident_memory_bytes",
        "gauge",
        "Memory used in bytes",
        "",
        super::api::rss_bytes(),
    );
    o.one(
        "rabbitmq_process_open_fds",
        "gauge",
        "Open file descriptors",
        "",
        fd_used,
    );
    o.one(
        "rabbitmq_process_max_fds",
        "gauge",
        "Open file descriptors limit",
        "",
        fd_max,
    );
    o.one(
        "rabbitmq_erlang_uptime_seconds",
        "gauge",
        "Node uptime",
        "",
        format!("{:.3}", shared.started_at.elapsed().as_secs_f64()),
    );
    let alarms = shared.node.alarms.state();
    o.one(
        "rabbitmq_alarms_memory_used_watermark",
        "gauge",
        "is 1 if VM memory watermark alarm is in effect",
        "",
        u8::from(alarms.memory),
    );
    o.one(
        "rabbitmq_alarms_free_disk_space_watermark",
        "gauge",
        "is 1 if free disk space watermark alarm is in effect",
        "",
        u8::from(alarms.disk),
    );
    o.one(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        "",
        alarms.mem_limit,
    );
    if let Some(free) = alarms.disk_free {
        o.one(
            "rabbitmq_disk_space_available_bytes",
            "gauge",
            "Disk space available in bytes",
            "",
            free,
        );
    }
    o.one(
        "rabbitmq_disk_space_available_limit_bytes",
        "gauge",
        "Free disk space low watermark in bytes",
        "",
        alarms.disk_free_limit,
    );
    o.one(
        "warren_message_memory_bytes",
        "gauge",
        "Memory held by message bodies and headers",
        "",
        shared.node.memory.used(),
    );
    o.one(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        "",
        conns.len(),
    );
    o.one(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        "",
        channels,
    );
    o.one(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        "",
        consumers,
    );
    o.one(
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        "",
        queues.len(),
    );
    o.one(
        "rabbitmq_build_info",
        "untyped",
        "RabbitMQ and Erlang/OTP version info",
        &format!(
            "rabbitmq_version=\"{}\",product=\"warren\",product_version=\"{}\"",
            super::api::COMPAT_VERSION,
            env!("CARGO_PKG_VERSION")
        ),
        1,
    );
    o.one(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
        &format!(
            "rabbitmq_node=\"{}\",rabbitmq_cluster=\"{}\"",
            esc(&shared.config.node_name),
            esc(&super::api::cluster_name(shared))
        ),
        1,
    );
    cluster_gauges(&mut o, shared, queues.len() as u64);

    let proto = "protocol=\"amqp091\"";
    let classic = "protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"";
    let globals: [(&str, &str, &str, u64); 12] = [
        (
            "rabbitmq_global_messages_received_total",
            "Total number of messages received from publishers",
            proto,
            totals.publish,
        ),
        (
            "rabbitmq_global_messages_confirmed_total",
            "Total number of messages confirmed to publishers",
            proto,
            totals.confirm,
        ),
        (
            "rabbitmq_global_messages_routed_total",
            "Total number of messages routed to queues or streams",
            proto,
            totals
                .publish
                .saturating_sub(totals.drop_unroutable + totals.return_unroutable),
        ),
        (
            "rabbitmq_global_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            proto,
            totals.drop_unroutable,
        ),
        (
            "rabbitmq_global_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            proto,
            totals.return_unroutable,
        ),
        (
            "rabbitmq_global_messages_delivered_total",
            "Total number of messages delivered to consumers",
            classic,
            totals.deliver_get(),
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            classic,
            totals.deliver,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            classic,
            totals.deliver_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            classic,
            totals.get,
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack_total",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            classic,
            totals.get_no_ack,
        ),
        (
            "rabbitmq_global_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            classic,
            totals.redeliver,
        ),
        (
            "rabbitmq_global_messages_acknowledged_total",
            "Total number of messages acknowledged by consumers",
            classic,
            totals.ack,
        ),
    ];
    for (name, help, labels, v) in globals {
        o.one(name, "counter", help, labels, v);
    }

    // Queue metrics: summed at /metrics, one series per queue at /metrics/per-object.
    type Getter = fn(&crate::queue::QueueInfo) -> u64;
    let ready: Getter = |q| u64::from(q.message_count());
    let unacked: Getter = |q| q.stats.unacked.load(Ordering::Relaxed);
    let total: Getter = |q| u64::from(q.message_count()) + q.stats.unacked.load(Ordering::Relaxed);
    let bytes_ready: Getter = |q| q.stats.ready_bytes.load(Ordering::Relaxed);
    let published: Getter = |q| q.stats.publish.load(Ordering::Relaxed);
    let cons: Getter = |q| u64::from(q.consumer_count());
    let paged: Getter = |q| {
        let ready = u64::from(q.message_count());
        q.stats.paged_out.load(Ordering::Relaxed).min(ready)
    };
    let paged_bytes: Getter = |q| {
        let bytes = q.stats.ready_bytes.load(Ordering::Relaxed);
        q.stats.paged_out_bytes.load(Ordering::Relaxed).min(bytes)
    };
    let ram: Getter = |q| {
        let ready = u64::from(q.message_count());
        let paged = q.stats.paged_out.load(Ordering::Relaxed).min(ready);
        ready - paged + q.stats.unacked.load(Ordering::Relaxed)
    };
    let ram_bytes: Getter = |q| {
        let bytes = q.stats.ready_bytes.load(Ordering::Relaxed);
        bytes - q.stats.paged_out_bytes.load(Ordering::Relaxed).min(bytes)
    };
    let families: [(&str, &str, &str, Getter); 10] = [
        (
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers",
            ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged",
            unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages - total queue depth",
            total,
        ),
        (
            "rabbitmq_queue_messages_ready_bytes",
            "gauge",
            "Size in bytes of ready messages",
            bytes_ready,
        ),
        (
            "rabbitmq_queue_messages_paged_out",
            "gauge",
            "Messages paged out to disk",
            paged,
        ),
        (
            "rabbitmq_queue_messages_paged_out_bytes",
            "gauge",
            "Size in bytes of messages paged out to disk",
            paged_bytes,
        ),
        (
            "rabbitmq_queue_messages_ram",
            "gauge",
            "Ready and unacknowledged messages stored in memory",
            ram,
        ),
        (
            "rabbitmq_queue_messages_ram_bytes",
            "gauge",
            "Size in bytes of ready messages stored in memory",
            ram_bytes,
        ),
        (
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Total number of messages published to queues",
            published,
        ),
        (
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue",
            cons,
        ),
    ];
    for (name, kind, help, f) in families {
        o.family(name, kind, help);
        if per_object {
            for q in &queues {
                let labels = format!("vhost=\"{}\",queue=\"{}\"", esc(&q.vhost), esc(&q.name));
                o.sample(name, &labels, f(q));
            }
        } else {
            o.sample(name, "", queues.iter().map(|q| f(q)).sum::<u64>());
        }
    }
    o.0
}
