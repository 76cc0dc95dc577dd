//! Opening and closing one AMQP connection with channel 1, and the setup methods run on it
//! (queue.declare, confirm.select, basic.qos, basic.consume).
//!
//! Setup is a plain request/reply exchange over the socket and uses `amq-protocol`'s full codec;
//! once set up, a [`Conn`] is handed whole (socket, unread bytes, negotiated frame size) to the
//! producer or consumer loop, which then speaks only its fast subset of the protocol.

use std::{
    io::{self, Read as _},
    time::Duration,
};

use amq_protocol::{
    protocol::{basic, channel, confirm, connection, queue, AMQPClass},
    types::{AMQPValue, FieldTable, LongString},
    uri::AMQPUri,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::TcpStream,
};

use crate::codec::{self, CodecError, FRAME_HEARTBEAT, FRAME_METHOD};

/// Channel used by every producer and consumer (one connection each, PerfTest style).
pub const CHANNEL: u16 = 1;
/// Frame size we ask for when the server allows any.
const WANTED_FRAME_MAX: u32 = 131_072;
/// Read buffer size floor; it grows to two frames when the negotiated frame size is larger.
const MIN_READ_BUF: usize = 256 * 1024;
/// Time allowed for connection setup and for the close handshake.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection-level failures.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Bad bytes from the server.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The server closed the connection or channel.
    #[error("server closed the {scope} ({code}: {text})")]
    Closed {
        /// "connection" or "channel".
        scope: &'static str,
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The server answered something we did not expect.
    #[error("unexpected reply from server: {0}")]
    Unexpected(String),
    /// The server dropped the TCP connection.
    #[error("connection closed by peer")]
    Eof,
    /// Setup took too long.
    #[error("timed out during {0}")]
    Timeout(&'static str),
}

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// SASL PLAIN user.
    pub user: String,
    /// SASL PLAIN password.
    pub password: String,
    /// Virtual host.
    pub vhost: String,
}

impl Endpoint {
    /// Parses an `amqp://user:pass@host:port/vhost` URI (the vhost is percent-decoded; `amqps` is
    /// not supported).
    pub fn from_uri(uri: &str) -> Result<Self, String> {
        let parsed: AMQPUri = uri.parse()?;
        if parsed.scheme != amq_protocol::uri::AMQPScheme::AMQP {
            return Err("only amqp:// URIs are supported".into());
        }
        Ok(Self {
            host: parsed.authority.host,
            port: parsed.authority.port,
            user: parsed.authority.userinfo.username,
            password: parsed.authority.userinfo.password,
            vhost: parsed.vhost,
        })
    }
}

// === impl InBuf ===

/// Read buffer: bytes `[start, end)` are received and not yet parsed.
#[derive(Debug)]
pub struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    /// A buffer of `cap` bytes (allocated once).
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// Unparsed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks `n` bytes as parsed.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes sure at least `cap` bytes fit, keeping the unparsed ones.
    pub fn reserve_total(&mut self, cap: usize) {
        if self.buf.len() < cap {
            self.buf.resize(cap, 0);
        }
    }

    /// Free space at the end, moving unparsed bytes to the front when that gains room.
    #[inline]
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.end == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Reads what the socket has without waiting. `Ok(0)` means end of stream; `WouldBlock` means
    /// nothing to read right now (tokio answers that from its cached readiness, without a syscall).
    ///
    /// A read that returns less than the free space has drained the socket, so it also clears
    /// tokio's readiness: the next call then waits for epoll instead of spending a `recv` on
    /// `EAGAIN` (half of all reads otherwise). Clearing inside `try_io` uses the readiness observed
    /// before the `recv`, so data that arrives meanwhile still wakes us.
    #[inline]
    pub fn try_fill(&mut self, stream: &TcpStream) -> io::Result<usize> {
        let spare = self.spare();
        let room = spare.len();
        if room == 0 {
            return Err(io::Error::other(
                "read buffer full: frame larger than buffer",
            ));
        }
        let mut got = 0;
        let r = stream.try_io(Interest::READABLE, || {
            got = (&*SockRef::from(stream)).read(spare)?;
            if got > 0 && got < room {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {}
            Err(e) => return Err(e),
        }
        self.end += got;
        Ok(got)
    }

    /// Waits for and reads at least one byte; `Ok(0)` means end of stream.
    pub async fn fill(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        let spare = self.spare();
        if spare.is_empty() {
            return Err(io::Error::other(
                "read buffer full: frame larger than buffer",
            ));
        }
        let n = stream.read(spare).await?;
        self.end += n;
        Ok(n)
    }
}

// === impl Conn ===

/// An open connection with channel 1 open.
#[derive(Debug)]
pub struct Conn {
    /// The socket (TCP_NODELAY set).
    pub stream: TcpStream,
    /// Bytes received and not yet parsed.
    pub inbuf: InBuf,
    /// Negotiated frame size (whole frame, 0 = unlimited).
    pub frame_max: u32,
    /// Negotiated heartbeat interval, seconds (0 = off).
    pub heartbeat: u16,
    out: Vec<u8>,
}

/// How a connection is opened beyond its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Heartbeat interval asked for in tune-ok, seconds (0 = off; the server's offer caps it).
    pub heartbeat: u16,
    /// Read buffer size; it grows to two frames when `None`. A fixed size is for connections
    /// that only carry small method frames (the reconnect storm's idle consumers).
    pub read_buf: Option<usize>,
}

