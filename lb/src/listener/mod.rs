//! One listener: its accept loop, the tasks it starts (health checks, the `every` ticker), its
//! changes at runtime (reload, admin API), and the life of each connection (TLS accept, backend
//! selection and connect, PROXY header, copy, close). Its state, which health checks and fault
//! injection read, is [`state::ListenerState`].
//!
//! The listener's settings live in an `ArcSwap<Snapshot>`: a new connection takes the current
//! snapshot once; reload and the admin API replace it whole. Live connections are registered with
//! a control channel so that the admin API and fault rules can act on them at runtime
//! ([`ListenerState::reset_all`]). The registry lock is taken at open and close only, never per read.
//!
//! Fault rules: each connection owns a `chaos::plan::ConnPlan` (inside its `Duplex`), built from
//! the rules at open with the connection's sequence number in the listener, and updated through a
//! `watch` of the rules whenever they change. The connection task's select loop fires the plan's
//! time triggers; the copy loop handles its byte triggers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{health, Backend};
use crate::chaos::{self, plan, plan::ConnPlan};
use crate::config::{
    validate_backends, CloseStyle, FaultKind, FaultRule, InFlight, ListenerConfig, ProxyProtocol,
    ValidationError,
};
use crate::dormant::Dormant;
use crate::events::Event;
use crate::metrics as m;
use crate::proxy::{Duplex, Ended};
use crate::proxy_protocol;
use crate::stream::{BackendStream, ClientStream};
use crate::tls::TlsError;
use crate::workers::Place;

pub mod state;

pub use crate::chaos::plan::CloseCmd;
pub use state::{ConnInfo, ListenerState, Rt, Snapshot};

// === impl ListenerState ===

/// Starting the listener's tasks, changing it, and the life of each connection; the state and
/// its read side are in [`state`].
impl ListenerState {
    fn publish_rules(&self) {
        self.rules
            .send_replace(Arc::new(self.snapshot().cfg.faults.clone()));
        self.rules_changed.notify_one();
    }

    /// Starts accepting on `listener`, health checks of the current members, and rule timers.
    pub fn start(self: &Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        self.rt
            .tracker
            .spawn(async move { me.accept_loop(listener).await });
        for b in self.pool.members().iter() {
            self.spawn_health(b.clone());
        }
        let me = self.clone();
        self.rt.tracker.spawn(chaos::inject::every_ticker(me));
    }

    fn spawn_health(self: &Arc<Self>, b: Arc<Backend>) {
        let me = self.clone();
        self.rt.tracker.spawn(health::run(me, b));
    }

    /// Applies a new configuration of the same listener (reload): settings, backends, rules.
    pub fn update(self: &Arc<Self>, mut snap: Snapshot) {
        let old = self.snapshot();
        if old.cfg.balance == snap.cfg.balance {
            // Keep the selector's position (round robin continues where it was).
            snap.selector = old.selector.clone();
        }
        let backends = snap.cfg.backends.clone();
        self.snap.store(Arc::new(snap));
        self.apply_backends(&backends, "reload");
        self.publish_rules();
    }

    /// Replaces the backend list (admin API); removed backends drain.
    pub fn set_backends(self: &Arc<Self>, backends: Vec<String>) -> Result<(), ValidationError> {
        if backends.is_empty() {
            return Err(ValidationError::NoBackends(self.name.clone()));
        }
        validate_backends(&self.name, &backends)?;
        self.snap.rcu(|s| Snapshot {
            cfg: ListenerConfig {
                backends: backends.clone(),
                ..s.cfg.clone()
            },
            selector: s.selector.clone(),
            acceptor: s.acceptor.clone(),
            backend_tls: s.backend_tls.clone(),
        });
        self.apply_backends(&backends, "admin");
        Ok(())
    }

    fn apply_backends(self: &Arc<Self>, backends: &[String], cause: &str) {
        let change = self.pool.replace(backends);
        for b in change.added {
            self.events().emit(
                Event::new(&self.name, "backend_registered")
                    .backend(&b.addr)
                    .cause(cause),
            );
            self.spawn_health(b);
        }
        for b in change.removed {
            self.spawn_drain(b, cause);
        }
    }

