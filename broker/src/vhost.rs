//! Virtual hosts: the registry of exchanges and queues and the routing snapshot.
//!
//! Publishes read an immutable [`Topology`] through `ArcSwap` (no lock on the hot path);
//! declarations and bindings take a short mutex, copy the topology, change it and swap it in.

use crate::error::ChannelError;
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::node::Node;
use crate::policy::{Applied, PolicyStore};
use crate::queue::actor::QueueActor;
use crate::queue::{ClientTx, QueueArgs, QueueHandle, QueueInfo};
use crate::store::{Store, TransientLog};
use amq_protocol::types::FieldTable;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use tokio_util::sync::CancellationToken;

impl crate::queue::QueueHost for Vhost {
    fn route_message(&self, msg: &crate::queue::Message, out: &mut Vec<QueueHandle>) {
        self.route(msg, out);
    }

    fn remove_queue(&self, q: &QueueHandle) {
        Vhost::remove_queue(self, q);
    }
}

/// Immutable routing snapshot.
#[derive(Debug, Default, Clone)]
pub struct Topology {
    pub exchanges: HashMap<Arc<str>, Arc<Exchange>>,
    pub queues: HashMap<Arc<str>, QueueHandle>,
}

impl Topology {
    /// Both ends of a binding exist (404 otherwise).
    fn check_binding(
        &self,
        source: &str,
        destination: &Destination,
        vhost: &str,
    ) -> Result<(), ChannelError> {
        match destination {
            Destination::Queue(q) if !self.queues.contains_key(q) => Err(no_queue(q, vhost)),
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                Err(no_exchange(e, vhost))
            }
            _ if !self.exchanges.contains_key(source) => Err(no_exchange(source, vhost)),
            _ => Ok(()),
        }
    }

    /// For bind and unbind: both ends must exist (404 otherwise); returns a copy of the source
    /// exchange to change and put back (the topology is copy-on-write).
    fn binding_source(
        &self,
        source: &str,
        destination: &Destination,
        vhost: &str,
    ) -> Result<Exchange, ChannelError> {
        match destination {
            Destination::Queue(q) if !self.queues.contains_key(q) => {
                return Err(no_queue(q, vhost))
            }
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                return Err(no_exchange(e, vhost))
            }
            _ => {}
        }
        self.exchanges
            .get(source)
            .map(|ex| Exchange::clone(ex))
            .ok_or_else(|| no_exchange(source, vhost))
    }
}

/// A direct reply-to consumer.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    pub events: ClientTx,
    pub channel: u16,
    pub generation: u64,
    pub consumer_tag: Arc<str>,
}

/// Parameters of queue.declare after validation.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub exclusive_owner: Option<u64>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub args: QueueArgs,
}

/// One virtual host.
#[derive(Debug)]
pub struct Vhost {
    pub name: Arc<str>,
    topology: ArcSwap<Topology>,
    write: Mutex<()>,
    reply_to: Mutex<HashMap<String, ReplyTarget>>,
    /// Message store for durable queues (None: everything stays in memory).
    store: Option<Arc<Store>>,
    /// The node the vhost's queues run on (paging, node totals).
    node: Arc<Node>,
    me: Weak<Vhost>,
    /// Called after a change that may touch durable definitions (persists them).
    durable_hook: OnceLock<DurableHook>,
    /// Called when a queue leaves the vhost (clustered: the cluster is told).
    queue_hook: OnceLock<QueueHook>,
    /// Wraps the log of each new non-exclusive queue (clustered: mirroring).
    log_hook: OnceLock<LogHook>,
    /// Cancelled when the vhost is deleted: its connections close.
    deleted: CancellationToken,
    /// The node's policies (none in a vhost made without a broker, as in unit tests).
    policies: OnceLock<Arc<PolicyStore>>,
    /// RabbitMQ's vhost limits (`max-connections`, `max-queues`; a negative value is no
    /// limit), kept with the definitions (`BrokerShared::set_vhost_limits`).
    limits: Mutex<std::collections::BTreeMap<String, i64>>,
    /// What the vhost's closed channels counted (its `message_stats` keep them, as
    /// RabbitMQ's).
    stats_gone: Mutex<crate::stats::Counts>,
}

