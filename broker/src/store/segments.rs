//! Segment files: the store's append-only log, `<data-dir>/msgs/<16 hex digits>.seg`, each
//! starting with [`record::MAGIC`] and numbered in log order.
//!
//! - Writing: [`write_batch`] appends a batch's chunks in order (one chunk per segment), syncs
//!   a file before it moves on to the next one, and runs one `fdatasync` at the end when the
//!   batch needs it. [`open_segment`] takes the pre-written file when one is ready (see
//!   [`super::prewrite`]), else creates a plain one. A failed write cuts the file back to where
//!   the batch's write to it started.
//! - Books: each segment's live enqueues and their bytes ([`Seg`], kept by `add_live` and
//!   `drop_live`). A record never straddles two files: `State::append` rolls over to the next
//!   segment before a record would take a segment past its size, unless it is the segment's
//!   first record.
//! - Reclaim: segments are deleted oldest first once nothing live is left in them; the oldest
//!   segment is compacted (its live enqueues copied to the head of the log) when less than half
//!   of it is live, so disk use stays bounded by live messages. Deleting only the oldest segment
//!   keeps replay correct: a settle or delete record never outlives the enqueue it cancels.
//!   Only sealed segments (below `State::sealed_below`: written, and no longer appended to) are
//!   candidates. The decisions are here; the writer thread ([`super::writer`]) unlinks the
//!   files, reads the one to compact and writes the copies with its next batch.

use super::prewrite::{PREPARED, PREWRITE_MAX_RATE};
use super::record::{self, Enqueue, Record};
use super::state::{Chunk, Shared, Slot, State};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::debug;

/// A segment rolls over past this size.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// The books of one segment.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Seg {
    /// Live enqueue records and their bytes.
    pub(super) live: u64,
    pub(super) live_bytes: u64,
    /// Bytes assigned to the segment (header included).
    pub(super) size: u64,
}

pub(super) fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.seg"))
}

/// The open segment the writer appends to.
#[derive(Debug)]
pub(super) struct OpenSeg {
    pub(super) seg: u64,
    pub(super) file: File,
    pub(super) len: u64,
    /// Written full of zeros beforehand: appends are overwrites.
    pub(super) prewritten: bool,
    opened: tokio::time::Instant,
}

