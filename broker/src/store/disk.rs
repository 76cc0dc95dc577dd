//! The node's message store: one append-only log of segment files under `<data-dir>/msgs`,
//! shared by every durable queue, written in batches with group commit, one batch at a time.
//!
//! - Queue actors append records under a short mutex ([`DiskLog`]) and hand them over with
//!   [`DiskLog::flush`] once they have handled a round of commands.
//! - Whoever writes a batch takes everything pending, writes it, and runs one `fdatasync` for
//!   the whole batch; then it sends the publisher confirms of the batch itself (each enqueue
//!   that wants one carries its [`ConfirmTicket`]: one hop less than going through the queue
//!   actor), and tells each queue about the rest of its enqueues on disk (`QueueCmd::Synced`) or
//!   about all of them when the batch failed (`QueueCmd::WriteFailed`, with their tickets: the
//!   queue drops them, then nacks their publishes). The next batch starts as soon as the previous
//!   sync ends: no timer, no added delay when idle.
//! - Who writes: a queue with nothing else to do writes a small batch (up to
//!   [`INLINE_MAX_BYTES`]) of one publisher itself when no batch is being written; with one
//!   publisher waiting for one confirm, handing the batch to another thread and the confirm back
//!   costs about as much as the sync. Otherwise the writer thread takes it (see
//!   `State::writable_here`). The writer thread also does all reclaim work; a queue's batch
//!   wakes it when it leaves some.
//! - Reclaim: segments are deleted oldest first once nothing live is left in them; the oldest
//!   segment is compacted (its live enqueues copied to the head of the log) when less than half
//!   of it is live, so disk use stays bounded by live messages. Deleting only the oldest segment
//!   keeps replay correct: a settle or delete record never outlives the enqueue it cancels.
//! - Delivered flags survive a process crash without waiting for the writer: the "delivered"
//!   record of a persistent message also goes, with one `write()` and no sync, to the active
//!   one of two delivery journals (`<data-dir>/msgs/deliveries-{0,1}.jnl`) before the delivery
//!   is handed to the connection; a write into the page cache survives `kill -9`. The same
//!   record also goes to the segments with the next batch. When the writer takes a batch while
//!   the active journal holds 1 MiB or more and the other is empty, it makes the other one
//!   active: every record in the one it leaves is in that batch or an earlier one, so it
//!   truncates that journal once the batch is written (after a failed batch it keeps it, the
//!   records are retried, and no switch happens until it is emptied). Records already in a
//!   segment may linger in the active journal: a journal record is a true fact about a message
//!   of this run, so applying it again is harmless. Recovery applies both journals' records
//!   after the segments, writes the flags they add to a new segment (synced) and removes the
//!   journals, so a journal never outlives the run that wrote it. A power loss can lose journal
//!   records (no sync, as RabbitMQ does not sync deliveries either): the message then comes back
//!   not redelivered. A message delivered while its enqueue record still waits in memory (a
//!   consumer keeping up with a publisher that waits for each confirm) skips all this: the
//!   flag is set in that record, which reaches the file with it or not at all.
//! - Store ids are unique per queue name within a run: a queue declared again after a delete
//!   numbers its messages after the highest id its name ever had in this run (`base`), so a
//!   journal record can never mark a message of a later queue with the same name.
//! - A failed batch (full disk, I/O error) forgets only its enqueues (their publishes are
//!   nacked; a settle record is logged for them in case part of the batch reached the file);
//!   its settles, deliveries and queue deletes are written again, in order, ahead of newer
//!   records, by the next batch. The writer waits a little between failed attempts.
//! - Queues recovered from the segments but not declared again by the boot-time definitions
//!   restore are dropped ([`Store::drop_unclaimed`]) so their segments can be reclaimed.
//! - Pre-written segments: a second thread writes the next segment file full of zeros ahead of
//!   need (`next.pre`, renamed into place when the writer opens a segment), so appends overwrite
//!   allocated blocks and fdatasync commits no file-size or extent metadata: a shorter sync on
//!   the confirm path. Replay takes a zero remainder as the clean end of a segment. When there
//!   is no room for it (less than three segments' worth free) or the fill fails, the writer
//!   appends to a plain file as before.

use super::record::{self, Enqueue, Record};
use super::replay::{Live, Replay};
use super::{QueueLog, Safety};
use crate::intmap::IntMap;
use crate::queue::{ConfirmTicket, Message, QueueCmd};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A segment rolls over past this size.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Longest time delivery and settle records wait for an enqueue to go with.
const LAZY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Largest batch a queue writes and syncs on its own thread (see [`DiskLog::flush`]); bigger
/// ones go to the writer thread.
const INLINE_MAX_BYTES: usize = 64 << 10;

/// How many of the latest pending enqueues per chunk a delivery looks through for its own
/// (see `State::mark_pending_delivered`); older ones get a delivered record.
const MARK_SCAN: usize = 16;

/// The segment file being written full of zeros ahead of need (not a `.seg` file: replay
/// ignores it and boot deletes a leftover one).
const PREPARED: &str = "next.pre";

static SYNCS: AtomicU64 = AtomicU64::new(0);

/// Number of fdatasync calls the store has made (all stores of this process).
pub fn syncs() -> u64 {
    SYNCS.load(Ordering::Relaxed)
}

#[derive(Debug, Default, Clone, Copy)]
struct Seg {
    /// Live enqueue records and their bytes.
    live: u64,
    live_bytes: u64,
    /// Bytes assigned to the segment (header included).
    size: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    seg: u64,
    size: u64,
    delivered: bool,
}

