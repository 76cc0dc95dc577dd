//! The store's books: what it knows in memory, and what its threads share.
//!
//! [`State`], under one short mutex ([`Shared::state`]), holds the segments' live counts, each
//! queue's message slots, the records waiting to be written (the pending batch: [`Chunk`]s of
//! encoded records, with a [`Note`] for each enqueue) and who may write them. The methods here
//! build and undo the pending batch; the other parts add their own `impl State` blocks
//! (segment books and reclaim in [`super::segments`]).
//!
//! Invariants worth naming:
//! - Each message the store holds has one [`Slot`] (its segment and record size), counted live
//!   in exactly that segment's `Seg`.
//! - Pending records are in log order, grouped in one chunk per segment; each publisher confirm
//!   ticket is in exactly one note, so whoever writes the batch sends it exactly once.
//! - Settle, delivered and delete records are "kept" (`Chunk::retry`): a failed batch queues
//!   them again, in order, ahead of newer records ([`State::fail_batch`]); its enqueues are
//!   forgotten instead (their publishes are nacked).
//! - Store ids are unique per queue name within a run: `top` remembers the highest id each name
//!   has had (see `base` in [`super::log`]).

use super::journal::{Journal, JOURNAL_SWITCH_BYTES};
use super::prewrite::Prep;
use super::record::{self, Record};
use super::replay::Live;
use super::segments::{OpenSeg, Seg};
use super::StoreEvent;
use crate::intmap::IntMap;
use crate::memory::Memory;
use crate::queue::ConfirmTicket;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Largest batch a queue writes and syncs on its own thread (see `DiskLog::flush`); bigger
/// ones go to the writer thread.
pub(super) const INLINE_MAX_BYTES: usize = 64 << 10;

/// How many of the latest pending enqueues per chunk a delivery looks through for its own
/// (see `State::mark_pending_delivered`); older ones get a delivered record.
pub(super) const MARK_SCAN: usize = 16;

/// Where the store keeps one message: the segment and size of its enqueue record, and whether
/// it was delivered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) seg: u64,
    pub(super) size: u64,
    pub(super) delivered: bool,
}

/// An enqueue in the pending batch: whom to tell once its batch is written.
#[derive(Debug)]
pub(super) struct Note {
    pub(super) queue: Arc<str>,
    /// Store id; the queue's own id is `id - base`.
    pub(super) id: u64,
    pub(super) base: u64,
    pub(super) tx: mpsc::UnboundedSender<StoreEvent>,
    /// The publisher confirm, sent by the writer once the batch is synced (or failed).
    pub(super) ticket: Option<ConfirmTicket>,
    /// Where the enqueue record starts in its chunk's buffer (set by `State::append`).
    pub(super) at: usize,
}

/// Pending records for one segment, encoded, in log order.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) seg: u64,
    pub(super) buf: Vec<u8>,
    pub(super) notes: Vec<Note>,
    /// Byte ranges of records written again if the batch fails (settles, deliveries, queue
    /// deletes; not enqueues, not compaction copies).
    retry: Vec<(usize, usize)>,
}

