//! Broker-side context of one connection: its vhost, user, channels and output buffer.
//!
//! The shell in `mod.rs` owns one `Session` and feeds it effects from the state machine and
//! events from queues. Handlers for each AMQP class live in `crate::class` and work on it.

use crate::auth::Permissions;
use crate::channel::{group_by_queue, Channel, Settle, UnackedDelivery};
use crate::codec;
use crate::error::{ChannelError, CodecError};
use crate::intmap::IntMap;
use crate::queue::{ClientEvent, ClientTx, ConnShared, ConsumerRef, Delivery, QueueHandle};
use crate::vhost::Vhost;
use crate::BrokerShared;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, AMQPClass};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Initial capacity of a connection's output buffer (a handshake's frames fit).
const OUT_INITIAL: usize = 4 * 1024;

/// Per-connection broker state.
pub struct Session {
    pub conn_id: u64,
    pub shared: Arc<BrokerShared>,
    pub user: String,
    pub vhost: Option<Arc<Vhost>>,
    pub perms: Option<Arc<Permissions>>,
    pub events_tx: ClientTx,
    pub events_rx: mpsc::UnboundedReceiver<ClientEvent>,
    pub conn_shared: Arc<ConnShared>,
    pub channels: IntMap<u16, Channel>,
    pub exclusive_queues: Vec<QueueHandle>,
    next_generation: u64,
    pub frame_max: u32,
    /// Encoded output waiting for the socket.
    pub out: Vec<u8>,
    /// Channels whose confirms need flushing.
    confirm_dirty: Vec<u16>,
    /// Routed publishes not yet handed to their queues (see [`Session::flush_publishes`]).
    pending_publishes: Vec<(QueueHandle, Vec<crate::queue::PublishItem>)>,
    /// Counters read by the management API.
    pub stats: Arc<crate::stats::ConnStats>,
}

