//! The queue core: the state machine of one queue (its ready list, unacked set, consumers and
//! confirms), sans-io. It takes commands, store events and the time, and returns [`Effect`]s
//! (deliveries and cancellations for connections, dead-lettered copies to route, its own
//! deletion) for the actor shell (`actor.rs`) to carry out; it never reads the clock, spawns
//! or touches a socket. Its log ([`QueueLog`]) and page files are dependencies handed in.
//!
//! Invariants worth naming:
//! - a message id is in exactly one of `ready` or `unacked` (or settled and gone);
//! - `QueueInfo::message_count` mirrors `ready.len()` after every batch;
//! - a confirm for a publish is sent exactly once, decided by the queue's
//!   [`ConfirmTracker`](super::confirm::ConfirmTracker) (see there).

use super::activity::ConsumerUse;
use super::args::Overflow;
use super::confirm::ConfirmTracker;
use super::flow::FlowGate;
use super::ready::Pager;
use super::ready::{Entry, Ready};
use super::*;
use crate::intmap::IntMap;
use crate::stats;
use crate::store::{QueueLog, StoreEvent, SyncMsg};
use tokio::time::Instant;

/// Most deliveries per dispatch pass (and per event sent to one connection).
const DISPATCH_PASS: usize = 256;
/// Most bytes paged out per turn of the actor loop (more is paged in the next turns).
const PAGE_OUT_TURN: u64 = 16 << 20;
/// Most messages and body bytes (at least one message) per batch of a mirror's
/// synchronisation; the next batch goes when the mirror has applied this one.
const SYNC_BATCH: usize = 4096;
const SYNC_BATCH_BYTES: u64 = 8 << 20;

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
    /// channel.flow of the consumer's channel (values from the channel, `QueueCmd::Flow`).
    flow_active: bool,
}

/// What the shell must do after a call into the core, in order.
#[derive(Debug)]
pub enum Effect {
    /// Deliveries for one connection, as one event. If the connection is gone, hand them back
    /// with [`QueueCore::undeliverable`].
    Deliver {
        events: ClientTx,
        conn: Arc<ConnShared>,
        deliveries: Vec<Delivery>,
    },
    /// A server-side basic.cancel for a consumer of the queue.
    Cancelled {
        events: ClientTx,
        channel: u16,
        generation: u64,
        tag: Arc<str>,
    },
    /// A dead-lettered copy, to route through the vhost by its exchange and routing key.
    DeadLetter(Arc<Message>),
    /// The queue deleted itself: it goes from its vhost.
    Deleted,
}

/// The core of one queue. Made by the actor, which keeps the [`QueueHandle`] in the vhost.
pub struct QueueCore {
    handle: QueueHandle,
    /// The settings in effect: the declared arguments resolved against the policies.
    args: QueueArgs,
    /// Quorum queues: how often each message was returned (`x-delivery-count`, counted
    /// against the delivery limit). Only messages returned at least once are in it.
    deliveries: IntMap<u64, u32>,
    ready: Ready,
    unacked: IntMap<u64, Unacked>,
    /// Body bytes of `unacked`.
    unacked_bytes: u64,
    consumers: Vec<Consumer>,
    next_consumer_key: u64,
    use_counter: u64,
    next_id: u64,
    log: Box<dyn QueueLog>,
    /// The publisher confirms this queue owes.
    confirms: ConfirmTracker,
    /// Whether the queue delivered something since the last flush of the log.
    round_delivered: bool,
    /// What the shell has to do, in order.
    effects: Vec<Effect>,
    /// The time of the current call, and a wall-clock reading at a known instant: x-death
    /// records carry Unix times, and the core reads no clock of its own.
    now: Instant,
    wall: (Instant, u64),
    had_consumers: bool,
    /// The last use of the queue by a client (x-expires counts from it).
    last_activity: Instant,
    /// The last work of any kind (commands, deliveries): the API's `idle_since`.
    last_busy: Instant,
    /// Whether consumers can take messages as they come (the API's consumer capacity), and
    /// the value last published to the handle.
    consumer_use: ConsumerUse,
    published_use: Option<ConsumerUse>,
    deleted: bool,
    /// Page-out stopped at its per-turn limit with more to do.
    page_more: bool,
    /// Publishers blocked while the consumers cannot keep up (see [`super::flow`]).
    flow: FlowGate,
    /// The node started paging: page out once even if memory is already back below the
    /// threshold (the queue that crossed it may have paged its own messages first).
    paging_started: bool,
}

