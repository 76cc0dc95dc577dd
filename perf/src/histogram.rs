//! Latency histogram with fixed log-linear buckets.
//!
//! Recording a sample is one relaxed `fetch_add` on a preallocated atomic bucket: no allocation and no
//! lock on the per-message path, and the once-a-second reporter can read it while producers and
//! consumers keep writing. Values below 32 are exact; above, each power of two is split into 32
//! buckets, so a reported percentile is within ~3% of the true value.
//!
//! Values are nanoseconds; the largest bucket holds everything from 2^45 ns (~9.8 hours) up.

use std::sync::atomic::{AtomicU64, Ordering};

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const MAX_EXP: u32 = 45;
/// Number of buckets.
pub const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 2) as usize) * SUB as usize;

/// Bucket index of a value.
#[inline]
pub fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let h = 63 - v.leading_zeros();
    if h > MAX_EXP {
        return BUCKETS - 1;
    }
    let shift = h - SUB_BITS;
    ((h - SUB_BITS + 1) as usize) * SUB as usize + ((v >> shift) - SUB) as usize
}

/// Smallest value that lands in bucket `idx` and the bucket's width.
pub fn bucket_range(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < SUB {
        return (idx, 1);
    }
    let group = idx / SUB;
    let sub = idx % SUB;
    let shift = group - 1;
    ((SUB + sub) << shift, 1 << shift)
}

/// Value reported for bucket `idx`: the middle of its range.
pub fn bucket_value(idx: usize) -> u64 {
    let (low, width) = bucket_range(idx);
    low + (width - 1) / 2
}

// === impl Histogram ===

/// Shared histogram that many tasks record into.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram (the only allocation it ever makes).
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records one sample.
    #[inline]
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the current counts.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

// === impl Snapshot ===

/// Point-in-time copy of a [`Histogram`]; the reporter diffs two of them for per-second figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    counts: Vec<u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

impl Snapshot {
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Samples recorded in `self` but not yet in `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// Value at quantile `q` (0.0..=1.0), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // Rank of the sample wanted, 1-based: the smallest value with at least q*total samples <= it.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (idx, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_value(idx));
            }
        }
        None
    }

    /// Largest recorded value (to bucket precision), or `None` when empty.
    pub fn max(&self) -> Option<u64> {
        self.counts
            .iter()
            .rposition(|c| *c > 0)
            .map(|idx| bucket_range(idx).0 + bucket_range(idx).1 - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut prev_end = 0;
        for idx in 0..BUCKETS {
            let (low, width) = bucket_range(idx);
            assert_eq!(low, prev_end, "bucket {idx}");
            assert_eq!(bucket_of(low), idx);
            assert_eq!(bucket_of(low + width - 1), idx);
            prev_end = low + width;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn relative_error_is_small() {
        for v in [33u64, 100, 1_000, 12_345, 1_000_000, 987_654_321] {
            let got = bucket_value(bucket_of(v));
            let err = (got as f64 - v as f64).abs() / v as f64;
            assert!(err < 0.035, "{v} -> {got}");
        }
        for v in 0..32 {
            assert_eq!(bucket_value(bucket_of(v)), v);
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::new();
        assert_eq!(h.snapshot().quantile(0.5), None);
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        let p50 = s.quantile(0.5).unwrap();
        assert!((48_000..=52_000).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((96_000..=101_000).contains(&p99), "{p99}");
        assert!(s.max().unwrap() >= 100_000);
    }

    #[test]
    fn since_subtracts() {
        let h = Histogram::new();
        h.record(10);
        let a = h.snapshot();
        h.record(10);
        h.record(5000);
        let d = h.snapshot().since(&a);
        assert_eq!(d.count(), 2);
    }
}
