//! Writing a batch: taking what is pending, writing it with one `fdatasync`, sending the
//! publisher confirms after the sync, and the writer thread (`warren-store`) that does this
//! in a loop along with all reclaim work.
//!
//! - Group commit, one batch at a time: whoever writes a batch takes everything pending
//!   ([`take_batch`]), writes it, and runs one `fdatasync` for the whole batch
//!   ([`finish_batch`]); then it sends the publisher confirms of the batch itself (each
//!   enqueue that wants one carries its [`ConfirmTicket`]: one hop less than going through the
//!   queue actor), and tells each queue about the rest of its enqueues on disk
//!   (`StoreEvent::Synced`) or about all of them when the batch failed (`StoreEvent::WriteFailed`,
//!   with their tickets: the queue drops them, then nacks their publishes). The next batch
//!   starts as soon as the previous sync ends: no timer, no added delay when idle. While a
//!   batch is being written (`State::busy`) nobody else takes one.
//! - Who writes: a queue with nothing else to do writes a small batch (up to
//!   `INLINE_MAX_BYTES`) of one publisher itself when no batch is being written (see
//!   `DiskLog::flush` and `State::writable_here`); with one publisher waiting for one confirm,
//!   handing the batch to another thread and the confirm back costs about as much as the sync.
//!   Otherwise the writer thread takes it. The writer thread also does all reclaim work
//!   (decided in [`super::segments`]); a queue's batch wakes it when it leaves some.
//! - Records nobody waits for (deliveries, settles) may wait up to [`LAZY_WAIT`] for an
//!   enqueue to go with (`State::lazy`), and only enqueues and compaction copies need the sync.
//! - A failed batch (full disk, I/O error) forgets only its enqueues (their publishes are
//!   nacked; a settle record is logged for them in case part of the batch reached the file);
//!   its settles, deliveries and queue deletes are written again, in order, ahead of newer
//!   records, by the next batch (`State::fail_batch`). The writer waits a little between
//!   failed attempts.

use super::prewrite::stop_preparer;
use super::segments::{seg_path, sync, write_batch, OpenSeg};
use super::state::{Chunk, Publishers, Shared, Slot, State};
use super::StoreEvent;
use crate::queue::ConfirmTicket;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Longest time delivery and settle records wait for an enqueue to go with.
const LAZY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Pause between attempts while batches fail (the disk is full or failing).
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// A batch taken for writing, with what its writer needs.
pub(super) struct Batch {
    chunks: Vec<Chunk>,
    /// Compaction copies in the batch (to undo if the write fails).
    moved: Vec<(Arc<str>, u64, Slot)>,
    /// A delivery journal to empty once the batch is written.
    journal: Option<(usize, Arc<File>)>,
    open: Option<OpenSeg>,
}

/// Takes everything pending (plus the live records of the segment to compact, if given) as
/// the next batch and marks the store busy until [`finish_batch`].
pub(super) fn take_batch(sh: &Shared, st: &mut State, compact: Option<&(u64, Vec<u8>)>) -> Batch {
    // A pre-written file became ready while appending to a plain one (the first segment, or
    // after a full disk): move on to it now rather than at rollover.
    if st
        .open
        .as_ref()
        .is_some_and(|o| !o.prewritten && o.seg == st.cur_seg)
        && sh.prep.lock().ready
    {
        st.cur_seg += 1;
    }
    let moved = match compact {
        Some((s, bytes)) => st.copy_live(*s, bytes),
        None => Vec::new(),
    };
    let switch_at = st.journal_switch_bytes;
    let journal = st.journal.as_mut().and_then(|j| j.take_batch(switch_at));
    st.lazy = false;
    st.busy = true;
    match Publishers::of(&st.pending) {
        Publishers::None => {}
        p => st.last_publishers = p,
    }
    Batch {
        chunks: std::mem::take(&mut st.pending),
        moved,
        journal,
        open: st.open.take(),
    }
}

