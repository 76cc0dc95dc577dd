//! The node's message store, [`Store`]: one append-only log of segment files under
//! `<data-dir>/msgs`, shared by every durable queue, written in batches with group commit, one
//! batch at a time. The parts are listed in the `store` module docs; this file opens the store,
//! recovers it, attaches queues to it and closes it.
//!
//! - Recovery ([`Store::open`]): a leftover `next.pre` is deleted, the segments are replayed in
//!   order (damaged tails are cut and logged, never served; the unused zero rest of a
//!   pre-written segment is given back), then the delivery journals' flags are applied, written
//!   to a new segment (synced) and the journals removed.
//! - [`Store::attach`] gives a durable queue its log and its recovered messages, which keep
//!   their ids; a queue with nothing recovered numbers its messages after its name's past
//!   (`base`, see the `log` module docs).
//! - Queues recovered from the segments but not declared again by the boot-time definitions
//!   restore are dropped ([`Store::drop_unclaimed`]) so their segments can be reclaimed.

// `DiskLog` and `SEGMENT_BYTES` were defined here before the store was split into files; they
// stay reachable under this module's path.
pub use super::log::DiskLog;
pub use super::segments::SEGMENT_BYTES;

use super::journal::{JOURNALS, JOURNAL_SWITCH_BYTES};
use super::prewrite::{preparer_loop, stop_preparer, Prep, PREPARED};
use super::record::{self, Record};
use super::replay::{Live, Replay};
use super::segments::{write_batch, Seg};
use super::state::{Shared, Slot, State};
use super::writer::writer_loop;
use super::QueueLog;
use super::StoreEvent;
use crate::intmap::IntMap;
use crate::memory::Memory;
use crate::queue::Message;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The message store of one node (one data directory).
#[derive(Debug)]
pub struct Store {
    pub(super) shared: Arc<Shared>,
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

fn queue_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// Builds a message back from its stored parts, charged to `memory`; None if the stored header
/// does not parse.
fn rebuild_message(memory: &'static Memory, l: &Live) -> Option<Message> {
    super::message_from_parts(
        memory,
        &l.exchange,
        &l.routing_key,
        &l.header,
        Bytes::copy_from_slice(&l.body),
    )
}

impl Store {
    /// Opens the store under `data_dir` (nothing is created until the first write) and
    /// replays existing segments: damaged tails are cut and logged, never served. The messages
    /// it gives back to queues are charged to `memory`, its node's account.
    pub fn open(data_dir: &Path, memory: &'static Memory) -> io::Result<Arc<Self>> {
        Self::open_with(data_dir, SEGMENT_BYTES, memory)
    }

    /// [`Store::open`] with a given segment size (tests use small segments).
    pub fn open_with(
        data_dir: &Path,
        segment_bytes: u64,
        memory: &'static Memory,
    ) -> io::Result<Arc<Self>> {
        Self::start(data_dir, segment_bytes, true, memory)
    }

    /// Opens the store; without `writer` no writer thread runs (tests of the queues' own
    /// writes).
    pub(super) fn start(
        data_dir: &Path,
        segment_bytes: u64,
        writer: bool,
        memory: &'static Memory,
    ) -> io::Result<Arc<Self>> {
        let dir = data_dir.join("msgs");
        let mut replay = Replay::default();
        let mut segs = BTreeMap::new();
        let mut max_seg = 0;
        let started = tokio::time::Instant::now();
        let syncs = AtomicU64::new(0);
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
        // Delivered flags the journals hold beyond the segments (see the `journal` module docs).
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
            match write_batch(&dir, None, &syncs, &mut open, &state.pending, true) {
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
            syncs,
            memory,
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
    ) -> (DiskLog, Vec<Recovered>, mpsc::UnboundedReceiver<StoreEvent>) {
        self.attach_key(queue_key(vhost, name))
    }

    /// [`Store::attach`] by the log's key itself: a queue's is `vhost NUL name`; a mirror's
    /// copy uses keys of its own ([`Store::unclaimed_keys`] finds them again at boot).
    pub fn attach_key(
        self: &Arc<Self>,
        key: String,
    ) -> (DiskLog, Vec<Recovered>, mpsc::UnboundedReceiver<StoreEvent>) {
        let (vhost, name) = key.split_once('\0').unwrap_or(("", key.as_str()));
        let (vhost, name) = (vhost.to_owned(), name.to_owned());
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
            match rebuild_message(self.shared.memory, &l) {
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
            warn!(key = %log.key.escape_debug(), count = bad.len(), "store: unreadable recovered messages dropped");
            log.settle(&bad);
        }
        // Other logs than queues' (a mirror's copies) are reported by their owners.
        if !out.is_empty() && !log.key.starts_with('\0') {
            info!(queue = %name, vhost = %vhost, messages = out.len(), "store: queue recovered");
        }
        (log, out, rx)
    }

    /// The keys recovered from disk that start with `prefix` and are not attached yet (at
    /// boot: a mirror finds its copies).
    pub fn unclaimed_keys(&self, prefix: &str) -> Vec<String> {
        let st = self.shared.state.lock();
        st.unclaimed
            .iter()
            .filter(|(k, live)| k.starts_with(prefix) && !live.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
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
                "store: dropping the stored messages of a queue not served from this store (no definition here, or a cluster queue mastered elsewhere)"
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
        info!(syncs = self.syncs(), "store: closed");
    }

    /// Number of fdatasync calls this store has made.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
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
