//! warren-broker: a lightweight AMQP 0-9-1 broker, wire compatible with RabbitMQ clients.
//!
//! # Layout
//! - [`config`]: CLI/TOML configuration (same key names as the flags).
//! - [`error`]: soft ([`error::ChannelError`]) vs hard ([`error::ConnectionError`]) AMQP errors.
//! - [`codec`]: pure frame decode/encode on byte slices (amq-protocol underneath).
//! - [`inbound`]: the read path's decoder: publishes and content headers decoded by hand,
//!   properties kept encoded.
//! - [`connection`]: `state.rs` is the sans-io connection state machine, `mod.rs` the async shell
//!   that owns the socket, `session.rs` the per-connection broker context, `registry.rs` the
//!   live connections the management API lists.
//! - [`channel`]: per-channel bookkeeping (delivery tags, unacked, confirms, tx).
//! - [`class`]: one handler file per AMQP class, dispatched from a single `match`.
//! - [`exchange`]: pure routing (direct, fanout, topic, headers).
//! - [`queue`]: one queue: its typed API (`handle.rs`), sans-io core (`core.rs`: messages,
//!   consumers, acks, TTL, overflow), dead-lettering, confirms (`confirm.rs`), flow control of
//!   publishers (`flow.rs`) and the actor shell (`actor.rs`).
//! - [`vhost`]: registry of exchanges and queues, the routing snapshot.
//! - [`auth`]: users, vhosts, permissions, RabbitMQ password hashes, the failed-login limit.
//! - [`definitions`]: the mutable definitions API (vhosts, users, permissions, policies),
//!   RabbitMQ definitions JSON import/export, persistence in `<data-dir>/definitions.json`.
//! - [`policy`]: policies and operator policies: validation, storage, which apply to what.
//! - [`store`]: the durability hook every queue state change goes through.
//! - [`tls`]: AMQPS listener configuration.
//! - [`proxy_protocol`]: pure PROXY protocol v1/v2 header parser and the trust list
//!   (`proxy-protocol-from`).
//! - [`proxied`]: the accept step of the AMQP, AMQPS and management listeners that applies
//!   `proxy-protocol` (trust check, bounded header read, the client address as the peer).
//! - [`shutdown`]: signal handling.
//! - [`node`]: the node context, one per broker: message memory, alarms, paging and node
//!   totals (nothing process-wide, so several brokers can share a process).
//! - [`memory`]: a node's accounting of message memory and its limits (alarms, paging).
//! - [`alarm`]: memory and disk alarms that block publishing connections.
//! - [`paging`]: a node's page directory and memory-pressure signal (queues page messages out).
//! - [`intmap`]: cheap hash map for integer keys on the per-message path.
//! - [`nesting`]: the bound on nested field tables and JSON, checked before anything recurses.
//! - [`mgmt`]: the management HTTP API (RabbitMQ compatible), web UI and Prometheus metrics.
//! - [`stats`]: message counters and sampled rates (node totals, per queue, per connection).
//!
//! Entry point for binaries and tests: [`Broker::bind`] then [`Bound::run`].

pub mod alarm;
pub mod auth;
pub mod channel;
pub mod class;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod definitions;
pub mod error;
pub mod exchange;
pub mod inbound;
pub mod intmap;
pub mod memory;
pub mod mgmt;
pub mod nesting;
pub mod node;
pub mod paging;
pub mod policy;
pub mod proxied;
pub mod proxy_protocol;
pub mod queue;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod tls;
pub mod topology;
pub mod vhost;

use crate::auth::AuthDb;
use crate::config::Config;
use crate::vhost::Vhost;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// Errors while starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("message store in {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("definitions: {0}")]
    Definitions(String),
    #[error("{0}")]
    Cluster(String),
}

