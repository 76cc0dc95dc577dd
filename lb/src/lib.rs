//! warren-lb: an ELB-equivalent TCP load balancer.
//!
//! Entry point for tests and `main.rs` alike: [`Lb::bind`] binds every socket of a [`Config`]
//! (failing before anything is served), [`Bound::run`] serves until a `CancellationToken` fires and
//! then drains. [`Handle`] reloads a configuration into a running instance.
//!
//! # Layout
//! - `config`: TOML schema, defaults, humane durations, validation (fault rules included).
//! - `cli`: the command line and how its flags override a `--config` file.
//! - `listener`: one listener's accept loop, the tasks it starts (health checks, `every` ticker),
//!   its changes at runtime, and each connection's life cycle.
//! - `listener::state`: `ListenerState` (settings snapshot, backend pool, connection registry,
//!   fault rules): what health checks, fault injection and the admin API read.
//! - `listener_set`: listeners added, stopped, started again and removed at run time.
//! - `dormant`: a future polled only when its own waker fired (a connection's rare orders).
//! - `proxy`: bidirectional copy with half-close, idle timeout and close styles; `spare` the
//!   copy buffers it keeps per thread between reads.
//! - `chaos::plan`: pure fault decisions (seeded RNG streams, triggers, cuts, pacing).
//! - `chaos::amqp`: the pure incremental AMQP frame scanner behind `on_amqp`.
//! - `chaos::inject`: the I/O side of faults (`every` ticker, close styles, fault events).
//! - `splice`: zero-copy splice(2) forwarding for bulk plain-TCP directions.
//! - `stream`: plain/TLS stream enums with access to the TCP socket (for RST closes).
//! - `backend::pool`: backend membership, draining, fail open.
//! - `backend::select`: the selection trait, round robin / least-conn / random.
//! - `backend::health`: tcp / http / amqp checks and ELB thresholds.
//! - `backend::addr`: what a backend address may be: syntax, resolution, never warren-lb itself.
//! - `proxy_protocol`: PROXY v1/v2 header encoders (pure).
//! - `tls`: rustls acceptor (termination) and connector (to backends).
//! - `admin`: the HTTP/1.1 JSON admin API, `/metrics`, `/events`; its limits (timeouts,
//!   connection cap, body size).
//! - `admin::guard`: the checks before any admin route (browser origin, token, body type).
//! - `admin::toxiproxy`: Toxiproxy's JSON (proxies, toxics, errors) mapped to listeners and
//!   fault rules (pure); `admin::toxiproxy_api` serves it on the admin port.
//! - `events`: the event ring buffer and broadcast.
//! - `workers`: connection threads and where a new connection goes.
//! - `metrics`: metric names and the Prometheus recorder.
//! - `shutdown`: graceful drain and signal handling.
//!
//! No module imports one that imports it back: `listener` imports `backend::health` and
//! `chaos::inject`, which read `listener::state`; `config` validates fault rules itself and
//! `chaos::plan` reads its types; `backend::addr` reports its own `BadBackend`, which `config`
//! turns into a `ValidationError`. (`admin`, `listener_set` and `shutdown` use `Shared` from this
//! root.)

pub mod admin;
pub mod backend;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod dormant;
pub mod events;
pub mod listener;
pub mod listener_set;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod shutdown;
pub mod spare;
pub mod splice;
pub mod stream;
pub mod tls;
pub mod workers;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwapOption;
use backend::addr::{self, OwnAddr, Resolved};
pub use config::Config;
use config::{AdminConfig, ValidationError};
use events::{Event, EventBus};
use listener::{ListenerState, Rt, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ValidationError),
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener `{name}`: {source}")]
    Tls { name: String, source: tls::TlsError },
}

impl LbError {
    /// True for errors of the configuration (exit code 2 in `main`), false for bind/TLS errors.
    pub fn is_config(&self) -> bool {
        matches!(self, LbError::Config(_))
    }
}

