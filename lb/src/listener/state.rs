//! What a listener is, as the rest of warren-lb sees it: [`ListenerState`] (its settings
//! snapshot, backend pool, live-connection registry and fault rules), the process-wide [`Rt`], a
//! configuration built into a [`Snapshot`], and a live connection's [`ConnInfo`].
//!
//! Health checks (`backend::health`), fault injection (`chaos::inject`) and the admin API read a
//! listener through this module; the tasks that act for it (accept loop, connections, health
//! checkers, the `every` ticker) are started by `listener`. Keeping the state here is what lets
//! `listener` import those tasks without them importing `listener` back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::Counter;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{selector, Pool, Selector};
use crate::chaos::plan::CloseCmd;
use crate::config::{FaultRule, ListenerConfig};
use crate::events::EventBus;
use crate::metrics as m;
use crate::proxy::{ByteMetrics, ConnBytes};
use crate::tls::{self, BackendTls, TlsError};

/// Process-wide pieces every listener uses.
#[derive(Clone)]
pub struct Rt {
    pub events: Arc<EventBus>,
    /// Every connection and background task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Stop accepting, stop health checks (first phase of shutdown).
    pub stop: CancellationToken,
    /// Close every live connection (end of drain).
    pub hard: CancellationToken,
    pub next_conn: Arc<AtomicU64>,
    /// `[runtime] splice`.
    pub splice: bool,
    /// Connection threads besides the accepting runtime (`[runtime] threads` > 1), see `workers`.
    pub workers: Option<Arc<crate::workers::Workers>>,
    /// The chaos seed of this run (`[chaos] seed`, `--seed`, or drawn at start and logged).
    pub seed: u64,
}

/// A listener's settings, built once per configuration (TLS material loaded).
pub struct Snapshot {
    pub cfg: ListenerConfig,
    pub selector: Arc<dyn Selector>,
    pub acceptor: Option<TlsAcceptor>,
    pub backend_tls: Option<BackendTls>,
}

impl Snapshot {
    pub fn build(cfg: ListenerConfig) -> Result<Self, TlsError> {
        let acceptor = cfg.tls.as_ref().map(tls::acceptor).transpose()?;
        let backend_tls = cfg.backend_tls.as_ref().map(BackendTls::new).transpose()?;
        Ok(Self {
            selector: selector(cfg.balance),
            cfg,
            acceptor,
            backend_tls,
        })
    }
}

/// A live connection as the registry sees it.
pub struct ConnInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub backend: String,
    pub started: Instant,
    pub bytes: ConnBytes,
    ctl: watch::Sender<Option<CloseCmd>>,
}

impl ConnInfo {
    /// A connection opened now, and the receiving end of its orders.
    pub(super) fn new(
        id: u64,
        client: SocketAddr,
        backend: String,
    ) -> (Self, watch::Receiver<Option<CloseCmd>>) {
        let (ctl, rx) = watch::channel(None);
        let info = Self {
            id,
            client,
            backend,
            started: Instant::now(),
            bytes: ConnBytes::default(),
            ctl,
        };
        (info, rx)
    }

    /// Asks the connection to close; it acts at once.
    pub fn close(&self, cmd: CloseCmd) {
        self.ctl.send_replace(Some(cmd));
    }
}

/// One listener, shared by its connections, its health checkers, its ticker, reload and the
/// admin API. Fields are `pub(super)`: the methods that change a listener or run its tasks are in
/// `listener` (`mod.rs`).
pub struct ListenerState {
    pub name: String,
    /// The bound address.
    pub addr: SocketAddr,
    pub(super) snap: ArcSwap<Snapshot>,
    pub pool: Pool,
    pub(super) conns: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    pub(super) active: AtomicUsize,
    pub(super) stop_accept: CancellationToken,
    /// Wakes the periodic-reset task when rules change.
    pub(crate) rules_changed: Notify,
    /// The fault rules, watched by every live connection (changes act at once).
    pub(super) rules: watch::Sender<Arc<Vec<FaultRule>>>,
    /// Connection sequence number within this listener (keys the per-connection RNG streams).
    pub(super) seq: AtomicU64,
    pub(super) rt: Rt,
    pub(super) refused: Counter,
    pub(super) bytes: ByteMetrics,
}

// === impl ListenerState ===

impl ListenerState {
    pub fn new(snap: Snapshot, addr: SocketAddr, rt: Rt) -> Arc<Self> {
        let name = snap.cfg.name.clone();
        let bytes = ByteMetrics {
            upstream: metrics::counter!(m::BYTES_TOTAL, m::L_LISTENER => name.clone(), m::L_DIRECTION => m::DIR_UPSTREAM),
            downstream: metrics::counter!(m::BYTES_TOTAL, m::L_LISTENER => name.clone(), m::L_DIRECTION => m::DIR_DOWNSTREAM),
        };
        let pool = Pool::new(&name);
        pool.replace(&snap.cfg.backends);
        let snap_faults = snap.cfg.faults.clone();
        Arc::new(Self {
            refused: metrics::counter!(m::REFUSED_TOTAL, m::L_LISTENER => name.clone()),
            bytes,
            pool,
            stop_accept: rt.stop.child_token(),
            rt,
            addr,
            name,
            snap: ArcSwap::from_pointee(snap),
            conns: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            rules_changed: Notify::new(),
            rules: watch::channel(Arc::new(snap_faults)).0,
            seq: AtomicU64::new(0),
        })
    }

    /// The run's chaos seed.
    pub fn seed(&self) -> u64 {
        self.rt.seed
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// Cancelled when the listener stops accepting (removed, or shutdown).
    pub fn stopping(&self) -> CancellationToken {
        self.stop_accept.clone()
    }

    pub fn events(&self) -> &EventBus {
        &self.rt.events
    }

    /// Live connections (accepted, not yet closed).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self.conns.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Closes every live connection now; returns how many were told.
    pub fn reset_all(&self, cmd: &CloseCmd) -> usize {
        let conns = self.connections();
        for c in &conns {
            c.close(cmd.clone());
        }
        conns.len()
    }
}