/// Writes a batch taken by [`take_batch`], sends its confirms and tells the queues, and ends
/// the busy state. Returns whether the writer thread has something to do now.
pub(super) fn finish_batch(sh: &Shared, b: Batch) -> bool {
    let Batch {
        chunks,
        moved,
        journal,
        mut open,
    } = b;
    let mut chunks = chunks;
    // Only enqueues (confirms wait for them) and compaction copies (the old segment is
    // deleted next) need the sync; acks and deliveries ride along with the next one.
    let durable = !moved.is_empty() || chunks.iter().any(|c| !c.notes.is_empty());
    let result = write_batch(&sh.dir, Some(sh), &sh.syncs, &mut open, &chunks, durable);
    // Confirms first: they are what the publishers wait for. Each ticket is in exactly one
    // note and the chunks are dropped after this pass: sent once. A failed batch's tickets
    // go to their queues instead, which nack them once the messages are out of the queue
    // (a publisher that sees the nack never finds its message still counted or delivered).
    if result.is_ok() {
        for c in &chunks {
            for t in c.notes.iter().filter_map(|n| n.ticket.as_ref()) {
                t.send(true);
            }
        }
    }
    // Tell each queue about its enqueues in this batch: on success only those it still
    // waits for (no ticket), on failure all of them, with their tickets.
    // (A deleted queue and its namesake declared since differ in `base`.)
    #[derive(Default)]
    struct Report {
        up_to: u64,
        ids: Vec<u64>,
        tickets: Vec<ConfirmTicket>,
    }
    let mut per_queue: HashMap<(Arc<str>, u64), (mpsc::UnboundedSender<StoreEvent>, Report)> =
        HashMap::new();
    for c in &mut chunks {
        for n in &mut c.notes {
            if result.is_ok() && n.ticket.is_some() {
                continue;
            }
            let (_, r) = per_queue
                .entry((n.queue.clone(), n.base))
                .or_insert_with(|| (n.tx.clone(), Report::default()));
            let id = n.id - n.base;
            r.up_to = r.up_to.max(id);
            r.ids.push(id);
            r.tickets.extend(n.ticket.take());
        }
    }
    // The batch's delivery records are in the segment now (page cache: enough for a
    // process crash), so the journal that holds them can be emptied.
    let journal_done = match (&result, journal) {
        (Ok(()), Some((i, f))) => match f.set_len(0) {
            Ok(()) => Some(i),
            Err(e) => {
                warn!(error = %e, "store: cannot truncate a delivery journal");
                None
            }
        },
        _ => None,
    };
    let mut st = sh.state.lock();
    if let (Some(i), Some(j)) = (journal_done, st.journal.as_mut()) {
        j.len[i] = 0;
    }
    match &result {
        Ok(()) => {
            st.unhealthy = false;
            st.written_below = open.as_ref().map_or(st.cur_seg, |o| o.seg);
        }
        Err(e) => {
            if !st.unhealthy {
                warn!(error = %e, "store: write failed; affected publishes are nacked");
            }
            st.unhealthy = true;
            st.fail_batch(&chunks, moved);
            if st.shutdown {
                // Stopping: no more attempts (the broker exits with what is on disk).
                st.pending.clear();
            }
        }
    }
    st.open = open;
    st.busy = false;
    if st.reclaim_due() {
        st.reclaim = true;
    }
    let wake = st.shutdown || st.writer_waits || st.reclaim || !st.pending.is_empty();
    drop(st);
    for (_, (tx, r)) in per_queue {
        let cmd = match result {
            Ok(()) => StoreEvent::Synced {
                up_to: r.up_to,
                ids: r.ids,
            },
            Err(_) => StoreEvent::WriteFailed {
                ids: r.ids,
                tickets: r.tickets,
            },
        };
        if let Err(mpsc::error::SendError(StoreEvent::WriteFailed { tickets, .. })) = tx.send(cmd) {
            // The queue is gone: nack here.
            for t in tickets {
                t.send(false);
            }
        }
    }
    wake
}

pub(super) fn writer_loop(sh: &Shared) {
    let mut reported = 0;
    'run: loop {
        // Reclaim: unlink dead segments, pick one to compact (among the segments left: the
        // oldest may only now be the one to compact, and nothing may come to wake us again).
        let (dead, candidate) = {
            let mut st = sh.state.lock();
            let dead = st.take_dead_segments();
            let candidate = st.compaction_candidate().filter(|c| Some(*c) != st.stuck);
            (dead, candidate)
        };
        for s in dead {
            if let Err(e) = std::fs::remove_file(seg_path(&sh.dir, s)) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(segment = s, error = %e, "store: cannot delete segment");
                }
            }
        }
        let compact = candidate.and_then(|s| match std::fs::read(seg_path(&sh.dir, s)) {
            Ok(b) => Some((s, b)),
            Err(e) => {
                warn!(segment = s, error = %e, "store: cannot read segment to compact");
                None
            }
        });
        let batch = {
            let mut st = sh.state.lock();
            if st.unhealthy && !st.shutdown {
                // The last batch failed and its records are pending again: do not spin.
                sh.wake.wait_for(&mut st, RETRY_PAUSE);
            }
            loop {
                if st.busy {
                    // A queue writes a batch itself (DiskLog::flush); it wakes us when done.
                    st.writer_waits = true;
                    sh.wake.wait(&mut st);
                    st.writer_waits = false;
                    continue;
                }
                if st.shutdown
                    || st.reclaim
                    || compact.is_some()
                    || (!st.pending.is_empty() && !st.lazy)
                {
                    break;
                }
                // Wakes at least once a second to report the sync count when it moved
                // (debug level; the benchmark reads it), and after LAZY_WAIT to write records
                // that waited.
                let wait = if st.lazy {
                    LAZY_WAIT
                } else {
                    std::time::Duration::from_secs(1)
                };
                if sh.wake.wait_for(&mut st, wait).timed_out() {
                    st.lazy = false;
                    let n = sh.syncs.load(Ordering::Relaxed);
                    if n != reported {
                        reported = n;
                        debug!(syncs = n, "store: sync count");
                    }
                }
            }
            st.reclaim = false;
            if st.pending.is_empty() && compact.is_none() {
                if st.shutdown {
                    break 'run;
                }
                // Woken for reclaim only.
                continue 'run;
            }
            let b = take_batch(sh, &mut st, compact.as_ref());
            if let (Some((s, _)), true) = (&compact, b.moved.is_empty()) {
                st.stuck = Some(*s);
            }
            b
        };
        finish_batch(sh, batch);
    }
    stop_preparer(sh);
    let open = sh.state.lock().open.take();
    if let Some(o) = open {
        if o.prewritten {
            // Hand back the unused zero-filled rest (replay would accept it as it is).
            let _ = o.file.set_len(o.len);
        }
        let _ = sync(&o.file, &sh.syncs);
    }
}