/// State shared by the listeners, the admin API and reload.
pub struct Shared {
    pub(crate) rt: Rt,
    pub(crate) listeners: Mutex<Vec<Arc<ListenerState>>>,
    pub(crate) prom: Option<PrometheusHandle>,
    pub(crate) admin_addr: Option<SocketAddr>,
    /// `[admin]` as bound (changes need a restart, except the token).
    pub(crate) admin_cfg: Option<AdminConfig>,
    /// The admin API's token; `None` = no authentication (loopback only). Replaced on reload.
    pub(crate) admin_token: ArcSwapOption<String>,
    /// Listeners stopped at run time, `bind` = the address they had (see `listener_set`).
    pub(crate) stopped: Mutex<Vec<config::ListenerConfig>>,
    /// Held by every change of the listener set (reload, `listener_set`).
    pub(crate) changes: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn listeners(&self) -> Vec<Arc<ListenerState>> {
        self.listeners.lock().clone()
    }

    pub fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.listeners
            .lock()
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    pub fn events(&self) -> &EventBus {
        &self.rt.events
    }

    /// Every bound listener address and the admin address: what no backend may point at.
    pub fn own_addrs(&self) -> Vec<OwnAddr> {
        let mut own: Vec<OwnAddr> = self
            .listeners()
            .iter()
            .map(|l| OwnAddr::listener(&l.name, l.addr))
            .collect();
        own.extend(self.admin_addr.map(OwnAddr::admin));
        own
    }

    /// Resolves `backends` of `listener` and refuses any that reaches warren-lb itself (the
    /// admin API's `PUT /listeners/{name}/backends`).
    pub async fn check_backends(
        &self,
        listener: &str,
        backends: &[String],
    ) -> Result<(), ValidationError> {
        let resolved = addr::resolve_all(listener, backends).await?;
        Ok(addr::check_resolved(&resolved, &self.own_addrs())?)
    }
}

/// Resolves every backend of `config` (names within `backend::addr::RESOLVE_TIMEOUT`).
pub async fn resolve_backends(config: &Config) -> Result<Vec<Resolved>, ValidationError> {
    let mut all = Vec::new();
    for l in &config.listeners {
        all.extend(addr::resolve_all(&l.name, &l.backends).await?);
    }
    Ok(all)
}

/// What `--check-config` adds to [`Config::check`]: every backend resolves, and none reaches a
/// configured listener or admin address.
pub async fn check_backends(config: &Config) -> Result<(), ValidationError> {
    let resolved = resolve_backends(config).await?;
    Ok(addr::check_resolved(&resolved, &config.own_addrs())?)
}

/// Namespace of the entry point.
pub struct Lb;

