//! The master's side of the queue protocol: requests from other nodes ([`ToMaster`]) run on
//! this node's queues as if their clients were local, and what the queues send those clients
//! goes back as [`FromMaster`].
//!
//! Each remote connection gets a connection id of this node (from the broker's own counter, so
//! it never meets a local one) and a forwarder task: the queue delivers to it as to a local
//! connection (with the same output back-pressure: `pending` drops as the forwarder hands
//! deliveries to the link). Confirms of one peer share a forwarder keyed by ticket.
//!
//! The master remembers which messages it delivered to each peer and not yet settled; settles
//! for anything else (stale ids after a restart) are ignored. When the link to a peer goes
//! down, that peer's consumers are cancelled and its unsettled messages requeued (redelivered).

use super::remote::{local_msg, wire_msg, UNREACHABLE};
use super::wire::{FromMaster, QueueRef, RemoteConsumer, Reply, ToMaster, FROM_MASTER, TO_MASTER};
use crate::queue::{
    ClientEvent, ClientTx, ConfirmTicket, ConnShared, ConsumerRef, ConsumerSpec, QueueHandle,
    Settle,
};
use crate::BrokerShared;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use warren_cluster::{Cluster, NodeId, PeerEvent};

/// How long a publish for a queue this node is about to master waits for this node to apply
/// its promotion (a peer that applied it first already sends here).
const PROMOTION_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Default)]
struct Peer {
    /// Remote connection -> (local id, its forwarder's sender, its output state).
    conns: HashMap<u64, (u64, ClientTx, Arc<ConnShared>)>,
    confirms: Option<ClientTx>,
    consumers: HashSet<(QueueRef, u64, u16, u64, Arc<str>)>,
    /// Delivered to this peer, not settled yet, per queue.
    outstanding: HashMap<QueueRef, HashSet<u64>>,
}

/// This node's side of the queues it masters, for the other nodes.
pub struct Serve {
    shared: Weak<BrokerShared>,
    cluster: Cluster,
    peers: Mutex<HashMap<NodeId, Peer>>,
}

