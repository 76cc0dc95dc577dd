//! Durability hook for queues.
//!
//! Every state change of a queue's message list goes through a [`QueueLog`]: enqueue, settle
//! (ack, drop, expire, dead-letter), requeue, purge and delete. Publisher confirms are sent only
//! once the log reports a message [`Safety::Safe`]. Non-durable queues use the transient log
//! below; durable queues use [`DiskLog`] (the node's [`Store`]: segment files, group commit,
//! fdatasync), which reports persistent messages `Pending` and later tells the queue which ids
//! became safe or could not be written ([`StoreEvent`], on the queue's own channel). The queue's
//! confirm tracker decides who confirms: a publish that waits for the disk alone hands its
//! ticket to the log ([`QueueLog::enqueue_confirmed`]) and whoever writes the batch (the store's
//! writer thread, or the queue's own thread, see [`QueueLog::flush`]) sends the confirm itself
//! after the sync; everything else the tracker confirms.
//!
//! # Layout
//!
//! The durable store is one append-only log under `<data-dir>/msgs`, shared by every durable
//! queue. One file per part; a queue calls `log.rs`, which hands batches to `writer.rs`, which
//! writes them through `segments.rs`:
//!
//! - `disk.rs`: [`Store`], the node's store: open and recover, attach a queue, drop what no
//!   queue claimed, close.
//! - `log.rs`: [`DiskLog`], the [`QueueLog`] of a durable queue, on the queue's own thread.
//! - `writer.rs`: taking and writing a batch (group commit: one `fdatasync` per batch), the
//!   confirms sent after the sync, and the writer thread, which also does the reclaim work.
//! - `segments.rs`: segment files (naming, opening, appending, sync) and reclaim: deleting and
//!   compacting the oldest segments.
//! - `prewrite.rs`: the thread that writes the next segment full of zeros ahead of need.
//! - `journal.rs`: the delivery journals that keep delivered flags across a process crash.
//! - `state.rs`: the books under the store's mutex (pending records, message slots, live
//!   counts) and what the store's threads share.
//! - `record.rs`, `replay.rs`: the record format, and rebuilding the books from it at boot.

pub mod disk;
mod journal;
mod log;
mod prewrite;
pub mod record;
pub mod replay;
mod segments;
mod state;
#[cfg(test)]
mod testing;
mod writer;

pub use disk::{Recovered, Store};
pub use log::DiskLog;

use crate::queue::{ConfirmTicket, Message};
use bytes::Bytes;

/// Builds a message back from its stored parts (exchange, routing key, pre-encoded content
/// header payload, body), as the store and the queue page files keep them, charged to
/// `memory` (the node's account). None if the header is not valid for the body.
pub fn message_from_parts(
    memory: &'static crate::memory::Memory,
    exchange: &str,
    routing_key: &str,
    header: &[u8],
    body: Bytes,
) -> Option<Message> {
    Message::from_parts(memory, exchange, routing_key, header, &body).ok()
}

/// What the store tells a durable queue about its enqueues, on the queue's own channel (see
/// [`Store::attach`]).
#[derive(Debug)]
pub enum StoreEvent {
    /// Every id up to and including `up_to` is on disk (for a queue, whose ids are logged in
    /// increasing order). `ids`: exactly the ids this report covers, for a log whose ids do
    /// not arrive in order (a mirror's copy, see `crate::cluster::mirror`).
    Synced { up_to: u64, ids: Vec<u64> },
    /// These enqueues could not be written (disk full, I/O error): their publishes get
    /// basic.nack and the messages leave the queue if not yet delivered. `tickets`: the
    /// confirms the log held for them, nacked by the queue once the messages are out.
    WriteFailed {
        ids: Vec<u64>,
        tickets: Vec<ConfirmTicket>,
    },
    /// Every in-sync mirror of the queue has every id up to and including `up_to` (clustered
    /// queues with mirrors; see [`QueueLog::replicated`]).
    MirrorsAcked { up_to: u64 },
    /// A mirror being synchronised is ready for the next batch of the queue's messages (see
    /// [`QueueLog::sync_wanted`]): the queue takes a turn even when nothing else happens.
    MirrorSyncReady,
}