impl Default for ConnectOptions {
    /// Heartbeats off (runs are short and a missed heartbeat under full load would end them), a
    /// read buffer of two frames.
    fn default() -> Self {
        Self {
            heartbeat: 0,
            read_buf: None,
        }
    }
}

/// Opens a connection and channel 1. `name` is sent as the `connection_name` client property.
pub async fn connect(ep: &Endpoint, name: &str) -> Result<Conn, ConnError> {
    connect_with(ep, name, ConnectOptions::default()).await
}

/// [`connect`] with heartbeats or a read buffer size of the caller's choice.
pub async fn connect_with(
    ep: &Endpoint,
    name: &str,
    opts: ConnectOptions,
) -> Result<Conn, ConnError> {
    tokio::time::timeout(SETUP_TIMEOUT, connect_inner(ep, name, opts))
        .await
        .map_err(|_| ConnError::Timeout("connection setup"))?
}

async fn connect_inner(ep: &Endpoint, name: &str, opts: ConnectOptions) -> Result<Conn, ConnError> {
    let stream = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
    stream.set_nodelay(true)?;
    let mut c = Conn {
        stream,
        inbuf: InBuf::with_capacity(opts.read_buf.unwrap_or(MIN_READ_BUF)),
        frame_max: WANTED_FRAME_MAX,
        heartbeat: 0,
        out: Vec::with_capacity(4096),
    };
    c.stream.write_all(b"AMQP\x00\x00\x09\x01").await?;

    let start = match c.recv_method().await? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
        (ch, m) => return Err(ConnError::Unexpected(format!("{m:?} on channel {ch}"))),
    };
    let offers_plain = String::from_utf8_lossy(start.mechanisms.as_bytes())
        .split_whitespace()
        .any(|m| m == "PLAIN");
    if !offers_plain {
        return Err(ConnError::Unexpected(format!(
            "server offers no PLAIN mechanism: {}",
            start.mechanisms
        )));
    }
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(
        "product".into(),
        AMQPValue::LongString("warren-perf".into()),
    );
    props.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    props.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    c.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: LongString::from(format!("\0{}\0{}", ep.user, ep.password)),
            locale: "en_US".into(),
        })),
    )
    .await?;

    let tune = match c.recv_method().await? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
        (ch, m) => return Err(ConnError::Unexpected(format!("{m:?} on channel {ch}"))),
    };
    c.frame_max = match tune.frame_max {
        0 => WANTED_FRAME_MAX,
        n => n.min(WANTED_FRAME_MAX),
    };
    if opts.read_buf.is_none() {
        c.inbuf
            .reserve_total(MIN_READ_BUF.max(2 * c.frame_max as usize));
    }
    let heartbeat = match (opts.heartbeat, tune.heartbeat) {
        (0, _) => 0,
        (h, 0) => h,
        (h, offer) => h.min(offer),
    };
    c.heartbeat = heartbeat;
    c.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: c.frame_max,
            heartbeat,
        })),
    )
    .await?;
    c.rpc(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: ep.vhost.as_str().into(),
        })),
        |m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))),
    )
    .await?;
    c.rpc(
        CHANNEL,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        |m| matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))),
    )
    .await?;
    Ok(c)
}

/// How the benchmark queue is declared (the same by every connection, so redeclaring is a no-op).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Survives a broker restart (set with `-f persistent`).
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Only for this connection.
    pub exclusive: bool,
}

impl Conn {
    /// Largest frame payload accepted from the server.
    pub fn max_payload(&self) -> usize {
        match self.frame_max {
            0 => usize::MAX,
            n => n as usize,
        }
    }

