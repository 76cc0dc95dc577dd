//! The queue actor: owns the ready list, the unacked set and the consumer list of one queue.
//!
//! Invariants worth naming:
//! - a message id is in exactly one of `ready` or `unacked` (or settled and gone);
//! - `QueueInfo::message_count` mirrors `ready.len()` after every batch;
//! - a confirm for a publish is sent exactly once, decided by the queue's
//!   [`ConfirmTracker`](super::confirm::ConfirmTracker) (see there).

use super::args::Overflow;
use super::confirm::ConfirmTracker;
use super::ready::{Entry, Ready};
use super::*;
use crate::intmap::IntMap;
use crate::stats;
use crate::store::{QueueLog, StoreEvent};
use crate::vhost::Vhost;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use std::sync::Weak;
use tokio::time::{sleep_until, Instant};

/// Most deliveries per dispatch pass (and per event sent to one connection).
const DISPATCH_PASS: usize = 256;
/// Most bytes paged out per turn of the actor loop (more is paged in the next turns).
const PAGE_OUT_TURN: u64 = 16 << 20;

#[derive(Debug)]
struct Unacked {
    entry: Entry,
    /// Consumer key, None for basic.get.
    consumer: Option<u64>,
}

#[derive(Debug)]
struct Consumer {
    key: u64,
    spec: ConsumerSpec,
    unacked: u32,
    last_used: u64,
}

/// The actor. Created by the vhost, which keeps the [`QueueHandle`].
pub struct QueueActor {
    handle: QueueHandle,
    /// The settings in effect: the declared arguments resolved against the policies.
    args: QueueArgs,
    /// Quorum queues with a delivery limit: how often each requeued message was delivered.
    deliveries: IntMap<u64, u32>,
    vhost: Weak<Vhost>,
    ready: Ready,
    unacked: IntMap<u64, Unacked>,
    consumers: Vec<Consumer>,
    next_consumer_key: u64,
    use_counter: u64,
    next_id: u64,
    log: Box<dyn QueueLog>,
    /// The publisher confirms this queue owes.
    confirms: ConfirmTracker,
    /// Whether the queue delivered something since the last flush of the log.
    round_delivered: bool,
    /// Store events for a durable queue.
    store_rx: Option<mpsc::UnboundedReceiver<StoreEvent>>,
    had_consumers: bool,
    last_activity: Instant,
    deleted: bool,
    /// Page-out stopped at its per-turn limit with more to do.
    page_more: bool,
    /// The node started paging: page out once even if memory is already back below the
    /// threshold (the queue that crossed it may have paged its own messages first).
    paging_started: bool,
}

impl QueueActor {
    pub fn new(handle: QueueHandle, vhost: Weak<Vhost>, log: Box<dyn QueueLog>) -> Self {
        let label: Arc<str> = format!("'{}' in vhost '{}'", handle.name, handle.vhost).into();
        let ready = Ready::new(handle.args.max_priority, crate::paging::pager(label));
        handle.policy_changed.store(false, Ordering::Relaxed);
        let args = handle.policy().args.clone();
        Self {
            args,
            deliveries: IntMap::default(),
            handle,
            vhost,
            ready,
            unacked: IntMap::default(),
            consumers: Vec::new(),
            next_consumer_key: 1,
            use_counter: 0,
            next_id: 1,
            log,
            confirms: ConfirmTracker::default(),
            round_delivered: false,
            store_rx: None,
            had_consumers: false,
            last_activity: Instant::now(),
            deleted: false,
            page_more: false,
            paging_started: false,
        }
    }

    /// Takes the store's events for this queue and the messages recovered from disk (queue
    /// order; unacked ones before the restart come back redelivered).
    pub fn recover(
        mut self,
        events: mpsc::UnboundedReceiver<StoreEvent>,
        recovered: Vec<crate::store::Recovered>,
    ) -> Self {
        self.store_rx = Some(events);
        let now = Instant::now();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for r in recovered {
            self.next_id = self.next_id.max(r.id + 1);
            let expires_at = r
                .expires_at_ms
                .map(|t| now + std::time::Duration::from_millis(t.saturating_sub(now_ms)));
            self.ready.requeue(Entry {
                id: r.id,
                msg: r.msg,
                redelivered: r.redelivered,
                expires_at,
            });
        }
        self.publish_counts();
        self
    }

