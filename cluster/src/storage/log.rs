//! The Raft log and vote on disk (openraft's `RaftLogStorage`, storage-v2).
//!
//! Layout under `data_dir`:
//! - `log/NNNNNNNNNNNNNNNNNNNN.seg`: append-only segments named by the index of their first entry
//!   (20 digits), each a run of records ([`super::file`]: length, CRC32, JSON entry). A segment
//!   is rotated past [`SEGMENT_BYTES`].
//! - `vote`: the last vote, replaced atomically with fsync before `save_vote` returns.
//! - `purged`: the last purged log id, replaced atomically before segments are deleted.
//! - `committed`: the last committed log id, replaced by rename without fsync. It only tells a restarted
//!   node how far it may re-apply its own log before hearing from a leader; an older or unreadable
//!   value is still true (commits never go back), so it needs no sync.
//!
//! Every entry also lives in memory (`Mem::entries`) until purged: reads never touch the disk.
//! Writes go, in order, to one writer thread that batches them and calls `sync_data` once per
//! batch before completing openraft's `LogFlushed` callbacks (group commit), so an entry is
//! acknowledged only once it is on disk. Truncation and purge update memory at once (openraft
//! must not read a truncated entry after `truncate` returns) and disk in queue order.
//!
//! On open, segments are read back in order; the first record that is torn, fails its CRC or
//! breaks the index sequence cuts the log there (the file is truncated, later segments deleted):
//! that is what a kill -9 in the middle of a write leaves, and those entries were never
//! acknowledged. A record with a good CRC that does not decode is corruption, not a torn tail:
//! opening fails.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::file::{decode_record, encode_record, read_records, sync_dir, write_atomic, Decoded};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// A segment is rotated once it is larger than this.
pub(crate) const SEGMENT_BYTES: u64 = 8 << 20;

const LOG_DIR: &str = "log";

/// The log store handed to openraft; clones share everything.
#[derive(Clone)]
pub(crate) struct LogStore {
    shared: Arc<Shared>,
}