/// Opens segment `seg` of `dir` for writing: with the writer's `sh`, the pre-written file if
/// one is ready (and asks the preparer for the next one unless the store writes `fast`); else
/// a new plain file.
fn open_segment(dir: &Path, sh: Option<&Shared>, seg: u64, fast: bool) -> io::Result<OpenSeg> {
    std::fs::create_dir_all(dir)?;
    let path = seg_path(dir, seg);
    let mut opened = None;
    if let Some(sh) = sh {
        let take = std::mem::take(&mut sh.prep.lock().ready);
        opened = take.then(|| {
            std::fs::rename(dir.join(PREPARED), &path)
                .and_then(|()| OpenOptions::new().write(true).read(true).open(&path))
        });
        // Only now (the prepared file has its new name) may the preparer start the next one.
        if !fast {
            sh.prep.lock().wanted = true;
            sh.prep_wake.notify_one();
        }
    }
    if let Some(opened) = opened {
        match opened {
            Ok(file) => {
                // Make the new name durable before anything in it is confirmed.
                File::open(dir)?.sync_all()?;
                return Ok(OpenSeg {
                    seg,
                    file,
                    len: record::MAGIC.len() as u64,
                    prewritten: true,
                    opened: tokio::time::Instant::now(),
                });
            }
            Err(e) => debug!(error = %e, "store: cannot use the pre-written segment"),
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .read(true)
        .open(&path)?;
    if let Err(e) = file.write_all_at(record::MAGIC, 0) {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    // Make the new file's directory entry durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(OpenSeg {
        seg,
        file,
        len: record::MAGIC.len() as u64,
        prewritten: false,
        opened: tokio::time::Instant::now(),
    })
}

/// fdatasync, counted in `syncs` (the store's counter).
pub(super) fn sync(f: &File, syncs: &AtomicU64) -> io::Result<()> {
    syncs.fetch_add(1, Ordering::Relaxed);
    f.sync_data()
}

/// Writes the chunks in order and, if `durable`, syncs; on error the failing file is cut back to
/// where the batch's write to it started.
pub(super) fn write_batch(
    dir: &Path,
    sh: Option<&Shared>,
    syncs: &AtomicU64,
    open: &mut Option<OpenSeg>,
    chunks: &[Chunk],
    durable: bool,
) -> io::Result<()> {
    for c in chunks {
        if open.as_ref().is_none_or(|o| o.seg != c.seg) {
            let mut fast = false;
            if let Some(o) = open.take() {
                sync(&o.file, syncs)?;
                let secs = o.opened.elapsed().as_secs_f64().max(1e-3);
                fast = o.len as f64 / secs > PREWRITE_MAX_RATE;
            }
            *open = Some(open_segment(dir, sh, c.seg, fast)?);
        }
        let Some(o) = open.as_mut() else {
            return Err(io::Error::other("no open segment"));
        };
        if let Err(e) = o.file.write_all_at(&c.buf, o.len) {
            let _ = o.file.set_len(o.len);
            // Cut back to the data: appends again (a pre-written file takes over when ready).
            o.prewritten = false;
            return Err(e);
        }
        o.len += c.buf.len() as u64;
    }
    if let Some(o) = open.as_ref().filter(|_| durable) {
        sync(&o.file, syncs)?;
    }
    Ok(())
}

// === impl State: segment books and reclaim ===

impl State {
    pub(super) fn add_live(&mut self, seg: u64, size: u64) {
        let s = self.segs.entry(seg).or_default();
        s.live += 1;
        s.live_bytes += size;
    }

    pub(super) fn drop_live(&mut self, seg: u64, size: u64) {
        if let Some(s) = self.segs.get_mut(&seg) {
            s.live = s.live.saturating_sub(1);
            s.live_bytes = s.live_bytes.saturating_sub(size);
        }
    }

    /// Segments below this are written and sealed: candidates for reclaim.
    fn sealed_below(&self) -> u64 {
        let pending_min = self.pending.iter().map(|c| c.seg).min().unwrap_or(u64::MAX);
        self.cur_seg.min(self.written_below).min(pending_min)
    }

    /// Oldest segments with nothing live, removed from the books; the caller unlinks them.
    pub(super) fn take_dead_segments(&mut self) -> Vec<u64> {
        let below = self.sealed_below();
        let mut dead = Vec::new();
        while let Some((&s, seg)) = self.segs.first_key_value() {
            if s < below && seg.live == 0 {
                self.segs.remove(&s);
                dead.push(s);
            } else {
                break;
            }
        }
        dead
    }

    /// The oldest sealed segment if less than half of it is live.
    pub(super) fn compaction_candidate(&self) -> Option<u64> {
        if self.unhealthy {
            return None;
        }
        let (&s, seg) = self.segs.first_key_value()?;
        (s < self.sealed_below() && seg.live > 0 && seg.live_bytes * 2 < seg.size).then_some(s)
    }

    /// Whether the writer thread has reclaim work: a dead oldest segment or one to compact.
    pub(super) fn reclaim_due(&self) -> bool {
        let Some((&s, seg)) = self.segs.first_key_value() else {
            return false;
        };
        s < self.sealed_below()
            && (seg.live == 0 || (self.compaction_candidate().is_some() && self.stuck != Some(s)))
    }

    /// Copies the still-live enqueues of segment `seg` (its bytes) to the head of the log.
    /// Returns what moved, to undo if the write fails.
    pub(super) fn copy_live(&mut self, seg: u64, bytes: &[u8]) -> Vec<(Arc<str>, u64, Slot)> {
        let scan = record::scan(bytes);
        // The latest enqueue of each (queue, id) in this segment; a queue deleted later in the
        // segment forgets its earlier ones (a redeclared queue reuses ids).
        let mut latest: HashMap<(&str, u64), usize> = HashMap::new();
        for (i, (_, _, rec)) in scan.records.iter().enumerate() {
            match rec {
                Record::Enqueue(e) => {
                    latest.insert((e.queue, e.id), i);
                }
                Record::DeleteQueue { queue } => latest.retain(|(q, _), _| q != queue),
                _ => {}
            }
        }
        let mut keep: Vec<usize> = latest.into_values().collect();
        keep.sort_unstable();
        let mut moved = Vec::new();
        for i in keep {
            let Record::Enqueue(e) = &scan.records[i].2 else {
                continue;
            };
            let Some((key, slot)) = self
                .queues
                .get_key_value(e.queue)
                .and_then(|(k, m)| m.get(&e.id).map(|s| (k.clone(), *s)))
            else {
                continue;
            };
            if slot.seg != seg {
                continue;
            }
            let copy = Record::Enqueue(Enqueue {
                redelivered: e.redelivered || slot.delivered,
                ..e.clone()
            });
            let (new_seg, n) = self.append(&copy, None);
            self.drop_live(slot.seg, slot.size);
            self.add_live(new_seg, n);
            if let Some(s) = self.queues.get_mut(&key).and_then(|m| m.get_mut(&e.id)) {
                s.seg = new_seg;
                s.size = n;
            }
            moved.push((key, e.id, slot));
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{enq, file, persistent_msg, seg_files, state, ticket};
    use crate::store::{QueueLog, Store};
    use tokio::sync::mpsc;

    fn put(st: &mut State, key: &Arc<str>, id: u64, body: &[u8]) {
        let (seg, n) = st.append(&enq(key, id, body), None);
        st.add_live(seg, n);
        st.queues.entry(key.clone()).or_default().insert(
            id,
            Slot {
                seg,
                size: n,
                delivered: false,
            },
        );
    }

    #[test]
    fn segments_are_reclaimed_when_every_batch_is_written_by_the_queue() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        let store =
            Store::open_with(data.path(), 8 << 10, &crate::memory::UNIT_TESTS).expect("open");
        let (mut log, _, _rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let m = persistent_msg(&[1u8; 1024]);
        // Each ack goes with the next publish, so the writer thread is never woken for a
        // batch: only for the reclaim work the queue's batches leave.
        for seq in 1..=100 {
            log.enqueue_confirmed(seq, &m, None, ticket(&ctx, seq));
            if seq > 1 {
                log.settle(&[seq - 1]);
            }
            log.flush(true, false);
        }
        // (A batch the writer thread takes while it compacts may come later.)
        let mut got = Vec::new();
        while got.len() < 100 {
            match crx.blocking_recv().expect("confirms") {
                crate::queue::ClientEvent::Confirm { seq, ok, .. } => got.push((seq, ok)),
                other => panic!("unexpected client event {other:?}"),
            }
        }
        assert_eq!(got, (1..=100).map(|s| (s, true)).collect::<Vec<_>>());
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        while seg_files(&dir).len() > 2 {
            assert!(
                std::time::SystemTime::now() < deadline,
                "dead segments kept: {:?}",
                seg_files(&dir)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(log);
        store.close();
    }

    #[test]
    fn segments_roll_over_and_only_the_oldest_dead_ones_are_reclaimed() {
        let key: Arc<str> = "/\0q".into();
        let mut st = state(200);
        for id in 1..=6 {
            put(&mut st, &key, id, &[0u8; 60]);
        }
        assert!(st.cur_seg > 2, "no rollover");
        st.pending.clear();
        st.written_below = st.cur_seg;
        // Settle everything in segment 2 but not in segment 1: nothing may go (oldest first).
        let in_seg = |st: &State, s: u64| -> Vec<u64> {
            let mut v: Vec<u64> = st.queues[&key]
                .iter()
                .filter(|(_, sl)| sl.seg == s)
                .map(|(id, _)| *id)
                .collect();
            v.sort_unstable();
            v
        };
        for id in in_seg(&st, 2) {
            let sl = st.queues.get_mut(&key).and_then(|m| m.remove(&id));
            let sl = sl.expect("slot");
            st.drop_live(sl.seg, sl.size);
        }
        assert!(st.take_dead_segments().is_empty());
        for id in in_seg(&st, 1) {
            let sl = st.queues.get_mut(&key).and_then(|m| m.remove(&id));
            let sl = sl.expect("slot");
            st.drop_live(sl.seg, sl.size);
        }
        assert_eq!(st.take_dead_segments(), vec![1, 2]);
    }

    #[test]
    fn compaction_copies_the_live_message_of_a_redeclared_queue_not_its_dead_namesake() {
        let key: Arc<str> = "/\0q".into();
        let mut st = state(1 << 20);
        put(&mut st, &key, 1, b"old");
        // Queue deleted and declared again: ids start over.
        let slots: Vec<Slot> = st
            .queues
            .get_mut(&key)
            .map(|m| m.drain().map(|(_, s)| s).collect())
            .unwrap_or_default();
        for s in slots {
            st.drop_live(s.seg, s.size);
        }
        st.append(&Record::DeleteQueue { queue: &key }, None);
        put(&mut st, &key, 1, b"new");
        let bytes = file(&st, 1);
        st.pending.clear();
        st.cur_seg = 2;
        st.written_below = 2;
        assert_eq!(st.compaction_candidate(), Some(1));
        let moved = st.copy_live(1, &bytes);
        assert_eq!(moved.len(), 1);
        let copy = file(&st, 2);
        let scan = record::scan(&copy);
        let bodies: Vec<&[u8]> = scan
            .records
            .iter()
            .filter_map(|(_, _, r)| match r {
                Record::Enqueue(e) => Some(e.body),
                _ => None,
            })
            .collect();
        assert_eq!(bodies, vec![&b"new"[..]]);
        assert_eq!(st.segs[&1].live, 0);
        st.pending.clear();
        assert_eq!(st.take_dead_segments(), vec![1]);
    }
}
