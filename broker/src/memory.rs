//! One node's accounting of message memory.
//!
//! Every [`crate::queue::Message`] charges its body and header sizes to its node's [`Memory`]
//! account when it is built and releases them when its last reference goes, so
//! [`Memory::used`] is the memory held by messages anywhere in the node (queues, unacked
//! deliveries, connection buffers). The memory alarm and queue paging read it; RSS is not used
//! because the allocator keeps freed pages, which would hold an alarm long after the messages
//! are gone (and it is one figure for the whole process, whatever the brokers in it).
//!
//! The account also holds the node's memory limits, set by [`Memory::configure`] at
//! `Broker::bind` (and by [`Memory::set_high_watermark`] at run time):
//! - [`Memory::high_watermark`]: at or above it the memory alarm is raised (see `crate::alarm`);
//! - [`Memory::paging_threshold`]: `high_watermark * vm-memory-high-watermark-paging-ratio`;
//!   above it queues page transient messages out of memory.
//!
//! Both are `u64::MAX` (unlimited) until configured. Each node (`crate::node::Node`) has its
//! own account, so several brokers in one process (tests, clustering tests) keep separate books.
//! An account is `&'static` ([`Memory::leaked`]): a message holds a plain reference to it,
//! with no reference count to bump per message, and messages may outlive every owner we could
//! name (a delivery in a connection's buffer, a recovered message, a dead-lettered copy).

use crate::config::{Config, MemoryWatermark};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// One node's message memory: bytes in use and the limits.
#[derive(Debug)]
pub struct Memory {
    used: AtomicU64,
    high_watermark: AtomicU64,
    paging_threshold: AtomicU64,
    /// Signalled when [`Memory::used`] crosses [`Memory::high_watermark`] in either direction,
    /// so the alarm reacts at once instead of at its next poll (a fast publisher can add a lot
    /// in a poll interval). `notify_one` keeps a permit, so a crossing is never lost.
    crossed: Notify,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Memory ===

impl Memory {
    /// An empty account without limits.
    pub const fn new() -> Self {
        Self {
            used: AtomicU64::new(0),
            high_watermark: AtomicU64::new(u64::MAX),
            paging_threshold: AtomicU64::new(u64::MAX),
            crossed: Notify::const_new(),
        }
    }

    /// A new account that lives as long as the process. Leaked on purpose: messages hold
    /// `&'static Memory` (no reference count per message on the publish path) and outlive any
    /// owner we could name; it is one small struct per broker, so a test process that starts
    /// many brokers loses a few hundred bytes.
    pub fn leaked() -> &'static Self {
        Box::leak(Box::new(Self::new()))
    }

    /// Bytes at or above which the memory alarm is raised (`u64::MAX`: unlimited).
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark.load(Ordering::Relaxed)
    }

    /// Bytes above which queues page transient messages to disk (`u64::MAX`: unlimited).
    pub fn paging_threshold(&self) -> u64 {
        self.paging_threshold.load(Ordering::Relaxed)
    }

    /// Sets the watermark and derives the paging threshold from it (`ratio` > 1 means queues
    /// never page before the alarm).
    pub fn set_high_watermark(&self, bytes: u64, paging_ratio: f64) {
        self.high_watermark.store(bytes, Ordering::Relaxed);
        let paging = if bytes == u64::MAX {
            u64::MAX
        } else {
            let p = bytes as f64 * paging_ratio;
            if p >= u64::MAX as f64 {
                u64::MAX
            } else {
                p as u64
            }
        };
        self.paging_threshold.store(paging, Ordering::Relaxed);
        self.crossed.notify_one();
    }

    /// Waits until [`Memory::used`] crossed the watermark or the watermark changed.
    pub async fn crossed(&self) {
        self.crossed.notified().await;
    }

    /// Resolves the watermark against the machine's total memory and installs it.
    pub fn configure(&self, cfg: &Config) -> Limits {
        let total = total_memory();
        let hw = resolve_watermark(cfg.vm_memory_high_watermark, total);
        self.set_high_watermark(hw, cfg.vm_memory_high_watermark_paging_ratio);
        if total.is_none() && matches!(cfg.vm_memory_high_watermark, MemoryWatermark::Relative(_)) {
            tracing::warn!(
                assumed = ASSUMED_TOTAL_MEMORY,
                "cannot read total memory; relative vm-memory-high-watermark uses the assumed total"
            );
        }
        Limits {
            total_memory: total,
            high_watermark: hw,
            paging_threshold: self.paging_threshold(),
        }
    }

    /// Bytes currently held by messages.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Message memory is at or above the watermark: the memory alarm's condition (see
    /// `crate::alarm::AlarmLogic::memory`), read where a publisher is about to be blocked.
    pub fn at_watermark(&self) -> bool {
        self.used() >= self.high_watermark()
    }

    /// Records `bytes` as allocated.
    pub fn charge(&self, bytes: u64) {
        let old = self.used.fetch_add(bytes, Ordering::Relaxed);
        let hw = self.high_watermark();
        if old < hw && old.saturating_add(bytes) >= hw {
            self.crossed.notify_one();
        }
    }

    /// Records `bytes` as freed.
    pub fn release(&self, bytes: u64) {
        // Never wraps: every release follows a charge of the same size.
        let old = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(bytes))
            })
            .unwrap_or(0);
        let hw = self.high_watermark();
        if old >= hw && old.saturating_sub(bytes) < hw {
            self.crossed.notify_one();
        }
    }
}

