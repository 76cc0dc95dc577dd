//! The async I/O shell of a connection: the only code that selects over the socket, the
//! connection's event channel (deliveries, confirms from queues), the state machine's timer and
//! shutdown. Everything protocol-related is decided by [`state::ConnectionState`] (sans-io) and
//! the class handlers in `crate::class`.

pub mod registry;
pub mod session;
pub mod state;
pub mod throttle;

use crate::codec::{self, HeaderCheck};
use crate::error::ConnectionError;
use crate::inbound::Inbound;
use crate::memory::Memory;
use crate::BrokerShared;
use bytes::{Buf, BytesMut};
use session::Session;
use state::{CloseKind, ConnectionState, Effect, Output, State, StateConfig};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use throttle::Throttle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, warn, Span};

/// Stop taking queue events while this much output is waiting for the socket.
const OUT_HIGH_WATER: usize = 1 << 20;
/// Free space a connection's first reads get. Each read that fills what it was given doubles
/// it, up to [`READ_CHUNK_MAX`]: an idle consumer (most connections of a big fleet) keeps a
/// few KiB, a publisher reaches full-size reads after four.
const READ_CHUNK_MIN: usize = 4 * 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// Pending connections the kernel queues for a listener: a whole fleet reconnecting at once
/// (a load balancer reset every connection) must not have SYNs dropped, which clients only
/// retry after a second or more.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a client listener (AMQP, AMQPS) with [`ACCEPT_BACKLOG`] (the kernel caps it at
/// `net.core.somaxconn`); otherwise as `TcpListener::bind` (SO_REUSEADDR).
pub fn listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(ACCEPT_BACKLOG)
}
/// Events handled per wake-up before going back to the socket.
const EVENT_BATCH: usize = 512;

/// RabbitMQ's `max-connections` vhost limit: the connections opened on the vhost (on this
/// node) are counted when another asks to open it.
fn vhost_connection_limit(shared: &Arc<BrokerShared>) -> state::VhostConnectionLimit {
    let weak = Arc::downgrade(shared);
    state::VhostConnectionLimit(Arc::new(move |vhost: &str| {
        let shared = weak.upgrade()?;
        let v = shared.vhost(vhost)?;
        v.limits().get("max-connections")?;
        let open = shared
            .registry
            .connections()
            .iter()
            .filter(|e| e.opened.lock().as_ref().is_some_and(|o| o.vhost == vhost))
            .count();
        v.connection_limit_reached(open)
    }))
}

