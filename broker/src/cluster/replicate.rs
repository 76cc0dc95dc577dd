//! The master's side of mirrored queues: every queue mastered here runs with a
//! [`MirroredLog`] around its own log, which streams the queue's changes (the
//! [`QueueLog`] calls: enqueue, deliver, settle, requeue, delete) to the queue's mirrors, one
//! batch per queue round, and makes publishes wait for the in-sync mirrors.
//!
//! A publish is confirmed once the local log has it (disk sync for a persistent message) and
//! every in-sync mirror acknowledged it ([`crate::store::StoreEvent::MirrorsAcked`], fed to the
//! queue's confirm tracker). A queue without in-sync mirrors confirms as on a single node.
//! Which mirrors exist and which are in sync is the queue's placement in the cluster state
//! (see [`super::controller`]): a mirror that is dropped from the in-sync set stops holding
//! confirms back at once.

use super::mirror_wire::{MirrorAck, MirrorBatch, MirrorOp, MIRROR, MIRROR_ACK};
use super::remote::wire_msg;
use super::wire::QueueRef;
use crate::queue::Message;
use crate::store::{QueueLog, Safety, StoreEvent};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tracing::debug;
use warren_cluster::{Cluster, NodeId};

/// The replication state of one queue mastered here.
pub struct QueueRep {
    queue: QueueRef,
    /// Has mirrors: changes are streamed.
    mirrored: AtomicBool,
    /// Has in-sync mirrors: publishes wait for them.
    waits: AtomicBool,
    state: Mutex<RepState>,
    /// The queue actor's store events.
    events: mpsc::UnboundedSender<StoreEvent>,
}

#[derive(Default)]
struct RepState {
    epoch: u64,
    mirrors: Vec<NodeId>,
    in_sync: Vec<NodeId>,
    /// In-sync mirrors whose link dropped since (they may have missed batches): their acks no
    /// longer count, and the controller takes them out of the in-sync set, a commit that
    /// publishes wait for.
    broken: std::collections::HashSet<NodeId>,
    /// Mirrors whose next batch starts with a Reset (new, or their link dropped): they do not
    /// count as streamed to until it is sent.
    fresh: std::collections::HashSet<NodeId>,
    acked: HashMap<NodeId, u64>,
    /// The highest id enqueued so far.
    top: u64,
    /// Reported to the queue as acknowledged by every in-sync mirror.
    reported: u64,
    pending: Vec<MirrorOp>,
}

impl QueueRep {
    /// The placement changed: who gets the stream, whose acks count.
    fn set_placement(&self, epoch: u64, mirrors: Vec<NodeId>, in_sync: Vec<NodeId>) {
        let mut st = self.state.lock();
        st.epoch = epoch;
        self.mirrored.store(!mirrors.is_empty(), Ordering::Release);
        self.waits.store(!in_sync.is_empty(), Ordering::Release);
        st.broken.retain(|n| in_sync.contains(n));
        for m in &mirrors {
            if !st.mirrors.contains(m) {
                st.fresh.insert(*m);
            }
        }
        st.mirrors = mirrors;
        st.in_sync = in_sync;
        // Publishes enqueued so far waited for nobody's acks (or are counted again below).
        st.reported = st.reported.min(st.top);
        self.report(&mut st);
    }

    fn ack(&self, from: NodeId, epoch: u64, up_to: u64) {
        let mut st = self.state.lock();
        if epoch != st.epoch || st.broken.contains(&from) {
            return;
        }
        let a = st.acked.entry(from).or_insert(0);
        *a = (*a).max(up_to);
        self.report(&mut st);
    }

    /// Tells the queue how far every in-sync mirror got (everything, when none is in sync).
    fn report(&self, st: &mut RepState) {
        let up_to = st
            .in_sync
            .iter()
            .map(|n| st.acked.get(n).copied().unwrap_or(0))
            .min()
            .unwrap_or(u64::MAX)
            .min(if st.in_sync.is_empty() {
                u64::MAX
            } else {
                st.top
            });
        if up_to > st.reported {
            st.reported = up_to;
            let _ = self.events.send(StoreEvent::MirrorsAcked { up_to });
        }
    }