#[derive(Debug)]
struct Note {
    queue: Arc<str>,
    /// Store id; the queue's own id is `id - base`.
    id: u64,
    base: u64,
    tx: mpsc::UnboundedSender<QueueCmd>,
    /// The publisher confirm, sent by the writer once the batch is synced (or failed).
    ticket: Option<ConfirmTicket>,
    /// Where the enqueue record starts in its chunk's buffer (set by `State::append`).
    at: usize,
}

#[derive(Debug)]
struct Chunk {
    seg: u64,
    buf: Vec<u8>,
    notes: Vec<Note>,
    /// Byte ranges of records written again if the batch fails (settles, deliveries, queue
    /// deletes; not enqueues, not compaction copies).
    retry: Vec<(usize, usize)>,
}

/// Journal file names (two, used alternately).
const JOURNALS: [&str; 2] = ["deliveries-0.jnl", "deliveries-1.jnl"];

/// The active journal is switched once it holds this many bytes (truncating a file on every
/// batch would cost a file-system transaction each time). The environment variable
/// `WARREN_JOURNAL_SWITCH_BYTES` overrides it (tests use a few hundred bytes so that crash tests
/// go through many switches).
const JOURNAL_SWITCH_BYTES: u64 = 1 << 20;

/// The two delivery journals (see the module docs).
#[derive(Debug)]
struct Journal {
    files: [Arc<File>; 2],
    active: usize,
    /// Bytes written to each file since it was last emptied.
    len: [u64; 2],
}

impl Journal {
    /// A batch is being taken: switch to the other file if the active one is full and the
    /// other is empty. Returns the inactive file if it holds records (all of them are in the
    /// batch taken now or in earlier ones), to be truncated once the batch is written.
    fn take_batch(&mut self, switch_at: u64) -> Option<(usize, Arc<File>)> {
        let other = 1 - self.active;
        if self.len[self.active] >= switch_at && self.len[other] == 0 {
            self.active = other;
        }
        let old = 1 - self.active;
        (self.len[old] > 0).then(|| (old, self.files[old].clone()))
    }
}

#[derive(Debug)]
struct State {
    cur_seg: u64,
    pending: Vec<Chunk>,
    segs: BTreeMap<u64, Seg>,
    queues: HashMap<Arc<str>, IntMap<u64, Slot>>,
    unclaimed: HashMap<String, BTreeMap<u64, Live>>,
    shutdown: bool,
    /// The last batch failed: no compaction until a batch succeeds again.
    unhealthy: bool,
    /// Segments below this one are fully written (the writer has moved past them).
    written_below: u64,
    segment_bytes: u64,
    /// Highest store id each queue name has had in this run (see `base` in the module docs).
    top: HashMap<Arc<str>, u64>,
    /// Created at the first delivery; None until then or while it cannot be created.
    journal: Option<Journal>,
    /// A journal problem was logged (logged once until the journal works again).
    journal_warned: bool,
    /// See [`JOURNAL_SWITCH_BYTES`].
    journal_switch_bytes: u64,
    /// Everything pending may wait (delivery and settle records only: nobody waits for them):
    /// the writer takes it with the next enqueue or after [`LAZY_WAIT`], not at once.
    lazy: bool,
    /// A batch is being written (by the writer thread or by a queue, see [`DiskLog::flush`]):
    /// nobody else takes one until it is done.
    busy: bool,
    /// The segment batches are appended to; taken by whoever writes a batch.
    open: Option<OpenSeg>,
    /// The writer thread waits for a queue's batch to end.
    writer_waits: bool,
    /// Reclaim work (a dead segment, a compaction) turned up after a queue's batch: the
    /// writer thread does it.
    reclaim: bool,
    /// A segment whose compaction moved nothing (its live records unreadable): not retried.
    stuck: Option<u64>,
    /// Who waited for the confirms of the last batch that had any.
    last_publishers: Publishers,
}

/// The publishers (connection and channel) waiting for the confirms of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publishers {
    None,
    One((u64, u16)),
    Many,
}

