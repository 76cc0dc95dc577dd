//! Queues: each queue is an owned task (actor, see [`actor`]) fed through a bounded mpsc, so a
//! slow queue only slows its own publishers. Connections hold [`QueueHandle`]s; queues talk back
//! to connections through [`ClientEvent`]s on the connection's own channel.

pub mod activity;
pub mod actor;
pub mod args;
pub mod confirm;
pub mod core;
pub mod deadletter;
pub mod flow;
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
pub const CONN_PENDING_LIMIT: usize = 4096;

/// A published message. Shared (`Arc`) by every queue it is routed to; stored once.
///
/// Its parts live in one buffer, as they go on the wire: `exchange length (u8) | routing key
/// length (u8) | exchange | routing key | content header payload | body`, where the content
/// header payload (class, weight, body size, properties) is what deliveries send as is. So a
/// queued message is two allocations (this struct in its `Arc`, and the buffer) whatever its
/// properties. Properties are decoded only where needed ([`Message::properties`]); the few read
/// for every message (delivery mode, priority, expiration, whether it has headers) are read in
/// place ([`crate::codec::header_property`]).
///
/// Its bytes count in its node's memory account from construction until it is dropped.
pub struct Message {
    data: Box<[u8]>,
    /// The account charged for this message (a plain reference: nothing to count per message).
    memory: &'static Memory,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("header_len", &self.header_payload().len())
            .field("body_len", &self.body().len())
            .finish()
    }
}

/// Reference counts of the `Arc` a message lives in (charged with it).
const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();
/// Class, weight and body size at the start of a content header payload.
const HEADER_FIXED: usize = 12;

impl Message {
    /// A message charged to `memory`, its node's account (see [`crate::memory`]). The exchange
    /// and the routing key are short strings (at most 255 bytes).
    pub fn new(
        memory: &'static Memory,
        exchange: ShortString,
        routing_key: ShortString,
        properties: AMQPProperties,
        body: Bytes,
    ) -> Result<Self, crate::error::CodecError> {
        let header = crate::codec::encode_content_header_payload(body.len() as u64, &properties)?;
        Self::build(
            memory,
            exchange.as_str(),
            routing_key.as_str(),
            &header,
            &body,
        )
    }

    /// A message as a client published it: `header` is the content header payload the read
    /// path checked ([`crate::inbound`]), announcing `body`'s size.
    pub fn received(
        memory: &'static Memory,
        exchange: &str,
        routing_key: &str,
        header: &[u8],
        body: &[u8],
    ) -> Result<Self, crate::error::CodecError> {
        debug_assert_eq!(crate::inbound::body_size(header), body.len() as u64);
        Self::build(memory, exchange, routing_key, header, body)
    }

    /// A message from its stored or transmitted parts (the store's records, page files, the
    /// cluster's wire): `header` is a content header payload, checked (class basic, the body's
    /// size, properties that decode and fill it exactly).
    pub fn from_parts(
        memory: &'static Memory,
        exchange: &str,
        routing_key: &str,
        header: &[u8],
        body: &[u8],
    ) -> Result<Self, crate::error::CodecError> {
        crate::codec::check_content_header_payload(header, body.len() as u64)?;
        Self::build(memory, exchange, routing_key, header, body)
    }

    fn build(
        memory: &'static Memory,
        exchange: &str,
        routing_key: &str,
        header: &[u8],
        body: &[u8],
    ) -> Result<Self, crate::error::CodecError> {
        let (ex, rk) = (exchange.as_bytes(), routing_key.as_bytes());
        let (Ok(ex_len), Ok(rk_len)) = (u8::try_from(ex.len()), u8::try_from(rk.len())) else {
            return Err(crate::error::CodecError::Encode);
        };
        let mut data = Vec::with_capacity(2 + ex.len() + rk.len() + header.len() + body.len());
        data.push(ex_len);
        data.push(rk_len);
        data.extend_from_slice(ex);
        data.extend_from_slice(rk);
        data.extend_from_slice(header);
        data.extend_from_slice(body);
        let data = data.into_boxed_slice();
        memory.charge(Self::accounted(&data));
        Ok(Self { data, memory })
    }