    /// The link to `peer` dropped: if it is an in-sync mirror of this queue, it is broken.
    fn link_down(&self, peer: NodeId) {
        let mut st = self.state.lock();
        if st.in_sync.contains(&peer) {
            st.broken.insert(peer);
        }
        if st.mirrors.contains(&peer) {
            st.fresh.insert(peer);
        }
        st.acked.remove(&peer);
    }

    /// Queues the op for the mirrors, built only when there are mirrors (this is called per
    /// message and per settle).
    fn push(&self, op: impl FnOnce() -> MirrorOp) {
        if self.mirrored.load(Ordering::Acquire) {
            self.state.lock().pending.push(op());
        }
    }
}

/// A queue's log with its mirrors: the inner log as before, plus the stream to the mirrors.
pub struct MirroredLog {
    inner: Box<dyn QueueLog>,
    rep: Arc<QueueRep>,
    cluster: Cluster,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl QueueLog for MirroredLog {
    fn enqueue(&mut self, id: u64, msg: &Message, ttl_ms: Option<u64>) -> Safety {
        let s = self.inner.enqueue(id, msg, ttl_ms);
        let mut st = self.rep.state.lock();
        st.top = st.top.max(id);
        if self.rep.mirrored.load(Ordering::Acquire) {
            st.pending.push(MirrorOp::Enqueue {
                id,
                msg: wire_msg(msg),
                expires_at_ms: ttl_ms.map_or(0, |t| unix_ms().saturating_add(t)),
            });
        }
        s
    }

    fn enqueue_confirmed(
        &mut self,
        id: u64,
        msg: &Message,
        ttl_ms: Option<u64>,
        ticket: crate::queue::ConfirmTicket,
    ) -> Option<(Safety, crate::queue::ConfirmTicket)> {
        if self.rep.mirrored.load(Ordering::Acquire) {
            return Some((self.enqueue(id, msg, ttl_ms), ticket));
        }
        {
            let mut st = self.rep.state.lock();
            st.top = st.top.max(id);
        }
        self.inner.enqueue_confirmed(id, msg, ttl_ms, ticket)
    }

    fn settle(&mut self, ids: &[u64]) {
        self.inner.settle(ids);
        self.rep.push(|| MirrorOp::Settle(ids.to_vec()));
    }

    fn delivered(&mut self, ids: &[u64]) {
        self.inner.delivered(ids);
        self.rep.push(|| MirrorOp::Delivered(ids.to_vec()));
    }

    fn requeue(&mut self, ids: &[u64]) {
        self.inner.requeue(ids);
        self.rep.push(|| MirrorOp::Requeue(ids.to_vec()));
    }

    fn delete(&mut self) {
        self.inner.delete();
        self.rep.push(|| MirrorOp::Delete);
        self.send_pending();
    }

    fn replicated(&self) -> bool {
        self.rep.waits.load(Ordering::Acquire)
    }

    fn flush(&mut self, idle: bool, woke: bool) -> bool {
        let wrote = self.inner.flush(idle, woke);
        self.send_pending();
        wrote
    }
}

impl MirroredLog {
    fn send_pending(&self) {
        let (ops, mirrors, fresh, epoch) = {
            let mut st = self.rep.state.lock();
            if st.pending.is_empty() && st.fresh.is_empty() {
                return;
            }
            let fresh = std::mem::take(&mut st.fresh);
            (
                std::mem::take(&mut st.pending),
                st.mirrors.clone(),
                fresh,
                st.epoch,
            )
        };
        let mut reset_ops = Vec::with_capacity(ops.len() + 1);
        reset_ops.push(MirrorOp::Reset);
        reset_ops.extend(ops.iter().cloned());
        let batch = MirrorBatch {
            queue: self.rep.queue.clone(),
            epoch,
            ops,
        }
        .encode();
        let reset = MirrorBatch {
            queue: self.rep.queue.clone(),
            epoch,
            ops: reset_ops,
        }
        .encode();
        for m in mirrors {
            let b = if fresh.contains(&m) { &reset } else { &batch };
            if let Err(e) = self.cluster.send(m, MIRROR, b.clone()) {
                // The mirror misses this batch: the controller drops it from the in-sync
                // set when it stays out of reach (it resyncs from an empty queue).
                debug!(mirror = m, error = %e, "mirror batch not sent");
            }
        }
    }
}

/// Every queue mastered on this node, for the acks of their mirrors.
pub struct Replication {
    cluster: Cluster,
    queues: Mutex<HashMap<QueueRef, Weak<QueueRep>>>,
}

impl Replication {
    pub fn start(cluster: Cluster) -> Arc<Replication> {
        let me = Arc::new(Replication {
            cluster: cluster.clone(),
            queues: Mutex::default(),
        });
        let mut acks = cluster.subscribe_app(MIRROR_ACK);
        let mut events = cluster.peer_events();
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = acks.recv() => m,
                    ev = events.recv() => {
                        let Some(me) = weak.upgrade() else { return };
                        if let Ok(warren_cluster::PeerEvent::Down(peer)) = ev {
                            let reps: Vec<Arc<QueueRep>> =
                                me.queues.lock().values().filter_map(Weak::upgrade).collect();
                            for r in reps {
                                r.link_down(peer);
                            }
                        }
                        continue;
                    }
                };
                let Some(m) = m else { return };
                let Some(me) = weak.upgrade() else { return };
                let Some(a) = MirrorAck::decode(&m.payload) else {
                    continue;
                };
                let rep = me.queues.lock().get(&a.queue).and_then(Weak::upgrade);
                if let Some(rep) = rep {
                    rep.ack(m.from, a.epoch, a.up_to);
                }
            }
        });
        me
    }

    /// Wrap the log of queue `vhost`/`name` mastered here; returns the log and the store
    /// events its actor must read (the store's, if any, plus the mirrors' acks).
    pub fn wrap(
        &self,
        vhost: &str,
        name: &str,
        inner: Box<dyn QueueLog>,
        store_events: Option<mpsc::UnboundedReceiver<StoreEvent>>,
    ) -> (Box<dyn QueueLog>, mpsc::UnboundedReceiver<StoreEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(mut from_store) = store_events {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = from_store.recv().await {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            });
        }
        let queue = QueueRef {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        };
        let rep = Arc::new(QueueRep {
            queue: queue.clone(),
            mirrored: AtomicBool::new(false),
            waits: AtomicBool::new(false),
            state: Mutex::default(),
            events: tx,
        });
        self.queues.lock().insert(queue, Arc::downgrade(&rep));
        let log = MirroredLog {
            inner,
            rep,
            cluster: self.cluster.clone(),
        };
        (Box::new(log), rx)
    }

    /// The placement of a queue mastered here changed (mirror node ids, in-sync ones).
    pub fn placement(
        &self,
        queue: &QueueRef,
        epoch: u64,
        mirrors: Vec<NodeId>,
        in_sync: Vec<NodeId>,
    ) {
        let rep = {
            let mut q = self.queues.lock();
            q.retain(|_, w| w.strong_count() > 0);
            q.get(queue).and_then(Weak::upgrade)
        };
        if let Some(rep) = rep {
            rep.set_placement(epoch, mirrors, in_sync);
        }
    }

    /// Whether `mirror` of the queue mastered here lost its link since it was in sync.
    pub fn broken(&self, queue: &QueueRef, mirror: NodeId) -> bool {
        self.queues
            .lock()
            .get(queue)
            .and_then(Weak::upgrade)
            .is_some_and(|r| r.state.lock().broken.contains(&mirror))
    }

    /// Whether the queue mastered here streams to `mirror` (it may count as in sync once
    /// the queue holds nothing older than the stream).
    pub fn streams_to(&self, queue: &QueueRef, mirror: NodeId) -> bool {
        self.queues
            .lock()
            .get(queue)
            .and_then(Weak::upgrade)
            .is_some_and(|r| {
                let st = r.state.lock();
                st.mirrors.contains(&mirror) && !st.fresh.contains(&mirror)
            })
    }
}
