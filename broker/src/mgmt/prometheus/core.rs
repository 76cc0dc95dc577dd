//! RabbitMQ's core metric families (rabbitmq_prometheus's core collector), under the family
//! names that `/metrics/detailed?family=` takes. At `/metrics` a family is one node aggregate
//! per metric; at `/metrics/per-object` and `/metrics/detailed`, one series per queue, channel,
//! connection, vhost or exchange, labelled as RabbitMQ labels them.
//!
//! Only what warren counts is written: RabbitMQ's Erlang VM, Raft, I/O and authentication
//! figures have no counterpart here, and the families RabbitMQ keys by channel *and* exchange
//! or queue (`channel_exchange_metrics`, `channel_queue_metrics`) are written as node
//! aggregates only, since warren keeps those counters per queue and per connection.

use super::{esc, Out, Scope, Scrape};
use crate::queue::QueueInfo;
use crate::stats::ChannelSnapshot;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One family of RabbitMQ's core collector.
pub(super) struct Family {
    pub name: &'static str,
    /// Written at `/metrics` only (see the module doc).
    pub aggregate_only: bool,
    /// Reads the channels of every connection (asked of the connection tasks).
    pub channels: bool,
    /// One of RabbitMQ's cluster-wide families: at `/metrics/detailed` only, and named
    /// `rabbitmq_cluster_*` there.
    pub cluster: bool,
    pub write: fn(&mut Out, &Scope, &Scrape),
}

const fn family(name: &'static str, write: fn(&mut Out, &Scope, &Scrape)) -> Family {
    Family {
        name,
        aggregate_only: false,
        channels: false,
        cluster: false,
        write,
    }
}

/// The families in RabbitMQ's order.
pub(super) const FAMILIES: &[Family] = &[
    family("connection_churn_metrics", churn),
    family("node_coarse_metrics", node_coarse),
    family("node_metrics", node),
    family("queue_coarse_metrics", queue_coarse),
    family("queue_consumer_count", queue_consumer_count),
    family("queue_metrics", queue_metrics),
    Family {
        channels: true,
        ..family("channel_metrics", channel_metrics)
    },
    Family {
        aggregate_only: true,
        ..family("channel_exchange_metrics", channel_exchange)
    },
    Family {
        aggregate_only: true,
        ..family("channel_queue_metrics", channel_queue)
    },
    family("connection_coarse_metrics", connection_coarse),
    family("connection_metrics", connection_metrics),
    family("channel_queue_exchange_metrics", queue_published),
    family("queue_delivery_metrics", queue_delivery),
    Family {
        cluster: true,
        ..family("vhost_status", vhost_status)
    },
    Family {
        cluster: true,
        ..family("exchange_bindings", exchange_bindings)
    },
    Family {
        cluster: true,
        ..family("exchange_names", exchange_names)
    },
];

/// An unlabelled metric.
fn one(o: &mut Out, s: &Scope, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
    o.one(&format!("{}{name}", s.prefix), kind, help, "", v);
}

fn churn(o: &mut Out, s: &Scope, d: &Scrape) {
    let c = &d.shared.node.stats.churn;
    for (name, help, v) in [
        (
            "connections_opened_total",
            "Total number of connections opened",
            &c.connection_created,
        ),
        (
            "connections_closed_total",
            "Total number of connections closed or terminated",
            &c.connection_closed,
        ),
        (
            "channels_opened_total",
            "Total number of channels opened",
            &c.channel_created,
        ),
        (
            "channels_closed_total",
            "Total number of channels closed",
            &c.channel_closed,
        ),
        (
            "queues_declared_total",
            "Total number of queues declared",
            &c.queue_declared,
        ),
        (
            "queues_created_total",
            "Total number of queues created",
            &c.queue_created,
        ),
        (
            "queues_deleted_total",
            "Total number of queues deleted",
            &c.queue_deleted,
        ),
    ] {
        one(o, s, name, "counter", help, v.load(Ordering::Relaxed));
    }
}

fn node_coarse(o: &mut Out, s: &Scope, d: &Scrape) {
    one(
        o,
        s,
        "process_open_fds",
        "gauge",
        "Open file descriptors",
        d.fds.0,
    );
    // Each client connection holds one TCP socket, as RabbitMQ counts them (`sockets_used`
    // of the management API).
    one(
        o,
        s,
        "process_open_tcp_sockets",
        "gauge",
        "Open TCP sockets",
        d.conns.len(),
    );
    one(
        o,
        s,
        "process_resident_memory_bytes",
        "gauge",
        "Memory used in bytes",
        super::super::api::rss_bytes(),
    );
    if let Some(free) = d.alarms.disk_free {
        one(
            o,
            s,
            "disk_space_available_bytes",
            "gauge",
            "Disk space available in bytes",
            free,
        );
    }
}

