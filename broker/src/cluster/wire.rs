//! The queue protocol between nodes: what a node sends to a queue's master on behalf of its own
//! clients ([`ToMaster`], on the cluster's app channel [`TO_MASTER`]) and what comes back
//! ([`FromMaster`], on [`FROM_MASTER`]). Pure: encoding and decoding of byte strings, every read bounds-checked, nothing
//! recursive; a malformed message decodes to `None` and is dropped by the caller.
//!
//! Layout: one tag byte, then the fields in order; integers big-endian; strings and byte
//! strings are a u32 length then the bytes; a message is exchange, routing key, the pre-encoded
//! content header payload and the body (as the store keeps it).

use bytes::{BufMut, Bytes, BytesMut};

/// The app channel of requests to a master.
pub const TO_MASTER: u8 = 1;
/// The app channel of what masters send back.
pub const FROM_MASTER: u8 = 2;

/// The longest string or byte string a message may carry (a body is bounded by the link's
/// frame limit anyway; this keeps a bad length from asking for more).
const MAX_FIELD: usize = 256 << 20;

/// A queue, by vhost and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueRef {
    pub vhost: String,
    pub name: String,
}

/// A message as it crosses: exchange, routing key, content header payload, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMsg {
    pub exchange: String,
    pub routing_key: String,
    pub header: Bytes,
    pub body: Bytes,
}

/// A consumer on the sending node: its connection there, channel, channel generation, tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteConsumer {
    pub conn: u64,
    pub channel: u16,
    pub generation: u64,
    pub tag: String,
}

/// Requests to a queue's master.
#[derive(Debug, Clone, PartialEq)]
pub enum ToMaster {
    /// Messages for the queue; a ticket asks for a confirm under that number.
    Publish {
        queue: QueueRef,
        items: Vec<(WireMsg, Option<u64>)>,
    },
    Consume {
        queue: QueueRef,
        req: u64,
        consumer: RemoteConsumer,
        no_ack: bool,
        exclusive: bool,
        prefetch: u16,
        priority: i64,
        flow_active: bool,
    },
    Cancel {
        queue: QueueRef,
        consumer: RemoteConsumer,
    },
    Flow {
        queue: QueueRef,
        conn: u64,
        channel: u16,
        generation: u64,
        active: bool,
    },
    Prefetch {
        queue: QueueRef,
        consumer: RemoteConsumer,
        prefetch: u16,
    },
    Get {
        queue: QueueRef,
        req: u64,
        no_ack: bool,
    },
    /// `how`: 0 ack, 1 requeue, 2 discard.
    Settle {
        queue: QueueRef,
        ids: Vec<u64>,
        how: u8,
    },
    Purge {
        queue: QueueRef,
        req: u64,
    },
    Delete {
        queue: QueueRef,
        req: u64,
        if_unused: bool,
        if_empty: bool,
    },
    Touch {
        queue: QueueRef,
    },
    Kick {
        queue: QueueRef,
    },
    /// The queue's counts (answered with [`Reply::Stat`]): `exact`, as the queue has them
    /// after every request sent before this one (a declare-ok's counts); otherwise the counts
    /// it last published (the proxies' periodic refresh, which must not queue up behind work).
    Stat {
        queue: QueueRef,
        req: u64,
        exact: bool,
    },
    /// `sync_queue` (or `cancel_sync_queue` with `cancel`), answered with [`Reply::Done`].
    Sync {
        queue: QueueRef,
        req: u64,
        cancel: bool,
    },
}

/// One delivery to a consumer on the receiving node.
#[derive(Debug, Clone, PartialEq)]
pub struct WireDelivery {
    pub channel: u16,
    pub generation: u64,
    pub tag: String,
    pub msg_id: u64,
    pub msg: WireMsg,
    pub redelivered: bool,
    pub no_ack: bool,
}

