//! One mirror's copy of one queue: the messages the master streamed (in memory, as the master
//! holds them), and for a durable queue the persistent ones on this node's disk too, in a log
//! of the node's store under a key of the copy's own ([`copy_key`]).
//!
//! The copy acknowledges what is safe: a transient message (or any message of a non-durable
//! queue) once it is in memory, a persistent message of a durable queue once its record is
//! synced. So an ack up to id N means every enqueue up to N survives this node's crash, and
//! the master confirms a publish only when every in-sync mirror has it that way.
//!
//! The copy's key names the master's epoch, so a node that restarts finds its copies again
//! ([`parse_key`]) and offers one for promotion only to succeed the master it followed (see
//! `super::mirror`). Ids are the master's; they do not reach the log in increasing order
//! (synchronisation batches bring older ones while the stream brings newer ones), so the
//! copy tracks exactly which ones wait for the disk ([`crate::store::StoreEvent::Synced`]
//! lists them).

use super::wire::QueueRef;
use crate::queue::Message;
use crate::store::{DiskLog, QueueLog, Recovered, Safety};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Every copy's key starts with this (a queue's own key is `vhost NUL name`, and a vhost
/// name does not start with NUL).
pub const KEY_PREFIX: &str = "\0mirror\0";

/// The store key of a copy of `q` following the master of `epoch`; `nonce` makes it unique
/// in this run (a copy dropped and made again starts a log of its own). The vhost's length
/// comes first, so any bytes in the names parse back exactly.
pub fn copy_key(q: &QueueRef, epoch: u64, nonce: u64) -> String {
    format!(
        "{KEY_PREFIX}{epoch}\0{nonce}\0{}\0{}{}",
        q.vhost.len(),
        q.vhost,
        q.name
    )
}

/// The queue, epoch and nonce of a copy's key.
pub fn parse_key(key: &str) -> Option<(QueueRef, u64, u64)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let mut parts = rest.splitn(4, '\0');
    let epoch = parts.next()?.parse().ok()?;
    let nonce = parts.next()?.parse().ok()?;
    let vlen: usize = parts.next()?.parse().ok()?;
    let names = parts.next()?;
    let vhost = names.get(..vlen)?;
    let name = names.get(vlen..)?;
    Some((
        QueueRef {
            vhost: vhost.into(),
            name: name.into(),
        },
        epoch,
        nonce,
    ))
}

fn now_ms() -> u64 {
    crate::stats::epoch_ms()
}

/// The disk side of a copy.
struct Disk {
    log: DiskLog,
    /// Persistent enqueues logged and not yet synced: id -> append order.
    pending: BTreeMap<u64, u64>,
    /// The same, by append order.
    by_order: BTreeMap<u64, u64>,
    next_order: u64,
    /// Synchronisation points whose enqueues are not all synced yet: (seq, the append order
    /// of the last enqueue before it).
    marks: VecDeque<(u64, u64)>,
}

/// A copy of one queue.
pub struct Copy {
    /// The master it follows (None for a copy recovered from disk).
    pub master: Option<warren_cluster::NodeId>,
    pub epoch: u64,
    /// Tells this copy's store events from those of the copies it replaced.
    pub gen: u64,
    /// id -> (message, expiry in Unix ms or 0).
    msgs: BTreeMap<u64, (Arc<Message>, u64)>,
    top: u64,
    /// The last synchronisation point (since the last Reset) whose messages are all safe.
    safe_sync: u64,
    /// The highest id reported safe (acks never go back).
    safe_up_to: u64,
    /// Came back from disk at boot: no master has streamed to it since.
    pub recovered: bool,
    /// The disk refused a write: the copy acknowledges nothing more.
    pub failed: bool,
    disk: Option<Disk>,
}

impl Copy {
    /// An empty copy; `log`: the store log of its persistent messages (a durable queue).
    pub fn new(
        master: Option<warren_cluster::NodeId>,
        epoch: u64,
        gen: u64,
        log: Option<DiskLog>,
    ) -> Self {
        Copy {
            master,
            epoch,
            gen,
            msgs: BTreeMap::new(),
            top: 0,
            safe_sync: 0,
            safe_up_to: 0,
            recovered: false,
            failed: false,
            disk: log.map(|log| Disk {
                log,
                pending: BTreeMap::new(),
                by_order: BTreeMap::new(),
                next_order: 0,
                marks: VecDeque::new(),
            }),
        }
    }

