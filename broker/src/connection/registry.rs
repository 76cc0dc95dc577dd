//! The registry of live connections, for the management API: what each connection is (peer,
//! user, vhost, its counters) and its event channel (to close it or ask for its channels), and
//! the application switch of `stop_app` / `start_app`.

use crate::queue::ClientTx;
use crate::stats::{churn, ConnStats, NodeStats};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Facts about a connection set once it is open.
#[derive(Debug, Clone, Default)]
pub struct ConnOpened {
    pub user: String,
    pub vhost: String,
    pub client_properties: serde_json::Value,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub auth_mechanism: String,
}

/// One live connection as the management API sees it.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    /// RabbitMQ's connection name: "peer -> local".
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub stats: Arc<ConnStats>,
    /// Set at connection.open; None during the handshake.
    pub opened: Mutex<Option<ConnOpened>>,
    /// The connection's event channel (forced close, inspection).
    pub events: ClientTx,
    /// What the connection shares with queues (its flow state: blocked by a queue).
    pub conn_shared: Arc<crate::queue::ConnShared>,
}

/// Live connections and the application switch (stop_app / start_app).
#[derive(Debug)]
pub struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    running: AtomicBool,
    /// Paused by the cluster (`pause_minority` in a minority): not serving, like stopped, but
    /// undone when the majority is back, not by start_app.
    paused: AtomicBool,
    /// The node's totals: connection churn, and what a removed connection leaves behind.
    stats: Arc<NodeStats>,
}

impl Registry {
    /// An empty registry of a node whose totals are `stats`.
    pub fn new(stats: Arc<NodeStats>) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            running: AtomicBool::new(true),
            paused: AtomicBool::new(false),
            stats,
        }
    }

    pub fn add(&self, e: Arc<ConnEntry>) {
        churn(&self.stats.churn.connection_created);
        self.conns.lock().insert(e.id, e);
    }

    pub fn remove(&self, id: u64) {
        if let Some(e) = self.conns.lock().remove(&id) {
            churn(&self.stats.churn.connection_closed);
            self.stats.conn_gone(&e.stats);
        }
    }

    /// Live connections, ordered by id.
    pub fn connections(&self) -> Vec<Arc<ConnEntry>> {
        let mut v: Vec<_> = self.conns.lock().values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<ConnEntry>> {
        self.conns.lock().values().find(|e| e.name == name).cloned()
    }

    /// AMQP accepted and served (false after stop_app, and while paused by the cluster).
    pub fn running(&self) -> bool {
        self.started() && !self.paused.load(Ordering::Relaxed)
    }

    /// The application switch alone (stop_app / start_app).
    pub fn started(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub fn set_running(&self, on: bool) {
        self.running.store(on, Ordering::Relaxed);
    }

    /// Paused by the cluster's partition handling.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Pause or resume serving for the cluster; true if that changed anything.
    pub fn set_paused(&self, on: bool) -> bool {
        self.paused.swap(on, Ordering::Relaxed) != on
    }

    /// Close every client connection with 320 CONNECTION_FORCED and `reason`.
    pub fn close_all(&self, reason: &str) {
        for e in self.connections() {
            let _ = e.events.send(crate::queue::ClientEvent::Close(
                crate::error::ConnectionError::forced(reason),
            ));
        }
    }
}

/// How long [`inspect`] waits for the connections' answers.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks each connection with channels to describe them (concurrently, bounded in time: a
/// connection that does not answer in time is left out), for the management API and metrics.
pub async fn inspect(
    conns: &[Arc<ConnEntry>],
) -> Vec<(Arc<ConnEntry>, Vec<crate::stats::ChannelSnapshot>)> {
    let mut waiting = Vec::new();
    for e in conns {
        if e.stats.channels.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if e.events
            .send(crate::queue::ClientEvent::Inspect(tx))
            .is_ok()
        {
            waiting.push((e.clone(), rx));
        }
    }
    let deadline = tokio::time::Instant::now() + INSPECT_TIMEOUT;
    let mut out = Vec::new();
    for (e, rx) in waiting {
        if let Ok(Ok(chans)) = tokio::time::timeout_at(deadline, rx).await {
            out.push((e, chans));
        }
    }
    out
}
