//! Queues: each queue is an owned task (actor, see [`actor`]) fed through a bounded mpsc, so a
//! slow queue only slows its own publishers. Connections hold [`QueueHandle`]s; queues talk back
//! to connections through [`ClientEvent`]s on the connection's own channel.

pub mod activity;
pub mod actor;
pub mod args;
pub mod confirm;
pub mod core;
pub mod deadletter;
pub mod handle;
pub mod ready;

use crate::error::ChannelError;
use crate::memory::Memory;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::ShortString;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub use args::QueueArgs;
pub use handle::{ConsumerRef, Settle};

/// Capacity of a queue's command channel.
pub const QUEUE_MAILBOX: usize = 8192;
/// A queue stops delivering to a connection that has this many deliveries not yet encoded.
pub const CONN_PENDING_LIMIT: usize = 8192;

/// A published message. Shared (`Arc`) by every queue it is routed to; the body is stored once.
/// Its bytes count in its node's memory account from [`Message::new`] until it is dropped.
#[derive(Debug)]
pub struct Message {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: AMQPProperties,
    /// Pre-encoded content header payload (class, weight, size, properties).
    pub header_payload: Bytes,
    pub body: Bytes,
    /// Per-message TTL from the `expiration` property, milliseconds.
    pub expiration_ms: Option<u64>,
    /// The account charged for this message (a plain reference: nothing to count per message).
    memory: &'static Memory,
    /// The body is another message's (a copy with other headers): not charged again.
    body_shared: bool,
}

impl Message {
    /// A message charged to `memory`, its node's account (see [`crate::memory`]).
    pub fn new(
        memory: &'static Memory,
        exchange: ShortString,
        routing_key: ShortString,
        properties: AMQPProperties,
        body: Bytes,
    ) -> Result<Self, crate::error::CodecError> {
        let header_payload =
            crate::codec::encode_content_header_payload(body.len() as u64, &properties)?.into();
        let expiration_ms = properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok());
        memory.charge(Self::accounted(&header_payload, &body, false));
        Ok(Self {
            exchange,
            routing_key,
            properties,
            header_payload,
            body,
            expiration_ms,
            memory,
            body_shared: false,
        })
    }

    /// A copy of this message for one delivery with `headers` as its headers, sharing the body
    /// (charged for its header only).
    pub fn with_headers(
        &self,
        headers: amq_protocol::types::FieldTable,
    ) -> Result<Self, crate::error::CodecError> {
        let properties = self.properties.clone().with_headers(headers);
        let header_payload =
            crate::codec::encode_content_header_payload(self.body.len() as u64, &properties)?
                .into();
        self.memory
            .charge(Self::accounted(&header_payload, &self.body, true));
        Ok(Self {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            properties,
            header_payload,
            body: self.body.clone(),
            expiration_ms: self.expiration_ms,
            memory: self.memory,
            body_shared: true,
        })
    }

    /// The memory account this message is charged to; copies made from it (dead-lettering)
    /// are charged there too.
    pub fn memory(&self) -> &'static Memory {
        self.memory
    }

    /// Bytes this message counts for in its memory account.
    fn accounted(header_payload: &Bytes, body: &Bytes, body_shared: bool) -> u64 {
        let body = if body_shared { 0 } else { body.len() };
        (header_payload.len() + body + std::mem::size_of::<Self>()) as u64
    }

    /// delivery-mode 2.
    pub fn persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }

    pub fn priority(&self) -> u8 {
        self.properties.priority().unwrap_or(0)
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        self.memory.release(Self::accounted(
            &self.header_payload,
            &self.body,
            self.body_shared,
        ));
    }
}

/// State a connection shares with queues delivering to it (output back-pressure).
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Deliveries sent to the connection and not yet encoded into its write buffer.
    pub pending: AtomicUsize,
    /// Set by a queue that skipped this connection for back-pressure; the connection kicks its
    /// queues when it has drained.
    pub starved: AtomicBool,
}

/// A delivery on its way to a connection.
#[derive(Debug)]
pub struct Delivery {
    pub channel: u16,
    pub generation: u64,
    pub consumer_tag: Arc<str>,
    /// None for direct reply-to (no queue).
    pub queue: Option<QueueHandle>,
    pub msg_id: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub no_ack: bool,
}