/// Ids a mirror being synchronised still needs the queue's messages of: those in
/// (`after`, `up_to`], sent lowest id first (see [`QueueLog::sync_wanted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyncRange {
    pub after: u64,
    pub up_to: u64,
}

/// One message of a synchronisation batch, as the queue holds it now.
#[derive(Debug, Clone)]
pub struct SyncMsg {
    pub id: u64,
    pub msg: std::sync::Arc<Message>,
    /// Unix ms; 0 for none.
    pub expires_at_ms: u64,
}

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
    /// A message entered the queue with queue-local id `id`; `ttl_ms` is its time to live
    /// from now, if any.
    fn enqueue(&mut self, id: u64, msg: &Message, ttl_ms: Option<u64>) -> Safety;
    /// [`QueueLog::enqueue`] for a publish that wants a confirm and waits for nothing but
    /// this log: the log may take the ticket and send the confirm itself once the message is
    /// safe (returns None: the store's writer confirms right after its sync, one hop less than
    /// through the queue), or give it back with the message's [`Safety`] for the queue's
    /// [`crate::queue::confirm::ConfirmTracker`] to send. Either way exactly once.
    fn enqueue_confirmed(
        &mut self,
        id: u64,
        msg: &Message,
        ttl_ms: Option<u64>,
        ticket: ConfirmTicket,
    ) -> Option<(Safety, ConfirmTicket)> {
        Some((self.enqueue(id, msg, ttl_ms), ticket))
    }
    /// Messages left the queue for good (acked, auto-acked, dropped, expired, dead-lettered).
    fn settle(&mut self, ids: &[u64]);
    /// Messages were handed to a consumer that must ack them (redelivered after a restart).
    fn delivered(&mut self, ids: &[u64]);
    /// Delivered messages went back to ready (redelivered).
    fn requeue(&mut self, ids: &[u64]);
    /// The queue was deleted.
    fn delete(&mut self);
    /// Whether a publish also waits for the queue's in-sync mirrors (reported as
    /// [`StoreEvent::MirrorsAcked`]): then the confirm is never delegated to the log.
    fn replicated(&self) -> bool {
        false
    }
    /// The queue has handled a round of commands: records logged since the last call are
    /// to be written now. `idle`: no command waits, so the log may write on the caller's
    /// thread. `woke`: the round woke other tasks (deliveries to connections), which another
    /// runtime thread should run if the log blocks this one in a sync. Returns whether it
    /// wrote on the caller's thread.
    fn flush(&mut self, _idle: bool, _woke: bool) -> bool {
        false
    }
    /// The range of messages a mirror being synchronised needs next, if any: the queue answers
    /// with [`QueueLog::sync_batch`] in the same round (clustered queues with mirrors).
    fn sync_wanted(&self) -> Option<SyncRange> {
        None
    }
    /// The queue's messages in `range`, lowest ids first, as many as fit one batch; `done`:
    /// the range holds no more.
    fn sync_batch(&mut self, _range: SyncRange, _msgs: Vec<SyncMsg>, _done: bool) {}
}

/// Keeps nothing: every message is safe as soon as it is in memory.
#[derive(Debug, Default)]
pub struct TransientLog;

impl QueueLog for TransientLog {
    fn enqueue(&mut self, _id: u64, _msg: &Message, _ttl_ms: Option<u64>) -> Safety {
        Safety::Safe
    }
    fn delivered(&mut self, _ids: &[u64]) {}
    fn settle(&mut self, _ids: &[u64]) {}
    fn requeue(&mut self, _ids: &[u64]) {}
    fn delete(&mut self) {}
}
