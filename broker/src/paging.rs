//! Queue paging, node-wide parts: the page directory, the memory-pressure state and the page
//! file I/O. The per-queue logic is in `crate::queue::ready`.
//!
//! - [`configure`] (from `Broker::bind`) wipes `<data-dir>/paging/` (paged messages are not
//!   recovered after a restart, as in RabbitMQ; persistent messages of durable queues come back
//!   from the message store) and makes it the directory of every queue created afterwards.
//! - [`pressure`]: paging is on once [`memory::used`] exceeds [`memory::paging_threshold`] and
//!   off again once it is below 90 % of it. Queue actors check it after each batch of commands
//!   and are woken through [`subscribe`] when it turns on; the alarm monitor also checks it
//!   every second, so the state (logged at info when it changes) follows memory use.
//! - [`FileIo`]: one queue's segments, `<queue serial>-<segment>.page`, written with pwrite and
//!   read with pread on the queue's own task, never synced.
//! - A failed page write is logged once per episode ([`write_failed`] / [`write_ok`]).

use crate::memory;
use crate::queue::ready::{PageIo, Pager, PagerLimits};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use tokio::sync::watch;
use tracing::{info, warn};

/// Directory under the data directory holding the page files.
pub const DIR_NAME: &str = "paging";

#[derive(Debug)]
struct PageDir {
    dir: PathBuf,
    limits: PagerLimits,
    next_queue: AtomicU64,
}

static DIR: RwLock<Option<Arc<PageDir>>> = RwLock::new(None);
static ACTIVE: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::Sender::new(false));
/// Number of times paging turned on. Queues watch this rather than [`ACTIVE`]: paging can turn
/// on and off again before an idle queue's task runs, and a watch keeps only the last value.
static STARTS: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));
static WRITE_FAILING: AtomicBool = AtomicBool::new(false);
/// A paging episode is under way (logged at its start and end).
static EPISODE: AtomicBool = AtomicBool::new(false);
static LAST_ON_MS: AtomicU64 = AtomicU64::new(0);

/// Wipes and creates `<data_dir>/paging/` and makes it the page directory of queues created
/// from now on. Problems are logged: queues then keep their messages in memory.
pub fn configure(data_dir: &Path) {
    configure_with(data_dir, PagerLimits::default());
}

/// [`configure`] with given pager sizes.
pub fn configure_with(data_dir: &Path, limits: PagerLimits) {
    let dir = data_dir.join(DIR_NAME);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => info!(dir = %dir.display(), "page files of the previous run removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot remove old page files"),
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        warn!(dir = %dir.display(), error = %e, "cannot create the page directory; queues will keep messages in memory");
    }
    let d = Arc::new(PageDir {
        dir,
        limits,
        next_queue: AtomicU64::new(1),
    });
    *DIR.write().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// A pager for a new queue (None before [`configure`]: the queue never pages).
pub fn pager(label: Arc<str>) -> Option<Pager> {
    let d = DIR.read().unwrap_or_else(|e| e.into_inner()).clone()?;
    let n = d.next_queue.fetch_add(1, Ordering::Relaxed);
    let io = FileIo {
        dir: d.dir.clone(),
        queue: n,
        label: label.clone(),
        write: None,
        read: None,
    };
    Some(Pager::new(Box::new(io), label, d.limits))
}

/// Whether queues should page out now. Also logs paging episodes: the start when memory first
/// exceeds the threshold, the end once it has stayed below for [`EPISODE_END`] (paging brings
/// memory down quickly, so a steady publisher turns it on and off many times a second).
pub fn pressure() -> bool {
    let used = memory::used();
    let threshold = memory::paging_threshold();
    let on = *ACTIVE.borrow();
    let want = if on {
        used > threshold - threshold / 10
    } else {
        used > threshold
    };
    if want != on {
        let changed = ACTIVE.send_if_modified(|v| {
            let changed = *v != want;
            *v = want;
            changed
        });
        if changed && want {
            STARTS.send_modify(|n| *n += 1);
        }
    }
    let now = now_ms();
    if want {
        LAST_ON_MS.store(now, Ordering::Relaxed);
        if !EPISODE.load(Ordering::Relaxed) && !EPISODE.swap(true, Ordering::Relaxed) {
            info!(
                used,
                threshold, "memory above the paging threshold: queues page messages to disk"
            );
        }
    } else if EPISODE.load(Ordering::Relaxed)
        && now.saturating_sub(LAST_ON_MS.load(Ordering::Relaxed)) >= EPISODE_END.as_millis() as u64
        && EPISODE.swap(false, Ordering::Relaxed)
    {
        info!(
            used,
            threshold, "memory below the paging threshold for a while: queues stopped paging"
        );
    }
    want
}

/// How long memory stays below the paging threshold before the end of paging is logged.
pub const EPISODE_END: std::time::Duration = std::time::Duration::from_secs(5);

fn now_ms() -> u64 {
    static START: LazyLock<tokio::time::Instant> = LazyLock::new(tokio::time::Instant::now);
    START.elapsed().as_millis() as u64
}

/// Changes each time paging turns on (however briefly).
pub fn subscribe() -> watch::Receiver<u64> {
    STARTS.subscribe()
}

/// A page write failed: warn once per episode (the messages stay in memory).
fn write_failed(queue: &str, e: &io::Error) {
    if !WRITE_FAILING.swap(true, Ordering::Relaxed) {
        warn!(queue = %queue, error = %e, "cannot write page files; messages stay in memory (the memory alarm remains the limit)");
    }
}

/// A page write succeeded: ends a failure episode.
fn write_ok() {
    if WRITE_FAILING.load(Ordering::Relaxed) && WRITE_FAILING.swap(false, Ordering::Relaxed) {
        info!("page files can be written again");
    }
}

/// One queue's segment files.
#[derive(Debug)]
pub struct FileIo {
    dir: PathBuf,
    queue: u64,
    /// The queue, for the log line of a failure episode.
    label: Arc<str>,
    write: Option<(u64, File)>,
    read: Option<(u64, File)>,
}

impl FileIo {
    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{:016x}-{seg:08x}.page", self.queue))
    }
}

impl PageIo for FileIo {
    fn write(&mut self, seg: u64, off: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.write_at(seg, off, buf);
        match &r {
            Ok(()) => write_ok(),
            Err(e) => write_failed(&self.label, e),
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
