//! The publisher confirms of one queue: a publish is confirmed once every source it waits for
//! has the message (its log's disk sync today; the queue's in-sync mirrors with clustering),
//! nacked if one of them fails it, and confirmed exactly once.
//!
//! All of a queue's confirms go through its [`ConfirmTracker`], with one exception decided here
//! too: a publish that waits for the log alone is handed to the log
//! ([`crate::store::QueueLog::enqueue_confirmed`]), whose writer sends the confirm right after
//! its sync (the fast single-writer path: one hop less than back through the queue). The store
//! reports everything else as [`crate::store::StoreEvent`]s, which the queue passes here.
//!
//! Invariants worth naming:
//! - a ticket is in exactly one place: here (waiting), in the log (delegated), or sent;
//! - waiting publishes are in id order, so a sync up to an id settles a prefix of them;
//! - a refused publish (reject-publish overflow, a failed write) is nacked, never acked later.

use super::ConfirmTicket;
use crate::store::{QueueLog, Safety};
use std::collections::VecDeque;

/// One publish waiting for its confirm.
#[derive(Debug)]
struct Waiting {
    id: u64,
    ticket: ConfirmTicket,
    /// Still waits for the log to sync it.
    disk: bool,
    /// Still waits for the queue's in-sync mirrors to have it.
    mirrors: bool,
}

/// The confirms one queue owes.
#[derive(Debug, Default)]
pub struct ConfirmTracker {
    waiting: VecDeque<Waiting>,
}

impl ConfirmTracker {
    /// Publishes waiting for their confirm here (not those delegated to the log).
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A publish that wants a confirm was enqueued as `id`: logs it and confirms it now, later
    /// (when what it waits for has it), or hands it to the log (the fast path above). Ids must
    /// grow from one call to the next.
    pub fn enqueue(
        &mut self,
        log: &mut dyn QueueLog,
        id: u64,
        msg: &super::Message,
        ttl_ms: Option<u64>,
        ticket: ConfirmTicket,
    ) {
        if log.replicated() {
            let disk = log.enqueue(id, msg, ttl_ms) == Safety::Pending;
            debug_assert!(self.waiting.back().is_none_or(|w| w.id < id));
            self.waiting.push_back(Waiting {
                id,
                ticket,
                disk,
                mirrors: true,
            });
            return;
        }
        let Some((safety, ticket)) = log.enqueue_confirmed(id, msg, ttl_ms, ticket) else {
            return; // the log confirms after its sync
        };
        match safety {
            Safety::Safe => ticket.send(true),
            Safety::Pending => {
                debug_assert!(self.waiting.back().is_none_or(|w| w.id < id));
                self.waiting.push_back(Waiting {
                    id,
                    ticket,
                    disk: true,
                    mirrors: false,
                });
            }
        }
    }

    /// A publish the queue refuses (reject-publish overflow): nacked now.
    pub fn refuse(&self, ticket: ConfirmTicket) {
        ticket.send(false);
    }

    /// A publish to a queue that is gone (deleted earlier in the same batch): acked now, as
    /// RabbitMQ acks a publish routed to a queue deleted before it got there.
    pub fn gone(&self, ticket: ConfirmTicket) {
        ticket.send(true);
    }

    /// The log has everything up to and including `up_to` on disk.
    pub fn disk_synced(&mut self, up_to: u64) {
        for w in self.waiting.iter_mut() {
            if w.id > up_to {
                break;
            }
            w.disk = false;
        }
        self.confirm_ready();
    }

    /// Every in-sync mirror has everything up to and including `up_to`.
    pub fn mirrors_acked(&mut self, up_to: u64) {
        for w in self.waiting.iter_mut() {
            if w.id > up_to {
                break;
            }
            w.mirrors = false;
        }
        self.confirm_ready();
    }