fn node(o: &mut Out, s: &Scope, d: &Scrape) {
    one(
        o,
        s,
        "process_max_fds",
        "gauge",
        "Open file descriptors limit",
        d.fds.1,
    );
    // A client socket takes a file descriptor, and `max_connections` (when set) caps them:
    // the lower of the two, as the management API's `sockets_total`.
    let max_sockets = match d.shared.config.max_connections {
        0 => d.fds.1,
        n => u64::from(n).min(d.fds.1),
    };
    one(
        o,
        s,
        "process_max_tcp_sockets",
        "gauge",
        "Open TCP sockets limit",
        max_sockets,
    );
    one(
        o,
        s,
        "resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        d.alarms.mem_limit,
    );
    one(
        o,
        s,
        "disk_space_available_limit_bytes",
        "gauge",
        "Free disk space low watermark in bytes",
        d.alarms.disk_free_limit,
    );
    one(
        o,
        s,
        "erlang_uptime_seconds",
        "gauge",
        "Node uptime",
        format!("{:.3}", d.shared.started_at.elapsed().as_secs_f64()),
    );
}

// --- queues ---

type QueueGetter = fn(&QueueInfo) -> u64;

/// Writes queue metrics: summed, or one series per queue the scope selects.
fn queues(o: &mut Out, s: &Scope, d: &Scrape, metrics: &[(&str, &str, &str, QueueGetter)]) {
    let selected: Vec<&QueueInfo> = d
        .queues
        .iter()
        .map(|q| &**q)
        .filter(|q| s.wants_queue(q))
        .collect();
    for &(name, kind, help, f) in metrics {
        let name = format!("{}{name}", s.prefix);
        o.family(&name, kind, help);
        if s.per_object {
            for q in &selected {
                let labels = format!("vhost=\"{}\",queue=\"{}\"", esc(&q.vhost), esc(&q.name));
                o.sample(&name, &labels, f(q));
            }
        } else {
            o.sample(&name, "", selected.iter().map(|q| f(q)).sum::<u64>());
        }
    }
}

fn ready(q: &QueueInfo) -> u64 {
    u64::from(q.message_count())
}

fn unacked(q: &QueueInfo) -> u64 {
    q.stats.unacked.load(Ordering::Relaxed)
}

/// Ready messages paged out to disk (never more than are ready).
fn paged(q: &QueueInfo) -> u64 {
    q.stats.paged_out.load(Ordering::Relaxed).min(ready(q))
}

fn ready_bytes(q: &QueueInfo) -> u64 {
    q.stats.ready_bytes.load(Ordering::Relaxed)
}

fn paged_bytes(q: &QueueInfo) -> u64 {
    q.stats
        .paged_out_bytes
        .load(Ordering::Relaxed)
        .min(ready_bytes(q))
}

fn queue_coarse(o: &mut Out, s: &Scope, d: &Scrape) {
    queues(
        o,
        s,
        d,
        &[
            (
                "queue_messages_ready",
                "gauge",
                "Messages ready to be delivered to consumers",
                ready,
            ),
            (
                "queue_messages_unacked",
                "gauge",
                "Messages delivered to consumers but not yet acknowledged",
                unacked,
            ),
            (
                "queue_messages",
                "gauge",
                "Sum of ready and unacknowledged messages - total queue depth",
                |q| ready(q) + unacked(q),
            ),
        ],
    );
}

const QUEUE_CONSUMERS: (&str, &str, &str, QueueGetter) =
    ("queue_consumers", "gauge", "Consumers on a queue", |q| {
        u64::from(q.consumer_count())
    });

fn queue_consumer_count(o: &mut Out, s: &Scope, d: &Scrape) {
    queues(o, s, d, &[QUEUE_CONSUMERS]);
}

fn queue_metrics(o: &mut Out, s: &Scope, d: &Scrape) {
    queues(
        o,
        s,
        d,
        &[
            QUEUE_CONSUMERS,
            (
                "queue_messages_ram",
                "gauge",
                "Ready and unacknowledged messages stored in memory",
                |q| ready(q) - paged(q) + unacked(q),
            ),
            (
                "queue_messages_ram_bytes",
                "gauge",
                "Size in bytes of ready messages stored in memory",
                |q| ready_bytes(q) - paged_bytes(q),
            ),
            (
                "queue_messages_ready_ram",
                "gauge",
                "Ready messages stored in memory",
                |q| ready(q) - paged(q),
            ),
            (
                "queue_messages_ready_bytes",
                "gauge",
                "Size in bytes of ready messages",
                ready_bytes,
            ),
            (
                "queue_messages_paged_out",
                "gauge",
                "Messages paged out to disk",
                paged,
            ),
            (
                "queue_messages_paged_out_bytes",
                "gauge",
                "Size in bytes of messages paged out to disk",
                paged_bytes,
            ),
        ],
    );
}

