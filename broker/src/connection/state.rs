//! Sans-io connection state machine (see `LIFECYCLE.md`).
//!
//! It owns the handshake (start, tune, open), heartbeats, channel numbering, frame ordering and
//! content assembly. It never touches a socket or reads the clock: frames and `now` come in
//! through [`ConnectionState::handle_inbound`] (the read path's frames, content headers still
//! encoded) or [`ConnectionState::handle_input`] (decoded frames), frames and effects go out
//! through
//! [`ConnectionState::poll_output`], and the shell asks [`ConnectionState::poll_timeout`] when to
//! call [`ConnectionState::handle_timeout`].

use crate::auth::{AuthDb, AuthError};
use crate::codec::HeaderCheck;
use crate::config::ServerIdentity;
use crate::error::{ChannelError, ConnectionError};
use crate::inbound::{self, Inbound};
use crate::intmap::IntMap;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::basic;
use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Connection lifecycle states, named after the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    AwaitingProtocolHeader,
    StartSent,
    TuneSent,
    Open,
    Closing,
    Closed,
}

/// How the connection reached [`State::Closed`]: the shell keeps the socket open for a moment
/// after a completed close handshake (see `LIFECYCLE.md`, "After the close handshake").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Not closed yet, or closed without a handshake (timeouts, a bad protocol header).
    Abrupt,
    /// The client sent connection.close and got our close-ok.
    ByClient,
    /// We sent connection.close and the client answered (close-ok, or a crossing close).
    ByServer,
}

/// A complete command for the channel layer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    Method(AMQPClass),
    /// Boxed once when basic.publish arrives, so header and body frames, the output queue and
    /// the shell move a pointer instead of ~400 bytes of properties per frame.
    Publish(Box<PublishCommand>),
}

/// A basic.publish with its content, assembled from method, header and body frames.
#[derive(Debug)]
pub struct PublishCommand {
    pub publish: basic::Publish,
    /// The content header payload as received (class, weight 0, body size, properties; see
    /// [`crate::inbound`]): what the message keeps and deliveries send.
    pub header: Vec<u8>,
    pub body: Bytes,
    size: u64,
    buf: BytesMut,
}

/// Something the shell must do.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Effect {
    /// connection.open accepted.
    Opened {
        user: String,
        vhost: String,
    },
    ChannelOpened(u16),
    /// The client closed the channel: release its resources (close-ok follows in the output).
    ChannelClosed(u16),
    Command(u16, Command),
    /// Flush what is buffered and close the socket.
    Shutdown,
}

/// Output of the state machine, in order.
#[derive(Debug)]
pub enum Output {
    Frame(AMQPFrame),
    Effect(Effect),
}

/// Static inputs of a connection.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub max_message_size: u64,
    pub auth: Arc<AuthDb>,
    pub peer_is_loopback: bool,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    /// The `server_properties` of connection.start ([`server_properties`]).
    pub server_properties: FieldTable,
    /// Set when the node was at its connection limit as this client arrived: the handshake
    /// runs so the client gets a readable reason, and connection.open is refused with 530.
    pub over_connection_limit: Option<u32>,
    /// Whether the vhost named in connection.open is at its `max-connections` limit
    /// (RabbitMQ's vhost limits): refused with 530 then.
    pub vhost_connection_limit: Option<VhostConnectionLimit>,
}

/// Given a vhost's name: its connection limit when the vhost is at it.
pub type VhostLimitFn = dyn Fn(&str) -> Option<i64> + Send + Sync;

/// Tells whether a vhost is at its connection limit (see [`VhostLimitFn`]).
#[derive(Clone)]
pub struct VhostConnectionLimit(pub Arc<VhostLimitFn>);

impl std::fmt::Debug for VhostConnectionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VhostConnectionLimit")
    }
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Chan {
    Open,
    /// We sent channel.close; waiting for close-ok.
    Closing,
    AwaitHeader(Box<PublishCommand>),
    AwaitBody(Box<PublishCommand>),
}

/// The state machine.
#[derive(Debug)]
pub struct ConnectionState {
    cfg: StateConfig,
    state: State,
    out: VecDeque<Output>,
    channels: IntMap<u16, Chan>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    user: Option<String>,
    /// From connection.start-ok, for the management API.
    client_properties: FieldTable,
    mechanism: String,
    last_recv: Instant,
    last_sent: Instant,
    deadline: Option<Instant>,
    /// The client advertised the `connection.blocked` capability in start-ok.
    blocked_capability: bool,
    /// Reads are paused (publisher blocked by an alarm): missing heartbeats from the client
    /// are not its fault, so they do not close the connection.
    recv_monitor_paused: bool,
    /// The client address failed logins are counted against (`auth-failure-limit`); set by
    /// the shell with [`ConnectionState::set_login_source`]. None: failures are not counted.
    login_source: Option<std::net::IpAddr>,
    close_kind: CloseKind,
}

const MIN_FRAME_MAX: u32 = 4096;

