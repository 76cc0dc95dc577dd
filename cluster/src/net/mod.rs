//! Links between nodes: one authenticated TCP (optionally TLS) connection per peer pair,
//! carrying Raft RPCs, forwarded requests and application messages.
//!
//! - [`frame`]: the pure frame codec (layout and limits in its doc).
//! - [`handshake`]: HMAC-SHA256 mutual authentication with the shared secret.
//! - [`tls`]: optional rustls on top of TCP.
//!
//! Per peer there are two bounded outbound queues that outlive connections: *control* (RPC
//! requests and responses, pongs) and *app* (application messages). A link's writer task owns
//! both queues while it runs, drains control first, and batches whatever is ready into one write
//! (up to 256 KiB). Its reader task answers pings, routes responses to their waiting callers,
//! hands requests to the node ([`Handler`]) and app messages to channel subscribers.
//!
//! Failure detection: each side pings every `link_heartbeat`; a link that receives nothing for
//! `failure_detection` is closed and its peer reported [`PeerEvent::Down`]. A pong records when
//! the answered ping was *sent* (`last_ack`): the peer was alive and reachable both ways at some
//! time after that, which is what `has_quorum` counts against the lease.
//!
//! One link per pair: both nodes may dial; when two links to the same peer meet, both sides keep
//! the same one (the one from the peer's newest boot, then the one dialed by the lower node id,
//! then the newer one) and close the other.
//!
//! Delivery of app messages: in order per peer (hence per channel), no gaps within one link
//! session. When a link breaks, frames the writer had taken but not yet written are lost; a
//! [`PeerEvent::Down`] / [`PeerEvent::Up`] pair marks that boundary. Messages sent while the peer
//! is down wait in the queue (bounded: `send` fails with `QueueFull` when it is full) and go out
//! on the next link.

pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedMutexGuard, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::frame::{Frame, MAX_FRAME};
pub use self::handshake::PeerView;
use self::handshake::{HandshakeError, Identity, PeerHello, RejectReason};
use self::tls::Tls;
use crate::config::Timing;
use crate::error::ClusterError;
use crate::state::EvictReason;
use crate::types::NodeId;

/// Largest application message payload.
pub const MAX_APP_PAYLOAD: usize = 16 << 20;

const CONTROL_QUEUE: usize = 1024;
const WRITE_BATCH: usize = 256 << 10;
const MAX_PENDING_HANDSHAKES: usize = 128;
const MAX_INFLIGHT_REQUESTS: usize = 256;
/// How long a probe's connection must stay open to count as accepted (see `Net::probe`).
const PROBE_LINGER: Duration = Duration::from_millis(20);

/// A change in what this node can reach (see [`crate::Cluster::peer_events`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A link to the peer was established (a new link session: resync anything stateful).
    Up(NodeId),
    /// The link to the peer broke or timed out.
    Down(NodeId),
    /// After a `Down`, a dial of the peer's address was refused: the host answers and nothing
    /// listens, so its process is gone (sent once per `Down`).
    Gone(NodeId),
    /// `has_quorum()` became false.
    QuorumLost,
    /// `has_quorum()` became true.
    QuorumRegained,
    /// This node and the peer each evicted the other (both forced a one-voter cluster): nothing
    /// is done automatically; pick a loser and call `rejoin` on it.
    SplitBrain(NodeId),
    /// A peer says this node was removed (`forget` / `leave`): it stays out until reset.
    RemovedFromCluster(EvictReason),
    /// This node discarded its metadata and rejoined under a survivor (see
    /// [`crate::ResetReason::Rejoined`]).
    Rejoined,
}

/// An application message from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppMessage {
    pub from: NodeId,
    pub channel: u8,
    pub payload: Bytes,
}

/// The node behind the links.
pub(crate) trait Handler: Send + Sync + 'static {
    /// What this node knows of `peer` (told to it during the handshake).
    fn view_of(&self, peer: NodeId) -> PeerView;
    /// A link to `peer` was established; `peer.view` is what it knows of us.
    fn on_linked(&self, peer: &PeerHello);
    /// Serve a request; the answer goes back as the response body.
    fn on_request(
        self: Arc<Self>,
        from: NodeId,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Bytes> + Send>>;
    /// Whether to keep a link to `peer` up (dial again when it breaks).
    fn wants_link(&self, peer: NodeId) -> bool;
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("peer unreachable")]
    Unreachable,
    #[error("call timed out")]
    Timeout,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;