impl Lb {
    /// Validates `config` (backends resolved), reads the admin token, loads TLS material and
    /// binds every listener and the admin API. A backend that reaches one of the bound
    /// addresses is refused (sockets closed again). Nothing is served until [`Bound::run`].
    pub async fn bind(config: Config) -> Result<Bound, LbError> {
        config.validate()?;
        let token = match &config.admin {
            Some(a) => a.read_token()?,
            None => None,
        };
        let resolved = resolve_backends(&config).await?;
        let prom = metrics::install();
        let rt = Rt {
            events: Arc::new(EventBus::new()),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            hard: CancellationToken::new(),
            next_conn: Arc::new(AtomicU64::new(0)),
            splice: config.runtime.splice.unwrap_or(true),
            seed: config.chaos.seed.unwrap_or_else(rand::random),
            workers: start_workers(config.runtime.threads),
        };
        tracing::info!(seed = rt.seed, "chaos seed (replay with --seed)");
        let mut snaps = Vec::new();
        for l in &config.listeners {
            let snap = Snapshot::build(l.clone()).map_err(|source| LbError::Tls {
                name: l.name.clone(),
                source,
            })?;
            snaps.push(snap);
        }
        // Bind everything, check the backends against the bound addresses, then log and build:
        // a refused configuration logs no `listening` line.
        let mut bound = Vec::new();
        for snap in snaps {
            let (tcp, addr) = bind_tcp(&snap.cfg.name, snap.cfg.bind)?;
            bound.push((snap, tcp, addr));
        }
        let admin = match &config.admin {
            Some(a) => Some(bind_tcp("admin", a.listen)?),
            None => None,
        };
        let mut own: Vec<OwnAddr> = bound
            .iter()
            .map(|(snap, _, addr)| OwnAddr::listener(&snap.cfg.name, *addr))
            .collect();
        own.extend(admin.as_ref().map(|(_, a)| OwnAddr::admin(*a)));
        addr::check_resolved(&resolved, &own).map_err(ValidationError::from)?;
        let mut pending = Vec::new();
        for (snap, tcp, addr) in bound {
            tracing::info!(listener = %snap.cfg.name, addr = %addr, "listening");
            pending.push((ListenerState::new(snap, addr, rt.clone()), tcp));
        }
        if let Some((_, addr)) = &admin {
            tracing::info!(listener = %"admin", addr = %addr, "listening");
            if !addr.ip().to_canonical().is_loopback() {
                tracing::warn!(
                    addr = %addr,
                    "THE ADMIN API LISTENS ON A NON-LOOPBACK ADDRESS: it can reconfigure every \
                     listener and is protected by its token only; keep it off the internet \
                     (firewall, private network) or listen on 127.0.0.1"
                );
            }
        }
        let shared = Arc::new(Shared {
            rt,
            listeners: Mutex::new(pending.iter().map(|(l, _)| l.clone()).collect()),
            prom,
            admin_addr: admin.as_ref().map(|(_, a)| *a),
            admin_cfg: config.admin.clone(),
            admin_token: ArcSwapOption::from_pointee(token),
            stopped: Mutex::new(Vec::new()),
            changes: tokio::sync::Mutex::new(()),
        });
        Ok(Bound {
            shared,
            pending,
            admin: admin.map(|(t, _)| t),
        })
    }
}

/// Connection threads for `[runtime] threads` (the accepting runtime counts as one; unset: no
/// threads of its own, see `workers`).
fn start_workers(threads: Option<usize>) -> Option<Arc<workers::Workers>> {
    let n = threads?;
    match workers::Workers::start(n) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, threads = n, "cannot start connection threads; every connection runs on the accepting thread");
            None
        }
    }
}

