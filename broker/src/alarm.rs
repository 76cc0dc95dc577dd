//! Resource alarms: memory high watermark and disk free limit, as in RabbitMQ.
//!
//! - **Memory**: raised when the node's message memory ([`Memory::used`]) reaches its
//!   [`Memory::high_watermark`], cleared when it falls below. The monitor is woken the moment
//!   the counter crosses the watermark (and then publishes its reading, changed or not) and
//!   also polls it every second. A publishing connection does not wait for it: it compares
//!   the counter with the watermark itself on each publish and blocks at once.
//! - **Disk**: raised when free space on the file system of the data directory (statvfs, for
//!   the unprivileged user) falls below `disk-free-limit`, cleared when it is back at or above.
//!   Checked every 10 s when far from the limit and down to every 100 ms when close to it.
//!
//! Raising and clearing are logged (`alarm set resource=memory ...`, `alarm cleared ...`) and
//! published to every connection of the node through [`NodeAlarms::subscribe`]. Connections
//! then block publishers: see `connection/throttle.rs` and `connection/LIFECYCLE.md`.
//!
//! The state is per node ([`NodeAlarms`], in `crate::node::Node`), so brokers sharing a
//! process alarm on their own memory and data directory. [`configure`] (from `Broker::bind`)
//! takes the first readings synchronously, so a broker that starts with too little disk
//! refuses publishes from its very first connection; its [`Monitor`] keeps them current.
//!
//! For the management API: [`NodeAlarms::state`] returns a snapshot of both alarms and their
//! inputs; [`NodeAlarms::set_disk_free_limit`] and [`Memory::set_high_watermark`] change the
//! thresholds at run time (RabbitMQ's `set_disk_free_limit` / `set_vm_memory_high_watermark`).

use crate::config::{Config, DiskFreeLimit};
use crate::memory::{self, Memory};
use crate::paging::Paging;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Which alarms are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    pub memory: bool,
    pub disk: bool,
}

impl Alarms {
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason sent in connection.blocked (RabbitMQ's wording).
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// A snapshot of the alarms and what they are computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmState {
    /// Memory alarm set.
    pub memory: bool,
    /// Disk alarm set.
    pub disk: bool,
    /// Bytes held by messages.
    pub mem_used: u64,
    /// The memory high watermark, bytes (`u64::MAX` when unlimited).
    pub mem_limit: u64,
    /// Free bytes on the data directory's file system at the last check (None: not known).
    pub disk_free: Option<u64>,
    /// The disk free limit, bytes.
    pub disk_free_limit: u64,
}

/// One node's alarms: the state its connections watch, and the disk readings and limit the
/// [`Monitor`] keeps current. The memory side reads the node's [`Memory`] account.
#[derive(Debug)]
pub struct NodeAlarms {
    memory: &'static Memory,
    alarms: watch::Sender<Alarms>,
    /// Free bytes at the last check (`u64::MAX`: not known).
    disk_free: AtomicU64,
    disk_free_limit: AtomicU64,
    /// Wakes the monitor for an immediate disk check (limit changed at run time).
    recheck: Notify,
}

// === impl NodeAlarms ===

impl NodeAlarms {
    /// No alarm, no disk reading, no disk limit; memory from `memory`.
    pub fn new(memory: &'static Memory) -> Self {
        Self {
            memory,
            alarms: watch::Sender::new(Alarms::default()),
            disk_free: AtomicU64::new(u64::MAX),
            disk_free_limit: AtomicU64::new(0),
            recheck: Notify::new(),
        }
    }

    /// Current alarms and their inputs.
    pub fn state(&self) -> AlarmState {
        let a = *self.alarms.borrow();
        let free = self.disk_free.load(Ordering::Relaxed);
        AlarmState {
            memory: a.memory,
            disk: a.disk,
            mem_used: self.memory.used(),
            mem_limit: self.memory.high_watermark(),
            disk_free: (free != u64::MAX).then_some(free),
            disk_free_limit: self.disk_free_limit(),
        }
    }

    /// Current alarms.
    pub fn alarms(&self) -> Alarms {
        *self.alarms.borrow()
    }

    /// A receiver that sees every change of the alarms.
    pub fn subscribe(&self) -> watch::Receiver<Alarms> {
        self.alarms.subscribe()
    }

