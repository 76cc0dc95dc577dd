//! [`DiskLog`]: the [`QueueLog`] of a durable queue, called on the queue's own thread.
//!
//! - Queue actors append records under the store's short mutex (enqueue, settle, delivered,
//!   delete) and hand them over with `flush` ([`QueueLog::flush`]) once they have handled a
//!   round of commands; `flush` either writes a small batch right there (see
//!   [`super::writer`], "who writes") or wakes the writer thread. Transient messages are safe
//!   at once and never logged; persistent ones are `Pending` until their batch is synced.
//! - A delivered flag goes into the message's enqueue record while that still waits among the
//!   latest pending ones (`State::mark_pending_delivered`), else into a delivered record and
//!   the delivery journal ([`super::journal`]) before the delivery is handed to the connection.
//! - Store ids are unique per queue name within a run: a queue declared again after a delete
//!   numbers its messages after the highest id its name ever had in this run (`base`; store
//!   id = queue id + `base`), so a journal record can never mark a message of a later queue
//!   with the same name. Each log records its highest id (`State::top`) when its queue is
//!   deleted or the log dropped.

use super::disk::Store;
use super::journal::journal_write;
use super::record::{Enqueue, Record};
use super::state::{Note, Slot, State};
use super::writer::{finish_batch, take_batch};
use super::StoreEvent;
use super::{QueueLog, Safety};
use crate::queue::{ConfirmTicket, Message};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The log of one durable queue: persistent messages go to the node's store.
#[derive(Debug)]
pub struct DiskLog {
    pub(super) store: Arc<Store>,
    pub(super) key: Arc<str>,
    pub(super) tx: mpsc::UnboundedSender<StoreEvent>,
    /// Store id = queue id + base (see the module docs).
    pub(super) base: u64,
    /// Highest store id used.
    pub(super) top: u64,
}

impl DiskLog {
    fn ids_record(&mut self, ids: &[u64], settle: bool) {
        let sh = &self.store.shared;
        let mut st = sh.state.lock();
        let Some(m) = st.queues.get_mut(&self.key) else {
            return;
        };
        let mut logged = Vec::new();
        let mut freed = Vec::new();
        for id in ids.iter().map(|id| id + self.base) {
            if settle {
                if let Some(s) = m.remove(&id) {
                    logged.push(id);
                    freed.push(s);
                }
            } else if let Some(s) = m.get_mut(&id) {
                if !s.delivered {
                    s.delivered = true;
                    logged.push(id);
                }
            }
        }
        if logged.is_empty() {
            return;
        }
        for s in freed {
            st.drop_live(s.seg, s.size);
        }
        // Delivered before their enqueues left memory (one publisher and its consumer, one
        // message in flight): the flag goes into those records, no journal write.
        if !settle && st.mark_pending_delivered(&self.key, &logged) {
            return;
        }
        let rec = if settle {
            Record::Settle {
                queue: &self.key,
                ids: logged,
            }
        } else {
            Record::Delivered {
                queue: &self.key,
                ids: logged,
            }
        };
        // Nobody waits for this record (the delivered flag is in the journal already; an ack
        // may come back after a crash, as before): it goes with the next batch that has an
        // enqueue, or after LAZY_WAIT, which saves the writer a batch of its own (a write and
        // the locking around it) per delivery and ack while publishes keep coming.
        let first = st.pending.is_empty();
        let lazy = first || st.lazy;
        st.append_kept(&rec);
        st.lazy = lazy;
        if !settle {
            journal_write(&mut st, &sh.dir, &rec);
        }
        drop(st);
        // The first waiting record wakes an idle writer so that it waits LAZY_WAIT at most
        // (while it is busy syncing a batch the wake-up costs nothing); records that join an
        // enqueue go with it (see `flush`).
        if first {
            sh.wake.notify_one();
        }
    }