/// See [`Vhost::set_durable_hook`].
pub struct DurableHook(Box<dyn Fn() + Send + Sync>);

/// See [`Vhost::set_queue_hook`].
pub struct QueueHook(Box<dyn Fn(&QueueHandle) + Send + Sync>);

/// A queue's log and the store events its actor reads, as a [`LogHook`] takes and returns them.
pub type LogParts = (
    Box<dyn crate::store::QueueLog>,
    Option<tokio::sync::mpsc::UnboundedReceiver<crate::store::StoreEvent>>,
);

/// Wraps a queue's log (see [`Vhost::set_log_hook`]).
pub type LogWrap = Box<dyn Fn(&QueueHandle, LogParts) -> LogParts + Send + Sync>;

/// See [`Vhost::set_log_hook`].
pub struct LogHook(LogWrap);

impl std::fmt::Debug for LogHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogHook")
    }
}

impl std::fmt::Debug for QueueHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueHook")
    }
}

impl std::fmt::Debug for DurableHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DurableHook")
    }
}

/// The exchanges every vhost has, as RabbitMQ predeclares them (all durable; the firehose
/// tracing exchange `amq.rabbitmq.trace` is internal: nothing but the broker publishes to it).
pub(crate) const DEFAULT_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    (TRACE_EXCHANGE, ExchangeKind::Topic),
];

/// RabbitMQ's firehose exchange (warren declares it but publishes nothing to it).
const TRACE_EXCHANGE: &str = "amq.rabbitmq.trace";

fn no_exchange(name: &str, vhost: &str) -> ChannelError {
    ChannelError::not_found(format!("no exchange '{name}' in vhost '{vhost}'"))
}

pub(crate) fn no_queue(name: &str, vhost: &str) -> ChannelError {
    ChannelError::not_found(format!("no queue '{name}' in vhost '{vhost}'"))
}

impl Vhost {
    /// A vhost of `node` that keeps every message in memory.
    pub fn new(name: &str, node: Arc<Node>) -> Arc<Self> {
        Self::build(name, node, None)
    }

    /// A vhost of `node` whose durable queues keep persistent messages in `store`.
    pub fn with_store(name: &str, node: Arc<Node>, store: Arc<Store>) -> Arc<Self> {
        Self::build(name, node, Some(store))
    }

    fn build(name: &str, node: Arc<Node>, store: Option<Arc<Store>>) -> Arc<Self> {
        let mut topo = Topology::default();
        for (n, k) in DEFAULT_EXCHANGES {
            let internal = *n == TRACE_EXCHANGE;
            let ex = Exchange::new(n, *k, true, false, internal, FieldTable::default());
            topo.exchanges.insert((*n).into(), Arc::new(ex));
        }
        Arc::new_cyclic(|me| Self {
            name: name.into(),
            topology: ArcSwap::from_pointee(topo),
            write: Mutex::new(()),
            reply_to: Mutex::new(HashMap::new()),
            store,
            node,
            me: me.clone(),
            durable_hook: OnceLock::new(),
            queue_hook: OnceLock::new(),
            log_hook: OnceLock::new(),
            deleted: CancellationToken::new(),
            policies: OnceLock::new(),
            limits: Mutex::new(Default::default()),
            stats_gone: Mutex::new(Default::default()),
        })
    }

    /// The vhost's limits (RabbitMQ's `vhost-limits` parameter), by name.
    pub fn limits(&self) -> std::collections::BTreeMap<String, i64> {
        self.limits.lock().clone()
    }

    /// Replaces the limits (none: every one cleared). Callers persist or replicate them
    /// (`BrokerShared::set_vhost_limits`).
    pub fn set_limits(&self, limits: std::collections::BTreeMap<String, i64>) {
        *self.limits.lock() = limits;
    }

    /// The `max-connections` limit when `open` connections reach it (as RabbitMQ: 0 admits
    /// none, a negative limit is none).
    pub fn connection_limit_reached(&self, open: usize) -> Option<i64> {
        Self::limit_reached(&self.limits, "max-connections", open)
    }