/// Warren counts publishes per queue, not per channel and exchange as well: the series carry
/// the queue's labels only.
fn queue_published(o: &mut Out, s: &Scope, d: &Scrape) {
    queues(
        o,
        s,
        d,
        &[(
            "queue_messages_published_total",
            "counter",
            "Total number of messages published to queues",
            |q| q.stats.publish.load(Ordering::Relaxed),
        )],
    );
}

fn queue_delivery(o: &mut Out, s: &Scope, d: &Scrape) {
    queues(
        o,
        s,
        d,
        &[
            (
                "queue_get_ack_total",
                "counter",
                "Total number of messages fetched from a queue with basic.get in manual acknowledgement mode",
                |q| q.stats.get.load(Ordering::Relaxed),
            ),
            (
                "queue_get_total",
                "counter",
                "Total number of messages fetched from a queue with basic.get in automatic acknowledgement mode",
                |q| q.stats.get_no_ack.load(Ordering::Relaxed),
            ),
            (
                "queue_messages_delivered_ack_total",
                "counter",
                "Total number of messages delivered from a queue to consumers in manual acknowledgement mode",
                |q| q.stats.deliver.load(Ordering::Relaxed),
            ),
            (
                "queue_messages_delivered_total",
                "counter",
                "Total number of messages delivered from a queue to consumers in automatic acknowledgement mode",
                |q| q.stats.deliver_no_ack.load(Ordering::Relaxed),
            ),
            (
                "queue_messages_redelivered_total",
                "counter",
                "Total number of messages redelivered from a queue to consumers",
                |q| q.stats.redeliver.load(Ordering::Relaxed),
            ),
            (
                "queue_messages_acked_total",
                "counter",
                "Total number of messages acknowledged by consumers on a queue",
                |q| q.stats.ack.load(Ordering::Relaxed),
            ),
            (
                "queue_get_empty_total",
                "counter",
                "Total number of times basic.get operations fetched no message on a queue",
                |q| q.stats.get_empty.load(Ordering::Relaxed),
            ),
        ],
    );
}

// --- channels and connections ---

type ChannelGetter = fn(&ChannelSnapshot) -> u64;

fn channel_metrics(o: &mut Out, s: &Scope, d: &Scrape) {
    let metrics: [(&str, &str, ChannelGetter); 5] = [
        ("channel_consumers", "Consumers on a channel", |c| {
            c.consumers.len() as u64
        }),
        (
            "channel_messages_unacked",
            "Delivered but not yet acknowledged messages",
            |c| c.unacked as u64,
        ),
        (
            "channel_messages_unconfirmed",
            "Published but not yet confirmed messages",
            |c| c.unconfirmed as u64,
        ),
        (
            "consumer_prefetch",
            "Limit of unacknowledged messages for each consumer",
            |c| u64::from(c.prefetch),
        ),
        (
            "channel_prefetch",
            "Total limit of unacknowledged messages for all consumers on a channel",
            |c| u64::from(c.global_prefetch),
        ),
    ];
    for (name, help, f) in metrics {
        let name = format!("{}{name}", s.prefix);
        o.family(&name, "gauge", help);
        let all = d
            .channels
            .iter()
            .flat_map(|(e, chans)| chans.iter().map(move |c| (e, c)));
        if s.per_object {
            for (e, c) in all {
                // The channel's name in the management API.
                let labels = format!("channel=\"{}\"", esc(&format!("{} ({})", e.name, c.number)));
                o.sample(&name, &labels, f(c));
            }
        } else {
            o.sample(&name, "", all.map(|(_, c)| f(c)).sum::<u64>());
        }
    }
}

fn channel_exchange(o: &mut Out, s: &Scope, d: &Scrape) {
    let t = &d.totals;
    for (name, help, v) in [
        (
            "channel_messages_published_total",
            "Total number of messages published into an exchange on a channel",
            t.publish,
        ),
        (
            "channel_messages_confirmed_total",
            "Total number of messages published into an exchange and confirmed on the channel",
            t.confirm,
        ),
        (
            "channel_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            t.return_unroutable,
        ),
        (
            "channel_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            t.drop_unroutable,
        ),
    ] {
        one(o, s, name, "counter", help, v);
    }
}