impl Session {
    pub fn new(conn_id: u64, shared: Arc<BrokerShared>, frame_max: u32) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            conn_id,
            shared,
            user: String::new(),
            vhost: None,
            perms: None,
            events_tx,
            events_rx,
            conn_shared: Arc::new(ConnShared::default()),
            channels: IntMap::default(),
            exclusive_queues: Vec::new(),
            next_generation: 1,
            frame_max,
            // Grows with what a busy connection writes; an idle one keeps this.
            out: Vec::with_capacity(OUT_INITIAL),
            confirm_dirty: Vec::new(),
            pending_publishes: Vec::new(),
            stats: Arc::default(),
        }
    }

    /// Queues a routed publish; it is sent with the others from the same read, one mailbox
    /// message per queue. Callers flush before anything that must observe it.
    pub fn queue_publish(
        &mut self,
        q: QueueHandle,
        msg: Arc<crate::queue::Message>,
        confirm: Option<crate::queue::ConfirmTicket>,
    ) {
        match self
            .pending_publishes
            .iter_mut()
            .find(|(x, _)| Arc::ptr_eq(x, &q))
        {
            Some((_, v)) => v.push((msg, confirm)),
            None => self.pending_publishes.push((q, vec![(msg, confirm)])),
        }
    }

    /// Hands queued publishes to their queues, in publish order per queue.
    pub async fn flush_publishes(&mut self) {
        for (q, items) in std::mem::take(&mut self.pending_publishes) {
            q.publish(items, Some(&self.conn_shared)).await;
        }
    }

    pub fn open_channel(&mut self, ch: u16) {
        let g = self.next_generation;
        self.next_generation += 1;
        let stats = self.stats.channel_stats.open(ch);
        self.channels.insert(ch, Channel::new(ch, g, stats));
        self.count_channels();
        crate::stats::churn(&self.shared.node.stats.churn.channel_created);
    }

    fn count_channels(&self) {
        self.stats
            .channels
            .store(self.channels.len() as u32, Ordering::Relaxed);
    }

    /// Describes the open channels (management API).
    pub fn snapshot(&self) -> Vec<crate::stats::ChannelSnapshot> {
        let mut v: Vec<_> = self
            .channels
            .values()
            .map(|c| crate::stats::ChannelSnapshot {
                number: c.id,
                prefetch: c.prefetch,
                global_prefetch: u32::from(c.global_prefetch),
                confirm: c.confirms.is_some(),
                transactional: c.tx.is_some(),
                unacked: c.unacked.len(),
                unconfirmed: c.confirms.as_ref().map_or(0, |x| x.pending.len()),
                publishing: c.publishing,
                consumers: c
                    .consumers
                    .iter()
                    .filter_map(|(tag, k)| {
                        Some(crate::stats::ConsumerSnapshot {
                            tag: tag.to_string(),
                            queue: k.queue.as_ref()?.name.to_string(),
                            no_ack: k.no_ack,
                            exclusive: false,
                            prefetch: c.prefetch,
                        })
                    })
                    .collect(),
            })
            .collect();
        v.sort_by_key(|c| c.number);
        v
    }

    pub fn frame(&mut self, f: &AMQPFrame) -> Result<(), CodecError> {
        codec::encode(f, &mut self.out)
    }

    pub fn method(&mut self, ch: u16, m: AMQPClass) -> Result<(), CodecError> {
        codec::encode(&AMQPFrame::Method(ch, m), &mut self.out)
    }

    /// Writes header and body frames of a message.
    pub fn content(&mut self, ch: u16, msg: &crate::queue::Message) {
        codec::encode_content_header(&mut self.out, ch, msg.header_payload());
        if !msg.body().is_empty() {
            codec::encode_body(&mut self.out, ch, msg.body(), self.frame_max);
        }
    }

    /// The connection's vhost, a reference of its own (see [`open_vhost`] to borrow it).
    pub fn vhost(&self) -> Result<Arc<Vhost>, ChannelError> {
        open_vhost(&self.vhost).cloned()
    }

    /// RabbitMQ permission check; `what` is "queue" or "exchange".
    pub fn check_perm(&self, kind: PermKind, what: &str, name: &str) -> Result<(), ChannelError> {
        let Some(p) = &self.perms else {
            return Err(ChannelError::access_refused("no permissions"));
        };
        let pat = match kind {
            PermKind::Configure => &p.configure,
            PermKind::Write => &p.write,
            PermKind::Read => &p.read,
        };
        // The default exchange is checked under RabbitMQ's name for it.
        let checked = if name.is_empty() && what == "exchange" {
            "amq.default"
        } else {
            name
        };
        if pat.allows(checked) {
            Ok(())
        } else {
            let vh = self
                .vhost
                .as_ref()
                .map(|v| v.name.to_string())
                .unwrap_or_default();
            Err(ChannelError::access_refused(format!(
                "{} access to {what} '{name}' in vhost '{vh}' refused for user '{}'",
                kind.as_str(),
                self.user
            )))
        }
    }

    /// Exclusive queues are usable only by their owner.
    pub fn check_exclusive(&self, q: &QueueHandle) -> Result<(), ChannelError> {
        match q.exclusive_owner {
            Some(owner) if owner != self.conn_id => Err(ChannelError::resource_locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be \
                 originally declared on another connection or the exclusive property value does \
                 not match that of the original declaration.",
                q.name, q.vhost
            ))),
            _ => Ok(()),
        }
    }

    /// Settles client deliveries against their queues.
    pub async fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        how: Settle,
    ) -> Result<(), ChannelError> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let Some(items) = chan.take_unacked(tag, multiple) else {
            return Err(ChannelError::precondition_failed(format!(
                "unknown delivery tag {tag}"
            )));
        };
        if matches!(how, Settle::Ack) {
            crate::stats::bump(&chan.stats.ack, items.len() as u64);
        }
        self.settle_items(ch, items, how).await;
        Ok(())
    }

    pub async fn settle_items(&mut self, ch: u16, items: Vec<UnackedDelivery>, how: Settle) {
        if items.is_empty() {
            return;
        }
        let mut released = 0;
        for (q, ids, counted) in group_by_queue(items) {
            released += counted;
            q.settle(ids, how).await;
        }
        if released > 0 {
            if let Some(chan) = self.channels.get_mut(&ch) {
                chan.counted_unacked = chan.counted_unacked.saturating_sub(released);
            }
            self.release_held(ch).await;
        }
    }

    /// Sends held deliveries while the channel's global prefetch has room.
    pub async fn release_held(&mut self, ch: u16) {
        loop {
            let Some(chan) = self.channels.get_mut(&ch) else {
                return;
            };
            if !chan.global_room() {
                return;
            }
            let Some(d) = chan.held.pop_front() else {
                return;
            };
            self.deliver(d).await;
        }
    }

    /// Releases everything a channel holds: cancels its consumers and requeues its unacked
    /// deliveries.
    pub async fn release_channel(&mut self, ch: u16) {
        self.flush_publishes().await;
        let Some(mut chan) = self.channels.remove(&ch) else {
            return;
        };
        self.stats.channel_stats.close(ch);
        if let Some(v) = &self.vhost {
            v.channel_gone(&chan.stats.counts());
        }
        self.count_channels();
        crate::stats::churn(&self.shared.node.stats.churn.channel_closed);
        for (tag, c) in chan.consumers.drain() {
            if let Some(q) = c.queue {
                q.cancel(ConsumerRef {
                    conn_id: self.conn_id,
                    channel: ch,
                    generation: chan.generation,
                    tag,
                })
                .await;
            }
        }
        if let (Some(token), Some(v)) = (chan.reply_to.take(), &self.vhost) {
            v.unregister_reply_to(&token);
        }
        let items: Vec<UnackedDelivery> = chan.unacked.drain(..).collect();
        for (q, ids, _) in group_by_queue(items) {
            q.settle(ids, Settle::Requeue).await;
        }
        requeue_held(std::mem::take(&mut chan.held)).await;
    }

    /// Releases every channel and deletes exclusive queues (connection end). Deliveries still
    /// on their way to this connection go back to their queues: no queue is left holding a
    /// message as unacknowledged by a connection that is gone.
    pub async fn release_all(&mut self) {
        let chans: Vec<u16> = self.channels.keys().copied().collect();
        for ch in chans {
            self.release_channel(ch).await;
        }
        // From now on a queue's send to this connection fails (and the queue takes its
        // delivery back itself); what was sent before is given back here.
        self.events_rx.close();
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                ClientEvent::Deliver(d) => self.deliver(d).await,
                ClientEvent::Deliveries(v) => {
                    for d in v {
                        self.deliver(d).await;
                    }
                }
                _ => {}
            }
        }
        if let Some(v) = self.vhost.clone() {
            for q in std::mem::take(&mut self.exclusive_queues) {
                let _ = v.delete_queue(&q, false, false).await;
            }
        }
    }

    /// Handles one event from a queue.
    pub async fn handle_event(&mut self, ev: ClientEvent) -> Option<crate::error::ConnectionError> {
        match ev {
            ClientEvent::Deliver(d) => self.deliver(d).await,
            ClientEvent::Deliveries(v) => {
                for d in v {
                    self.deliver(d).await;
                }
            }
            ClientEvent::Confirm {
                channel,
                generation,
                seq,
                ok,
            } => {
                if let Some(chan) = self.channels.get_mut(&channel) {
                    if chan.generation == generation {
                        if let Some(c) = chan.confirms.as_mut() {
                            c.report(seq, ok);
                            self.confirm_dirty.push(channel);
                        }
                    }
                }
            }
            ClientEvent::Cancelled {
                channel,
                generation,
                tag,
            } => {
                if let Some(chan) = self.channels.get_mut(&channel) {
                    if chan.generation == generation && chan.consumers.remove(&tag).is_some() {
                        let _ = self.method(
                            channel,
                            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                                consumer_tag: tag.as_ref().into(),
                                nowait: true,
                            })),
                        );
                    }
                }
            }
            ClientEvent::Close(e) => return Some(e),
            ClientEvent::Inspect(reply) => {
                let _ = reply.send(self.snapshot());
            }
        }
        None
    }

    async fn deliver(&mut self, d: Delivery) {
        if d.queue.is_some() {
            self.conn_shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
        let live = self.channels.get(&d.channel).is_some_and(|c| {
            c.generation == d.generation && c.consumers.contains_key(&d.consumer_tag)
        });
        if !live {
            // Consumer or channel gone while this was in flight: give it back.
            if let (false, Some(q)) = (d.no_ack, &d.queue) {
                q.settle(vec![d.msg_id], Settle::Requeue).await;
            }
            return;
        }
        let Some(chan) = self.channels.get_mut(&d.channel) else {
            return;
        };
        let counted = !d.no_ack && d.queue.is_some();
        if counted && (!chan.global_room() || !chan.held.is_empty()) {
            // The channel's global prefetch is used up (or others wait already): the client
            // gets it once acks make room, in arrival order.
            chan.held.push_back(d);
            return;
        }
        let tag = chan.take_tag();
        chan.stats.delivered(d.no_ack, d.redelivered);
        if counted {
            if let Some(q) = d.queue.clone() {
                chan.counted_unacked += 1;
                chan.unacked.push_back(UnackedDelivery {
                    tag,
                    queue: q,
                    msg_id: d.msg_id,
                    counted: true,
                });
            }
        }
        codec::encode_deliver(
            &mut self.out,
            d.channel,
            &d.consumer_tag,
            tag,
            d.redelivered,
            d.msg.exchange(),
            d.msg.routing_key(),
        );
        self.content(d.channel, &d.msg);
    }

    /// Sends pending basic.ack / basic.nack frames for publisher confirms.
    pub fn flush_confirms(&mut self) {
        if self.confirm_dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.confirm_dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for ch in dirty {
            let Some(chan) = self.channels.get_mut(&ch) else {
                continue;
            };
            let Some(c) = chan.confirms.as_mut() else {
                continue;
            };
            let n = (c.done_acks.len() + c.done_nacks.len()) as u64;
            crate::stats::bump(&self.stats.confirm, n);
            crate::stats::bump(&chan.stats.confirm, n);
            for (seq, multiple, ack) in c.drain() {
                let m = if ack {
                    basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: seq,
                        multiple,
                    })
                } else {
                    basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple,
                        requeue: false,
                    })
                };
                let _ = self.method(ch, AMQPClass::Basic(m));
            }
        }
    }

    pub fn mark_confirm_dirty(&mut self, ch: u16) {
        self.confirm_dirty.push(ch);
    }

    /// Kicks every queue this connection consumes from (back-pressure relieved).
    pub fn kick_consumed_queues(&self) {
        for chan in self.channels.values() {
            for q in chan.consumer_queues() {
                q.kick();
            }
        }
    }
}

