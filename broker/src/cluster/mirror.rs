//! The mirror's side of mirrored queues: this node keeps a copy of each queue it mirrors
//! ([`super::mirror_copy::Copy`]), built from its master's stream ([`MirrorBatch`]),
//! acknowledges what is safe here ([`MirrorAck`]: every enqueue up to an id, in memory for a
//! transient message, on disk for a persistent message of a durable queue), and hands the
//! copy over when it is promoted.
//!
//! A copy of a durable queue keeps its persistent messages in the node's store as well, under
//! a key that names the master's epoch. A node that restarts finds those copies again: one
//! stays on offer for promotion as long as no newer master took over, so a cluster whose
//! nodes all died together (power lost) keeps every confirmed message even when a mirror
//! comes back before the master (the mirror was in sync, so its disk has them). Once a master
//! streams to the copy again, the stream starts with a Reset and the copy follows it afresh;
//! a restarted mirror is in sync again only after a synchronisation (the master's backlog in
//! batches, see [`super::replicate`]) or once the queue has drained (see
//! [`super::controller`]). A batch from an older epoch than the newest seen (a master that was
//! replaced) is ignored.

use super::mirror_copy::{copy_key, parse_key, Copy, Retired, KEY_PREFIX};
use super::mirror_wire::{MirrorAck, MirrorBatch, MirrorOp, MIRROR, MIRROR_ACK};
use super::remote::local_msg;
use super::wire::QueueRef;
use crate::store::{Recovered, Store, StoreEvent};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use warren_cluster::{Cluster, NodeId};

/// Whether batches of `epoch` for a queue are from a master the cluster already replaced.
pub type Fenced = Box<dyn Fn(&QueueRef, u64) -> bool + Send + Sync>;

/// A store event of one copy, tagged with the copy's queue and generation.
type DiskEvent = (QueueRef, u64, StoreEvent);

/// The queues this node mirrors.
pub struct Mirrors {
    copies: Mutex<HashMap<QueueRef, Copy>>,
    /// Per queue, the lowest epoch still accepted (after this node was promoted).
    retired: Mutex<HashMap<QueueRef, u64>>,
    fenced: Fenced,
    store: Arc<Store>,
    /// Copy generations, also the nonce of their store keys: they start at the clock, so a
    /// key never repeats one of an earlier run.
    next_gen: AtomicU64,
    disk_tx: mpsc::UnboundedSender<DiskEvent>,
    /// Test hook: while set, acks wait here, the latest per master and queue (a mirror whose
    /// disk stalls); sent when it is cleared.
    held: Mutex<Option<HashMap<(NodeId, QueueRef), MirrorAck>>>,
    cluster: Cluster,
}