/// The account of unit tests that build messages outside any node and do not look at it.
#[cfg(test)]
pub(crate) static UNIT_TESTS: Memory = Memory::new();

/// Limits as resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total_memory: Option<u64>,
    pub high_watermark: u64,
    pub paging_threshold: u64,
}

/// RabbitMQ's assumption when total memory cannot be read.
pub const ASSUMED_TOTAL_MEMORY: u64 = 1 << 30;

/// The watermark in bytes.
pub fn resolve_watermark(w: MemoryWatermark, total: Option<u64>) -> u64 {
    match w {
        MemoryWatermark::Absolute(b) => b,
        MemoryWatermark::Relative(f) => {
            (total.unwrap_or(ASSUMED_TOTAL_MEMORY) as f64 * f).min(u64::MAX as f64) as u64
        }
    }
}

/// Total memory available to this process: physical memory, or the cgroup limit when lower.
pub fn total_memory() -> Option<u64> {
    let phys = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo_total(&t));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|t| parse_cgroup_limit(&t));
    match (phys, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// `MemTotal:       16318268 kB` -> bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// cgroup v2 `memory.max` ("max" = none) or v1 `memory.limit_in_bytes` (a huge number = none).
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let n: u64 = t.parse().ok()?;
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX.
    (n < (1u64 << 60)).then_some(n)
}

#[cfg(test)]
mod tests {
    use crate::queue::Message;
    use amq_protocol::protocol::basic::AMQPProperties;
    use bytes::Bytes;

    #[test]
    fn a_message_is_charged_to_its_account_while_alive_and_released_when_dropped() {
        let (mine, other) = (super::Memory::leaked(), super::Memory::leaked());
        let msg = Message::new(
            mine,
            "".into(),
            "k".into(),
            AMQPProperties::default(),
            Bytes::from(vec![0u8; 10_000]),
        )
        .expect("valid message");
        assert!(mine.used() >= 10_000, "body not charged");
        assert_eq!(other.used(), 0, "charged to another account");
        drop(msg);
        assert_eq!(mine.used(), 0, "not released on drop");
    }

    #[test]
    fn total_memory_sources_parse() {
        let meminfo = "MemTotal:       16318268 kB\nMemFree:         1000 kB\n";
        assert_eq!(super::parse_meminfo_total(meminfo), Some(16318268 * 1024));
        assert_eq!(super::parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(super::parse_cgroup_limit("max\n"), None);
        assert_eq!(super::parse_cgroup_limit("536870912\n"), Some(512 << 20));
        assert_eq!(super::parse_cgroup_limit("9223372036854771712\n"), None);
        assert!(super::total_memory().is_some_and(|t| t > 0));
    }

    #[test]
    fn watermark_and_paging_threshold() {
        use crate::config::MemoryWatermark;
        assert_eq!(
            super::resolve_watermark(MemoryWatermark::Relative(0.5), Some(1000)),
            500
        );
        assert_eq!(
            super::resolve_watermark(MemoryWatermark::Absolute(77), Some(1000)),
            77
        );
        assert_eq!(
            super::resolve_watermark(MemoryWatermark::Relative(0.5), None),
            super::ASSUMED_TOTAL_MEMORY / 2
        );
        let m = super::Memory::new();
        assert_eq!(m.high_watermark(), u64::MAX, "unlimited until configured");
        m.set_high_watermark(1000, 0.5);
        assert_eq!(m.high_watermark(), 1000);
        assert_eq!(m.paging_threshold(), 500);
        m.set_high_watermark(1000, 2.0);
        assert_eq!(m.paging_threshold(), 2000);
        m.set_high_watermark(u64::MAX, 0.5);
        assert_eq!(m.paging_threshold(), u64::MAX);
    }
}