/// State shared by every connection.
#[derive(Debug)]
pub struct BrokerShared {
    pub config: Config,
    pub auth: Arc<AuthDb>,
    /// Vhost registry; read with [`BrokerShared::vhost`] / [`BrokerShared::vhost_list`],
    /// changed through the [`definitions`] API.
    vhosts: parking_lot::RwLock<HashMap<String, Arc<Vhost>>>,
    pub policies: Arc<policy::PolicyStore>,
    /// This broker's node context: memory, alarms, paging, node totals.
    pub node: Arc<node::Node>,
    persister: definitions::persist::Persister,
    me: Weak<BrokerShared>,
    pub next_conn_id: AtomicU64,
    pub connections: AtomicUsize,
    /// Live connections and the stop_app / start_app switch.
    pub registry: connection::registry::Registry,
    /// Message rates for the management API.
    pub sampler: Arc<stats::Sampler>,
    /// When the broker started.
    pub started_at: tokio::time::Instant,
    /// Bound listeners: (protocol, address), for /api/overview.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// The message store of durable queues (under `data_dir`).
    pub store: Arc<store::Store>,
    /// Bytes of management request bodies that may be buffered at once, node-wide (4 times
    /// `mgmt-max-body-size`); see [`mgmt`].
    pub(crate) mgmt_body_budget: Arc<tokio::sync::Semaphore>,
    /// The cluster this node belongs to (set once at start when `cluster-listen` is set).
    cluster: std::sync::OnceLock<Arc<cluster::link::ClusterLink>>,
}

impl BrokerShared {
    /// The cluster, when this node is clustered.
    pub fn cluster(&self) -> Option<&Arc<cluster::link::ClusterLink>> {
        self.cluster.get()
    }
}

/// The broker before binding.
pub struct Broker;

/// A broker with its sockets bound, not yet serving.
pub struct Bound {
    pub amqp_addrs: Vec<SocketAddr>,
    pub amqps_addrs: Vec<SocketAddr>,
    pub mgmt_addrs: Vec<SocketAddr>,
    pub prometheus_addrs: Vec<SocketAddr>,
    pub shared: Arc<BrokerShared>,
    mgmt: Vec<TcpListener>,
    prometheus: Vec<TcpListener>,
    amqp: Vec<TcpListener>,
    amqps: Vec<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    monitor: alarm::Monitor,
}