    /// The disk free limit in bytes.
    pub fn disk_free_limit(&self) -> u64 {
        self.disk_free_limit.load(Ordering::Relaxed)
    }

    /// Changes the disk free limit; the monitor re-checks at once.
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_free_limit.store(bytes, Ordering::Relaxed);
        self.recheck.notify_one();
    }
}

/// Resolves the disk free limit (after `Memory::configure`) and takes the first readings, so
/// alarms that hold at start are set before any client connects. The returned monitor keeps
/// them current once [`Monitor::run`] with the same `alarms` and `paging`.
pub fn configure(alarms: &NodeAlarms, paging: &Paging, cfg: &Config) -> Monitor {
    let limit = match cfg.disk_free_limit {
        DiskFreeLimit::Absolute(b) => b,
        DiskFreeLimit::MemRelative(f) => {
            let total = memory::total_memory().unwrap_or(memory::ASSUMED_TOTAL_MEMORY);
            (total as f64 * f).min(u64::MAX as f64) as u64
        }
    };
    alarms.disk_free_limit.store(limit, Ordering::Relaxed);
    info!(
        disk_free_limit = limit,
        data_dir = %cfg.data_dir.display(),
        "disk free limit"
    );
    let mut m = Monitor {
        data_dir: cfg.data_dir.clone(),
        logic: AlarmLogic::default(),
        disk_error_logged: false,
    };
    m.check_memory(alarms, paging, false);
    m.check_disk(alarms);
    m
}

/// Owns the checks; [`Monitor::run`] is the periodic task.
#[derive(Debug)]
pub struct Monitor {
    data_dir: PathBuf,
    logic: AlarmLogic,
    disk_error_logged: bool,
}

const MEMORY_POLL: Duration = Duration::from_secs(1);

impl Monitor {
    /// Checks the node's `alarms` (and keeps its `paging` state current) until `shutdown`;
    /// then clears the alarms it set (a stopped broker has none).
    pub async fn run(mut self, alarms: &NodeAlarms, paging: &Paging, shutdown: CancellationToken) {
        use tokio::time::Instant;
        // Absolute, so that frequent watermark crossings cannot postpone the disk check.
        let mut disk_at = Instant::now() + self.check_disk(alarms);
        loop {
            let wake = (Instant::now() + MEMORY_POLL).min(disk_at);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = alarms.memory.crossed() => self.check_memory(alarms, paging, true),
                _ = alarms.recheck.notified() => disk_at = Instant::now() + self.check_disk(alarms),
                _ = tokio::time::sleep_until(wake) => {
                    self.check_memory(alarms, paging, false);
                    if Instant::now() >= disk_at {
                        disk_at = Instant::now() + self.check_disk(alarms);
                    }
                }
            }
        }
        alarms.alarms.send_replace(Alarms::default());
    }

    /// `crossed`: woken because the counter crossed the watermark. The reading is then
    /// published even when the alarm did not change: a connection that saw the counter at the
    /// watermark blocked on its own before this check (see `connection/throttle.rs`) and
    /// learns from it whether the alarm holds.
    fn check_memory(&mut self, alarms: &NodeAlarms, paging: &Paging, crossed: bool) {
        // Also keeps the paging state (and its log lines) current when queues are idle.
        paging.pressure();
        let (used, limit) = (alarms.memory.used(), alarms.memory.high_watermark());
        let change = self.logic.memory(used, limit);
        match change {
            Some(Change::Set) => warn!(resource = %"memory", used, limit, "alarm set"),
            Some(Change::Cleared) => info!(resource = %"memory", used, limit, "alarm cleared"),
            None => {}
        }
        if change.is_some() || crossed {
            self.publish(alarms);
        }
    }

    /// Returns when to check the disk next.
    fn check_disk(&mut self, alarms: &NodeAlarms) -> Duration {
        let limit = alarms.disk_free_limit();
        let free = match free_bytes(&self.data_dir) {
            Ok(f) => {
                self.disk_error_logged = false;
                f
            }
            Err(e) => {
                if !self.disk_error_logged {
                    warn!(error = %e, data_dir = %self.data_dir.display(), "cannot read free disk space");
                    self.disk_error_logged = true;
                }
                alarms.disk_free.store(u64::MAX, Ordering::Relaxed);
                return Duration::from_secs(10);
            }
        };
        alarms.disk_free.store(free, Ordering::Relaxed);
        if let Some(change) = self.logic.disk(free, limit) {
            match change {
                Change::Set => warn!(resource = %"disk", free, limit, "alarm set"),
                Change::Cleared => info!(resource = %"disk", free, limit, "alarm cleared"),
            }
            self.publish(alarms);
        }
        disk_check_interval(free, limit)
    }

    fn publish(&self, alarms: &NodeAlarms) {
        alarms.alarms.send_replace(self.logic.alarms);
    }
}