    /// Remembers this queue's highest id for a later queue of the same name.
    fn record_top(&self, st: &mut State) {
        match st.top.get_mut(&self.key) {
            Some(t) => *t = (*t).max(self.top),
            None => {
                st.top.insert(self.key.clone(), self.top);
            }
        }
    }
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        let mut st = self.store.shared.state.lock();
        self.record_top(&mut st);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DiskLog {
    /// Logs a persistent enqueue; the writer reports it through `ticket` if given, else with
    /// `StoreEvent::Synced`.
    fn append_enqueue(
        &mut self,
        id: u64,
        msg: &Message,
        ttl_ms: Option<u64>,
        ticket: Option<ConfirmTicket>,
    ) {
        let id = id + self.base;
        self.top = self.top.max(id);
        let rec = Record::Enqueue(Enqueue {
            queue: &self.key,
            id,
            redelivered: false,
            expires_at_ms: ttl_ms.map(|t| now_ms().saturating_add(t)),
            exchange: msg.exchange(),
            routing_key: msg.routing_key(),
            header: msg.header_payload(),
            body: msg.body(),
        });
        let note = Note {
            queue: self.key.clone(),
            id,
            base: self.base,
            tx: self.tx.clone(),
            ticket,
            at: 0,
        };
        let sh = &self.store.shared;
        let mut st = sh.state.lock();
        let (seg, n) = st.append(&rec, Some(note));
        st.add_live(seg, n);
        st.queues.entry(self.key.clone()).or_default().insert(
            id,
            Slot {
                seg,
                size: n,
                delivered: false,
            },
        );
        // Written by `flush`, which the queue calls once it has handled its round of commands.
    }
}

/// Lets idle runtime threads take the tasks this thread has just woken, before it blocks in a
/// sync. The last task a runtime thread wakes waits in a slot that only this thread runs (the
/// next task to run, for locality); spawning a task moves it to this thread's queue, which the
/// others steal from, and wakes an idle one. The cost is that wake-up. Yielding instead would
/// run the woken tasks here first, and the sync after them. Outside a runtime: nothing to do.
fn hand_off_woken_tasks() {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async {});
    }
}

impl QueueLog for DiskLog {
    fn enqueue(&mut self, id: u64, msg: &Message, ttl_ms: Option<u64>) -> Safety {
        if !msg.persistent() {
            return Safety::Safe;
        }
        self.append_enqueue(id, msg, ttl_ms, None);
        Safety::Pending
    }

    fn enqueue_confirmed(
        &mut self,
        id: u64,
        msg: &Message,
        ttl_ms: Option<u64>,
        ticket: ConfirmTicket,
    ) -> Option<(Safety, ConfirmTicket)> {
        if !msg.persistent() {
            return Some((Safety::Safe, ticket));
        }
        self.append_enqueue(id, msg, ttl_ms, Some(ticket));
        None
    }

    fn settle(&mut self, ids: &[u64]) {
        self.ids_record(ids, true);
    }

    /// Hands pending enqueues to be written. When the queue is `idle`, the batch is small and
    /// nobody else writes one, the queue's own thread writes and syncs it and sends its
    /// confirms: one publisher waiting for one confirm then costs no thread hand-over, which
    /// is most of the cost of a confirm besides the sync itself. Otherwise the writer thread
    /// is woken and takes it (group commit). Before a sync on the queue's thread, the tasks
    /// the queue `woke` are handed to the other runtime threads ([`hand_off_woken_tasks`]).
    fn flush(&mut self, idle: bool, woke: bool) -> bool {
        let sh = &self.store.shared;
        let mut st = sh.state.lock();
        if st.pending.is_empty() || st.lazy {
            return false;
        }
        if !idle || !st.writable_here() {
            drop(st);
            sh.wake.notify_one();
            return false;
        }
        let batch = take_batch(sh, &mut st, None);
        drop(st);
        if woke {
            hand_off_woken_tasks();
        }
        if finish_batch(sh, batch) {
            sh.wake.notify_one();
        }
        true
    }

    fn delivered(&mut self, ids: &[u64]) {
        self.ids_record(ids, false);
    }

    fn requeue(&mut self, _ids: &[u64]) {
        // A requeued message is already marked delivered; its position is its id.
    }