fn close_frame(e: &ConnectionError) -> AMQPFrame {
    AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: e.reply_code(),
            reply_text: e.reply_text().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        })),
    )
}

/// Server properties sent in connection.start: `product`, `version` and `platform` from the
/// `server-identity` setting, the capabilities table, and the cluster name (the management API's
/// `cluster_name`, as RabbitMQ sends its own).
pub fn server_properties(identity: ServerIdentity, cluster_name: &str) -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut p = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    p.insert("product".into(), s(identity.product()));
    p.insert("version".into(), s(identity.version()));
    p.insert("platform".into(), s(identity.platform()));
    // Copyright and information stay warren's own under either identity: no client branches on
    // them, and they are where a person reading the properties learns what is really there.
    p.insert("copyright".into(), s("the warren authors"));
    let information = match identity {
        ServerIdentity::Warren => "Licensed under the Apache License 2.0".to_owned(),
        ServerIdentity::Rabbitmq => format!(
            "warren {} presenting as RabbitMQ {} (server-identity = rabbitmq). Licensed under \
             the Apache License 2.0",
            env!("CARGO_PKG_VERSION"),
            identity.version()
        ),
    };
    p.insert("information".into(), s(&information));
    p.insert("cluster_name".into(), s(cluster_name));
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

fn table_str(t: &FieldTable, k: &str) -> Option<String> {
    match t.inner().get(k)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Extracts (user, password) from a SASL response.
fn parse_credentials(mechanism: &str, response: &LongString) -> Option<(String, String)> {
    let bytes = response.as_bytes();
    match mechanism {
        "PLAIN" => {
            let mut parts = bytes.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            let pass = parts.next()?;
            if parts.next().is_some() {
                return None;
            }
            Some((
                String::from_utf8(user.to_vec()).ok()?,
                String::from_utf8(pass.to_vec()).ok()?,
            ))
        }
        "AMQPLAIN" => {
            let mut buf = Vec::with_capacity(bytes.len() + 4);
            buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            buf.extend_from_slice(bytes);
            let (_, table) =
                amq_protocol::types::parsing::parse_field_table(buf.as_slice()).ok()?;
            Some((table_str(&table, "LOGIN")?, table_str(&table, "PASSWORD")?))
        }
        _ => None,
    }
}

// === impl ConnectionState ===

impl ConnectionState {
    pub fn new(cfg: StateConfig, now: Instant) -> Self {
        let frame_max = cfg.frame_max;
        let channel_max = cfg.channel_max;
        let deadline = Some(now + cfg.handshake_timeout);
        Self {
            cfg,
            state: State::AwaitingProtocolHeader,
            out: VecDeque::new(),
            channels: IntMap::default(),
            frame_max,
            channel_max,
            heartbeat: 0,
            user: None,
            client_properties: FieldTable::default(),
            mechanism: String::new(),
            last_recv: now,
            last_sent: now,
            deadline,
            blocked_capability: false,
            recv_monitor_paused: false,
            login_source: None,
            close_kind: CloseKind::Abrupt,
        }
    }

    /// How the connection was closed; [`CloseKind::Abrupt`] until it is.
    pub fn close_kind(&self) -> CloseKind {
        self.close_kind
    }

    /// Counts this connection's failed login against `ip` and refuses it while `ip` is over the
    /// failed-login limit (see [`AuthDb::login`]).
    pub fn set_login_source(&mut self, ip: std::net::IpAddr) {
        self.login_source = Some(ip);
    }

    /// The client asked for connection.blocked / unblocked notifications.
    pub fn client_wants_blocked(&self) -> bool {
        self.blocked_capability
    }

    /// The shell stopped reading the socket (publisher blocked by an alarm): stop expecting
    /// client heartbeats.
    pub fn pause_recv_monitor(&mut self) {
        self.recv_monitor_paused = true;
    }

    /// The shell reads again: client heartbeats are expected from `now` on.
    pub fn resume_recv_monitor(&mut self, now: Instant) {
        if self.recv_monitor_paused {
            self.recv_monitor_paused = false;
            self.last_recv = now;
        }
    }

    pub fn recv_monitor_paused(&self) -> bool {
        self.recv_monitor_paused
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Largest frame accepted and sent right now.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Client properties and SASL mechanism from connection.start-ok.
    pub fn client_info(&self) -> (&FieldTable, &str) {
        (&self.client_properties, &self.mechanism)
    }

    pub fn is_channel_open(&self, ch: u16) -> bool {
        matches!(
            self.channels.get(&ch),
            Some(Chan::Open | Chan::AwaitHeader(_) | Chan::AwaitBody(_))
        )
    }

    /// Next output, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.deadline;
        if self.state == State::Open && self.heartbeat > 0 {
            let hb = Duration::from_secs(self.heartbeat as u64);
            let send_at = self.last_sent + hb / 2;
            let dead_at = (!self.recv_monitor_paused).then(|| self.last_recv + hb * 2);
            for x in std::iter::once(send_at).chain(dead_at) {
                t = Some(t.map_or(x, |y: Instant| y.min(x)));
            }
        }
        t
    }

    /// The shell wrote bytes to the socket.
    pub fn note_sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// The shell read bytes from the socket.
    pub fn note_received(&mut self, now: Instant) {
        self.last_recv = now;
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.deadline {
            if now >= d {
                self.deadline = None;
                match self.state {
                    State::Closing | State::Closed => self.shutdown(),
                    State::Open => {}
                    _ => {
                        // Handshake took too long: RabbitMQ just drops the socket.
                        self.shutdown();
                    }
                }
            }
        }
        if self.state == State::Open && self.heartbeat > 0 {
            let hb = Duration::from_secs(self.heartbeat as u64);
            if !self.recv_monitor_paused && now >= self.last_recv + hb * 2 {
                // Two missed intervals: the peer is gone; close without a handshake.
                self.shutdown();
            } else if now >= self.last_sent + hb / 2 {
                self.last_sent = now;
                self.out.push_back(Output::Frame(AMQPFrame::Heartbeat));
            }
        }
        self.check_invariants();
    }

    /// The first 8 bytes of the connection were checked.
    pub fn handle_protocol_header(&mut self, check: HeaderCheck, now: Instant) {
        if self.state != State::AwaitingProtocolHeader {
            return;
        }
        match check {
            HeaderCheck::Incomplete => {}
            HeaderCheck::Mismatch => {
                self.out.push_back(Output::Frame(AMQPFrame::ProtocolHeader(
                    amq_protocol::frame::ProtocolVersion::amqp_0_9_1(),
                )));
                self.shutdown();
            }
            HeaderCheck::Ok => {
                self.last_recv = now;
                self.state = State::StartSent;
                self.out.push_back(Output::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                        version_major: 0,
                        version_minor: 9,
                        server_properties: self.cfg.server_properties.clone(),
                        mechanisms: "PLAIN AMQPLAIN".into(),
                        locales: "en_US".into(),
                    })),
                )));
            }
        }
        self.check_invariants();
    }

    fn shutdown(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.deadline = None;
            self.channels.clear();
            self.out.push_back(Output::Effect(Effect::Shutdown));
        }
    }

    /// Closes the connection with a hard error (or 320 on shutdown).
    pub fn close_connection(&mut self, err: ConnectionError, now: Instant) {
        match self.state {
            State::Closing | State::Closed => {}
            State::AwaitingProtocolHeader => self.shutdown(),
            _ => {
                self.out.push_back(Output::Frame(close_frame(&err)));
                self.state = State::Closing;
                self.deadline = Some(now + self.cfg.close_timeout);
            }
        }
        self.check_invariants();
    }

    /// Closes one channel with a soft error; its resources are already released by the caller.
    pub fn close_channel(&mut self, ch: u16, err: &ChannelError) {
        if self.state != State::Open || !self.channels.contains_key(&ch) {
            return;
        }
        if matches!(self.channels.get(&ch), Some(Chan::Closing)) {
            return;
        }
        self.channels.insert(ch, Chan::Closing);
        self.out.push_back(Output::Frame(AMQPFrame::Method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: err.reply_code(),
                reply_text: err.reply_text().into(),
                class_id: err.class_id,
                method_id: err.method_id,
            })),
        )));
        self.check_invariants();
    }

    /// A frame the codec refused unparsed because a field table in it nests too deep
    /// ([`crate::nesting`]): arguments or headers on an open channel close that channel with
    /// 406 PRECONDITION_FAILED, as RabbitMQ treats invalid arguments; anywhere else (client
    /// properties at login, a channel that is not open) it is a 502 SYNTAX_ERROR for the
    /// connection.
    pub fn handle_too_deep(&mut self, ch: u16, class_id: u16, method_id: u16, now: Instant) {
        self.last_recv = now;
        let text = crate::nesting::too_deep_text(if class_id == 60 && method_id == 40 {
            "message headers"
        } else {
            "field table"
        });
        let slot = self.channels.get(&ch);
        let content_header = class_id == 60 && method_id == 40;
        match (self.state, slot) {
            (State::Closing | State::Closed, _) | (State::Open, Some(Chan::Closing)) => {}
            (State::Open, Some(Chan::Open)) if ch != 0 && !content_header => {
                self.emit_soft(
                    ch,
                    ChannelError::precondition_failed(text).with_method(class_id, method_id),
                );
            }
            (State::Open, Some(Chan::AwaitHeader(_))) if content_header => {
                self.emit_soft(
                    ch,
                    ChannelError::precondition_failed(text).with_method(class_id, method_id),
                );
            }
            _ => self.close_connection(
                ConnectionError::syntax_error(text).with_method(class_id, method_id),
                now,
            ),
        }
        self.check_invariants();
    }

    /// Feeds one decoded frame.
    pub fn handle_input(&mut self, frame: AMQPFrame, now: Instant) {
        self.handle_inbound(Inbound::from_frame(frame), now);
    }

    /// Feeds one frame from the read path ([`crate::inbound::decode`]).
    pub fn handle_inbound(&mut self, input: Inbound, now: Instant) {
        self.last_recv = now;
        let r = match self.state {
            State::AwaitingProtocolHeader => {
                Err(ConnectionError::frame_error("expected protocol header"))
            }
            State::StartSent => self.on_start_ok(input.into_frame(), now),
            State::TuneSent => self.on_tune_or_open(input.into_frame(), now),
            State::Open => self.on_open(input),
            State::Closing => {
                if let AMQPFrame::Method(0, AMQPClass::Connection(m)) = input.into_frame() {
                    match m {
                        connection::AMQPMethod::CloseOk(_) => {
                            self.close_kind = CloseKind::ByServer;
                            self.shutdown();
                        }
                        connection::AMQPMethod::Close(_) => {
                            // Both sides closed at once: ours came first.
                            self.push_method(0, close_ok());
                            self.close_kind = CloseKind::ByServer;
                            self.shutdown();
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            State::Closed => Ok(()),
        };
        if let Err(e) = r {
            self.close_connection(e, now);
        }
        self.check_invariants();
    }

    fn push_method(&mut self, ch: u16, m: AMQPClass) {
        self.out.push_back(Output::Frame(AMQPFrame::Method(ch, m)));
    }

    fn on_start_ok(&mut self, frame: AMQPFrame, now: Instant) -> Result<(), ConnectionError> {
        let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(so))) =
            frame
        else {
            return Err(ConnectionError::command_invalid(
                "expected 'connection.start_ok'",
            ));
        };
        let mech = so.mechanism.as_str();
        if mech != "PLAIN" && mech != "AMQPLAIN" {
            return Err(ConnectionError::access_refused(format!(
                "unsupported authentication mechanism '{mech}', supported: PLAIN AMQPLAIN"
            ))
            .with_method(10, 11));
        }
        let refused = || {
            ConnectionError::access_refused(format!(
                "Login was refused using authentication mechanism {mech}. For details see the \
                 broker logfile."
            ))
            .with_method(10, 11)
        };
        self.blocked_capability = matches!(
            so.client_properties.inner().get("capabilities"),
            Some(AMQPValue::FieldTable(caps))
                if caps.inner().get("connection.blocked") == Some(&AMQPValue::Boolean(true))
        );
        let (user, pass) = parse_credentials(mech, &so.response).ok_or_else(refused)?;
        let loopback = self.cfg.peer_is_loopback;
        let r = match self.login_source {
            Some(ip) => self.cfg.auth.login(&user, &pass, ip, loopback, now),
            None => self.cfg.auth.authenticate(&user, &pass, loopback),
        };
        match r {
            Ok(()) => {}
            Err(AuthError::BadCredentials) => return Err(refused()),
            Err(e @ (AuthError::LoopbackOnly(_) | AuthError::TooManyFailures)) => {
                return Err(ConnectionError::access_refused(e.to_string()).with_method(10, 11))
            }
        }
        self.user = Some(user);
        self.mechanism = mech.to_owned();
        self.client_properties = so.client_properties;
        self.state = State::TuneSent;
        self.deadline = Some(now + self.cfg.handshake_timeout);
        self.push_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: self.cfg.channel_max,
                frame_max: self.cfg.frame_max,
                heartbeat: self.cfg.heartbeat,
            })),
        );
        Ok(())
    }

    fn on_tune_or_open(&mut self, frame: AMQPFrame, now: Instant) -> Result<(), ConnectionError> {
        match frame {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => {
                let fm = if t.frame_max == 0 {
                    self.cfg.frame_max
                } else {
                    t.frame_max
                };
                if fm < MIN_FRAME_MAX {
                    return Err(ConnectionError::not_allowed(format!(
                        "frame_max={fm} < {MIN_FRAME_MAX} min size"
                    ))
                    .with_method(10, 31));
                }
                if fm > self.cfg.frame_max {
                    return Err(ConnectionError::not_allowed(format!(
                        "frame_max={fm} > {} max size",
                        self.cfg.frame_max
                    ))
                    .with_method(10, 31));
                }
                self.frame_max = fm;
                self.channel_max = if t.channel_max == 0 {
                    self.cfg.channel_max
                } else {
                    t.channel_max.min(self.cfg.channel_max)
                };
                self.heartbeat = t.heartbeat;
                self.last_sent = now;
                Ok(())
            }
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(o))) => {
                let vhost = o.virtual_host.to_string();
                let user = self.user.clone().unwrap_or_default();
                if !self.cfg.auth.vhost_exists(&vhost) {
                    return Err(
                        ConnectionError::not_allowed(format!("vhost {vhost} not found"))
                            .with_method(10, 40),
                    );
                }
                if self.cfg.auth.permissions(&user, &vhost).is_none() {
                    return Err(ConnectionError::not_allowed(format!(
                        "access to vhost '{vhost}' refused for user '{user}'"
                    ))
                    .with_method(10, 40));
                }
                if let Some(limit) = self.cfg.over_connection_limit {
                    return Err(ConnectionError::not_allowed(format!(
                        "access to vhost '{vhost}' refused for user '{user}': \
                         connection limit ({limit}) is reached"
                    ))
                    .with_method(10, 40));
                }
                if let Some(limit) = self
                    .cfg
                    .vhost_connection_limit
                    .as_ref()
                    .and_then(|check| (check.0)(&vhost))
                {
                    return Err(ConnectionError::not_allowed(format!(
                        "access to vhost '{vhost}' refused for user '{user}': \
                         connection limit ({limit}) is reached"
                    ))
                    .with_method(10, 40));
                }
                self.state = State::Open;
                self.deadline = None;
                self.last_sent = now;
                self.out
                    .push_back(Output::Effect(Effect::Opened { user, vhost }));
                self.push_method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
                );
                Ok(())
            }
            AMQPFrame::Heartbeat => Ok(()),
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                self.push_method(0, close_ok());
                self.close_kind = CloseKind::ByClient;
                self.shutdown();
                Ok(())
            }
            _ => Err(ConnectionError::command_invalid(
                "expected 'connection.tune_ok' or 'connection.open'",
            )),
        }
    }

    /// A frame in an open connection.
    fn on_open(&mut self, input: Inbound) -> Result<(), ConnectionError> {
        let frame = match input {
            Inbound::Header(0, _) | Inbound::Body(0, _) => {
                return Err(ConnectionError::unexpected_frame(
                    "content frame on channel 0",
                ))
            }
            Inbound::Header(ch, payload) => return self.on_header(ch, payload),
            Inbound::Body(ch, data) => return self.on_body(ch, data),
            Inbound::Method(ch, m) => return self.on_method(ch, m),
            Inbound::Other(frame) => *frame,
        };
        match frame {
            AMQPFrame::Heartbeat => Ok(()),
            AMQPFrame::ProtocolHeader(_) => Err(ConnectionError::unexpected_frame(
                "protocol header in an open connection",
            )),
            AMQPFrame::InvalidHeartbeat(ch) => Err(ConnectionError::frame_error(format!(
                "heartbeat frame on channel {ch}"
            ))),
            // A content header decoded in full (`handle_input`): encoded as the read path
            // gives it, then handled as one.
            AMQPFrame::Header(ch, h) => {
                let payload = inbound::header_payload(&h)
                    .map_err(|e| ConnectionError::syntax_error(format!("content header: {e}")))?;
                self.on_open(Inbound::Header(ch, payload))
            }
            // Never boxed by `Inbound::from_frame`; handled as their own variants.
            f @ (AMQPFrame::Method(..) | AMQPFrame::Body(..)) => {
                self.on_open(Inbound::from_frame(f))
            }
        }
    }

    fn on_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), ConnectionError> {
        match (ch, m) {
            (0, AMQPClass::Connection(m)) => self.on_connection_method(m),
            // RabbitMQ's words for a channel (or other class) method on channel 0.
            (0, m) => Err(ConnectionError::channel_error(
                "unexpected method in connection state running",
            )
            .with_method(m.get_amqp_class_id(), m.get_amqp_method_id())),
            (ch, m) => self.on_channel_method(ch, m),
        }
    }

    fn on_connection_method(&mut self, m: connection::AMQPMethod) -> Result<(), ConnectionError> {
        match m {
            connection::AMQPMethod::Close(_) => {
                self.push_method(0, close_ok());
                self.close_kind = CloseKind::ByClient;
                self.shutdown();
                Ok(())
            }
            connection::AMQPMethod::UpdateSecret(_) => {
                self.push_method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_) => Ok(()),
            _ => Err(ConnectionError::command_invalid(
                "unexpected connection method in an open connection",
            )),
        }
    }

    fn on_channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), ConnectionError> {
        let cid = m.get_amqp_class_id();
        match self.channels.get(&ch) {
            None => {
                if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = m {
                    // As RabbitMQ 3.10: channel_max limits how many channels are open (those
                    // we are closing count until their close-ok), not their numbers; any of
                    // 1..=65535 may be used. Its error carries no class and method.
                    let open = self.channels.len();
                    if open >= usize::from(self.channel_max) {
                        return Err(ConnectionError::not_allowed(format!(
                            "number of channels opened ({open}) has reached the negotiated \
                             channel_max ({})",
                            self.channel_max
                        )));
                    }
                    self.channels.insert(ch, Chan::Open);
                    self.out
                        .push_back(Output::Effect(Effect::ChannelOpened(ch)));
                    self.push_method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    );
                    Ok(())
                } else {
                    Err(ConnectionError::channel_error("expected 'channel.open'")
                        .with_method(cid, 0))
                }
            }
            Some(Chan::Closing) => {
                match m {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&ch);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.channels.remove(&ch);
                        self.push_method(
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {} // discarded until close-ok, per spec
                }
                Ok(())
            }
            Some(Chan::AwaitHeader(_)) => Err(ConnectionError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead",
            )),
            Some(Chan::AwaitBody(_)) => Err(ConnectionError::unexpected_frame(
                "expected content body, got non content body frame instead",
            )),
            Some(Chan::Open) => match m {
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                    Err(ConnectionError::channel_error("second 'channel.open' seen")
                        .with_method(20, 10))
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.channels.remove(&ch);
                    self.out
                        .push_back(Output::Effect(Effect::ChannelClosed(ch)));
                    self.push_method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    Ok(())
                }
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => Ok(()),
                AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                    self.channels.insert(
                        ch,
                        Chan::AwaitHeader(Box::new(PublishCommand {
                            publish: p,
                            header: Vec::new(),
                            body: Bytes::new(),
                            size: 0,
                            buf: BytesMut::new(),
                        })),
                    );
                    Ok(())
                }
                other => {
                    self.out
                        .push_back(Output::Effect(Effect::Command(ch, Command::Method(other))));
                    Ok(())
                }
            },
        }
    }

    fn on_header(&mut self, ch: u16, header: Vec<u8>) -> Result<(), ConnectionError> {
        let Some(slot) = self.channels.get_mut(&ch) else {
            return Err(ConnectionError::channel_error("expected 'channel.open'"));
        };
        match slot {
            Chan::AwaitHeader(_) => {}
            Chan::Closing => return Ok(()),
            _ => {
                return Err(ConnectionError::unexpected_frame(
                    "expected method frame, got non method frame instead",
                ))
            }
        }
        let Chan::AwaitHeader(mut cmd) = std::mem::replace(slot, Chan::Open) else {
            return Ok(());
        };
        let class_id = inbound::class_id(&header);
        if class_id != 60 {
            return Err(ConnectionError::unexpected_frame(format!(
                "content header for class {class_id} on a basic.publish"
            )));
        }
        let body_size = inbound::body_size(&header);
        if body_size > self.cfg.max_message_size {
            self.emit_soft(
                ch,
                ChannelError::precondition_failed(format!(
                    "message size {} is larger than configured max size {}",
                    body_size, self.cfg.max_message_size
                ))
                .with_method(60, 40),
            );
            return Ok(());
        }
        cmd.header = header;
        cmd.size = body_size;
        if body_size == 0 {
            self.out
                .push_back(Output::Effect(Effect::Command(ch, Command::Publish(cmd))));
        } else if let Some(slot) = self.channels.get_mut(&ch) {
            *slot = Chan::AwaitBody(cmd);
        }
        Ok(())
    }

    fn on_body(&mut self, ch: u16, data: Vec<u8>) -> Result<(), ConnectionError> {
        let Some(slot) = self.channels.get_mut(&ch) else {
            return Err(ConnectionError::channel_error("expected 'channel.open'"));
        };
        let cmd = match slot {
            Chan::AwaitBody(cmd) => cmd,
            Chan::Closing => return Ok(()),
            _ => {
                return Err(ConnectionError::unexpected_frame(
                    "expected method frame, got non method frame instead",
                ))
            }
        };
        let total = cmd.buf.len() as u64 + data.len() as u64;
        if total > cmd.size {
            return Err(ConnectionError::unexpected_frame(format!(
                "received {total} body bytes, header said {}",
                cmd.size
            )));
        }
        if total < cmd.size {
            cmd.buf.extend_from_slice(&data);
            return Ok(());
        }
        let Chan::AwaitBody(mut cmd) = std::mem::replace(slot, Chan::Open) else {
            return Ok(());
        };
        cmd.body = if cmd.buf.is_empty() {
            // Single-frame body: no copy.
            Bytes::from(data)
        } else {
            cmd.buf.extend_from_slice(&data);
            std::mem::take(&mut cmd.buf).freeze()
        };
        self.out
            .push_back(Output::Effect(Effect::Command(ch, Command::Publish(cmd))));
        Ok(())
    }

    /// A soft error detected inside the state machine (oversized message): tell the shell the
    /// channel is gone, then send channel.close.
    fn emit_soft(&mut self, ch: u16, err: ChannelError) {
        self.out
            .push_back(Output::Effect(Effect::ChannelClosed(ch)));
        self.close_channel(ch, &err);
    }

    fn check_invariants(&self) {
        debug_assert!(
            self.state == State::Open || self.state == State::Closing || self.channels.is_empty(),
            "channels exist only once open"
        );
        debug_assert!(self.frame_max >= MIN_FRAME_MAX || self.frame_max == self.cfg.frame_max);
        debug_assert!(
            self.state != State::Open || self.deadline.is_none(),
            "no handshake deadline once open"
        );
    }
}