    /// Replaces the fault rules (admin API); timers pick the change up at once.
    pub fn set_faults(&self, faults: Vec<FaultRule>) -> Result<(), ValidationError> {
        let cfg = ListenerConfig {
            faults,
            ..self.snapshot().cfg.clone()
        };
        cfg.validate()?;
        self.snap.rcu(|s| Snapshot {
            cfg: ListenerConfig {
                faults: cfg.faults.clone(),
                ..s.cfg.clone()
            },
            selector: s.selector.clone(),
            acceptor: s.acceptor.clone(),
            backend_tls: s.backend_tls.clone(),
        });
        self.publish_rules();
        Ok(())
    }

    /// Deregisters one backend with draining; false if it is not in rotation.
    pub fn drain_backend(self: &Arc<Self>, addr: &str) -> bool {
        let Some(b) = self.pool.remove(addr) else {
            return false;
        };
        self.snap.rcu(|s| Snapshot {
            cfg: ListenerConfig {
                backends: s
                    .cfg
                    .backends
                    .iter()
                    .filter(|a| *a != addr)
                    .cloned()
                    .collect(),
                ..s.cfg.clone()
            },
            selector: s.selector.clone(),
            acceptor: s.acceptor.clone(),
            backend_tls: s.backend_tls.clone(),
        });
        self.spawn_drain(b, "admin");
        true
    }

    fn spawn_drain(self: &Arc<Self>, b: Arc<Backend>, cause: &str) {
        b.health_stop.cancel();
        let me = self.clone();
        let drain = self.snapshot().cfg.drain_timeout;
        self.events().emit(
            Event::new(&self.name, "backend_draining")
                .backend(&b.addr)
                .cause(cause),
        );
        self.rt.tracker.spawn(async move {
            let deadline = Instant::now() + drain;
            let mut expired = false;
            loop {
                let idle = b.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if b.active() == 0 {
                    break;
                }
                tokio::select! {
                    _ = &mut idle => {}
                    _ = tokio::time::sleep_until(deadline), if !expired => {
                        expired = true;
                        b.drain_expired.cancel();
                    }
                }
            }
            me.pool.forget(&b);
            b.metrics.up.set(0.0);
            let cause = if expired { "drain_timeout" } else { "drained" };
            me.events().emit(
                Event::new(&me.name, "backend_removed")
                    .backend(&b.addr)
                    .cause(cause),
            );
        });
    }