/// Free bytes for unprivileged users on the file system holding `dir` (or its nearest
/// existing ancestor: the data directory may not exist yet).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let existing = dir
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."));
    let st = nix::sys::statvfs::statvfs(existing).map_err(std::io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Next disk check: the time the gap to the limit takes to close at a fast disk's write rate
/// (250 MB/s), between 100 ms and 10 s.
pub fn disk_check_interval(free: u64, limit: u64) -> Duration {
    const RATE: u64 = 250_000_000;
    let gap = free.abs_diff(limit);
    Duration::from_millis((gap.saturating_mul(1000) / RATE).clamp(100, 10_000))
}

/// A transition of one alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Set,
    Cleared,
}

/// The pure part: thresholds to transitions.
#[derive(Debug, Default)]
pub struct AlarmLogic {
    pub alarms: Alarms,
}

impl AlarmLogic {
    /// Memory alarm while `used >= limit` (a watermark of 0 blocks every publish, as in
    /// RabbitMQ).
    pub fn memory(&mut self, used: u64, limit: u64) -> Option<Change> {
        Self::update(&mut self.alarms.memory, used >= limit)
    }

    /// Disk alarm while `free < limit`.
    pub fn disk(&mut self, free: u64, limit: u64) -> Option<Change> {
        Self::update(&mut self.alarms.disk, free < limit)
    }

    fn update(flag: &mut bool, now: bool) -> Option<Change> {
        if *flag == now {
            return None;
        }
        *flag = now;
        Some(if now { Change::Set } else { Change::Cleared })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_alarm_follows_the_watermark() {
        let mut l = AlarmLogic::default();
        assert_eq!(l.memory(99, 100), None);
        assert_eq!(l.memory(100, 100), Some(Change::Set));
        assert_eq!(l.memory(150, 100), None);
        assert!(l.alarms.memory && l.alarms.any());
        assert_eq!(l.alarms.reason(), "low on memory");
        assert_eq!(l.memory(99, 100), Some(Change::Cleared));
        assert!(!l.alarms.any());
        assert_eq!(l.memory(0, u64::MAX), None, "unlimited never alarms");
        assert_eq!(
            l.memory(0, 0),
            Some(Change::Set),
            "watermark 0 blocks publishing"
        );
    }

    #[test]
    fn disk_alarm_follows_the_limit() {
        let mut l = AlarmLogic::default();
        assert_eq!(l.disk(100, 100), None);
        assert_eq!(l.disk(99, 100), Some(Change::Set));
        assert_eq!(l.alarms.reason(), "low on disk");
        l.memory(1, 1);
        assert_eq!(l.alarms.reason(), "low on memory & disk");
        assert_eq!(l.disk(100, 100), Some(Change::Cleared));
        assert_eq!(l.disk(0, 0), None, "limit 0 never alarms");
    }

    #[test]
    fn disk_checks_speed_up_near_the_limit() {
        assert_eq!(
            disk_check_interval(100 << 30, 50_000_000),
            Duration::from_secs(10)
        );
        assert_eq!(
            disk_check_interval(1_050_000_000, 50_000_000),
            Duration::from_secs(4)
        );
        assert_eq!(
            disk_check_interval(50_000_001, 50_000_000),
            Duration::from_millis(100)
        );
        assert_eq!(
            disk_check_interval(0, 1_000_000_000),
            Duration::from_secs(4),
            "in alarm: as fast as free space could come back"
        );
    }

    #[test]
    fn free_bytes_of_a_missing_dir_uses_its_parent() {
        let base = std::env::temp_dir();
        let missing = base.join("warren-alarm-test-missing/a/b");
        let f = free_bytes(&missing).expect("statvfs");
        assert!(f > 0);
        assert!(free_bytes(Path::new("relative/missing")).is_ok());
    }
}
