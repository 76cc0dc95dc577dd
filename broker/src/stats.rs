//! Message counters and sampled rates, for the management API and Prometheus (the registry of
//! live connections is `crate::connection::registry`).
//!
//! Counters live next to their single writer (a queue actor, a connection task) as atomics
//! updated with a plain load + store: no lock and no locked instruction on the message path.
//! Node totals are the sum over live objects plus what finished objects left behind; a sampler
//! task ([`Sampler::run`]) turns them into per-second rates every [`SAMPLE_INTERVAL`].

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often counters are sampled into rates.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Rates are averaged over this many samples (5 s at the default interval, like RabbitMQ's
/// statistics interval).
const RATE_WINDOW: usize = 5;
/// Node samples kept for the management UI's chart (`?msg_rates_age=`): 10 minutes at the
/// default interval, about 60 KiB. RabbitMQ keeps its overview samples as long by default.
pub const HISTORY_LEN: usize = 600;

/// Adds `n` to a counter that has a single writer (cheaper than `fetch_add`).
#[inline]
pub fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[inline]
fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Counters of one queue, written only by its actor.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Messages enqueued.
    pub publish: AtomicU64,
    /// Deliveries to consumers in manual-ack mode.
    pub deliver: AtomicU64,
    pub deliver_no_ack: AtomicU64,
    pub get: AtomicU64,
    pub get_no_ack: AtomicU64,
    pub get_empty: AtomicU64,
    pub ack: AtomicU64,
    pub redeliver: AtomicU64,
    /// Gauges refreshed by the actor after each batch of commands.
    pub unacked: AtomicU64,
    pub ready_bytes: AtomicU64,
    /// Ready messages paged out to disk and their body bytes (the rest are in memory).
    pub paged_out: AtomicU64,
    pub paged_out_bytes: AtomicU64,
}

/// A copy of the message counters (queue, connection or node).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counts {
    pub publish: u64,
    /// Messages received on channels in confirm mode (a subset of `publish`).
    pub publish_confirm: u64,
    pub confirm: u64,
    pub deliver: u64,
    pub deliver_no_ack: u64,
    pub get: u64,
    pub get_no_ack: u64,
    pub get_empty: u64,
    pub ack: u64,
    pub redeliver: u64,
    pub return_unroutable: u64,
    pub drop_unroutable: u64,
    pub recv_oct: u64,
    pub send_oct: u64,
}

impl Counts {
    pub fn deliver_get(&self) -> u64 {
        self.deliver + self.deliver_no_ack + self.get + self.get_no_ack
    }

    pub fn add(&mut self, o: &Counts) {
        self.publish += o.publish;
        self.publish_confirm += o.publish_confirm;
        self.confirm += o.confirm;
        self.deliver += o.deliver;
        self.deliver_no_ack += o.deliver_no_ack;
        self.get += o.get;
        self.get_no_ack += o.get_no_ack;
        self.get_empty += o.get_empty;
        self.ack += o.ack;
        self.redeliver += o.redeliver;
        self.return_unroutable += o.return_unroutable;
        self.drop_unroutable += o.drop_unroutable;
        self.recv_oct += o.recv_oct;
        self.send_oct += o.send_oct;
    }

    pub fn max(&mut self, o: &Counts) {
        macro_rules! m {
            ($($f:ident),*) => { $( self.$f = self.$f.max(o.$f); )* };
        }
        m!(
            publish,
            publish_confirm,
            confirm,
            deliver,
            deliver_no_ack,
            get,
            get_no_ack,
            get_empty,
            ack,
            redeliver,
            return_unroutable,
            drop_unroutable,
            recv_oct,
            send_oct
        );
    }

