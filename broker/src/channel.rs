//! Per-channel state: delivery tags and unacked deliveries, consumers, prefetch, publisher
//! confirms and the transaction buffer. Pure bookkeeping; sending to queues happens in
//! `class/` and `connection/`.
//!
//! Credit stays here as values: a consumer's queue learns its prefetch (capped by the
//! channel's global prefetch) at basic.consume and channel.flow as a command. The global
//! (channel-wide) prefetch of basic.qos global=true is enforced here: deliveries beyond it
//! wait in [`Channel::held`] until acks make room.

pub use crate::queue::Settle;
use crate::queue::{Delivery, QueueHandle};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// A delivery the client still has to settle.
#[derive(Debug, Clone)]
pub struct UnackedDelivery {
    pub tag: u64,
    pub queue: QueueHandle,
    pub msg_id: u64,
    /// Counted against the channel-wide (global) prefetch.
    pub counted: bool,
}

/// A consumer as the channel knows it.
#[derive(Debug, Clone)]
pub struct ChannelConsumer {
    /// None for direct reply-to.
    pub queue: Option<QueueHandle>,
    pub no_ack: bool,
    /// Its own prefetch (basic.qos global=false when it was created).
    pub prefetch: u16,
}

/// Publisher confirm bookkeeping.
#[derive(Debug, Default)]
pub struct Confirms {
    pub next_seq: u64,
    /// seq -> (queues still to report, nacked by one of them).
    pub pending: BTreeMap<u64, (u32, bool)>,
    pub done_acks: Vec<u64>,
    pub done_nacks: Vec<u64>,
}

impl Confirms {
    pub fn new() -> Self {
        Self {
            next_seq: 1,
            ..Default::default()
        }
    }

    /// Takes the next publish sequence number.
    pub fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// One queue reported on `seq`.
    pub fn report(&mut self, seq: u64, ok: bool) {
        let done = match self.pending.get_mut(&seq) {
            Some((remaining, nacked)) => {
                *remaining = remaining.saturating_sub(1);
                *nacked |= !ok;
                (*remaining == 0).then_some(*nacked)
            }
            None => None,
        };
        if let Some(nacked) = done {
            self.pending.remove(&seq);
            if nacked {
                self.done_nacks.push(seq);
            } else {
                self.done_acks.push(seq);
            }
        }
    }

    /// Frames to send: (seq, multiple, ack). Nacks first and never multiple; a multiple ack
    /// only covers numbers below every still-pending one, so it never covers an unconfirmed or
    /// nacked number.
    pub fn drain(&mut self) -> Vec<(u64, bool, bool)> {
        let mut out = Vec::new();
        self.done_nacks.sort_unstable();
        let first_nack = self.done_nacks.first().copied();
        for s in self.done_nacks.drain(..) {
            out.push((s, false, false));
        }
        if self.done_acks.is_empty() {
            return out;
        }
        self.done_acks.sort_unstable();
        let floor = self
            .pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_seq)
            .min(first_nack.unwrap_or(u64::MAX));
        let split = self.done_acks.partition_point(|&s| s < floor);
        let (low, high) = self.done_acks.split_at(split);
        match low.len() {
            0 => {}
            1 => out.push((low[0], false, true)),
            _ => out.push((low[low.len() - 1], true, true)),
        }
        for &s in high {
            out.push((s, false, true));
        }
        self.done_acks.clear();
        out
    }
}

/// A publish held by a transaction.
#[derive(Debug)]
pub struct HeldPublish {
    pub exchange: String,
    pub routing_key: String,
    pub mandatory: bool,
    /// Content header payload (class, weight, body size, properties), as received.
    pub header: Vec<u8>,
    pub body: Bytes,
}

