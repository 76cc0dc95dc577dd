//! Flow control of publishers by the queues they publish to, as RabbitMQ's credit flow does:
//! a publisher faster than a queue's consumers can take stops being read instead of filling
//! memory until the alarm stops everyone.
//!
//! A queue is **delivery-bound** when its ready backlog has reached [`BACKLOG_HIGH`] messages
//! and no consumer can take one more because its connection has not yet written what it was
//! given ([`super::CONN_PENDING_LIMIT`]): its consumers want messages as fast as they come,
//! and what holds them back is the way out. While a queue is delivery-bound, every connection
//! that publishes to it is blocked ([`PublisherFlow::block`]): the connection stops reading
//! its socket after the frames it has read (its deliveries, heartbeats and writes go on), so
//! TCP slows the client down. The queue releases its blocked publishers once the backlog is
//! below [`BACKLOG_LOW`] or it is no longer delivery-bound (a consumer left, the connection
//! drained), and when it is deleted.
//!
//! A backlog that grows because consumers are slow to acknowledge (their prefetch is full, a
//! Celery worker busy with its tasks) or because nobody consumes does not block anyone: that
//! is what a queue is for, and memory is then the alarm's and the pager's business. Publishes
//! that arrive from other nodes (a mirrored queue's master serving a publish forwarded over a
//! cluster link) are not blocked either: one link carries every queue's traffic.
//!
//! Besides, a connection may have at most [`CREDIT`] published messages handed to queues and
//! not yet taken in by them (their mailboxes): beyond that it stops reading until they catch
//! up, so a queue that falls behind its mailbox bounds what waits there as well.
//!
//! A connection shows as `flow` in the management API while it is held back.

use super::ConnShared;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The backlog (ready messages) at which a delivery-bound queue starts blocking publishers.
pub const BACKLOG_HIGH: usize = 4096;
/// The backlog below which it releases them.
pub const BACKLOG_LOW: usize = BACKLOG_HIGH / 2;
/// Published messages a connection may have in queue mailboxes, not yet taken in.
pub const CREDIT: usize = 4096;

/// A connection's flow state, shared with the queues it publishes to.
#[derive(Debug, Default)]
pub struct PublisherFlow {
    /// How many queues block this connection now.
    blocks: AtomicU32,
    /// Messages handed to queues and not yet taken in by them.
    in_flight: AtomicUsize,
    /// Woken when the last block is released or the messages in flight fall below the credit.
    released: Notify,
}

impl PublisherFlow {
    /// A queue blocks this connection (each queue once until it releases it).
    pub fn block(&self) {
        self.blocks.fetch_add(1, Ordering::AcqRel);
    }

    /// A queue releases its block.
    pub fn release(&self) {
        if self.blocks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.released.notify_one();
        }
    }

    /// `n` published messages were handed to a queue's mailbox.
    pub fn sent(&self, n: usize) {
        self.in_flight.fetch_add(n, Ordering::AcqRel);
    }

    /// A queue took in `n` of them (or they were dropped).
    pub fn taken(&self, n: usize) {
        let before = self.in_flight.fetch_sub(n, Ordering::AcqRel);
        if before >= CREDIT && before - n < CREDIT {
            self.released.notify_one();
        }
    }

    /// Whether some queue blocks this connection, or it has used its credit: it must not read
    /// its socket.
    pub fn is_blocked(&self) -> bool {
        self.blocks.load(Ordering::Acquire) > 0 || self.in_flight.load(Ordering::Acquire) >= CREDIT
    }

    /// Whether a queue blocks this connection (not just its credit used up).
    pub fn is_held_by_queue(&self) -> bool {
        self.blocks.load(Ordering::Acquire) > 0
    }

    /// Waits until no queue blocks this connection (at once if none does).
    pub async fn until_released(&self) {
        loop {
            let released = self.released.notified();
            if !self.is_blocked() {
                return;
            }
            released.await;
        }
    }
}

/// The publishers one queue blocks, and whether it blocks new ones (sans-io: the queue core
/// owns one and tells it what it sees).
#[derive(Debug, Default)]
pub struct FlowGate {
    /// The queue is delivery-bound: publishers are blocked as they publish.
    closed: bool,
    /// Connections blocked by this queue, each once.
    blocked: Vec<Arc<ConnShared>>,
}