/// Everything the link layer needs to start.
pub(crate) struct NetConfig {
    pub(crate) identity: Identity,
    pub(crate) timing: Timing,
    pub(crate) tls: Option<Tls>,
    pub(crate) app_queue: usize,
    pub(crate) app_inbox: usize,
}

/// The link layer of one node; clones share everything.
#[derive(Clone)]
pub(crate) struct Net {
    s: Arc<Shared>,
}

struct Shared {
    me: Identity,
    timing: Timing,
    tls: Option<Tls>,
    app_queue: usize,
    app_inbox: usize,
    epoch: Instant,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    handler: OnceLock<Weak<dyn Handler>>,
    events: broadcast::Sender<PeerEvent>,
    blocked: Mutex<HashSet<NodeId>>,
    subs: Mutex<HashMap<u8, mpsc::Sender<AppMessage>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    link_seq: AtomicU64,
    handshakes: Arc<Semaphore>,
}

struct Peer {
    id: NodeId,
    /// Address told by the peer itself in a handshake.
    told_addr: Mutex<Option<String>>,
    /// Address from the replicated membership.
    member_addr: Mutex<Option<String>>,
    name: Mutex<Option<String>>,
    link: Mutex<Option<Arc<LinkState>>>,
    ctrl_tx: mpsc::Sender<Bytes>,
    ctrl_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
    app_tx: mpsc::Sender<Bytes>,
    app_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next_call: AtomicU64,
    dialing: AtomicBool,
    /// Send time of the newest ping the peer answered.
    last_ack: Mutex<Option<Instant>>,
    last_rx: Mutex<Option<Instant>>,
    down_since: Mutex<Option<Instant>>,
    ever_up: AtomicBool,
    /// Since its link last dropped, a dial of its address was refused: the host answers and
    /// nothing listens there, so the process is gone (not merely out of reach).
    refused: AtomicBool,
}

struct LinkState {
    seq: u64,
    dialer: NodeId,
    peer_boot: u64,
    cancel: CancellationToken,
    /// What the peer said in the handshake (replayed to a handler set after the link came up).
    hello: PeerHello,
    /// What we told the peer of itself in the handshake.
    told: PeerView,
}

/// A snapshot of one peer for `members()`.
pub(crate) struct PeerStatus {
    pub(crate) up: bool,
    pub(crate) last_rx: Option<Instant>,
    pub(crate) refused: bool,
}

// === impl Net ===

impl Net {
    pub(crate) fn new(cfg: NetConfig, events: broadcast::Sender<PeerEvent>) -> Net {
        Net {
            s: Arc::new(Shared {
                me: cfg.identity,
                timing: cfg.timing,
                tls: cfg.tls,
                app_queue: cfg.app_queue,
                app_inbox: cfg.app_inbox,
                epoch: Instant::now(),
                peers: Mutex::new(HashMap::new()),
                handler: OnceLock::new(),
                events,
                blocked: Mutex::new(HashSet::new()),
                subs: Mutex::new(HashMap::new()),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
                link_seq: AtomicU64::new(1),
                handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            }),
        }
    }

    /// Set the handler once. Links that came up before it (a restarting node's Raft may dial
    /// before the node is wired) are replayed to it, so what their peers said in the handshake
    /// ("you were evicted", "you were forgotten") is never lost.
    pub(crate) fn set_handler(&self, h: Weak<dyn Handler>) {
        let _ = self.s.handler.set(h);
        let Some(h) = self.handler() else { return };
        let peers: Vec<Arc<Peer>> = self.s.peers.lock().values().cloned().collect();
        for p in peers {
            let hello = match &*p.link.lock() {
                Some(l) if !l.cancel.is_cancelled() => Some(l.hello.clone()),
                _ => None,
            };
            if let Some(hello) = hello {
                h.on_linked(&hello);
            }
        }
    }