/// A reply to a request that waits for one.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Ok, or a channel error (code, text).
    Done(Result<u32, (u16, String)>),
    /// basic.get: (message id, message, redelivered, messages left), or empty.
    Got(Option<(u64, WireMsg, bool, u32)>),
    /// Ready messages and consumers (None: no such queue on the master).
    Stat(Option<(u32, u32)>),
}

/// What comes back from a master.
#[derive(Debug, Clone, PartialEq)]
pub enum FromMaster {
    Reply {
        req: u64,
        reply: Reply,
    },
    Confirm {
        ticket: u64,
        ok: bool,
    },
    /// Deliveries from one queue for consumers of one connection of the receiving node.
    Deliver {
        conn: u64,
        queue: QueueRef,
        deliveries: Vec<WireDelivery>,
    },
    /// A server-side basic.cancel (the queue was deleted).
    Cancelled {
        consumer: RemoteConsumer,
    },
}

// === encoding ===

pub(super) struct W(pub(super) BytesMut);

impl W {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    pub(super) fn bool(&mut self, v: bool) {
        self.0.put_u8(u8::from(v));
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.put_u16(v);
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.put_u32(v);
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.put_u64(v);
    }
    pub(super) fn i64(&mut self, v: i64) {
        self.0.put_i64(v);
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.0.put_u32(b.len() as u32);
        self.0.put_slice(b);
    }
    pub(super) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub(super) fn queue(&mut self, q: &QueueRef) {
        self.str(&q.vhost);
        self.str(&q.name);
    }
    pub(super) fn msg(&mut self, m: &WireMsg) {
        self.str(&m.exchange);
        self.str(&m.routing_key);
        self.bytes(&m.header);
        self.bytes(&m.body);
    }
    pub(super) fn consumer(&mut self, c: &RemoteConsumer) {
        self.u64(c.conn);
        self.u16(c.channel);
        self.u64(c.generation);
        self.str(&c.tag);
    }
}