    /// Per-second rates between two samples.
    pub fn rate(&self, earlier: &Counts, secs: f64) -> Rates {
        let r = |a: u64, b: u64| per_second(a, b, secs);
        Rates {
            publish: r(self.publish, earlier.publish),
            confirm: r(self.confirm, earlier.confirm),
            deliver: r(self.deliver, earlier.deliver),
            deliver_no_ack: r(self.deliver_no_ack, earlier.deliver_no_ack),
            get: r(self.get, earlier.get),
            get_no_ack: r(self.get_no_ack, earlier.get_no_ack),
            get_empty: r(self.get_empty, earlier.get_empty),
            deliver_get: r(self.deliver_get(), earlier.deliver_get()),
            ack: r(self.ack, earlier.ack),
            redeliver: r(self.redeliver, earlier.redeliver),
            return_unroutable: r(self.return_unroutable, earlier.return_unroutable),
            drop_unroutable: r(self.drop_unroutable, earlier.drop_unroutable),
            recv_oct: r(self.recv_oct, earlier.recv_oct),
            send_oct: r(self.send_oct, earlier.send_oct),
        }
    }
}

/// The per-second rate of a counter that went from `earlier` to `now` in `secs`, to one
/// decimal as RabbitMQ's rates (0 when no time passed; a counter never goes down).
fn per_second(now: u64, earlier: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        (now.saturating_sub(earlier) as f64 / secs * 10.0).round() / 10.0
    }
}

/// Recent samples of some counters, oldest first, and the rates over them: the rate over up to
/// [`RATE_WINDOW`] sampling intervals, as RabbitMQ's `_details.rate` is over its statistics
/// interval.
#[derive(Debug, Default)]
struct Window {
    samples: VecDeque<(Instant, Counts)>,
    rates: Rates,
}

impl Window {
    fn push(&mut self, now: Instant, c: Counts) {
        self.samples.push_back((now, c));
        while self.samples.len() > RATE_WINDOW + 1 {
            self.samples.pop_front();
        }
        if let (Some((t0, c0)), Some((t1, c1))) = (self.samples.front(), self.samples.back()) {
            self.rates = c1.rate(c0, (*t1 - *t0).as_secs_f64());
        }
    }
}

/// A vhost's message counts, RabbitMQ's vhost `message_stats`: the sum over the channels open
/// on it and what its closed channels left behind.
pub fn vhost_counts(shared: &crate::BrokerShared, v: &crate::vhost::Vhost) -> Counts {
    let mut c = v.stats_gone();
    for e in shared.registry.connections() {
        if e.opened.lock().as_ref().is_none_or(|o| o.vhost != *v.name) {
            continue;
        }
        for (_, cs) in e.stats.channel_stats.list() {
            c.add(&cs.counts());
        }
    }
    c
}

/// Per-second rates matching [`Counts`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Rates {
    pub publish: f64,
    pub confirm: f64,
    pub deliver: f64,
    pub deliver_no_ack: f64,
    pub get: f64,
    pub get_no_ack: f64,
    pub get_empty: f64,
    pub deliver_get: f64,
    pub ack: f64,
    pub redeliver: f64,
    pub return_unroutable: f64,
    pub drop_unroutable: f64,
    pub recv_oct: f64,
    pub send_oct: f64,
}

impl QueueStats {
    /// What this queue adds to node totals: deliveries and acks (the node's `publish` counts
    /// messages received from clients, once, not once per queue).
    pub fn node_share(&self) -> Counts {
        Counts {
            publish: 0,
            ..self.counts()
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            publish: get(&self.publish),
            deliver: get(&self.deliver),
            deliver_no_ack: get(&self.deliver_no_ack),
            get: get(&self.get),
            get_no_ack: get(&self.get_no_ack),
            get_empty: get(&self.get_empty),
            ack: get(&self.ack),
            redeliver: get(&self.redeliver),
            ..Counts::default()
        }
    }
}

/// Counters of one connection, written only by its task.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Messages received from the client (basic.publish).
    pub publish: AtomicU64,
    /// Of `publish`, those received on a channel in confirm mode.
    pub publish_confirm: AtomicU64,
    /// Publisher confirms sent (ack or nack).
    pub confirm: AtomicU64,
    pub return_unroutable: AtomicU64,
    pub drop_unroutable: AtomicU64,
    pub recv_oct: AtomicU64,
    pub recv_cnt: AtomicU64,
    pub send_oct: AtomicU64,
    pub send_cnt: AtomicU64,
    /// Open channels (gauge).
    pub channels: AtomicU32,
    /// Body sizes of the messages received (`publish`).
    pub msg_sizes: SizeHistogram,
    /// The counters of each open channel.
    pub channel_stats: ChannelRegistry,
}