    /// A new queue `name` past the `max-queues` limit, with `count` queues in the vhost:
    /// refused as RabbitMQ refuses it (406). Clustered, checked before the queue is proposed.
    pub fn check_queue_limit(&self, name: &str, count: usize) -> Result<(), ChannelError> {
        match Self::limit_reached(&self.limits, "max-queues", count) {
            Some(limit) => Err(ChannelError::precondition_failed(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({limit}) is reached",
                self.name
            ))),
            None => Ok(()),
        }
    }

    fn limit_reached(
        limits: &Mutex<std::collections::BTreeMap<String, i64>>,
        name: &str,
        count: usize,
    ) -> Option<i64> {
        let limit = *limits.lock().get(name)?;
        let reached = limit >= 0 && i64::try_from(count).unwrap_or(i64::MAX) >= limit;
        reached.then_some(limit)
    }

    /// Keeps the counts of a channel on this vhost that closed.
    pub fn channel_gone(&self, c: &crate::stats::Counts) {
        self.stats_gone.lock().add(c);
    }

    /// What the vhost's closed channels counted.
    pub fn stats_gone(&self) -> crate::stats::Counts {
        *self.stats_gone.lock()
    }

    /// The node this vhost belongs to.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Sets the function called after each change of a durable exchange, queue or binding
    /// (the definitions layer persists them). Set once, when the vhost is created.
    pub fn set_durable_hook(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.durable_hook.set(DurableHook(f));
    }

    /// Set once: wraps the log of every non-exclusive queue created from then on.
    pub fn set_log_hook(&self, f: LogWrap) {
        let _ = self.log_hook.set(LogHook(f));
    }

    /// Set once: called with each queue that leaves the vhost (deleted, auto-deleted, expired).
    pub fn set_queue_hook(&self, f: Box<dyn Fn(&QueueHandle) + Send + Sync>) {
        let _ = self.queue_hook.set(QueueHook(f));
    }

    fn durable_changed(&self) {
        if let Some(h) = self.durable_hook.get() {
            (h.0)();
        }
    }

    /// Closes every connection to this vhost (it is being deleted).
    pub fn close_connections(&self) {
        self.deleted.cancel();
    }

    /// Cancelled once the vhost is deleted; connections select on it and close.
    pub fn deleted(&self) -> &CancellationToken {
        &self.deleted
    }

    /// The current routing snapshot.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.topology.load()
    }

    fn update<R>(
        &self,
        f: impl FnOnce(&mut Topology) -> Result<R, ChannelError>,
    ) -> Result<R, ChannelError> {
        let _g = self.write.lock();
        let mut t = Topology::clone(&self.topology.load());
        let r = f(&mut t)?;
        self.topology.store(Arc::new(t));
        Ok(r)
    }

    pub fn queue(&self, name: &str) -> Option<QueueHandle> {
        self.snapshot().queues.get(name).cloned()
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.snapshot().exchanges.get(name).cloned()
    }

    // === policies ===

    /// Gives the vhost the node's policies (once, when the broker makes the vhost).
    pub fn set_policies(&self, policies: Arc<PolicyStore>) {
        let _ = self.policies.set(policies);
    }

    /// The policies that apply to a queue (`is_queue`) or exchange of this vhost.
    pub(crate) fn applied(&self, name: &str, is_queue: bool) -> Applied {
        match self.policies.get() {
            Some(p) => p.applied(&self.name, name, is_queue),
            None => Applied::default(),
        }
    }

    /// Re-applies the policies to every queue and exchange, after a policy was set, changed
    /// or cleared: queues take their new settings at once, exchanges their alternate exchange.
    pub fn apply_policies(&self) {
        let snap = self.snapshot();
        for q in snap.queues.values() {
            q.set_policy(self.applied(&q.name, true));
        }
        let changed: Vec<Arc<str>> = snap
            .exchanges
            .values()
            .filter(|x| !x.name.is_empty())
            .filter(|x| self.applied(&x.name, false).policy != x.policy)
            .map(|x| x.name.clone())
            .collect();
        if changed.is_empty() {
            return;
        }
        let _ = self.update(|t| {
            for name in &changed {
                if let Some(x) = t.exchanges.get(name) {
                    let mut x = Exchange::clone(x);
                    x.policy = self.applied(name, false).policy;
                    t.exchanges.insert(name.clone(), Arc::new(x));
                }
            }
            Ok(())
        });
    }

    // === exchanges ===

    /// exchange.declare (non-passive). `kind` already validated.
    pub fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Result<(), ChannelError> {
        let vname = self.name.clone();
        let created = self.update(|t| {
            if let Some(ex) = t.exchanges.get(name) {
                let ineq = |arg: &str, recv: String, cur: String| {
                    ChannelError::precondition_failed(format!(
                        "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vname}': \
                         received '{recv}' but current is '{cur}'"
                    ))
                };
                if ex.kind != kind {
                    return Err(ineq("type", kind.as_str().into(), ex.kind.as_str().into()));
                }
                if ex.durable != durable {
                    return Err(ineq("durable", durable.to_string(), ex.durable.to_string()));
                }
                if ex.auto_delete != auto_delete {
                    return Err(ineq(
                        "auto_delete",
                        auto_delete.to_string(),
                        ex.auto_delete.to_string(),
                    ));
                }
                if ex.internal != internal {
                    return Err(ineq(
                        "internal",
                        internal.to_string(),
                        ex.internal.to_string(),
                    ));
                }
                return Ok(false);
            }
            let mut ex = Exchange::new(name, kind, durable, auto_delete, internal, arguments);
            ex.policy = self.applied(name, false).policy;
            t.exchanges.insert(name.into(), Arc::new(ex));
            Ok(true)
        })?;
        if created && durable {
            self.durable_changed();
        }
        Ok(())
    }

    /// exchange.delete.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), ChannelError> {
        let vname = self.name.clone();
        let removed_durable = self.update(|t| {
            let Some(ex) = t.exchanges.get(name) else {
                return Ok(false);
            };
            let durable = ex.durable;
            if if_unused && !ex.bindings().is_empty() {
                return Err(ChannelError::precondition_failed(format!(
                    "exchange '{name}' in vhost '{vname}' in use"
                )));
            }
            t.exchanges.remove(name);
            let dest = Destination::Exchange(name.into());
            remove_bindings_to(t, &dest);
            Ok(durable)
        })?;
        if removed_durable {
            self.durable_changed();
        }
        Ok(())
    }

    // === bindings ===

    /// Whether a binding of `source` to `destination` could be made (both exist; 404 if not).
    pub fn check_binding(
        &self,
        source: &str,
        destination: &Destination,
    ) -> Result<(), ChannelError> {
        self.snapshot()
            .check_binding(source, destination, &self.name)
    }

    /// queue.bind / exchange.bind.
    pub fn bind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), ChannelError> {
        let vname = self.name.clone();
        let changed = self.update(|t| {
            let mut ex = t.binding_source(source, &destination, &vname)?;
            let added = ex.bind(Binding {
                destination,
                routing_key: routing_key.to_owned(),
                arguments,
            });
            let durable = ex.durable;
            t.exchanges.insert(source.into(), Arc::new(ex));
            Ok(added && durable)
        })?;
        if changed {
            self.durable_changed();
        }
        Ok(())
    }

    /// queue.unbind / exchange.unbind. Missing bindings are not an error (RabbitMQ).
    pub fn unbind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), ChannelError> {
        let vname = self.name.clone();
        let changed = self.update(|t| {
            // A binding whose source or destination is gone cannot exist: it is already
            // unbound (RabbitMQ answers unbind-ok, and RPC clients unbinding auto-deleted reply
            // queues rely on it).
            let Ok(mut ex) = t.binding_source(source, &destination, &vname) else {
                return Ok(false);
            };
            let durable = ex.durable;
            let b = Binding {
                destination,
                routing_key: routing_key.to_owned(),
                arguments,
            };
            if ex.unbind(&b) {
                let auto = ex.auto_delete && ex.bindings().is_empty();
                if auto {
                    t.exchanges.remove(source);
                } else {
                    t.exchanges.insert(source.into(), Arc::new(ex));
                }
                return Ok(durable);
            }
            Ok(false)
        })?;
        if changed {
            self.durable_changed();
        }
        Ok(())
    }

    // === queues ===

    /// queue.declare (non-passive). Returns the handle and whether it was created.
    pub fn declare_queue(&self, spec: QueueSpec) -> Result<(QueueHandle, bool), ChannelError> {
        self.declare_queue_seeded(spec, Vec::new(), None)
    }

    /// [`Vhost::declare_queue`] for a queue that starts with `seed` (queue order): a mirror
    /// promoted to master brings its copy. The persistent ones of a durable queue are logged
    /// before the queue runs. Ignored if the queue exists, unless it is `replace`: then the
    /// new queue takes its place in one step (see [`Vhost::replaced`]).
    pub(crate) fn declare_queue_seeded(
        &self,
        spec: QueueSpec,
        mut seed: Vec<crate::store::Recovered>,
        replace: Option<&QueueHandle>,
    ) -> Result<(QueueHandle, bool), ChannelError> {
        let vname = self.name.clone();
        let mut spawn = None;
        let r = self.update(|t| {
            if let Some(q) = t
                .queues
                .get(spec.name.as_str())
                .filter(|q| !replace.is_some_and(|r| Arc::ptr_eq(r, q)))
            {
                // Strict, as RabbitMQ on a non-passive declare: the exclusive flag must match
                // too, not only the owner.
                if q.exclusive_owner != spec.exclusive_owner {
                    return Err(ChannelError::resource_locked(format!(
                        "cannot obtain exclusive access to locked queue '{}' in vhost '{vname}'. \
                         It could be originally declared on another connection or the exclusive \
                         property value does not match that of the original declaration.",
                        spec.name
                    )));
                }
                let ineq = |arg: &str, recv: String, cur: String| {
                    ChannelError::precondition_failed(format!(
                        "inequivalent arg '{arg}' for queue '{}' in vhost '{vname}': \
                         received '{recv}' but current is '{cur}'",
                        spec.name
                    ))
                };
                if q.durable != spec.durable {
                    return Err(ineq(
                        "durable",
                        spec.durable.to_string(),
                        q.durable.to_string(),
                    ));
                }
                if q.auto_delete != spec.auto_delete {
                    return Err(ineq(
                        "auto_delete",
                        spec.auto_delete.to_string(),
                        q.auto_delete.to_string(),
                    ));
                }
                for key in [
                    "x-message-ttl",
                    "x-expires",
                    "x-max-length",
                    "x-max-length-bytes",
                    "x-overflow",
                    "x-dead-letter-exchange",
                    "x-dead-letter-routing-key",
                    "x-max-priority",
                    "x-single-active-consumer",
                ] {
                    let a = spec.arguments.inner().get(key);
                    let b = q.arguments.inner().get(key);
                    let same = match (a, b) {
                        (Some(a), Some(b)) => {
                            a == b
                                || crate::queue::args::as_i64(a)
                                    .zip(crate::queue::args::as_i64(b))
                                    .is_some_and(|(x, y)| x == y)
                                || crate::queue::args::as_string(a)
                                    .zip(crate::queue::args::as_string(b))
                                    .is_some_and(|(x, y)| x == y)
                        }
                        (None, None) => true,
                        _ => false,
                    };
                    if !same {
                        let show = |v: Option<&amq_protocol::types::AMQPValue>| match v {
                            None => "none".to_owned(),
                            Some(v) => crate::queue::args::as_string(v)
                                .or_else(|| crate::queue::args::as_i64(v).map(|n| n.to_string()))
                                .unwrap_or_else(|| format!("{v:?}")),
                        };
                        return Err(ineq(key, show(a), show(b)));
                    }
                }
                return Ok((q.clone(), false));
            }
            if replace.is_none() {
                self.check_queue_limit(&spec.name, t.queues.len())?;
            }
            let (handle, rx) = self.new_queue_in(t, &spec);
            spawn = Some((handle.clone(), rx));
            Ok((handle, true))
        })?;
        let churn = &self.node.stats.churn;
        crate::stats::churn(&churn.queue_declared);
        if let Some((handle, rx)) = spawn {
            crate::stats::churn(&churn.queue_created);
            let durable = handle.durable && handle.exclusive_owner.is_none();
            // Durable, non-exclusive queues keep persistent messages on disk and get back what
            // the store recovered for them (also when a client redeclares after a restart).
            let host: std::sync::Weak<dyn crate::queue::QueueHost> = self.me.clone();
            let node = self.node.clone();
            let (log, mut recovered, events): (Box<dyn crate::store::QueueLog>, _, _) = match &self
                .store
            {
                Some(store) if durable => {
                    let (mut log, recovered, events) = store.attach(&self.name, &handle.name);
                    // A seed from a promotion cut short by a crash may repeat what the
                    // store has: the store's records win.
                    if !recovered.is_empty() && !seed.is_empty() {
                        let have: std::collections::HashSet<u64> =
                            recovered.iter().map(|r| r.id).collect();
                        seed.retain(|r| !have.contains(&r.id));
                    }
                    for r in &seed {
                        if r.msg.persistent() {
                            let ttl = r
                                .expires_at_ms
                                .map(|e| e.saturating_sub(crate::stats::epoch_ms()));
                            let _ = crate::store::QueueLog::enqueue(&mut log, r.id, &r.msg, ttl);
                        }
                    }
                    (Box::new(log), recovered, Some(events))
                }
                _ => (Box::new(TransientLog), Vec::new(), None),
            };
            recovered.extend(seed);
            let (log, events) = match self.log_hook.get() {
                Some(h) if handle.exclusive_owner.is_none() => (h.0)(&handle, (log, events)),
                _ => (log, events),
            };
            let actor = QueueActor::new(handle, host, log, node);
            let actor = match events {
                Some(events) => actor.recover(events, recovered),
                None => actor,
            };
            tokio::spawn(actor.run(rx));
            match replace {
                Some(old) => self.replaced(old),
                None if durable => self.durable_changed(),
                None => {}
            }
        }
        Ok(r)
    }

    /// `old` left the topology for a queue of the same name that took its place in the same
    /// update (the queue's master moved: a proxy became the queue, or the other way round):
    /// its bindings stay, since they name the queue, and no publish ever finds the name
    /// missing. The vhost's hook hears of `old` as of a removed queue.
    fn replaced(&self, old: &QueueHandle) {
        if let Some(h) = self.queue_hook.get() {
            (h.0)(old);
        }
    }

    /// Called by a queue actor when it goes away: forget it and its bindings.
    pub fn remove_queue(&self, handle: &QueueHandle) {
        let removed = self.update(|t| {
            let same = t
                .queues
                .get(&*handle.name)
                .is_some_and(|q| Arc::ptr_eq(q, handle));
            if same {
                t.queues.remove(&*handle.name);
                remove_bindings_to(t, &Destination::Queue(handle.name.clone()));
            }
            Ok(same)
        });
        if removed.unwrap_or(false) {
            if let Some(h) = self.queue_hook.get() {
                (h.0)(handle);
            }
            if handle.durable {
                self.durable_changed();
            }
        }
    }

    /// A new queue's handle and mailbox, put in the topology `t` (its actor is the caller's).
    fn new_queue_in(
        &self,
        t: &mut Topology,
        spec: &QueueSpec,
    ) -> (
        QueueHandle,
        tokio::sync::mpsc::Receiver<crate::queue::QueueCmd>,
    ) {
        let name: Arc<str> = spec.name.as_str().into();
        let (handle, rx) = QueueInfo::new(
            name.clone(),
            self.name.clone(),
            spec.durable,
            spec.auto_delete,
            spec.exclusive_owner,
            spec.args.clone(),
            spec.arguments.clone(),
            self.applied(&spec.name, true),
        );
        t.queues.insert(name, handle.clone());
        (handle, rx)
    }

    /// Puts a queue in the topology whose commands `run` serves instead of a local queue
    /// actor (a queue whose master is another node). An existing queue of that name is kept
    /// and returned, unless it is `replace` (see [`Vhost::replaced`]).
    pub(crate) fn install_queue(
        &self,
        spec: QueueSpec,
        replace: Option<&QueueHandle>,
        run: impl FnOnce(QueueHandle, tokio::sync::mpsc::Receiver<crate::queue::QueueCmd>),
    ) -> Result<QueueHandle, ChannelError> {
        let mut spawn = None;
        let r = self.update(|t| {
            if let Some(q) = t
                .queues
                .get(spec.name.as_str())
                .filter(|q| !replace.is_some_and(|r| Arc::ptr_eq(r, q)))
            {
                return Ok(q.clone());
            }
            let (handle, rx) = self.new_queue_in(t, &spec);
            spawn = Some((handle.clone(), rx));
            Ok(handle)
        });
        if let Some((handle, rx)) = spawn {
            run(handle, rx);
            if let Some(old) = replace {
                self.replaced(old);
            }
        }
        r
    }

    /// Asks a queue to delete itself (exclusive owner gone, queue.delete).
    pub async fn delete_queue(
        &self,
        handle: &QueueHandle,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, ChannelError> {
        let r = handle.delete(if_unused, if_empty).await;
        if handle.is_gone() {
            // Its actor had already stopped: nobody else removes it.
            self.remove_queue(handle);
        }
        r
    }

    // === routing ===

    /// Resolves a message to the set of queues (deduplicated) from its exchange and routing
    /// key, following exchange-to-exchange bindings and alternate exchanges. Returns false if
    /// its exchange does not exist.
    pub fn route(&self, msg: &crate::queue::Message, out: &mut Vec<QueueHandle>) -> bool {
        let topo = self.snapshot();
        route_in(&topo, msg, out)
    }

    // === direct reply-to ===

    pub fn register_reply_to(&self, token: String, target: ReplyTarget) {
        self.reply_to.lock().insert(token, target);
    }

    pub fn unregister_reply_to(&self, token: &str) {
        self.reply_to.lock().remove(token);
    }

    pub fn reply_target(&self, token: &str) -> Option<ReplyTarget> {
        self.reply_to.lock().get(token).cloned()
    }
}