    /// Our view of `peer` is now `view`: if its link was set up while we told it something else
    /// (it linked before we evicted it, say), drop the link so that it dials again and the new
    /// handshake tells it. Returns whether a link was dropped.
    pub(crate) fn retell(&self, peer: NodeId, view: PeerView) -> bool {
        let Some(p) = self.known_peer(peer) else {
            return false;
        };
        let link = p.link.lock().clone();
        match link {
            Some(l) if !l.cancel.is_cancelled() && l.told != view => {
                info!(peer = %l.hello.name, ?view, "cluster link dropped to tell the peer its new standing");
                l.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    fn handler(&self) -> Option<Arc<dyn Handler>> {
        self.s.handler.get().and_then(Weak::upgrade)
    }

    /// Serve inbound links on these listeners.
    pub(crate) fn serve(&self, listeners: Vec<TcpListener>) {
        for l in listeners {
            let net = self.clone();
            self.s
                .tracker
                .spawn(async move { net.accept_loop(l).await });
        }
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            let (sock, from) = tokio::select! {
                _ = self.s.cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.s.handshakes.clone().try_acquire_owned() else {
                debug!(%from, "too many cluster handshakes in progress: connection dropped");
                continue;
            };
            let net = self.clone();
            self.s.tracker.spawn(async move {
                net.accept_one(sock, from, permit).await;
            });
        }
    }

    async fn accept_one(
        self,
        sock: TcpStream,
        from: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = sock.set_nodelay(true);
        let t = self.s.timing.handshake_timeout;
        let me = &self.s.me;
        let told = Mutex::new(PeerView::Unknown);
        let view = |id| {
            let v = self.handler().map_or(PeerView::Unknown, |h| h.view_of(id));
            *told.lock() = v;
            v
        };
        let admit = |p: &PeerHello| self.admit(p);
        let res = tokio::time::timeout(t, async {
            let mut stream: BoxStream = match &self.s.tls {
                Some(tls) => Box::new(tls.acceptor.accept(sock).await?),
                None => Box::new(sock),
            };
            let r = handshake::accept(&mut stream, me, view, admit).await?;
            Ok::<_, HandshakeError>((stream, r))
        })
        .await;
        drop(permit);
        match res {
            Err(_) => debug!(%from, "cluster handshake timed out"),
            Ok(Err(e)) => log_handshake_error(&e, &from.to_string()),
            Ok(Ok((stream, (peer, rest)))) => {
                let told = *told.lock();
                self.install(peer, told, false, stream, rest);
            }
        }
    }

    /// The acceptor's check before it welcomes an authenticated peer.
    fn admit(&self, p: &PeerHello) -> Result<(), RejectReason> {
        if self.s.blocked.lock().contains(&p.id) {
            return Err(RejectReason::Blocked);
        }
        if let Some(peer) = self.s.peers.lock().get(&p.id).cloned() {
            if let Some(old) = &*peer.link.lock() {
                let candidate = LinkState {
                    seq: u64::MAX,
                    dialer: p.id,
                    peer_boot: p.boot,
                    cancel: CancellationToken::new(),
                    hello: p.clone(),
                    told: PeerView::Unknown,
                };
                if !old.cancel.is_cancelled() && !self.prefer_new(p.id, old, &candidate) {
                    return Err(RejectReason::Duplicate);
                }
            }
        }
        Ok(())
    }

    /// Which of two live links to `peer` to keep (the same answer on both sides).
    fn prefer_new(&self, peer: NodeId, old: &LinkState, new: &LinkState) -> bool {
        if new.peer_boot != old.peer_boot {
            return new.peer_boot > old.peer_boot;
        }
        let low = self.s.me.id.min(peer);
        let (old_low, new_low) = (old.dialer == low, new.dialer == low);
        if old_low != new_low {
            return new_low;
        }
        true
    }

    fn peer(&self, id: NodeId) -> Arc<Peer> {
        let mut peers = self.s.peers.lock();
        peers
            .entry(id)
            .or_insert_with(|| {
                let (ctrl_tx, ctrl_rx) = mpsc::channel(CONTROL_QUEUE);
                let (app_tx, app_rx) = mpsc::channel(self.s.app_queue);
                Arc::new(Peer {
                    id,
                    told_addr: Mutex::new(None),
                    member_addr: Mutex::new(None),
                    name: Mutex::new(None),
                    link: Mutex::new(None),
                    ctrl_tx,
                    ctrl_rx: Arc::new(tokio::sync::Mutex::new(ctrl_rx)),
                    app_tx,
                    app_rx: Arc::new(tokio::sync::Mutex::new(app_rx)),
                    pending: Mutex::new(HashMap::new()),
                    next_call: AtomicU64::new(1),
                    dialing: AtomicBool::new(false),
                    last_ack: Mutex::new(None),
                    last_rx: Mutex::new(None),
                    down_since: Mutex::new(None),
                    refused: AtomicBool::new(false),
                    ever_up: AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn known_peer(&self, id: NodeId) -> Option<Arc<Peer>> {
        self.s.peers.lock().get(&id).cloned()
    }

    /// Record the address the membership gives for `id`.
    pub(crate) fn set_member_addr(&self, id: NodeId, addr: &str) {
        if id == self.s.me.id {
            return;
        }
        let p = self.peer(id);
        let mut a = p.member_addr.lock();
        if a.as_deref() != Some(addr) {
            *a = Some(addr.to_string());
        }
    }

    /// Dial `addr` (host:port), authenticate and install the link. Returns the peer's id.
    pub(crate) async fn connect(&self, addr: &str) -> Result<NodeId, HandshakeError> {
        let t = self.s.timing.handshake_timeout;
        let me = &self.s.me;
        let told = Mutex::new(PeerView::Unknown);
        let view = |id| {
            let v = self.handler().map_or(PeerView::Unknown, |h| h.view_of(id));
            *told.lock() = v;
            v
        };
        let res = tokio::time::timeout(t, async {
            let sock = TcpStream::connect(addr).await?;
            let _ = sock.set_nodelay(true);
            let mut stream: BoxStream = match &self.s.tls {
                Some(tls) => {
                    let name = tls::server_name(addr).ok_or_else(|| {
                        HandshakeError::Protocol(format!("no TLS server name in {addr}"))
                    })?;
                    Box::new(tls.connector.connect(name, sock).await?)
                }
                None => Box::new(sock),
            };
            let r = handshake::dial(&mut stream, me, view).await?;
            Ok::<_, HandshakeError>((stream, r))
        })
        .await;
        let (stream, (peer, rest)) = match res {
            Err(_) => {
                return Err(HandshakeError::Protocol(format!(
                    "handshake with {addr} timed out"
                )))
            }
            // The peer keeps the link it already has with us: as good as a new one.
            Ok(Err(HandshakeError::Duplicate(id))) => return Ok(id),
            Ok(Err(e)) => {
                log_handshake_error(&e, addr);
                return Err(e);
            }
            Ok(Ok(x)) => x,
        };
        let id = peer.id;
        if self.s.blocked.lock().contains(&id) {
            return Err(HandshakeError::Refused(RejectReason::Blocked));
        }
        let told = *told.lock();
        self.install(peer, told, true, stream, rest);
        Ok(id)
    }

    /// Make `peer` the current link for its node (or drop it if the existing one wins).
    fn install(
        &self,
        hello: PeerHello,
        told: PeerView,
        dialed: bool,
        stream: BoxStream,
        rest: BytesMut,
    ) {
        let peer = self.peer(hello.id);
        *peer.told_addr.lock() = Some(hello.addr.clone());
        *peer.name.lock() = Some(hello.name.clone());
        let link = Arc::new(LinkState {
            seq: self.s.link_seq.fetch_add(1, Ordering::Relaxed),
            dialer: if dialed { self.s.me.id } else { hello.id },
            peer_boot: hello.boot,
            cancel: self.s.cancel.child_token(),
            hello: hello.clone(),
            told,
        });
        let replaced = {
            let mut cur = peer.link.lock();
            let replaced = match &*cur {
                Some(old) if !old.cancel.is_cancelled() => {
                    if !self.prefer_new(hello.id, old, &link) {
                        debug!(peer = %hello.name, "duplicate cluster link dropped");
                        return;
                    }
                    old.cancel.cancel();
                    true
                }
                _ => false,
            };
            *cur = Some(link.clone());
            replaced
        };
        if replaced {
            peer.pending.lock().clear();
            let _ = self.s.events.send(PeerEvent::Down(hello.id));
        }
        let now = Instant::now();
        *peer.last_rx.lock() = Some(now);
        *peer.down_since.lock() = None;
        peer.ever_up.store(true, Ordering::Relaxed);
        peer.refused.store(false, Ordering::Relaxed);
        info!(peer = %hello.name, addr = %hello.addr, dialed, "cluster link up");
        let _ = self.s.events.send(PeerEvent::Up(hello.id));
        let net = self.clone();
        let p = peer.clone();
        self.s.tracker.spawn(async move {
            net.run_link(p, link, stream, rest).await;
        });
        if let Some(h) = self.handler() {
            h.on_linked(&hello);
        }
    }

    async fn run_link(
        self,
        peer: Arc<Peer>,
        link: Arc<LinkState>,
        stream: BoxStream,
        rest: BytesMut,
    ) {
        let (rd, wr) = tokio::io::split(stream);
        let why = tokio::select! {
            r = self.read_loop(&peer, &link, rd, rest) => r,
            r = self.write_loop(&peer, &link, wr) => r,
            _ = link.cancel.cancelled() => "closed".to_string(),
        };
        link.cancel.cancel();
        let current = {
            let mut cur = peer.link.lock();
            if cur.as_ref().is_some_and(|c| c.seq == link.seq) {
                *cur = None;
                true
            } else {
                false
            }
        };
        if current {
            peer.pending.lock().clear();
            *peer.down_since.lock() = Some(Instant::now());
            let name = peer.name.lock().clone().unwrap_or_default();
            info!(peer = %name, reason = %why, "cluster link down");
            let _ = self.s.events.send(PeerEvent::Down(peer.id));
            if !self.s.cancel.is_cancelled() {
                self.ensure_link(peer.id);
            }
        }
    }

    async fn read_loop(
        &self,
        peer: &Arc<Peer>,
        link: &LinkState,
        mut rd: tokio::io::ReadHalf<BoxStream>,
        mut buf: BytesMut,
    ) -> String {
        let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
        loop {
            loop {
                let frame = match Frame::decode(&mut buf, MAX_FRAME) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(peer = peer.id, error = %e, "bad frame from cluster peer");
                        return format!("bad frame: {e}");
                    }
                };
                if let Err(why) = self.on_frame(peer, link, frame, &inflight).await {
                    return why;
                }
            }
            let silence = self.s.timing.failure_detection;
            match tokio::time::timeout(silence, rd.read_buf(&mut buf)).await {
                Err(_) => return format!("nothing received for {silence:?}"),
                Ok(Ok(0)) => return "peer closed the connection".into(),
                Ok(Err(e)) => return format!("read error: {e}"),
                Ok(Ok(_)) => *peer.last_rx.lock() = Some(Instant::now()),
            }
        }
    }

    async fn on_frame(
        &self,
        peer: &Arc<Peer>,
        _link: &LinkState,
        frame: Frame,
        inflight: &Arc<Semaphore>,
    ) -> Result<(), String> {
        match frame {
            Frame::Ping(t) => {
                let _ = peer.ctrl_tx.try_send(Frame::Pong(t).to_bytes());
            }
            Frame::Pong(t) => {
                let sent = self.s.epoch + Duration::from_nanos(t);
                let mut ack = peer.last_ack.lock();
                if ack.is_none_or(|a| a < sent) {
                    *ack = Some(sent);
                }
            }
            Frame::Request { id, body } => {
                let Some(h) = self.handler() else {
                    return Err("node is gone".into());
                };
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    return Err("closed".into());
                };
                let tx = peer.ctrl_tx.clone();
                let from = peer.id;
                self.s.tracker.spawn(async move {
                    let resp = h.on_request(from, body).await;
                    drop(permit);
                    let _ = tx.send(Frame::Response { id, body: resp }.to_bytes()).await;
                });
            }
            Frame::Response { id, body } => {
                if let Some(tx) = peer.pending.lock().remove(&id) {
                    let _ = tx.send(body);
                }
            }
            Frame::App { channel, payload } => {
                let sub = self.s.subs.lock().get(&channel).cloned();
                let Some(sub) = sub else {
                    debug!(
                        channel,
                        "app message for a channel nobody subscribed: dropped"
                    );
                    return Ok(());
                };
                let msg = AppMessage {
                    from: peer.id,
                    channel,
                    payload,
                };
                match sub.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.s.subs.lock().remove(&channel);
                    }
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        let wait = self.s.timing.failure_detection / 4;
                        if tokio::time::timeout(wait, sub.send(msg)).await.is_err() {
                            warn!(
                                peer = peer.id,
                                channel,
                                "app inbox full: closing the link so the gap is visible as Down/Up"
                            );
                            return Err("app inbox full".into());
                        }
                    }
                }
            }
            Frame::Reject(body) => {
                let e = handshake::late_reject(&body);
                log_handshake_error(&e, &peer.id.to_string());
                return Err(e.to_string());
            }
            f => {
                warn!(peer = peer.id, frame = ?f, "handshake frame on an open cluster link");
                return Err("protocol error".into());
            }
        }
        Ok(())
    }

    async fn write_loop(
        &self,
        peer: &Arc<Peer>,
        link: &LinkState,
        mut wr: tokio::io::WriteHalf<BoxStream>,
    ) -> String {
        // The previous link's writer releases the queues when it stops.
        let mut ctrl: OwnedMutexGuard<mpsc::Receiver<Bytes>> =
            peer.ctrl_rx.clone().lock_owned().await;
        let mut app: OwnedMutexGuard<mpsc::Receiver<Bytes>> =
            peer.app_rx.clone().lock_owned().await;
        let mut tick = tokio::time::interval(self.s.timing.link_heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            tokio::select! {
                biased;
                _ = link.cancel.cancelled() => return "closed".into(),
                f = ctrl.recv() => match f {
                    Some(f) => buf.extend_from_slice(&f),
                    None => return "closed".into(),
                },
                f = app.recv() => match f {
                    Some(f) => buf.extend_from_slice(&f),
                    None => return "closed".into(),
                },
                _ = tick.tick() => {
                    let t = Instant::now().saturating_duration_since(self.s.epoch).as_nanos() as u64;
                    Frame::Ping(t).encode(&mut buf);
                }
            }
            while buf.len() < WRITE_BATCH {
                if let Ok(f) = ctrl.try_recv() {
                    buf.extend_from_slice(&f);
                } else if let Ok(f) = app.try_recv() {
                    buf.extend_from_slice(&f);
                } else {
                    break;
                }
            }
            if self.s.blocked.lock().contains(&peer.id) {
                return "partitioned by the test hook".into();
            }
            let write = async {
                wr.write_all(&buf).await?;
                wr.flush().await
            };
            match tokio::time::timeout(self.s.timing.failure_detection, write).await {
                Ok(Ok(())) => buf.clear(),
                Ok(Err(e)) => return format!("write error: {e}"),
                Err(_) => return "write stalled".into(),
            }
        }
    }

    /// Keep (re)dialing `id` in the background until a link is up or it is no longer wanted.
    pub(crate) fn ensure_link(&self, id: NodeId) {
        if id == self.s.me.id || self.s.cancel.is_cancelled() || self.s.blocked.lock().contains(&id)
        {
            return;
        }
        let peer = self.peer(id);
        if peer.link.lock().is_some() || peer.dialing.swap(true, Ordering::AcqRel) {
            return;
        }
        let net = self.clone();
        self.s.tracker.spawn(async move {
            net.dial_loop(&peer).await;
            peer.dialing.store(false, Ordering::Release);
        });
    }

    /// Records that a dial of `peer` was refused; the first time since its link dropped, tells
    /// the subscribers ([`PeerEvent::Gone`]).
    fn mark_refused(&self, peer: &Peer) {
        if !peer.refused.swap(true, Ordering::Relaxed) {
            let _ = self.s.events.send(PeerEvent::Gone(peer.id));
        }
    }

    /// Marks `peer` refused if a TCP connect to `addr` is refused (nothing is sent: the
    /// other side sees a connection close before its handshake).
    ///
    /// A process being killed may close its links a moment before its listener, which then
    /// still completes connects (the kernel answers for it) and resets them once it closes: a
    /// connection closed within [`PROBE_LINGER`] is such a one, and the address is dialled
    /// again, for one link heartbeat at most. One still open (or answering) is a live peer.
    async fn probe(&self, peer: &Peer, addr: &str) {
        let end = Instant::now() + self.s.timing.link_heartbeat;
        while Instant::now() < end && peer.link.lock().is_none() {
            match tokio::time::timeout_at(end, TcpStream::connect(addr)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    if peer.link.lock().is_none() {
                        self.mark_refused(peer);
                    }
                    return;
                }
                Ok(Ok(mut sock)) => {
                    let mut b = [0u8; 1];
                    match tokio::time::timeout(PROBE_LINGER, sock.read(&mut b)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            tokio::time::sleep(PROBE_LINGER / 4).await;
                        }
                        _ => return,
                    }
                }
                _ => return,
            }
        }
    }