/// Events queues (and other broker parts) send to a connection task.
#[derive(Debug)]
pub enum ClientEvent {
    Deliver(Delivery),
    /// Several deliveries from one dispatch pass of one queue (one wake-up for many messages).
    Deliveries(Vec<Delivery>),
    /// Publisher confirm outcome for one sequence number.
    Confirm {
        channel: u16,
        generation: u64,
        seq: u64,
        ok: bool,
    },
    /// Server-side basic.cancel (queue deleted).
    Cancelled {
        channel: u16,
        generation: u64,
        tag: Arc<str>,
    },
    /// Force the connection closed (management, shutdown of one connection).
    Close(crate::error::ConnectionError),
    /// Management: describe the connection's channels.
    Inspect(oneshot::Sender<Vec<crate::stats::ChannelSnapshot>>),
}

pub type ClientTx = mpsc::UnboundedSender<ClientEvent>;

/// Where a queue reports the confirm for one publish.
#[derive(Debug, Clone)]
pub struct ConfirmTicket {
    pub events: ClientTx,
    /// The publishing connection.
    pub conn_id: u64,
    pub channel: u16,
    pub generation: u64,
    pub seq: u64,
}

impl ConfirmTicket {
    /// The publisher waiting for this confirm: connection and channel.
    pub fn publisher(&self) -> (u64, u16) {
        (self.conn_id, self.channel)
    }

    pub fn send(&self, ok: bool) {
        let _ = self.events.send(ClientEvent::Confirm {
            channel: self.channel,
            generation: self.generation,
            seq: self.seq,
            ok,
        });
    }
}

/// One publish for a queue: the shared message and where to confirm it.
pub type PublishItem = (Arc<Message>, Option<ConfirmTicket>);

/// A consumer as registered with a queue.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub tag: Arc<str>,
    pub conn_id: u64,
    pub channel: u16,
    pub generation: u64,
    pub no_ack: bool,
    pub exclusive: bool,
    /// How many unacked deliveries the consumer may hold (0 = unlimited): its basic.qos
    /// prefetch, capped by the channel's global prefetch (the channel holds back what goes
    /// beyond the global one across its consumers).
    pub prefetch: u16,
    /// channel.flow at consume time (later changes arrive as `Flow` commands).
    pub flow_active: bool,
    /// x-priority.
    pub priority: i64,
    /// x-cancel-on-ha-failover: when the queue's master dies, basic.cancel rather than
    /// consuming on from the promoted mirror.
    pub cancel_on_ha_failover: bool,
    pub events: ClientTx,
    pub conn: Arc<ConnShared>,
}

/// Result of basic.get.
#[derive(Debug)]
pub struct GetResult {
    pub msg_id: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub remaining: u32,
}

/// Commands a queue actor understands: the queue's own business (outside `queue/`, the
/// typed API in `handle.rs` sends them).
#[derive(Debug)]
pub(crate) enum QueueCmd {
    Publish {
        msg: Arc<Message>,
        confirm: Option<ConfirmTicket>,
    },
    /// Publishes decoded from one socket read, in order.
    PublishBatch(Vec<PublishItem>),
    Consume {
        spec: ConsumerSpec,
        reply: oneshot::Sender<Result<(), ChannelError>>,
    },
    Cancel {
        conn_id: u64,
        channel: u16,
        generation: u64,
        tag: Arc<str>,
    },
    /// A consumer's prefetch changed (0 = unlimited).
    Prefetch {
        consumer: ConsumerRef,
        prefetch: u16,
    },
    /// channel.flow for the consumers of one channel.
    Flow {
        conn_id: u64,
        channel: u16,
        generation: u64,
        active: bool,
    },
    Ack {
        ids: Vec<u64>,
    },
    Reject {
        ids: Vec<u64>,
        requeue: bool,
    },
    Get {
        no_ack: bool,
        reply: oneshot::Sender<Option<GetResult>>,
    },
    Purge {
        reply: oneshot::Sender<u32>,
    },
    Delete {
        if_unused: bool,
        if_empty: bool,
        reply: Option<oneshot::Sender<Result<u32, ChannelError>>>,
    },
    /// Redeclared: resets the x-expires idle timer.
    Touch,
    /// Credit may have become available somewhere: try to deliver.
    Kick,
}