impl ConnStats {
    pub fn counts(&self) -> Counts {
        Counts {
            publish: get(&self.publish),
            publish_confirm: get(&self.publish_confirm),
            confirm: get(&self.confirm),
            return_unroutable: get(&self.return_unroutable),
            drop_unroutable: get(&self.drop_unroutable),
            recv_oct: get(&self.recv_oct),
            send_oct: get(&self.send_oct),
            ..Counts::default()
        }
    }
}

/// Counters of one channel, written only by its connection task: RabbitMQ's per-channel
/// message stats (`channel_exchange_metrics` and `channel_queue_metrics` summed over
/// exchanges and queues).
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Messages received (basic.publish, at routing: a transaction's at tx.commit).
    pub publish: AtomicU64,
    /// Publisher confirms sent (ack or nack).
    pub confirm: AtomicU64,
    pub return_unroutable: AtomicU64,
    pub drop_unroutable: AtomicU64,
    /// Deliveries to consumers (manual ack, automatic ack).
    pub deliver: AtomicU64,
    pub deliver_no_ack: AtomicU64,
    /// basic.get answered with a message (manual ack, automatic ack) or empty.
    pub get: AtomicU64,
    pub get_no_ack: AtomicU64,
    pub get_empty: AtomicU64,
    /// Deliveries and gets of messages delivered before.
    pub redeliver: AtomicU64,
    /// Deliveries the client acknowledged (basic.ack, each message of a multiple ack).
    pub ack: AtomicU64,
}

impl ChannelStats {
    pub fn counts(&self) -> Counts {
        Counts {
            publish: get(&self.publish),
            confirm: get(&self.confirm),
            return_unroutable: get(&self.return_unroutable),
            drop_unroutable: get(&self.drop_unroutable),
            deliver: get(&self.deliver),
            deliver_no_ack: get(&self.deliver_no_ack),
            get: get(&self.get),
            get_no_ack: get(&self.get_no_ack),
            get_empty: get(&self.get_empty),
            redeliver: get(&self.redeliver),
            ack: get(&self.ack),
            ..Counts::default()
        }
    }

    /// A delivery to a consumer (`no_ack`: automatic acknowledgement).
    pub fn delivered(&self, no_ack: bool, redelivered: bool) {
        bump(
            if no_ack {
                &self.deliver_no_ack
            } else {
                &self.deliver
            },
            1,
        );
        if redelivered {
            bump(&self.redeliver, 1);
        }
    }

    /// A basic.get: None when the queue was empty, else whether the message had been
    /// delivered before.
    pub fn got(&self, no_ack: bool, redelivered: Option<bool>) {
        let Some(redelivered) = redelivered else {
            return bump(&self.get_empty, 1);
        };
        bump(if no_ack { &self.get_no_ack } else { &self.get }, 1);
        if redelivered {
            bump(&self.redeliver, 1);
        }
    }
}

/// The channels of one connection and their counters, for the sampler and the management
/// API (the connection task registers each channel it opens and drops it when it closes).
#[derive(Debug, Default)]
pub struct ChannelRegistry(Mutex<Vec<(u16, Arc<ChannelStats>)>>);

impl ChannelRegistry {
    /// Registers the counters of channel `number` (a reopened number gets new ones).
    pub fn open(&self, number: u16) -> Arc<ChannelStats> {
        let s = Arc::new(ChannelStats::default());
        let mut v = self.0.lock();
        v.retain(|(n, _)| *n != number);
        v.push((number, s.clone()));
        s
    }

    pub fn close(&self, number: u16) {
        self.0.lock().retain(|(n, _)| *n != number);
    }

    /// The open channels' counters.
    pub fn list(&self) -> Vec<(u16, Arc<ChannelStats>)> {
        self.0.lock().clone()
    }

    /// The counters of channel `number`, if open.
    pub fn get(&self, number: u16) -> Option<Arc<ChannelStats>> {
        self.0
            .lock()
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, s)| s.clone())
    }
}

/// Counters of one exchange (shared by the copies a topology change makes of it): messages
/// published to it and, of those, the copies it routed to queues. Several connections write
/// them.
#[derive(Debug, Default)]
pub struct ExchangeStats {
    pub publish_in: AtomicU64,
    pub publish_out: AtomicU64,
}