impl Mirrors {
    /// Starts the mirror side, with the copies this node's store kept from its last run.
    pub fn start(
        cluster: Cluster,
        memory: &'static crate::memory::Memory,
        store: Arc<Store>,
        fenced: Fenced,
    ) -> Arc<Mirrors> {
        let (disk_tx, mut disk_rx) = mpsc::unbounded_channel();
        let me = Arc::new(Mirrors {
            copies: Mutex::default(),
            retired: Mutex::default(),
            fenced,
            store,
            next_gen: AtomicU64::new(crate::stats::epoch_ms().saturating_mul(1000)),
            disk_tx,
            held: Mutex::new(None),
            cluster: cluster.clone(),
        });
        me.recover();
        let mut inbox = cluster.subscribe_app(MIRROR);
        let mut events = cluster.peer_events();
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbox.recv() => {
                        let Some(m) = m else { return };
                        let Some(me) = weak.upgrade() else { return };
                        let Some(batch) = MirrorBatch::decode(&m.payload) else {
                            warn!(from = m.from, "undecodable mirror batch; dropped");
                            continue;
                        };
                        if let Some(ack) = me.apply(memory, m.from, batch) {
                            me.send_ack(m.from, ack);
                        }
                    }
                    ev = disk_rx.recv() => {
                        let Some((queue, gen, ev)) = ev else { return };
                        let Some(me) = weak.upgrade() else { return };
                        if let Some((to, ack)) = me.on_disk(&queue, gen, ev) {
                            me.send_ack(to, ack);
                        }
                    }
                    // A master that dies leaves its copy here to be promoted; one whose link only
                    // flapped starts the next batch with a Reset.
                    _ = events.recv() => {}
                }
            }
        });
        me
    }

    /// Takes back the copies the store kept: the newest per queue stays (on offer for
    /// promotion), older ones are deleted.
    fn recover(&self) {
        let mut found: HashMap<QueueRef, Vec<(u64, u64, String)>> = HashMap::new();
        for key in self.store.unclaimed_keys(KEY_PREFIX) {
            match parse_key(&key) {
                Some((q, epoch, nonce)) => found.entry(q).or_default().push((epoch, nonce, key)),
                None => warn!(key = %key.escape_debug(), "store: unreadable mirror copy key"),
            }
        }
        let mut copies = self.copies.lock();
        for (q, mut keys) in found {
            keys.sort();
            let Some((epoch, nonce, newest)) = keys.pop() else {
                continue;
            };
            for (_, _, old) in keys {
                let (mut log, _, _) = self.store.attach_key(old);
                crate::store::QueueLog::delete(&mut log);
            }
            let (log, msgs, rx) = self.store.attach_key(newest);
            info!(queue = %q.name, vhost = %q.vhost, epoch, messages = msgs.len(), "mirror copy recovered from disk");
            self.watch(&q, nonce, rx);
            copies.insert(q, Copy::recovered(epoch, nonce, log, msgs));
        }
    }

    /// Forwards one copy's store events to the mirror task.
    fn watch(&self, q: &QueueRef, gen: u64, mut rx: mpsc::UnboundedReceiver<StoreEvent>) {
        let tx = self.disk_tx.clone();
        let q = q.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if tx.send((q.clone(), gen, ev)).is_err() {
                    return;
                }
            }
        });
    }

    /// A new, empty copy of `q` following `master` of `epoch`; on disk too if `durable`.
    fn new_copy(&self, q: &QueueRef, epoch: u64, master: NodeId, durable: bool) -> Copy {
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let log = durable.then(|| {
            let (log, _, rx) = self.store.attach_key(copy_key(q, epoch, gen));
            self.watch(q, gen, rx);
            log
        });
        Copy::new(Some(master), epoch, gen, log)
    }

    fn apply(
        &self,
        memory: &'static crate::memory::Memory,
        from: NodeId,
        b: MirrorBatch,
    ) -> Option<MirrorAck> {
        // A replaced master is not acknowledged (it must not confirm anything more).
        let floor = self.retired.lock().get(&b.queue).copied().unwrap_or(0);
        if b.epoch < floor || (self.fenced)(&b.queue, b.epoch) {
            return None;
        }
        // The master says whether its queue is durable (this node's view of the cluster
        // state may not have the queue yet).
        let durable = b.durable;
        let mut copies = self.copies.lock();
        match copies.get(&b.queue) {
            Some(c) if b.epoch < c.epoch => return None,
            Some(c) if b.epoch == c.epoch => {}
            // A new master (or none before): a copy of its own, the older one goes.
            _ => {
                let c = self.new_copy(&b.queue, b.epoch, from, durable);
                if let Some(old) = copies.insert(b.queue.clone(), c) {
                    old.discard();
                }
            }
        }
        let c = copies.get_mut(&b.queue)?;
        c.master = Some(from);
        c.recovered = false;
        for op in b.ops {
            match op {
                MirrorOp::Enqueue {
                    id,
                    msg,
                    expires_at_ms,
                } => match local_msg(memory, msg) {
                    Some(m) if !c.failed => c.enqueue(id, m, expires_at_ms),
                    _ => c.skip(id),
                },
                MirrorOp::Settle(ids) => c.settle(&ids),
                // A copy whose disk failed starts over with a log of its own.
                MirrorOp::Reset if c.failed => {
                    std::mem::replace(c, self.new_copy(&b.queue, b.epoch, from, durable)).discard()
                }
                MirrorOp::Reset => c.reset(),
                MirrorOp::SyncPoint(seq) => c.sync_point(seq),
                MirrorOp::Delete => {
                    if let Some(c) = copies.remove(&b.queue) {
                        c.discard();
                    }
                    return None;
                }
            }
        }
        c.flush();
        Some(ack_of(&b.queue, c))
    }

    /// A copy's store event: what is safe now, for its master.
    fn on_disk(&self, q: &QueueRef, gen: u64, ev: StoreEvent) -> Option<(NodeId, MirrorAck)> {
        let mut copies = self.copies.lock();
        let c = copies.get_mut(q).filter(|c| c.gen == gen)?;
        match ev {
            StoreEvent::Synced { ids, .. } => c.synced(&ids),
            StoreEvent::WriteFailed { ids, .. } => {
                if !c.failed {
                    warn!(queue = %q.name, vhost = %q.vhost, messages = ids.len(), "mirror copy: a disk write failed; the copy is out of sync until its master starts it over");
                }
                c.failed = true;
            }
            _ => return None,
        }
        Some((c.master?, ack_of(q, c)))
    }

    /// Promoted: the copy of `queue`, in queue order, every message marked redelivered: the
    /// old master may have handed any of them to a consumer in its last moments, after the
    /// batch that would have said so (AMQP's redelivered means "may have been delivered
    /// before"). None if this node has no copy it may offer: a copy recovered from disk
    /// counts only if it followed the master that `epoch` replaces. The [`Retired`] log is to
    /// be dropped once the new queue has logged the messages (a crash in between leaves the
    /// copy on disk, not neither).
    pub fn take(&self, queue: &QueueRef, epoch: u64) -> Option<(Vec<Recovered>, Retired)> {
        self.retired.lock().insert(queue.clone(), epoch);
        let c = self.copies.lock().remove(queue)?;
        if c.recovered && c.epoch.saturating_add(1) != epoch {
            warn!(queue = %queue.name, vhost = %queue.vhost, copy_epoch = c.epoch, epoch, "a mirror copy from disk followed an older master; not used");
            c.discard();
            return None;
        }
        Some(c.into_parts())
    }

    /// A placement of `queue` was applied: a copy recovered from disk that no longer has a
    /// chance of promotion (a newer master took over, this node is no mirror now, or it is
    /// the master already) goes.
    pub fn placement(&self, queue: &QueueRef, epoch: u64, mirror_here: bool) {
        let mut copies = self.copies.lock();
        if copies
            .get(queue)
            .is_some_and(|c| c.recovered && (c.epoch < epoch || !mirror_here))
        {
            debug!(queue = %queue.name, vhost = %queue.vhost, "mirror copy from disk outdated; dropped");
            if let Some(c) = copies.remove(queue) {
                c.discard();
            }
        }
    }

    fn send_ack(&self, to: NodeId, ack: MirrorAck) {
        if let Some(held) = self.held.lock().as_mut() {
            held.insert((to, ack.queue.clone()), ack);
            return;
        }
        if let Err(e) = self.cluster.send(to, MIRROR_ACK, ack.encode()) {
            debug!(error = %e, "mirror ack not sent");
        }
    }

    /// Test hook: while `hold` is set this node's acks to the masters of the queues it
    /// mirrors wait (as those of a mirror whose disk stalls), though its links stay up; when
    /// it is cleared the latest of each goes out.
    pub fn hold_acks(&self, hold: bool) {
        let released = {
            let mut held = self.held.lock();
            match (hold, held.is_some()) {
                (true, false) => {
                    *held = Some(HashMap::new());
                    None
                }
                (false, true) => held.take(),
                _ => None,
            }
        };
        for ((to, _), ack) in released.into_iter().flatten() {
            self.send_ack(to, ack);
        }
    }

    /// This node no longer mirrors `queue`.
    pub fn drop_copy(&self, queue: &QueueRef) {
        if let Some(c) = self.copies.lock().remove(queue) {
            c.discard();
        }
    }
}

fn ack_of(queue: &QueueRef, c: &mut Copy) -> MirrorAck {
    let (up_to, sync_seq) = c.safe();
    MirrorAck {
        queue: queue.clone(),
        epoch: c.epoch,
        up_to,
        sync_seq,
        failed: c.failed,
    }
}
