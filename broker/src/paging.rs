//! Queue paging, the node's parts ([`Paging`], one per node in `crate::node::Node`): the page
//! directory, the memory-pressure state and the page file I/O. The per-queue logic is in
//! `crate::queue::ready`.
//!
//! - [`Paging::configure`] (from `Broker::bind`) wipes `<data-dir>/paging/` (paged messages are
//!   not recovered after a restart, as in RabbitMQ; persistent messages of durable queues come
//!   back from the message store) and makes it the directory of the node's queues
//!   ([`Paging::pager`]).
//! - [`Paging::pressure`]: paging is on once the node's [`Memory::used`] exceeds its
//!   [`Memory::paging_threshold`] and off again once it is below 90 % of it. Queue actors check
//!   it after each batch of commands and are woken through [`Paging::subscribe`] when it turns
//!   on; the alarm monitor also checks it every second, so the state (logged at info when it
//!   changes) follows memory use. Another broker in the same process pages on its own memory.
//! - [`FileIo`]: one queue's segments, `<queue serial>-<segment>.page`, written with pwrite and
//!   read with pread on the queue's own task, never synced.
//! - A failed page write is logged once per episode (`PageDir::write_failed` / `write_ok`).

use crate::memory::Memory;
use crate::queue::ready::{PageIo, Pager, PagerLimits};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// Directory under the data directory holding the page files.
pub const DIR_NAME: &str = "paging";

#[derive(Debug)]
struct PageDir {
    dir: PathBuf,
    limits: PagerLimits,
    next_queue: AtomicU64,
    /// A page write failed and none has succeeded since (one warning per episode).
    write_failing: AtomicBool,
}

/// One node's paging: its page directory and memory-pressure state.
#[derive(Debug)]
pub struct Paging {
    memory: &'static Memory,
    /// None: queues of this node never page (no directory configured).
    dir: Option<Arc<PageDir>>,
    active: watch::Sender<bool>,
    /// Number of times paging turned on. Queues watch this rather than `active`: paging can
    /// turn on and off again before an idle queue's task runs, and a watch keeps only the last
    /// value.
    starts: watch::Sender<u64>,
    /// A paging episode is under way (logged at its start and end).
    episode: AtomicBool,
    /// When paging was last on, milliseconds after `started`.
    last_on_ms: AtomicU64,
    started: tokio::time::Instant,
}

/// How long memory stays below the paging threshold before the end of paging is logged.
pub const EPISODE_END: std::time::Duration = std::time::Duration::from_secs(5);

// === impl Paging ===

impl Paging {
    /// Paging without a page directory: pressure is tracked, but queues never page (unit
    /// tests of vhosts and queues).
    pub fn without_dir(memory: &'static Memory) -> Self {
        Self {
            memory,
            dir: None,
            active: watch::Sender::new(false),
            starts: watch::Sender::new(0),
            episode: AtomicBool::new(false),
            last_on_ms: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
        }
    }

    /// Wipes and creates `<data_dir>/paging/` and makes it the page directory of this node's
    /// queues. Problems are logged: queues then keep their messages in memory.
    pub fn configure(memory: &'static Memory, data_dir: &Path) -> Self {
        Self::configure_with(memory, data_dir, PagerLimits::default())
    }

