//! What the management API reads of a queue's activity besides its counters: the bytes of its
//! unacknowledged messages, when it last did something (`idle_since`), and how much of the time
//! its consumers could take messages at once (`consumer_capacity`, `consumer_utilisation`).
//! The queue core writes them ([`QueueActivity`] in its handle); [`ConsumerUse`] is the pure
//! bookkeeping behind the capacity, with the time passed in.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// A queue that did nothing for this long is idle (RabbitMQ's classic queues hibernate, and
/// report `idle_since`, after about a second without work).
pub const IDLE_AFTER_MS: u64 = 1000;

/// Half-life of the moving average of consumer capacity, as RabbitMQ's (one second).
const HALF_LIFE_US: f64 = 1_000_000.0;

/// Whether the queue's consumers can take messages as they come: the state since the last
/// change and the moving average before it. RabbitMQ's rules: a queue is *active* from the
/// moment a consumer is added or unblocked, and *inactive* from the moment a message waits
/// because no consumer can take it; the capacity is the share of active time, averaged with
/// a half-life of one second. A new queue starts active with an average of 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConsumerUse {
    Active {
        since: Instant,
        avg: f64,
    },
    Inactive {
        since: Instant,
        /// Microseconds active before `since`, not yet in `avg`.
        active_us: f64,
        avg: f64,
    },
}

fn moving_average(time_us: f64, next: f64, current: f64) -> f64 {
    if next == current {
        // Exactly: a queue whose consumers always had room reports 1, not 0.999...
        return current;
    }
    let weight = (time_us * std::f64::consts::LN_2 / -HALF_LIFE_US).exp();
    next * (1.0 - weight) + current * weight
}

fn use_avg(active_us: f64, inactive_us: f64, avg: f64) -> f64 {
    let time = active_us + inactive_us;
    if time <= 0.0 {
        return avg;
    }
    moving_average(time, active_us / time, avg)
}

impl ConsumerUse {
    pub fn new(now: Instant) -> Self {
        ConsumerUse::Active {
            since: now,
            avg: 1.0,
        }
    }

    /// Consumers can take messages again (one was added, or got credit back).
    pub fn active(self, now: Instant) -> Self {
        match self {
            ConsumerUse::Inactive {
                since,
                active_us,
                avg,
            } => ConsumerUse::Active {
                since: now,
                avg: use_avg(
                    active_us,
                    now.saturating_duration_since(since).as_micros() as f64,
                    avg,
                ),
            },
            a => a,
        }
    }

    /// A message waits: no consumer can take it.
    pub fn inactive(self, now: Instant) -> Self {
        match self {
            ConsumerUse::Active { since, avg } => ConsumerUse::Inactive {
                since: now,
                active_us: now.saturating_duration_since(since).as_micros() as f64,
                avg,
            },
            i => i,
        }
    }

    /// The share of time (0 to 1) the consumers could take messages at once, as of `now`.
    pub fn capacity(&self, now: Instant) -> f64 {
        let us = |since: Instant| now.saturating_duration_since(since).as_micros() as f64;
        let c = match *self {
            ConsumerUse::Active { since, avg } => use_avg(us(since), 0.0, avg),
            ConsumerUse::Inactive {
                since,
                active_us,
                avg,
            } => use_avg(active_us, us(since), avg),
        };
        c.clamp(0.0, 1.0)
    }
}

/// The activity a queue core publishes for readers (the management API).
#[derive(Debug)]
pub struct QueueActivity {
    /// Body bytes of the messages delivered and not yet acknowledged.
    pub unacked_bytes: AtomicU64,
    /// Unix milliseconds of the queue's last work (a command, a delivery).
    pub busy_at_ms: AtomicU64,
    consumer_use: Mutex<ConsumerUse>,
}

impl Default for QueueActivity {
    fn default() -> Self {
        Self {
            unacked_bytes: AtomicU64::new(0),
            busy_at_ms: AtomicU64::new(0),
            consumer_use: Mutex::new(ConsumerUse::new(Instant::now())),
        }
    }
}

impl QueueActivity {
    pub(crate) fn set_use(&self, u: ConsumerUse) {
        *self.consumer_use.lock() = u;
    }

    /// The consumers' capacity as of `now` (0 without consumers, as RabbitMQ reports).
    pub fn consumer_capacity(&self, consumers: u32, now: Instant) -> f64 {
        if consumers == 0 {
            return 0.0;
        }
        self.consumer_use.lock().capacity(now)
    }

    /// Since when the queue has been idle (Unix milliseconds), if it is idle at `now_ms`.
    pub fn idle_since_ms(&self, now_ms: u64) -> Option<u64> {
        let busy = self.busy_at_ms.load(Ordering::Relaxed);
        (busy > 0 && now_ms.saturating_sub(busy) >= IDLE_AFTER_MS).then_some(busy)
    }
}

/// RabbitMQ 3.10's format of `idle_since`: RFC 3339 with milliseconds and the offset
/// (`2026-12-05T23:11:22.224+00:00`), here always in UTC.
pub fn format_idle_since(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    let s = humantime::format_rfc3339_millis(t).to_string();
    match s.strip_suffix('Z') {
        Some(base) => format!("{base}+00:00"),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn capacity_is_the_moving_share_of_active_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let u = ConsumerUse::new(t0);
        assert_eq!(u.capacity(t0 + 10 * s), 1.0, "never blocked");
        // Blocked for one half-life, then active again: halfway down from 1.
        let u = u.inactive(t0);
        assert!((u.capacity(t0 + s) - 0.5).abs() < 1e-9);
        assert!((u.capacity(t0 + 2 * s) - 0.25).abs() < 1e-9);
        let u = u.active(t0 + 2 * s);
        // Back up, one half-life later halfway from 0.25 to 1.
        let c = u.capacity(t0 + 3 * s);
        assert!((c - 0.625).abs() < 1e-9, "{c}");
        assert!(u.capacity(t0 + 30 * s) < 1.0);
        assert!(u.capacity(t0 + 30 * s) > 0.999);
        // Repeated transitions in the same state change nothing.
        assert_eq!(u.active(t0 + 5 * s), u);
        let i = u.inactive(t0 + 3 * s);
        assert_eq!(i.inactive(t0 + 4 * s), i);
    }

    #[test]
    fn idle_since_shows_after_a_second_of_nothing_in_rabbitmqs_format() {
        let a = QueueActivity::default();
        assert_eq!(
            a.idle_since_ms(5_000),
            None,
            "never busy: not yet published"
        );
        a.busy_at_ms.store(1_000_000, Ordering::Relaxed);
        assert_eq!(a.idle_since_ms(1_000_500), None);
        assert_eq!(a.idle_since_ms(1_001_000), Some(1_000_000));
        assert_eq!(
            format_idle_since(1_796_512_282_224),
            "2026-12-05T23:11:22.224+00:00"
        );
        assert_eq!(a.consumer_capacity(0, Instant::now()), 0.0);
    }
}