/// The books (see the module docs).
#[derive(Debug)]
pub(super) struct State {
    pub(super) cur_seg: u64,
    pub(super) pending: Vec<Chunk>,
    pub(super) segs: BTreeMap<u64, Seg>,
    pub(super) queues: HashMap<Arc<str>, IntMap<u64, Slot>>,
    pub(super) unclaimed: HashMap<String, BTreeMap<u64, Live>>,
    pub(super) shutdown: bool,
    /// The last batch failed: no compaction until a batch succeeds again.
    pub(super) unhealthy: bool,
    /// Segments below this one are fully written (the writer has moved past them).
    pub(super) written_below: u64,
    segment_bytes: u64,
    /// Highest store id each queue name has had in this run (see `base` in the `log` module
    /// docs).
    pub(super) top: HashMap<Arc<str>, u64>,
    /// Created at the first delivery; None until then or while it cannot be created.
    pub(super) journal: Option<Journal>,
    /// A journal problem was logged (logged once until the journal works again).
    pub(super) journal_warned: bool,
    /// See [`JOURNAL_SWITCH_BYTES`].
    pub(super) journal_switch_bytes: u64,
    /// Everything pending may wait (delivery and settle records only: nobody waits for them):
    /// the writer takes it with the next enqueue or after `LAZY_WAIT`, not at once.
    pub(super) lazy: bool,
    /// A batch is being written (by the writer thread or by a queue, see `DiskLog::flush`):
    /// nobody else takes one until it is done.
    pub(super) busy: bool,
    /// The segment batches are appended to; taken by whoever writes a batch.
    pub(super) open: Option<OpenSeg>,
    /// The writer thread waits for a queue's batch to end.
    pub(super) writer_waits: bool,
    /// Reclaim work (a dead segment, a compaction) turned up after a queue's batch: the
    /// writer thread does it.
    pub(super) reclaim: bool,
    /// A segment whose compaction moved nothing (its live records unreadable): not retried.
    pub(super) stuck: Option<u64>,
    /// Who waited for the confirms of the last batch that had any.
    pub(super) last_publishers: Publishers,
}

/// The publishers (connection and channel) waiting for the confirms of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Publishers {
    None,
    One((u64, u16)),
    Many,
}

impl Publishers {
    pub(super) fn of(chunks: &[Chunk]) -> Self {
        let mut out = Publishers::None;
        for t in chunks
            .iter()
            .flat_map(|c| &c.notes)
            .filter_map(|n| n.ticket.as_ref())
        {
            match out {
                Publishers::None => out = Publishers::One(t.publisher()),
                Publishers::One(p) if p == t.publisher() => {}
                _ => return Publishers::Many,
            }
        }
        out
    }
}

impl State {
    /// The books of a store whose next segment is `cur_seg`, with the replayed segments `segs`.
    pub(super) fn new(cur_seg: u64, segs: BTreeMap<u64, Seg>, segment_bytes: u64) -> Self {
        State {
            cur_seg,
            pending: Vec::new(),
            segs,
            queues: HashMap::new(),
            unclaimed: HashMap::new(),
            shutdown: false,
            unhealthy: false,
            written_below: cur_seg,
            segment_bytes,
            top: HashMap::new(),
            journal: None,
            journal_warned: false,
            journal_switch_bytes: JOURNAL_SWITCH_BYTES,
            lazy: false,
            busy: false,
            open: None,
            writer_waits: false,
            reclaim: false,
            stuck: None,
            last_publishers: Publishers::None,
        }
    }

    /// Appends one record to the current segment (rolling over when full); returns the
    /// segment and the record's size.
    pub(super) fn append(&mut self, rec: &Record<'_>, mut note: Option<Note>) -> (u64, u64) {
        self.lazy = false;
        if self.pending.last().is_none_or(|c| c.seg != self.cur_seg) {
            self.pending.push(Chunk {
                seg: self.cur_seg,
                buf: Vec::new(),
                notes: Vec::new(),
                retry: Vec::new(),
            });
        }
        let Some(chunk) = self.pending.last_mut() else {
            return (self.cur_seg, 0);
        };
        let start = chunk.buf.len();
        let n = record::encode(rec, &mut chunk.buf) as u64;
        let seg = self.segs.entry(self.cur_seg).or_insert(Seg {
            size: record::MAGIC.len() as u64,
            ..Seg::default()
        });
        if seg.size + n > self.segment_bytes && seg.size > record::MAGIC.len() as u64 {
            let tail = chunk.buf.split_off(start);
            self.cur_seg += 1;
            self.segs.insert(
                self.cur_seg,
                Seg {
                    size: record::MAGIC.len() as u64 + n,
                    ..Seg::default()
                },
            );
            if let Some(note) = note.as_mut() {
                note.at = 0;
            }
            self.pending.push(Chunk {
                seg: self.cur_seg,
                buf: tail,
                notes: note.into_iter().collect(),
                retry: Vec::new(),
            });
        } else {
            seg.size += n;
            if let Some(note) = note.as_mut() {
                note.at = start;
            }
            chunk.notes.extend(note);
        }
        (self.cur_seg, n)
    }