    async fn dial_loop(&self, peer: &Arc<Peer>) {
        let t = &self.s.timing;
        let mut backoff = Duration::from_millis(50);
        // After a drop, a bare TCP connect first tells at once whether the peer's process is
        // gone (its address refuses), which is what the failover of its queues waits for; then
        // the higher id gives the lower one a head start, so that both rarely dial at once.
        let addr = peer.member_addr.lock().clone();
        let dropped = peer.down_since.lock().is_some();
        if let (Some(addr), true) = (addr, dropped) {
            self.probe(peer, &addr).await;
        }
        if self.s.me.id > peer.id {
            tokio::time::sleep(t.link_heartbeat).await;
        }
        let mut attempt: u32 = 0;
        loop {
            if self.s.cancel.is_cancelled()
                || peer.link.lock().is_some()
                || self.s.blocked.lock().contains(&peer.id)
            {
                return;
            }
            let wanted = self.handler().is_some_and(|h| h.wants_link(peer.id));
            if !wanted && attempt >= 3 {
                return;
            }
            let told = peer.told_addr.lock().clone();
            let member = peer.member_addr.lock().clone();
            let addr = match (told, member) {
                (Some(a), Some(b)) if a != b => Some(if attempt % 2 == 0 { a } else { b }),
                (Some(a), _) | (None, Some(a)) => Some(a),
                (None, None) => None,
            };
            let Some(addr) = addr else { return };
            attempt += 1;
            match self.connect(&addr).await {
                Ok(id) if id == peer.id => return,
                Ok(other) => {
                    warn!(expected = peer.id, found = other, %addr, "dialed address belongs to another node");
                }
                Err(e) => {
                    if matches!(&e, HandshakeError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
                        && peer.link.lock().is_none()
                    {
                        self.mark_refused(peer);
                    }
                    debug!(peer = peer.id, %addr, error = %e, "cluster dial failed");
                }
            }
            let jitter = Duration::from_millis(
                rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2),
            );
            tokio::select! {
                _ = self.s.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(t.reconnect_max);
        }
    }

    /// Send a request and wait for its response body.
    pub(crate) async fn call(
        &self,
        to: NodeId,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        if self.s.blocked.lock().contains(&to) || self.s.cancel.is_cancelled() {
            return Err(CallError::Unreachable);
        }
        let Some(peer) = self.known_peer(to) else {
            return Err(CallError::Unreachable);
        };
        if peer.link.lock().is_none() {
            self.ensure_link(to);
            return Err(CallError::Unreachable);
        }
        let id = peer.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        peer.pending.lock().insert(id, tx);
        if peer
            .ctrl_tx
            .try_send(Frame::Request { id, body }.to_bytes())
            .is_err()
        {
            peer.pending.lock().remove(&id);
            return Err(CallError::Unreachable);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(CallError::Unreachable),
            Err(_) => {
                peer.pending.lock().remove(&id);
                Err(CallError::Timeout)
            }
        }
    }

    /// Queue an application message (see the module doc for what is guaranteed).
    pub(crate) fn send_app(
        &self,
        to: NodeId,
        channel: u8,
        payload: Bytes,
    ) -> Result<(), ClusterError> {
        if payload.len() > MAX_APP_PAYLOAD {
            return Err(ClusterError::TooLarge(payload.len(), MAX_APP_PAYLOAD));
        }
        if to == self.s.me.id {
            return Err(ClusterError::Refused(
                "cannot send an app message to this node itself".into(),
            ));
        }
        if self.s.cancel.is_cancelled() {
            return Err(ClusterError::Shutdown);
        }
        let Some(peer) = self.known_peer(to) else {
            return Err(ClusterError::UnknownNode(format!("{to:016x}")));
        };
        match peer
            .app_tx
            .try_send(Frame::App { channel, payload }.to_bytes())
        {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(ClusterError::QueueFull(to)),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(ClusterError::Shutdown),
        }
        if peer.link.lock().is_none() {
            self.ensure_link(to);
        }
        Ok(())
    }

    /// Subscribe to one app channel (replacing an earlier subscriber of that channel).
    pub(crate) fn subscribe(&self, channel: u8) -> mpsc::Receiver<AppMessage> {
        let (tx, rx) = mpsc::channel(self.s.app_inbox);
        self.s.subs.lock().insert(channel, tx);
        rx
    }

    /// Send time of the newest ping `id` answered.
    pub(crate) fn last_ack(&self, id: NodeId) -> Option<Instant> {
        self.known_peer(id).and_then(|p| *p.last_ack.lock())
    }

    pub(crate) fn status(&self, id: NodeId) -> PeerStatus {
        match self.known_peer(id) {
            None => PeerStatus {
                up: false,
                last_rx: None,
                refused: false,
            },
            Some(p) => {
                let up = p.link.lock().is_some();
                PeerStatus {
                    up,
                    last_rx: *p.last_rx.lock(),
                    refused: !up && p.refused.load(Ordering::Relaxed),
                }
            }
        }
    }

    /// How long `id` has been unreachable, if it was reachable at some point of this process.
    pub(crate) fn down_for(&self, id: NodeId) -> Option<Duration> {
        let p = self.known_peer(id)?;
        if !p.ever_up.load(Ordering::Relaxed) || p.link.lock().is_some() {
            return None;
        }
        let since = (*p.down_since.lock())?;
        Some(Instant::now().saturating_duration_since(since))
    }

    /// Test hook: drop all traffic with these peers (links closed, handshakes refused both ways)
    /// until called again with another set.
    pub(crate) fn set_partition(&self, blocked: &[NodeId]) {
        let set: HashSet<NodeId> = blocked.iter().copied().collect();
        *self.s.blocked.lock() = set.clone();
        let peers: Vec<Arc<Peer>> = self.s.peers.lock().values().cloned().collect();
        for p in peers {
            if set.contains(&p.id) {
                if let Some(l) = &*p.link.lock() {
                    l.cancel.cancel();
                }
            } else if self.handler().is_some_and(|h| h.wants_link(p.id)) {
                self.ensure_link(p.id);
            }
        }
    }

    /// Close every link and listener and wait for the tasks.
    pub(crate) async fn shutdown(&self) {
        self.s.cancel.cancel();
        self.s.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.s.tracker.wait()).await;
    }
}

fn log_handshake_error(e: &HandshakeError, peer: &str) {
    match e {
        HandshakeError::WrongSecret => {
            warn!(
                peer,
                "cluster link refused: peer presented a wrong cluster secret"
            )
        }
        HandshakeError::SecretRejected => {
            warn!(
                peer,
                "cluster link refused: cluster secret rejected by peer"
            )
        }
        HandshakeError::Refused(RejectReason::Duplicate) | HandshakeError::SelfConnection => {
            debug!(peer, error = %e, "cluster handshake")
        }
        HandshakeError::Refused(RejectReason::Blocked) => {
            debug!(peer, "cluster link blocked by test partition")
        }
        _ => debug!(peer, error = %e, "cluster handshake failed"),
    }
}