/// What a queue needs from the vhost it lives in (implemented by `crate::vhost::Vhost`; the
/// queue module does not depend on the vhost's).
pub trait QueueHost: Send + Sync {
    /// The queues a dead-lettered copy goes to, by its exchange, routing key and headers.
    fn route_message(&self, msg: &Message, out: &mut Vec<QueueHandle>);
    /// The queue deleted itself: it leaves the vhost with its bindings.
    fn remove_queue(&self, q: &QueueHandle);
}

/// Static facts about a queue plus its mailbox. Cheap to clone.
#[derive(Debug)]
pub struct QueueInfo {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub durable: bool,
    pub auto_delete: bool,
    /// Owning connection of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    /// The arguments as declared (what a redeclare is compared with).
    pub args: QueueArgs,
    pub arguments: amq_protocol::types::FieldTable,
    /// The policies that apply and the settings in effect with them.
    pub policy: parking_lot::Mutex<Arc<QueuePolicy>>,
    /// Set when `policy` changed; the actor takes the new settings on its next turn (a
    /// shorter max-length drops or dead-letters at once).
    pub policy_changed: AtomicBool,
    /// The mailbox; outside `queue/`, use the typed API (`handle.rs`).
    tx: mpsc::Sender<QueueCmd>,
    pub message_count: AtomicU32,
    pub consumer_count: AtomicU32,
    /// Message counters for the management API (written by the actor).
    pub stats: crate::stats::QueueStats,
    /// Unacked bytes, idleness and consumer capacity for the management API (written by the
    /// actor).
    pub activity: activity::QueueActivity,
}

pub type QueueHandle = Arc<QueueInfo>;

/// What the policies make of a queue: the policies that apply and the queue's settings once
/// its arguments are resolved against them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueuePolicy {
    pub applied: crate::policy::Applied,
    /// The settings in effect (declared arguments resolved against `applied`).
    pub args: QueueArgs,
}

impl QueuePolicy {
    pub fn new(declared: &QueueArgs, applied: crate::policy::Applied) -> Self {
        let args = declared.resolve(&applied.definition);
        Self { applied, args }
    }
}

impl QueueInfo {
    /// A queue's handle and the receiving end of its mailbox (for its actor). `declared`: the
    /// arguments as declared; `applied`: the policies that apply to it now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: Arc<str>,
        vhost: Arc<str>,
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        args: QueueArgs,
        arguments: amq_protocol::types::FieldTable,
        applied: crate::policy::Applied,
    ) -> (QueueHandle, mpsc::Receiver<QueueCmd>) {
        let (tx, rx) = mpsc::channel(QUEUE_MAILBOX);
        let policy = parking_lot::Mutex::new(Arc::new(QueuePolicy::new(&args, applied)));
        let handle = Arc::new(QueueInfo {
            name,
            vhost,
            durable,
            auto_delete,
            exclusive_owner,
            args,
            arguments,
            policy,
            policy_changed: AtomicBool::new(false),
            tx,
            message_count: AtomicU32::new(0),
            consumer_count: AtomicU32::new(0),
            stats: Default::default(),
            activity: Default::default(),
        });
        (handle, rx)
    }

    /// Sends without waiting; used from queue actors (never block one queue on another).
    pub(crate) fn try_send(&self, cmd: QueueCmd) -> bool {
        self.tx.try_send(cmd).is_ok()
    }
    pub fn message_count(&self) -> u32 {
        self.message_count.load(Ordering::Relaxed)
    }
    pub fn consumer_count(&self) -> u32 {
        self.consumer_count.load(Ordering::Relaxed)
    }
    /// The policies that apply now and the settings in effect.
    pub fn policy(&self) -> Arc<QueuePolicy> {
        self.policy.lock().clone()
    }
    /// Applies `applied` (the policies now matching this queue); returns whether anything
    /// changed, in which case the actor is told.
    pub fn set_policy(&self, applied: crate::policy::Applied) -> bool {
        let next = QueuePolicy::new(&self.args, applied);
        {
            let mut cur = self.policy.lock();
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next);
        }
        self.policy_changed.store(true, Ordering::Release);
        // Wake the actor; with a full mailbox it is busy and sees the flag after this turn.
        self.try_send(QueueCmd::Kick);
        true
    }
}
