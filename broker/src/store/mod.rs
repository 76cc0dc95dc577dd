//! Durability hook for queues.
//!
//! Every state change of a queue's message list goes through a [`QueueLog`]: enqueue, settle
//! (ack, drop, expire, dead-letter), requeue, purge and delete. Publisher confirms are sent only
//! once the log reports a message [`Safety::Safe`]. The transient log below is what the broker
//! uses today; a disk log (group commit + fsync) and a mirror log (replicate to in-sync mirrors)
//! implement the same trait later and report `Pending`, then tell the queue actor which ids became
//! safe through `QueueCmd::Synced`.

use crate::queue::Message;

/// Whether a logged enqueue is already safe to confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// Confirm now.
    Safe,
    /// Confirm when the log later reports the id synced.
    Pending,
}

/// Per-queue message log. Called only from the queue's own task, so implementations need no
/// locking of their own.
pub trait QueueLog: Send + 'static {
    /// A message entered the queue with queue-local id `id`.
    fn enqueue(&mut self, id: u64, msg: &Message) -> Safety;
    /// Messages left the queue for good (acked, auto-acked, dropped, expired, dead-lettered).
    fn settle(&mut self, ids: &[u64]);
    /// Delivered messages went back to ready (redelivered).
    fn requeue(&mut self, ids: &[u64]);
    /// The queue was deleted.
    fn delete(&mut self);
}

/// Keeps nothing: every message is safe as soon as it is in memory.
#[derive(Debug, Default)]
pub struct TransientLog;

impl QueueLog for TransientLog {
    fn enqueue(&mut self, _id: u64, _msg: &Message) -> Safety {
        Safety::Safe
    }
    fn settle(&mut self, _ids: &[u64]) {}
    fn requeue(&mut self, _ids: &[u64]) {}
    fn delete(&mut self) {}
}