    fn delete(&mut self) {
        let sh = &self.store.shared;
        let mut st = sh.state.lock();
        // Before the queue's name is free again (Drop may come later).
        self.record_top(&mut st);
        let Some(m) = st.queues.get_mut(&self.key) else {
            return;
        };
        if m.is_empty() {
            return;
        }
        let slots: Vec<Slot> = m.drain().map(|(_, s)| s).collect();
        for s in slots {
            st.drop_live(s.seg, s.size);
        }
        st.append_kept(&Record::DeleteQueue { queue: &self.key });
        drop(st);
        sh.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::{Publishers, INLINE_MAX_BYTES};
    use crate::store::testing::{confirms, persistent_msg, ticket};

    #[test]
    fn an_idle_queue_writes_one_publishers_small_batch_itself_and_its_confirms_are_out_at_once() {
        let data = tempfile::tempdir().expect("tempdir");
        // No writer thread: whatever reaches the disk, the queue wrote.
        let store =
            Store::start(data.path(), 1 << 20, false, &crate::memory::UNIT_TESTS).expect("open");
        let (mut log, _, mut rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        for seq in 1..=3 {
            assert!(log
                .enqueue_confirmed(seq, &persistent_msg(b"c"), None, ticket(&ctx, seq))
                .is_none());
            assert!(confirms(&mut crx).is_empty(), "confirmed before the write");
            assert!(log.flush(true, false));
            assert_eq!(confirms(&mut crx), vec![(seq, true)]);
        }
        // Nobody waits for a publish without a confirm: left to the writer thread, or to
        // the next batch that someone waits for.
        log.enqueue(4, &persistent_msg(b"u"), None);
        assert!(!log.flush(true, false));
        log.enqueue_confirmed(5, &persistent_msg(b"c"), None, ticket(&ctx, 5));
        assert!(log.flush(true, false));
        assert_eq!(confirms(&mut crx), vec![(5, true)]);
        assert!(matches!(
            rx.try_recv(),
            Ok(StoreEvent::Synced { up_to: 4, .. })
        ));
        // Another publisher (channel 2 of the connection): left to the writer thread, which
        // keeps the disk busy while the queue takes in what the others send.
        let other = ConfirmTicket {
            events: ctx.clone(),
            conn_id: 1,
            channel: 2,
            generation: 0,
            seq: 6,
        };
        log.enqueue_confirmed(6, &persistent_msg(b"o"), None, other);
        assert!(!log.flush(true, false));
        // So is a batch with both.
        log.enqueue_confirmed(7, &persistent_msg(b"c"), None, ticket(&ctx, 7));
        assert!(!log.flush(true, false));
        // Not idle: left to the writer thread.
        let (mut log2, _, _rx2) = store.attach("/", "q2");
        store.shared.state.lock().pending.clear();
        log2.enqueue_confirmed(1, &persistent_msg(b"n"), None, ticket(&ctx, 8));
        store.shared.state.lock().last_publishers = Publishers::None;
        assert!(!log2.flush(false, false));
        // Too big for the queue's thread: left to the writer thread too.
        let big = persistent_msg(&[7u8; 1024]);
        for seq in 9..=(9 + (INLINE_MAX_BYTES / 1024) as u64) {
            log2.enqueue_confirmed(seq, &big, None, ticket(&ctx, seq));
        }
        assert!(store.shared.state.lock().pending_bytes() > INLINE_MAX_BYTES);
        assert!(!log2.flush(true, false));
        assert!(confirms(&mut crx).is_empty());
        store.shared.state.lock().pending.clear();
        drop((log, log2));
        store.close();
        drop(store);
        // What the queue wrote is on disk; nothing else is.
        let store = Store::open(data.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        let (_log, rec, _rx) = store.attach("/", "q");
        let ids: Vec<u64> = rec.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        let (_log2, rec, _rx2) = store.attach("/", "q2");
        assert!(rec.is_empty());
        store.close();
    }

    /// A task woken just before this thread blocks still runs, on the other runtime thread.
    #[test]
    fn a_task_woken_before_the_thread_blocks_runs_elsewhere_after_the_hand_off() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::spawn(async {
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let (wake_tx, wake_rx) = tokio::sync::oneshot::channel::<()>();
                let (ran_tx, ran_rx) = std::sync::mpsc::channel();
                tokio::spawn(async move {
                    let _ = ready_tx.send(());
                    let _ = wake_rx.await;
                    let _ = ran_tx.send(());
                });
                ready_rx.await.expect("woken task started");
                // Woken from this runtime thread: it sits in this thread's next-task slot.
                wake_tx.send(()).expect("wake");
                hand_off_woken_tasks();
                // Blocks this thread the way a sync does.
                ran_rx
                    .recv_timeout(std::time::Duration::from_secs(5))
                    .expect("the woken task did not run while this thread was blocked");
            })
            .await
            .expect("task");
        });
    }

    #[test]
    fn a_queue_declared_again_numbers_its_messages_after_the_deleted_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("open");
        let (mut log, rec, _rx) = store.attach("/", "q");
        assert!(rec.is_empty());
        log.enqueue(1, &persistent_msg(b"a"), None);
        log.enqueue(2, &persistent_msg(b"b"), None);
        log.delete();
        let (mut log2, rec, _rx2) = store.attach("/", "q");
        assert!(rec.is_empty());
        assert_eq!(log2.base, 2, "ids of the deleted queue would be reused");
        log2.enqueue(1, &persistent_msg(b"c"), None);
        drop((log, log2));
        store.close();
        drop(store);
        let store = Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        let (log, rec, _rx) = store.attach("/", "q");
        assert_eq!(log.base, 0);
        let got: Vec<(u64, &[u8])> = rec.iter().map(|r| (r.id, r.msg.body())).collect();
        assert_eq!(got, vec![(3, &b"c"[..])]);
        store.close();
    }
}
