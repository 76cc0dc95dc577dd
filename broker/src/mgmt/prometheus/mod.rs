//! Prometheus text exposition with RabbitMQ's metric names (rabbitmq_prometheus), so that
//! RabbitMQ's Grafana dashboards work unchanged.
//!
//! # Endpoints
//! - `/metrics`: node aggregates: RabbitMQ's core families summed over objects, the global
//!   counters, the message size histogram, alarms, totals and identity.
//! - `/metrics/per-object`: the same, with the core families one series per queue, channel
//!   and connection.
//! - `/metrics/detailed?family=F&vhost=V&queue=RE`: only the core families named by `family`
//!   (repeatable; unknown names are ignored), one series per object, named
//!   `rabbitmq_detailed_*` (`rabbitmq_cluster_*` for the vhost and exchange families). `vhost`
//!   (repeatable) and `queue` (a regular expression on the name) narrow the queue families.
//!   Without `family`, only the identity is written, as in RabbitMQ.
//!
//! Every endpoint ends with `rabbitmq_identity_info`, whose `rabbitmq_endpoint` label names
//! the endpoint (`aggregated`, `per-object`, `detailed`): the dashboards pick one with it.
//!
//! Warren's own gauges start with `warren_`: message memory, and the cluster as this node sees
//! it.
//!
//! # Layout
//! - [`core`]: RabbitMQ's core families by family name.
//! - [`global`]: `rabbitmq_global_*` and `rabbitmq_message_size_bytes`.
//! - [`cluster`]: warren's cluster gauges.

mod cluster;
mod core;
mod global;

use super::{full, Resp};
use crate::connection::registry::ConnEntry;
use crate::queue::{QueueHandle, QueueInfo};
use crate::stats::{ChannelSnapshot, Counts, SizeCounts};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use std::collections::HashSet;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CTYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// RabbitMQ refuses longer `queue` expressions.
const MAX_QUEUE_FILTER_LEN: usize = 2000;

pub async fn handle(shared: &BrokerShared, req: Request<Incoming>) -> Resp {
    if req.method() != Method::GET {
        return full(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let query = req.uri().query().unwrap_or("");
    let view = match req.uri().path() {
        "/metrics" => View::Aggregated,
        "/metrics/per-object" => View::PerObject,
        "/metrics/detailed" => match Detailed::parse(shared, query) {
            Ok(d) => View::Detailed(d),
            Err(e) => return full(StatusCode::BAD_REQUEST, "text/plain", e),
        },
        _ => {
            return full(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics\n",
            )
        }
    };
    full(StatusCode::OK, CTYPE, render(shared, &view).await)
}

/// What an endpoint writes.
enum View {
    Aggregated,
    PerObject,
    Detailed(Detailed),
}

/// The query of `/metrics/detailed`.
struct Detailed {
    families: HashSet<String>,
    /// The vhosts asked for that exist; None: no `vhost` parameter (all vhosts).
    vhosts: Option<HashSet<String>>,
    queue: Option<regex::Regex>,
}

// === impl Detailed ===

impl Detailed {
    /// Reads the query as RabbitMQ does: `family` and `vhost` may repeat, `queue` may not.
    fn parse(shared: &BrokerShared, query: &str) -> Result<Self, String> {
        let mut families = HashSet::new();
        let mut vhosts: Option<HashSet<String>> = None;
        let mut queue: Option<String> = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = super::percent_decode(&v.replace('+', " "));
            match super::percent_decode(k).as_str() {
                "family" => {
                    families.insert(v);
                }
                "vhost" => {
                    let exists = shared.vhost(&v).is_some();
                    let set = vhosts.get_or_insert_with(HashSet::new);
                    if exists {
                        set.insert(v);
                    }
                }
                "queue" if queue.is_some() => {
                    return Err("Only one 'queue' query parameter is allowed".into())
                }
                "queue" => queue = Some(v),
                _ => {}
            }
        }
        let queue = match queue.filter(|q| !q.is_empty()) {
            None => None,
            Some(q) if q.len() > MAX_QUEUE_FILTER_LEN => {
                return Err("'queue' regex too long".into())
            }
            Some(q) => {
                Some(regex::Regex::new(&q).map_err(|e| format!("Invalid 'queue' regex: {e}"))?)
            }
        };
        Ok(Self {
            families,
            vhosts,
            queue,
        })
    }
}

/// How a family is written: the name prefix, aggregated or per object, which queues.
pub(super) struct Scope<'a> {
    prefix: &'static str,
    per_object: bool,
    vhosts: Option<&'a HashSet<String>>,
    queue: Option<&'a regex::Regex>,
}

impl Scope<'_> {
    fn wants_queue(&self, q: &QueueInfo) -> bool {
        self.vhosts.is_none_or(|v| v.contains(&*q.vhost))
            && self.queue.is_none_or(|re| re.is_match(&q.name))
    }
}