    /// Runs until the queue is deleted or every handle is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let mut store_rx = self.store_rx.take();
        let mut paging_rx = crate::paging::subscribe();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                ev = async {
                    match store_rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match ev {
                        Some(ev) => self.handle_store_event(ev),
                        None => store_rx = None,
                    }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let now = Instant::now();
                    self.handle_cmd(cmd, now);
                    let mut n = 0;
                    while !self.deleted && n < 256 {
                        match rx.try_recv() {
                            Ok(cmd) => self.handle_cmd(cmd, now),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
                // Paging turned on (maybe off again already): an idle queue pages out too.
                r = paging_rx.changed() => {
                    match r {
                        Ok(()) => {
                            paging_rx.borrow_and_update();
                            self.paging_started = true;
                        }
                        Err(_) => paging_rx = crate::paging::subscribe(),
                    }
                }
            }
            if self.deleted {
                break;
            }
            let now = Instant::now();
            if self.handle.policy_changed.swap(false, Ordering::Acquire) {
                self.apply_policy(now);
            }
            self.dispatch(now);
            if self.deleted {
                break;
            }
            self.expire(now);
            self.page(now);
            if self.check_idle_expiry(now) {
                self.delete_now();
                break;
            }
            self.publish_counts();
            // Last, once this round's deliveries are handed to their connections (if the log
            // syncs on this thread, another runtime thread sends them meanwhile).
            let woke = std::mem::take(&mut self.round_delivered);
            self.log.flush(rx.is_empty(), woke);
        }
        // Answer what is still queued so nobody waits forever.
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                QueueCmd::Publish {
                    confirm: Some(t), ..
                } => self.confirms.gone(t),
                QueueCmd::PublishBatch(items) => {
                    for (_, t) in items {
                        if let Some(t) = t {
                            self.confirms.gone(t);
                        }
                    }
                }
                QueueCmd::Consume { reply, .. } => {
                    let _ = reply.send(Err(self.not_found()));
                }
                QueueCmd::Delete {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.send(Ok(0));
                }
                _ => {}
            }
        }
        // Failed writes not handled yet: their publishes still get their nacks (after the
        // close, the store nacks them itself).
        if let Some(srx) = store_rx.as_mut() {
            srx.close();
            while let Ok(ev) = srx.try_recv() {
                if let StoreEvent::WriteFailed { ids, tickets } = ev {
                    for t in self.confirms.disk_failed(&ids, tickets) {
                        t.send(false);
                    }
                }
            }
        }
        stats::queue_gone(&self.handle.stats);
        stats::churn(&stats::CHURN.queue_deleted);
    }

    fn not_found(&self) -> ChannelError {
        ChannelError::not_found(format!(
            "no queue '{}' in vhost '{}'",
            self.handle.name, self.handle.vhost
        ))
    }

    /// Pages ready messages out under memory pressure; settles what could not be read back.
    fn page(&mut self, now: Instant) {
        let started = std::mem::take(&mut self.paging_started);
        self.page_more = (crate::paging::pressure() || started || self.page_more)
            && self.ready.page_out(PAGE_OUT_TURN, now);
        let lost = self.ready.take_lost();
        if !lost.is_empty() {
            self.log.settle(&lost);
        }
    }

    fn publish_counts(&self) {
        self.handle
            .message_count
            .store(self.ready.len as u32, Ordering::Relaxed);
        let st = &self.handle.stats;
        st.paged_out
            .store(self.ready.paged_len as u64, Ordering::Relaxed);
        st.paged_out_bytes
            .store(self.ready.paged_bytes, Ordering::Relaxed);
        st.unacked
            .store(self.unacked.len() as u64, Ordering::Relaxed);
        st.ready_bytes.store(self.ready.bytes, Ordering::Relaxed);
        self.handle
            .consumer_count
            .store(self.consumers.len() as u32, Ordering::Relaxed);
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.page_more {
            return Some(Instant::now());
        }
        let mut d = self.ready.next_expiry();
        if let Some(ms) = self.args.expires {
            if self.consumers.is_empty() {
                let t = self.last_activity + std::time::Duration::from_millis(ms);
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        }
        d
    }

    fn check_idle_expiry(&self, now: Instant) -> bool {
        match self.args.expires {
            Some(ms) if self.consumers.is_empty() => {
                now >= self.last_activity + std::time::Duration::from_millis(ms)
            }
            _ => false,
        }
    }

    fn handle_cmd(&mut self, cmd: QueueCmd, now: Instant) {
        match cmd {
            QueueCmd::Publish { msg, confirm } => self.publish(msg, confirm, now),
            QueueCmd::PublishBatch(items) => {
                for (msg, confirm) in items {
                    self.publish(msg, confirm, now);
                }
            }
            QueueCmd::Consume { spec, reply } => {
                let r = self.consume(spec, now);
                let _ = reply.send(r);
            }
            QueueCmd::Cancel {
                conn_id,
                channel,
                generation,
                tag,
            } => self.cancel(conn_id, channel, generation, &tag, now),
            QueueCmd::Ack { ids } => self.ack(&ids),
            QueueCmd::Reject { ids, requeue } => self.reject(&ids, requeue, now),
            QueueCmd::Get { no_ack, reply } => {
                self.last_activity = now;
                let r = self.get(no_ack, now);
                self.publish_counts();
                let _ = reply.send(r);
            }
            QueueCmd::Purge { reply } => {
                let ids = self.ready.drain_ids();
                for id in &ids {
                    self.forget_deliveries(*id);
                }
                self.log.settle(&ids);
                self.publish_counts();
                let _ = reply.send(ids.len() as u32);
            }
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let r = if if_unused && !self.consumers.is_empty() {
                    Err(ChannelError::precondition_failed(format!(
                        "queue '{}' in vhost '{}' in use",
                        self.handle.name, self.handle.vhost
                    )))
                } else if if_empty && self.ready.len > 0 {
                    Err(ChannelError::precondition_failed(format!(
                        "queue '{}' in vhost '{}' is not empty",
                        self.handle.name, self.handle.vhost
                    )))
                } else {
                    let n = self.ready.len as u32;
                    self.delete_now();
                    Ok(n)
                };
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            QueueCmd::Touch => self.last_activity = now,
            QueueCmd::Kick => {}
        }
    }

    fn handle_store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Synced { up_to } => self.confirms.disk_synced(up_to),
            StoreEvent::WriteFailed { ids, tickets } => {
                let nack = self.confirms.disk_failed(&ids, tickets);
                // Nacked: the publisher keeps responsibility, so the copy here goes unless a
                // consumer already has it; the nacks go once it is gone and counted out.
                for id in ids {
                    self.ready.remove_id(id);
                }
                self.publish_counts();
                for t in nack {
                    t.send(false);
                }
            }
        }
    }

    fn is_full(&self, extra_bytes: u64) -> bool {
        let a = &self.args;
        a.max_length.is_some_and(|m| self.ready.len as u64 >= m)
            || a.max_length_bytes
                .is_some_and(|m| self.ready.bytes + extra_bytes > m)
    }

    fn over_limit(&self) -> bool {
        let a = &self.args;
        a.max_length.is_some_and(|m| self.ready.len as u64 > m)
            || a.max_length_bytes.is_some_and(|m| self.ready.bytes > m)
    }

    fn publish(&mut self, msg: Arc<Message>, confirm: Option<ConfirmTicket>, now: Instant) {
        if self.deleted {
            // Deleted earlier in this batch: dropped like any publish to a deleted queue.
            if let Some(t) = confirm {
                self.confirms.gone(t);
            }
            return;
        }
        let overflow = self.args.overflow;
        if overflow != Overflow::DropHead && self.is_full(msg.body.len() as u64) {
            if let Some(t) = confirm {
                self.confirms.refuse(t);
            }
            if overflow == Overflow::RejectPublishDlx {
                self.dead_letter(&msg, "maxlen");
            }
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let ttl = match (self.args.message_ttl, msg.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expires_at = ttl.map(|ms| now + std::time::Duration::from_millis(ms));
        match confirm {
            Some(t) => self.confirms.enqueue(&mut *self.log, id, &msg, ttl, t),
            None => {
                self.log.enqueue(id, &msg, ttl);
            }
        }
        self.ready.push_back(Entry {
            id,
            msg,
            redelivered: false,
            expires_at,
        });
        stats::bump(&self.handle.stats.publish, 1);
        self.drop_over_limit();
        self.dispatch(now);
    }

    /// With drop-head overflow, drops (or dead-letters) the oldest ready messages while the
    /// queue is over its length limits.
    fn drop_over_limit(&mut self) {
        if self.args.overflow != Overflow::DropHead {
            return;
        }
        while self.over_limit() {
            let load = self.args.dead_letter_exchange.is_some();
            match self.ready.pop_oldest(load) {
                Some(p) => {
                    if let Some(m) = &p.msg {
                        self.dead_letter(m, "maxlen");
                    }
                    self.log.settle(&[p.id]);
                }
                None => break,
            }
        }
    }

    /// New policies apply: take the settings, and a queue now over its (lower) length limit
    /// drops or dead-letters its oldest messages, as RabbitMQ does. TTL changes apply to
    /// messages published from now on, `expires` restarts from the last activity.
    fn apply_policy(&mut self, _now: Instant) {
        self.args = self.handle.policy().args.clone();
        if self.args.delivery_limit.is_none() {
            self.deliveries.clear();
        }
        self.drop_over_limit();
        self.publish_counts();
    }

    fn consume(&mut self, spec: ConsumerSpec, now: Instant) -> Result<(), ChannelError> {
        let in_use = || {
            ChannelError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.handle.name, self.handle.vhost
            ))
        };
        if self.consumers.iter().any(|c| c.spec.exclusive) {
            return Err(in_use());
        }
        if spec.exclusive && !self.consumers.is_empty() {
            return Err(in_use());
        }
        self.last_activity = now;
        self.had_consumers = true;
        let key = self.next_consumer_key;
        self.next_consumer_key += 1;
        self.consumers.push(Consumer {
            key,
            spec,
            unacked: 0,
            last_used: 0,
        });
        self.publish_counts();
        self.dispatch(now);
        Ok(())
    }

    fn cancel(&mut self, conn_id: u64, channel: u16, generation: u64, tag: &str, now: Instant) {
        let before = self.consumers.len();
        self.consumers.retain(|c| {
            !(c.spec.conn_id == conn_id
                && c.spec.channel == channel
                && c.spec.generation == generation
                && &*c.spec.tag == tag)
        });
        if self.consumers.len() != before {
            self.consumers_left(now);
        }
        self.publish_counts();
    }

    /// Consumers went away (cancelled, or their connection is gone): an auto-delete queue goes
    /// with its last consumer, whatever it holds (RabbitMQ semantics).
    fn consumers_left(&mut self, now: Instant) {
        self.last_activity = now;
        if self.consumers.is_empty() && self.handle.auto_delete && self.had_consumers {
            self.delete_now();
        }
    }

    fn ack(&mut self, ids: &[u64]) {
        let mut n = 0;
        for id in ids {
            if let Some(u) = self.unacked.remove(id) {
                self.release_consumer(u.consumer);
                self.forget_deliveries(*id);
                n += 1;
            }
        }
        stats::bump(&self.handle.stats.ack, n);
        self.log.settle(ids);
    }

    fn release_consumer(&mut self, key: Option<u64>) {
        if let Some(key) = key {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.key == key) {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
    }

    fn reject(&mut self, ids: &[u64], requeue: bool, _now: Instant) {
        let mut requeued = Vec::new();
        for id in ids {
            let Some(u) = self.unacked.remove(id) else {
                continue;
            };
            self.release_consumer(u.consumer);
            let mut e = u.entry;
            if requeue && self.over_delivery_limit(e.id) {
                // A quorum queue's delivery limit: dropped or dead-lettered instead, as
                // RabbitMQ's quorum queues do.
                self.dead_letter(&e.msg, "delivery_limit");
                self.log.settle(&[e.id]);
            } else if requeue {
                e.redelivered = true;
                requeued.push(e.id);
                self.ready.requeue(e);
            } else {
                self.forget_deliveries(e.id);
                self.dead_letter(&e.msg, "rejected");
                self.log.settle(&[e.id]);
            }
        }
        if !requeued.is_empty() {
            self.log.requeue(&requeued);
        }
    }

    /// Counts one more return of a delivered message; true when that takes it past the
    /// queue's delivery limit (quorum queues only, as in RabbitMQ).
    fn over_delivery_limit(&mut self, id: u64) -> bool {
        let Some(limit) = self.args.delivery_limit.filter(|_| self.args.quorum) else {
            return false;
        };
        let n = self.deliveries.entry(id).or_insert(0);
        *n += 1;
        if u64::from(*n) > limit {
            self.deliveries.remove(&id);
            return true;
        }
        false
    }

    fn forget_deliveries(&mut self, id: u64) {
        if !self.deliveries.is_empty() {
            self.deliveries.remove(&id);
        }
    }

    fn get(&mut self, no_ack: bool, now: Instant) -> Option<GetResult> {
        let h = self.handle.clone();
        let st = &h.stats;
        loop {
            let Some(e) = self.ready.pop_front() else {
                stats::bump(&st.get_empty, 1);
                return None;
            };
            if e.expires_at.is_some_and(|t| t <= now) {
                self.dead_letter(&e.msg, "expired");
                self.log.settle(&[e.id]);
                continue;
            }
            let r = GetResult {
                msg_id: e.id,
                msg: e.msg.clone(),
                redelivered: e.redelivered,
                remaining: self.ready.len as u32,
            };
            stats::bump(if no_ack { &st.get_no_ack } else { &st.get }, 1);
            stats::bump(&st.redeliver, u64::from(e.redelivered));
            if no_ack {
                self.log.settle(&[e.id]);
            } else {
                self.log.delivered(&[e.id]);
                self.unacked.insert(
                    e.id,
                    Unacked {
                        entry: e,
                        consumer: None,
                    },
                );
            }
            return Some(r);
        }
    }

    /// Index of the consumer that should get the next message, if any has credit.
    fn pick_consumer(&mut self) -> Option<usize> {
        let sac = self.args.single_active_consumer;
        let mut best: Option<usize> = None;
        for (i, c) in self.consumers.iter().enumerate() {
            if sac && i > 0 {
                break;
            }
            if !c.spec.chan.flow_active.load(Ordering::Relaxed) {
                continue;
            }
            if c.spec.conn.pending.load(Ordering::Relaxed) >= CONN_PENDING_LIMIT {
                c.spec.conn.starved.store(true, Ordering::Relaxed);
                continue;
            }
            if !c.spec.no_ack && c.spec.prefetch > 0 && c.unacked >= c.spec.prefetch as u32 {
                continue;
            }
            if !c.spec.no_ack {
                let g = &c.spec.chan;
                let limit = g.global_limit.load(Ordering::Relaxed);
                if limit > 0 && g.global_unacked.load(Ordering::Relaxed) >= limit {
                    continue;
                }
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let cb = &self.consumers[b];
                    if c.spec.priority > cb.spec.priority
                        || (c.spec.priority == cb.spec.priority && c.last_used < cb.last_used)
                    {
                        Some(i)
                    } else {
                        Some(b)
                    }
                }
            };
        }
        best
    }

    /// Delivers ready messages to consumers with credit, in passes of at most
    /// [`DISPATCH_PASS`] deliveries; each pass sends one event per connection.
    fn dispatch(&mut self, now: Instant) {
        loop {
            let delivered = self.dispatch_pass(now);
            self.round_delivered |= delivered > 0;
            if delivered < DISPATCH_PASS {
                break;
            }
        }
    }

    fn dispatch_pass(&mut self, now: Instant) -> usize {
        let mut outbox: Vec<(usize, Vec<Delivery>)> = Vec::new();
        let mut delivered = 0;
        let mut to_ack: Vec<u64> = Vec::new();
        while delivered < DISPATCH_PASS && self.ready.len > 0 && !self.consumers.is_empty() {
            let Some(ci) = self.pick_consumer() else {
                break;
            };
            if !self.consumers[ci].spec.no_ack && !self.consumers[ci].spec.chan.try_take_global() {
                // Lost a race with another queue for channel-wide credit.
                break;
            }
            let Some(e) = self.ready.pop_front() else {
                break;
            };
            if e.expires_at.is_some_and(|t| t <= now) {
                if !self.consumers[ci].spec.no_ack {
                    self.consumers[ci].spec.chan.release_global(1);
                }
                self.dead_letter(&e.msg, "expired");
                self.log.settle(&[e.id]);
                continue;
            }
            self.use_counter += 1;
            let c = &mut self.consumers[ci];
            c.last_used = self.use_counter;
            let delivery = Delivery {
                channel: c.spec.channel,
                generation: c.spec.generation,
                consumer_tag: c.spec.tag.clone(),
                queue: Some(self.handle.clone()),
                msg_id: e.id,
                msg: e.msg.clone(),
                redelivered: e.redelivered,
                no_ack: c.spec.no_ack,
            };
            // Counted now so pick_consumer sees this pass's deliveries too.
            c.spec.conn.pending.fetch_add(1, Ordering::Relaxed);
            let st = &self.handle.stats;
            stats::bump(
                if c.spec.no_ack {
                    &st.deliver_no_ack
                } else {
                    &st.deliver
                },
                1,
            );
            stats::bump(&st.redeliver, u64::from(e.redelivered));
            if c.spec.no_ack {
                self.log.settle(&[e.id]);
            } else {
                c.unacked += 1;
                to_ack.push(e.id);
                let key = c.key;
                self.unacked.insert(
                    e.id,
                    Unacked {
                        entry: e,
                        consumer: Some(key),
                    },
                );
            }
            delivered += 1;
            match outbox.iter_mut().find(|(i, _)| {
                Arc::ptr_eq(&self.consumers[*i].spec.conn, &self.consumers[ci].spec.conn)
            }) {
                Some((_, v)) => v.push(delivery),
                None => outbox.push((ci, vec![delivery])),
            }
        }
        if !to_ack.is_empty() {
            self.log.delivered(&to_ack);
        }
        let mut dead_conns = Vec::new();
        for (ci, mut batch) in outbox {
            let spec = &self.consumers[ci].spec;
            let ev = if batch.len() == 1 {
                match batch.pop() {
                    Some(d) => ClientEvent::Deliver(d),
                    None => continue,
                }
            } else {
                ClientEvent::Deliveries(batch)
            };
            if let Err(mpsc::error::SendError(ev)) = spec.events.send(ev) {
                // Connection gone: take back what was meant for it.
                let lost = match ev {
                    ClientEvent::Deliver(d) => vec![d],
                    ClientEvent::Deliveries(v) => v,
                    _ => Vec::new(),
                };
                spec.conn.pending.fetch_sub(lost.len(), Ordering::Relaxed);
                let ids: Vec<u64> = lost
                    .iter()
                    .filter(|d| !d.no_ack)
                    .map(|d| d.msg_id)
                    .collect();
                dead_conns.push(spec.conn.clone());
                for id in ids {
                    if let Some(u) = self.unacked.remove(&id) {
                        let mut e = u.entry;
                        e.redelivered = false;
                        self.ready.requeue(e);
                    }
                }
            }
        }
        if !dead_conns.is_empty() {
            // The connection ended before its cancel reached us: the cancel will find nothing
            // to remove, so the auto-delete check must happen here.
            self.consumers
                .retain(|c| !dead_conns.iter().any(|d| Arc::ptr_eq(d, &c.spec.conn)));
            self.consumers_left(now);
            if self.deleted {
                return 0;
            }
        }
        delivered
    }

    /// Drops expired messages at the head of each level (RabbitMQ expires only at the head).
    /// A paged message is read back only to be dead-lettered.
    fn expire(&mut self, now: Instant) {
        let load = self.args.dead_letter_exchange.is_some();
        for l in 0..self.ready.levels() {
            while let Some(p) = self.ready.pop_expired(l, now, load) {
                if let Some(m) = &p.msg {
                    self.dead_letter(m, "expired");
                }
                self.log.settle(&[p.id]);
            }
        }
    }

    fn delete_now(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        for c in self.consumers.drain(..) {
            let _ = c.spec.events.send(ClientEvent::Cancelled {
                channel: c.spec.channel,
                generation: c.spec.generation,
                tag: c.spec.tag.clone(),
            });
        }
        self.confirms.queue_deleted();
        self.log.delete();
        if let Some(v) = self.vhost.upgrade() {
            v.remove_queue(&self.handle);
        }
        self.publish_counts();
    }

    /// Republishes `msg` to the dead-letter exchange with an x-death record.
    fn dead_letter(&mut self, msg: &Arc<Message>, reason: &str) {
        let Some(dlx) = self.args.dead_letter_exchange.clone() else {
            return;
        };
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let rk = self
            .args
            .dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| msg.routing_key.to_string());
        let mut headers = msg.properties.headers().clone().unwrap_or_default();
        let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
            _ => Vec::new(),
        };
        let qname: &str = &self.handle.name;
        let same = |t: &FieldTable| {
            matches!(t.inner().get("queue"), Some(AMQPValue::LongString(q)) if q.as_bytes() == qname.as_bytes())
                && matches!(t.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == reason.as_bytes())
        };
        let existing = deaths
            .iter()
            .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)));
        // A cycle without any rejection would loop forever: drop, as RabbitMQ does.
        if existing.is_some() && reason != "rejected" {
            let cycle_free = deaths.iter().any(|d| {
                matches!(d, AMQPValue::FieldTable(t)
                    if matches!(t.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"rejected"))
            });
            if !cycle_free {
                return;
            }
        }
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let entry = match existing {
            Some(i) => {
                let mut t = match deaths.remove(i) {
                    AMQPValue::FieldTable(t) => t,
                    _ => FieldTable::default(),
                };
                let count = t.inner().get("count").and_then(args::as_i64).unwrap_or(0);
                t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
                t.insert("time".into(), AMQPValue::Timestamp(now_secs));
                t
            }
            None => {
                let mut t = FieldTable::default();
                t.insert("count".into(), AMQPValue::LongLongInt(1));
                t.insert("reason".into(), AMQPValue::LongString(reason.into()));
                t.insert("queue".into(), AMQPValue::LongString(qname.into()));
                t.insert("time".into(), AMQPValue::Timestamp(now_secs));
                t.insert(
                    "exchange".into(),
                    AMQPValue::LongString(msg.exchange.as_str().into()),
                );
                let mut keys = FieldArray::default();
                keys.push(AMQPValue::LongString(msg.routing_key.as_str().into()));
                t.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
                if let Some(exp) = msg.properties.expiration() {
                    t.insert(
                        "original-expiration".into(),
                        AMQPValue::LongString(exp.as_str().into()),
                    );
                }
                t
            }
        };
        deaths.insert(0, AMQPValue::FieldTable(entry));
        headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
        for (k, v) in [
            ("x-first-death-queue", qname),
            ("x-first-death-reason", reason),
            ("x-first-death-exchange", msg.exchange.as_str()),
        ] {
            if !headers.contains_key(k) {
                headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
            }
        }
        let mut props = msg.properties.clone().with_headers(headers);
        if props.expiration().is_some() {
            // Drop the per-message TTL so the dead-lettered copy does not expire again at once.
            props = strip_expiration(props);
        }
        let Ok(new) = Message::new(
            dlx.as_str().into(),
            rk.as_str().into(),
            props,
            msg.body.clone(),
        ) else {
            return;
        };
        let new = Arc::new(new);
        let mut targets = Vec::new();
        vhost.route(&dlx, &rk, new.properties.headers().as_ref(), &mut targets);
        for q in targets {
            let cmd = QueueCmd::Publish {
                msg: new.clone(),
                confirm: None,
            };
            if let Err(mpsc::error::TrySendError::Full(cmd)) = q.tx.try_send(cmd) {
                // Never block one queue on another: hand the send to a task.
                let q = q.clone();
                tokio::spawn(async move {
                    let _ = q.tx.send(cmd).await;
                });
            }
        }
    }
}

fn strip_expiration(p: AMQPProperties) -> AMQPProperties {
    // AMQPProperties has no setter to clear a field: rebuild without expiration.
    let mut n = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        n = n.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        n = n.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        n = n.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        n = n.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        n = n.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        n = n.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        n = n.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        n = n.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        n = n.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        n = n.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        n = n.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        n = n.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        n = n.with_cluster_id(v.clone());
    }
    n
}
