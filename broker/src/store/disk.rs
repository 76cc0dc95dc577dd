//! The node's message store: one append-only log of segment files under `<data-dir>/msgs`,
//! shared by every durable queue, written by one writer thread with group commit.
//!
//! - Queue actors append records under a short mutex ([`DiskLog`]); nothing waits for the disk
//!   on the async runtime.
//! - The writer thread takes everything pending, writes it, and runs one `fdatasync` for the
//!   whole batch; then it tells each queue which of its enqueues are on disk
//!   (`QueueCmd::Synced`) or failed (`QueueCmd::WriteFailed`, the publishes get basic.nack). The
//!   next batch starts as soon as the previous sync ends: no timer, no added delay when idle.
//! - Reclaim: segments are deleted oldest first once nothing live is left in them; the oldest
//!   segment is compacted (its live enqueues copied to the head of the log) when less than half
//!   of it is live, so disk use stays bounded by live messages. Deleting only the oldest segment
//!   keeps replay correct: a settle or delete record never outlives the enqueue it cancels.

use super::record::{self, Enqueue, Record};
use super::replay::{Live, Replay};
use super::{QueueLog, Safety};
use crate::intmap::IntMap;
use crate::queue::{Message, QueueCmd};
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
    id: u64,
    tx: mpsc::UnboundedSender<QueueCmd>,
}

#[derive(Debug)]
struct Chunk {
    seg: u64,
    buf: Vec<u8>,
    notes: Vec<Note>,
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
}

impl State {
    /// Appends one record to the current segment (rolling over when full); returns the
    /// segment and the record's size.
    fn append(&mut self, rec: &Record<'_>, note: Option<Note>) -> (u64, u64) {
        if self.pending.last().is_none_or(|c| c.seg != self.cur_seg) {
            self.pending.push(Chunk {
                seg: self.cur_seg,
                buf: Vec::new(),
                notes: Vec::new(),
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
            self.pending.push(Chunk {
                seg: self.cur_seg,
                buf: tail,
                notes: note.into_iter().collect(),
            });
        } else {
            seg.size += n;
            chunk.notes.extend(note);
        }
        (self.cur_seg, n)
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
}

/// The message store of one node (one data directory).
#[derive(Debug)]
pub struct Store {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let dir = data_dir.join("msgs");
        let mut replay = Replay::default();
        let mut segs = BTreeMap::new();
        let mut max_seg = 0;
        let started = tokio::time::Instant::now();
        if dir.is_dir() {
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
                let mut size = bytes.len() as u64;
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
                    size = scan.valid_len as u64;
                }
                segs.insert(
                    n,
                    Seg {
                        size,
                        ..Seg::default()
                    },
                );
            }
        }
        let mut state = State {
            cur_seg: max_seg + 1,
            pending: Vec::new(),
            segs,
            queues: HashMap::new(),
            unclaimed: HashMap::new(),
            shutdown: false,
            unhealthy: false,
            written_below: max_seg + 1,
            segment_bytes,
        };
        let mut messages = 0u64;
        for (q, m) in &replay.queues {
            let key: Arc<str> = q.as_str().into();
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
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(state),
            wake: Condvar::new(),
        });
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("warren-store".into())
            .spawn(move || writer_loop(&s2))?;
        Ok(Arc::new(Self {
            shared,
            writer: Mutex::new(Some(writer)),
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
        let (key, live) = {
            let mut st = self.shared.state.lock();
            let live = st.unclaimed.remove(&key).unwrap_or_default();
            let key = match st.queues.get_key_value(key.as_str()) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = key.into();
                    st.queues.insert(k.clone(), IntMap::default());
                    k
                }
            };
            (key, live)
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
        let log = DiskLog {
            store: self.clone(),
            key,
            tx,
        };
        if !bad.is_empty() {
            warn!(queue = %name, vhost = %vhost, count = bad.len(), "store: unreadable recovered messages dropped");
            let mut log2 = DiskLog {
                store: self.clone(),
                key: log.key.clone(),
                tx: log.tx.clone(),
            };
            log2.settle(&bad);
        }
        if !out.is_empty() {
            info!(queue = %name, vhost = %vhost, messages = out.len(), "store: queue recovered");
        }
        (log, out, rx)
    }

    /// Writes what is pending, stops the writer and waits for it.
    pub fn close(&self) {
        self.shared.state.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
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
    }
}

/// The open segment the writer appends to.
struct OpenSeg {
    seg: u64,
    file: File,
    len: u64,
}

fn open_segment(dir: &Path, seg: u64) -> io::Result<OpenSeg> {
    std::fs::create_dir_all(dir)?;
    let path = seg_path(dir, seg);
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
    open: &mut Option<OpenSeg>,
    chunks: &[Chunk],
    durable: bool,
) -> io::Result<()> {
    for c in chunks {
        if open.as_ref().is_none_or(|o| o.seg != c.seg) {
            if let Some(o) = open.take() {
                sync(&o.file)?;
            }
            *open = Some(open_segment(dir, c.seg)?);
        }
        let Some(o) = open.as_mut() else {
            return Err(io::Error::other("no open segment"));
        };
        if let Err(e) = o.file.write_all_at(&c.buf, o.len) {
            let _ = o.file.set_len(o.len);
            return Err(e);
        }
        o.len += c.buf.len() as u64;
    }
    if let Some(o) = open.as_ref().filter(|_| durable) {
        sync(&o.file)?;
    }
    Ok(())
}

fn writer_loop(sh: &Shared) {
    let mut open: Option<OpenSeg> = None;
    // A segment whose compaction moved nothing (its live records unreadable): not retried.
    let mut stuck: Option<u64> = None;
    let mut reported = 0;
    loop {
        // Reclaim: unlink dead segments, pick one to compact.
        let (dead, candidate) = {
            let mut st = sh.state.lock();
            let c = st.compaction_candidate().filter(|c| Some(*c) != stuck);
            (st.take_dead_segments(), c)
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
        let (chunks, moved) = {
            let mut st = sh.state.lock();
            while st.pending.is_empty() && !st.shutdown && compact.is_none() {
                // Wakes at least once a second to report the sync count when it moved
                // (debug level; the benchmark reads it).
                if sh
                    .wake
                    .wait_for(&mut st, std::time::Duration::from_secs(1))
                    .timed_out()
                {
                    let n = syncs();
                    if n != reported {
                        reported = n;
                        debug!(syncs = n, "store: sync count");
                    }
                }
            }
            if st.pending.is_empty() && compact.is_none() {
                break;
            }
            let moved = match &compact {
                Some((s, bytes)) => st.copy_live(*s, bytes),
                None => Vec::new(),
            };
            if let (Some((s, _)), true) = (&compact, moved.is_empty()) {
                stuck = Some(*s);
            }
            (std::mem::take(&mut st.pending), moved)
        };
        // Only enqueues (confirms wait for them) and compaction copies (the old segment is
        // deleted next) need the sync; acks and deliveries ride along with the next one.
        let durable = !moved.is_empty() || chunks.iter().any(|c| !c.notes.is_empty());
        let result = write_batch(&sh.dir, &mut open, &chunks, durable);
        // Tell each queue about its enqueues in this batch.
        let mut per_queue: HashMap<Arc<str>, (mpsc::UnboundedSender<QueueCmd>, u64, Vec<u64>)> =
            HashMap::new();
        for c in &chunks {
            for n in &c.notes {
                let e = per_queue
                    .entry(n.queue.clone())
                    .or_insert_with(|| (n.tx.clone(), 0, Vec::new()));
                e.1 = e.1.max(n.id);
                e.2.push(n.id);
            }
        }
        let mut st = sh.state.lock();
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
                // The failed enqueues are not on disk: forget them.
                for c in &chunks {
                    for n in &c.notes {
                        let slot = st.queues.get_mut(&n.queue).and_then(|m| m.remove(&n.id));
                        if let Some(s) = slot {
                            st.drop_live(s.seg, s.size);
                        }
                    }
                }
                // Compaction copies that did not make it: the originals still hold them.
                for (q, id, old) in moved {
                    let cur = st.queues.get(&q).and_then(|m| m.get(&id)).copied();
                    if let Some(cur) = cur {
                        st.drop_live(cur.seg, cur.size);
                        st.add_live(old.seg, old.size);
                        if let Some(s) = st.queues.get_mut(&q).and_then(|m| m.get_mut(&id)) {
                            s.seg = old.seg;
                            s.size = old.size;
                        }
                    }
                }
            }
        }
        drop(st);
        for (_, (tx, up_to, ids)) in per_queue {
            let cmd = match result {
                Ok(()) => QueueCmd::Synced { up_to },
                Err(_) => QueueCmd::WriteFailed { ids },
            };
            let _ = tx.send(cmd);
        }
    }
    if let Some(o) = open {
        let _ = sync(&o.file);
    }
}

