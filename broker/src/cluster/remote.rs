//! Queues whose master is another node, as this node's clients use them.
//!
//! Such a queue is in the vhost like any other (routing, passive declares, the management API
//! find it), but behind its mailbox runs a proxy instead of a queue actor: each command goes to
//! the master as a [`ToMaster`] message and what comes back ([`FromMaster`]: replies, confirms,
//! deliveries, server-side cancels) is handed to the local connections as if the queue were
//! here. Message ids are the master's; a client's ack goes back to the master with them.
//!
//! When the link to a master goes down, what waits on it is answered at once: publishes still
//! unconfirmed get basic.nack (the master may not have them), requests fail, consumers with
//! `x-cancel-on-ha-failover` get basic.cancel and the others wait for the queue's promotion
//! ([`super::parked`]); their unacked messages come back from the promoted copy.

use super::parked::Parked;
use super::wire::{
    FromMaster, QueueRef, RemoteConsumer, Reply, ToMaster, WireDelivery, WireMsg, FROM_MASTER,
    TO_MASTER,
};
use crate::error::ChannelError;
use crate::queue::{
    ClientEvent, ConfirmTicket, ConsumerRef, ConsumerSpec, Delivery, GetResult, Message, QueueCmd,
    QueueHandle,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};
use warren_cluster::{Cluster, NodeId, PeerEvent};

/// How often a proxy refreshes the master's counts.
const STAT_INTERVAL: Duration = Duration::from_millis(500);

/// How long a request to a master may go unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a proxy holding publishes for a promotion looks whether it can pass them on.
const HELD_CHECK: Duration = Duration::from_millis(50);

/// A consumer as its cancel names it: connection, channel, channel generation, tag.
pub type ConsumerKey = (u64, u16, u64, Arc<str>);

fn key_of(spec: &ConsumerSpec) -> ConsumerKey {
    (
        spec.conn_id,
        spec.channel,
        spec.generation,
        spec.tag.clone(),
    )
}

struct RemoteConsumerState {
    master: NodeId,
    spec: ConsumerSpec,
    queue: QueueHandle,
}

