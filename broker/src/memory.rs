//! Node-wide accounting of message memory.
//!
//! Every [`crate::queue::Message`] charges its body and header sizes here when it is built and
//! releases them when its last reference goes, so [`used`] is the memory held by messages
//! anywhere in the broker (queues, unacked deliveries, connection buffers). The memory alarm and
//! queue paging read it; RSS is not used because the allocator keeps freed pages, which would
//! hold an alarm long after the messages are gone.
//!
//! It also holds the node's memory limits, set once by [`configure`] at `Broker::bind` (and by
//! [`set_high_watermark`] at run time):
//! - [`high_watermark`]: at or above it the memory alarm is raised (see `crate::alarm`);
//! - [`paging_threshold`]: `high_watermark * vm-memory-high-watermark-paging-ratio`; above it
//!   queues page transient messages out of memory.
//!
//! Both are `u64::MAX` (unlimited) until configured. The limits and the counter are
//! process-wide: one broker per process, as one RabbitMQ node per VM.

use crate::config::{Config, MemoryWatermark};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

static USED: AtomicU64 = AtomicU64::new(0);
static HIGH_WATERMARK: AtomicU64 = AtomicU64::new(u64::MAX);
static PAGING_THRESHOLD: AtomicU64 = AtomicU64::new(u64::MAX);
/// Signalled when [`used`] crosses [`high_watermark`] in either direction, so the alarm
/// reacts at once instead of at its next poll (a fast publisher can add a lot in a poll
/// interval). `notify_one` keeps a permit, so a crossing is never lost.
static CROSSED: Notify = Notify::const_new();

/// Bytes at or above which the memory alarm is raised (`u64::MAX`: unlimited).
pub fn high_watermark() -> u64 {
    HIGH_WATERMARK.load(Ordering::Relaxed)
}

/// Bytes above which queues page transient messages to disk (`u64::MAX`: unlimited).
pub fn paging_threshold() -> u64 {
    PAGING_THRESHOLD.load(Ordering::Relaxed)
}

/// Sets the watermark and derives the paging threshold from it (`ratio` > 1 means queues
/// never page before the alarm).
pub fn set_high_watermark(bytes: u64, paging_ratio: f64) {
    HIGH_WATERMARK.store(bytes, Ordering::Relaxed);
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
    PAGING_THRESHOLD.store(paging, Ordering::Relaxed);
    CROSSED.notify_one();
}

/// Waits until [`used`] crossed the watermark or the watermark changed.
pub async fn crossed() {
    CROSSED.notified().await;
}

/// Limits as resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total_memory: Option<u64>,
    pub high_watermark: u64,
    pub paging_threshold: u64,
}

/// RabbitMQ's assumption when total memory cannot be read.
pub const ASSUMED_TOTAL_MEMORY: u64 = 1 << 30;

/// Resolves the watermark against the node's total memory and installs it.
pub fn configure(cfg: &Config) -> Limits {
    let total = total_memory();
    let hw = resolve_watermark(cfg.vm_memory_high_watermark, total);
    set_high_watermark(hw, cfg.vm_memory_high_watermark_paging_ratio);
    if total.is_none() && matches!(cfg.vm_memory_high_watermark, MemoryWatermark::Relative(_)) {
        tracing::warn!(
            assumed = ASSUMED_TOTAL_MEMORY,
            "cannot read total memory; relative vm-memory-high-watermark uses the assumed total"
        );
    }
    Limits {
        total_memory: total,
        high_watermark: hw,
        paging_threshold: paging_threshold(),
    }
}

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

/// Bytes currently held by messages.
pub fn used() -> u64 {
    USED.load(Ordering::Relaxed)
}

/// Records `bytes` as allocated.
pub fn charge(bytes: u64) {
    let old = USED.fetch_add(bytes, Ordering::Relaxed);
    let hw = high_watermark();
    if old < hw && old.saturating_add(bytes) >= hw {
        CROSSED.notify_one();
    }
}

/// Records `bytes` as freed.
pub fn release(bytes: u64) {
    // Never wraps: every release follows a charge of the same size.
    let old = USED
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(bytes))
        })
        .unwrap_or(0);
    let hw = high_watermark();
    if old >= hw && old.saturating_sub(bytes) < hw {
        CROSSED.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use crate::queue::Message;
    use amq_protocol::protocol::basic::AMQPProperties;
    use bytes::Bytes;

    // nextest runs each test in its own process, so nothing else charges meanwhile.
    #[test]
    fn a_message_is_charged_while_alive_and_released_when_dropped() {
        let before = super::used();
        let msg = Message::new(
            "".into(),
            "k".into(),
            AMQPProperties::default(),
            Bytes::from(vec![0u8; 10_000]),
        )
        .expect("valid message");
        assert!(super::used() >= before + 10_000, "body not charged");
        drop(msg);
        assert_eq!(super::used(), before, "not released on drop");
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
        super::set_high_watermark(1000, 0.5);
        assert_eq!(super::high_watermark(), 1000);
        assert_eq!(super::paging_threshold(), 500);
        super::set_high_watermark(1000, 2.0);
        assert_eq!(super::paging_threshold(), 2000);
        super::set_high_watermark(u64::MAX, 0.5);
        assert_eq!(super::paging_threshold(), u64::MAX);
    }
}