    async fn send(&mut self, ch: u16, class: AMQPClass) -> Result<(), ConnError> {
        self.out.clear();
        codec::encode_method(&mut self.out, ch, class)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Next method frame; heartbeats and content frames are skipped, and a close from the server
    /// becomes [`ConnError::Closed`] (after answering close-ok).
    async fn recv_method(&mut self) -> Result<(u16, AMQPClass), ConnError> {
        loop {
            let max = self.max_payload();
            if let Some((f, used)) = codec::split_frame(self.inbuf.data(), max)? {
                let kind = f.kind;
                let ch = f.channel;
                let method = if kind == FRAME_METHOD {
                    Some(codec::decode_method(f.payload)?)
                } else {
                    None
                };
                self.inbuf.consume(used);
                match (kind, method) {
                    (FRAME_METHOD, Some(m)) => return self.check_close(ch, m).await,
                    (FRAME_HEARTBEAT, _) => continue,
                    _ => continue,
                }
            }
            if self.inbuf.fill(&mut self.stream).await? == 0 {
                return Err(ConnError::Eof);
            }
        }
    }

    async fn check_close(&mut self, ch: u16, m: AMQPClass) -> Result<(u16, AMQPClass), ConnError> {
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                let _ = self
                    .send(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                    .await;
                Err(ConnError::Closed {
                    scope: "connection",
                    code: c.reply_code,
                    text: c.reply_text.to_string(),
                })
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                let _ = self
                    .send(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                    .await;
                Err(ConnError::Closed {
                    scope: "channel",
                    code: c.reply_code,
                    text: c.reply_text.to_string(),
                })
            }
            m => Ok((ch, m)),
        }
    }

    /// Sends a method and waits for the reply that `is_reply` accepts.
    async fn rpc(
        &mut self,
        ch: u16,
        class: AMQPClass,
        is_reply: fn(&AMQPClass) -> bool,
    ) -> Result<AMQPClass, ConnError> {
        self.send(ch, class).await?;
        loop {
            let (_, m) = self.recv_method().await?;
            if is_reply(&m) {
                return Ok(m);
            }
        }
    }

    /// queue.declare on channel 1.
    pub async fn declare_queue(&mut self, q: &QueueSpec) -> Result<(), ConnError> {
        tokio::time::timeout(
            SETUP_TIMEOUT,
            self.rpc(
                CHANNEL,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: q.name.as_str().into(),
                    passive: false,
                    durable: q.durable,
                    exclusive: q.exclusive,
                    auto_delete: q.auto_delete,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
                |m| matches!(m, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))),
            ),
        )
        .await
        .map_err(|_| ConnError::Timeout("queue.declare"))??;
        Ok(())
    }

    /// confirm.select on channel 1.
    pub async fn confirm_select(&mut self) -> Result<(), ConnError> {
        tokio::time::timeout(
            SETUP_TIMEOUT,
            self.rpc(
                CHANNEL,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                    nowait: false,
                })),
                |m| matches!(m, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))),
            ),
        )
        .await
        .map_err(|_| ConnError::Timeout("confirm.select"))??;
        Ok(())
    }

    /// basic.qos on channel 1 (per consumer).
    pub async fn qos(&mut self, prefetch: u16) -> Result<(), ConnError> {
        tokio::time::timeout(
            SETUP_TIMEOUT,
            self.rpc(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: prefetch,
                    global: false,
                })),
                |m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))),
            ),
        )
        .await
        .map_err(|_| ConnError::Timeout("basic.qos"))??;
        Ok(())
    }

    /// basic.consume on channel 1; returns once consume-ok arrives (deliveries may already be
    /// buffered behind it).
    pub async fn consume(&mut self, queue: &str, no_ack: bool) -> Result<(), ConnError> {
        tokio::time::timeout(
            SETUP_TIMEOUT,
            self.rpc(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: queue.into(),
                    consumer_tag: "".into(),
                    no_local: false,
                    no_ack,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
                |m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))),
            ),
        )
        .await
        .map_err(|_| ConnError::Timeout("basic.consume"))??;
        Ok(())
    }

    /// Handles a control method that arrived in the fast loop: a close becomes an error, the rest
    /// is logged or ignored.
    pub async fn control(&mut self, ch: u16, payload: &[u8]) -> Result<(), ConnError> {
        let m = codec::decode_method(payload)?;
        let (_, m) = self.check_close(ch, m).await?;
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
                eprintln!("warren-perf: connection blocked by broker: {}", b.reason);
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                eprintln!("warren-perf: connection unblocked");
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => {
                return Err(ConnError::Closed {
                    scope: "consumer",
                    code: 0,
                    text: "basic.cancel from server".into(),
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// Politely closes the connection: connection.close, then waits (bounded) for close-ok,
    /// discarding whatever else still arrives.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await?;
            loop {
                let max = self.max_payload();
                while let Some((f, used)) = codec::split_frame(self.inbuf.data(), max)? {
                    let done =
                        f.kind == FRAME_METHOD && codec::method_ids(f.payload) == Some((10, 51));
                    self.inbuf.consume(used);
                    if done {
                        return Ok::<(), ConnError>(());
                    }
                }
                if self.inbuf.fill(&mut self.stream).await? == 0 {
                    return Ok(());
                }
            }
        })
        .await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        let ep = Endpoint::from_uri("amqp://u:p@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            ep,
            Endpoint {
                host: "127.0.0.1".into(),
                port: 5673,
                user: "u".into(),
                password: "p".into(),
                vhost: "/".into(),
            }
        );
        let d = Endpoint::from_uri("amqp://localhost").unwrap();
        assert_eq!(
            (d.port, d.user.as_str(), d.vhost.as_str()),
            (5672, "guest", "/")
        );
        assert!(Endpoint::from_uri("amqps://localhost").is_err());
    }

    #[test]
    fn inbuf_compacts() {
        let mut b = InBuf::with_capacity(8);
        b.buf[..8].copy_from_slice(b"abcdefgh");
        b.end = 8;
        b.consume(6);
        assert_eq!(b.data(), b"gh");
        assert_eq!(b.spare().len(), 6);
        assert_eq!(b.data(), b"gh");
        b.consume(2);
        assert_eq!(b.data(), b"");
    }
}