impl ExchangeStats {
    /// One message published to the exchange, routed to `queues` queues.
    pub fn published(&self, queues: usize) {
        self.publish_in.fetch_add(1, Ordering::Relaxed);
        if queues > 0 {
            self.publish_out.fetch_add(queues as u64, Ordering::Relaxed);
        }
    }

    /// (publish_in, publish_out).
    pub fn counts(&self) -> (u64, u64) {
        (get(&self.publish_in), get(&self.publish_out))
    }
}

/// A node's own totals: what finished queues and connections left behind (so node totals
/// stay monotonic) and the churn counters. One per node (`crate::node::Node`).
#[derive(Debug, Default)]
pub struct NodeStats {
    gone: Mutex<Counts>,
    pub churn: Churn,
    /// Message sizes: what finished connections left, and the highest node totals answered.
    sizes: Mutex<(SizeCounts, SizeCounts)>,
}

// === impl NodeStats ===

impl NodeStats {
    /// Called once when a queue actor ends.
    pub fn queue_gone(&self, s: &QueueStats) {
        self.gone.lock().add(&s.node_share());
    }

    /// Called once when a connection ends.
    pub fn conn_gone(&self, s: &ConnStats) {
        self.gone.lock().add(&s.counts());
        self.sizes.lock().0.add(&s.msg_sizes.counts());
    }

    /// What finished queues and connections left behind.
    pub fn gone(&self) -> Counts {
        *self.gone.lock()
    }
}

/// Upper bounds (bytes, inclusive) of the message size histogram's buckets, RabbitMQ's
/// (`rabbit_msg_size_metrics`); a last bucket takes the larger ones.
pub const SIZE_BUCKETS: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// A histogram of message sizes with a single writer (a connection task): one counter per
/// bucket, not cumulative, and the sum of the sizes.
#[derive(Debug, Default)]
pub struct SizeHistogram {
    buckets: [AtomicU64; SIZE_BUCKETS.len() + 1],
    sum: AtomicU64,
}

/// A copy of a [`SizeHistogram`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SizeCounts {
    /// Observations per bucket (not cumulative); the last is above the largest bound.
    pub buckets: [u64; SIZE_BUCKETS.len() + 1],
    pub sum: u64,
}

// === impl SizeHistogram ===

impl SizeHistogram {
    /// Counts one message of `size` bytes.
    #[inline]
    pub fn observe(&self, size: u64) {
        let i = SIZE_BUCKETS.partition_point(|&b| b < size);
        bump(&self.buckets[i], 1);
        bump(&self.sum, size);
    }

    pub fn counts(&self) -> SizeCounts {
        SizeCounts {
            buckets: std::array::from_fn(|i| get(&self.buckets[i])),
            sum: get(&self.sum),
        }
    }
}

// === impl SizeCounts ===

impl SizeCounts {
    fn add(&mut self, o: &SizeCounts) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.sum += o.sum;
    }

    fn max(&mut self, o: &SizeCounts) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a = (*a).max(b);
        }
        self.sum = self.sum.max(o.sum);
    }

    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// The node's message sizes: live connections plus what finished ones left, never lower than
/// an earlier answer (a connection between the registry and the totals for an instant must
/// not make a counter go down).
pub fn node_msg_sizes(shared: &crate::BrokerShared) -> SizeCounts {
    let mut c = shared.node.stats.sizes.lock().0;
    for e in shared.registry.connections() {
        c.add(&e.stats.msg_sizes.counts());
    }
    let mut st = shared.node.stats.sizes.lock();
    st.1.max(&c);
    st.1
}

/// Churn counters (per node, rare events).
#[derive(Debug, Default)]
pub struct Churn {
    pub connection_created: AtomicU64,
    pub connection_closed: AtomicU64,
    pub channel_created: AtomicU64,
    pub channel_closed: AtomicU64,
    pub queue_declared: AtomicU64,
    pub queue_created: AtomicU64,
    pub queue_deleted: AtomicU64,
}

