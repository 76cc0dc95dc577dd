//! A fixed-size log-linear latency histogram: recording is an index computation and an increment,
//! with no allocation per sample. Values are nanoseconds; every bucket is at most 1/64 (1.6 %) wide
//! relative to its value, which is plenty for p50/p99/p999 reporting.

use std::time::Duration;

/// Sub-buckets per power of two (2^SUB_BITS).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket per nanosecond.
const LINEAR: u64 = SUB * 2;
/// Exponents 7..=63 each get SUB buckets after the linear part.
const BUCKETS: usize = LINEAR as usize + (64 - (SUB_BITS as usize + 1)) * SUB as usize;

/// Latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min_ns", &self.min_ns())
            .field("max_ns", &self.max_ns)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let mantissa = (v >> (exp - SUB_BITS)) & (SUB - 1);
    LINEAR as usize + (exp - SUB_BITS - 1) as usize * SUB as usize + mantissa as usize
}

/// Lowest value and width of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, 1);
    }
    let j = i as u64 - LINEAR;
    let exp = (j / SUB) as u32 + SUB_BITS + 1;
    let mantissa = j % SUB;
    let shift = exp - SUB_BITS;
    ((SUB + mantissa) << shift, 1u64 << shift)
}

impl Histogram {
    /// An empty histogram (one allocation of ~30 KiB, made up front).
    pub fn new() -> Self {
        Self {
            counts: vec![0u64; BUCKETS].into_boxed_slice(),
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    /// Record one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.record_ns(ns);
    }

    /// Record one sample given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        let i = index_of(ns);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Add every sample of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in nanoseconds (0 when empty).
    pub fn mean_ns(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            u64::try_from(self.sum_ns / u128::from(self.count)).unwrap_or(u64::MAX)
        }
    }

    /// Largest sample in nanoseconds (0 when empty).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// Smallest sample in nanoseconds (0 when empty).
    pub fn min_ns(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min_ns
        }
    }

    /// The value at quantile `q` (0..=1) in nanoseconds: the middle of the bucket holding the
    /// sample of that rank, clamped to the observed min/max. 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        // rank of the wanted sample, 1-based
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += *c;
            if seen >= rank {
                let (lo, width) = bucket_bounds(i);
                let mid = lo.saturating_add(width / 2);
                return mid.clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_bounds_agree() {
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, u64::MAX / 3, u64::MAX]) {
            let i = index_of(v);
            assert!(i < BUCKETS, "{v} -> {i}");
            let (lo, w) = bucket_bounds(i);
            assert!(lo <= v && v - lo < w, "{v}: bucket {i} = [{lo}, +{w})");
            if v >= LINEAR {
                assert!(w as f64 / lo as f64 <= 1.0 / SUB as f64);
            }
        }
    }

    #[test]
    fn quantiles_of_uniform_samples() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record_ns(v * 1000);
        }
        assert_eq!(h.count(), 100_000);
        let p50 = h.quantile_ns(0.5) as f64;
        let p99 = h.quantile_ns(0.99) as f64;
        assert!((p50 / 50_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 99_000_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert_eq!(h.quantile_ns(1.0), 100_000_000);
        assert_eq!(h.min_ns(), 1000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record_ns(10);
        b.record_ns(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.max_ns(), 1_000_000);
        assert_eq!(a.min_ns(), 10);
        assert_eq!(Histogram::new().quantile_ns(0.5), 0);
    }
}