    /// Stops accepting and drains every backend (the listener was removed by a reload).
    pub fn retire(self: &Arc<Self>) {
        self.stop_accept.cancel();
        self.rules_changed.notify_one();
        self.apply_backends(&[], "listener removed");
        self.events()
            .emit(Event::new(&self.name, "listener_removed"));
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = self.stop_accept.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let snap = self.snapshot();
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(r) = plan::refusal(self.rt.seed, &self.name, seq, &snap.cfg.faults) {
                // Backend "down": the client sees its connect reset.
                self.refused.increment(1);
                chaos::inject::count_fault(&self.name, &r.name, FaultKind::Refuse);
                let mut ev = Event::new(&self.name, "refused").cause("refuse");
                ev.rule = Some(r.name.clone());
                self.events().emit(ev);
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                drop(tcp);
                continue;
            }
            let max = snap.cfg.max_connections;
            if self.active.load(Ordering::Relaxed) >= max {
                self.refused.increment(1);
                tracing::debug!(listener = %self.name, %peer, max, "refused: max_connections reached");
                drop(tcp);
                continue;
            }
            self.active.fetch_add(1, Ordering::Relaxed);
            let id = self.rt.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
            let span = tracing::debug_span!("conn", listener = %self.name, conn_id = id, peer = %peer, backend = tracing::field::Empty);
            let me = self.clone();
            let hard = self.rt.hard.clone();
            let conn = move |tcp: std::io::Result<TcpStream>| {
                async move {
                    let _active = ActiveGuard(&me.active);
                    let tcp = match tcp {
                        Ok(tcp) => tcp,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot move the accepted socket to its thread");
                            return;
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = me.serve(tcp, peer, id, seq) => {}
                        // End of drain: dropping closes both sockets. Dormant: the shared token
                        // is not polled on each wake-up of the copy.
                        _ = Dormant::new(hard.cancelled()) => tracing::debug!("closed at end of shutdown drain"),
                    }
                }
                .instrument(span)
            };
            match self.rt.workers.as_ref().map(|w| (w, w.place())) {
                Some((w, Place::Thread(i))) => {
                    // Registered with that thread's runtime, on the thread that serves it.
                    let std = tcp.into_std();
                    self.rt.tracker.spawn_on(
                        async move { conn(std.and_then(TcpStream::from_std)).await },
                        w.handle(i),
                    );
                }
                _ => {
                    self.rt.tracker.spawn(conn(Ok(tcp)));
                }
            }
        }
        tracing::debug!(listener = %self.name, "stopped accepting");
    }

    async fn serve(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr, id: u64, seq: u64) {
        let snap = self.snapshot();
        let _ = tcp.set_nodelay(true);
        // Only the PROXY header needs the address the client reached (saves a syscall otherwise).
        let local = match snap.cfg.proxy_protocol {
            ProxyProtocol::Off => self.addr,
            _ => tcp.local_addr().unwrap_or(self.addr),
        };
        let mut client = match &snap.acceptor {
            Some(acc) => match tokio::time::timeout(snap.cfg.idle_timeout, acc.accept(tcp)).await {
                Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake with client failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake with client timed out");
                    return;
                }
            },
            None => ClientStream::Plain(tcp),
        };
        let Some((backend, mut upstream)) = self.connect(&snap, peer, local).await else {
            tracing::debug!("no backend reachable; closing client");
            return;
        };
        tracing::Span::current().record("backend", backend.addr.as_str());
        let (info, mut ctl_rx) = ConnInfo::new(id, peer, backend.addr.clone());
        let info = Arc::new(info);
        backend.conn_opened();
        self.conns.lock().insert(id, info.clone());
        let _reg = Registered {
            ls: self,
            id,
            backend: &backend,
        };

        let mut rules_rx = self.rules.subscribe();
        let (plan, applied) = ConnPlan::new(
            self.rt.seed,
            &self.name,
            seq,
            &rules_rx.borrow_and_update(),
            info.started,
        );
        chaos::inject::announce(self, id, &backend.addr, applied);
        let mut duplex = Duplex::new(
            &mut client,
            &mut upstream,
            snap.cfg.idle_timeout,
            &info.bytes,
            &self.bytes,
            // Byte-level fault rules keep their directions on the buffered path (see proxy.rs).
            self.rt.splice,
            plan,
        );
        let cmd = loop {
            let due = duplex.chaos().next_deadline();
            // The orders a connection may get, polled only when one of them woke the task
            // (see `dormant`): a wake-up for data polls the copy alone.
            let control = Dormant::new(async {
                tokio::select! {
                    cmd = next_cmd(&mut ctl_rx) => Control::Order(cmd),
                    r = rules_rx.changed() => Control::Rules(r.is_ok()),
                    _ = chaos::inject::sleep_until_opt(due) => Control::Timer,
                    _ = backend.drain_expired.cancelled() => Control::DrainExpired,
                }
            });
            let control = tokio::select! {
                biased;
                ended = &mut duplex => match ended {
                    Ended::Done => {
                        tracing::debug!("closed by peers");
                        return;
                    }
                    Ended::Idle => break CloseCmd::plain(self.snapshot().cfg.idle_close, "idle_timeout", "idle_timeout"),
                    Ended::Error(e) => {
                        tracing::debug!(error = %e, source = e.source.as_str(), "connection error");
                        metrics::counter!(m::CONNECTION_ERRORS_TOTAL, m::L_LISTENER => self.name.clone(), m::L_SOURCE => e.source.as_str()).increment(1);
                        // Pass the failure on: the other side sees a reset, as it would without us.
                        break CloseCmd::plain(CloseStyle::Rst, "error", e.to_string());
                    }
                    Ended::Fault(cmd) => break cmd,
                },
                c = control => c,
            };
            match control {
                Control::Order(cmd) => {
                    if rules_rx.has_changed().unwrap_or(false) {
                        let applied = duplex
                            .chaos_mut()
                            .update(&rules_rx.borrow_and_update(), Instant::now());
                        chaos::inject::announce(self, id, &backend.addr, applied);
                    }
                    // A listener-wide rule tick applies only where the rule applies (toxicity).
                    match &cmd.rule {
                        Some(rule) if !duplex.chaos().accepts(rule) => continue,
                        _ => break cmd,
                    }
                }
                Control::Rules(false) => {
                    // The listener is gone; its connections live on without rule changes.
                    rules_rx = watch::channel(Arc::new(Vec::new())).1;
                }
                Control::Rules(true) => {
                    let applied = duplex
                        .chaos_mut()
                        .update(&rules_rx.borrow_and_update(), Instant::now());
                    chaos::inject::announce(self, id, &backend.addr, applied);
                }
                Control::Timer => {
                    if let Some(cmd) = duplex.chaos_mut().on_timer(Instant::now()) {
                        break cmd;
                    }
                }
                Control::DrainExpired => {
                    break CloseCmd::plain(CloseStyle::Fin, "drain_timeout", "drain_timeout")
                }
            }
        };
        if cmd.in_flight == InFlight::Flush && cmd.kind.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(1), duplex.flush_in_flight()).await;
        }
        let lost = duplex.in_flight();
        drop(duplex);
        tracing::debug!(cause = %cmd.cause, style = cmd.style.as_str(), "closing");
        if cmd.kind.is_some() || cmd.event == "reset" || cmd.event == "idle_timeout" {
            // Emitted when the close starts (a `drop` close may last as long as the peers stay).
            chaos::inject::close_event(self, id, &backend.addr, &cmd, lost);
        }
        let drain_expired = backend.drain_expired.clone();
        let stop = async move {
            tokio::select! {
                _ = drain_expired.cancelled() => None,
                cmd = next_cmd(&mut ctl_rx) => {
                    // A second order while held ends the hold, in its style.
                    tracing::debug!(cause = %cmd.cause, "held connection closed by order");
                    Some(cmd.style)
                }
            }
        };
        chaos::inject::close(client, upstream, &cmd, stop).await;
    }

    /// Picks a backend and connects, trying the next ones in order on failure.
    async fn connect(
        &self,
        snap: &Snapshot,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<(Arc<Backend>, BackendStream)> {
        let candidates = self.pool.candidates();
        if candidates.is_empty() {
            return None;
        }
        let n = candidates.len();
        let first = snap.selector.select(&candidates);
        for k in 0..n {
            let b = &candidates[(first + k) % n];
            let t0 = Instant::now();
            match tokio::time::timeout(snap.cfg.connect_timeout, connect_one(b, snap, peer, local))
                .await
            {
                Ok(Ok(s)) => {
                    b.metrics
                        .connect_duration
                        .record(t0.elapsed().as_secs_f64());
                    return Some((b.clone(), s));
                }
                Ok(Err(e)) => {
                    b.metrics.connect_errors.increment(1);
                    tracing::debug!(backend = %b.addr, error = %e, "connect failed; trying the next backend");
                }
                Err(_) => {
                    b.metrics.connect_errors.increment(1);
                    tracing::debug!(backend = %b.addr, "connect timed out; trying the next backend");
                }
            }
        }
        None
    }
}