/// Increments a churn counter (several writers).
pub fn churn(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Snapshot of one channel, answered by the connection task.
#[derive(Debug, Clone)]
pub struct ChannelSnapshot {
    pub number: u16,
    pub prefetch: u16,
    pub global_prefetch: u32,
    pub confirm: bool,
    pub transactional: bool,
    pub unacked: usize,
    pub unconfirmed: usize,
    pub consumers: Vec<ConsumerSnapshot>,
    /// The channel has published a message (RabbitMQ counts it as a publisher from then on).
    pub publishing: bool,
}

/// One consumer of a channel.
#[derive(Debug, Clone)]
pub struct ConsumerSnapshot {
    pub tag: String,
    pub queue: String,
    pub no_ack: bool,
    pub exclusive: bool,
    pub prefetch: u16,
}

/// Now as milliseconds since the Unix epoch.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Node totals now: live queues and connections plus what finished ones left.
pub fn node_counts(shared: &crate::BrokerShared) -> Counts {
    let mut c = shared.node.stats.gone();
    for v in shared.vhost_list() {
        for q in v.snapshot().queues.values() {
            c.add(&q.stats.node_share());
        }
    }
    for e in shared.registry.connections() {
        c.add(&e.stats.counts());
    }
    c
}

/// Sampled rates, read by the management API.
#[derive(Debug, Default)]
pub struct Sampler {
    inner: Mutex<SamplerState>,
}

/// Recent samples of an exchange's (publish_in, publish_out), oldest first.
type ExchangeSamples = VecDeque<(Instant, u64, u64)>;

#[derive(Debug, Default)]
struct SamplerState {
    /// Recent node samples, oldest first.
    node: VecDeque<(Instant, Counts)>,
    /// Highest totals seen (a queue counted in neither place for an instant must not make
    /// a counter go down).
    high: Counts,
    node_rates: Rates,
    /// Per queue (vhost, name): last sample and rate.
    queues: HashMap<(String, String), (Instant, Counts, Rates)>,
    /// Per connection id: last sample and rate.
    conns: HashMap<u64, (Instant, Counts, Rates)>,
    /// Per channel (connection id, number): its counters (a reused number has new ones) and
    /// recent samples.
    channels: HashMap<(u64, u16), (Arc<ChannelStats>, Window)>,
    /// Per vhost: recent samples of its totals ([`vhost_counts`]).
    vhosts: HashMap<String, Window>,
    /// Per exchange (vhost, name): its counters and recent samples of (in, out).
    exchanges: HashMap<(String, String), (Arc<ExchangeStats>, ExchangeSamples)>,
    samples: u64,
    /// The node totals of the last [`HISTORY_LEN`] samples with their wall-clock time (Unix
    /// milliseconds), oldest first: what `GET /api/overview?msg_rates_age=N` returns as
    /// `samples`, so that a chart opened now shows the last minutes instead of starting empty.
    history: VecDeque<(u64, Counts)>,
}

impl Sampler {
    /// Samples counters every [`SAMPLE_INTERVAL`] until the broker stops.
    pub async fn run(
        self: Arc<Self>,
        shared: std::sync::Weak<crate::BrokerShared>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            self.sample(&shared, Instant::now());
        }
    }

    /// Takes one sample.
    pub fn sample(&self, shared: &crate::BrokerShared, now: Instant) {
        let total = self.totals(shared);
        let mut st = self.inner.lock();
        st.samples += 1;
        st.history.push_back((unix_ms(), total));
        while st.history.len() > HISTORY_LEN {
            st.history.pop_front();
        }
        st.node.push_back((now, total));
        while st.node.len() > RATE_WINDOW + 1 {
            st.node.pop_front();
        }
        if let (Some((t0, c0)), Some((t1, c1))) = (st.node.front(), st.node.back()) {
            st.node_rates = c1.rate(c0, (*t1 - *t0).as_secs_f64());
        }
        let mut queues = HashMap::new();
        for v in shared.vhost_list() {
            for q in v.snapshot().queues.values() {
                let key = (q.vhost.to_string(), q.name.to_string());
                let c = q.stats.counts();
                let r = match st.queues.get(&key) {
                    Some((t, prev, _)) => c.rate(prev, (now - *t).as_secs_f64()),
                    None => Rates::default(),
                };
                queues.insert(key, (now, c, r));
            }
        }
        st.queues = queues;
        let mut conns = HashMap::new();
        for e in shared.registry.connections() {
            let c = e.stats.counts();
            let r = match st.conns.get(&e.id) {
                Some((t, prev, _)) => c.rate(prev, (now - *t).as_secs_f64()),
                None => Rates::default(),
            };
            conns.insert(e.id, (now, c, r));
        }
        st.conns = conns;
        let mut channels = HashMap::new();
        let mut vhost_totals: HashMap<String, Counts> = HashMap::new();
        for v in shared.vhost_list() {
            vhost_totals.insert(v.name.to_string(), v.stats_gone());
        }
        for e in shared.registry.connections() {
            let vhost = e.opened.lock().as_ref().map(|o| o.vhost.clone());
            for (n, cs) in e.stats.channel_stats.list() {
                let c = cs.counts();
                if let Some(t) = vhost.as_ref().and_then(|v| vhost_totals.get_mut(v)) {
                    t.add(&c);
                }
                let mut w = match st.channels.remove(&(e.id, n)) {
                    Some((prev, w)) if Arc::ptr_eq(&prev, &cs) => w,
                    _ => Window::default(),
                };
                w.push(now, c);
                channels.insert((e.id, n), (cs, w));
            }
        }
        st.channels = channels;
        let mut vhosts = HashMap::new();
        for (name, total) in vhost_totals {
            let mut w = st.vhosts.remove(&name).unwrap_or_default();
            let mut high = w.samples.back().map(|(_, c)| *c).unwrap_or_default();
            high.max(&total);
            w.push(now, high);
            vhosts.insert(name, w);
        }
        st.vhosts = vhosts;
        let mut exchanges = HashMap::new();
        for v in shared.vhost_list() {
            for x in v.snapshot().exchanges.values() {
                let key = (v.name.to_string(), x.name.to_string());
                let (i, o) = x.stats.counts();
                let mut w = match st.exchanges.remove(&key) {
                    Some((prev, w)) if Arc::ptr_eq(&prev, &x.stats) => w,
                    _ => VecDeque::new(),
                };
                w.push_back((now, i, o));
                while w.len() > RATE_WINDOW + 1 {
                    w.pop_front();
                }
                exchanges.insert(key, (x.stats.clone(), w));
            }
        }
        st.exchanges = exchanges;
    }

    /// The per-second rates of a channel over the last samples.
    pub fn channel_rates(&self, conn: u64, number: u16) -> Rates {
        self.inner
            .lock()
            .channels
            .get(&(conn, number))
            .map(|(_, w)| w.rates)
            .unwrap_or_default()
    }

    /// A vhost's totals ([`vhost_counts`], never lower than the last sample) and rates.
    pub fn vhost_stats(
        &self,
        shared: &crate::BrokerShared,
        v: &crate::vhost::Vhost,
    ) -> (Counts, Rates) {
        let mut c = vhost_counts(shared, v);
        let st = self.inner.lock();
        match st.vhosts.get(&*v.name) {
            Some(w) => {
                if let Some((_, last)) = w.samples.back() {
                    c.max(last);
                }
                (c, w.rates)
            }
            None => (c, Rates::default()),
        }
    }

    /// An exchange's (publish_in, publish_out) rates over the last samples.
    pub fn exchange_rates(&self, vhost: &str, name: &str) -> (f64, f64) {
        let st = self.inner.lock();
        let Some((_, w)) = st.exchanges.get(&(vhost.to_owned(), name.to_owned())) else {
            return (0.0, 0.0);
        };
        match (w.front(), w.back()) {
            (Some(&(t0, i0, o0)), Some(&(t1, i1, o1))) => {
                let secs = (t1 - t0).as_secs_f64();
                (per_second(i1, i0, secs), per_second(o1, o0, secs))
            }
            _ => (0.0, 0.0),
        }
    }

    /// Node totals, never lower than an earlier answer.
    pub fn totals(&self, shared: &crate::BrokerShared) -> Counts {
        let now = node_counts(shared);
        let mut st = self.inner.lock();
        st.high.max(&now);
        st.high
    }

    pub fn node_rates(&self) -> Rates {
        self.inner.lock().node_rates
    }

    pub fn queue_rates(&self, vhost: &str, name: &str) -> Rates {
        self.inner
            .lock()
            .queues
            .get(&(vhost.to_owned(), name.to_owned()))
            .map(|x| x.2)
            .unwrap_or_default()
    }

    pub fn conn_rates(&self, id: u64) -> Rates {
        self.inner
            .lock()
            .conns
            .get(&id)
            .map(|x| x.2)
            .unwrap_or_default()
    }

    /// Number of samples taken so far (tests wait for the next one).
    pub fn samples(&self) -> u64 {
        self.inner.lock().samples
    }

    /// Node totals of the last `age` (Unix milliseconds, totals), newest first, at most one per
    /// `incr`: RabbitMQ's `msg_rates_age` / `msg_rates_incr` over the kept history.
    pub fn history(&self, age: Duration, incr: Duration) -> Vec<(u64, Counts)> {
        thin(&self.inner.lock().history, age, incr)
    }
}

