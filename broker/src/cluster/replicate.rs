//! The master's side of mirrored queues: every queue mastered here runs with a
//! [`MirroredLog`] around its own log, which streams what enters and leaves the queue (the
//! [`QueueLog`] calls enqueue, settle, delete; deliveries and requeues need not travel, since
//! a promoted copy comes back redelivered whole) to the queue's mirrors, one batch per queue
//! round, and makes publishes wait for the in-sync mirrors.
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
use crate::store::{QueueLog, Safety, StoreEvent, SyncMsg, SyncRange};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;
use warren_cluster::{Cluster, NodeId};

/// The replication state of one queue mastered here.
pub struct QueueRep {
    queue: QueueRef,
    /// Has mirrors: changes are streamed.
    mirrored: AtomicBool,
    /// Has in-sync mirrors: publishes wait for them.
    waits: AtomicBool,
    /// Keeps persistent messages on disk: so do the mirrors' copies.
    durable: bool,
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
    /// `ha-sync-mode` automatic: a mirror that joins the stream gets the queue's backlog.
    auto_sync: bool,
    /// Mirrors to synchronise when their stream starts (`sync_queue` for a fresh mirror).
    sync_requested: HashSet<NodeId>,
    /// Synchronisations under way or done, per mirror (dropped with its stream).
    syncs: HashMap<NodeId, Sync>,
    /// The last synchronisation batch number used (starts at the clock, so an ack from an
    /// earlier run of this master never matches).
    seq: u64,
    /// Mirrors the controller is about to add to the in-sync set: publishes wait for them
    /// already, so nothing is confirmed without them between the commit and its apply here.
    expected: HashSet<NodeId>,
    /// Mirrors whose link is down: nothing is sent to them (their stream starts afresh when
    /// the link is back), so a dead node costs no work and no queued batches.
    down: HashSet<NodeId>,
    /// (top, when) each time the queue's top grew while publishes waited for mirrors, oldest
    /// first, until every waited-for mirror acknowledged it: how long a mirror has held
    /// confirms back (see [`Replication::drop_slow_mirrors`]). At most [`WAITING_MAX`].
    waiting: std::collections::VecDeque<(u64, Instant)>,
}

/// Entries kept in [`RepState::waiting`]; past it the oldest ones, which are what counts,
/// stay and newer tops are not noted.
const WAITING_MAX: usize = 4096;

/// One mirror's synchronisation: the messages that were in the queue when its stream began,
/// sent in batches (one at a time) while the stream carries everything newer.
#[derive(Debug, Clone, Copy)]
struct Sync {
    range: SyncRange,
    /// The last batch sent and the last one the mirror applied.
    sent: u64,
    acked: u64,
    /// The last batch is sent: once it is acknowledged the mirror holds the whole queue.
    done: bool,
}

impl Sync {
    fn idle(&self) -> bool {
        self.sent == self.acked
    }
    fn complete(&self) -> bool {
        self.done && self.idle()
    }
}