/// What woke a connection task besides its copy.
enum Control {
    /// An order from the admin API or a listener-wide rule.
    Order(CloseCmd),
    /// The fault rules changed (`false`: the listener is gone).
    Rules(bool),
    /// A time trigger of the connection's fault plan is due.
    Timer,
    /// The connection's backend was deregistered and its drain timed out.
    DrainExpired,
}

/// The next order sent to this connection (each order is returned once).
async fn next_cmd(rx: &mut watch::Receiver<Option<CloseCmd>>) -> CloseCmd {
    loop {
        // `changed` marks the value seen: read it right after.
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(cmd) = rx.borrow_and_update().clone() {
            return cmd;
        }
    }
}

async fn connect_one(
    b: &Backend,
    snap: &Snapshot,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<BackendStream, ConnectError> {
    let mut tcp = b.connect_tcp().await?;
    let header = match snap.cfg.proxy_protocol {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(proxy_protocol::encode_v1(peer, local)),
        ProxyProtocol::V2 => Some(proxy_protocol::encode_v2(peer, local)),
    };
    if let Some(h) = header {
        tcp.write_all(&h).await?;
    }
    match &snap.backend_tls {
        None => Ok(BackendStream::Plain(tcp)),
        Some(t) => {
            let name = t.name_for(&b.addr)?;
            let s = t.connector.connect(name, tcp).await?;
            Ok(BackendStream::Tls(Box::new(s)))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// Keeps the listener's live count right however the connection task ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Unregisters a connection however its task ends.
struct Registered<'a> {
    ls: &'a ListenerState,
    id: u64,
    backend: &'a Backend,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.ls.conns.lock().remove(&self.id);
        self.backend.conn_closed();
    }
}