    /// Appends a settle, delivered or delete record: one the writer retries after a failure.
    pub(super) fn append_kept(&mut self, rec: &Record<'_>) {
        let (_, n) = self.append(rec, None);
        if let Some(c) = self.pending.last_mut() {
            // The record always ends the last chunk (a rollover moves it to a new one).
            let end = c.buf.len();
            c.retry.push((end - n as usize, end));
        }
    }

    /// Marks the enqueue records of `ids` (store ids of `queue`) redelivered where they wait
    /// in the pending batch, if every one of them is among the last [`MARK_SCAN`] enqueues
    /// there; else changes nothing and returns false. A marked message needs no delivered
    /// record: its flag reaches the file with the enqueue itself, or neither does.
    pub(super) fn mark_pending_delivered(&mut self, queue: &Arc<str>, ids: &[u64]) -> bool {
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            let hit = self.pending.iter().enumerate().rev().find_map(|(ci, c)| {
                c.notes
                    .iter()
                    .rev()
                    .take(MARK_SCAN)
                    .find(|n| n.id == id && n.queue == *queue)
                    .map(|n| (ci, n.at))
            });
            match hit {
                Some(h) => found.push(h),
                None => return false,
            }
        }
        for (ci, at) in found {
            let marked = self.pending[ci]
                .buf
                .get_mut(at..)
                .is_some_and(record::mark_redelivered);
            debug_assert!(marked, "a note points at its enqueue record");
        }
        true
    }

    /// Undoes the books of a batch whose write failed: its enqueues are forgotten (with a
    /// settle record logged in case part of the batch reached a file), compaction copies go
    /// back to their originals, and its other records are queued again ahead of everything
    /// appended since the batch was taken, in their order.
    pub(super) fn fail_batch(&mut self, chunks: &[Chunk], moved: Vec<(Arc<str>, u64, Slot)>) {
        // The records to write again and their ranges in `again`.
        let mut again = Vec::new();
        let mut ranges = Vec::new();
        for c in chunks {
            for &(a, b) in &c.retry {
                if let Some(r) = c.buf.get(a..b) {
                    ranges.push((again.len(), again.len() + r.len()));
                    again.extend_from_slice(r);
                }
            }
        }
        let mut forgotten: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
        for c in chunks {
            for n in &c.notes {
                let slot = self.queues.get_mut(&n.queue).and_then(|m| m.remove(&n.id));
                if let Some(s) = slot {
                    self.drop_live(s.seg, s.size);
                }
                match forgotten.last_mut() {
                    Some((q, ids)) if *q == n.queue => ids.push(n.id),
                    _ => forgotten.push((n.queue.clone(), vec![n.id])),
                }
            }
        }
        for (q, ids) in &forgotten {
            let start = again.len();
            let rec = Record::Settle {
                queue: q,
                ids: ids.clone(),
            };
            let n = record::encode(&rec, &mut again);
            ranges.push((start, start + n));
        }
        for (q, id, old) in moved {
            let cur = self.queues.get(&q).and_then(|m| m.get(&id)).copied();
            if let Some(cur) = cur {
                self.drop_live(cur.seg, cur.size);
                self.add_live(old.seg, old.size);
                if let Some(s) = self.queues.get_mut(&q).and_then(|m| m.get_mut(&id)) {
                    s.seg = old.seg;
                    s.size = old.size;
                }
            }
        }
        if again.is_empty() {
            return;
        }
        match self.pending.first_mut() {
            // Ahead of the newer records in the oldest pending chunk: no segment number is
            // reused and the order holds (a segment may end a little past its nominal size).
            Some(first) => {
                let n = again.len();
                ranges.extend(first.retry.iter().map(|&(a, b)| (a + n, b + n)));
                again.extend_from_slice(&first.buf);
                first.buf = again;
                first.retry = ranges;
                let seg = first.seg;
                if let Some(s) = self.segs.get_mut(&seg) {
                    s.size += n as u64;
                }
            }
            None => {
                for r in record::scan_journal(&again) {
                    self.append_kept(&r);
                }
            }
        }
    }

    /// Whether a queue may write the pending batch on its own thread (see `DiskLog::flush`):
    /// nobody else is writing, the batch is small, and one publisher waits for its confirms,
    /// the same one as in the last batch with confirms (or the first). With several
    /// publishers waiting, the writer thread does better: it syncs the next batch while the
    /// queues handle what comes in, where a queue's thread would do one after the other.
    pub(super) fn writable_here(&self) -> bool {
        if self.busy || self.shutdown || self.unhealthy || self.pending_bytes() > INLINE_MAX_BYTES {
            return false;
        }
        match (Publishers::of(&self.pending), self.last_publishers) {
            (Publishers::One(p), Publishers::One(q)) => p == q,
            (Publishers::One(_), Publishers::None) => true,
            _ => false,
        }
    }

    pub(super) fn pending_bytes(&self) -> usize {
        self.pending.iter().map(|c| c.buf.len()).sum()
    }
}