struct Shared {
    mem: Mutex<Mem>,
    tx: Mutex<Option<std_mpsc::Sender<DiskOp>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

enum Done {
    Raft(LogFlushed<TypeConfig>),
    Chan(oneshot::Sender<io::Result<()>>),
}

impl Done {
    fn complete(self, res: io::Result<()>) {
        match self {
            Done::Raft(cb) => cb.log_io_completed(res),
            Done::Chan(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

enum DiskOp {
    Append(Vec<(u64, Vec<u8>)>, Done),
    Truncate(u64),
    Purge(u64, Vec<u8>),
    Vote(Vec<u8>, oneshot::Sender<io::Result<()>>),
    Committed(Vec<u8>),
}

fn log_err(e: io::Error) -> StorageError {
    StorageError::from(StorageIOError::write_logs(&e))
}

fn vote_err(e: io::Error) -> StorageError {
    StorageError::from(StorageIOError::write_vote(&e))
}

fn json<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "log writer is closed")
}

// === impl LogStore ===

impl LogStore {
    /// Open (or create) the log under `root`, cutting a torn tail.
    pub(crate) fn open(root: &Path) -> io::Result<LogStore> {
        fs::create_dir_all(root.join(LOG_DIR))?;
        let purged: Option<LogId> = match read_records(root, "purged")? {
            Some(r) if !r.is_empty() => Some(json(&r[0])?),
            _ => None,
        };
        let vote: Option<Vote> = match read_records(root, "vote")? {
            Some(r) if !r.is_empty() => Some(json(&r[0])?),
            _ => None,
        };
        let committed: Option<LogId> = match fs::read(root.join("committed")) {
            Ok(buf) => match decode_record(&buf) {
                Decoded::Record(p, _) => serde_json::from_slice(p).ok(),
                _ => None,
            },
            Err(_) => None,
        };
        let (disk, entries) = Disk::load(root, purged.map(|p| p.index))?;
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("cluster-log".into())
            .spawn(move || disk.run(rx))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                mem: Mutex::new(Mem {
                    entries,
                    purged,
                    vote,
                    committed,
                }),
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// True when nothing was ever written: no vote, no entry, nothing purged.
    pub(crate) fn is_pristine(&self) -> bool {
        let m = self.shared.mem.lock();
        m.vote.is_none() && m.entries.is_empty() && m.purged.is_none()
    }

    pub(crate) fn last_log_id(&self) -> Option<LogId> {
        let m = self.shared.mem.lock();
        m.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(m.purged)
    }

    pub(crate) fn vote(&self) -> Option<Vote> {
        self.shared.mem.lock().vote
    }

    fn send(&self, op: DiskOp) -> io::Result<()> {
        match &*self.shared.tx.lock() {
            Some(tx) => tx.send(op).map_err(|_| closed()),
            None => Err(closed()),
        }
    }

    /// Append entries outside of openraft (the unsafe membership reset) and wait until they are
    /// on disk.
    pub(crate) async fn append_durable(&self, entries: Vec<Entry>) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let records = self.stage(entries)?;
        self.send(DiskOp::Append(records, Done::Chan(tx)))?;
        rx.await.map_err(|_| closed())?
    }

    /// Save a vote durably (also used outside of openraft by the membership reset).
    pub(crate) async fn store_vote(&self, vote: &Vote) -> io::Result<()> {
        let bytes = serde_json::to_vec(vote).map_err(io::Error::other)?;
        self.shared.mem.lock().vote = Some(*vote);
        let (tx, rx) = oneshot::channel();
        self.send(DiskOp::Vote(bytes, tx))?;
        rx.await.map_err(|_| closed())?
    }

    /// Serialize entries and put them in memory; a rewrite of an existing index truncates first.
    fn stage(&self, entries: Vec<Entry>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut records = Vec::with_capacity(entries.len());
        let mut m = self.shared.mem.lock();
        for e in entries {
            let idx = e.log_id.index;
            if m.entries.contains_key(&idx) {
                m.entries.split_off(&idx);
                drop(m);
                self.send(DiskOp::Truncate(idx))?;
                m = self.shared.mem.lock();
            }
            records.push((idx, serde_json::to_vec(&e).map_err(io::Error::other)?));
            m.entries.insert(idx, e);
        }
        Ok(records)
    }

    /// Stop the writer thread after it has finished what was queued.
    pub(crate) fn close(&self) {
        self.shared.tx.lock().take();
        if let Some(t) = self.shared.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Delete everything this store keeps under `root` (the store must be closed).
    pub(crate) fn wipe(root: &Path) -> io::Result<()> {
        for name in ["vote", "purged", "committed", "committed.tmp"] {
            match fs::remove_file(root.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir_all(root.join(LOG_DIR)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(root)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let m = self.shared.mem.lock();
        Ok(m.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let m = self.shared.mem.lock();
        let last = m
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(m.purged);
        Ok(LogState {
            last_purged_log_id: m.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.store_vote(vote).await.map_err(vote_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.shared.mem.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.shared.mem.lock().committed = committed;
        if let Some(c) = committed {
            let bytes = serde_json::to_vec(&c).map_err(|e| log_err(io::Error::other(e)))?;
            self.send(DiskOp::Committed(bytes)).map_err(log_err)?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.mem.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records = self.stage(entries.into_iter().collect()).map_err(log_err)?;
        self.send(DiskOp::Append(records, Done::Raft(callback)))
            .map_err(log_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.shared.mem.lock().entries.split_off(&log_id.index);
        self.send(DiskOp::Truncate(log_id.index)).map_err(log_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(|e| log_err(io::Error::other(e)))?;
        {
            let mut m = self.shared.mem.lock();
            let keep = m.entries.split_off(&(log_id.index + 1));
            m.entries = keep;
            if m.purged.is_none_or(|p| p.index < log_id.index) {
                m.purged = Some(log_id);
            }
        }
        self.send(DiskOp::Purge(log_id.index, bytes))
            .map_err(log_err)
    }
}

/// The writer thread's view of the segments.
struct Disk {
    root: PathBuf,
    dir: PathBuf,
    /// first index -> (last index, length in bytes)
    segs: BTreeMap<u64, (u64, u64)>,
    /// index -> (segment, offset): where to cut on truncation
    offsets: BTreeMap<u64, (u64, u64)>,
    active: Option<File>,
    dirty: bool,
    failed: Option<String>,
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

// === impl Disk ===

impl Disk {
    /// Read every segment back, cut a torn tail, and return the entries above `purged`.
    /// (Index 0 is a real entry: openraft writes the initial membership there.)
    fn load(root: &Path, purged: Option<u64>) -> io::Result<(Disk, BTreeMap<u64, Entry>)> {
        let dir = root.join(LOG_DIR);
        let mut firsts: Vec<u64> = Vec::new();
        for de in fs::read_dir(&dir)? {
            let name = de?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg") {
                if let Ok(first) = stem.parse::<u64>() {
                    firsts.push(first);
                }
            } else if name.ends_with(".tmp") {
                let _ = fs::remove_file(dir.join(&*name));
            }
        }
        firsts.sort_unstable();
        let mut disk = Disk {
            root: root.to_path_buf(),
            dir,
            segs: BTreeMap::new(),
            offsets: BTreeMap::new(),
            active: None,
            dirty: false,
            failed: None,
        };
        let mut entries = BTreeMap::new();
        let mut last: Option<u64> = None;
        let mut cut: Option<(u64, u64, String)> = None;
        'segs: for &first in &firsts {
            let buf = fs::read(disk.dir.join(seg_name(first)))?;
            let mut at = 0usize;
            let mut seg_last = None;
            loop {
                let (payload, used) = match decode_record(&buf[at..]) {
                    Decoded::Record(p, used) => (p, used),
                    Decoded::End => break,
                    Decoded::Torn(why) => {
                        cut = Some((first, at as u64, why.to_string()));
                        break;
                    }
                };
                let entry: Entry = serde_json::from_slice(payload).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("log segment {first}: entry at offset {at} does not decode: {e}"),
                    )
                })?;
                let idx = entry.log_id.index;
                let in_sequence = match last {
                    None => at != 0 || idx == first,
                    // A gap is fine only below the purge mark (purged segments may linger).
                    Some(l) => {
                        idx == l + 1
                            || (purged.is_some_and(|p| idx <= p + 1) && at == 0 && idx == first)
                    }
                };
                if !in_sequence {
                    cut = Some((first, at as u64, format!("index {idx} out of sequence")));
                    break;
                }
                disk.offsets.insert(idx, (first, at as u64));
                if purged.is_none_or(|p| idx > p) {
                    entries.insert(idx, entry);
                }
                last = Some(idx);
                seg_last = Some(idx);
                at += used;
            }
            match seg_last {
                Some(l) => {
                    disk.segs.insert(first, (l, at as u64));
                }
                None if cut.is_none() => {
                    // An empty segment (created, then killed before its first write).
                    let _ = fs::remove_file(disk.dir.join(seg_name(first)));
                }
                None => {}
            }
            if cut.is_some() {
                break 'segs;
            }
        }
        if let Some((seg, off, why)) = cut {
            tracing::warn!(
                segment = seg,
                offset = off,
                reason = %why,
                "cluster log: cutting a torn tail left by a crash"
            );
            if off == 0 {
                fs::remove_file(disk.dir.join(seg_name(seg)))?;
                disk.segs.remove(&seg);
            } else {
                let f = OpenOptions::new()
                    .write(true)
                    .open(disk.dir.join(seg_name(seg)))?;
                f.set_len(off)?;
                f.sync_all()?;
            }
            for &later in firsts.iter().filter(|&&f| f > seg) {
                fs::remove_file(disk.dir.join(seg_name(later)))?;
            }
            sync_dir(&disk.dir)?;
        }
        if let Some((&first, _)) = disk.segs.iter().next_back() {
            disk.active = Some(
                OpenOptions::new()
                    .append(true)
                    .open(disk.dir.join(seg_name(first)))?,
            );
        }
        Ok((disk, entries))
    }

    fn run(mut self, rx: std_mpsc::Receiver<DiskOp>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut waiting = Vec::new();
            for op in batch {
                match op {
                    DiskOp::Append(records, done) => {
                        if self.failed.is_none() {
                            if let Err(e) = self.append(&records) {
                                self.fail("append", &e);
                            }
                        }
                        waiting.push(done);
                    }
                    DiskOp::Truncate(idx) => {
                        if self.failed.is_none() {
                            if let Err(e) = self.truncate(idx) {
                                self.fail("truncate", &e);
                            }
                        }
                    }
                    DiskOp::Purge(idx, bytes) => {
                        if self.failed.is_none() {
                            if let Err(e) = self.purge(idx, &bytes) {
                                self.fail("purge", &e);
                            }
                        }
                    }
                    DiskOp::Vote(bytes, tx) => {
                        let _ = tx.send(write_atomic(&self.root, "vote", &[&bytes]));
                    }
                    DiskOp::Committed(bytes) => {
                        let mut rec = Vec::new();
                        encode_record(&bytes, &mut rec);
                        // Replaced by rename, never truncated in place: a kill -9 between
                        // a truncate and its write would leave an empty file, and the node
                        // would restart without re-applying what it had committed.
                        let tmp = self.root.join("committed.tmp");
                        if fs::write(&tmp, rec).is_ok() {
                            let _ = fs::rename(&tmp, self.root.join("committed"));
                        }
                    }
                }
            }
            if self.dirty && self.failed.is_none() {
                if let Some(f) = &self.active {
                    if let Err(e) = f.sync_data() {
                        self.fail("fsync", &e);
                    }
                }
                self.dirty = false;
            }
            for done in waiting {
                let res = match &self.failed {
                    None => Ok(()),
                    Some(why) => Err(io::Error::other(why.clone())),
                };
                done.complete(res);
            }
        }
        if let Some(f) = &self.active {
            let _ = f.sync_data();
        }
    }

    fn fail(&mut self, what: &str, e: &io::Error) {
        tracing::error!(error = %e, "cluster log: {what} failed; the log refuses further writes");
        self.failed = Some(format!("{what}: {e}"));
    }

    fn last_index(&self) -> Option<u64> {
        self.offsets.keys().next_back().copied()
    }

    fn append(&mut self, records: &[(u64, Vec<u8>)]) -> io::Result<()> {
        for (idx, payload) in records {
            match self.last_index() {
                Some(l) if l >= *idx => self.truncate(*idx)?,
                Some(l) if l + 1 < *idx => self.rotate(*idx)?,
                None => self.rotate(*idx)?,
                _ => {}
            }
            let needs_rotation = self
                .segs
                .iter()
                .next_back()
                .is_none_or(|(_, &(_, len))| len >= SEGMENT_BYTES);
            if needs_rotation {
                self.rotate(*idx)?;
            }
            let mut rec = Vec::with_capacity(payload.len() + 8);
            encode_record(payload, &mut rec);
            let Some((&first, seg)) = self.segs.iter_mut().next_back() else {
                return Err(io::Error::other("no active segment"));
            };
            let Some(file) = self.active.as_mut() else {
                return Err(io::Error::other("no active segment file"));
            };
            file.write_all(&rec)?;
            self.offsets.insert(*idx, (first, seg.1));
            seg.0 = *idx;
            seg.1 += rec.len() as u64;
            self.dirty = true;
        }
        Ok(())
    }

    /// Start a new segment whose first entry will be `first`.
    fn rotate(&mut self, first: u64) -> io::Result<()> {
        if let Some(f) = &self.active {
            if self.dirty {
                f.sync_data()?;
                self.dirty = false;
            }
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(seg_name(first)))?;
        f.set_len(0)?;
        sync_dir(&self.dir)?;
        self.active = Some(f);
        self.segs.insert(first, (first.saturating_sub(1), 0));
        Ok(())
    }

    /// Remove every entry at `idx` and after.
    fn truncate(&mut self, idx: u64) -> io::Result<()> {
        let Some(&(seg, off)) = self.offsets.get(&idx) else {
            return Ok(());
        };
        self.offsets.split_off(&idx);
        let doomed: Vec<u64> = self.segs.range(seg + 1..).map(|(f, _)| *f).collect();
        self.active = None;
        for f in doomed {
            fs::remove_file(self.dir.join(seg_name(f)))?;
            self.segs.remove(&f);
        }
        if off == 0 {
            fs::remove_file(self.dir.join(seg_name(seg)))?;
            self.segs.remove(&seg);
        } else {
            let f = OpenOptions::new()
                .append(true)
                .open(self.dir.join(seg_name(seg)))?;
            f.set_len(off)?;
            f.sync_all()?;
            self.segs.insert(seg, (idx - 1, off));
        }
        sync_dir(&self.dir)?;
        if let Some((&first, _)) = self.segs.iter().next_back() {
            self.active = Some(
                OpenOptions::new()
                    .append(true)
                    .open(self.dir.join(seg_name(first)))?,
            );
        }
        Ok(())
    }

    /// Record the purge mark, then delete the segments wholly at or below `idx`.
    fn purge(&mut self, idx: u64, mark: &[u8]) -> io::Result<()> {
        write_atomic(&self.root, "purged", &[mark])?;
        let doomed: Vec<u64> = self
            .segs
            .iter()
            .filter(|(_, &(last, _))| last <= idx)
            .map(|(f, _)| *f)
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let last_first = self.segs.keys().next_back().copied();
        for f in &doomed {
            if Some(*f) == last_first {
                self.active = None;
            }
            fs::remove_file(self.dir.join(seg_name(*f)))?;
            self.segs.remove(f);
        }
        let keep = self.offsets.split_off(&(idx + 1));
        self.offsets = keep;
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::state::Op;
    use crate::types::Request;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Request::Batch(vec![Op::Delete {
                key: format!("k{index}"),
            }])),
        }
    }

    async fn put(store: &LogStore, entries: Vec<Entry>) {
        store.append_durable(entries).await.unwrap();
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store
            .try_get_log_entries(0..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn reopen_keeps_entries_vote_and_purge_mark() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        assert!(s.is_pristine());
        // Index 0 is a real entry (openraft's initial membership).
        put(&s, (0..=5).map(|i| entry(1, i)).collect()).await;
        s.close();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1, 2, 3, 4, 5]);
        s.store_vote(&Vote::new(3, 7)).await.unwrap();
        s.purge(LogId::new(CommittedLeaderId::new(1, 1), 2))
            .await
            .unwrap();
        s.close();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![3, 4, 5]);
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(5));
        s.close();
    }

    #[tokio::test]
    async fn truncate_then_append_replaces_the_tail_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        put(&s, (1..=6).map(|i| entry(1, i)).collect()).await;
        s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        put(&s, vec![entry(2, 4), entry(2, 5)]).await;
        s.close();
        let mut s = LogStore::open(dir.path()).unwrap();
        let got = s.try_get_log_entries(0..).await.unwrap();
        let ids: Vec<(u64, u64)> = got
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect();
        assert_eq!(ids, vec![(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]);
        s.close();
    }

    #[tokio::test]
    async fn torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        put(&s, (1..=3).map(|i| entry(1, i)).collect()).await;
        s.close();
        let seg = dir.path().join(LOG_DIR).join(seg_name(1));
        let full = fs::read(&seg).unwrap();
        // Half of a fourth record, as a kill -9 mid-write leaves it.
        let mut rec = Vec::new();
        encode_record(&serde_json::to_vec(&entry(1, 4)).unwrap(), &mut rec);
        let mut torn = full.clone();
        torn.extend_from_slice(&rec[..rec.len() / 2]);
        fs::write(&seg, &torn).unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![1, 2, 3]);
        assert_eq!(fs::read(&seg).unwrap(), full, "the torn bytes are cut");
        // The log goes on after the cut.
        put(&s, vec![entry(1, 4)]).await;
        s.close();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![1, 2, 3, 4]);
        s.close();
    }

    #[tokio::test]
    async fn flipped_byte_cuts_from_that_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        put(&s, (1..=3).map(|i| entry(1, i)).collect()).await;
        s.close();
        let seg = dir.path().join(LOG_DIR).join(seg_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![1, 2]);
        s.close();
    }

    #[tokio::test]
    async fn segments_rotate_and_purge_deletes_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(dir.path()).unwrap();
        // Big entries so that a few segments are needed.
        let big = |i: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Request::Batch(vec![Op::Put {
                key: format!("k{i}"),
                value: serde_json::Value::String("x".repeat(3 << 20)),
            }])),
        };
        for i in 1..=7 {
            put(&s, vec![big(i)]).await;
        }
        let segs = || fs::read_dir(dir.path().join(LOG_DIR)).unwrap().count();
        assert!(segs() >= 3, "rotated: {}", segs());
        s.purge(LogId::new(CommittedLeaderId::new(1, 1), 6))
            .await
            .unwrap();
        s.close();
        assert_eq!(segs(), 1);
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![7]);
        put(&s, vec![big(8)]).await;
        s.close();
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut s).await, vec![7, 8]);
        s.close();
    }
}