impl Broker {
    /// Validates the config and binds every listener (port 0 allowed); logs the bound
    /// addresses (`listening proto=amqp addr=...`).
    pub async fn bind(cfg: Config) -> Result<Bound, StartError> {
        cfg.validate()?;
        let (node, monitor) = node::Node::configure(&cfg);
        let tls = if cfg.amqps.is_empty() {
            None
        } else {
            Some(tls::acceptor(&cfg).map_err(StartError::Tls)?)
        };
        let mut amqp = Vec::new();
        let mut amqp_addrs = Vec::new();
        let default_listeners = cfg.amqp == Config::default().amqp;
        // A witness votes in the cluster and serves no clients.
        let amqp_cfg = if cfg.witness { &[][..] } else { &cfg.amqp[..] };
        for a in amqp_cfg {
            let l = match connection::listener(*a) {
                Ok(l) => l,
                // A host without IPv6 loopback must still start with the default listeners.
                Err(e)
                    if default_listeners
                        && a.is_ipv6()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
                        ) =>
                {
                    warn!(addr = %a, error = %e, "default IPv6 listener unavailable; skipped");
                    continue;
                }
                Err(source) => return Err(StartError::Bind { addr: *a, source }),
            };
            let addr = l
                .local_addr()
                .map_err(|source| StartError::Bind { addr: *a, source })?;
            info!(proto = %"amqp", addr = %addr, "listening");
            amqp_addrs.push(addr);
            amqp.push(l);
        }
        let mut amqps = Vec::new();
        let mut amqps_addrs = Vec::new();
        let amqps_cfg = if cfg.witness { &[][..] } else { &cfg.amqps[..] };
        for a in amqps_cfg {
            let l =
                connection::listener(*a).map_err(|source| StartError::Bind { addr: *a, source })?;
            let addr = l
                .local_addr()
                .map_err(|source| StartError::Bind { addr: *a, source })?;
            info!(proto = %"amqps", addr = %addr, "listening");
            amqps_addrs.push(addr);
            amqps.push(l);
        }
        let (mgmt, mgmt_addrs) = bind_all(&cfg.mgmt, "mgmt").await?;
        let (prometheus, prometheus_addrs) = bind_all(&cfg.prometheus, "prometheus").await?;
        let store =
            store::Store::open(&cfg.data_dir, node.memory).map_err(|source| StartError::Store {
                dir: cfg.data_dir.clone(),
                source,
            })?;
        let persister = definitions::persist::Persister::new(Some(&cfg.data_dir));
        let auth = AuthDb::new();
        auth.set_failure_limit(cfg.auth_failure_limit);
        if cfg.proxy_protocol {
            let from: Vec<String> = cfg
                .proxy_protocol_from
                .iter()
                .map(ToString::to_string)
                .collect();
            info!(
                from = %from.join(","),
                "proxy-protocol on: AMQP, AMQPS and management connections must start with a \
                 PROXY header from these sources"
            );
        }
        let mgmt_body_budget = Arc::new(tokio::sync::Semaphore::new(mgmt::body_budget(&cfg)));
        let shared = Arc::new_cyclic(|me| BrokerShared {
            config: cfg,
            auth: Arc::new(auth),
            vhosts: parking_lot::RwLock::new(HashMap::new()),
            policies: Arc::default(),
            registry: connection::registry::Registry::new(node.stats.clone()),
            node,
            persister,
            me: me.clone(),
            next_conn_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            sampler: Arc::default(),
            started_at: tokio::time::Instant::now(),
            listeners: [
                ("amqp", &amqp_addrs),
                ("amqp/ssl", &amqps_addrs),
                ("http", &mgmt_addrs),
                ("http/prometheus", &prometheus_addrs),
            ]
            .into_iter()
            .flat_map(|(p, v)| v.iter().map(move |a| (p, *a)))
            .collect(),
            store,
            mgmt_body_budget,
            cluster: std::sync::OnceLock::new(),
        });
        // Clustered: the cluster first (its queues' logs stream to their mirrors from the
        // start), then the stored definitions, then the cluster's replace them.
        if cluster::settings::clustered(&shared.config) {
            let link = cluster::link::ClusterLink::start(&shared)
                .await
                .map_err(StartError::Cluster)?;
            let _ = shared.cluster.set(link);
        }
        // Stored definitions (and the durable queues' contents) come back before any listener
        // accepts a client (listeners are bound, but nothing accepts before `run`).
        definitions::boot(&shared).map_err(StartError::Definitions)?;
        // Clustered: the cluster's vhosts, users, permissions and policies replace the stored
        // ones (a fresh cluster is seeded with them) before any client is served.
        if let Some(link) = shared.cluster().cloned() {
            link.begin(&shared).await.map_err(StartError::Cluster)?;
        }
        // Stored messages of queues whose definitions are gone are dropped now.
        shared.store.drop_unclaimed();
        Ok(Bound {
            amqp_addrs,
            amqps_addrs,
            mgmt_addrs,
            prometheus_addrs,
            shared,
            mgmt,
            prometheus,
            amqp,
            amqps,
            tls,
            monitor,
        })
    }
}

