//! Node-wide accounting of message memory.
//!
//! Every [`crate::queue::Message`] charges its body and header sizes here when it is built and
//! releases them when its last reference goes, so [`used`] is the memory held by messages
//! anywhere in the broker (queues, unacked deliveries, connection buffers). The memory alarm and
//! queue paging read it; RSS is not used because the allocator keeps freed pages, which would
//! hold an alarm long after the messages are gone.

use std::sync::atomic::{AtomicU64, Ordering};

static USED: AtomicU64 = AtomicU64::new(0);

/// Bytes currently held by messages.
pub fn used() -> u64 {
    USED.load(Ordering::Relaxed)
}

/// Records `bytes` as allocated.
pub fn charge(bytes: u64) {
    USED.fetch_add(bytes, Ordering::Relaxed);
}

/// Records `bytes` as freed.
pub fn release(bytes: u64) {
    // Never wraps: every release follows a charge of the same size.
    let _ = USED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(bytes))
    });
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
}