fn close_ok() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use amq_protocol::protocol::basic::AMQPProperties;

    fn machine() -> (ConnectionState, Instant) {
        let now = Instant::now();
        let cfg = StateConfig {
            frame_max: 131072,
            channel_max: 16,
            heartbeat: 10,
            max_message_size: 1024,
            auth: Arc::new(AuthDb::from_config(&Config::default())),
            peer_is_loopback: true,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            server_properties: server_properties(ServerIdentity::Warren, "warren@test"),
            over_connection_limit: None,
            vhost_connection_limit: None,
        };
        (ConnectionState::new(cfg, now), now)
    }

    fn drain(s: &mut ConnectionState) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn open(s: &mut ConnectionState, now: Instant) {
        s.handle_protocol_header(HeaderCheck::Ok, now);
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: FieldTable::default(),
                    mechanism: "PLAIN".into(),
                    response: "\0guest\0guest".into(),
                    locale: "en_US".into(),
                })),
            ),
            now,
        );
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                    channel_max: 0,
                    frame_max: 131072,
                    heartbeat: 10,
                })),
            ),
            now,
        );
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: "/".into(),
                })),
            ),
            now,
        );
        assert_eq!(s.state(), State::Open);
        drain(s);
    }

    #[test]
    fn handshake_reaches_open() {
        let (mut s, now) = machine();
        open(&mut s, now);
    }

    fn start_ok(s: &mut ConnectionState, password: &str, now: Instant) -> Vec<Output> {
        s.handle_protocol_header(HeaderCheck::Ok, now);
        drain(s);
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: FieldTable::default(),
                    mechanism: "PLAIN".into(),
                    response: format!("\0guest\0{password}").into(),
                    locale: "en_US".into(),
                })),
            ),
            now,
        );
        drain(s)
    }

    fn close_reply(out: &[Output]) -> Option<(u16, String)> {
        match out.first() {
            Some(Output::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(c)),
            ))) => Some((c.reply_code, c.reply_text.to_string())),
            _ => None,
        }
    }

    #[test]
    fn failed_logins_from_one_source_are_limited() {
        let auth = Arc::new(AuthDb::from_config(&Config::default()));
        auth.set_failure_limit(2);
        let now = Instant::now();
        let src: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
        let attempt = |password: &str, at: Instant| {
            let (mut s, _) = machine();
            s.cfg.auth = auth.clone();
            s.set_login_source(src);
            let out = start_ok(&mut s, password, at);
            (close_reply(&out), s.state())
        };
        for _ in 0..2 {
            let (reply, _) = attempt("nope", now);
            assert_eq!(reply.map(|r| r.0), Some(403));
        }
        // The right password is not even checked now.
        let (reply, state) = attempt("guest", now);
        let (code, text) = reply.expect("connection.close");
        assert_eq!(code, 403);
        assert!(text.contains("too many failed logins"), "{text}");
        assert_eq!(state, State::Closing);
        // A minute later the source may try again.
        let (reply, state) = attempt("guest", now + crate::auth::FAILURE_WINDOW);
        assert_eq!(reply, None);
        assert_eq!(state, State::TuneSent);
    }

    #[test]
    fn wrong_password_is_403() {
        let (mut s, now) = machine();
        s.handle_protocol_header(HeaderCheck::Ok, now);
        drain(&mut s);
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: FieldTable::default(),
                    mechanism: "PLAIN".into(),
                    response: "\0guest\0nope".into(),
                    locale: "en_US".into(),
                })),
            ),
            now,
        );
        let out = drain(&mut s);
        assert!(
            matches!(&out[0], Output::Frame(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) if c.reply_code == 403)
        );
        assert_eq!(s.state(), State::Closing);
    }

    #[test]
    fn close_kind_says_who_closed() {
        let close = || {
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
        };
        let (mut s, now) = machine();
        open(&mut s, now);
        assert_eq!(s.close_kind(), CloseKind::Abrupt);
        s.handle_input(close(), now);
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.close_kind(), CloseKind::ByClient);

        let (mut s, now) = machine();
        open(&mut s, now);
        s.close_connection(ConnectionError::forced("shutdown"), now);
        s.handle_input(
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            ),
            now,
        );
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.close_kind(), CloseKind::ByServer);

        // Crossing closes: ours went first.
        let (mut s, now) = machine();
        open(&mut s, now);
        s.close_connection(ConnectionError::forced("shutdown"), now);
        s.handle_input(close(), now);
        assert_eq!(s.close_kind(), CloseKind::ByServer);

        // No answer to our close: dropped without a handshake.
        let (mut s, now) = machine();
        open(&mut s, now);
        s.close_connection(ConnectionError::forced("shutdown"), now);
        s.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.close_kind(), CloseKind::Abrupt);
    }

    #[test]
    fn heartbeat_sent_and_missed() {
        let (mut s, now) = machine();
        open(&mut s, now);
        let t = s.poll_timeout().expect("timer");
        assert_eq!(t, now + Duration::from_secs(5));
        s.handle_timeout(t);
        assert!(matches!(
            s.poll_output(),
            Some(Output::Frame(AMQPFrame::Heartbeat))
        ));
        s.handle_timeout(now + Duration::from_secs(20));
        assert!(drain(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Effect(Effect::Shutdown))));
    }

    #[test]
    fn paused_receive_monitor_keeps_a_silent_client_and_restarts_on_resume() {
        let (mut s, now) = machine();
        open(&mut s, now);
        s.pause_recv_monitor();
        // Only heartbeats to send: no deadline for the client's.
        for i in 1..=10u64 {
            let t = s.poll_timeout().expect("send timer");
            assert_eq!(t, now + Duration::from_secs(5 * i));
            s.handle_timeout(t);
            assert!(matches!(
                drain(&mut s).as_slice(),
                [Output::Frame(AMQPFrame::Heartbeat)]
            ));
        }
        let later = now + Duration::from_secs(50);
        s.resume_recv_monitor(later);
        s.handle_timeout(later + Duration::from_secs(19));
        assert!(!drain(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Effect(Effect::Shutdown))));
        s.handle_timeout(later + Duration::from_secs(20));
        assert!(drain(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Effect(Effect::Shutdown))));
    }

    #[test]
    fn blocked_capability_is_read_from_start_ok() {
        for (caps, want) in [
            (Some(AMQPValue::Boolean(true)), true),
            (Some(AMQPValue::Boolean(false)), false),
            (None, false),
        ] {
            let (mut s, now) = machine();
            s.handle_protocol_header(HeaderCheck::Ok, now);
            let mut props = FieldTable::default();
            if let Some(v) = caps {
                let mut t = FieldTable::default();
                t.insert("connection.blocked".into(), v);
                props.insert("capabilities".into(), AMQPValue::FieldTable(t));
            }
            s.handle_input(
                AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                        client_properties: props,
                        mechanism: "PLAIN".into(),
                        response: "\0guest\0guest".into(),
                        locale: "en_US".into(),
                    })),
                ),
                now,
            );
            assert_eq!(s.client_wants_blocked(), want);
        }
    }

    #[test]
    fn method_on_unopened_channel_is_504() {
        let (mut s, now) = machine();
        open(&mut s, now);
        s.handle_input(
            AMQPFrame::Method(
                3,
                AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                    prefetch_count: 1,
                    global: false,
                })),
            ),
            now,
        );
        let out = drain(&mut s);
        assert!(
            matches!(&out[0], Output::Frame(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) if c.reply_code == 504)
        );
    }

    #[test]
    fn oversized_message_closes_channel_406() {
        let (mut s, now) = machine();
        open(&mut s, now);
        s.handle_input(
            AMQPFrame::Method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            now,
        );
        drain(&mut s);
        s.handle_input(
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish::default())),
            ),
            now,
        );
        s.handle_input(
            AMQPFrame::Header(
                1,
                amq_protocol::frame::AMQPContentHeader {
                    class_id: 60,
                    body_size: 1025,
                    properties: AMQPProperties::default(),
                },
            ),
            now,
        );
        let out = drain(&mut s);
        assert!(matches!(out[0], Output::Effect(Effect::ChannelClosed(1))));
        assert!(
            matches!(&out[1], Output::Frame(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) if c.reply_code == 406)
        );
        assert_eq!(s.state(), State::Open);
    }

    #[test]
    fn capabilities_are_advertised() {
        let p = server_properties(ServerIdentity::Warren, "warren@127.0.0.1");
        let Some(AMQPValue::FieldTable(caps)) = p.inner().get("capabilities") else {
            panic!("no capabilities");
        };
        for c in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            assert_eq!(caps.inner().get(c), Some(&AMQPValue::Boolean(true)), "{c}");
        }
    }

    #[test]
    fn amqplain_credentials_parse() {
        let creds = amq_protocol::auth::Credentials::new("guest".into(), "guest".into());
        let resp = creds.sasl_auth_string(amq_protocol::auth::SASLMechanism::AMQPlain);
        assert_eq!(
            parse_credentials("AMQPLAIN", &resp),
            Some(("guest".into(), "guest".into()))
        );
        assert_eq!(
            parse_credentials("PLAIN", &"\0u\0p".into()),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(parse_credentials("PLAIN", &"garbage".into()), None);
    }

    #[test]
    fn content_assembly() {
        let (mut s, now) = machine();
        open(&mut s, now);
        s.handle_input(
            AMQPFrame::Method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            now,
        );
        drain(&mut s);
        s.handle_input(
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "q".into(),
                    mandatory: false,
                    immediate: false,
                })),
            ),
            now,
        );
        s.handle_input(
            AMQPFrame::Header(
                1,
                amq_protocol::frame::AMQPContentHeader {
                    class_id: 60,
                    body_size: 4,
                    properties: AMQPProperties::default(),
                },
            ),
            now,
        );
        s.handle_input(AMQPFrame::Body(1, b"ab".to_vec()), now);
        assert!(s.poll_output().is_none());
        s.handle_input(AMQPFrame::Body(1, b"cd".to_vec()), now);
        match s.poll_output() {
            Some(Output::Effect(Effect::Command(1, Command::Publish(p)))) => {
                assert_eq!(&p.body[..], b"abcd")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
