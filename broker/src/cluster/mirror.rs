//! The mirror's side of mirrored queues: this node keeps a copy of each queue it mirrors,
//! built from its master's stream ([`MirrorBatch`]), acknowledges each batch once applied
//! ([`MirrorAck`]: the highest id it has), and hands the copy over when it is promoted.
//!
//! The copy is in memory: a mirror that restarts comes back empty and is in sync again only
//! after a synchronisation (the master's backlog in batches, see [`super::replicate`]) or
//! once the queue has drained (see [`super::controller`]). A batch from an older epoch than the newest seen
//! (a master that was replaced) is ignored.

use super::mirror_wire::{MirrorAck, MirrorBatch, MirrorOp, MIRROR, MIRROR_ACK};
use super::remote::local_msg;
use super::wire::QueueRef;
use crate::queue::Message;
use crate::store::Recovered;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tracing::{debug, warn};
use warren_cluster::Cluster;

#[derive(Default)]
struct Copy {
    /// The master it follows (its link going down ends the copy: batches may be missed).
    master: Option<warren_cluster::NodeId>,
    epoch: u64,
    /// id -> (message, expiry in Unix ms or 0).
    msgs: BTreeMap<u64, (Arc<Message>, u64)>,
    top: u64,
    /// The last synchronisation batch applied since the last Reset.
    sync_seq: u64,
}

/// Whether batches of `epoch` for a queue are from a master the cluster already replaced.
pub type Fenced = Box<dyn Fn(&QueueRef, u64) -> bool + Send + Sync>;

/// The queues this node mirrors.
pub struct Mirrors {
    copies: Mutex<HashMap<QueueRef, Copy>>,
    /// Per queue, the lowest epoch still accepted (after this node was promoted).
    retired: Mutex<HashMap<QueueRef, u64>>,
    fenced: Fenced,
}

impl Mirrors {
    pub fn start(
        cluster: Cluster,
        memory: &'static crate::memory::Memory,
        fenced: Fenced,
    ) -> Arc<Mirrors> {
        let me = Arc::new(Mirrors {
            copies: Mutex::default(),
            retired: Mutex::default(),
            fenced,
        });
        let mut inbox = cluster.subscribe_app(MIRROR);
        let mut events = cluster.peer_events();
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = inbox.recv() => m,
                    // A master that dies leaves its copy here to be promoted; one whose link only
                    // flapped starts the next batch with a Reset.
                    _ = events.recv() => continue,
                };
                let Some(m) = m else { return };
                let Some(me) = weak.upgrade() else { return };
                let Some(batch) = MirrorBatch::decode(&m.payload) else {
                    warn!(from = m.from, "undecodable mirror batch; dropped");
                    continue;
                };
                if let Some(ack) = me.apply(memory, m.from, batch) {
                    if let Err(e) = cluster.send(m.from, MIRROR_ACK, ack.encode()) {
                        debug!(error = %e, "mirror ack not sent");
                    }
                }
            }
        });
        me
    }

    fn apply(
        &self,
        memory: &'static crate::memory::Memory,
        from: warren_cluster::NodeId,
        b: MirrorBatch,
    ) -> Option<MirrorAck> {
        // A replaced master is not acknowledged (it must not confirm anything more).
        let floor = self.retired.lock().get(&b.queue).copied().unwrap_or(0);
        if b.epoch < floor || (self.fenced)(&b.queue, b.epoch) {
            return None;
        }
        let mut copies = self.copies.lock();
        let c = copies.entry(b.queue.clone()).or_default();
        if b.epoch < c.epoch {
            return None;
        }
        c.epoch = b.epoch;
        c.master = Some(from);
        for op in b.ops {
            match op {
                MirrorOp::Enqueue {
                    id,
                    msg,
                    expires_at_ms,
                } => {
                    if let Some(m) = local_msg(memory, msg) {
                        c.msgs.insert(id, (m, expires_at_ms));
                    }
                    c.top = c.top.max(id);
                }
                MirrorOp::Settle(ids) => {
                    for id in ids {
                        c.msgs.remove(&id);
                    }
                }
                MirrorOp::Reset => {
                    c.msgs.clear();
                    c.top = 0;
                    c.sync_seq = 0;
                }
                MirrorOp::SyncPoint(seq) => c.sync_seq = seq,
                MirrorOp::Delete => {
                    copies.remove(&b.queue);
                    return None;
                }
            }
        }
        Some(MirrorAck {
            queue: b.queue,
            epoch: c.epoch,
            up_to: c.top,
            sync_seq: c.sync_seq,
        })
    }

    /// Promoted: the copy of `queue`, in queue order, every message marked redelivered: the
    /// old master may have handed any of them to a consumer in its last moments, after the
    /// batch that would have said so (AMQP's redelivered means "may have been delivered
    /// before"). None if this node has no copy.
    pub fn take(&self, queue: &QueueRef, epoch: u64) -> Option<Vec<Recovered>> {
        self.retired.lock().insert(queue.clone(), epoch);
        let c = self.copies.lock().remove(queue)?;
        Some(
            c.msgs
                .into_iter()
                .map(|(id, (msg, exp))| Recovered {
                    id,
                    msg,
                    redelivered: true,
                    expires_at_ms: (exp != 0).then_some(exp),
                })
                .collect(),
        )
    }

    /// This node no longer mirrors `queue`.
    pub fn drop_copy(&self, queue: &QueueRef) {
        self.copies.lock().remove(queue);
    }
}