fn channel_queue(o: &mut Out, s: &Scope, d: &Scrape) {
    let t = &d.totals;
    for (name, help, v) in [
        (
            "channel_get_ack_total",
            "Total number of messages fetched with basic.get in manual acknowledgement mode",
            t.get,
        ),
        (
            "channel_get_total",
            "Total number of messages fetched with basic.get in automatic acknowledgement mode",
            t.get_no_ack,
        ),
        (
            "channel_messages_delivered_ack_total",
            "Total number of messages delivered to consumers in manual acknowledgement mode",
            t.deliver,
        ),
        (
            "channel_messages_delivered_total",
            "Total number of messages delivered to consumers in automatic acknowledgement mode",
            t.deliver_no_ack,
        ),
        (
            "channel_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            t.redeliver,
        ),
        (
            "channel_messages_acked_total",
            "Total number of messages acknowledged by consumers",
            t.ack,
        ),
        (
            "channel_get_empty_total",
            "Total number of times basic.get operations fetched no message",
            t.get_empty,
        ),
    ] {
        one(o, s, name, "counter", help, v);
    }
}

type ConnGetter = fn(&crate::stats::ConnStats) -> u64;

/// Writes connection metrics: summed over live connections (as RabbitMQ sums its table of
/// live connections), or one series per connection. RabbitMQ labels these with `channel`
/// (the connection's process id); warren puts the connection's name there.
fn connections(o: &mut Out, s: &Scope, d: &Scrape, metrics: &[(&str, &str, &str, ConnGetter)]) {
    for &(name, kind, help, f) in metrics {
        let name = format!("{}{name}", s.prefix);
        o.family(&name, kind, help);
        if s.per_object {
            for e in &d.conns {
                o.sample(&name, &format!("channel=\"{}\"", esc(&e.name)), f(&e.stats));
            }
        } else {
            o.sample(&name, "", d.conns.iter().map(|e| f(&e.stats)).sum::<u64>());
        }
    }
}

fn connection_coarse(o: &mut Out, s: &Scope, d: &Scrape) {
    connections(
        o,
        s,
        d,
        &[
            (
                "connection_incoming_bytes_total",
                "counter",
                "Total number of bytes received on a connection",
                |c| c.recv_oct.load(Ordering::Relaxed),
            ),
            (
                "connection_outgoing_bytes_total",
                "counter",
                "Total number of bytes sent on a connection",
                |c| c.send_oct.load(Ordering::Relaxed),
            ),
        ],
    );
}

fn connection_metrics(o: &mut Out, s: &Scope, d: &Scrape) {
    connections(
        o,
        s,
        d,
        &[
            (
                "connection_incoming_packets_total",
                "counter",
                "Total number of packets received on a connection",
                |c| c.recv_cnt.load(Ordering::Relaxed),
            ),
            (
                "connection_outgoing_packets_total",
                "counter",
                "Total number of packets sent on a connection",
                |c| c.send_cnt.load(Ordering::Relaxed),
            ),
            (
                "connection_channels",
                "gauge",
                "Channels on a connection",
                |c| u64::from(c.channels.load(Ordering::Relaxed)),
            ),
        ],
    );
}

// --- cluster-wide: vhosts and exchanges ---

fn vhost_status(o: &mut Out, s: &Scope, d: &Scrape) {
    let name = format!("{}vhost_status", s.prefix);
    o.family(&name, "gauge", "Whether a given vhost is running");
    // A vhost that exists runs: warren has no per-vhost supervisor to fail.
    for v in &d.vhosts {
        o.sample(&name, &format!("vhost=\"{}\"", esc(&v.name)), 1);
    }
}

/// Exchanges as RabbitMQ enumerates them: the default and internal ones left out.
fn exchanges(d: &Scrape) -> Vec<(String, Arc<crate::exchange::Exchange>)> {
    let mut out = Vec::new();
    for v in &d.vhosts {
        let mut xs: Vec<_> = v
            .snapshot()
            .exchanges
            .values()
            .filter(|x| !x.internal && !x.name.is_empty())
            .cloned()
            .collect();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(xs.into_iter().map(|x| (v.name.to_string(), x)));
    }
    out
}

fn exchange_labels(vhost: &str, x: &crate::exchange::Exchange) -> String {
    format!(
        "vhost=\"{}\",exchange=\"{}\",type=\"{}\"",
        esc(vhost),
        esc(&x.name),
        x.kind.as_str()
    )
}

fn exchange_bindings(o: &mut Out, s: &Scope, d: &Scrape) {
    let name = format!("{}exchange_bindings", s.prefix);
    o.family(
        &name,
        "gauge",
        "Number of bindings for an exchange. This value is cluster-wide.",
    );
    for (vhost, x) in exchanges(d) {
        o.sample(&name, &exchange_labels(&vhost, &x), x.bindings().len());
    }
}

fn exchange_names(o: &mut Out, s: &Scope, d: &Scrape) {
    let name = format!("{}exchange_name", s.prefix);
    o.family(
        &name,
        "gauge",
        "Enumerates exchanges without any additional info. This value is cluster-wide. A cheaper alternative to `exchange_bindings`",
    );
    for (vhost, x) in exchanges(d) {
        o.sample(&name, &exchange_labels(&vhost, &x), 1);
    }
}