/// What the store's threads share: the books, the writer's wake-up and the hand-over of the
/// pre-written segment.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) state: Mutex<State>,
    /// Wakes the writer (work pending or shutdown).
    pub(super) wake: Condvar,
    pub(super) segment_bytes: u64,
    pub(super) prep: Mutex<Prep>,
    /// Wakes the preparer (a prepared file is wanted, or shutdown).
    pub(super) prep_wake: Condvar,
    /// Number of fdatasync calls (recovery's included).
    pub(super) syncs: AtomicU64,
    /// The node's memory account, charged for recovered messages.
    pub(super) memory: &'static Memory,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{enq, file, state};

    fn kinds(buf: &[u8]) -> Vec<String> {
        record::scan(buf)
            .records
            .iter()
            .map(|(_, _, r)| match r {
                Record::Enqueue(e) => format!("enq {} {}", e.queue, e.id),
                Record::Delivered { queue, ids } => format!("dlv {queue} {ids:?}"),
                Record::Settle { queue, ids } => format!("stl {queue} {ids:?}"),
                Record::DeleteQueue { queue } => format!("del {queue}"),
            })
            .collect()
    }

    #[test]
    fn a_failed_batch_forgets_its_enqueues_and_queues_its_other_records_again_first() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut st = state(1 << 20);
        let q: Arc<str> = "q".into();
        let enq_noted = |st: &mut State, id: u64| {
            let note = Note {
                queue: q.clone(),
                id,
                base: 0,
                tx: tx.clone(),
                ticket: None,
                at: 0,
            };
            let (seg, n) = st.append(&enq(&q, id, b"body"), Some(note));
            st.add_live(seg, n);
            st.queues.entry(q.clone()).or_default().insert(
                id,
                Slot {
                    seg,
                    size: n,
                    delivered: false,
                },
            );
        };
        enq_noted(&mut st, 1);
        st.append_kept(&Record::Delivered {
            queue: &q,
            ids: vec![7],
        });
        enq_noted(&mut st, 2);
        st.append_kept(&Record::Settle {
            queue: &q,
            ids: vec![8],
        });
        st.append_kept(&Record::DeleteQueue { queue: "other" });
        let batch = std::mem::take(&mut st.pending);
        // Appended while the batch was being written.
        st.append_kept(&Record::Settle {
            queue: &q,
            ids: vec![9],
        });
        st.fail_batch(&batch, Vec::new());
        assert!(st.queues[&q].is_empty(), "failed enqueues still booked");
        assert_eq!(st.segs[&1].live, 0);
        assert_eq!(
            kinds(&file(&st, 1)),
            vec![
                "dlv q [7]",
                "stl q [8]",
                "del other",
                "stl q [1, 2]",
                "stl q [9]",
            ]
        );
        // A second failure of the retried batch keeps everything, still in order.
        let batch = std::mem::take(&mut st.pending);
        st.fail_batch(&batch, Vec::new());
        assert_eq!(
            kinds(&file(&st, 1)),
            vec![
                "dlv q [7]",
                "stl q [8]",
                "del other",
                "stl q [1, 2]",
                "stl q [9]",
            ]
        );
    }
}