    /// A copy of this message for one delivery with `headers` as its headers (charged as a
    /// message of its own).
    pub fn with_headers(
        &self,
        headers: amq_protocol::types::FieldTable,
    ) -> Result<Self, crate::error::CodecError> {
        let properties = self.properties().with_headers(headers);
        let header =
            crate::codec::encode_content_header_payload(self.body().len() as u64, &properties)?;
        Self::build(
            self.memory,
            self.exchange(),
            self.routing_key(),
            &header,
            self.body(),
        )
    }

    /// The memory account this message is charged to; copies made from it (dead-lettering)
    /// are charged there too.
    pub fn memory(&self) -> &'static Memory {
        self.memory
    }

    /// Bytes this message counts for in its memory account: its buffer, itself and its `Arc`.
    fn accounted(data: &[u8]) -> u64 {
        (data.len() + std::mem::size_of::<Self>() + ARC_COUNTS) as u64
    }

    fn lens(&self) -> (usize, usize) {
        match *self.data {
            [ex, rk, ..] => (usize::from(ex), usize::from(rk)),
            _ => (0, 0),
        }
    }

    /// Where the content header payload starts and where the body starts.
    fn bounds(&self) -> (usize, usize) {
        let (ex, rk) = self.lens();
        let start = 2 + ex + rk;
        let body_len = self
            .data
            .get(start + 4..start + HEADER_FIXED)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_be_bytes);
        let body = usize::try_from(body_len)
            .ok()
            .and_then(|n| self.data.len().checked_sub(n))
            .unwrap_or(self.data.len());
        (start.min(body), body)
    }

    fn text(&self, from: usize, len: usize) -> &str {
        self.data
            .get(from..from + len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub fn exchange(&self) -> &str {
        let (ex, _) = self.lens();
        self.text(2, ex)
    }

    pub fn routing_key(&self) -> &str {
        let (ex, rk) = self.lens();
        self.text(2 + ex, rk)
    }

    /// The pre-encoded content header payload (class, weight, size, properties).
    pub fn header_payload(&self) -> &[u8] {
        let (h, b) = self.bounds();
        &self.data[h..b]
    }

    pub fn body(&self) -> &[u8] {
        let (_, b) = self.bounds();
        &self.data[b..]
    }

    /// The decoded properties (allocates: for the paths that need all of them).
    pub fn properties(&self) -> AMQPProperties {
        Self::decode_properties(self.header_payload())
    }

    /// The properties of a content header payload (defaults if it does not decode).
    pub fn decode_properties(header: &[u8]) -> AMQPProperties {
        header
            .get(HEADER_FIXED..)
            .and_then(|p| amq_protocol::protocol::basic::parse_properties(p).ok())
            .map(|(_, props)| props)
            .unwrap_or_default()
    }

    /// The headers property, decoded only when there is one.
    pub fn headers(&self) -> Option<amq_protocol::types::FieldTable> {
        self.property(crate::codec::prop::HEADERS)?;
        self.properties().headers().clone()
    }

    fn property(&self, flag: u16) -> Option<&[u8]> {
        crate::codec::header_property(self.header_payload(), flag)
    }

    /// delivery-mode 2.
    pub fn persistent(&self) -> bool {
        self.property(crate::codec::prop::DELIVERY_MODE) == Some(&[2])
    }

    pub fn priority(&self) -> u8 {
        self.property(crate::codec::prop::PRIORITY)
            .and_then(|p| p.first().copied())
            .unwrap_or(0)
    }

    /// Per-message TTL from the `expiration` property, milliseconds (None if absent or not a
    /// number).
    pub fn expiration_ms(&self) -> Option<u64> {
        let e = self.property(crate::codec::prop::EXPIRATION)?;
        std::str::from_utf8(e).ok()?.parse::<u64>().ok()
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        self.memory.release(Self::accounted(&self.data));
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
    /// Queues that block this connection's reading while they are delivery-bound.
    pub flow: flow::PublisherFlow,
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
    /// `from`: the publishing connection, which the queue may block (see [`flow`]).
    Publish {
        msg: Arc<Message>,
        confirm: Option<ConfirmTicket>,
        from: Option<Arc<ConnShared>>,
    },
    /// Publishes decoded from one socket read, in order.
    PublishBatch(Vec<PublishItem>, Option<Arc<ConnShared>>),
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
    /// The ready messages and consumers, after every command before this one.
    Stat {
        reply: oneshot::Sender<(u32, u32)>,
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

#[cfg(test)]
mod message_tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, FieldTable};

    fn props() -> AMQPProperties {
        let mut h = FieldTable::default();
        h.insert("k".into(), AMQPValue::LongString("v".into()));
        AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(h)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("1500".into())
            .with_message_id("m".into())
            .with_timestamp(42)
            .with_type("t".into())
            .with_cluster_id("cl".into())
            .with_user_id("guest".into())
            .with_app_id("a".into())
    }

    #[test]
    fn a_message_keeps_its_parts_in_one_buffer_and_reads_them_back() {
        let memory = Memory::leaked();
        for (ex, rk, p, body) in [
            ("", "q", AMQPProperties::default(), &b""[..]),
            ("amq.topic", "a.b.c", props(), &b"hello"[..]),
            ("x", &"k".repeat(255)[..], props(), &[9u8; 70_000][..]),
        ] {
            let m = Message::new(
                memory,
                ex.into(),
                rk.into(),
                p.clone(),
                body.to_vec().into(),
            )
            .expect("message");
            assert_eq!(m.exchange(), ex);
            assert_eq!(m.routing_key(), rk);
            assert_eq!(m.body(), body);
            assert_eq!(m.properties(), p);
            let header =
                crate::codec::encode_content_header_payload(body.len() as u64, &p).expect("header");
            assert_eq!(m.header_payload(), &header[..]);
            assert_eq!(m.persistent(), p.delivery_mode() == &Some(2));
            assert_eq!(m.priority(), p.priority().unwrap_or(0));
            assert_eq!(m.expiration_ms(), p.expiration().as_ref().map(|_| 1500));
            assert_eq!(m.headers(), p.headers().clone());
            // From its parts (a record, a page file, the cluster's wire): the same message.
            let back = Message::from_parts(memory, ex, rk, m.header_payload(), m.body())
                .expect("from parts");
            assert_eq!(back.data, m.data);
            // A copy with other headers keeps everything else.
            let mut h = FieldTable::default();
            h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(1));
            let c = m.with_headers(h.clone()).expect("copy");
            assert_eq!(c.properties(), p.clone().with_headers(h));
            assert_eq!((c.exchange(), c.routing_key(), c.body()), (ex, rk, body));
        }
        assert_eq!(memory.used(), 0, "every message released its charge");
    }

    #[test]
    fn a_queued_message_is_small() {
        // The struct in its Arc: 40 bytes; everything else is in its one buffer.
        assert_eq!(std::mem::size_of::<Message>(), 24);
        let m = Message::new(
            Memory::leaked(),
            "".into(),
            "bench".into(),
            AMQPProperties::default(),
            vec![0u8; 16].into(),
        )
        .expect("message");
        // 2 lengths, the routing key, 14 bytes of content header, the body.
        assert_eq!(m.data.len(), 2 + 5 + 14 + 16);
    }

    #[test]
    fn every_truncated_or_inconsistent_header_is_refused() {
        let memory = Memory::leaked();
        let body = b"body";
        let header = crate::codec::encode_content_header_payload(body.len() as u64, &props())
            .expect("header");
        for cut in 0..header.len() {
            assert!(
                Message::from_parts(memory, "", "q", &header[..cut], body).is_err(),
                "header cut at {cut} accepted"
            );
        }
        let mut longer = header.clone();
        longer.push(0);
        assert!(Message::from_parts(memory, "", "q", &longer, body).is_err());
        // Another body size than the body's.
        assert!(Message::from_parts(memory, "", "q", &header, b"bod").is_err());
        // Another class.
        let mut class = header.clone();
        class[1] = 50;
        assert!(Message::from_parts(memory, "", "q", &class, body).is_err());
        // A flag the basic class does not have.
        let mut flag = header.clone();
        flag[13] |= 1;
        assert!(Message::from_parts(memory, "", "q", &flag, body).is_err());
        // An exchange or routing key longer than a short string.
        let long = "x".repeat(256);
        assert!(Message::from_parts(memory, &long, "q", &header, body).is_err());
        assert!(Message::from_parts(memory, "", &long, &header, body).is_err());
        assert!(Message::from_parts(memory, "", "q", &header, body).is_ok());
        assert_eq!(memory.used(), 0);
    }
}
