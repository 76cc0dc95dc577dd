//! A listener's backend pool.
//!
//! Members in rotation sit behind an `ArcSwap` and are replaced whole (read on every new connection
//! without a lock); writes (admin, reload, drain) take a mutex so two replacements cannot interleave.
//! A removed backend leaves rotation at once and drains: its live connections go on until they end
//! or `drain_timeout` passes.
//!
//! Health: a new backend is treated as healthy until checks prove otherwise (like an ELB instance
//! that starts "InService" here, so traffic flows from the first second). Selection takes healthy
//! members; when none is healthy it takes all of them (fail open).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Metric handles of one backend, resolved once.
pub struct BackendMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub connect_errors: Counter,
    pub up: Gauge,
    pub checks_ok: Counter,
    pub checks_fail: Counter,
    pub connect_duration: Histogram,
}

pub struct Backend {
    /// As configured, `host:port`.
    pub addr: String,
    /// Pre-parsed when the address is an IP literal.
    pub sock: Option<SocketAddr>,
    healthy: AtomicBool,
    draining: AtomicBool,
    active: AtomicUsize,
    /// Fired when the drain deadline passes: live connections to this backend close.
    pub drain_expired: CancellationToken,
    /// Stops the health checker.
    pub health_stop: CancellationToken,
    /// Notified when the last live connection closes (drain waits on it).
    pub idle: tokio::sync::Notify,
    pub metrics: BackendMetrics,
}

// === impl Backend ===

impl Backend {
    pub fn new(listener: &str, addr: &str) -> Self {
        let labels = [
            (m::L_LISTENER, listener.to_string()),
            (m::L_BACKEND, addr.to_string()),
        ];
        let check = |result: &'static str| {
            metrics::counter!(m::HEALTH_CHECKS_TOTAL, m::L_LISTENER => listener.to_string(),
                m::L_BACKEND => addr.to_string(), m::L_RESULT => result)
        };
        let metrics = BackendMetrics {
            connections: metrics::counter!(m::CONNECTIONS_TOTAL, &labels),
            active: metrics::gauge!(m::CONNECTIONS_ACTIVE, &labels),
            connect_errors: metrics::counter!(m::CONNECT_ERRORS_TOTAL, &labels),
            up: metrics::gauge!(m::BACKEND_UP, &labels),
            checks_ok: check(m::RESULT_OK),
            checks_fail: check(m::RESULT_FAIL),
            connect_duration: metrics::histogram!(m::CONNECT_DURATION_SECONDS, m::L_LISTENER => listener.to_string()),
        };
        metrics.up.set(1.0);
        metrics.active.set(0.0);
        Self {
            addr: addr.to_string(),
            sock: addr.parse().ok(),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            drain_expired: CancellationToken::new(),
            health_stop: CancellationToken::new(),
            idle: tokio::sync::Notify::new(),
            metrics,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::Relaxed);
        self.metrics.up.set(if up { 1.0 } else { 0.0 });
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn conn_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.increment(1.0);
        self.metrics.connections.increment(1);
    }

    /// Opens a TCP connection (TCP_NODELAY set), resolving names per call.
    pub async fn connect_tcp(&self) -> std::io::Result<tokio::net::TcpStream> {
        let s = match self.sock {
            Some(sa) => tokio::net::TcpStream::connect(sa).await?,
            None => tokio::net::TcpStream::connect(self.addr.as_str()).await?,
        };
        s.set_nodelay(true)?;
        Ok(s)
    }

    pub fn conn_closed(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle.notify_waiters();
        }
        self.metrics.active.decrement(1.0);
    }
}

/// What a membership change did; the caller starts health checks and drains.
#[derive(Default)]
pub struct Change {
    pub added: Vec<Arc<Backend>>,
    pub removed: Vec<Arc<Backend>>,
}

pub struct Pool {
    listener: String,
    members: ArcSwap<Vec<Arc<Backend>>>,
    draining: Mutex<Vec<Arc<Backend>>>,
    write: Mutex<()>,
    fail_open: AtomicBool,
}

// === impl Pool ===

impl Pool {
    pub fn new(listener: &str) -> Self {
        Self {
            listener: listener.to_string(),
            members: ArcSwap::from_pointee(Vec::new()),
            draining: Mutex::new(Vec::new()),
            write: Mutex::new(()),
            fail_open: AtomicBool::new(false),
        }
    }

    /// Backends in rotation (healthy or not).
    pub fn members(&self) -> Arc<Vec<Arc<Backend>>> {
        self.members.load_full()
    }