impl ToMaster {
    pub fn encode(&self) -> Bytes {
        let mut w = W(BytesMut::with_capacity(64));
        match self {
            ToMaster::Publish { queue, items } => {
                w.u8(1);
                w.queue(queue);
                w.u32(items.len() as u32);
                for (m, t) in items {
                    w.msg(m);
                    w.u64(t.map_or(0, |t| t + 1));
                }
            }
            ToMaster::Consume {
                queue,
                req,
                consumer,
                no_ack,
                exclusive,
                prefetch,
                priority,
                flow_active,
            } => {
                w.u8(2);
                w.queue(queue);
                w.u64(*req);
                w.consumer(consumer);
                w.bool(*no_ack);
                w.bool(*exclusive);
                w.u16(*prefetch);
                w.i64(*priority);
                w.bool(*flow_active);
            }
            ToMaster::Cancel { queue, consumer } => {
                w.u8(3);
                w.queue(queue);
                w.consumer(consumer);
            }
            ToMaster::Flow {
                queue,
                conn,
                channel,
                generation,
                active,
            } => {
                w.u8(4);
                w.queue(queue);
                w.u64(*conn);
                w.u16(*channel);
                w.u64(*generation);
                w.bool(*active);
            }
            ToMaster::Prefetch {
                queue,
                consumer,
                prefetch,
            } => {
                w.u8(5);
                w.queue(queue);
                w.consumer(consumer);
                w.u16(*prefetch);
            }
            ToMaster::Get { queue, req, no_ack } => {
                w.u8(6);
                w.queue(queue);
                w.u64(*req);
                w.bool(*no_ack);
            }
            ToMaster::Settle { queue, ids, how } => {
                w.u8(7);
                w.queue(queue);
                w.u8(*how);
                w.u32(ids.len() as u32);
                for id in ids {
                    w.u64(*id);
                }
            }
            ToMaster::Purge { queue, req } => {
                w.u8(8);
                w.queue(queue);
                w.u64(*req);
            }
            ToMaster::Delete {
                queue,
                req,
                if_unused,
                if_empty,
            } => {
                w.u8(9);
                w.queue(queue);
                w.u64(*req);
                w.bool(*if_unused);
                w.bool(*if_empty);
            }
            ToMaster::Touch { queue } => {
                w.u8(10);
                w.queue(queue);
            }
            ToMaster::Kick { queue } => {
                w.u8(11);
                w.queue(queue);
            }
            ToMaster::Stat { queue, req, exact } => {
                w.u8(12);
                w.queue(queue);
                w.u64(*req);
                w.bool(*exact);
            }
            ToMaster::Sync { queue, req, cancel } => {
                w.u8(13);
                w.queue(queue);
                w.u64(*req);
                w.bool(*cancel);
            }
        }
        w.0.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = R(b);
        let m = match r.u8()? {
            1 => {
                let queue = r.queue()?;
                let n = r.count(8)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let m = r.msg()?;
                    let t = r.u64()?;
                    items.push((m, t.checked_sub(1)));
                }
                ToMaster::Publish { queue, items }
            }
            2 => ToMaster::Consume {
                queue: r.queue()?,
                req: r.u64()?,
                consumer: r.consumer()?,
                no_ack: r.bool()?,
                exclusive: r.bool()?,
                prefetch: r.u16()?,
                priority: r.i64()?,
                flow_active: r.bool()?,
            },
            3 => ToMaster::Cancel {
                queue: r.queue()?,
                consumer: r.consumer()?,
            },
            4 => ToMaster::Flow {
                queue: r.queue()?,
                conn: r.u64()?,
                channel: r.u16()?,
                generation: r.u64()?,
                active: r.bool()?,
            },
            5 => ToMaster::Prefetch {
                queue: r.queue()?,
                consumer: r.consumer()?,
                prefetch: r.u16()?,
            },
            6 => ToMaster::Get {
                queue: r.queue()?,
                req: r.u64()?,
                no_ack: r.bool()?,
            },
            7 => {
                let queue = r.queue()?;
                let how = r.u8()?;
                let n = r.count(8)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(r.u64()?);
                }
                ToMaster::Settle { queue, ids, how }
            }
            8 => ToMaster::Purge {
                queue: r.queue()?,
                req: r.u64()?,
            },
            9 => ToMaster::Delete {
                queue: r.queue()?,
                req: r.u64()?,
                if_unused: r.bool()?,
                if_empty: r.bool()?,
            },
            10 => ToMaster::Touch { queue: r.queue()? },
            11 => ToMaster::Kick { queue: r.queue()? },
            12 => ToMaster::Stat {
                queue: r.queue()?,
                req: r.u64()?,
                exact: r.bool()?,
            },
            13 => ToMaster::Sync {
                queue: r.queue()?,
                req: r.u64()?,
                cancel: r.bool()?,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(m)
    }
}