    /// A copy found on disk at boot, with its messages (all on disk already).
    pub fn recovered(epoch: u64, gen: u64, log: DiskLog, msgs: Vec<Recovered>) -> Self {
        let mut c = Copy::new(None, epoch, gen, Some(log));
        c.recovered = true;
        for r in msgs {
            c.top = c.top.max(r.id);
            c.msgs.insert(r.id, (r.msg, r.expires_at_ms.unwrap_or(0)));
        }
        c
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// A message entered the queue as `id`.
    pub fn enqueue(&mut self, id: u64, msg: Arc<Message>, expires_at_ms: u64) {
        self.top = self.top.max(id);
        if let Some(d) = &mut self.disk {
            let ttl = (expires_at_ms != 0).then(|| expires_at_ms.saturating_sub(now_ms()));
            if d.log.enqueue(id, &msg, ttl) == Safety::Pending {
                d.pending.insert(id, d.next_order);
                d.by_order.insert(d.next_order, id);
                d.next_order += 1;
            }
        }
        self.msgs.insert(id, (msg, expires_at_ms));
    }

    /// An enqueue this copy cannot hold (its message did not parse, or the disk failed).
    pub fn skip(&mut self, id: u64) {
        self.top = self.top.max(id);
    }

    /// Messages left the queue for good.
    pub fn settle(&mut self, ids: &[u64]) {
        for id in ids {
            self.msgs.remove(id);
        }
        if let Some(d) = &mut self.disk {
            d.log.settle(ids);
            // Gone: no longer anything to keep safe.
            for id in ids {
                if let Some(o) = d.pending.remove(id) {
                    d.by_order.remove(&o);
                }
            }
            Self::pass_marks(d, &mut self.safe_sync);
        }
    }

    /// Start afresh (a new stream from the master).
    pub fn reset(&mut self) {
        self.msgs.clear();
        self.top = 0;
        self.safe_sync = 0;
        self.safe_up_to = 0;
        if let Some(d) = &mut self.disk {
            d.log.delete();
            d.pending.clear();
            d.by_order.clear();
            d.marks.clear();
        }
    }

    /// The end of synchronisation batch `seq`.
    pub fn sync_point(&mut self, seq: u64) {
        match &mut self.disk {
            Some(d) if !d.pending.is_empty() => {
                d.marks.push_back((seq, d.next_order.saturating_sub(1)));
            }
            _ => self.safe_sync = seq,
        }
    }

    /// The store synced these ids.
    pub fn synced(&mut self, ids: &[u64]) {
        if let Some(d) = &mut self.disk {
            for id in ids {
                if let Some(o) = d.pending.remove(id) {
                    d.by_order.remove(&o);
                }
            }
            Self::pass_marks(d, &mut self.safe_sync);
        }
    }

    /// Synchronisation points with nothing unsynced before them are safe.
    fn pass_marks(d: &mut Disk, safe_sync: &mut u64) {
        let oldest = d.by_order.keys().next().copied();
        while let Some(&(seq, last)) = d.marks.front() {
            if oldest.is_some_and(|o| o <= last) {
                break;
            }
            *safe_sync = seq;
            d.marks.pop_front();
        }
    }

    /// The copy is no longer wanted (the queue is gone, a newer master took over, this node
    /// no longer mirrors it): its records go too. A copy merely dropped (the node stopping)
    /// stays on disk for the next run.
    pub fn discard(mut self) {
        if let Some(d) = &mut self.disk {
            d.log.delete();
        }
    }

    /// Hands what was logged to the store's writer.
    pub fn flush(&mut self) {
        if let Some(d) = &mut self.disk {
            d.log.flush(false, false);
        }
    }

    /// What to acknowledge: every enqueue up to this id is safe here, and the last safe
    /// synchronisation point.
    pub fn safe(&mut self) -> (u64, u64) {
        let up_to = match self.disk.as_ref().and_then(|d| d.pending.keys().next()) {
            Some(&first) => self.top.min(first.saturating_sub(1)),
            None => self.top,
        };
        self.safe_up_to = self.safe_up_to.max(up_to);
        (self.safe_up_to, self.safe_sync)
    }

    /// The copy as a queue's messages (queue order), every one redelivered (see
    /// `Mirrors::take`), and the log that held it: to be deleted once the new queue has its
    /// own records ([`Retired`]).
    pub fn into_parts(self) -> (Vec<Recovered>, Retired) {
        let disk = self.disk;
        let msgs = self
            .msgs
            .into_iter()
            .map(|(id, (msg, exp))| Recovered {
                id,
                msg,
                redelivered: true,
                expires_at_ms: (exp != 0).then_some(exp),
            })
            .collect();
        (msgs, Retired(disk.map(|d| d.log)))
    }
}

/// A copy's log that is no longer needed: deleted when dropped, unless kept with
/// [`Retired::keep`].
pub struct Retired(Option<DiskLog>);

impl Retired {
    /// Keeps the records on disk (the log is let go without deleting them): a copy whose
    /// queue could not be made is found again at the next start.
    pub fn keep(mut self) {
        self.0.take();
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        if let Some(log) = &mut self.0 {
            log.delete();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_others_are_not_copies() {
        for (vhost, name) in [("/", "jobs"), ("v\0x", "a\0b"), ("", ""), ("é", "ü\0")] {
            let q = QueueRef {
                vhost: vhost.into(),
                name: name.into(),
            };
            assert_eq!(parse_key(&copy_key(&q, 7, 99)), Some((q, 7, 99)));
        }
        assert_eq!(parse_key("/\0jobs"), None);
        assert_eq!(parse_key("\0mirror\0x\x001\x001\0/q"), None);
        assert_eq!(
            parse_key("\0mirror\x001\x001\x009\0/q"),
            None,
            "vhost longer than the rest"
        );
    }

    fn msg(persistent: bool) -> Arc<Message> {
        let mut props = amq_protocol::protocol::basic::AMQPProperties::default();
        if persistent {
            props = props.with_delivery_mode(2);
        }
        Arc::new(
            Message::new(
                &crate::memory::UNIT_TESTS,
                "".into(),
                "q".into(),
                props,
                bytes::Bytes::from_static(b"body"),
            )
            .expect("message"),
        )
    }

    fn q() -> QueueRef {
        QueueRef {
            vhost: "/".into(),
            name: "q".into(),
        }
    }

    /// Waits for the copy's next store event and applies it.
    fn next_synced(
        c: &mut Copy,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<crate::store::StoreEvent>,
    ) {
        match rx.blocking_recv().expect("store event") {
            crate::store::StoreEvent::Synced { ids, .. } => c.synced(&ids),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn persistent_enqueues_are_acknowledged_once_synced_in_any_id_order_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let store =
            crate::store::Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("store");
        let key = copy_key(&q(), 4, 1);
        let (log, _, mut rx) = store.attach_key(key.clone());
        let mut c = Copy::new(Some(2), 4, 1, Some(log));
        // The stream brings 10 and 11 (transient 11), synchronisation then brings 3 and 4.
        c.enqueue(10, msg(true), 0);
        c.enqueue(11, msg(false), 0);
        assert_eq!(c.safe(), (9, 0), "10 waits for the disk");
        c.enqueue(3, msg(true), 0);
        c.enqueue(4, msg(true), 0);
        c.sync_point(77);
        assert_eq!(c.safe(), (9, 0), "the sync point waits for 3 and 4");
        c.flush();
        while c.safe() != (11, 77) {
            next_synced(&mut c, &mut rx);
        }
        // A settle of a message still waiting for the disk no longer holds acks back.
        c.enqueue(12, msg(true), 0);
        c.settle(&[12, 3]);
        assert_eq!(c.safe(), (12, 77));
        drop(c);
        store.close();
        drop(store);

        let store =
            crate::store::Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        assert_eq!(store.unclaimed_keys(KEY_PREFIX), vec![key.clone()]);
        assert!(store.unclaimed_keys("/").is_empty());
        let (log, msgs, _rx) = store.attach_key(key);
        let ids: Vec<u64> = msgs.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![4, 10], "the persistent ones not settled, by id");
        let c = Copy::recovered(4, 2, log, msgs);
        assert!(c.recovered);
        let (parts, retired) = c.into_parts();
        assert!(parts.iter().all(|r| r.redelivered));
        drop(retired);
        store.close();
        drop(store);
        let store =
            crate::store::Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        assert!(
            store.unclaimed_keys(KEY_PREFIX).is_empty(),
            "a retired copy is deleted"
        );
        store.close();
    }

    #[test]
    fn a_copy_without_disk_acknowledges_what_it_holds() {
        let mut c = Copy::new(Some(2), 1, 1, None);
        c.enqueue(5, msg(true), 0);
        c.sync_point(3);
        assert_eq!(c.safe(), (5, 3));
        c.reset();
        assert_eq!(c.safe(), (0, 0));
        assert!(c.is_empty());
    }

    #[test]
    fn a_discarded_copy_leaves_nothing_on_disk_and_a_dropped_one_stays() {
        let dir = tempfile::tempdir().expect("tmp");
        let store =
            crate::store::Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("store");
        for (nonce, discard) in [(1, true), (2, false)] {
            let (log, _, mut rx) = store.attach_key(copy_key(&q(), 1, nonce));
            let mut c = Copy::new(Some(2), 1, nonce, Some(log));
            c.enqueue(1, msg(true), 0);
            c.flush();
            while c.safe() != (1, 0) {
                next_synced(&mut c, &mut rx);
            }
            if discard {
                c.discard();
            }
        }
        store.close();
        drop(store);
        let store =
            crate::store::Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        assert_eq!(store.unclaimed_keys(KEY_PREFIX), vec![copy_key(&q(), 1, 2)]);
        store.close();
    }
}