    /// Backends that left rotation and still have connections.
    pub fn draining(&self) -> Vec<Arc<Backend>> {
        self.draining.lock().clone()
    }

    /// The backends a new connection may use: the healthy ones, or all (fail open).
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let all = self.members.load();
        let healthy: Vec<Arc<Backend>> = all.iter().filter(|b| b.is_healthy()).cloned().collect();
        if healthy.is_empty() {
            all.iter().cloned().collect()
        } else {
            healthy
        }
    }

    /// Replaces the member list. Kept addresses keep their state (health, connections); a drained
    /// address that comes back is a new backend.
    pub fn replace(&self, addrs: &[String]) -> Change {
        let _w = self.write.lock();
        let old = self.members.load_full();
        let mut change = Change::default();
        let mut next = Vec::with_capacity(addrs.len());
        for a in addrs {
            match old.iter().find(|b| &b.addr == a) {
                Some(b) => next.push(b.clone()),
                None => {
                    let b = Arc::new(Backend::new(&self.listener, a));
                    change.added.push(b.clone());
                    next.push(b);
                }
            }
        }
        for b in old.iter() {
            if !addrs.contains(&b.addr) {
                b.draining.store(true, Ordering::Relaxed);
                change.removed.push(b.clone());
            }
        }
        self.draining.lock().extend(change.removed.iter().cloned());
        self.members.store(Arc::new(next));
        change
    }

    /// Takes one backend out of rotation (to drain it); `None` if it is not a member.
    pub fn remove(&self, addr: &str) -> Option<Arc<Backend>> {
        let _w = self.write.lock();
        let old = self.members.load_full();
        let b = old.iter().find(|b| b.addr == addr)?.clone();
        let next: Vec<Arc<Backend>> = old.iter().filter(|x| x.addr != addr).cloned().collect();
        b.draining.store(true, Ordering::Relaxed);
        self.draining.lock().push(b.clone());
        self.members.store(Arc::new(next));
        Some(b)
    }

    /// A drained backend is gone for good.
    pub fn forget(&self, b: &Arc<Backend>) {
        self.draining.lock().retain(|x| !Arc::ptr_eq(x, b));
    }

    /// Recomputes fail-open; returns `Some(new)` when it changed.
    pub fn update_fail_open(&self) -> Option<bool> {
        let members = self.members.load();
        let now = !members.is_empty() && members.iter().all(|b| !b.is_healthy());
        let before = self.fail_open.swap(now, Ordering::Relaxed);
        (before != now).then_some(now)
    }

    pub fn is_fail_open(&self) -> bool {
        self.fail_open.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replace_keeps_state_and_drains_removed() {
        let p = Pool::new("l");
        let c = p.replace(&addrs(&["127.0.0.1:1", "127.0.0.1:2"]));
        assert_eq!(c.added.len(), 2);
        let first = p.members()[0].clone();
        first.set_healthy(false);
        let c = p.replace(&addrs(&["127.0.0.1:1", "127.0.0.1:3"]));
        assert_eq!(c.added.len(), 1);
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].addr, "127.0.0.1:2");
        assert!(c.removed[0].is_draining());
        assert!(Arc::ptr_eq(&p.members()[0], &first));
        assert!(!p.members()[0].is_healthy());
        assert_eq!(p.draining().len(), 1);
        p.forget(&c.removed[0]);
        assert!(p.draining().is_empty());
    }

    #[test]
    fn candidates_skip_unhealthy_and_fail_open() {
        let p = Pool::new("l");
        p.replace(&addrs(&["127.0.0.1:1", "127.0.0.1:2"]));
        let m = p.members();
        m[0].set_healthy(false);
        let c = p.candidates();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].addr, "127.0.0.1:2");
        assert_eq!(p.update_fail_open(), None);
        m[1].set_healthy(false);
        assert_eq!(p.candidates().len(), 2);
        assert_eq!(p.update_fail_open(), Some(true));
        m[1].set_healthy(true);
        assert_eq!(p.update_fail_open(), Some(false));
    }

    #[test]
    fn remove_takes_one_out() {
        let p = Pool::new("l");
        p.replace(&addrs(&["127.0.0.1:1", "127.0.0.1:2"]));
        assert!(p.remove("127.0.0.1:9").is_none());
        let b = p.remove("127.0.0.1:1").unwrap();
        assert!(b.is_draining());
        assert_eq!(p.members().len(), 1);
    }
}