impl Bound {
    /// Serves until `shutdown` is cancelled; then every client gets connection.close 320 and
    /// the call returns once they are gone (or the grace period ends).
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let monitor_stop = CancellationToken::new();
        let monitor = tokio::spawn(
            self.shared
                .node
                .clone()
                .run_monitor(self.monitor, monitor_stop.clone()),
        );
        // HTTP listeners stop with the broker; they are not waited for.
        let http_stop = CancellationToken::new();
        tokio::spawn(
            self.shared
                .sampler
                .clone()
                .run(Arc::downgrade(&self.shared), http_stop.clone()),
        );
        for l in self.mgmt {
            tokio::spawn(mgmt::serve(
                l,
                mgmt::Kind::Api,
                self.shared.clone(),
                http_stop.clone(),
            ));
        }
        for l in self.prometheus {
            tokio::spawn(mgmt::serve(
                l,
                mgmt::Kind::Prometheus,
                self.shared.clone(),
                http_stop.clone(),
            ));
        }
        let _stop_http = http_stop.drop_guard();
        for l in self.amqp {
            tracker.spawn(accept_loop(
                l,
                None,
                self.shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        for l in self.amqps {
            tracker.spawn(accept_loop(
                l,
                self.tls.clone(),
                self.shared.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        shutdown.cancelled().await;
        tracker.close();
        let grace = Duration::from_millis(self.shared.config.shutdown_grace_ms);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!("shutdown grace period over; dropping remaining connections");
        }
        monitor_stop.cancel();
        let _ = monitor.await;
        if let Some(c) = self.shared.cluster() {
            c.shutdown().await;
        }
        // Settles and deliveries still pending reach the disk before the process exits.
        let store = self.shared.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        info!("broker stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<BrokerShared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over the limit, a client still gets the handshake and a 530 at connection.open (a
        // reason it can log). Past twice the limit it is dropped unanswered, so refusals
        // cannot pile up without bound.
        let max = shared.config.max_connections;
        let live = shared.connections.load(Ordering::Relaxed);
        let over_limit = (max > 0 && live >= max as usize).then_some(max);
        if over_limit.is_some() {
            if live >= 2 * max as usize {
                warn!(%peer, "max-connections reached twice over; dropping connection");
                drop(sock);
                continue;
            }
            warn!(%peer, "max-connections reached; refusing connection.open with 530");
        }
        if !shared.registry.running() {
            // stop_app: AMQP is not served until start_app.
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        // `client` is filled in when a PROXY header names the client behind `peer`.
        let span = tracing::info_span!(
            "conn",
            peer = %peer,
            client = tracing::field::Empty,
            vhost = tracing::field::Empty
        );
        tracker.spawn(
            async move {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                serve_stream(sock, peer, tls, shared.clone(), shutdown, over_limit).await;
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
}

async fn serve_stream(
    sock: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<BrokerShared>,
    shutdown: CancellationToken,
    over_limit: Option<u32>,
) {
    let local = sock.local_addr().unwrap_or(peer);
    let listener = if tls.is_some() { "amqps" } else { "amqp" };
    // With proxy-protocol on, the header comes first, before the TLS handshake (as HAProxy
    // and warren-lb send it).
    let accepted = tokio::select! {
        a = proxied::accept(sock, peer, local, &shared.config, listener) => a,
        _ = shutdown.cancelled() => None,
    };
    let Some(proxied::Accepted {
        stream: sock,
        peer,
        local,
        via,
    }) = accepted
    else {
        return;
    };
    if via.is_some() {
        tracing::Span::current().record("client", tracing::field::display(peer));
    }
    match tls {
        None => connection::serve(sock, peer, local, false, shared, shutdown, over_limit).await,
        Some(acc) => match tokio::time::timeout(Duration::from_secs(10), acc.accept(sock)).await {
            Ok(Ok(stream)) => {
                connection::serve(stream, peer, local, true, shared, shutdown, over_limit).await
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "tls handshake failed"),
            Err(_) => tracing::debug!("tls handshake timed out"),
        },
    }
}

/// Binds HTTP listeners (management, Prometheus) and logs `listening proto=<proto> addr=...`.
async fn bind_all(
    addrs: &[SocketAddr],
    proto: &'static str,
) -> Result<(Vec<TcpListener>, Vec<SocketAddr>), StartError> {
    let mut ls = Vec::new();
    let mut bound = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a)
            .await
            .map_err(|source| StartError::Bind { addr: *a, source })?;
        let addr = l
            .local_addr()
            .map_err(|source| StartError::Bind { addr: *a, source })?;
        info!(proto = %proto, addr = %addr, "listening");
        bound.push(addr);
        ls.push(l);
    }
    Ok((ls, bound))
}