    /// The log could not write `ids`; `delegated` are the tickets it held for some of them.
    /// Returns the tickets to nack, for the queue to send once the messages are out of it (a
    /// nacked message must not be seen counted or delivered afterwards).
    pub fn disk_failed(
        &mut self,
        ids: &[u64],
        mut delegated: Vec<ConfirmTicket>,
    ) -> Vec<ConfirmTicket> {
        let failed: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if failed.contains(&w.id) {
                delegated.push(w.ticket);
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        delegated
    }

    /// The queue is deleted: whatever waits is acked (its message was accepted, and is now
    /// gone with the queue, as in RabbitMQ), except what still waits for the in-sync mirrors:
    /// that is nacked. A master replaced by a promoted mirror is deleted this way, and the new
    /// master may not have those messages; the publisher sends them again.
    pub fn queue_deleted(&mut self) {
        for w in self.waiting.drain(..) {
            w.ticket.send(!w.mirrors);
        }
    }

    /// Sends the confirms of the oldest publishes that wait for nothing more. Confirms leave in
    /// id order: a publish never overtakes an older one still waiting.
    fn confirm_ready(&mut self) {
        while self.waiting.front().is_some_and(|w| !w.disk && !w.mirrors) {
            if let Some(w) = self.waiting.pop_front() {
                w.ticket.send(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{ClientEvent, Message};
    use crate::store::TransientLog;
    use amq_protocol::protocol::basic::AMQPProperties;
    use tokio::sync::mpsc;

    /// A log that says Pending for everything and never takes a ticket.
    #[derive(Default)]
    struct SlowLog;
    impl QueueLog for SlowLog {
        fn enqueue(&mut self, _: u64, _: &Message, _: Option<u64>) -> Safety {
            Safety::Pending
        }
        fn settle(&mut self, _: &[u64]) {}
        fn delivered(&mut self, _: &[u64]) {}
        fn requeue(&mut self, _: &[u64]) {}
        fn delete(&mut self) {}
    }

    fn msg() -> Message {
        Message::new(
            &crate::memory::UNIT_TESTS,
            "".into(),
            "q".into(),
            AMQPProperties::default(),
            bytes::Bytes::from_static(b"m"),
        )
        .expect("message")
    }

    fn ticket(tx: &mpsc::UnboundedSender<ClientEvent>, seq: u64) -> ConfirmTicket {
        ConfirmTicket {
            events: tx.clone(),
            conn_id: 1,
            channel: 1,
            generation: 0,
            seq,
        }
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<ClientEvent>) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        while let Ok(ClientEvent::Confirm { seq, ok, .. }) = rx.try_recv() {
            out.push((seq, ok));
        }
        out
    }

    #[test]
    fn safe_publishes_confirm_at_once_pending_ones_when_synced_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = ConfirmTracker::default();
        t.enqueue(&mut TransientLog, 1, &msg(), None, ticket(&tx, 1));
        assert_eq!(sent(&mut rx), vec![(1, true)]);
        let mut slow = SlowLog;
        for id in 2..=5 {
            t.enqueue(&mut slow, id, &msg(), None, ticket(&tx, id));
        }
        assert!(sent(&mut rx).is_empty());
        t.disk_synced(3);
        assert_eq!(sent(&mut rx), vec![(2, true), (3, true)]);
        assert_eq!(t.len(), 2);
        t.disk_synced(5);
        assert_eq!(sent(&mut rx), vec![(4, true), (5, true)]);
        assert!(t.is_empty());
    }

    /// A log whose queue has mirrors: syncs some ids to disk, keeps others in memory.
    struct Mirrored;
    impl QueueLog for Mirrored {
        fn enqueue(&mut self, id: u64, _: &Message, _: Option<u64>) -> Safety {
            if id % 2 == 0 {
                Safety::Pending
            } else {
                Safety::Safe
            }
        }
        fn settle(&mut self, _: &[u64]) {}
        fn delivered(&mut self, _: &[u64]) {}
        fn requeue(&mut self, _: &[u64]) {}
        fn delete(&mut self) {}
        fn replicated(&self) -> bool {
            true
        }
    }

    #[test]
    fn with_mirrors_a_publish_waits_for_both_its_disk_and_its_mirrors_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = ConfirmTracker::default();
        let mut log = Mirrored;
        for id in 1..=4 {
            t.enqueue(&mut log, id, &msg(), None, ticket(&tx, id));
        }
        assert!(
            sent(&mut rx).is_empty(),
            "odd ids are safe locally, yet wait for the mirrors"
        );
        t.mirrors_acked(3);
        assert_eq!(sent(&mut rx), vec![(1, true)], "2 still waits for its disk");
        t.disk_synced(2);
        assert_eq!(sent(&mut rx), vec![(2, true), (3, true)]);
        t.disk_synced(4);
        assert!(sent(&mut rx).is_empty(), "4 still waits for the mirrors");
        t.mirrors_acked(4);
        assert_eq!(sent(&mut rx), vec![(4, true)]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_deleted_queue_nacks_what_its_mirrors_never_acknowledged() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = ConfirmTracker::default();
        let mut log = Mirrored;
        for id in 1..=3 {
            t.enqueue(&mut log, id, &msg(), None, ticket(&tx, id));
        }
        t.mirrors_acked(1);
        t.disk_synced(1);
        assert_eq!(sent(&mut rx), vec![(1, true)]);
        // Demoted (a promoted mirror took over): 2 and 3 may be missing on the new master.
        t.queue_deleted();
        assert_eq!(sent(&mut rx), vec![(2, false), (3, false)]);
    }

    #[test]
    fn failed_writes_hand_back_tickets_to_nack_and_deletion_acks_the_rest() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = ConfirmTracker::default();
        let mut slow = SlowLog;
        for id in 1..=4 {
            t.enqueue(&mut slow, id, &msg(), None, ticket(&tx, id));
        }
        let nack = t.disk_failed(&[2, 3], vec![ticket(&tx, 9)]);
        let mut seqs: Vec<u64> = nack.iter().map(|k| k.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![2, 3, 9]);
        assert!(
            sent(&mut rx).is_empty(),
            "the queue sends them, after dropping the messages"
        );
        t.refuse(ticket(&tx, 10));
        assert_eq!(sent(&mut rx), vec![(10, false)]);
        t.queue_deleted();
        assert_eq!(sent(&mut rx), vec![(1, true), (4, true)]);
        assert!(t.is_empty());
    }
}
