//! Backend selection behind a small trait: round robin (the ELB TCP behaviour), least connections,
//! random. A selector picks the first backend to try; on a failed connect the caller tries the
//! following ones in order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use super::Backend;
use crate::config::Balance;

pub trait Selector: Send + Sync {
    /// Index of the first backend to try. `backends` is never empty.
    fn select(&self, backends: &[Arc<Backend>]) -> usize;
}

pub fn selector(balance: Balance) -> Arc<dyn Selector> {
    match balance {
        Balance::RoundRobin => Arc::new(RoundRobin::default()),
        Balance::LeastConn => Arc::new(LeastConn::default()),
        Balance::Random => Arc::new(Random),
    }
}

/// Each new connection goes to the next backend in order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selector for RoundRobin {
    fn select(&self, backends: &[Arc<Backend>]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % backends.len()
    }
}

/// The backend with the fewest live connections; ties rotate round robin.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: AtomicUsize,
}

impl Selector for LeastConn {
    fn select(&self, backends: &[Arc<Backend>]) -> usize {
        let n = backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_load = usize::MAX;
        for k in 0..n {
            let i = (start + k) % n;
            let load = backends[i].active();
            if load < best_load {
                best = i;
                best_load = load;
            }
        }
        best
    }
}

/// Uniformly random.
#[derive(Debug, Default)]
pub struct Random;

impl Selector for Random {
    fn select(&self, backends: &[Arc<Backend>]) -> usize {
        rand::thread_rng().gen_range(0..backends.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| Arc::new(Backend::new("t", &format!("127.0.0.1:{}", 1000 + i))))
            .collect()
    }

    #[test]
    fn round_robin_is_exact() {
        let b = pool(3);
        let s = RoundRobin::default();
        let picks: Vec<usize> = (0..9).map(|_| s.select(&b)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_conn_picks_the_least_loaded() {
        let b = pool(3);
        b[0].conn_opened();
        b[0].conn_opened();
        b[2].conn_opened();
        let s = LeastConn::default();
        for _ in 0..5 {
            assert_eq!(s.select(&b), 1);
        }
        b[1].conn_opened();
        b[1].conn_opened();
        assert_eq!(s.select(&b), 2);
    }

    #[test]
    fn random_covers_all_and_stays_in_range() {
        let b = pool(4);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[Random.select(&b)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 0), "{seen:?}");
    }

    proptest::proptest! {
        #[test]
        fn round_robin_is_fair(n in 1usize..16, rounds in 1usize..8) {
            let b = pool(n);
            let s = RoundRobin::default();
            let mut counts = vec![0usize; n];
            for _ in 0..n * rounds {
                counts[s.select(&b)] += 1;
            }
            proptest::prop_assert!(counts.iter().all(|&c| c == rounds));
        }
    }
}