/// Serves one client connection until it closes. `peer` is the client (from the PROXY header
/// when `proxy-protocol` is on) and `local` the address it reached: they decide the guest
/// loopback rule, the failed-login source and the connection's name.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    shared: Arc<BrokerShared>,
    shutdown: CancellationToken,
    over_connection_limit: Option<u32>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let cfg = &shared.config;
    let now = Instant::now();
    let mut state = ConnectionState::new(
        StateConfig {
            frame_max: cfg.frame_max,
            channel_max: cfg.channel_max,
            heartbeat: cfg.heartbeat,
            max_message_size: cfg.max_message_size,
            auth: shared.auth.clone(),
            peer_is_loopback: crate::auth::is_loopback(peer.ip()),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(3),
            server_properties: state::server_properties(cfg.server_identity, &cfg.node_name),
            over_connection_limit,
            vhost_connection_limit: Some(vhost_connection_limit(&shared)),
        },
        now,
    );
    state.set_login_source(peer.ip());
    let mut s = Session::new(conn_id, shared.clone(), cfg.frame_max);
    let entry = Arc::new(registry::ConnEntry {
        id: conn_id,
        name: format!("{peer} -> {local}"),
        peer,
        local,
        tls,
        connected_at: crate::stats::epoch_ms(),
        stats: s.stats.clone(),
        opened: Default::default(),
        events: s.events_tx.clone(),
        conn_shared: s.conn_shared.clone(),
    });
    shared.registry.add(entry.clone());
    if !shared.registry.running() {
        // stop_app raced with this accept: do not serve.
        shared.registry.remove(conn_id);
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK_MIN);
    let mut read_chunk = READ_CHUNK_MIN;
    let mut header_done = false;
    let mut closing_for_shutdown = false;
    // The open vhost's deletion token, once the connection is open (see Vhost::deleted).
    let mut vhost_deleted: Option<CancellationToken> = None;
    let mut stop = false;
    // Bytes of `s.out` already written; the buffer is compacted only when fully written or
    // when the written prefix is large, so partial writes do not memmove the rest each time.
    let mut written = 0usize;
    let mut alarm_rx = shared.node.alarms.subscribe();
    let mut alarms_live = true;
    let mut throttle = Throttle::new(*alarm_rx.borrow_and_update());
    // Bytes read but left undecoded because a publish blocked the connection.
    let mut stalled = false;

    loop {
        // 0. Alarms are read here, every turn, not only in the select below: its branches are
        //    biased, and a client that keeps its socket readable (a pipelining publisher) would
        //    win every turn and never let an alarm change through.
        if alarms_live {
            match alarm_rx.has_changed() {
                Ok(true) => throttle.on_alarms(*alarm_rx.borrow_and_update()),
                Ok(false) => {}
                Err(_) => alarms_live = false,
            }
        }
        // Reads are paused only for an open connection blocked by an alarm, or by a queue
        // whose consumers cannot keep up (flow, `crate::queue::flow`); a closing one must
        // still see close-ok.
        // A connection whose own output is backed up (its client does not read what it is
        // sent) is not held back by flow: a client that publishes and consumes on one
        // connection and blocks in a write would never read again, and its queues would never
        // see it drain.
        let backed_up = s.out.len() - written >= OUT_HIGH_WATER
            || s.conn_shared.pending.load(Ordering::Relaxed) >= crate::queue::CONN_PENDING_LIMIT;
        let flow = !backed_up && s.conn_shared.flow.is_blocked();
        let paused = (throttle.is_blocked() || flow) && state.state() == State::Open;
        if paused != state.recv_monitor_paused() {
            if paused {
                debug!(
                    conn_id,
                    flow, "publisher blocked by a resource alarm or flow; socket no longer read"
                );
                state.pause_recv_monitor();
            } else {
                debug!(conn_id, "socket read again (alarm cleared or closing)");
                state.resume_recv_monitor(Instant::now());
            }
        }
        if stalled && !paused {
            stalled = decode_all(
                &mut rbuf,
                &mut header_done,
                &mut state,
                &mut throttle,
                shared.node.memory,
                Instant::now(),
            );
        }
        if let Some(m) = throttle.poll_output() {
            if let Err(e) = s.method(0, m) {
                warn!(error = %e, "encode failed");
            }
        }
        // 1. Drain the state machine: frames to the buffer, effects to the session.
        while let Some(o) = state.poll_output() {
            match o {
                Output::Frame(f) => {
                    if let Err(e) = s.frame(&f) {
                        warn!(error = %e, "encode failed");
                        stop = true;
                    }
                }
                Output::Effect(Effect::Shutdown) => stop = true,
                Output::Effect(e) => {
                    if let Effect::Opened { user, vhost } = &e {
                        throttle.set_notify(state.client_wants_blocked());
                        let (props, mech) = state.client_info();
                        *entry.opened.lock() = Some(registry::ConnOpened {
                            user: user.clone(),
                            vhost: vhost.clone(),
                            client_properties: crate::mgmt::json::table(props),
                            frame_max: state.frame_max(),
                            channel_max: state.channel_max(),
                            heartbeat: state.heartbeat(),
                            auth_mechanism: mech.to_owned(),
                        });
                    }
                    apply_effect(&mut s, &mut state, e).await
                }
            }
        }
        s.flush_publishes().await;
        s.flush_confirms();
        if stop {
            break;
        }
        if vhost_deleted.is_none() {
            vhost_deleted = s.vhost.as_ref().map(|v| v.deleted().clone());
        }
        // 2. Wait for the next thing to do.
        let timer = state.poll_timeout();
        let take_events = s.out.len() - written < OUT_HIGH_WATER;
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !closing_for_shutdown => {
                closing_for_shutdown = true;
                state.close_connection(
                    ConnectionError::forced("broker forced connection closure with reason 'shutdown'"),
                    Instant::now(),
                );
            }
            _ = async { if let Some(t) = &vhost_deleted { t.cancelled().await } },
                if vhost_deleted.is_some() && !closing_for_shutdown => {
                closing_for_shutdown = true;
                let name = s.vhost.as_ref().map(|v| v.name.to_string()).unwrap_or_default();
                state.close_connection(
                    ConnectionError::forced(format!("vhost '{name}' is deleted")),
                    Instant::now(),
                );
            }
            r = wr.write(&s.out[written..]), if written < s.out.len() => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    crate::stats::bump(&s.stats.send_oct, n as u64);
                    crate::stats::bump(&s.stats.send_cnt, 1);
                    written += n;
                    if written == s.out.len() {
                        s.out.clear();
                        written = 0;
                    } else if written >= OUT_HIGH_WATER {
                        s.out.drain(..written);
                        written = 0;
                    }
                    state.note_sent(Instant::now());
                }
            },
            // Flow released: read again.
            _ = s.conn_shared.flow.until_released(), if flow => {}
            r = async { rbuf.reserve(read_chunk); rd.read_buf(&mut rbuf).await }, if !paused && !stalled => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if n >= read_chunk && read_chunk < READ_CHUNK_MAX {
                        read_chunk *= 2;
                    }
                    crate::stats::bump(&s.stats.recv_oct, n as u64);
                    crate::stats::bump(&s.stats.recv_cnt, 1);
                    let now = Instant::now();
                    state.note_received(now);
                    stalled = decode_all(&mut rbuf, &mut header_done, &mut state, &mut throttle, shared.node.memory, now);
                }
            },
            r = alarm_rx.changed(), if alarms_live => match r {
                Ok(()) => throttle.on_alarms(*alarm_rx.borrow_and_update()),
                Err(_) => alarms_live = false,
            },
            ev = s.events_rx.recv(), if take_events => {
                if let Some(ev) = ev {
                    handle_event(&mut s, &mut state, ev).await;
                    for _ in 0..EVENT_BATCH {
                        match s.events_rx.try_recv() {
                            Ok(ev) => handle_event(&mut s, &mut state, ev).await,
                            Err(_) => break,
                        }
                    }
                    // Check the level first: clearing the flag while still above the low-water
                    // mark would lose the wake-up the starved queue is waiting for.
                    if s.conn_shared.pending.load(Ordering::Relaxed) < crate::queue::CONN_PENDING_LIMIT / 2
                        && s.conn_shared.starved.swap(false, Ordering::Relaxed)
                    {
                        s.kick_consumed_queues();
                    }
                }
            },
            _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                state.handle_timeout(Instant::now());
            }
        }
    }
    // Release consumers, unacked deliveries and exclusive queues before close-ok goes out, as
    // RabbitMQ does: a client that got close-ok may count on them being gone.
    s.release_all().await;
    shared.registry.remove(conn_id);
    // Flush what is left (close, close-ok), bounded in time.
    let mut flushed = true;
    if written < s.out.len() {
        flushed = matches!(
            tokio::time::timeout(FLUSH_TIMEOUT, wr.write_all(&s.out[written..])).await,
            Ok(Ok(()))
        );
    }
    let kind = state.close_kind();
    if flushed && kind != CloseKind::Abrupt {
        if kind == CloseKind::ByServer {
            // The client's close-ok was its last word, and some clients (Java's) wait for our
            // EOF before they call the connection closed: send it now, read on below.
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, wr.shutdown()).await;
        }
        rbuf.clear();
        let eof = linger(&mut rd, &mut rbuf, Instant::now() + CLOSE_LINGER).await;
        debug!(conn_id, client_closed = eof, "after the close handshake");
    }
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, wr.shutdown()).await;
    debug!(conn_id, "connection closed");
}

