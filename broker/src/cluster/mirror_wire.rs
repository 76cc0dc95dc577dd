//! What a queue's master sends its mirrors ([`MirrorBatch`], app channel [`MIRROR`]) and what
//! they answer ([`MirrorAck`], app channel [`MIRROR_ACK`]). The same encoding rules as
//! [`super::wire`]: pure, bounded, a malformed message decodes to `None`.

use super::wire::{QueueRef, WireMsg, R, W};
use bytes::{Bytes, BytesMut};

/// The app channel of master -> mirror batches.
pub const MIRROR: u8 = 3;
/// The app channel of mirror -> master acknowledgements.
pub const MIRROR_ACK: u8 = 4;

/// One change of a mirrored queue, in the master's order (the [`crate::store::QueueLog`] calls).
#[derive(Debug, Clone, PartialEq)]
pub enum MirrorOp {
    /// A message entered the queue as `id`; `expires_at_ms` (Unix ms) 0 for none.
    Enqueue {
        id: u64,
        msg: WireMsg,
        expires_at_ms: u64,
    },
    /// Left the queue for good.
    Settle(Vec<u64>),
    /// The queue was deleted.
    Delete,
    /// Start the copy afresh (the first batch to a new mirror, or after its link dropped:
    /// batches may have been missed).
    Reset,
    /// The end of synchronisation batch `seq` (its messages are the Enqueue and Delivered
    /// ops before it): acknowledged as [`MirrorAck::sync_seq`], so the master sends one batch
    /// at a time and knows when the mirror holds the whole queue.
    SyncPoint(u64),
}

/// Changes for one queue, from the master of `epoch`; `durable`: the queue keeps persistent
/// messages on disk (so does the mirror's copy).
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorBatch {
    pub queue: QueueRef,
    pub epoch: u64,
    pub durable: bool,
    pub ops: Vec<MirrorOp>,
}

/// The mirror has every enqueue up to and including `up_to` of the master of `epoch` safe
/// (in memory, or on disk for a persistent message of a durable queue), and the same for
/// synchronisation batch `sync_seq` (0: none since its last Reset). `failed`: the mirror's
/// disk refused its copy: it is out of sync until its stream starts over.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorAck {
    pub queue: QueueRef,
    pub epoch: u64,
    pub up_to: u64,
    pub sync_seq: u64,
    pub failed: bool,
}

fn ids(w: &mut W, ids: &[u64]) {
    w.u32(ids.len() as u32);
    for id in ids {
        w.u64(*id);
    }
}

fn read_ids(r: &mut R) -> Option<Vec<u64>> {
    let n = r.count(8)?;
    (0..n).map(|_| r.u64()).collect()
}

impl MirrorBatch {
    pub fn encode(&self) -> Bytes {
        let mut w = W(BytesMut::with_capacity(64));
        w.queue(&self.queue);
        w.u64(self.epoch);
        w.u8(u8::from(self.durable));
        w.u32(self.ops.len() as u32);
        for op in &self.ops {
            match op {
                MirrorOp::Enqueue {
                    id,
                    msg,
                    expires_at_ms,
                } => {
                    w.u8(1);
                    w.u64(*id);
                    w.msg(msg);
                    w.u64(*expires_at_ms);
                }
                MirrorOp::Settle(v) => {
                    w.u8(2);
                    ids(&mut w, v);
                }
                MirrorOp::Delete => w.u8(5),
                MirrorOp::Reset => w.u8(6),
                MirrorOp::SyncPoint(seq) => {
                    w.u8(7);
                    w.u64(*seq);
                }
            }
        }
        w.0.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = R(b);
        let queue = r.queue()?;
        let epoch = r.u64()?;
        let durable = match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let n = r.count(1)?;
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(match r.u8()? {
                1 => MirrorOp::Enqueue {
                    id: r.u64()?,
                    msg: r.msg()?,
                    expires_at_ms: r.u64()?,
                },
                2 => MirrorOp::Settle(read_ids(&mut r)?),
                5 => MirrorOp::Delete,
                6 => MirrorOp::Reset,
                7 => MirrorOp::SyncPoint(r.u64()?),
                _ => return None,
            });
        }
        r.0.is_empty().then_some(MirrorBatch {
            queue,
            epoch,
            durable,
            ops,
        })
    }
}

impl MirrorAck {
    pub fn encode(&self) -> Bytes {
        let mut w = W(BytesMut::with_capacity(32));
        w.queue(&self.queue);
        w.u64(self.epoch);
        w.u64(self.up_to);
        w.u64(self.sync_seq);
        w.u8(u8::from(self.failed));
        w.0.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = R(b);
        let m = MirrorAck {
            queue: r.queue()?,
            epoch: r.u64()?,
            up_to: r.u64()?,
            sync_seq: r.u64()?,
            failed: match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            },
        };
        r.0.is_empty().then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> MirrorBatch {
        MirrorBatch {
            queue: QueueRef {
                vhost: "/".into(),
                name: "q".into(),
            },
            epoch: 3,
            durable: true,
            ops: vec![
                MirrorOp::Enqueue {
                    id: 7,
                    msg: WireMsg {
                        exchange: "".into(),
                        routing_key: "q".into(),
                        header: Bytes::from_static(b"hdr"),
                        body: Bytes::from_static(b"body"),
                    },
                    expires_at_ms: 0,
                },
                MirrorOp::Settle(vec![7, 8]),
                MirrorOp::Reset,
                MirrorOp::SyncPoint(u64::MAX - 1),
                MirrorOp::Delete,
            ],
        }
    }

    #[test]
    fn batches_and_acks_round_trip() {
        let b = batch();
        assert_eq!(MirrorBatch::decode(&b.encode()), Some(b));
        let a = MirrorAck {
            queue: QueueRef {
                vhost: "v".into(),
                name: "n".into(),
            },
            epoch: 1,
            up_to: 99,
            sync_seq: 12,
            failed: true,
        };
        let bytes = a.encode();
        assert_eq!(MirrorAck::decode(&bytes), Some(a));
        for n in 0..bytes.len() {
            assert_eq!(MirrorAck::decode(&bytes[..n]), None, "cut at {n}");
        }
        let mut bad = bytes.to_vec();
        *bad.last_mut().expect("flag") = 2;
        assert_eq!(MirrorAck::decode(&bad), None);
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let bytes = batch().encode();
        for n in 0..bytes.len() {
            assert_eq!(MirrorBatch::decode(&bytes[..n]), None, "cut at {n}");
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(MirrorBatch::decode(&long), None);
        let mut huge = bytes.to_vec();
        // The op count claims more ops than bytes left.
        let at = 4 + 1 + 4 + 1 + 8 + 1;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MirrorBatch::decode(&huge), None);
    }
}