/// The log of one durable queue: persistent messages go to the node's store.
#[derive(Debug)]
pub struct DiskLog {
    store: Arc<Store>,
    key: Arc<str>,
    tx: mpsc::UnboundedSender<QueueCmd>,
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
        for id in ids {
            if settle {
                if let Some(s) = m.remove(id) {
                    logged.push(*id);
                    freed.push(s);
                }
            } else if let Some(s) = m.get_mut(id) {
                if !s.delivered {
                    s.delivered = true;
                    logged.push(*id);
                }
            }
        }
        if logged.is_empty() {
            return;
        }
        for s in freed {
            st.drop_live(s.seg, s.size);
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
        st.append(&rec, None);
        drop(st);
        sh.wake.notify_one();
    }
}

impl QueueLog for DiskLog {
    fn enqueue(&mut self, id: u64, msg: &Message, ttl_ms: Option<u64>) -> Safety {
        if !msg.persistent() {
            return Safety::Safe;
        }
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
            tx: self.tx.clone(),
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
        drop(st);
        sh.wake.notify_one();
        Safety::Pending
    }

    fn settle(&mut self, ids: &[u64]) {
        self.ids_record(ids, true);
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
        st.append(&Record::DeleteQueue { queue: &self.key }, None);
        drop(st);
        sh.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(segment_bytes: u64) -> State {
        State {
            cur_seg: 1,
            pending: Vec::new(),
            segs: BTreeMap::new(),
            queues: HashMap::new(),
            unclaimed: HashMap::new(),
            shutdown: false,
            unhealthy: false,
            written_below: 1,
            segment_bytes,
        }
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