impl FlowGate {
    /// After a turn: the ready backlog and whether a consumer could take a message now, and
    /// whether one is held back by its connection only.
    pub fn update(&mut self, backlog: usize, consumer_ready: bool, held_by_connection: bool) {
        if self.closed {
            if backlog < BACKLOG_LOW || consumer_ready || !held_by_connection {
                self.open();
            }
        } else if backlog >= BACKLOG_HIGH && !consumer_ready && held_by_connection {
            self.closed = true;
        }
    }

    /// A publish from `from` arrived: blocked if the gate is closed.
    pub fn on_publish(&mut self, from: Option<&Arc<ConnShared>>) {
        let Some(from) = from else { return };
        if self.closed && !self.blocked.iter().any(|c| Arc::ptr_eq(c, from)) {
            from.flow.block();
            self.blocked.push(from.clone());
        }
    }

    /// Releases every blocked publisher (also when the queue goes).
    pub fn open(&mut self) {
        self.closed = false;
        for c in self.blocked.drain(..) {
            c.flow.release();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// How many connections this queue blocks.
    pub fn blocked(&self) -> usize {
        self.blocked.len()
    }
}

impl Drop for FlowGate {
    fn drop(&mut self) {
        self.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Arc<ConnShared> {
        Arc::new(ConnShared::default())
    }

    #[test]
    fn a_delivery_bound_backlog_blocks_each_publisher_once_until_it_drains() {
        let mut g = FlowGate::default();
        let (a, b) = (conn(), conn());
        g.update(BACKLOG_HIGH - 1, false, true);
        g.on_publish(Some(&a));
        assert!(
            !a.flow.is_blocked(),
            "below the high mark nobody is blocked"
        );
        g.update(BACKLOG_HIGH, false, true);
        g.on_publish(Some(&a));
        g.on_publish(Some(&a));
        g.on_publish(Some(&b));
        g.on_publish(None);
        assert!(a.flow.is_blocked() && b.flow.is_blocked());
        assert_eq!(g.blocked(), 2);
        // Between the marks: still blocked.
        g.update(BACKLOG_LOW, false, true);
        assert!(a.flow.is_blocked());
        g.update(BACKLOG_LOW - 1, false, true);
        assert!(!a.flow.is_blocked() && !b.flow.is_blocked());
        assert!(!g.is_closed());
    }

    #[test]
    fn slow_acks_or_no_consumers_never_block() {
        let mut g = FlowGate::default();
        let a = conn();
        // Consumers whose prefetch is full (not held by their connection), or none at all.
        g.update(1_000_000, false, false);
        g.on_publish(Some(&a));
        assert!(!a.flow.is_blocked());
        // A consumer that can take a message: deliveries go on, nothing to hold back.
        g.update(1_000_000, true, true);
        g.on_publish(Some(&a));
        assert!(!a.flow.is_blocked());
    }

    #[test]
    fn a_consumer_ready_again_or_a_deleted_queue_releases() {
        let a = conn();
        {
            let mut g = FlowGate::default();
            g.update(BACKLOG_HIGH, false, true);
            g.on_publish(Some(&a));
            assert!(a.flow.is_blocked());
            g.update(BACKLOG_HIGH * 4, true, true);
            assert!(!a.flow.is_blocked(), "a consumer can take messages again");
            g.update(BACKLOG_HIGH, false, true);
            g.on_publish(Some(&a));
            assert!(a.flow.is_blocked());
        }
        assert!(
            !a.flow.is_blocked(),
            "a dropped gate (deleted queue) releases"
        );
    }

    #[test]
    fn two_queues_block_one_connection_until_both_release() {
        let a = conn();
        let (mut g1, mut g2) = (FlowGate::default(), FlowGate::default());
        for g in [&mut g1, &mut g2] {
            g.update(BACKLOG_HIGH, false, true);
            g.on_publish(Some(&a));
        }
        g1.open();
        assert!(a.flow.is_blocked());
        g2.open();
        assert!(!a.flow.is_blocked());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_out_of_credit_waits_until_queues_take_its_messages_in() {
        let a = conn();
        a.flow.sent(CREDIT - 1);
        assert!(!a.flow.is_blocked());
        a.flow.sent(2);
        assert!(a.flow.is_blocked() && !a.flow.is_held_by_queue());
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.flow.until_released().await })
        };
        tokio::task::yield_now().await;
        a.flow.taken(1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still at the credit");
        a.flow.taken(1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert!(!a.flow.is_blocked());
    }

    #[tokio::test(start_paused = true)]
    async fn until_released_wakes_when_the_last_block_goes() {
        let a = conn();
        a.flow.block();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.flow.until_released().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.flow.release();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
