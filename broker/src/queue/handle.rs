//! The typed API of a queue: what code outside `queue/` may ask of one, as methods on its
//! handle ([`QueueInfo`], shared as [`QueueHandle`]). The mailbox commands behind them are the
//! queue's own business, so that a handle can later stand for a queue on another node (the
//! same calls, carried over the link to the master).
//!
//! Everything crosses as values: messages and confirm tickets in, deliveries and results out,
//! and consumer credit as numbers (a consumer's prefetch, its channel's flow) rather than
//! state shared with the channel. A queue that is gone answers as RabbitMQ does for one
//! deleted under the client: publishes are confirmed, `get` is empty, `purge` and `delete`
//! report nothing, `consume` is 404.

use super::*;

/// What to do with deliveries a client settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// basic.ack: the messages leave the queue.
    Ack,
    /// basic.nack/reject with requeue (or a channel that closed): back in the queue,
    /// redelivered.
    Requeue,
    /// basic.nack/reject without requeue: dead-lettered or dropped.
    Discard,
}

/// Identifies one consumer of a queue: the connection, channel (with its generation: a
/// channel number reused after a close is another channel) and consumer tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRef {
    pub conn_id: u64,
    pub channel: u16,
    pub generation: u64,
    pub tag: Arc<str>,
}

impl QueueCmd {
    /// A publish command leaves the sending connection's credit (see [`super::flow`]): taken
    /// in by a queue, forwarded to another node, or dropped.
    pub(crate) fn publish_taken(&self) {
        match self {
            QueueCmd::Publish { from: Some(f), .. } => f.flow.taken(1),
            QueueCmd::PublishBatch(items, Some(f)) => f.flow.taken(items.len()),
            _ => {}
        }
    }
}

impl QueueInfo {
    /// Publishes messages to the queue, in order; each confirm (if any) is sent once the
    /// queue has the message safely (see `confirm.rs`). Waits for room in the mailbox:
    /// back-pressure to publishers. `from`: the publishing connection, which a queue whose
    /// consumers cannot keep up blocks (see [`super::flow`]); None for publishes that must
    /// not be held back (forwarded from another node, the management API).
    pub async fn publish(&self, mut items: Vec<PublishItem>, from: Option<&Arc<ConnShared>>) {
        if let Some(f) = from {
            f.flow.sent(items.len());
        }
        let from = from.cloned();
        let cmd = if items.len() == 1 {
            match items.pop() {
                Some((msg, confirm)) => QueueCmd::Publish { msg, confirm, from },
                None => return,
            }
        } else {
            QueueCmd::PublishBatch(items, from)
        };
        if let Err(e) = self.tx.send(cmd).await {
            // Gone between routing and sending: confirmed, as a publish to a deleted queue.
            e.0.publish_taken();
            let tickets: Vec<ConfirmTicket> = match e.0 {
                QueueCmd::Publish { confirm, .. } => confirm.into_iter().collect(),
                QueueCmd::PublishBatch(v, _) => v.into_iter().filter_map(|(_, c)| c).collect(),
                _ => Vec::new(),
            };
            if !tickets.is_empty() {
                tracing::debug!(queue = %self.name, confirms = tickets.len(), "publish to a queue that is gone: acked");
            }
            for t in tickets {
                t.send(true);
            }
        }
    }

    /// Hands a command to this queue's mailbox as it is: a retired proxy passes on what its
    /// holders still send it to the queue that took its place. If this queue is gone too, a
    /// publish is confirmed (as a publish to a deleted queue) and replies are dropped (their
    /// callers see the queue gone).
    pub(crate) async fn forward(&self, cmd: QueueCmd) {
        if let Err(e) = self.tx.send(cmd).await {
            e.0.publish_taken();
            let tickets: Vec<ConfirmTicket> = match e.0 {
                QueueCmd::Publish { confirm, .. } => confirm.into_iter().collect(),
                QueueCmd::PublishBatch(v, _) => v.into_iter().filter_map(|(_, c)| c).collect(),
                _ => Vec::new(),
            };
            for t in tickets {
                t.send(true);
            }
        }
    }