/// What one scrape reads, once.
pub(super) struct Scrape<'a> {
    shared: &'a BrokerShared,
    vhosts: Vec<Arc<Vhost>>,
    /// Ordered by vhost, then name.
    queues: Vec<QueueHandle>,
    /// Live connections, ordered by id.
    conns: Vec<Arc<ConnEntry>>,
    /// The channels of each connection that has some (empty unless asked for).
    channels: Vec<(Arc<ConnEntry>, Vec<ChannelSnapshot>)>,
    totals: Counts,
    sizes: SizeCounts,
    /// Open file descriptors and their limit.
    fds: (u64, u64),
    alarms: crate::alarm::AlarmState,
}

// === impl Scrape ===

impl<'a> Scrape<'a> {
    async fn take(shared: &'a BrokerShared, with_channels: bool) -> Scrape<'a> {
        let vhosts = shared.vhost_list();
        let mut queues: Vec<QueueHandle> = vhosts
            .iter()
            .flat_map(|v| v.snapshot().queues.values().cloned().collect::<Vec<_>>())
            .collect();
        queues.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        let conns = shared.registry.connections();
        let channels = if with_channels {
            crate::connection::registry::inspect(&conns).await
        } else {
            Vec::new()
        };
        Scrape {
            shared,
            vhosts,
            queues,
            conns,
            channels,
            totals: shared.sampler.totals(shared),
            sizes: crate::stats::node_msg_sizes(shared),
            fds: super::api::fds(),
            alarms: shared.node.alarms.state(),
        }
    }
}

/// Writes one metric family.
pub(super) struct Out(String);

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

/// The metrics text of an endpoint.
async fn render(shared: &BrokerShared, view: &View) -> String {
    let per_object = !matches!(view, View::Aggregated);
    let mut families: Vec<&core::Family> = core::FAMILIES
        .iter()
        .filter(|f| match view {
            View::Aggregated => !f.cluster,
            View::PerObject => !f.cluster && !f.aggregate_only,
            View::Detailed(d) => d.families.contains(f.name) && !f.aggregate_only,
        })
        .collect();
    // queue_consumer_count is the part of queue_metrics RabbitMQ offers alone: one of the two.
    if families.iter().any(|f| f.name == "queue_metrics") {
        families.retain(|f| f.name != "queue_consumer_count");
    }
    let detailed = match view {
        View::Detailed(d) => Some(d),
        _ => None,
    };
    // The global publishers and consumers need the channels at the two other endpoints.
    let with_channels = detailed.is_none() || families.iter().any(|f| f.channels);
    let d = Scrape::take(shared, with_channels).await;

    let mut o = Out(String::with_capacity(16384));
    for f in &families {
        let scope = Scope {
            prefix: match (detailed.is_some(), f.cluster) {
                (false, _) => "rabbitmq_",
                (true, false) => "rabbitmq_detailed_",
                (true, true) => "rabbitmq_cluster_",
            },
            per_object,
            vhosts: detailed.and_then(|d| d.vhosts.as_ref()),
            queue: detailed.and_then(|d| d.queue.as_ref()),
        };
        (f.write)(&mut o, &scope, &d);
    }
    let endpoint = match view {
        View::Aggregated => "aggregated",
        View::PerObject => "per-object",
        View::Detailed(_) => "detailed",
    };
    if detailed.is_none() {
        node(&mut o, &d);
        global::write(&mut o, &d);
    }
    identity(&mut o, shared, endpoint);
    o.0
}

/// Alarms, totals and warren's own gauges (`/metrics` and `/metrics/per-object`).
fn node(o: &mut Out, d: &Scrape) {
    let alarms = &d.alarms;
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
        "warren_message_memory_bytes",
        "gauge",
        "Memory held by message bodies and headers",
        "",
        d.shared.node.memory.used(),
    );
    let channels: u64 = d
        .conns
        .iter()
        .map(|e| u64::from(e.stats.channels.load(Ordering::Relaxed)))
        .sum();
    let consumers: u64 = d.queues.iter().map(|q| u64::from(q.consumer_count())).sum();
    o.one(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        "",
        d.conns.len(),
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
        d.queues.len(),
    );
    cluster::cluster_gauges(o, d.shared, d.queues.len() as u64);
}

/// Build and identity info; `endpoint` is the `rabbitmq_endpoint` label.
fn identity(o: &mut Out, shared: &BrokerShared, endpoint: &str) {
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
            "rabbitmq_node=\"{}\",rabbitmq_cluster=\"{}\",rabbitmq_endpoint=\"{endpoint}\"",
            esc(&shared.config.node_name),
            esc(&super::api::cluster_name(shared))
        ),
        1,
    );
}