/// The binary's default for `[runtime] threads`: one connection thread per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn bind_tcp(name: &str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), LbError> {
    let err = |source| LbError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.set_nodelay(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    let l = sock.listen(4096).map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

/// Sockets bound, not yet served.
pub struct Bound {
    shared: Arc<Shared>,
    pending: Vec<(Arc<ListenerState>, TcpListener)>,
    admin: Option<TcpListener>,
}

impl Bound {
    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.listener(name).map(|l| l.addr)
    }

    /// Every listener's name and bound address.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.shared
            .listeners()
            .iter()
            .map(|l| (l.name.clone(), l.addr))
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.admin_addr
    }

    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` fires, then stops accepting, drains live connections up to the
    /// longest `drain_timeout`, closes what is left and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let Bound {
            shared,
            pending,
            admin,
        } = self;
        for (ls, tcp) in pending {
            ls.start(tcp);
        }
        let admin_task = admin.map(|a| tokio::spawn(admin::serve(a, shared.clone())));
        if let Some(h) = shared.prom.clone() {
            let stop = shared.rt.stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => h.run_upkeep(),
                    }
                }
            });
        }
        shutdown.cancelled().await;
        shutdown::drain(&shared).await;
        if let Some(t) = admin_task {
            t.abort();
        }
    }
}

/// Control of a running instance (reload, addresses).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// The admin token a reload installs: `Some(new)` (maybe `Some(None)`: no token), or `None`
    /// to keep the current one (the new configuration has no `[admin]`; the running admin API
    /// stays until a restart). A running admin API off loopback never loses its token.
    fn reload_token(&self, config: &Config) -> Result<Option<Option<String>>, LbError> {
        let Some(a) = &config.admin else {
            return Ok(None);
        };
        let token = a.read_token()?;
        if let Some(listen) = self.shared.admin_addr {
            if token.is_none() && !listen.ip().to_canonical().is_loopback() {
                return Err(ValidationError::AdminNeedsToken { listen }.into());
            }
        }
        Ok(Some(token))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared.listener(name).map(|l| l.addr)
    }

    /// Applies a new configuration without dropping established connections: listeners are added
    /// and removed (a removed one stops accepting, its connections drain), settings replaced,
    /// backends replaced (removed ones drain). A listener whose `bind` changed is rebound.
    /// Listeners added at run time and not in the file are removed; stopped ones are forgotten.
    /// Backends are resolved and refused if they reach warren-lb itself (the listeners of the new
    /// configuration, the admin API). The admin address and settings cannot change without a
    /// restart; its token can (re-read from `token_file`). On error nothing is applied.
    pub async fn reload(&self, config: Config) -> Result<(), LbError> {
        let _changes = self.shared.changes.lock().await;
        config.validate()?;
        let token = self.reload_token(&config)?;
        let resolved = resolve_backends(&config).await?;
        let mut snaps = Vec::new();
        for l in &config.listeners {
            let snap = Snapshot::build(l.clone()).map_err(|source| LbError::Tls {
                name: l.name.clone(),
                source,
            })?;
            snaps.push(snap);
        }
        let current = self.shared.listeners();
        // Bind new sockets first, so a failed bind leaves the old configuration in place.
        let mut plan = Vec::new();
        for snap in snaps {
            let same = current
                .iter()
                .find(|l| l.name == snap.cfg.name && l.snapshot().cfg.bind == snap.cfg.bind)
                .cloned();
            match same {
                Some(ls) => plan.push((snap, Some(ls), None)),
                None => {
                    let (tcp, addr) = bind_tcp(&snap.cfg.name, snap.cfg.bind)?;
                    plan.push((snap, None, Some((tcp, addr))));
                }
            }
        }
        let mut own: Vec<OwnAddr> = plan
            .iter()
            .map(|(snap, existing, bound)| {
                let addr = match (existing, bound) {
                    (Some(ls), _) => ls.addr,
                    (None, Some((_, a))) => *a,
                    (None, None) => snap.cfg.bind,
                };
                OwnAddr::listener(&snap.cfg.name, addr)
            })
            .collect();
        own.extend(self.shared.admin_addr.map(OwnAddr::admin));
        addr::check_resolved(&resolved, &own).map_err(ValidationError::from)?;
        let mut next = Vec::new();
        for (snap, existing, bound) in plan {
            match (existing, bound) {
                (Some(ls), _) => {
                    ls.update(snap);
                    next.push(ls);
                }
                (None, Some((tcp, addr))) => {
                    let name = snap.cfg.name.clone();
                    tracing::info!(listener = %name, addr = %addr, "listening");
                    let ls = ListenerState::new(snap, addr, self.shared.rt.clone());
                    ls.start(tcp);
                    self.shared
                        .events()
                        .emit(Event::new(&name, "listener_added"));
                    next.push(ls);
                }
                (None, None) => {}
            }
        }
        for old in &current {
            if !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                old.retire();
            }
        }
        *self.shared.listeners.lock() = next;
        self.shared.stopped.lock().clear();
        if config.admin.as_ref().map(|a| a.listen) != self.shared.admin_addr
            && config.admin.as_ref().is_some_and(|a| a.listen.port() != 0)
        {
            tracing::warn!("the admin address changes only on restart");
        }
        if let Some(token) = token {
            if token.as_deref()
                != self
                    .shared
                    .admin_token
                    .load()
                    .as_deref()
                    .map(String::as_str)
            {
                tracing::info!(
                    enabled = token.is_some(),
                    "admin token changed by the reload"
                );
            }
            self.shared.admin_token.store(token.map(Arc::new));
        }
        tracing::info!(listeners = config.listeners.len(), "configuration reloaded");
        Ok(())
    }
}