impl Serve {
    pub fn start(shared: &Arc<BrokerShared>, cluster: Cluster) -> Arc<Serve> {
        let me = Arc::new(Serve {
            shared: Arc::downgrade(shared),
            cluster: cluster.clone(),
            peers: Mutex::default(),
        });
        let mut inbox = cluster.subscribe_app(TO_MASTER);
        let mut events = cluster.peer_events();
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbox.recv() => {
                        let Some(m) = m else { return };
                        let Some(me) = weak.upgrade() else { return };
                        match ToMaster::decode(&m.payload) {
                            Some(req) => me.on_request(m.from, req).await,
                            None => warn!(from = m.from, "undecodable queue request from a peer; dropped"),
                        }
                    }
                    ev = events.recv() => {
                        let Some(me) = weak.upgrade() else { return };
                        if let Ok(PeerEvent::Down(peer)) = ev {
                            me.peer_gone(peer).await;
                        }
                    }
                }
            }
        });
        me
    }

    /// [`Serve::queue`], waiting a moment (requests keep their order) while this node is
    /// about to master `q`: the state names it and it has not applied that yet, or the
    /// state's master is down (a promotion in progress that a peer already applied).
    async fn master_queue(&self, q: &QueueRef) -> Option<QueueHandle> {
        let mut h = self.queue(q);
        if h.is_none() && self.promotion_pending(q) {
            let end = tokio::time::Instant::now() + PROMOTION_CATCH_UP;
            while h.is_none() && tokio::time::Instant::now() < end {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                h = self.queue(q);
            }
        }
        h
    }

    fn promotion_pending(&self, q: &QueueRef) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let Some(link) = shared.cluster() else {
            return false;
        };
        let st = link.state();
        let Some(v) = st.get(&super::keys::queue(&q.vhost, &q.name)) else {
            return false;
        };
        let Some(master) = v.value["placement"]["master"].as_str() else {
            return false;
        };
        master == shared.config.node_name
            || !link.members().iter().any(|m| m.name == master && m.running)
    }

    /// Whether the cluster has queue `q` at all (mastered here or not).
    fn known(&self, q: &QueueRef) -> bool {
        self.shared
            .upgrade()
            .and_then(|s| s.cluster().cloned())
            .is_some_and(|l| {
                l.state()
                    .get(&super::keys::queue(&q.vhost, &q.name))
                    .is_some()
            })
    }

    /// The local queue `q` mastered here (None: unknown here, or a proxy of another node's).
    fn queue(&self, q: &QueueRef) -> Option<QueueHandle> {
        let shared = self.shared.upgrade()?;
        let h = shared.vhost(&q.vhost)?.queue(&q.name)?;
        let me = shared.config.node_name.as_str();
        let st = shared.cluster()?.state();
        let v = st.get(&super::keys::queue(&q.vhost, &q.name))?;
        (v.value["placement"]["master"] == me).then_some(h)
    }

    fn reply(&self, to: NodeId, req: u64, reply: Reply) {
        self.send(to, &FromMaster::Reply { req, reply });
    }

    fn send(&self, to: NodeId, msg: &FromMaster) {
        if let Err(e) = self.cluster.send(to, FROM_MASTER, msg.encode()) {
            debug!(to, error = %e, "queue message to a peer not sent");
        }
    }

    /// The forwarder of confirms to `peer`.
    fn confirms(self: &Arc<Self>, peer: NodeId) -> ClientTx {
        let mut peers = self.peers.lock();
        let p = peers.entry(peer).or_default();
        if let Some(tx) = &p.confirms {
            return tx.clone();
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<ClientEvent>();
        p.confirms = Some(tx.clone());
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                if let ClientEvent::Confirm { seq, ok, .. } = ev {
                    me.send(peer, &FromMaster::Confirm { ticket: seq, ok });
                }
            }
        });
        tx
    }

    /// The local id, forwarder and output state of `peer`'s connection `conn`.
    fn conn(self: &Arc<Self>, peer: NodeId, conn: u64) -> Option<(u64, ClientTx, Arc<ConnShared>)> {
        let shared = self.shared.upgrade()?;
        let mut peers = self.peers.lock();
        let p = peers.entry(peer).or_default();
        if let Some(c) = p.conns.get(&conn) {
            return Some(c.clone());
        }
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel::<ClientEvent>();
        let out = Arc::new(ConnShared::default());
        p.conns.insert(conn, (id, tx.clone(), out.clone()));
        let me = Arc::downgrade(self);
        let out2 = out.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                match ev {
                    ClientEvent::Deliver(d) => me.forward(peer, conn, &out2, vec![d]),
                    ClientEvent::Deliveries(ds) => me.forward(peer, conn, &out2, ds),
                    ClientEvent::Cancelled {
                        channel,
                        generation,
                        tag,
                    } => {
                        me.send(
                            peer,
                            &FromMaster::Cancelled {
                                consumer: RemoteConsumer {
                                    conn,
                                    channel,
                                    generation,
                                    tag: tag.to_string(),
                                },
                            },
                        );
                    }
                    _ => {}
                }
            }
        });
        Some((id, tx, out))
    }

    fn forward(&self, peer: NodeId, conn: u64, out: &ConnShared, ds: Vec<crate::queue::Delivery>) {
        let n = ds.len();
        let mut by_queue: HashMap<QueueRef, (QueueHandle, Vec<super::wire::WireDelivery>)> =
            HashMap::new();
        for d in ds {
            let Some(q) = d.queue.clone() else { continue };
            let qr = QueueRef {
                vhost: q.vhost.to_string(),
                name: q.name.to_string(),
            };
            let e = by_queue.entry(qr).or_insert_with(|| (q, Vec::new()));
            e.1.push(super::wire::WireDelivery {
                channel: d.channel,
                generation: d.generation,
                tag: d.consumer_tag.to_string(),
                msg_id: d.msg_id,
                msg: wire_msg(&d.msg),
                redelivered: d.redelivered,
                no_ack: d.no_ack,
            });
        }
        {
            let mut peers = self.peers.lock();
            let p = peers.entry(peer).or_default();
            for (qr, (_, ws)) in &by_queue {
                let set = p.outstanding.entry(qr.clone()).or_default();
                set.extend(ws.iter().filter(|w| !w.no_ack).map(|w| w.msg_id));
            }
        }
        for (qr, (q, deliveries)) in by_queue {
            self.send(
                peer,
                &FromMaster::Deliver {
                    conn,
                    queue: qr,
                    deliveries,
                },
            );
            if out.starved.swap(false, Ordering::AcqRel) {
                q.kick();
            }
        }
        out.pending.fetch_sub(
            n.min(out.pending.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }

    async fn on_request(self: &Arc<Self>, from: NodeId, req: ToMaster) {
        match req {
            ToMaster::Publish { queue, items } => {
                let Some(shared) = self.shared.upgrade() else {
                    return;
                };
                let memory = shared.node.memory;
                let q = self.master_queue(&queue).await;
                let confirms = self.confirms(from);
                let mut batch = Vec::with_capacity(items.len());
                for (m, ticket) in items {
                    let t = ticket.map(|seq| ConfirmTicket {
                        events: confirms.clone(),
                        conn_id: 0,
                        channel: 0,
                        generation: 0,
                        seq,
                    });
                    match (&q, local_msg(memory, m)) {
                        (Some(_), Some(msg)) => batch.push((msg, t)),
                        // Not a queue of this node (any more), or a message that does not
                        // parse: not stored, basic.nack.
                        _ => {
                            if let Some(t) = t {
                                t.send(false);
                            }
                        }
                    }
                }
                if let Some(q) = q {
                    q.publish(batch, None).await;
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
                let Some(q) = self.master_queue(&queue).await else {
                    // A queue the cluster has, mastered elsewhere as this node sees it (its
                    // promotion here not applied yet): the asker tries again shortly.
                    let err = if self.known(&queue) {
                        (405, format!("{UNREACHABLE} queue '{}' in vhost '{}' is not mastered on this node (yet)", queue.name, queue.vhost))
                    } else {
                        (
                            404,
                            format!("no queue '{}' in vhost '{}'", queue.name, queue.vhost),
                        )
                    };
                    self.reply(from, req, Reply::Done(Err(err)));
                    return;
                };
                let Some((id, events, conn)) = self.conn(from, consumer.conn) else {
                    return;
                };
                let tag: Arc<str> = consumer.tag.as_str().into();
                let spec = ConsumerSpec {
                    tag: tag.clone(),
                    conn_id: id,
                    channel: consumer.channel,
                    generation: consumer.generation,
                    no_ack,
                    exclusive,
                    prefetch,
                    flow_active,
                    priority,
                    cancel_on_ha_failover: false,
                    events,
                    conn,
                };
                let r = q.consume(spec).await;
                if r.is_ok() {
                    self.peers
                        .lock()
                        .entry(from)
                        .or_default()
                        .consumers
                        .insert((queue, id, consumer.channel, consumer.generation, tag));
                }
                self.reply(
                    from,
                    req,
                    Reply::Done(r.map(|_| 0).map_err(|e| (e.reply_code(), e.reply_text()))),
                );
            }
            ToMaster::Cancel { queue, consumer } => {
                let Some((id, _, _)) = self.conn(from, consumer.conn) else {
                    return;
                };
                let tag: Arc<str> = consumer.tag.as_str().into();
                self.peers
                    .lock()
                    .entry(from)
                    .or_default()
                    .consumers
                    .remove(&(
                        queue.clone(),
                        id,
                        consumer.channel,
                        consumer.generation,
                        tag.clone(),
                    ));
                if let Some(q) = self.queue(&queue) {
                    q.cancel(ConsumerRef {
                        conn_id: id,
                        channel: consumer.channel,
                        generation: consumer.generation,
                        tag,
                    })
                    .await;
                }
            }
            ToMaster::Flow {
                queue,
                conn,
                channel,
                generation,
                active,
            } => {
                let Some((id, _, _)) = self.conn(from, conn) else {
                    return;
                };
                if let Some(q) = self.queue(&queue) {
                    q.flow(id, channel, generation, active);
                }
            }
            ToMaster::Prefetch {
                queue,
                consumer,
                prefetch,
            } => {
                let Some((id, _, _)) = self.conn(from, consumer.conn) else {
                    return;
                };
                if let Some(q) = self.queue(&queue) {
                    q.set_prefetch(
                        ConsumerRef {
                            conn_id: id,
                            channel: consumer.channel,
                            generation: consumer.generation,
                            tag: consumer.tag.as_str().into(),
                        },
                        prefetch,
                    );
                }
            }
            ToMaster::Get { queue, req, no_ack } => {
                let got = match self.queue(&queue) {
                    Some(q) => q.get(no_ack).await,
                    None => None,
                };
                let reply = got.map(|g| {
                    if !no_ack {
                        self.peers
                            .lock()
                            .entry(from)
                            .or_default()
                            .outstanding
                            .entry(queue.clone())
                            .or_default()
                            .insert(g.msg_id);
                    }
                    (g.msg_id, wire_msg(&g.msg), g.redelivered, g.remaining)
                });
                self.reply(from, req, Reply::Got(reply));
            }
            ToMaster::Settle { queue, ids, how } => {
                let ids: Vec<u64> = {
                    let mut peers = self.peers.lock();
                    let p = peers.entry(from).or_default();
                    let Some(set) = p.outstanding.get_mut(&queue) else {
                        return;
                    };
                    ids.into_iter().filter(|id| set.remove(id)).collect()
                };
                if ids.is_empty() {
                    return;
                }
                let how = match how {
                    0 => Settle::Ack,
                    1 => Settle::Requeue,
                    _ => Settle::Discard,
                };
                if let Some(q) = self.queue(&queue) {
                    q.settle(ids, how).await;
                }
            }
            ToMaster::Purge { queue, req } => {
                let n = match self.queue(&queue) {
                    Some(q) => q.purge().await.unwrap_or(0),
                    None => 0,
                };
                self.reply(from, req, Reply::Done(Ok(n)));
            }
            ToMaster::Delete {
                queue,
                req,
                if_unused,
                if_empty,
            } => {
                let r = match (self.shared.upgrade(), self.queue(&queue)) {
                    (Some(shared), Some(q)) => match shared.vhost(&queue.vhost) {
                        Some(vh) => vh.delete_queue(&q, if_unused, if_empty).await,
                        None => Ok(0),
                    },
                    _ => Ok(0),
                };
                self.reply(
                    from,
                    req,
                    Reply::Done(r.map_err(|e| (e.reply_code(), e.reply_text()))),
                );
            }
            ToMaster::Touch { queue } => {
                if let Some(q) = self.queue(&queue) {
                    q.touch();
                }
            }
            ToMaster::Kick { queue } => {
                if let Some(q) = self.queue(&queue) {
                    q.kick();
                }
            }
            ToMaster::Stat { queue, req, exact } => {
                let stat = match self.queue(&queue) {
                    Some(q) if exact => Some(q.stat().await),
                    Some(q) => Some((q.message_count(), q.consumer_count())),
                    None => None,
                };
                self.reply(from, req, Reply::Stat(stat));
            }
            ToMaster::Sync { queue, req, cancel } => {
                let done = self
                    .shared
                    .upgrade()
                    .and_then(|s| s.cluster().cloned())
                    .is_some_and(|link| link.sync_local(&queue, cancel));
                let r = if done {
                    Ok(0)
                } else {
                    Err((404, format!("queue '{}' is not mastered here", queue.name)))
                };
                self.reply(from, req, Reply::Done(r));
            }
        }
    }

    /// `peer`'s link went down: its consumers are cancelled and what it held requeued.
    async fn peer_gone(&self, peer: NodeId) {
        let Some(p) = self.peers.lock().remove(&peer) else {
            return;
        };
        for (queue, id, channel, generation, tag) in p.consumers {
            if let Some(q) = self.queue(&queue) {
                q.cancel(ConsumerRef {
                    conn_id: id,
                    channel,
                    generation,
                    tag,
                })
                .await;
            }
        }
        for (queue, ids) in p.outstanding {
            if ids.is_empty() {
                continue;
            }
            if let Some(q) = self.queue(&queue) {
                q.settle(ids.into_iter().collect(), Settle::Requeue).await;
            }
        }
    }
}