    /// Publishes without waiting (from queue actors: one queue never waits on another); a
    /// full mailbox gets the publish from a task of its own.
    pub fn publish_detached(self: &Arc<Self>, msg: Arc<Message>) {
        let cmd = QueueCmd::Publish {
            msg,
            confirm: None,
            from: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let q = self.clone();
            tokio::spawn(async move {
                let _ = q.tx.send(cmd).await;
            });
        }
    }

    /// Registers a consumer; deliveries follow as [`ClientEvent`]s on `spec.events`.
    pub async fn consume(&self, spec: ConsumerSpec) -> Result<(), ChannelError> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(QueueCmd::Consume { spec, reply }).await;
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Removes a consumer (its unacked deliveries stay with its channel until settled).
    pub async fn cancel(&self, consumer: ConsumerRef) {
        let _ = self
            .tx
            .send(QueueCmd::Cancel {
                conn_id: consumer.conn_id,
                channel: consumer.channel,
                generation: consumer.generation,
                tag: consumer.tag,
            })
            .await;
    }

    /// channel.flow for the consumers of one channel on this queue.
    pub fn flow(&self, conn_id: u64, channel: u16, generation: u64, active: bool) {
        // A full mailbox: the queue is busy; flow is a hint RabbitMQ applies eventually too.
        self.try_send(QueueCmd::Flow {
            conn_id,
            channel,
            generation,
            active,
        });
    }

    /// A consumer's prefetch changed (its channel's global prefetch did).
    pub fn set_prefetch(&self, consumer: ConsumerRef, prefetch: u16) {
        self.try_send(QueueCmd::Prefetch { consumer, prefetch });
        self.kick();
    }

    /// basic.get: the next ready message, if any. With `no_ack` it leaves the queue at once.
    pub async fn get(&self, no_ack: bool) -> Option<GetResult> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(QueueCmd::Get { no_ack, reply }).await.is_err() {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Settles deliveries (message ids of this queue).
    pub async fn settle(&self, ids: Vec<u64>, how: Settle) {
        let cmd = match how {
            Settle::Ack => QueueCmd::Ack { ids },
            Settle::Requeue => QueueCmd::Reject { ids, requeue: true },
            Settle::Discard => QueueCmd::Reject {
                ids,
                requeue: false,
            },
        };
        let _ = self.tx.send(cmd).await;
    }

    /// Removes every ready message; the number removed, None if the queue is gone.
    /// The ready messages and consumers as the queue has them after every command sent to it
    /// before (RabbitMQ's queue.declare-ok counts come from the queue process the same way);
    /// the counts it last published if it is gone.
    pub async fn stat(&self) -> (u32, u32) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(QueueCmd::Stat { reply }).await.is_ok() {
            if let Ok(counts) = rx.await {
                return counts;
            }
        }
        (self.message_count(), self.consumer_count())
    }

    pub async fn purge(&self) -> Option<u32> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(QueueCmd::Purge { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Deletes the queue (consumers get basic.cancel); the number of ready messages it had.
    /// Refused with 406 when `if_unused` and it has consumers, or `if_empty` and it has
    /// messages. A queue already gone: Ok(0).
    pub async fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, ChannelError> {
        let (reply, rx) = oneshot::channel();
        let cmd = QueueCmd::Delete {
            if_unused,
            if_empty,
            reply: Some(reply),
        };
        if self.tx.send(cmd).await.is_err() {
            return Ok(0);
        }
        rx.await.unwrap_or(Ok(0))
    }

    /// Whether the queue's actor has stopped (deleted, or the node is shutting down).
    pub fn is_gone(&self) -> bool {
        self.tx.is_closed()
    }

    /// Redeclared (or used by basic.get): restarts the x-expires idle timer.
    pub fn touch(&self) {
        self.try_send(QueueCmd::Touch);
    }

    /// Credit may have become available (a connection drained its output): deliver again.
    pub fn kick(&self) {
        self.try_send(QueueCmd::Kick);
    }

    fn gone(&self) -> ChannelError {
        ChannelError::not_found(format!(
            "no queue '{}' in vhost '{}'",
            self.name, self.vhost
        ))
    }
}
