//! Consumers whose queue's master died, waiting on this node for the queue's promotion (those
//! without `x-cancel-on-ha-failover`, RabbitMQ's default): once a mirror is promoted they are
//! handed to it and consume on; if no promotion comes within the wait they get basic.cancel
//! (see [`super::remote`], which keeps a consumer's state as `T` here).
//!
//! A consumer cancelled meanwhile (basic.cancel, its channel or its connection closed) is
//! struck off, whether it still waits or is being handed on: the new master must never take on
//! a consumer whose channel is gone (it would take messages its node can only give back, for as
//! long as the connection lives). Time is passed in.

use super::remote::ConsumerKey;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

pub struct Parked<T> {
    /// Waiting for a promotion.
    waiting: Mutex<Vec<Waiting<T>>>,
    /// Being handed to a new master, not yet taken on there. Locked after `waiting`.
    handing: Mutex<HashSet<ConsumerKey>>,
}

struct Waiting<T> {
    since: Instant,
    key: ConsumerKey,
    /// The proxy it consumed through (its address).
    proxy: usize,
    consumer: T,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            handing: Mutex::default(),
        }
    }
}

impl<T> Parked<T> {
    /// `key` consumed through the proxy at address `proxy`, whose master died `now`.
    pub fn park(&self, key: ConsumerKey, proxy: usize, consumer: T, now: Instant) {
        self.waiting.lock().push(Waiting {
            since: now,
            key,
            proxy,
            consumer,
        });
    }

    /// The consumer `key` was cancelled: it is not handed on, or its hand-over is undone.
    pub fn cancel(&self, key: &ConsumerKey) {
        let mut waiting = self.waiting.lock();
        waiting.retain(|w| w.key != *key);
        self.handing.lock().remove(key);
    }

    /// The consumers waiting on the proxy `proxy`, whose queue was promoted: each is being
    /// handed on until [`Parked::handed`].
    pub fn hand_on(&self, proxy: usize) -> Vec<(ConsumerKey, T)> {
        let mut waiting = self.waiting.lock();
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|w| w.proxy == proxy);
        *waiting = rest;
        let mut handing = self.handing.lock();
        mine.into_iter()
            .map(|w| {
                handing.insert(w.key.clone());
                (w.key, w.consumer)
            })
            .collect()
    }

    /// Whether `key`, being handed on, is still wanted (not cancelled meanwhile).
    pub fn wanted(&self, key: &ConsumerKey) -> bool {
        self.handing.lock().contains(key)
    }

    /// The hand-over of `key` is over (taken on by the new master, or given up): whether it
    /// was still wanted. One taken on but cancelled meanwhile must be cancelled there again.
    pub fn handed(&self, key: &ConsumerKey) -> bool {
        self.handing.lock().remove(key)
    }

    /// Those that waited `wait` or longer, taken out (their promotion did not come).
    pub fn expired(&self, now: Instant, wait: Duration) -> Vec<T> {
        let mut waiting = self.waiting.lock();
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|w| now.duration_since(w.since) >= wait);
        *waiting = keep;
        old.into_iter().map(|w| w.consumer).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(channel: u16) -> ConsumerKey {
        (1, channel, 1, format!("ctag-{channel}").into())
    }

    #[test]
    fn the_consumers_of_a_promoted_proxy_are_handed_on_the_others_wait() {
        let p = Parked::default();
        let t0 = Instant::now();
        p.park(key(1), 10, "a", t0);
        p.park(key(2), 20, "b", t0);
        p.park(key(3), 10, "c", t0);
        let handed: Vec<_> = p.hand_on(10).into_iter().map(|(_, c)| c).collect();
        assert_eq!(handed, ["a", "c"]);
        assert!(p.wanted(&key(1)) && p.wanted(&key(3)) && !p.wanted(&key(2)));
        assert!(p.handed(&key(1)), "taken on while wanted");
        assert!(!p.wanted(&key(1)), "handed once");
        assert!(p.hand_on(10).is_empty());
        assert_eq!(
            p.expired(t0 + Duration::from_secs(60), Duration::from_secs(30)),
            ["b"]
        );
    }

    #[test]
    fn a_consumer_cancelled_while_it_waits_is_never_handed_on() {
        let p = Parked::default();
        let t0 = Instant::now();
        p.park(key(1), 10, "a", t0);
        p.park(key(2), 10, "b", t0);
        p.cancel(&key(1));
        let handed: Vec<_> = p.hand_on(10).into_iter().map(|(k, _)| k).collect();
        assert_eq!(handed, [key(2)]);
        assert!(p
            .expired(t0 + Duration::from_secs(60), Duration::ZERO)
            .is_empty());
    }

    #[test]
    fn a_consumer_cancelled_during_its_hand_over_is_not_wanted_any_more() {
        let p = Parked::default();
        let t0 = Instant::now();
        p.park(key(1), 10, (), t0);
        p.park(key(2), 10, (), t0);
        assert_eq!(p.hand_on(10).len(), 2);
        // 1: cancelled before the new master was asked; 2: while it was taking it on.
        p.cancel(&key(1));
        assert!(!p.wanted(&key(1)), "not asked at all");
        assert!(p.wanted(&key(2)));
        p.cancel(&key(2));
        assert!(
            !p.handed(&key(2)),
            "taken on but cancelled: to be cancelled there"
        );
    }

    #[test]
    fn only_those_that_waited_long_enough_expire() {
        let p = Parked::default();
        let t0 = Instant::now();
        p.park(key(1), 10, "old", t0);
        p.park(key(2), 10, "new", t0 + Duration::from_secs(20));
        let wait = Duration::from_secs(30);
        assert!(p.expired(t0 + Duration::from_secs(29), wait).is_empty());
        assert_eq!(p.expired(t0 + Duration::from_secs(30), wait), ["old"]);
        assert_eq!(p.expired(t0 + Duration::from_secs(50), wait), ["new"]);
    }
}