/// The samples of `history` (oldest first) no older than `age` before the newest, newest first,
/// keeping a sample only when it is at least `incr` older than the last one kept (less half a
/// sampling interval, so that a late tick does not skip a step).
fn thin(history: &VecDeque<(u64, Counts)>, age: Duration, incr: Duration) -> Vec<(u64, Counts)> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let Some(&(newest, _)) = history.back() else {
        return Vec::new();
    };
    let oldest = newest.saturating_sub(ms(age));
    let step = ms(incr).saturating_sub(ms(SAMPLE_INTERVAL) / 2);
    let mut out: Vec<(u64, Counts)> = Vec::new();
    for &(t, c) in history.iter().rev() {
        if t < oldest {
            break;
        }
        if out
            .last()
            .is_none_or(|&(kept, _)| kept.saturating_sub(t) >= step)
        {
            out.push((t, c));
        }
    }
    out
}

/// Wall-clock time in Unix milliseconds (the samples' timestamps, as RabbitMQ's API gives them).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let a = Counts {
            publish: 10,
            ack: 5,
            ..Counts::default()
        };
        let b = Counts {
            publish: 30,
            ack: 4,
            get: 4,
            ..Counts::default()
        };
        let r = b.rate(&a, 2.0);
        assert_eq!(r.publish, 10.0);
        assert_eq!(r.ack, 0.0);
        assert_eq!(r.deliver_get, 2.0);
        assert_eq!(b.rate(&a, 0.0).publish, 0.0);
    }

    #[test]
    fn max_keeps_the_highest_of_each_counter() {
        let mut a = Counts {
            publish: 10,
            ack: 1,
            ..Counts::default()
        };
        a.max(&Counts {
            publish: 3,
            ack: 7,
            ..Counts::default()
        });
        assert_eq!((a.publish, a.ack), (10, 7));
    }

    #[test]
    fn history_keeps_the_last_minutes_one_per_increment_newest_first() {
        let mut h = VecDeque::new();
        for i in 0..100u64 {
            let c = Counts {
                publish: i * 10,
                ..Counts::default()
            };
            h.push_back((1_000_000 + i * 1000, c));
        }
        let got = thin(&h, Duration::from_secs(30), Duration::from_secs(5));
        let times: Vec<u64> = got.iter().map(|(t, _)| (t - 1_000_000) / 1000).collect();
        assert_eq!(times, [99, 94, 89, 84, 79, 74, 69]);
        assert_eq!(got[0].1.publish, 990);
        // Every sample when the increment is the interval; nothing from an empty history.
        assert_eq!(
            thin(&h, Duration::from_secs(9), Duration::from_secs(1)).len(),
            10
        );
        assert!(thin(
            &VecDeque::new(),
            Duration::from_secs(60),
            Duration::from_secs(5)
        )
        .is_empty());
    }

    #[test]
    fn sizes_fall_in_rabbitmq_buckets_bounds_included() {
        let h = SizeHistogram::default();
        for size in [0, 100, 101, 1_000, 100_000_000, 100_000_001] {
            h.observe(size);
        }
        let c = h.counts();
        assert_eq!(c.buckets, [2, 2, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(c.count(), 6);
        assert_eq!(c.sum, 200_001_202);
    }

    #[test]
    fn bump_adds() {
        let c = AtomicU64::new(2);
        bump(&c, 3);
        assert_eq!(c.load(Ordering::Relaxed), 5);
    }
}