/// After a close handshake, how long the socket stays open for the client to close it first.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bound on writing the last frames and on the TLS/TCP shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Reads per linger that take what is already buffered once the time is up.
const LINGER_LAST_READS: usize = 16;

/// Reads and discards until the client closes or a read fails (returns true) or `until` passes
/// (false), into `scratch` at its current capacity, at most 64 KiB (never grown). Closing with unread bytes in the receive buffer makes
/// the kernel send RST instead of FIN, and a client whose writes were still in flight behind its
/// connection.close (publishes, say) would get ECONNRESET or EPIPE instead of its close callback.
/// RabbitMQ also leaves the close to the client after close-ok.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R, scratch: &mut BytesMut, until: Instant) -> bool {
    let cap = scratch.capacity().clamp(1, 64 * 1024);
    scratch.clear();
    scratch.resize(cap, 0);
    loop {
        match tokio::time::timeout_at(until, rd.read(&mut scratch[..])).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    // Time is up: still take what has already arrived, without waiting, so that the close is
    // a FIN whenever the client has paused.
    for _ in 0..LINGER_LAST_READS {
        match tokio::time::timeout(Duration::ZERO, rd.read(&mut scratch[..])).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    false
}

/// Feeds every complete frame in `rbuf` to the state machine. Returns true when it stopped
/// early because a publish blocked the connection (the rest stays in `rbuf` until unblocked).
fn decode_all(
    rbuf: &mut BytesMut,
    header_done: &mut bool,
    state: &mut ConnectionState,
    throttle: &mut Throttle,
    memory: &Memory,
    now: Instant,
) -> bool {
    if !*header_done {
        match codec::check_protocol_header(rbuf) {
            HeaderCheck::Incomplete => return false,
            HeaderCheck::Ok => {
                rbuf.advance(8);
                *header_done = true;
                state.handle_protocol_header(HeaderCheck::Ok, now);
            }
            HeaderCheck::Mismatch => {
                rbuf.clear();
                state.handle_protocol_header(HeaderCheck::Mismatch, now);
                return false;
            }
        }
    }
    loop {
        if state.state() == State::Closed {
            rbuf.clear();
            return false;
        }
        match crate::inbound::decode(rbuf, state.frame_max()) {
            Ok(Some((frame, n))) => {
                rbuf.advance(n);
                let content = matches!(frame, Inbound::Header(..) | Inbound::Body(..));
                state.handle_inbound(frame, now);
                if content
                    && state.state() == State::Open
                    && throttle.on_publish(memory.at_watermark())
                {
                    return true;
                }
            }
            Ok(None) => return false,
            Err(crate::error::CodecError::TooDeep {
                channel,
                class_id,
                method_id,
                len,
            }) => {
                // The frame is skipped whole; the connection goes on unless it was a
                // connection-level frame.
                rbuf.advance(len);
                state.handle_too_deep(channel, class_id, method_id, now);
            }
            Err(e) => {
                debug!(error = %e, "bad frame");
                rbuf.clear();
                state.close_connection(e.into(), now);
                return false;
            }
        }
    }
}

async fn handle_event(s: &mut Session, state: &mut ConnectionState, ev: crate::queue::ClientEvent) {
    if let Some(e) = s.handle_event(ev).await {
        state.close_connection(e, Instant::now());
    }
}

async fn apply_effect(s: &mut Session, state: &mut ConnectionState, e: Effect) {
    match e {
        Effect::Opened { user, vhost } => {
            s.perms = s.shared.auth.permissions(&user, &vhost);
            s.vhost = s.shared.vhost(&vhost);
            Span::current().record("vhost", field::display(&vhost));
            s.user = user;
            s.frame_max = state.frame_max();
        }
        Effect::ChannelOpened(ch) => s.open_channel(ch),
        Effect::ChannelClosed(ch) => s.release_channel(ch).await,
        Effect::Command(ch, cmd) => {
            // Judge by the session, not by the state machine's current view: effects run after
            // every frame of a read went through the state machine, so an ack followed by
            // channel.close in the same read must still be applied (the ChannelClosed effect
            // comes after it). Channels released after a soft error are gone from the session.
            let Some(chan) = s.channels.get_mut(&ch) else {
                return;
            };
            if let state::Command::Publish(p) = &cmd {
                crate::stats::bump(&s.stats.publish, 1);
                crate::stats::bump(&chan.stats.publish, 1);
                if chan.confirms.is_some() {
                    crate::stats::bump(&s.stats.publish_confirm, 1);
                }
                s.stats.msg_sizes.observe(p.body.len() as u64);
                chan.publishing = true;
            } else {
                // Anything else may need to observe earlier publishes (get, purge, ...).
                s.flush_publishes().await;
            }
            match crate::class::dispatch(s, ch, cmd).await {
                Ok(()) => {}
                Err(crate::error::AmqpError::Channel(e)) => {
                    debug!(channel = ch, error = %e, "channel error");
                    s.release_channel(ch).await;
                    state.close_channel(ch, &e);
                }
                Err(crate::error::AmqpError::Connection(e)) => {
                    debug!(error = %e, "connection error");
                    state.close_connection(e, Instant::now());
                }
            }
        }
        Effect::Shutdown => {}
    }
}
