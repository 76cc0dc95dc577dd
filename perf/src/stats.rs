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
    /// The longest times the producers waited for their next confirm (see [`Gap`]); each
    /// producer reports once, at its end.
    pub gaps: Mutex<LongestGaps>,
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

/// How many of the longest gaps are kept.
pub const KEPT_GAPS: usize = 8;

/// The [`KEPT_GAPS`] longest [`Gap`]s, longest first: enough to find the one around an outside
/// event (a broker killed at a known time) even when another pause of the run was longer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LongestGaps {
    gaps: Vec<Gap>,
}

impl LongestGaps {
    /// Keeps `g` if it is among the longest so far (one comparison once the list is full).
    #[inline]
    pub fn offer(&mut self, g: Gap) {
        let len = g.len_ns();
        if self.gaps.len() == KEPT_GAPS && len <= self.gaps[KEPT_GAPS - 1].len_ns() {
            return;
        }
        if self.gaps.capacity() == 0 {
            self.gaps.reserve_exact(KEPT_GAPS + 1);
        }
        let at = self.gaps.partition_point(|x| x.len_ns() >= len);
        self.gaps.insert(at, g);
        self.gaps.truncate(KEPT_GAPS);
    }

    /// Adds the gaps of `other`.
    pub fn merge(&mut self, other: &LongestGaps) {
        for g in &other.gaps {
            self.offer(*g);
        }
    }

    /// Longest first.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
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
    /// Adds a producer's longest gaps.
    pub fn report_gaps(&self, gaps: &LongestGaps) {
        if let Ok(mut all) = self.gaps.lock() {
            all.merge(gaps);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(from_ns: u64, to_ns: u64) -> Gap {
        Gap {
            from_ns,
            to_ns,
            ended_by_ack: true,
        }
    }

    #[test]
    fn only_the_longest_gaps_are_kept_longest_first() {
        let mut g = LongestGaps::default();
        for i in 0..20u64 {
            // Lengths 0, 10, ..., 190, offered in a scrambled order.
            let len = (i * 7 % 20) * 10;
            g.offer(gap(1_000 * i, 1_000 * i + len));
        }
        let lens: Vec<u64> = g.gaps().iter().map(Gap::len_ns).collect();
        assert_eq!(lens, vec![190, 180, 170, 160, 150, 140, 130, 120]);
        // A merge keeps the longest of both.
        let mut other = LongestGaps::default();
        other.offer(gap(5, 1_005));
        other.offer(gap(0, 1));
        g.merge(&other);
        assert_eq!(g.gaps().len(), KEPT_GAPS);
        assert_eq!(g.gaps()[0], gap(5, 1_005));
        assert_eq!(g.gaps()[KEPT_GAPS - 1].len_ns(), 130);
    }
}