fn remove_bindings_to(t: &mut Topology, dest: &Destination) {
    let mut changed = Vec::new();
    for (name, ex) in &t.exchanges {
        if ex.bindings().iter().any(|b| &b.destination == dest) {
            let mut e = Exchange::clone(ex);
            e.unbind_destination(dest);
            changed.push((name.clone(), e));
        }
    }
    for (name, e) in changed {
        if e.auto_delete && e.bindings().is_empty() {
            t.exchanges.remove(&name);
        } else {
            t.exchanges.insert(name, Arc::new(e));
        }
    }
}

/// Routing over a snapshot (see [`Vhost::route`]). The message's headers are decoded only
/// when a headers exchange is on its way, once.
pub fn route_in(topo: &Topology, msg: &crate::queue::Message, out: &mut Vec<QueueHandle>) -> bool {
    let (exchange, routing_key) = (msg.exchange(), msg.routing_key());
    if exchange.is_empty() {
        if let Some(q) = topo.queues.get(routing_key) {
            out.push(q.clone());
        }
        return true;
    }
    let Some(root) = topo.exchanges.get(exchange) else {
        return false;
    };
    let mut visited: Vec<&str> = vec![&root.name];
    let mut stack: Vec<&Exchange> = vec![root];
    let mut dests = Vec::new();
    let mut headers: Option<Option<FieldTable>> = None;
    while let Some(ex) = stack.pop() {
        dests.clear();
        let h = match ex.kind {
            ExchangeKind::Headers => headers.get_or_insert_with(|| msg.headers()).as_ref(),
            _ => None,
        };
        ex.route(routing_key, h, &mut dests);
        if dests.is_empty() {
            if let Some(ae) = ex.alternate() {
                if let Some(a) = topo.exchanges.get(ae) {
                    if !visited.contains(&&*a.name) {
                        visited.push(&a.name);
                        stack.push(a);
                    }
                }
            }
            continue;
        }
        for d in dests.iter() {
            match d {
                Destination::Queue(q) => {
                    if let Some(h) = topo.queues.get(q) {
                        if !out.iter().any(|x| Arc::ptr_eq(x, h)) {
                            out.push(h.clone());
                        }
                    }
                }
                Destination::Exchange(e) => {
                    if let Some(x) = topo.exchanges.get(e) {
                        if !visited.contains(&&*x.name) {
                            visited.push(&x.name);
                            stack.push(x);
                        }
                    }
                }
            }
        }
    }
    true
}