/// Which permission a method needs.
#[derive(Debug, Clone, Copy)]
pub enum PermKind {
    Configure,
    Write,
    Read,
}

impl PermKind {
    fn as_str(self) -> &'static str {
        match self {
            PermKind::Configure => "configure",
            PermKind::Write => "write",
            PermKind::Read => "read",
        }
    }
}

/// Gives held deliveries back to their queues (the client never saw them).
pub async fn requeue_held(held: VecDeque<Delivery>) {
    let mut by_queue: Vec<(QueueHandle, Vec<u64>)> = Vec::new();
    for d in held {
        let Some(q) = d.queue else { continue };
        match by_queue.iter_mut().find(|(x, _)| Arc::ptr_eq(x, &q)) {
            Some((_, ids)) => ids.push(d.msg_id),
            None => by_queue.push((q, vec![d.msg_id])),
        }
    }
    for (q, ids) in by_queue {
        q.settle(ids, Settle::Requeue).await;
    }
}

/// A session's vhost borrowed from its field (`&s.vhost`), so the rest of the session stays free to
/// borrow mutably; refused while the connection is not open.
pub fn open_vhost(vhost: &Option<Arc<Vhost>>) -> Result<&Arc<Vhost>, ChannelError> {
    vhost
        .as_ref()
        .ok_or_else(|| ChannelError::access_refused("connection not open"))
}
