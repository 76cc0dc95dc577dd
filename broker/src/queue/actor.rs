//! The queue actor: the async shell around one queue's [`QueueCore`]. It is the only part of a
//! queue that waits: on its mailbox, on the store's events, on the core's next deadline and on
//! its node's paging signal. After each wake-up it lets the core take a turn, carries out the
//! core's effects (deliveries and cancellations to connections, dead-lettered copies routed
//! through the vhost, the queue's removal from its vhost) and then flushes the queue's log, so
//! that deliveries are on their way before the log may sync on this thread.

use super::core::{Effect, QueueCore};
use super::*;
use crate::node::Node;
use crate::stats;
use crate::store::StoreEvent;
use std::sync::Weak;
use tokio::time::{sleep_until, Instant};

/// Commands taken from the mailbox per wake-up before the queue does its turn.
const COMMAND_BATCH: usize = 256;

/// The actor. Created by the vhost, which keeps the [`QueueHandle`].
pub struct QueueActor {
    core: QueueCore,
    handle: QueueHandle,
    vhost: Weak<dyn QueueHost>,
    /// The node the queue runs on: its paging signal and totals.
    node: Arc<Node>,
    /// Store events for a durable queue.
    store_rx: Option<mpsc::UnboundedReceiver<StoreEvent>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl QueueActor {
    pub fn new(
        handle: QueueHandle,
        vhost: Weak<dyn QueueHost>,
        log: Box<dyn crate::store::QueueLog>,
        node: Arc<Node>,
    ) -> Self {
        let label: Arc<str> = format!("'{}' in vhost '{}'", handle.name, handle.vhost).into();
        let pager = node.paging.pager(label);
        let core = QueueCore::new(handle.clone(), log, pager, Instant::now(), unix_ms());
        Self {
            core,
            handle,
            vhost,
            node,
            store_rx: None,
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
        self.core = self.core.recover(recovered, Instant::now(), unix_ms());
        self
    }

    /// Runs until the queue is deleted or every handle is gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let mut store_rx = self.store_rx.take();
        let mut paging_rx = self.node.paging.subscribe();
        loop {
            let deadline = self.core.poll_timeout(Instant::now());
            tokio::select! {
                ev = async {
                    match store_rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match ev {
                        Some(ev) => self.core.store_event(ev),
                        None => store_rx = None,
                    }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let now = Instant::now();
                    self.core.command(cmd, now);
                    let mut n = 0;
                    while !self.core.is_deleted() && n < COMMAND_BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => self.core.command(cmd, now),
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
                            self.core.paging_started();
                        }
                        Err(_) => paging_rx = self.node.paging.subscribe(),
                    }
                }
            }
            self.core.turn(Instant::now(), self.node.paging.pressure());
            self.carry_out();
            if self.core.is_deleted() {
                break;
            }
            // Last, once this round's deliveries are handed to their connections (if the log
            // syncs on this thread, another runtime thread sends them meanwhile).
            let woke = self.core.take_round_delivered();
            self.core.sync_mirrors();
            self.core.log_mut().flush(rx.is_empty(), woke);
        }
        // Answer what is still queued so nobody waits forever.
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                // The queue is deleted: the core acks them, as publishes to a deleted queue.
                cmd @ (QueueCmd::Publish { .. } | QueueCmd::PublishBatch(..)) => {
                    self.core.command(cmd, Instant::now())
                }
                QueueCmd::Consume { reply, .. } => {
                    let _ = reply.send(Err(self.core.not_found()));
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
                if let ev @ StoreEvent::WriteFailed { .. } = ev {
                    self.core.store_event(ev);
                }
            }
        }
        self.node.stats.queue_gone(&self.handle.stats);
        stats::churn(&self.node.stats.churn.queue_deleted);
    }

    /// Carries out what the core decided, in order; deliveries that cannot reach their
    /// connection go back to the core (which may produce more effects).
    fn carry_out(&mut self) {
        loop {
            let effects = self.core.take_effects();
            if effects.is_empty() {
                return;
            }
            for e in effects {
                match e {
                    Effect::Deliver {
                        events,
                        conn,
                        mut deliveries,
                    } => {
                        let ev = if deliveries.len() == 1 {
                            match deliveries.pop() {
                                Some(d) => ClientEvent::Deliver(d),
                                None => continue,
                            }
                        } else {
                            ClientEvent::Deliveries(deliveries)
                        };
                        if let Err(mpsc::error::SendError(ev)) = events.send(ev) {
                            let lost = match ev {
                                ClientEvent::Deliver(d) => vec![d],
                                ClientEvent::Deliveries(v) => v,
                                _ => Vec::new(),
                            };
                            self.core.undeliverable(&conn, lost, Instant::now());
                        }
                    }
                    Effect::Cancelled {
                        events,
                        channel,
                        generation,
                        tag,
                    } => {
                        let _ = events.send(ClientEvent::Cancelled {
                            channel,
                            generation,
                            tag,
                        });
                    }
                    Effect::DeadLetter(msg) => self.route_dead_letter(msg),
                    Effect::Deleted => {
                        if let Some(v) = self.vhost.upgrade() {
                            v.remove_queue(&self.handle);
                        }
                    }
                }
            }
        }
    }

    /// Publishes a dead-lettered copy through the vhost. Never blocks one queue on another: a
    /// full mailbox gets the publish from a task of its own.
    fn route_dead_letter(&self, msg: Arc<Message>) {
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let mut targets = Vec::new();
        vhost.route_message(&msg, &mut targets);
        for q in targets {
            q.publish_detached(msg.clone());
        }
    }
}