/// This node's side of every queue mastered elsewhere.
pub struct Remote {
    cluster: Cluster,
    memory: &'static crate::memory::Memory,
    next: AtomicU64,
    tickets: Mutex<HashMap<u64, (NodeId, ConfirmTicket)>>,
    replies: Mutex<HashMap<u64, (NodeId, oneshot::Sender<Reply>)>>,
    consumers: Mutex<HashMap<ConsumerKey, RemoteConsumerState>>,
    /// Masters whose link is down: what is sent to them now is refused at once.
    down: Mutex<std::collections::HashSet<NodeId>>,
    /// Consumers whose master died, waiting for its queue's promotion to consume on (those
    /// without x-cancel-on-ha-failover); cancelled if none comes within `park_for`.
    parked: Parked<RemoteConsumerState>,
    park_for: Duration,
    /// Every running proxy (by address) and, once it is replaced, its successor: what its
    /// holders still send it goes there.
    successors: Mutex<HashMap<usize, Successor>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

/// The wire form of a message.
pub fn wire_msg(m: &Message) -> WireMsg {
    WireMsg {
        exchange: m.exchange().to_string(),
        routing_key: m.routing_key().to_string(),
        header: m.header_payload().to_vec().into(),
        body: bytes::Bytes::copy_from_slice(m.body()),
    }
}

/// A message back from its wire form, charged to `memory`.
pub fn local_msg(memory: &'static crate::memory::Memory, m: WireMsg) -> Option<Arc<Message>> {
    crate::store::message_from_parts(memory, &m.exchange, &m.routing_key, &m.header, m.body)
        .map(Arc::new)
}

fn queue_ref(q: &QueueHandle) -> QueueRef {
    QueueRef {
        vhost: q.vhost.to_string(),
        name: q.name.to_string(),
    }
}

/// How the error of a queue whose master cannot be reached begins.
pub(super) const UNREACHABLE: &str = "queue master unreachable:";

/// Whether `e` says the queue's master cannot be reached (it may be promoted elsewhere soon).
pub fn is_unreachable(e: &ChannelError) -> bool {
    e.reply_text().contains(UNREACHABLE)
}

fn channel_error(code: u16, text: String) -> ChannelError {
    use amq_protocol::protocol::AMQPSoftError as S;
    let kind = match code {
        404 => S::NOTFOUND,
        403 => S::ACCESSREFUSED,
        405 => S::RESOURCELOCKED,
        406 => S::PRECONDITIONFAILED,
        _ => S::PRECONDITIONFAILED,
    };
    ChannelError::new(kind, text)
}

impl Remote {
    /// Starts the dispatcher of what masters send back.
    /// `park_for`: how long a consumer of a queue whose master died waits for the promotion.
    pub fn start(
        cluster: Cluster,
        memory: &'static crate::memory::Memory,
        park_for: Duration,
    ) -> Arc<Remote> {
        let me = Arc::new(Remote {
            cluster: cluster.clone(),
            memory,
            next: AtomicU64::new(1),
            tickets: Mutex::default(),
            replies: Mutex::default(),
            consumers: Mutex::default(),
            down: Mutex::default(),
            parked: Parked::default(),
            park_for,
            successors: Mutex::default(),
        });
        let mut inbox = cluster.subscribe_app(FROM_MASTER);
        let mut events = cluster.peer_events();
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbox.recv() => {
                        let Some(m) = m else { return };
                        let Some(me) = weak.upgrade() else { return };
                        match FromMaster::decode(&m.payload) {
                            Some(msg) => me.on_message(m.from, msg),
                            None => warn!(from = m.from, "undecodable queue message from a master; dropped"),
                        }
                    }
                    ev = events.recv() => {
                        let Some(me) = weak.upgrade() else { return };
                        match ev {
                            Ok(PeerEvent::Down(peer)) => {
                                me.down.lock().insert(peer);
                                me.master_gone(peer);
                                let w = Arc::downgrade(&me);
                                let wait = me.park_for;
                                tokio::spawn(async move {
                                    tokio::time::sleep(wait).await;
                                    if let Some(me) = w.upgrade() {
                                        me.expire_parked();
                                    }
                                });
                            }
                            Ok(PeerEvent::Up(peer)) => {
                                me.down.lock().remove(&peer);
                            }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        }
                    }
                }
            }
        });
        me
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, master: NodeId, msg: &ToMaster) -> bool {
        if self.down.lock().contains(&master) {
            return false;
        }
        match self.cluster.send(master, TO_MASTER, msg.encode()) {
            Ok(()) => true,
            Err(e) => {
                debug!(master, error = %e, "queue request not sent");
                false
            }
        }
    }

    /// A request that waits for its reply (None: no answer, the master is out of reach).
    async fn request(&self, master: NodeId, req: u64, msg: ToMaster) -> Option<Reply> {
        let (tx, rx) = oneshot::channel();
        self.replies.lock().insert(req, (master, tx));
        if !self.send(master, &msg) {
            self.replies.lock().remove(&req);
            return None;
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => Some(r),
            _ => {
                self.replies.lock().remove(&req);
                None
            }
        }
    }

    /// `sync_queue` / `cancel_sync_queue` of a queue mastered on `master`.
    pub async fn sync(&self, master: NodeId, queue: QueueRef, cancel: bool) -> Result<(), String> {
        let req = self.id();
        match self
            .request(master, req, ToMaster::Sync { queue, req, cancel })
            .await
        {
            Some(Reply::Done(Ok(_))) => Ok(()),
            Some(Reply::Done(Err((_, text)))) => Err(text),
            _ => Err("the queue's master did not answer".into()),
        }
    }

    /// Serve `handle`'s mailbox for the queue mastered on `master`.
    pub(crate) fn run_proxy(
        self: &Arc<Self>,
        handle: QueueHandle,
        rx: mpsc::Receiver<QueueCmd>,
        master: NodeId,
    ) {
        let me = self.clone();
        tokio::spawn(async move { me.proxy(handle, rx, master).await });
    }

    async fn proxy(
        self: Arc<Self>,
        handle: QueueHandle,
        mut rx: mpsc::Receiver<QueueCmd>,
        master: NodeId,
    ) {
        let queue = queue_ref(&handle);
        let addr = Arc::as_ptr(&handle) as usize;
        // The task holds the handle weakly: once nobody else does, the mailbox closes and
        // the task ends.
        let weak_handle = Arc::downgrade(&handle);
        let (name, vhost) = (handle.name.clone(), handle.vhost.clone());
        drop(handle);
        // Set when this proxy is replaced; read per command without the shared map's lock.
        let successor = Successor::default();
        self.successors.lock().insert(addr, successor.clone());
        // The counts shown here (declare-ok, the management API) follow the master's.
        let stats = {
            let me = Arc::downgrade(&self);
            let h = weak_handle.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STAT_INTERVAL);
                loop {
                    tick.tick().await;
                    let (Some(me), Some(h)) = (me.upgrade(), h.upgrade()) else {
                        return;
                    };
                    let req = me.id();
                    if let Some(Reply::Stat(Some((m, c)))) = me
                        .request(
                            master,
                            req,
                            ToMaster::Stat {
                                queue: queue.clone(),
                                req,
                                exact: false,
                            },
                        )
                        .await
                    {
                        h.message_count.store(m, Ordering::Relaxed);
                        h.consumer_count.store(c, Ordering::Relaxed);
                    }
                }
            })
        };
        let unreachable = || {
            ChannelError::new(
                amq_protocol::protocol::AMQPSoftError::RESOURCELOCKED,
                format!(
                    "{UNREACHABLE} queue '{name}' in vhost '{vhost}' is on a node that cannot be reached"
                ),
            )
        };
        // Publishes that arrived while the master was out of reach, held (in order) for the
        // promotion rather than nacked, as RabbitMQ's channels hold them: they go to the queue
        // that replaces this proxy, or to the master if it comes back, or are nacked after the
        // promotion wait.
        let mut held: std::collections::VecDeque<(Instant, Vec<crate::queue::PublishItem>)> =
            std::collections::VecDeque::new();
        loop {
            let cmd = if held.is_empty() {
                rx.recv().await
            } else {
                tokio::select! {
                    cmd = rx.recv() => cmd,
                    _ = tokio::time::sleep(HELD_CHECK) => {
                        self.release_held(&successor, master, &queue, &mut held).await;
                        continue;
                    }
                }
            };
            let Some(cmd) = cmd else { break };
            if !held.is_empty() {
                self.release_held(&successor, master, &queue, &mut held)
                    .await;
            }
            // A cancelled consumer that waits for a promotion (or is being handed to the new
            // master) stays cancelled.
            if let QueueCmd::Cancel {
                conn_id,
                channel,
                generation,
                tag,
            } = &cmd
            {
                self.parked
                    .cancel(&(*conn_id, *channel, *generation, tag.clone()));
            }
            // Retired (the master moved): the queue that took this one's place serves it.
            if let Some(next) = successor.get() {
                next.forward(cmd).await;
                continue;
            }
            // Publishes go on to the master without flow control (see `crate::queue::flow`).
            cmd.publish_taken();
            match cmd {
                QueueCmd::Publish { msg, confirm, .. } => {
                    self.publish_or_hold(master, &queue, vec![(msg, confirm)], &mut held);
                }
                QueueCmd::PublishBatch(items, _) => {
                    self.publish_or_hold(master, &queue, items, &mut held)
                }
                QueueCmd::Consume { spec, reply } => {
                    let key = key_of(&spec);
                    let msg = ToMaster::Consume {
                        queue: queue.clone(),
                        req: 0,
                        consumer: RemoteConsumer {
                            conn: spec.conn_id,
                            channel: spec.channel,
                            generation: spec.generation,
                            tag: spec.tag.to_string(),
                        },
                        no_ack: spec.no_ack,
                        exclusive: spec.exclusive,
                        prefetch: spec.prefetch,
                        priority: spec.priority,
                        flow_active: spec.flow_active,
                    };
                    let Some(handle) = weak_handle.upgrade() else {
                        let _ = reply.send(Err(unreachable()));
                        continue;
                    };
                    self.consumers.lock().insert(
                        key.clone(),
                        RemoteConsumerState {
                            master,
                            spec,
                            queue: handle,
                        },
                    );
                    let me = self.clone();
                    let unreachable = unreachable();
                    tokio::spawn(async move {
                        let req = me.id();
                        let msg = match msg {
                            ToMaster::Consume {
                                queue,
                                consumer,
                                no_ack,
                                exclusive,
                                prefetch,
                                priority,
                                flow_active,
                                ..
                            } => ToMaster::Consume {
                                queue,
                                req,
                                consumer,
                                no_ack,
                                exclusive,
                                prefetch,
                                priority,
                                flow_active,
                            },
                            m => m,
                        };
                        let r = match me.request(master, req, msg).await {
                            Some(Reply::Done(Ok(_))) => Ok(()),
                            Some(Reply::Done(Err((code, text)))) => Err(channel_error(code, text)),
                            _ => Err(unreachable),
                        };
                        if r.is_err() {
                            me.consumers.lock().remove(&key);
                        }
                        let _ = reply.send(r);
                    });
                }
                QueueCmd::Cancel {
                    conn_id,
                    channel,
                    generation,
                    tag,
                } => {
                    self.consumers
                        .lock()
                        .remove(&(conn_id, channel, generation, tag.clone()));
                    self.send(
                        master,
                        &ToMaster::Cancel {
                            queue: queue.clone(),
                            consumer: RemoteConsumer {
                                conn: conn_id,
                                channel,
                                generation,
                                tag: tag.to_string(),
                            },
                        },
                    );
                }
                QueueCmd::Prefetch { consumer, prefetch } => {
                    self.send(
                        master,
                        &ToMaster::Prefetch {
                            queue: queue.clone(),
                            consumer: RemoteConsumer {
                                conn: consumer.conn_id,
                                channel: consumer.channel,
                                generation: consumer.generation,
                                tag: consumer.tag.to_string(),
                            },
                            prefetch,
                        },
                    );
                }
                QueueCmd::Flow {
                    conn_id,
                    channel,
                    generation,
                    active,
                } => {
                    self.send(
                        master,
                        &ToMaster::Flow {
                            queue: queue.clone(),
                            conn: conn_id,
                            channel,
                            generation,
                            active,
                        },
                    );
                }
                QueueCmd::Ack { ids } => {
                    self.send(
                        master,
                        &ToMaster::Settle {
                            queue: queue.clone(),
                            ids,
                            how: 0,
                        },
                    );
                }
                QueueCmd::Reject { ids, requeue } => {
                    let how = if requeue { 1 } else { 2 };
                    self.send(
                        master,
                        &ToMaster::Settle {
                            queue: queue.clone(),
                            ids,
                            how,
                        },
                    );
                }
                QueueCmd::Get { no_ack, reply } => {
                    let me = self.clone();
                    let queue = queue.clone();
                    tokio::spawn(async move {
                        let req = me.id();
                        let got = match me
                            .request(master, req, ToMaster::Get { queue, req, no_ack })
                            .await
                        {
                            Some(Reply::Got(Some((msg_id, m, redelivered, remaining)))) => {
                                local_msg(me.memory, m).map(|msg| GetResult {
                                    msg_id,
                                    msg,
                                    redelivered,
                                    remaining,
                                })
                            }
                            _ => None,
                        };
                        let _ = reply.send(got);
                    });
                }
                QueueCmd::Stat { reply } => {
                    let me = self.clone();
                    let queue = queue.clone();
                    let handle = weak_handle.clone();
                    tokio::spawn(async move {
                        let req = me.id();
                        let exact = ToMaster::Stat {
                            queue,
                            req,
                            exact: true,
                        };
                        let counts = match me.request(master, req, exact).await {
                            Some(Reply::Stat(Some(counts))) => counts,
                            // Out of reach: the counts last refreshed.
                            _ => handle
                                .upgrade()
                                .map(|h| (h.message_count(), h.consumer_count()))
                                .unwrap_or_default(),
                        };
                        let _ = reply.send(counts);
                    });
                }
                QueueCmd::Purge { reply } => {
                    let me = self.clone();
                    let queue = queue.clone();
                    tokio::spawn(async move {
                        let req = me.id();
                        if let Some(Reply::Done(Ok(n))) = me
                            .request(master, req, ToMaster::Purge { queue, req })
                            .await
                        {
                            let _ = reply.send(n);
                        }
                    });
                }
                QueueCmd::Delete {
                    if_unused,
                    if_empty,
                    reply,
                } => {
                    let me = self.clone();
                    let queue = queue.clone();
                    let unreachable = unreachable();
                    tokio::spawn(async move {
                        let req = me.id();
                        let r = match me
                            .request(
                                master,
                                req,
                                ToMaster::Delete {
                                    queue,
                                    req,
                                    if_unused,
                                    if_empty,
                                },
                            )
                            .await
                        {
                            Some(Reply::Done(Ok(n))) => Ok(n),
                            Some(Reply::Done(Err((code, text)))) => Err(channel_error(code, text)),
                            _ => Err(unreachable),
                        };
                        if let Some(reply) = reply {
                            let _ = reply.send(r);
                        }
                    });
                }
                QueueCmd::Touch => {
                    self.send(
                        master,
                        &ToMaster::Touch {
                            queue: queue.clone(),
                        },
                    );
                }
                QueueCmd::Kick => {
                    self.send(
                        master,
                        &ToMaster::Kick {
                            queue: queue.clone(),
                        },
                    );
                }
            }
        }
        stats.abort();
        // Nobody can reach this proxy any more: what it still held is nacked.
        for (_, items) in held {
            for (_, t) in items {
                if let Some(t) = t {
                    t.send(false);
                }
            }
        }
        self.successors.lock().remove(&addr);
        // The proxy is gone (the queue left this node): its consumers with it.
        self.consumers
            .lock()
            .retain(|_, c| Arc::as_ptr(&c.queue) as usize != addr);
    }

    /// The proxy `old` was replaced by `new` (its master moved): what still reaches `old`
    /// goes to `new`, and the consumers parked when the old master died consume on there.
    pub fn replaced(self: &Arc<Self>, old: &QueueHandle, new: &QueueHandle) {
        let cell = self
            .successors
            .lock()
            .get(&(Arc::as_ptr(old) as usize))
            .cloned();
        if let Some(cell) = cell {
            let _ = cell.set(new.clone());
        }
        // Wakes the old proxy: what it holds goes to its successor now.
        old.kick();
        let resume = self.parked.hand_on(Arc::as_ptr(old) as usize);
        debug!(queue = %new.name, consumers = resume.len(), "proxy replaced; parked consumers consume on");
        let deadline = tokio::time::Instant::now() + self.park_for;
        for (key, c) in resume {
            let new = new.clone();
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                // The new master may apply its promotion a moment after this node: until then
                // it answers as its old proxy would, unreachable.
                loop {
                    let Some(me) = me.upgrade() else { return };
                    if !me.parked.wanted(&key) {
                        return; // cancelled while it waited
                    }
                    match new.consume(c.spec.clone()).await {
                        Ok(()) => {
                            if !me.parked.handed(&key) {
                                // Cancelled while the new master took it on: its cancel may
                                // have reached the new master first.
                                new.cancel(ConsumerRef {
                                    conn_id: key.0,
                                    channel: key.1,
                                    generation: key.2,
                                    tag: key.3,
                                })
                                .await;
                            }
                            return;
                        }
                        Err(e) if is_unreachable(&e) && tokio::time::Instant::now() < deadline => {
                            drop(me);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(_) => {
                            if me.parked.handed(&key) {
                                cancelled(&c.spec);
                            }
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Parked consumers whose queue was not promoted in time are cancelled.
    fn expire_parked(&self) {
        let now = Instant::now();
        let gone = self.parked.expired(now, self.park_for);
        for c in gone {
            cancelled(&c.spec);
        }
    }

    /// Publishes to the master, or holds the items while it is out of reach (or while
    /// earlier ones are held: order is kept).
    fn publish_or_hold(
        &self,
        master: NodeId,
        queue: &QueueRef,
        items: Vec<crate::queue::PublishItem>,
        held: &mut std::collections::VecDeque<(Instant, Vec<crate::queue::PublishItem>)>,
    ) {
        if held.is_empty() && !self.down.lock().contains(&master) {
            self.publish(master, queue, items);
        } else {
            held.push_back((Instant::now(), items));
        }
    }

    /// Held publishes go where they can: to this proxy's successor, or to its master when
    /// it is back; those held longer than the promotion wait are nacked.
    async fn release_held(
        &self,
        successor: &Successor,
        master: NodeId,
        queue: &QueueRef,
        held: &mut std::collections::VecDeque<(Instant, Vec<crate::queue::PublishItem>)>,
    ) {
        if let Some(next) = successor.get() {
            for (_, items) in held.drain(..) {
                next.forward(QueueCmd::PublishBatch(items, None)).await;
            }
            return;
        }
        if !self.down.lock().contains(&master) {
            for (_, items) in held.drain(..) {
                self.publish(master, queue, items);
            }
            return;
        }
        while held
            .front()
            .is_some_and(|(at, _)| at.elapsed() >= self.park_for)
        {
            if let Some((_, items)) = held.pop_front() {
                for (_, t) in items {
                    if let Some(t) = t {
                        t.send(false);
                    }
                }
            }
        }
    }

    fn publish(&self, master: NodeId, queue: &QueueRef, items: Vec<crate::queue::PublishItem>) {
        let mut wire = Vec::with_capacity(items.len());
        let mut mine = Vec::new();
        for (msg, confirm) in items {
            let ticket = confirm.map(|t| {
                let id = self.id();
                mine.push(id);
                self.tickets.lock().insert(id, (master, t));
                id
            });
            wire.push((wire_msg(&msg), ticket));
        }
        let sent = self.send(
            master,
            &ToMaster::Publish {
                queue: queue.clone(),
                items: wire,
            },
        );
        if !sent {
            // Not sent: the master never has these. basic.nack, so a publisher retries.
            let mut t = self.tickets.lock();
            for id in mine {
                if let Some((_, ticket)) = t.remove(&id) {
                    ticket.send(false);
                }
            }
        }
    }

    fn on_message(&self, from: NodeId, msg: FromMaster) {
        match msg {
            FromMaster::Reply { req, reply } => {
                let waiter = self.replies.lock().remove(&req);
                if let Some((_, tx)) = waiter {
                    let _ = tx.send(reply);
                }
            }
            FromMaster::Confirm { ticket, ok } => {
                let t = self.tickets.lock().remove(&ticket);
                if let Some((_, t)) = t {
                    t.send(ok);
                }
            }
            FromMaster::Deliver {
                conn,
                queue,
                deliveries,
            } => self.deliver(from, conn, queue, deliveries),
            FromMaster::Cancelled { consumer } => {
                let key: ConsumerKey = (
                    consumer.conn,
                    consumer.channel,
                    consumer.generation,
                    consumer.tag.as_str().into(),
                );
                let c = self.consumers.lock().remove(&key);
                if let Some(c) = c {
                    let _ = c.spec.events.send(ClientEvent::Cancelled {
                        channel: c.spec.channel,
                        generation: c.spec.generation,
                        tag: c.spec.tag.clone(),
                    });
                }
            }
        }
    }

    fn deliver(&self, from: NodeId, conn: u64, queue: QueueRef, deliveries: Vec<WireDelivery>) {
        let mut orphans: Vec<u64> = Vec::new();
        let mut out: HashMap<u64, (ConsumerSpec, Vec<Delivery>)> = HashMap::new();
        {
            let consumers = self.consumers.lock();
            for d in deliveries {
                let key: ConsumerKey = (conn, d.channel, d.generation, d.tag.as_str().into());
                let Some(c) = consumers.get(&key) else {
                    if !d.no_ack {
                        // The consumer went while this was on its way: back to the queue.
                        orphans.push(d.msg_id);
                    }
                    continue;
                };
                let Some(msg) = local_msg(self.memory, d.msg) else {
                    if !d.no_ack {
                        orphans.push(d.msg_id);
                    }
                    continue;
                };
                let e = out
                    .entry(conn)
                    .or_insert_with(|| (c.spec.clone(), Vec::new()));
                e.1.push(Delivery {
                    channel: d.channel,
                    generation: d.generation,
                    consumer_tag: c.spec.tag.clone(),
                    queue: Some(c.queue.clone()),
                    msg_id: d.msg_id,
                    msg,
                    redelivered: d.redelivered,
                    no_ack: d.no_ack,
                });
            }
        }
        for (_, (spec, ds)) in out {
            spec.conn.pending.fetch_add(ds.len(), Ordering::Relaxed);
            if let Err(e) = spec.events.send(ClientEvent::Deliveries(ds)) {
                // The connection is gone: what it was to acknowledge goes back to the queue.
                if let ClientEvent::Deliveries(ds) = e.0 {
                    spec.conn.pending.fetch_sub(ds.len(), Ordering::Relaxed);
                    orphans.extend(ds.iter().filter(|d| !d.no_ack).map(|d| d.msg_id));
                }
            }
        }
        if !orphans.is_empty() {
            self.send(
                from,
                &ToMaster::Settle {
                    queue,
                    ids: orphans,
                    how: 1,
                },
            );
        }
    }

    /// The link to `peer` went down: what waits on it is answered now.
    fn master_gone(&self, peer: NodeId) {
        let tickets: Vec<ConfirmTicket> = {
            let mut t = self.tickets.lock();
            let ids: Vec<u64> = t
                .iter()
                .filter(|(_, (m, _))| *m == peer)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| t.remove(&id))
                .map(|(_, t)| t)
                .collect()
        };
        for t in tickets {
            t.send(false);
        }
        self.replies.lock().retain(|_, (m, _)| *m != peer);
        let gone: Vec<RemoteConsumerState> = {
            let mut c = self.consumers.lock();
            let keys: Vec<ConsumerKey> = c
                .iter()
                .filter(|(_, s)| s.master == peer)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| c.remove(&k)).collect()
        };
        // A consumer with x-cancel-on-ha-failover gets basic.cancel now; the others wait
        // for the promotion and consume on (RabbitMQ's default).
        let now = Instant::now();
        for c in gone {
            debug!(master = peer, tag = %c.spec.tag, cancel = c.spec.cancel_on_ha_failover, "master gone: consumer cancelled or parked");
            if c.spec.cancel_on_ha_failover {
                cancelled(&c.spec);
            } else {
                let key = key_of(&c.spec);
                self.parked
                    .park(key, Arc::as_ptr(&c.queue) as usize, c, now);
            }
        }
    }
}

/// The queue that replaced a proxy, once it was replaced.
type Successor = Arc<std::sync::OnceLock<QueueHandle>>;

/// Tells a consumer's channel that the server cancelled it (basic.cancel).
fn cancelled(spec: &ConsumerSpec) {
    let _ = spec.events.send(ClientEvent::Cancelled {
        channel: spec.channel,
        generation: spec.generation,
        tag: spec.tag.clone(),
    });
}