#[cfg(test)]
mod tests {
    use super::StoreEvent;
    use crate::queue::Message;
    use crate::store::testing::{confirms, persistent_msg, ticket, wait_synced};
    use crate::store::{QueueLog, Safety, Store};
    use bytes::Bytes;
    use tokio::sync::mpsc;

    #[test]
    fn the_writer_sends_the_confirms_of_a_synced_batch_itself() {
        let data = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open_with(data.path(), 1 << 20, &crate::memory::UNIT_TESTS).expect("open");
        let (mut log, _, mut rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        for seq in 1..=5 {
            let left = log.enqueue_confirmed(seq, &persistent_msg(b"x"), None, ticket(&ctx, seq));
            assert!(left.is_none(), "the store keeps the ticket");
        }
        // A publish without a confirm is still reported to the queue; it comes after the
        // confirmed ones, so once it is synced all of them are.
        assert_eq!(log.enqueue(6, &persistent_msg(b"y"), None), Safety::Pending);
        log.flush(false, false);
        wait_synced(&mut rx, 6);
        assert_eq!(
            confirms(&mut crx),
            (1..=5).map(|s| (s, true)).collect::<Vec<_>>()
        );
        // A transient message in a durable queue: safe at once, the ticket stays with the
        // queue (whose tracker confirms it), nothing is logged.
        let props = amq_protocol::protocol::basic::AMQPProperties::default();
        let transient = Message::new(
            &crate::memory::UNIT_TESTS,
            "".into(),
            "q".into(),
            props,
            Bytes::from_static(b"t"),
        )
        .expect("message");
        let (safety, t) = log
            .enqueue_confirmed(7, &transient, None, ticket(&ctx, 7))
            .expect("ticket handed back");
        assert_eq!((safety, t.seq), (Safety::Safe, 7));
        assert!(confirms(&mut crx).is_empty());
        store.close();
        assert!(
            rx.try_recv().is_err(),
            "confirmed enqueues reported to the queue too"
        );
    }

    #[test]
    fn a_failed_batch_hands_the_queue_every_id_and_the_tickets_to_nack() {
        let data = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open_with(data.path(), 1 << 20, &crate::memory::UNIT_TESTS).expect("open");
        // A file where the segment directory should be: every write fails.
        let msgs = data.path().join("msgs");
        if msgs.exists() {
            std::fs::remove_dir_all(&msgs).expect("rm");
        }
        std::fs::write(&msgs, b"not a directory").expect("write");
        let (mut log, _, mut rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        assert!(log
            .enqueue_confirmed(1, &persistent_msg(b"a"), None, ticket(&ctx, 1))
            .is_none());
        assert_eq!(log.enqueue(2, &persistent_msg(b"b"), None), Safety::Pending);
        log.flush(false, false);
        let mut failed = Vec::new();
        let mut to_nack = Vec::new();
        while failed.len() < 2 {
            match rx.blocking_recv().expect("store events") {
                StoreEvent::WriteFailed { ids, tickets } => {
                    failed.extend(ids);
                    to_nack.extend(tickets.iter().map(|t| t.seq));
                }
                other => panic!("unexpected store event {other:?}"),
            }
        }
        failed.sort_unstable();
        assert_eq!(failed, vec![1, 2]);
        assert_eq!(to_nack, vec![1]);
        // Nothing was nacked before the queue had the failure.
        assert!(confirms(&mut crx).is_empty());
        store.close();
    }
}