/// Where a mirror of a queue mastered here stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MirrorProgress {
    /// The master streams every change to it.
    pub streaming: bool,
    /// It holds every message that was in the queue when its stream began.
    pub synced: bool,
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
        st.syncs.retain(|n, _| mirrors.contains(n));
        st.sync_requested.retain(|n| mirrors.contains(n));
        st.expected
            .retain(|n| mirrors.contains(n) && !in_sync.contains(n));
        st.mirrors = mirrors;
        st.in_sync = in_sync;
        self.waits.store(
            !st.in_sync.is_empty() || !st.expected.is_empty(),
            Ordering::Release,
        );
        // Publishes enqueued so far waited for nobody's acks (or are counted again below).
        st.reported = st.reported.min(st.top);
        self.report(&mut st);
    }

    /// The controller is about to commit `mirror` into the in-sync set: from now on publishes
    /// wait for its acks (false if it no longer qualifies: not streaming, or broken).
    fn expect(&self, mirror: NodeId) -> bool {
        let mut st = self.state.lock();
        if !st.mirrors.contains(&mirror)
            || st.fresh.contains(&mirror)
            || st.broken.contains(&mirror)
        {
            return false;
        }
        st.expected.insert(mirror);
        self.waits.store(true, Ordering::Release);
        st.reported = st.reported.min(st.top);
        true
    }

    /// The commit of `expect(mirror)` failed: publishes stop waiting for it.
    fn unexpect(&self, mirror: NodeId) {
        let mut st = self.state.lock();
        if st.expected.remove(&mirror) {
            self.waits.store(
                !st.in_sync.is_empty() || !st.expected.is_empty(),
                Ordering::Release,
            );
            self.report(&mut st);
        }
    }

    fn progress(&self, mirror: NodeId) -> MirrorProgress {
        let st = self.state.lock();
        let streaming = st.mirrors.contains(&mirror) && !st.fresh.contains(&mirror);
        let sync = st.syncs.get(&mirror).filter(|_| streaming);
        MirrorProgress {
            streaming,
            synced: sync.is_some_and(Sync::complete),
        }
    }

    /// Starts synchronising `mirror` from the queue's current contents (its stream goes on).
    fn start_sync(&self, st: &mut RepState, mirror: NodeId) {
        st.syncs.insert(
            mirror,
            Sync {
                range: SyncRange {
                    after: 0,
                    up_to: st.top,
                },
                sent: 0,
                acked: 0,
                done: false,
            },
        );
        let _ = self.events.send(StoreEvent::MirrorSyncReady);
    }

    fn ack(&self, from: NodeId, a: &MirrorAck) {
        let mut st = self.state.lock();
        if a.epoch != st.epoch || st.broken.contains(&from) {
            return;
        }
        if a.failed {
            // Its disk refused the copy: as if its link dropped (out of sync, stream anew).
            drop(st);
            debug!(
                mirror = from,
                "mirror copy failed on its disk; its stream starts over"
            );
            self.link_down(from);
            return;
        }
        let acked = st.acked.entry(from).or_insert(0);
        *acked = (*acked).max(a.up_to);
        if let Some(sync) = st.syncs.get_mut(&from) {
            if a.sync_seq == sync.sent && !sync.idle() {
                sync.acked = sync.sent;
                if !sync.done {
                    let _ = self.events.send(StoreEvent::MirrorSyncReady);
                }
            }
        }
        self.report(&mut st);
    }

    /// Tells the queue how far every in-sync mirror got (everything, when none is in sync).
    fn report(&self, st: &mut RepState) {
        let waited = st.in_sync.iter().chain(st.expected.iter());
        let up_to = waited
            .map(|n| st.acked.get(n).copied().unwrap_or(0))
            .min()
            .map_or(u64::MAX, |a| a.min(st.top));
        while st.waiting.front().is_some_and(|(id, _)| *id <= up_to) {
            st.waiting.pop_front();
        }
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
        st.syncs.remove(&peer);
        if st.expected.remove(&peer) {
            self.waits.store(
                !st.in_sync.is_empty() || !st.expected.is_empty(),
                Ordering::Release,
            );
        }
        self.report(&mut st);
    }

    /// The link to `peer` went down: as [`QueueRep::link_down`], and nothing more is sent to
    /// it until it is back.
    fn peer_down(&self, peer: NodeId) {
        self.state.lock().down.insert(peer);
        self.link_down(peer);
    }

    /// The link to `peer` is back: its stream starts afresh with the next round.
    fn peer_up(&self, peer: NodeId) {
        self.state.lock().down.remove(&peer);
    }

    /// `ops` of this queue from its master of `epoch`, encoded for the mirrors.
    fn batch(&self, epoch: u64, ops: Vec<MirrorOp>) -> bytes::Bytes {
        MirrorBatch {
            queue: self.queue.clone(),
            epoch,
            durable: self.durable,
            ops,
        }
        .encode()
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

    // Deliveries and requeues are not streamed: a promoted copy comes back redelivered whole
    // (see `super::mirror`), so the mirrors need only what is in the queue.
    fn delivered(&mut self, ids: &[u64]) {
        self.inner.delivered(ids);
    }

    fn requeue(&mut self, ids: &[u64]) {
        self.inner.requeue(ids);
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

    fn sync_wanted(&self) -> Option<SyncRange> {
        if !self.rep.mirrored.load(Ordering::Acquire) {
            return None;
        }
        let st = self.rep.state.lock();
        st.syncs
            .iter()
            .find(|(m, s)| !s.done && s.idle() && !st.fresh.contains(m) && !st.down.contains(m))
            .map(|(_, s)| s.range)
    }

    fn sync_batch(&mut self, range: SyncRange, msgs: Vec<SyncMsg>, done: bool) {
        // The stream so far goes first: the batch shows the queue as it is after it.
        self.send_pending();
        let (targets, seq, epoch) = {
            let mut st = self.rep.state.lock();
            let targets: Vec<NodeId> = st
                .syncs
                .iter()
                .filter(|(m, s)| {
                    s.range == range
                        && !s.done
                        && s.idle()
                        && !st.fresh.contains(m)
                        && !st.down.contains(m)
                })
                .map(|(m, _)| *m)
                .collect();
            if targets.is_empty() {
                return;
            }
            st.seq += 1;
            (targets, st.seq, st.epoch)
        };
        let last = msgs.last().map(|m| m.id);
        let mut ops: Vec<MirrorOp> = msgs
            .into_iter()
            .map(|m| MirrorOp::Enqueue {
                id: m.id,
                msg: wire_msg(&m.msg),
                expires_at_ms: m.expires_at_ms,
            })
            .collect();
        ops.push(MirrorOp::SyncPoint(seq));
        let batch = self.rep.batch(epoch, ops);
        let mut failed = Vec::new();
        let mut st = self.rep.state.lock();
        for m in targets {
            if let Err(e) = self.cluster.send(m, MIRROR, batch.clone()) {
                // Its link is down or far behind: stream and synchronisation start over.
                debug!(mirror = m, error = %e, "synchronisation batch not sent");
                failed.push(m);
                continue;
            }
            if let Some(s) = st.syncs.get_mut(&m) {
                s.sent = seq;
                s.done = done;
                if let Some(last) = last {
                    s.range.after = last;
                }
            }
        }
        drop(st);
        for m in failed {
            self.rep.link_down(m);
        }
    }
}

impl MirroredLog {
    fn send_pending(&self) {
        let (ops, targets, fresh, epoch) = {
            let mut st = self.rep.state.lock();
            if st.pending.is_empty() && st.fresh.is_empty() {
                return;
            }
            // Enqueues that publishes will wait for: when they were streamed.
            let waits = !st.in_sync.is_empty() || !st.expected.is_empty();
            let newer = st.waiting.back().is_none_or(|(id, _)| *id < st.top);
            if waits && newer && st.waiting.len() < WAITING_MAX && st.top > st.reported {
                let top = st.top;
                st.waiting.push_back((top, Instant::now()));
            }
            let ops = std::mem::take(&mut st.pending);
            let targets: Vec<NodeId> = st
                .mirrors
                .iter()
                .filter(|m| !st.down.contains(m))
                .copied()
                .collect();
            let fresh: HashSet<NodeId> = targets
                .iter()
                .filter(|m| st.fresh.contains(m))
                .copied()
                .collect();
            for m in &fresh {
                st.fresh.remove(m);
                st.syncs.remove(m);
            }
            (ops, targets, fresh, st.epoch)
        };
        if targets.is_empty() {
            return;
        }
        // Mirrors whose stream starts now get the same ops after a Reset (built only then).
        let reset = (!fresh.is_empty()).then(|| {
            let mut reset_ops = Vec::with_capacity(ops.len() + 1);
            reset_ops.push(MirrorOp::Reset);
            reset_ops.extend(ops.iter().cloned());
            self.rep.batch(epoch, reset_ops)
        });
        let batch = self.rep.batch(epoch, ops);
        let mut started = Vec::new();
        let mut failed = Vec::new();
        for m in targets {
            let b = match &reset {
                Some(reset) if fresh.contains(&m) => reset,
                _ => &batch,
            };
            match self.cluster.send(m, MIRROR, b.clone()) {
                Ok(()) if fresh.contains(&m) => started.push(m),
                Ok(()) => {}
                Err(e) => {
                    // The mirror misses this batch (its outbound queue is full: it is far
                    // behind): its copy has a gap, so its acks stop counting and its stream
                    // starts over with a Reset.
                    debug!(mirror = m, error = %e, "mirror batch not sent; its stream starts over");
                    failed.push(m);
                }
            }
        }
        if !started.is_empty() {
            // A stream that started now lacks what the queue already holds: automatic (or
            // requested) synchronisation sends it in batches from the next round on.
            let mut st = self.rep.state.lock();
            for m in started {
                if st.auto_sync || st.sync_requested.remove(&m) {
                    self.rep.start_sync(&mut st, m);
                }
            }
        }
        for m in failed {
            self.rep.link_down(m);
        }
    }
}

/// Every queue mastered on this node, for the acks of their mirrors.
pub struct Replication {
    cluster: Cluster,
    queues: Mutex<HashMap<QueueRef, Weak<QueueRep>>>,
    /// Peers whose link is down (a queue mastered later starts with them).
    down: Mutex<HashSet<NodeId>>,
}

impl Replication {
    pub fn start(cluster: Cluster) -> Arc<Replication> {
        let me = Arc::new(Replication {
            cluster: cluster.clone(),
            queues: Mutex::default(),
            down: Mutex::default(),
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
                        let reps = || -> Vec<Arc<QueueRep>> {
                            me.queues.lock().values().filter_map(Weak::upgrade).collect()
                        };
                        match ev {
                            Ok(warren_cluster::PeerEvent::Down(peer)) => {
                                me.down.lock().insert(peer);
                                for r in reps() {
                                    r.peer_down(peer);
                                }
                            }
                            Ok(warren_cluster::PeerEvent::Up(peer)) => {
                                me.down.lock().remove(&peer);
                                for r in reps() {
                                    r.peer_up(peer);
                                }
                            }
                            _ => {}
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
                    rep.ack(m.from, &a);
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
        // A queue with store events keeps persistent messages on disk.
        let durable = store_events.is_some();
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
            durable,
            state: Mutex::default(),
            events: tx,
        });
        rep.state.lock().down = self.down.lock().clone();
        rep.state.lock().seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
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

    fn rep(&self, queue: &QueueRef) -> Option<Arc<QueueRep>> {
        self.queues.lock().get(queue).and_then(Weak::upgrade)
    }

    /// Where `mirror` of the queue mastered here stands (all false for a queue not mastered
    /// here).
    pub fn progress(&self, queue: &QueueRef, mirror: NodeId) -> MirrorProgress {
        self.rep(queue)
            .map(|r| r.progress(mirror))
            .unwrap_or_default()
    }

    /// `ha-sync-mode` of the queue mastered here (automatic: true); turning it on starts
    /// synchronising every streamed mirror that is not synchronised yet.
    pub fn set_auto_sync(&self, queue: &QueueRef, auto: bool) {
        if let Some(r) = self.rep(queue) {
            let mut st = r.state.lock();
            if st.auto_sync != auto {
                st.auto_sync = auto;
                if auto {
                    Self::sync_unsynced(&r, &mut st);
                }
            }
        }
    }

    /// `sync_queue`: synchronise every mirror of the queue mastered here that is not in sync
    /// yet. False if the queue is not mastered here.
    pub fn sync_now(&self, queue: &QueueRef) -> bool {
        let Some(r) = self.rep(queue) else {
            return false;
        };
        let mut st = r.state.lock();
        Self::sync_unsynced(&r, &mut st);
        true
    }

    fn sync_unsynced(r: &QueueRep, st: &mut RepState) {
        let todo: Vec<NodeId> = st
            .mirrors
            .iter()
            .filter(|m| !st.in_sync.contains(m) && !st.syncs.contains_key(m))
            .copied()
            .collect();
        for m in todo {
            if st.fresh.contains(&m) {
                st.sync_requested.insert(m);
            } else {
                r.start_sync(st, m);
            }
        }
    }

    /// `cancel_sync_queue`: stops the synchronisations under way (the mirrors stay
    /// streamed, out of sync until the queue drains or a new sync).
    pub fn cancel_sync(&self, queue: &QueueRef) -> bool {
        let Some(r) = self.rep(queue) else {
            return false;
        };
        let mut st = r.state.lock();
        st.sync_requested.clear();
        st.syncs.retain(|_, s| s.complete());
        true
    }

    /// The controller is about to commit `mirror` into the in-sync set of the queue mastered
    /// here: publishes wait for it from now on. False if it no longer qualifies.
    pub fn expect(&self, queue: &QueueRef, mirror: NodeId) -> bool {
        self.rep(queue).is_some_and(|r| r.expect(mirror))
    }

    /// The commit announced with [`Replication::expect`] did not happen.
    pub fn unexpect(&self, queue: &QueueRef, mirror: NodeId) {
        if let Some(r) = self.rep(queue) {
            r.unexpect(mirror);
        }
    }

    /// In-sync (or about to be) mirrors of the queue mastered here that have not acknowledged
    /// an enqueue streamed more than `limit` ago (reachable, but their disk or process stalls):
    /// they count as if their link dropped (broken: the controller takes them out of the
    /// in-sync set, so they stop holding confirms back; their stream starts over). Returns
    /// them.
    pub fn drop_slow_mirrors(&self, queue: &QueueRef, limit: std::time::Duration) -> Vec<NodeId> {
        let Some(r) = self.rep(queue) else {
            return Vec::new();
        };
        let slow: Vec<NodeId> = {
            let st = r.state.lock();
            let Some(&(oldest, at)) = st.waiting.front() else {
                return Vec::new();
            };
            if at.elapsed() < limit {
                return Vec::new();
            }
            st.in_sync
                .iter()
                .chain(st.expected.iter())
                .filter(|m| !st.broken.contains(m))
                .filter(|m| st.acked.get(m).copied().unwrap_or(0) < oldest)
                .copied()
                .collect()
        };
        for m in &slow {
            tracing::warn!(queue = %queue.name, vhost = %queue.vhost, mirror = m, waited_ms = limit.as_millis() as u64, "a mirror acknowledged nothing for the failure-detection time: out of the in-sync set");
            r.link_down(*m);
        }
        slow
    }

    /// Whether `mirror` of the queue mastered here lost its link since it was in sync.
    pub fn broken(&self, queue: &QueueRef, mirror: NodeId) -> bool {
        self.queues
            .lock()
            .get(queue)
            .and_then(Weak::upgrade)
            .is_some_and(|r| r.state.lock().broken.contains(&mirror))
    }
}