impl FromMaster {
    pub fn encode(&self) -> Bytes {
        let mut w = W(BytesMut::with_capacity(64));
        match self {
            FromMaster::Reply { req, reply } => {
                w.u8(1);
                w.u64(*req);
                match reply {
                    Reply::Done(Ok(n)) => {
                        w.u8(0);
                        w.u32(*n);
                    }
                    Reply::Done(Err((code, text))) => {
                        w.u8(1);
                        w.u16(*code);
                        w.str(text);
                    }
                    Reply::Got(None) => w.u8(2),
                    Reply::Stat(None) => w.u8(4),
                    Reply::Stat(Some((messages, consumers))) => {
                        w.u8(5);
                        w.u32(*messages);
                        w.u32(*consumers);
                    }
                    Reply::Got(Some((id, m, redelivered, left))) => {
                        w.u8(3);
                        w.u64(*id);
                        w.msg(m);
                        w.bool(*redelivered);
                        w.u32(*left);
                    }
                }
            }
            FromMaster::Confirm { ticket, ok } => {
                w.u8(2);
                w.u64(*ticket);
                w.bool(*ok);
            }
            FromMaster::Deliver {
                conn,
                queue,
                deliveries,
            } => {
                w.u8(3);
                w.u64(*conn);
                w.queue(queue);
                w.u32(deliveries.len() as u32);
                for d in deliveries {
                    w.u16(d.channel);
                    w.u64(d.generation);
                    w.str(&d.tag);
                    w.u64(d.msg_id);
                    w.msg(&d.msg);
                    w.bool(d.redelivered);
                    w.bool(d.no_ack);
                }
            }
            FromMaster::Cancelled { consumer } => {
                w.u8(4);
                w.consumer(consumer);
            }
        }
        w.0.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = R(b);
        let m = match r.u8()? {
            1 => {
                let req = r.u64()?;
                let reply = match r.u8()? {
                    0 => Reply::Done(Ok(r.u32()?)),
                    1 => Reply::Done(Err((r.u16()?, r.str()?))),
                    2 => Reply::Got(None),
                    3 => Reply::Got(Some((r.u64()?, r.msg()?, r.bool()?, r.u32()?))),
                    4 => Reply::Stat(None),
                    5 => Reply::Stat(Some((r.u32()?, r.u32()?))),
                    _ => return None,
                };
                FromMaster::Reply { req, reply }
            }
            2 => FromMaster::Confirm {
                ticket: r.u64()?,
                ok: r.bool()?,
            },
            3 => {
                let conn = r.u64()?;
                let queue = r.queue()?;
                let n = r.count(32)?;
                let mut deliveries = Vec::with_capacity(n);
                for _ in 0..n {
                    deliveries.push(WireDelivery {
                        channel: r.u16()?,
                        generation: r.u64()?,
                        tag: r.str()?,
                        msg_id: r.u64()?,
                        msg: r.msg()?,
                        redelivered: r.bool()?,
                        no_ack: r.bool()?,
                    });
                }
                FromMaster::Deliver {
                    conn,
                    queue,
                    deliveries,
                }
            }
            4 => FromMaster::Cancelled {
                consumer: r.consumer()?,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(m)
    }
}

// === decoding ===

pub(super) struct R<'a>(pub(super) &'a [u8]);

impl R<'_> {
    pub(super) fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(super) fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    pub(super) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }
    pub(super) fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    /// A count of items of at least `min` bytes each: bounded by what is left, so a bad count
    /// never reserves more than the message could hold.
    pub(super) fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.saturating_mul(min) <= self.0.len()).then_some(n)
    }
    pub(super) fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        if n > MAX_FIELD {
            return None;
        }
        self.take(n).map(Bytes::copy_from_slice)
    }
    pub(super) fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_FIELD {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    pub(super) fn queue(&mut self) -> Option<QueueRef> {
        Some(QueueRef {
            vhost: self.str()?,
            name: self.str()?,
        })
    }
    pub(super) fn msg(&mut self) -> Option<WireMsg> {
        Some(WireMsg {
            exchange: self.str()?,
            routing_key: self.str()?,
            header: self.bytes()?,
            body: self.bytes()?,
        })
    }
    pub(super) fn consumer(&mut self) -> Option<RemoteConsumer> {
        Some(RemoteConsumer {
            conn: self.u64()?,
            channel: self.u16()?,
            generation: self.u64()?,
            tag: self.str()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> QueueRef {
        QueueRef {
            vhost: "/".into(),
            name: "orders".into(),
        }
    }

    fn m(body: &'static [u8]) -> WireMsg {
        WireMsg {
            exchange: "amq.direct".into(),
            routing_key: "rk".into(),
            header: Bytes::from_static(b"\x00\x3c\x00\x00hdr"),
            body: Bytes::from_static(body),
        }
    }

    fn c() -> RemoteConsumer {
        RemoteConsumer {
            conn: 9,
            channel: 65535,
            generation: 3,
            tag: "ctag".into(),
        }
    }

    fn every_request() -> Vec<ToMaster> {
        vec![
            ToMaster::Publish {
                queue: q(),
                items: vec![(m(b"a"), Some(0)), (m(b""), None), (m(b"c"), Some(7))],
            },
            ToMaster::Consume {
                queue: q(),
                req: 1,
                consumer: c(),
                no_ack: true,
                exclusive: false,
                prefetch: 10,
                priority: -5,
                flow_active: true,
            },
            ToMaster::Cancel {
                queue: q(),
                consumer: c(),
            },
            ToMaster::Flow {
                queue: q(),
                conn: 1,
                channel: 2,
                generation: 3,
                active: false,
            },
            ToMaster::Prefetch {
                queue: q(),
                consumer: c(),
                prefetch: 0,
            },
            ToMaster::Get {
                queue: q(),
                req: 4,
                no_ack: false,
            },
            ToMaster::Settle {
                queue: q(),
                ids: vec![1, u64::MAX],
                how: 2,
            },
            ToMaster::Purge { queue: q(), req: 5 },
            ToMaster::Delete {
                queue: q(),
                req: 6,
                if_unused: true,
                if_empty: false,
            },
            ToMaster::Touch { queue: q() },
            ToMaster::Stat {
                queue: q(),
                req: 4,
                exact: true,
            },
            ToMaster::Sync {
                queue: q(),
                req: 5,
                cancel: true,
            },
            ToMaster::Kick { queue: q() },
        ]
    }

    fn every_answer() -> Vec<FromMaster> {
        vec![
            FromMaster::Reply {
                req: 1,
                reply: Reply::Done(Ok(3)),
            },
            FromMaster::Reply {
                req: 2,
                reply: Reply::Done(Err((404, "NOT_FOUND - no queue".into()))),
            },
            FromMaster::Reply {
                req: 3,
                reply: Reply::Got(None),
            },
            FromMaster::Reply {
                req: 4,
                reply: Reply::Got(Some((42, m(b"x"), true, 7))),
            },
            FromMaster::Reply {
                req: 10,
                reply: Reply::Stat(Some((5, 2))),
            },
            FromMaster::Confirm {
                ticket: 11,
                ok: false,
            },
            FromMaster::Deliver {
                conn: 5,
                queue: QueueRef {
                    vhost: "/".into(),
                    name: "q".into(),
                },
                deliveries: vec![WireDelivery {
                    channel: 1,
                    generation: 0,
                    tag: "t".into(),
                    msg_id: 8,
                    msg: m(b"body"),
                    redelivered: false,
                    no_ack: true,
                }],
            },
            FromMaster::Cancelled { consumer: c() },
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_refused() {
        for m in every_request() {
            let b = m.encode();
            assert_eq!(ToMaster::decode(&b), Some(m.clone()));
            for cut in 0..b.len() {
                assert_eq!(ToMaster::decode(&b[..cut]), None, "{m:?} cut at {cut}");
            }
            let mut longer = b.to_vec();
            longer.push(0);
            assert_eq!(ToMaster::decode(&longer), None, "trailing bytes accepted");
        }
        for m in every_answer() {
            let b = m.encode();
            assert_eq!(FromMaster::decode(&b), Some(m.clone()));
            for cut in 0..b.len() {
                assert_eq!(FromMaster::decode(&b[..cut]), None, "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn hostile_counts_and_lengths_allocate_nothing() {
        // A publish claiming 4 billion items in 20 bytes.
        let mut b = vec![1u8];
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(b'/');
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(b'q');
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(ToMaster::decode(&b), None);
        assert_eq!(
            FromMaster::decode(&[3, 0, 0, 0, 0, 0, 0, 0, 1, 255, 255, 255, 255]),
            None
        );
        assert_eq!(ToMaster::decode(&[]), None);
        assert_eq!(ToMaster::decode(&[99]), None);
    }
}