impl QueueCore {
    /// A core for `handle`'s queue, writing to `log`, paging to `pager` (None: never pages).
    pub fn new(
        handle: QueueHandle,
        log: Box<dyn QueueLog>,
        pager: Option<Pager>,
        now: Instant,
        now_unix_ms: u64,
    ) -> Self {
        let ready = Ready::new(handle.args.max_priority, pager);
        handle.policy_changed.store(false, Ordering::Relaxed);
        let args = handle.policy().args.clone();
        Self {
            args,
            deliveries: IntMap::default(),
            handle,
            ready,
            unacked: IntMap::default(),
            unacked_bytes: 0,
            consumers: Vec::new(),
            next_consumer_key: 1,
            use_counter: 0,
            next_id: 1,
            log,
            confirms: ConfirmTracker::default(),
            round_delivered: false,
            effects: Vec::new(),
            now,
            wall: (now, now_unix_ms),
            had_consumers: false,
            last_activity: now,
            last_busy: now,
            consumer_use: ConsumerUse::new(now),
            published_use: None,
            deleted: false,
            page_more: false,
            paging_started: false,
            flow: FlowGate::default(),
        }
    }

    /// Takes the messages recovered from disk (queue order; unacked ones before the restart
    /// come back redelivered). `now_ms`: the wall clock now, for stored expiry times.
    pub fn recover(
        mut self,
        recovered: Vec<crate::store::Recovered>,
        now: Instant,
        now_ms: u64,
    ) -> Self {
        for r in recovered {
            self.next_id = self.next_id.max(r.id + 1);
            let expires_at = r
                .expires_at_ms
                .map(|t| now + std::time::Duration::from_millis(t.saturating_sub(now_ms)));
            if r.redelivered && self.args.quorum {
                // Delivered before the restart and not acknowledged: returned once (the
                // counts themselves are not stored).
                self.deliveries.insert(r.id, 1);
            }
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

    /// The queue deleted itself (or was deleted); the shell stops.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// The effects of the calls so far, in order, for the shell to carry out.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The queue's log (the shell flushes it after each turn).
    pub fn log_mut(&mut self) -> &mut dyn QueueLog {
        &mut *self.log
    }

    /// Whether the queue delivered something since the last call.
    pub fn take_round_delivered(&mut self) -> bool {
        std::mem::take(&mut self.round_delivered)
    }

    /// The node started paging: page out once at the next turn even if memory is already back
    /// below the threshold (the queue that crossed it may have paged its own messages first).
    pub fn paging_started(&mut self) {
        self.paging_started = true;
    }

    /// Work that follows commands and time: new policies, deliveries, expiry, page-out, the
    /// idle expiry of the queue itself, the counters the API reads. `pressure`: the node is
    /// above its paging threshold.
    pub fn turn(&mut self, now: Instant, pressure: bool) {
        self.now = now;
        if self.deleted {
            return;
        }
        if self.handle.policy_changed.swap(false, Ordering::Acquire) {
            self.apply_policy(now);
        }
        self.dispatch(now);
        if self.deleted {
            return;
        }
        self.expire(now);
        self.page(now, pressure);
        if self.check_idle_expiry(now) {
            self.delete_now();
            return;
        }
        self.update_flow();
        self.publish_counts();
    }

    /// Closes or opens the flow gate on what the consumers can take now (see [`super::flow`]).
    fn update_flow(&mut self) {
        let backlog = self.ready.len;
        if backlog < super::flow::BACKLOG_LOW && !self.flow.is_closed() {
            return;
        }
        let mut ready = false;
        let mut held = false;
        for c in &self.consumers {
            if !c.flow_active
                || (!c.spec.no_ack && c.spec.prefetch > 0 && c.unacked >= c.spec.prefetch as u32)
            {
                continue;
            }
            if c.spec.conn.pending.load(Ordering::Relaxed) >= CONN_PENDING_LIMIT {
                held = true;
            } else {
                ready = true;
            }
            if self.args.single_active_consumer {
                break;
            }
        }
        self.flow.update(backlog, ready, held);
    }

    /// `n` messages from `from` were taken in: its credit back, and blocked if the queue is
    /// delivery-bound (looked at after each command, so that a publisher is held back as soon
    /// as the backlog crosses the mark, not a whole mailbox later).
    fn publisher_flow(&mut self, from: Option<Arc<ConnShared>>, n: usize) {
        let Some(from) = from else { return };
        from.flow.taken(n);
        self.update_flow();
        self.flow.on_publish(Some(&from));
    }

    /// How many publishing connections this queue blocks now.
    pub fn blocked_publishers(&self) -> usize {
        self.flow.blocked()
    }

    /// The error for a command that reached a queue that is gone.
    pub fn not_found(&self) -> ChannelError {
        ChannelError::not_found(format!(
            "no queue '{}' in vhost '{}'",
            self.handle.name, self.handle.vhost
        ))
    }

    /// Pages ready messages out under memory pressure; settles what could not be read back.
    fn page(&mut self, now: Instant, pressure: bool) {
        let started = std::mem::take(&mut self.paging_started);
        self.page_more =
            (pressure || started || self.page_more) && self.ready.page_out(PAGE_OUT_TURN, now);
        let lost = self.ready.take_lost();
        if !lost.is_empty() {
            self.settle(&lost);
        }
    }

    fn publish_counts(&mut self) {
        self.handle
            .message_count
            .store(self.ready.len as u32, Ordering::Relaxed);
        let act = &self.handle.activity;
        act.unacked_bytes
            .store(self.unacked_bytes, Ordering::Relaxed);
        act.busy_at_ms
            .store(self.unix_ms(self.last_busy).max(1), Ordering::Relaxed);
        if self.published_use != Some(self.consumer_use) {
            act.set_use(self.consumer_use);
            self.published_use = Some(self.consumer_use);
        }
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

    /// When the queue next has something to do by itself (a message to expire, its own idle
    /// expiry, more to page out: `now`), if ever.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        if self.page_more {
            return Some(now);
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

    /// One command from the queue's mailbox.
    pub(crate) fn command(&mut self, cmd: QueueCmd, now: Instant) {
        self.now = now;
        if !matches!(cmd, QueueCmd::Kick) {
            self.last_busy = now;
        }
        match cmd {
            QueueCmd::Publish { msg, confirm, from } => {
                self.publish(msg, confirm, now);
                self.publisher_flow(from, 1);
            }
            QueueCmd::PublishBatch(items, from) => {
                let n = items.len();
                for (msg, confirm) in items {
                    self.publish(msg, confirm, now);
                }
                self.publisher_flow(from, n);
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
            QueueCmd::Prefetch { consumer, prefetch } => {
                if let Some(c) = self.consumers.iter_mut().find(|c| {
                    c.spec.conn_id == consumer.conn_id
                        && c.spec.channel == consumer.channel
                        && c.spec.generation == consumer.generation
                        && c.spec.tag == consumer.tag
                }) {
                    c.spec.prefetch = prefetch;
                }
            }
            QueueCmd::Flow {
                conn_id,
                channel,
                generation,
                active,
            } => {
                for c in self.consumers.iter_mut().filter(|c| {
                    c.spec.conn_id == conn_id
                        && c.spec.channel == channel
                        && c.spec.generation == generation
                }) {
                    c.flow_active = active;
                }
            }
            QueueCmd::Ack { ids } => self.ack(&ids),
            QueueCmd::Reject { ids, requeue } => self.reject(&ids, requeue, now),
            QueueCmd::Get { no_ack, reply } => {
                self.last_activity = now;
                let r = self.get(no_ack, now);
                self.publish_counts();
                let _ = reply.send(r);
            }
            QueueCmd::Stat { reply } => {
                let _ = reply.send((self.ready.len as u32, self.consumers.len() as u32));
            }
            QueueCmd::Purge { reply } => {
                let ids = self.ready.drain_ids();
                self.settle(&ids);
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

    /// What the store reports about this queue's enqueues.
    pub fn store_event(&mut self, ev: StoreEvent) {
        match ev {
            StoreEvent::Synced { up_to, .. } => self.confirms.disk_synced(up_to),
            StoreEvent::MirrorsAcked { up_to } => self.confirms.mirrors_acked(up_to),
            // The wake-up was the point: the actor's round feeds the mirror.
            StoreEvent::MirrorSyncReady => {}
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
        if a.quorum {
            // RabbitMQ 3.10's quorum queues refuse a publish once they are over a limit, so
            // they take one message more than the limit first.
            return self.over_limit();
        }
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
        if overflow != Overflow::DropHead && self.is_full(msg.body().len() as u64) {
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
        let ttl = match (self.args.message_ttl, msg.expiration_ms()) {
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
                    self.settle(&[p.id]);
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
        let flow_active = spec.flow_active;
        self.consumer_use = self.consumer_use.active(now);
        self.consumers.push(Consumer {
            key,
            spec,
            unacked: 0,
            last_used: 0,
            flow_active,
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
            if let Some(u) = self.take_unacked(*id) {
                self.release_consumer(u.consumer);
                n += 1;
            }
        }
        stats::bump(&self.handle.stats.ack, n);
        self.settle(ids);
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
            let Some(u) = self.take_unacked(*id) else {
                continue;
            };
            self.release_consumer(u.consumer);
            let mut e = u.entry;
            if requeue && self.count_return(e.id) {
                // A quorum queue's delivery limit: dropped or dead-lettered instead, as
                // RabbitMQ's quorum queues do.
                self.dead_letter(&e.msg, "delivery_limit");
                self.settle(&[e.id]);
            } else if requeue {
                e.redelivered = true;
                requeued.push(e.id);
                self.ready.requeue(e);
            } else {
                self.dead_letter(&e.msg, "rejected");
                self.settle(&[e.id]);
            }
        }
        if !requeued.is_empty() {
            self.log.requeue(&requeued);
        }
    }

    /// Counts one more return of a delivered message (quorum queues only, as in RabbitMQ:
    /// their `x-delivery-count`); true when that takes it past the queue's delivery limit.
    fn count_return(&mut self, id: u64) -> bool {
        if !self.args.quorum {
            return false;
        }
        let n = self.deliveries.entry(id).or_insert(0);
        *n = n.saturating_add(1);
        self.args
            .delivery_limit
            .is_some_and(|limit| i64::from(*n) > limit)
    }

    /// Messages that leave the queue for good: settled in the log, their return counts gone.
    fn settle(&mut self, ids: &[u64]) {
        if !self.deliveries.is_empty() {
            for id in ids {
                self.deliveries.remove(id);
            }
        }
        self.log.settle(ids);
    }

    fn add_unacked(&mut self, id: u64, u: Unacked) {
        self.unacked_bytes += u.entry.msg.body().len() as u64;
        self.unacked.insert(id, u);
    }

    fn take_unacked(&mut self, id: u64) -> Option<Unacked> {
        let u = self.unacked.remove(&id)?;
        self.unacked_bytes = self
            .unacked_bytes
            .saturating_sub(u.entry.msg.body().len() as u64);
        Some(u)
    }

    /// The message as delivered: a quorum queue's deliveries carry `x-delivery-count`, the
    /// times it was returned, as RabbitMQ 3.10.8's do: basic.get from the first (0), a
    /// consumer's from the first redelivery (`first_too` false).
    fn as_delivered(&self, id: u64, msg: &Arc<Message>, first_too: bool) -> Arc<Message> {
        if !self.args.quorum {
            return msg.clone();
        }
        let n = self.deliveries.get(&id).copied().unwrap_or(0);
        if n == 0 && !first_too {
            return msg.clone();
        }
        let mut headers = msg.headers().unwrap_or_default();
        headers.insert(
            "x-delivery-count".into(),
            amq_protocol::types::AMQPValue::LongLongInt(i64::from(n)),
        );
        match msg.with_headers(headers) {
            Ok(m) => Arc::new(m),
            // Cannot happen (the original's header encoded); the message goes as published.
            Err(_) => msg.clone(),
        }
    }

    /// Unix milliseconds of `t` by the wall-clock reading the core was given.
    fn unix_ms(&self, t: Instant) -> u64 {
        let (at, unix_ms) = self.wall;
        match t.checked_duration_since(at) {
            Some(d) => unix_ms + d.as_millis() as u64,
            None => unix_ms.saturating_sub(at.saturating_duration_since(t).as_millis() as u64),
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
                self.settle(&[e.id]);
                continue;
            }
            let r = GetResult {
                msg_id: e.id,
                msg: self.as_delivered(e.id, &e.msg, true),
                redelivered: e.redelivered,
                remaining: self.ready.len as u32,
            };
            stats::bump(if no_ack { &st.get_no_ack } else { &st.get }, 1);
            stats::bump(&st.redeliver, u64::from(e.redelivered));
            if no_ack {
                self.settle(&[e.id]);
            } else {
                self.log.delivered(&[e.id]);
                self.add_unacked(
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
            if !c.flow_active {
                continue;
            }
            if c.spec.conn.pending.load(Ordering::Relaxed) >= CONN_PENDING_LIMIT {
                c.spec.conn.starved.store(true, Ordering::Relaxed);
                continue;
            }
            if !c.spec.no_ack && c.spec.prefetch > 0 && c.unacked >= c.spec.prefetch as u32 {
                continue;
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
        // RabbitMQ's consumer capacity: a consumer able to take a message makes the queue
        // active, a message left waiting makes it inactive.
        if matches!(self.consumer_use, ConsumerUse::Inactive { .. })
            && self.pick_consumer().is_some()
        {
            self.consumer_use = self.consumer_use.active(now);
        }
        loop {
            let delivered = self.dispatch_pass(now);
            self.round_delivered |= delivered > 0;
            if delivered > 0 {
                self.last_busy = now;
            }
            if delivered < DISPATCH_PASS {
                break;
            }
        }
        if self.ready.len > 0 {
            self.consumer_use = self.consumer_use.inactive(now);
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
            let Some(e) = self.ready.pop_front() else {
                break;
            };
            if e.expires_at.is_some_and(|t| t <= now) {
                self.dead_letter(&e.msg, "expired");
                self.settle(&[e.id]);
                continue;
            }
            let msg = self.as_delivered(e.id, &e.msg, false);
            self.use_counter += 1;
            let c = &mut self.consumers[ci];
            c.last_used = self.use_counter;
            let delivery = Delivery {
                channel: c.spec.channel,
                generation: c.spec.generation,
                consumer_tag: c.spec.tag.clone(),
                queue: Some(self.handle.clone()),
                msg_id: e.id,
                msg,
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
                self.settle(&[e.id]);
            } else {
                c.unacked += 1;
                to_ack.push(e.id);
                let key = c.key;
                self.add_unacked(
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
        for (ci, deliveries) in outbox {
            let spec = &self.consumers[ci].spec;
            self.effects.push(Effect::Deliver {
                events: spec.events.clone(),
                conn: spec.conn.clone(),
                deliveries,
            });
        }
        delivered
    }

    /// Deliveries the shell could not hand over: their connection is gone. Its messages go
    /// back as they were (this client never saw them; one seen by an earlier client stays
    /// redelivered) and its consumers go; an auto-delete queue may go with them (the
    /// connection ended before its cancels reached the queue).
    pub fn undeliverable(&mut self, conn: &Arc<ConnShared>, lost: Vec<Delivery>, now: Instant) {
        self.now = now;
        conn.pending.fetch_sub(lost.len(), Ordering::Relaxed);
        for d in lost.iter().filter(|d| !d.no_ack) {
            if let Some(u) = self.take_unacked(d.msg_id) {
                self.ready.requeue(u.entry);
            }
        }
        let before = self.consumers.len();
        self.consumers.retain(|c| !Arc::ptr_eq(conn, &c.spec.conn));
        if self.consumers.len() != before {
            self.consumers_left(now);
        }
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
                self.settle(&[p.id]);
            }
        }
    }

    fn delete_now(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        for c in self.consumers.drain(..) {
            self.effects.push(Effect::Cancelled {
                events: c.spec.events,
                channel: c.spec.channel,
                generation: c.spec.generation,
                tag: c.spec.tag,
            });
        }
        self.confirms.queue_deleted();
        self.flow.open();
        self.log.delete();
        self.effects.push(Effect::Deleted);
        self.publish_counts();
    }

    /// Hands the log the next batch of the queue's messages for a mirror being synchronised,
    /// if it wants one: ready and unacked messages of the range, lowest ids first. The queue
    /// keeps serving meanwhile: one batch per round.
    pub fn sync_mirrors(&mut self) {
        let Some(range) = self.log.sync_wanted() else {
            return;
        };
        let unix = |t: Option<Instant>, wall: (Instant, u64)| {
            t.map_or(0, |t| {
                (wall.1 + t.saturating_duration_since(wall.0).as_millis() as u64).max(1)
            })
        };
        let wall = self.wall;
        let mut msgs: Vec<SyncMsg> = self
            .ready
            .copy_range(range.after, range.up_to, SYNC_BATCH + 1)
            .into_iter()
            .map(|c| SyncMsg {
                id: c.id,
                msg: c.msg,
                expires_at_ms: unix(c.expires_at, wall),
            })
            .collect();
        msgs.extend(
            self.unacked
                .iter()
                .filter(|(id, _)| **id > range.after && **id <= range.up_to)
                .map(|(id, u)| SyncMsg {
                    id: *id,
                    msg: u.entry.msg.clone(),
                    expires_at_ms: unix(u.entry.expires_at, wall),
                }),
        );
        msgs.sort_unstable_by_key(|m| m.id);
        let mut keep = msgs.len().min(SYNC_BATCH);
        let mut bytes = 0u64;
        for (i, m) in msgs.iter().take(keep).enumerate() {
            bytes += m.msg.body().len() as u64;
            if i > 0 && bytes > SYNC_BATCH_BYTES {
                keep = i;
                break;
            }
        }
        let done = keep == msgs.len();
        msgs.truncate(keep);
        self.log.sync_batch(range, msgs, done);
    }

    /// Sends a copy of `msg` to the dead-letter exchange, if the queue has one.
    fn dead_letter(&mut self, msg: &Arc<Message>, reason: &str) {
        let Some(dlx) = self.args.dead_letter_exchange.as_deref() else {
            return;
        };
        let (at, unix_ms) = self.wall;
        let now_secs = (unix_ms + self.now.saturating_duration_since(at).as_millis() as u64) / 1000;
        let rk = self.args.dead_letter_routing_key.as_deref();
        if let Some(copy) =
            super::deadletter::dead_letter_copy(msg, &self.handle.name, reason, dlx, rk, now_secs)
        {
            self.effects.push(Effect::DeadLetter(Arc::new(copy)));
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