    /// [`Paging::configure`] with given pager sizes.
    pub fn configure_with(memory: &'static Memory, data_dir: &Path, limits: PagerLimits) -> Self {
        let dir = data_dir.join(DIR_NAME);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => info!(dir = %dir.display(), "page files of the previous run removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove old page files"),
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot create the page directory; queues will keep messages in memory");
        }
        Self {
            dir: Some(Arc::new(PageDir {
                dir,
                limits,
                next_queue: AtomicU64::new(1),
                write_failing: AtomicBool::new(false),
            })),
            ..Self::without_dir(memory)
        }
    }

    /// A pager for a new queue (None without a page directory: the queue never pages). Its
    /// messages read back are charged to this node's memory.
    pub fn pager(&self, label: Arc<str>) -> Option<Pager> {
        let d = self.dir.clone()?;
        let n = d.next_queue.fetch_add(1, Ordering::Relaxed);
        let limits = d.limits;
        let io = FileIo {
            dir: d,
            queue: n,
            label: label.clone(),
            write: None,
            read: None,
        };
        Some(Pager::new(Box::new(io), label, limits, self.memory))
    }

    /// Whether queues should page out now. Also logs paging episodes: the start when memory
    /// first exceeds the threshold, the end once it has stayed below for [`EPISODE_END`]
    /// (paging brings memory down quickly, so a steady publisher turns it on and off many
    /// times a second).
    pub fn pressure(&self) -> bool {
        let used = self.memory.used();
        let threshold = self.memory.paging_threshold();
        let on = *self.active.borrow();
        let want = if on {
            used > threshold - threshold / 10
        } else {
            used > threshold
        };
        if want != on {
            let changed = self.active.send_if_modified(|v| {
                let changed = *v != want;
                *v = want;
                changed
            });
            if changed && want {
                self.starts.send_modify(|n| *n += 1);
            }
        }
        let now = self.started.elapsed().as_millis() as u64;
        if want {
            self.last_on_ms.store(now, Ordering::Relaxed);
            if !self.episode.load(Ordering::Relaxed) && !self.episode.swap(true, Ordering::Relaxed)
            {
                info!(
                    used,
                    threshold, "memory above the paging threshold: queues page messages to disk"
                );
            }
        } else if self.episode.load(Ordering::Relaxed)
            && now.saturating_sub(self.last_on_ms.load(Ordering::Relaxed))
                >= EPISODE_END.as_millis() as u64
            && self.episode.swap(false, Ordering::Relaxed)
        {
            info!(
                used,
                threshold, "memory below the paging threshold for a while: queues stopped paging"
            );
        }
        want
    }

    /// Changes each time paging turns on (however briefly).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.starts.subscribe()
    }
}

// === impl PageDir ===

impl PageDir {
    /// A page write failed: warn once per episode (the messages stay in memory).
    fn write_failed(&self, queue: &str, e: &io::Error) {
        if !self.write_failing.swap(true, Ordering::Relaxed) {
            warn!(queue = %queue, error = %e, "cannot write page files; messages stay in memory (the memory alarm remains the limit)");
        }
    }

    /// A page write succeeded: ends a failure episode.
    fn write_ok(&self) {
        if self.write_failing.load(Ordering::Relaxed)
            && self.write_failing.swap(false, Ordering::Relaxed)
        {
            info!("page files can be written again");
        }
    }
}

/// One queue's segment files.
#[derive(Debug)]
pub struct FileIo {
    /// The node's page directory.
    dir: Arc<PageDir>,
    queue: u64,
    /// The queue, for the log line of a failure episode.
    label: Arc<str>,
    write: Option<(u64, File)>,
    read: Option<(u64, File)>,
}

impl FileIo {
    fn path(&self, seg: u64) -> PathBuf {
        self.dir
            .dir
            .join(format!("{:016x}-{seg:08x}.page", self.queue))
    }
}

impl PageIo for FileIo {
    fn write(&mut self, seg: u64, off: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.write_at(seg, off, buf);
        match &r {
            Ok(()) => self.dir.write_ok(),
            Err(e) => self.dir.write_failed(&self.label, e),
        }
        r
    }

    fn read(&mut self, seg: u64, off: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_at(seg, off, len)
    }

    fn remove(&mut self, seg: u64) {
        self.remove_seg(seg)
    }
}

impl FileIo {
    fn write_at(&mut self, seg: u64, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.write.as_ref().is_none_or(|(s, _)| *s != seg) {
            self.write = None;
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.path(seg))?;
            self.write = Some((seg, f));
        }
        let Some((_, f)) = self.write.as_ref() else {
            return Err(io::Error::other("no segment open"));
        };
        let r = f.write_all_at(buf, off);
        if r.is_err() {
            self.write = None;
        }
        r
    }

    fn read_at(&mut self, seg: u64, off: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.read.as_ref().is_none_or(|(s, _)| *s != seg) {
            self.read = None;
            self.read = Some((seg, File::open(self.path(seg))?));
        }
        let Some((_, f)) = self.read.as_ref() else {
            return Err(io::Error::other("no segment open"));
        };
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off)?;
        Ok(v)
    }

    fn remove_seg(&mut self, seg: u64) {
        if self.write.as_ref().is_some_and(|(s, _)| *s == seg) {
            self.write = None;
        }
        if self.read.as_ref().is_some_and(|(s, _)| *s == seg) {
            self.read = None;
        }
        let p = self.path(seg);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %p.display(), error = %e, "cannot remove a page file"),
        }
    }
}
