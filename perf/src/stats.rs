//! Counters and histograms shared by the producer and consumer tasks and read by the reporter.
//!
//! Tasks add to the counters once per batch, not per message. Latencies are recorded per message
//! into the lock-free [`Histogram`]s.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use crate::{
    histogram::{Histogram, Snapshot},
    ids::IdSet,
};

/// A counter on its own cache line, so producer and consumer threads do not share lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the tasks report.
#[derive(Default)]
pub struct Stats {
    /// Messages published.
    pub sent: Counter,
    /// Publishes confirmed with basic.ack.
    pub confirmed: Counter,
    /// Publishes refused with basic.nack.
    pub nacked: Counter,
    /// Messages returned (basic.return).
    pub returned: Counter,
    /// Messages delivered to consumers (complete bodies).
    pub received: Counter,
    /// Deliveries stamped before this run started (left over from an earlier run, or misrouted).
    pub stale: Counter,
    /// Publish to basic.ack, nanoseconds.
    pub confirm_latency: Histogram,
    /// Publish (timestamp in the body) to delivery, nanoseconds.
    pub consumer_latency: Histogram,
    /// The longest time any producer waited for its next confirm (see [`Gap`]); each producer
    /// reports once, at its end.
    pub longest_gap: Mutex<Option<Gap>>,
    /// Ids confirmed (with --ids-out), merged in by each producer at its end.
    pub confirmed_ids: Mutex<IdSet>,
    /// Ids delivered (with --ids-out), merged in by each consumer at its end.
    pub consumed_ids: Mutex<IdSet>,
}

/// A time without confirms while publishes were outstanding: from one basic.ack (or the
/// producer's start) to the next (or the producer's end, if none came). Nanoseconds since the
/// run start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gap {
    /// The ack before the gap (0: the start).
    pub from_ns: u64,
    /// The ack that ended it, or the producer's end.
    pub to_ns: u64,
    /// Whether an ack ended it (false: the producer stopped waiting).
    pub ended_by_ack: bool,
}

impl Gap {
    /// Length in nanoseconds.
    pub fn len_ns(&self) -> u64 {
        self.to_ns.saturating_sub(self.from_ns)
    }
}

/// Copy of [`Stats`] at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::sent`].
    pub sent: u64,
    /// See [`Stats::confirmed`].
    pub confirmed: u64,
    /// See [`Stats::nacked`].
    pub nacked: u64,
    /// See [`Stats::returned`].
    pub returned: u64,
    /// See [`Stats::received`].
    pub received: u64,
    /// See [`Stats::stale`].
    pub stale: u64,
    /// See [`Stats::confirm_latency`].
    pub confirm_latency: Snapshot,
    /// See [`Stats::consumer_latency`].
    pub consumer_latency: Snapshot,
}

impl Stats {
    /// Keeps `gap` if it is the longest reported so far.
    pub fn report_gap(&self, gap: Gap) {
        if let Ok(mut g) = self.longest_gap.lock() {
            if g.is_none_or(|old| gap.len_ns() > old.len_ns()) {
                *g = Some(gap);
            }
        }
    }

    /// Reads every counter and histogram.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            sent: self.sent.get(),
            confirmed: self.confirmed.get(),
            nacked: self.nacked.get(),
            returned: self.returned.get(),
            received: self.received.get(),
            stale: self.stale.get(),
            confirm_latency: self.confirm_latency.snapshot(),
            consumer_latency: self.consumer_latency.snapshot(),
        }
    }
}

impl StatsSnapshot {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            sent: self.sent.saturating_sub(earlier.sent),
            confirmed: self.confirmed.saturating_sub(earlier.confirmed),
            nacked: self.nacked.saturating_sub(earlier.nacked),
            returned: self.returned.saturating_sub(earlier.returned),
            received: self.received.saturating_sub(earlier.received),
            stale: self.stale.saturating_sub(earlier.stale),
            confirm_latency: self.confirm_latency.since(&earlier.confirm_latency),
            consumer_latency: self.consumer_latency.since(&earlier.consumer_latency),
        }
    }
}