impl Publishers {
    fn of(chunks: &[Chunk]) -> Self {
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
    fn new(cur_seg: u64, segs: BTreeMap<u64, Seg>, segment_bytes: u64) -> Self {
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
    fn append(&mut self, rec: &Record<'_>, mut note: Option<Note>) -> (u64, u64) {
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
    fn append_kept(&mut self, rec: &Record<'_>) {
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
    fn mark_pending_delivered(&mut self, queue: &Arc<str>, ids: &[u64]) -> bool {
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
    fn fail_batch(&mut self, chunks: &[Chunk], moved: Vec<(Arc<str>, u64, Slot)>) {
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

    fn add_live(&mut self, seg: u64, size: u64) {
        let s = self.segs.entry(seg).or_default();
        s.live += 1;
        s.live_bytes += size;
    }

    fn drop_live(&mut self, seg: u64, size: u64) {
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
    fn take_dead_segments(&mut self) -> Vec<u64> {
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
    fn compaction_candidate(&self) -> Option<u64> {
        if self.unhealthy {
            return None;
        }
        let (&s, seg) = self.segs.first_key_value()?;
        (s < self.sealed_below() && seg.live > 0 && seg.live_bytes * 2 < seg.size).then_some(s)
    }

    /// Whether the writer thread has reclaim work: a dead oldest segment or one to compact.
    fn reclaim_due(&self) -> bool {
        let Some((&s, seg)) = self.segs.first_key_value() else {
            return false;
        };
        s < self.sealed_below()
            && (seg.live == 0 || (self.compaction_candidate().is_some() && self.stuck != Some(s)))
    }

    /// Whether a queue may write the pending batch on its own thread (see [`DiskLog::flush`]):
    /// nobody else is writing, the batch is small, and one publisher waits for its confirms,
    /// the same one as in the last batch with confirms (or the first). With several
    /// publishers waiting, the writer thread does better: it syncs the next batch while the
    /// queues handle what comes in, where a queue's thread would do one after the other.
    fn writable_here(&self) -> bool {
        if self.busy || self.shutdown || self.unhealthy || self.pending_bytes() > INLINE_MAX_BYTES {
            return false;
        }
        match (Publishers::of(&self.pending), self.last_publishers) {
            (Publishers::One(p), Publishers::One(q)) => p == q,
            (Publishers::One(_), Publishers::None) => true,
            _ => false,
        }
    }

    fn pending_bytes(&self) -> usize {
        self.pending.iter().map(|c| c.buf.len()).sum()
    }

    /// Copies the still-live enqueues of segment `seg` (its bytes) to the head of the log.
    /// Returns what moved, to undo if the write fails.
    fn copy_live(&mut self, seg: u64, bytes: &[u8]) -> Vec<(Arc<str>, u64, Slot)> {
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

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// Wakes the writer (work pending or shutdown).
    wake: Condvar,
    segment_bytes: u64,
    prep: Mutex<Prep>,
    /// Wakes the preparer (a prepared file is wanted, or shutdown).
    prep_wake: Condvar,
}

/// Hand-over of the pre-written next segment between the writer and the preparer thread.
#[derive(Debug, Default)]
struct Prep {
    /// The writer opened a segment since the last file was prepared: make the next one.
    wanted: bool,
    /// `next.pre` is complete and synced; only the writer touches it now.
    ready: bool,
    shutdown: bool,
}

/// The message store of one node (one data directory).
#[derive(Debug)]
pub struct Store {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    preparer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A recovered message for a queue, in queue order.
#[derive(Debug)]
pub struct Recovered {
    pub id: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    /// Expiry deadline, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn queue_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.seg"))
}

/// Builds a message back from its stored parts; None if the stored header does not parse.
fn rebuild_message(l: &Live) -> Option<Message> {
    super::message_from_parts(
        &l.exchange,
        &l.routing_key,
        &l.header,
        Bytes::copy_from_slice(&l.body),
    )
}

impl Store {
    /// Opens the store under `data_dir` (nothing is created until the first write) and
    /// replays existing segments: damaged tails are cut and logged, never served.
    pub fn open(data_dir: &Path) -> io::Result<Arc<Self>> {
        Self::open_with(data_dir, SEGMENT_BYTES)
    }

    /// [`Store::open`] with a given segment size (tests use small segments).
    pub fn open_with(data_dir: &Path, segment_bytes: u64) -> io::Result<Arc<Self>> {
        Self::start(data_dir, segment_bytes, true)
    }

    /// Opens the store; without `writer` no writer thread runs (tests of the queues' own
    /// writes).
    fn start(data_dir: &Path, segment_bytes: u64, writer: bool) -> io::Result<Arc<Self>> {
        let dir = data_dir.join("msgs");
        let mut replay = Replay::default();
        let mut segs = BTreeMap::new();
        let mut max_seg = 0;
        let started = tokio::time::Instant::now();
        if dir.is_dir() {
            // A file being prepared when the process stopped (possibly half written).
            match std::fs::remove_file(dir.join(PREPARED)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut files = Vec::new();
            for ent in std::fs::read_dir(&dir)? {
                let ent = ent?;
                let name = ent.file_name();
                let Some(n) = name
                    .to_str()
                    .and_then(|s| s.strip_suffix(".seg"))
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                else {
                    continue;
                };
                files.push((n, ent.path()));
            }
            files.sort();
            for (n, path) in files {
                max_seg = max_seg.max(n);
                let bytes = std::fs::read(&path)?;
                let scan = record::scan(&bytes);
                for (_, size, rec) in &scan.records {
                    replay.apply(n, *size, rec);
                }
                for s in &scan.skipped {
                    warn!(segment = %path.display(), damage = %s, "store: skipped a damaged record");
                }
                if let Some(why) = &scan.cut {
                    warn!(
                        segment = %path.display(),
                        damage = %why,
                        kept = scan.valid_len,
                        dropped = bytes.len() - scan.valid_len,
                        "store: damaged segment tail cut"
                    );
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(scan.valid_len as u64)?;
                    f.sync_all()?;
                } else if scan.valid_len < bytes.len() {
                    // The unused zero-filled rest of a pre-written segment: give it back.
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(scan.valid_len as u64)?;
                    f.sync_all()?;
                }
                segs.insert(
                    n,
                    Seg {
                        size: scan.valid_len as u64,
                        ..Seg::default()
                    },
                );
            }
        }
        // Delivered flags the journals hold beyond the segments (see the module docs).
        let mut marked: Vec<(String, Vec<u64>)> = Vec::new();
        for name in JOURNALS {
            let bytes = match std::fs::read(dir.join(name)) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for rec in record::scan_journal(&bytes) {
                let Record::Delivered { queue, ids } = rec else {
                    continue;
                };
                let Some(q) = replay.queues.get_mut(queue) else {
                    continue;
                };
                let mut newly = Vec::new();
                for id in ids {
                    if let Some(l) = q.get_mut(&id).filter(|l| !l.redelivered) {
                        l.redelivered = true;
                        newly.push(id);
                    }
                }
                if !newly.is_empty() {
                    marked.push((queue.to_owned(), newly));
                }
            }
        }
        let mut state = State::new(max_seg + 1, segs, segment_bytes);
        state.journal_switch_bytes = std::env::var("WARREN_JOURNAL_SWITCH_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(JOURNAL_SWITCH_BYTES);
        // The journals' flags go to a segment (synced) before the journals are removed.
        let mut open = None;
        if !marked.is_empty() {
            let count: usize = marked.iter().map(|(_, ids)| ids.len()).sum();
            for (queue, ids) in marked {
                state.append_kept(&Record::Delivered { queue: &queue, ids });
            }
            info!(
                messages = count,
                "store: delivered flags recovered from the delivery journal"
            );
            match write_batch(&dir, None, &mut open, &state.pending, true) {
                Ok(()) => state.pending.clear(),
                // Still pending: the writer tries again (a crash before that loses the flags).
                Err(e) => warn!(error = %e, "store: cannot write the recovered delivered flags"),
            }
        }
        for name in JOURNALS {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let mut messages = 0u64;
        for (q, m) in &replay.queues {
            let key: Arc<str> = q.as_str().into();
            if let Some(top) = m.keys().next_back() {
                state.top.insert(key.clone(), *top);
            }
            let slots = state.queues.entry(key).or_default();
            for (id, l) in m {
                slots.insert(
                    *id,
                    Slot {
                        seg: l.seg,
                        size: l.size,
                        delivered: l.redelivered,
                    },
                );
            }
            for l in m.values() {
                state.add_live(l.seg, l.size);
                messages += 1;
            }
        }
        state.unclaimed = replay.queues;
        if messages > 0 || !state.segs.is_empty() {
            info!(
                messages,
                queues = state.unclaimed.len(),
                segments = state.segs.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "store: recovered"
            );
        }
        state.open = open;
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(state),
            wake: Condvar::new(),
            segment_bytes,
            prep: Mutex::new(Prep::default()),
            prep_wake: Condvar::new(),
        });
        let s2 = shared.clone();
        let preparer = std::thread::Builder::new()
            .name("warren-store-prep".into())
            .spawn(move || preparer_loop(&s2))?;
        let writer = if writer {
            let s2 = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("warren-store".into())
                    .spawn(move || writer_loop(&s2))?,
            )
        } else {
            None
        };
        Ok(Arc::new(Self {
            shared,
            writer: Mutex::new(writer),
            preparer: Mutex::new(Some(preparer)),
        }))
    }

    /// The log of a durable queue, its recovered messages (queue order) and the receiver of
    /// its store events (`Synced`, `WriteFailed`).
    pub fn attach(
        self: &Arc<Self>,
        vhost: &str,
        name: &str,
    ) -> (DiskLog, Vec<Recovered>, mpsc::UnboundedReceiver<QueueCmd>) {
        let key = queue_key(vhost, name);
        let (tx, rx) = mpsc::unbounded_channel();
        let (key, live, base) = {
            let mut st = self.shared.state.lock();
            if st.open.is_none() && !st.busy {
                // No segment open yet in this run: a durable queue is about to use the store,
                // so have a pre-written segment ready for its first write (the writer asks for
                // the next one itself each time it opens one).
                let mut p = self.shared.prep.lock();
                if !p.ready && !p.wanted {
                    p.wanted = true;
                    self.shared.prep_wake.notify_one();
                }
            }
            let live = st.unclaimed.remove(&key).unwrap_or_default();
            let key = match st.queues.get_key_value(key.as_str()) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = key.into();
                    st.queues.insert(k.clone(), IntMap::default());
                    k
                }
            };
            // Recovered messages keep their ids; a new queue numbers after its name's past.
            let base = if live.is_empty() {
                st.top.get(&key).copied().unwrap_or(0)
            } else {
                0
            };
            (key, live, base)
        };
        let mut out = Vec::with_capacity(live.len());
        let mut bad = Vec::new();
        for (id, l) in live {
            match rebuild_message(&l) {
                Some(m) => out.push(Recovered {
                    id,
                    msg: Arc::new(m),
                    redelivered: l.redelivered,
                    expires_at_ms: l.expires_at_ms,
                }),
                None => bad.push(id),
            }
        }
        let top = out.iter().map(|r| r.id).chain(bad.iter().copied()).max();
        let mut log = DiskLog {
            store: self.clone(),
            key,
            tx,
            base,
            top: top.unwrap_or(base),
        };
        if !bad.is_empty() {
            warn!(queue = %name, vhost = %vhost, count = bad.len(), "store: unreadable recovered messages dropped");
            log.settle(&bad);
        }
        if !out.is_empty() {
            info!(queue = %name, vhost = %vhost, messages = out.len(), "store: queue recovered");
        }
        (log, out, rx)
    }

    /// Drops the data of recovered queues that nobody claimed (called once the boot-time
    /// definitions restore has declared every durable queue): their definitions are gone, so
    /// their messages would otherwise pin segments forever. Returns the number of queues.
    pub fn drop_unclaimed(&self) -> usize {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let unclaimed = std::mem::take(&mut st.unclaimed);
        let mut dropped = 0;
        for (key, live) in unclaimed {
            if live.is_empty() {
                continue;
            }
            let (vhost, name) = key.split_once('\0').unwrap_or(("", key.as_str()));
            warn!(
                vhost = %vhost,
                queue = %name,
                messages = live.len(),
                "store: dropping the stored messages of a queue that has no definition"
            );
            if let Some((k, slots)) = st.queues.remove_entry(key.as_str()) {
                for s in slots.values() {
                    st.drop_live(s.seg, s.size);
                }
                st.append_kept(&Record::DeleteQueue { queue: &k });
            }
            dropped += 1;
        }
        drop(st);
        sh.wake.notify_one();
        dropped
    }

    /// Persistent messages the store holds for a queue (recovered ones included), for tests
    /// and diagnostics.
    pub fn stored_messages(&self, vhost: &str, name: &str) -> usize {
        let key = queue_key(vhost, name);
        let st = self.shared.state.lock();
        st.queues.get(key.as_str()).map_or(0, |m| m.len())
    }

    /// Writes what is pending, stops the writer and waits for it.
    pub fn close(&self) {
        self.shared.state.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
        // The writer stopped the preparer on its way out (if it ran).
        stop_preparer(&self.shared);
        if let Some(h) = self.preparer.lock().take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(self.shared.dir.join(PREPARED));
        info!(syncs = syncs(), "store: closed");
    }

    /// Bytes of segment files currently on disk (for tests and logs).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.wake.notify_all();
        stop_preparer(&self.shared);
    }
}

/// The open segment the writer appends to.
#[derive(Debug)]
struct OpenSeg {
    seg: u64,
    file: File,
    len: u64,
    /// Written full of zeros beforehand: appends are overwrites.
    prewritten: bool,
    opened: tokio::time::Instant,
}

/// Above this write rate (bytes per second into one segment) the next segment is not
/// pre-written: with that many messages per sync, group commit already spreads the sync's cost,
/// and writing every segment twice (zeros, then records) would take disk bandwidth from it.
const PREWRITE_MAX_RATE: f64 = 64.0 * 1024.0 * 1024.0;

fn stop_preparer(sh: &Shared) {
    sh.prep.lock().shutdown = true;
    sh.prep_wake.notify_all();
}

/// Writes `<dir>/next.pre`: the segment header, then zeros up to `bytes`, synced. Ok(false)
/// when skipped: not enough free space (a pre-written segment is a speed-up, never worth
/// filling the disk for) or `stop()` said so. No file is left behind unless Ok(true).
fn prepare_segment(dir: &Path, bytes: u64, stop: impl Fn() -> bool) -> io::Result<bool> {
    if crate::alarm::free_bytes(dir)? < bytes.saturating_mul(3) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let path = dir.join(PREPARED);
    let fill = || -> io::Result<bool> {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < bytes {
            if stop() {
                return Ok(false);
            }
            let n = (bytes - off).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.write_all_at(record::MAGIC, 0)?;
        f.sync_all()?;
        Ok(true)
    };
    let r = fill();
    if !matches!(r, Ok(true)) {
        let _ = std::fs::remove_file(&path);
    }
    r
}

/// Keeps one pre-written segment ready for the writer.
fn preparer_loop(sh: &Shared) {
    loop {
        {
            let mut p = sh.prep.lock();
            while !p.shutdown && (p.ready || !p.wanted) {
                sh.prep_wake.wait(&mut p);
            }
            if p.shutdown {
                return;
            }
            p.wanted = false;
        }
        match prepare_segment(&sh.dir, sh.segment_bytes, || sh.prep.lock().shutdown) {
            Ok(true) => {
                // This file answers every request made while it was being written; the next
                // request comes once the writer has renamed it.
                let mut p = sh.prep.lock();
                p.ready = true;
                p.wanted = false;
            }
            Ok(false) => {}
            Err(e) => debug!(error = %e, "store: cannot pre-write the next segment; appending"),
        }
    }
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

fn sync(f: &File) -> io::Result<()> {
    SYNCS.fetch_add(1, Ordering::Relaxed);
    f.sync_data()
}

/// Writes the chunks in order and, if `durable`, syncs; on error the failing file is cut back to
/// where the batch's write to it started.
fn write_batch(
    dir: &Path,
    sh: Option<&Shared>,
    open: &mut Option<OpenSeg>,
    chunks: &[Chunk],
    durable: bool,
) -> io::Result<()> {
    for c in chunks {
        if open.as_ref().is_none_or(|o| o.seg != c.seg) {
            let mut fast = false;
            if let Some(o) = open.take() {
                sync(&o.file)?;
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
        sync(&o.file)?;
    }
    Ok(())
}

/// Pause between attempts while batches fail (the disk is full or failing).
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// A batch taken for writing, with what its writer needs.
struct Batch {
    chunks: Vec<Chunk>,
    /// Compaction copies in the batch (to undo if the write fails).
    moved: Vec<(Arc<str>, u64, Slot)>,
    /// A delivery journal to empty once the batch is written.
    journal: Option<(usize, Arc<File>)>,
    open: Option<OpenSeg>,
}

/// Takes everything pending (plus the live records of the segment to compact, if given) as
/// the next batch and marks the store busy until [`finish_batch`].
fn take_batch(sh: &Shared, st: &mut State, compact: Option<&(u64, Vec<u8>)>) -> Batch {
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
fn finish_batch(sh: &Shared, b: Batch) -> bool {
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
    let result = write_batch(&sh.dir, Some(sh), &mut open, &chunks, durable);
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
    let mut per_queue: HashMap<(Arc<str>, u64), (mpsc::UnboundedSender<QueueCmd>, Report)> =
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
            Ok(()) => QueueCmd::Synced { up_to: r.up_to },
            Err(_) => QueueCmd::WriteFailed {
                ids: r.ids,
                tickets: r.tickets,
            },
        };
        if let Err(mpsc::error::SendError(QueueCmd::WriteFailed { tickets, .. })) = tx.send(cmd) {
            // The queue is gone: nack here.
            for t in tickets {
                t.send(false);
            }
        }
    }
    wake
}

fn writer_loop(sh: &Shared) {
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
                    let n = syncs();
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
        let _ = sync(&o.file);
    }
}

/// The log of one durable queue: persistent messages go to the node's store.
#[derive(Debug)]
pub struct DiskLog {
    store: Arc<Store>,
    key: Arc<str>,
    tx: mpsc::UnboundedSender<QueueCmd>,
    /// Store id = queue id + base (see the module docs).
    base: u64,
    /// Highest store id used.
    top: u64,
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

/// Writes a delivered record to the active delivery journal (creating the journals at the
/// first use). Called under the state lock, so the writer's swap cannot interleave.
fn journal_write(st: &mut State, dir: &Path, rec: &Record<'_>) {
    use std::io::Write;
    if st.journal.is_none() {
        let open = |name: &str| -> io::Result<Arc<File>> {
            std::fs::create_dir_all(dir)?;
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(name))?;
            drop(f);
            let f = OpenOptions::new().append(true).open(dir.join(name))?;
            Ok(Arc::new(f))
        };
        match open(JOURNALS[0]).and_then(|a| Ok([a, open(JOURNALS[1])?])) {
            Ok(files) => {
                st.journal = Some(Journal {
                    files,
                    active: 0,
                    len: [0; 2],
                });
            }
            Err(e) => {
                if !st.journal_warned {
                    st.journal_warned = true;
                    warn!(error = %e, "store: cannot create the delivery journal; delivered flags may be lost in a crash");
                }
                return;
            }
        }
    }
    let Some(j) = st.journal.as_mut() else {
        return;
    };
    let mut buf = Vec::with_capacity(64);
    record::encode(rec, &mut buf);
    let active = j.active;
    // Counted even if the write fails: part of the record may be there.
    j.len[active] += buf.len() as u64;
    match (&*j.files[active]).write_all(&buf) {
        Ok(()) => st.journal_warned = false,
        Err(e) => {
            if !st.journal_warned {
                st.journal_warned = true;
                warn!(error = %e, "store: delivery journal write failed; delivered flags may be lost in a crash");
            }
        }
    }
}

impl DiskLog {
    /// Logs a persistent enqueue; the writer reports it through `ticket` if given, else with
    /// `QueueCmd::Synced`.
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
            exchange: msg.exchange.as_str(),
            routing_key: msg.routing_key.as_str(),
            header: &msg.header_payload,
            body: &msg.body,
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
    ) -> Option<ConfirmTicket> {
        if !msg.persistent() {
            ticket.send(true);
            return None;
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

    fn state(segment_bytes: u64) -> State {
        State::new(1, BTreeMap::new(), segment_bytes)
    }

    fn enq<'a>(q: &'a str, id: u64, body: &'a [u8]) -> Record<'a> {
        Record::Enqueue(Enqueue {
            queue: q,
            id,
            redelivered: false,
            expires_at_ms: None,
            exchange: "",
            routing_key: "k",
            header: b"h",
            body,
        })
    }

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

    /// The bytes the writer would have put in segment `seg`.
    fn file(st: &State, seg: u64) -> Vec<u8> {
        let mut out = record::MAGIC.to_vec();
        for c in st.pending.iter().filter(|c| c.seg == seg) {
            out.extend_from_slice(&c.buf);
        }
        out
    }

    /// The enqueue record of `m` in queue "q" of vhost "/", encoded.
    fn enq_bytes(id: u64, m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        record::encode(
            &Record::Enqueue(Enqueue {
                queue: "/\0q",
                id,
                redelivered: false,
                expires_at_ms: None,
                exchange: "",
                routing_key: "q",
                header: &m.header_payload,
                body: &m.body,
            }),
            &mut out,
        );
        out
    }

    fn persistent_msg(body: &[u8]) -> Message {
        let props = amq_protocol::protocol::basic::AMQPProperties::default().with_delivery_mode(2);
        Message::new("".into(), "q".into(), props, Bytes::copy_from_slice(body)).expect("message")
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    /// Waits for the store to report `n` enqueues of this queue synced.
    fn wait_synced(rx: &mut mpsc::UnboundedReceiver<QueueCmd>, n: u64) {
        loop {
            match rx.blocking_recv().expect("store events") {
                QueueCmd::Synced { up_to } if up_to >= n => return,
                QueueCmd::Synced { .. } => {}
                other => panic!("unexpected store event {other:?}"),
            }
        }
    }

    #[test]
    fn the_first_durable_queue_has_a_prewritten_segment_made_which_is_used_and_cut_on_close() {
        const SEG: u64 = 256 << 10;
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        let store = Store::open_with(data.path(), SEG).expect("open");
        assert!(
            !store.shared.prep.lock().wanted,
            "prepared before any durable queue"
        );
        let (mut log, recovered, mut rx) = store.attach("/", "q");
        assert!(recovered.is_empty());
        // The queue's arrival has the next segment prepared before its first write.
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        while !store.shared.prep.lock().ready {
            assert!(
                std::time::SystemTime::now() < deadline,
                "no segment prepared"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            std::fs::metadata(dir.join(PREPARED))
                .expect("prepared")
                .len(),
            SEG
        );
        for id in 1..=20 {
            let body = format!("m{id}");
            assert_eq!(
                log.enqueue(id, &persistent_msg(body.as_bytes()), None),
                Safety::Pending
            );
        }
        log.flush(false, false);
        wait_synced(&mut rx, 20);
        let segs = seg_files(&dir);
        assert_eq!(segs.len(), 1, "{segs:?}");
        // Still full size: the records overwrote zeros.
        let len = std::fs::metadata(&segs[0]).expect("stat").len();
        assert_eq!(len, SEG);
        log.settle(&[1, 2]);
        store.close();
        drop((log, store));
        // Closed: the zero rest is cut off, no prepared file is left.
        let len = std::fs::metadata(&segs[0]).expect("stat").len();
        assert!(len < SEG, "zero rest kept ({len} bytes)");
        assert!(!dir.join(PREPARED).exists());
        let store = Store::open_with(data.path(), SEG).expect("reopen");
        let (_log, recovered, _rx) = store.attach("/", "q");
        let ids: Vec<u64> = recovered.iter().map(|r| r.id).collect();
        assert_eq!(ids, (3..=20).collect::<Vec<u64>>());
        store.close();
    }

    fn ticket(events: &crate::queue::ClientTx, seq: u64) -> ConfirmTicket {
        ConfirmTicket {
            events: events.clone(),
            conn_id: 1,
            channel: 1,
            generation: 0,
            seq,
        }
    }

    /// The confirms received so far, (seq, ok) in order.
    fn confirms(rx: &mut mpsc::UnboundedReceiver<crate::queue::ClientEvent>) -> Vec<(u64, bool)> {
        let mut v = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                crate::queue::ClientEvent::Confirm { seq, ok, .. } => v.push((seq, ok)),
                other => panic!("unexpected client event {other:?}"),
            }
        }
        v
    }

    #[test]
    fn an_idle_queue_writes_one_publishers_small_batch_itself_and_its_confirms_are_out_at_once() {
        let data = tempfile::tempdir().expect("tempdir");
        // No writer thread: whatever reaches the disk, the queue wrote.
        let store = Store::start(data.path(), 1 << 20, false).expect("open");
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
        assert!(matches!(rx.try_recv(), Ok(QueueCmd::Synced { up_to: 4 })));
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
        let store = Store::open(data.path()).expect("reopen");
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
    fn a_message_delivered_before_its_enqueue_is_written_has_the_flag_in_that_record() {
        let data = tempfile::tempdir().expect("tempdir");
        let journals = || -> u64 {
            JOURNALS
                .iter()
                .filter_map(|n| std::fs::metadata(data.path().join("msgs").join(n)).ok())
                .map(|m| m.len())
                .sum()
        };
        // No writer thread: the queue writes every batch (each ends with a confirm).
        let store = Store::start(data.path(), 1 << 20, false).expect("open");
        let (mut log, _, _rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let m = persistent_msg(b"m");
        assert_eq!(store.shared.state.lock().pending_bytes(), 0);
        log.enqueue_confirmed(1, &m, None, ticket(&ctx, 1));
        let one_record = store.shared.state.lock().pending_bytes();
        log.delivered(&[1]);
        assert_eq!(
            journals(),
            0,
            "journal written for a message still in memory"
        );
        assert_eq!(
            store.shared.state.lock().pending_bytes(),
            one_record,
            "a delivered record was added"
        );
        assert!(log.flush(true, false));
        // Its enqueue is in the file: the flag goes to the journal, as before.
        log.enqueue_confirmed(2, &m, None, ticket(&ctx, 2));
        assert!(log.flush(true, false));
        log.delivered(&[2]);
        let after_2 = journals();
        assert!(after_2 > 0, "no journal record for a written message");
        // Still pending, but more than MARK_SCAN enqueues back: a delivered record and a
        // journal write too.
        for id in 3..=(4 + MARK_SCAN as u64) {
            log.enqueue(id, &m, None);
        }
        log.delivered(&[3]);
        assert!(
            journals() > after_2,
            "no journal record for an old pending enqueue"
        );
        // Delivered together with a recent one: no shortcut for part of a batch of ids.
        let last = 5 + MARK_SCAN as u64;
        log.enqueue_confirmed(last, &m, None, ticket(&ctx, last));
        log.delivered(&[4, last]);
        log.delivered(&[last - 1]);
        assert!(log.flush(true, false));
        assert_eq!(confirms(&mut crx).len(), 3);
        drop(log);
        store.close();
        drop(store);
        // The journals are applied and removed at boot; message 1's flag can only come from
        // its own record.
        let store = Store::open(data.path()).expect("reopen");
        let (_log, rec, _rx) = store.attach("/", "q");
        let flagged: Vec<u64> = rec.iter().filter(|r| r.redelivered).map(|r| r.id).collect();
        assert_eq!(flagged, vec![1, 2, 3, 4, last - 1, last]);
        assert_eq!(rec.len() as u64, last);
        store.close();
    }

    #[test]
    fn segments_are_reclaimed_when_every_batch_is_written_by_the_queue() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        let store = Store::open_with(data.path(), 8 << 10).expect("open");
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
    fn the_writer_sends_the_confirms_of_a_synced_batch_itself() {
        let data = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(data.path(), 1 << 20).expect("open");
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
        // A transient message in a durable queue: confirmed at once.
        let props = amq_protocol::protocol::basic::AMQPProperties::default();
        let transient =
            Message::new("".into(), "q".into(), props, Bytes::from_static(b"t")).expect("message");
        assert!(log
            .enqueue_confirmed(7, &transient, None, ticket(&ctx, 7))
            .is_none());
        assert_eq!(confirms(&mut crx), vec![(7, true)]);
        store.close();
        assert!(
            rx.try_recv().is_err(),
            "confirmed enqueues reported to the queue too"
        );
    }

    #[test]
    fn a_failed_batch_hands_the_queue_every_id_and_the_tickets_to_nack() {
        let data = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(data.path(), 1 << 20).expect("open");
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
                QueueCmd::WriteFailed { ids, tickets } => {
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

    #[test]
    fn boot_after_a_kill_keeps_what_was_written_before_the_zeros_and_drops_a_half_prepared_file() {
        const SEG: u64 = 64 << 10;
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let msgs: Vec<Message> = (0..3)
            .map(|i| persistent_msg(format!("m{i}").as_bytes()))
            .collect();
        // Segment 1: two whole records, then zeros (killed while idle).
        let mut one = record::MAGIC.to_vec();
        one.extend(enq_bytes(1, &msgs[0]));
        one.extend(enq_bytes(2, &msgs[1]));
        let one_len = one.len() as u64;
        one.resize(SEG as usize, 0);
        std::fs::write(seg_path(&dir, 1), &one).expect("write");
        // Segment 2: a record torn in its middle, then zeros (killed during a write).
        let mut two = record::MAGIC.to_vec();
        let torn = enq_bytes(3, &msgs[2]);
        two.extend_from_slice(&torn[..torn.len() / 2]);
        two.resize(SEG as usize, 0);
        std::fs::write(seg_path(&dir, 2), &two).expect("write");
        // Killed while zero-filling the next file.
        std::fs::write(dir.join(PREPARED), vec![0u8; 1000]).expect("write");

        let store = Store::open_with(data.path(), SEG).expect("open");
        assert!(!dir.join(PREPARED).exists(), "half-prepared file kept");
        let (_log, recovered, _rx) = store.attach("/", "q");
        let ids: Vec<u64> = recovered.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(&recovered[1].msg.body[..], b"m1");
        let len = |s| std::fs::metadata(seg_path(&dir, s)).expect("stat").len();
        assert_eq!(len(1), one_len);
        assert_eq!(len(2), record::MAGIC.len() as u64);
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

    #[test]
    fn the_journal_switches_when_full_only_to_an_empty_file_and_hands_back_the_one_to_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = |n: &str| Arc::new(File::create(dir.path().join(n)).expect("file"));
        let mut j = Journal {
            files: [f("a"), f("b")],
            active: 0,
            len: [0; 2],
        };
        // Below the switch size: the active file keeps growing, nothing to empty.
        j.len[0] = 50;
        assert!(j.take_batch(100).is_none());
        assert_eq!(j.active, 0);
        // Full: switch; the old file is emptied once the batch is written.
        j.len[0] = 100;
        let (i, _) = j.take_batch(100).expect("the old file to empty");
        assert_eq!((i, j.active), (0, 1));
        // That batch failed: file 0 keeps its records, so no switch until it is emptied.
        j.len[1] = 500;
        let (i, _) = j.take_batch(100).expect("still file 0");
        assert_eq!((i, j.active), (0, 1));
        j.len[0] = 0;
        let (i, _) = j.take_batch(100).expect("file 1 now");
        assert_eq!((i, j.active), (1, 0));
        j.len[1] = 0;
        assert!(j.take_batch(100).is_none(), "file 1 emptied: nothing to do");
    }

    #[test]
    fn a_queue_declared_again_numbers_its_messages_after_the_deleted_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
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
        let store = Store::open(dir.path()).expect("reopen");
        let (log, rec, _rx) = store.attach("/", "q");
        assert_eq!(log.base, 0);
        let got: Vec<(u64, &[u8])> = rec.iter().map(|r| (r.id, &r.msg.body[..])).collect();
        assert_eq!(got, vec![(3, &b"c"[..])]);
        store.close();
    }

    #[test]
    fn recovery_applies_the_delivery_journals_and_keeps_their_flags_in_a_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msgs = dir.path().join("msgs");
        std::fs::create_dir_all(&msgs).expect("mkdir");
        let m = persistent_msg(b"x");
        let mut seg = record::MAGIC.to_vec();
        for id in 1..=3 {
            seg.extend(enq_bytes(id, &m));
        }
        std::fs::write(seg_path(&msgs, 1), &seg).expect("segment");
        // Journal 1 marks 2 (and an unknown queue); journal 0 marks 3 and ends torn.
        let mut j1 = Vec::new();
        for (queue, id) in [("/\0q", 2), ("/\0gone", 1)] {
            record::encode(
                &Record::Delivered {
                    queue,
                    ids: vec![id],
                },
                &mut j1,
            );
        }
        std::fs::write(msgs.join(JOURNALS[1]), &j1).expect("journal");
        let mut j0 = Vec::new();
        record::encode(
            &Record::Delivered {
                queue: "/\0q",
                ids: vec![3],
            },
            &mut j0,
        );
        j0.extend_from_slice(&[9, 0, 0]);
        std::fs::write(msgs.join(JOURNALS[0]), &j0).expect("journal");
        for round in 0..2 {
            let store = Store::open(dir.path()).expect("open");
            assert!(
                JOURNALS.iter().all(|n| !msgs.join(n).exists()),
                "journals kept"
            );
            let (log, rec, _rx) = store.attach("/", "q");
            let got: Vec<(u64, bool)> = rec.iter().map(|r| (r.id, r.redelivered)).collect();
            assert_eq!(got, vec![(1, false), (2, true), (3, true)], "round {round}");
            drop(log);
            store.close();
        }
    }
    #[test]
    fn the_delivery_journals_are_switched_and_emptied_as_the_writer_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.shared.state.lock().journal_switch_bytes = 200;
        let (mut log, _, _rx) = store.attach("/", "q");
        let m = persistent_msg(b"x");
        for id in 1..=200 {
            log.enqueue(id, &m, None);
        }
        log.flush(false, false);
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        for id in 1..=200 {
            log.delivered(&[id]);
            // Until the writer has taken it.
            while !store.shared.state.lock().pending.is_empty() {
                assert!(std::time::SystemTime::now() < deadline, "writer stuck");
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        // 200 records of about 40 bytes went through; neither file holds more than the
        // switch size plus a record or two.
        let sizes: Vec<u64> = JOURNALS
            .iter()
            .map(|n| {
                std::fs::metadata(dir.path().join("msgs").join(n))
                    .expect("journal")
                    .len()
            })
            .collect();
        assert!(sizes.iter().all(|s| *s <= 300), "journal sizes {sizes:?}");
        drop(log);
        store.close();
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let (_log, rec, _rx) = store.attach("/", "q");
        assert_eq!(rec.len(), 200);
        assert!(rec.iter().all(|r| r.redelivered));
        store.close();
    }
}