/// An acknowledgement held by a transaction.
#[derive(Debug, Clone, Copy)]
pub enum HeldAck {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

/// Transaction buffer.
#[derive(Debug, Default)]
pub struct Tx {
    pub publishes: Vec<HeldPublish>,
    pub acks: Vec<HeldAck>,
}

/// One open channel.
#[derive(Debug)]
pub struct Channel {
    pub id: u16,
    /// Distinguishes reuses of the same channel number; events carry it.
    pub generation: u64,
    /// channel.flow: false pauses deliveries.
    pub flow_active: bool,
    /// basic.qos global=true: most unacked deliveries across the channel's consumers
    /// (0 = unlimited).
    pub global_prefetch: u16,
    /// Unacked consumer deliveries (what the global prefetch counts).
    pub counted_unacked: u32,
    /// Deliveries that arrived while the global prefetch was used up, in arrival order.
    pub held: VecDeque<Delivery>,
    pub next_tag: u64,
    pub unacked: VecDeque<UnackedDelivery>,
    pub consumers: HashMap<Arc<str>, ChannelConsumer>,
    /// basic.qos global=false: prefetch for consumers created from now on.
    pub prefetch: u16,
    pub confirms: Option<Confirms>,
    pub tx: Option<Tx>,
    /// Direct reply-to token when a reply consumer exists.
    pub reply_to: Option<String>,
    /// Last queue declared on this channel (queue name "" means this one).
    pub last_queue: Option<String>,
    /// A message was published on this channel: a publisher, in RabbitMQ's metrics.
    pub publishing: bool,
    /// Message counters (the management API's channel `message_stats`).
    pub stats: Arc<crate::stats::ChannelStats>,
}

impl Channel {
    pub fn new(id: u16, generation: u64, stats: Arc<crate::stats::ChannelStats>) -> Self {
        Self {
            id,
            generation,
            flow_active: true,
            global_prefetch: 0,
            counted_unacked: 0,
            held: VecDeque::new(),
            next_tag: 1,
            unacked: VecDeque::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            confirms: None,
            tx: None,
            reply_to: None,
            last_queue: None,
            publishing: false,
            stats,
        }
    }

    /// Assigns the next delivery tag.
    pub fn take_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// Removes the deliveries `tag` (or up to `tag` with `multiple`; tag 0 + multiple = all).
    /// Returns None if the tag is unknown.
    pub fn take_unacked(&mut self, tag: u64, multiple: bool) -> Option<Vec<UnackedDelivery>> {
        if multiple {
            if tag == 0 {
                return Some(self.unacked.drain(..).collect());
            }
            let n = self.unacked.partition_point(|u| u.tag <= tag);
            if n == 0 {
                return None;
            }
            Some(self.unacked.drain(..n).collect())
        } else {
            let i = self.unacked.binary_search_by_key(&tag, |u| u.tag).ok()?;
            self.unacked.remove(i).map(|u| vec![u])
        }
    }

    /// The prefetch a new consumer gets from its queue: its own (global=false), capped by the
    /// channel's global one (0 = unlimited).
    pub fn consumer_prefetch(&self) -> u16 {
        capped_prefetch(self.prefetch, self.global_prefetch)
    }

    /// Whether a consumer delivery may go to the client now (the global prefetch has room).
    pub fn global_room(&self) -> bool {
        self.global_prefetch == 0 || self.counted_unacked < u32::from(self.global_prefetch)
    }

    /// Queues this channel consumes from.
    pub fn consumer_queues(&self) -> Vec<QueueHandle> {
        let mut v: Vec<QueueHandle> = Vec::new();
        for c in self.consumers.values() {
            if let Some(q) = &c.queue {
                if !v.iter().any(|x| Arc::ptr_eq(x, q)) {
                    v.push(q.clone());
                }
            }
        }
        v
    }
}

/// A consumer's own prefetch capped by its channel's global one (0 = unlimited).
pub fn capped_prefetch(own: u16, global: u16) -> u16 {
    match (own, global) {
        (0, g) => g,
        (p, 0) => p,
        (p, g) => p.min(g),
    }
}

/// Groups deliveries by queue, keeping message ids in tag order.
pub fn group_by_queue(items: Vec<UnackedDelivery>) -> Vec<(QueueHandle, Vec<u64>, u32)> {
    let mut out: Vec<(QueueHandle, Vec<u64>, u32)> = Vec::new();
    for u in items {
        let counted = u32::from(u.counted);
        match out.iter_mut().find(|(q, _, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, ids, c)) => {
                ids.push(u.msg_id);
                *c += counted;
            }
            None => out.push((u.queue, vec![u.msg_id], counted)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_multiple_never_covers_pending_or_nacked() {
        let mut c = Confirms::new();
        for _ in 0..5 {
            let s = c.take_seq();
            c.pending.insert(s, (1, false));
        }
        c.report(1, true);
        c.report(2, true);
        c.report(4, true);
        c.report(5, false);
        let out = c.drain();
        // nack 5 alone, multiple ack 2 (covers 1,2), single ack 4 (3 still pending)
        assert_eq!(
            out,
            vec![(5, false, false), (2, true, true), (4, false, true)]
        );
        c.report(3, true);
        assert_eq!(c.drain(), vec![(3, false, true)]);
    }
}
