//! The listener set at run time: listeners added, stopped, started again and removed while
//! warren-lb serves (the Toxiproxy API's proxies, see `admin::toxiproxy_api`).
//!
//! A stopped listener is not a [`ListenerState`] (its socket is closed, its tasks have ended): it
//! is the configuration it had, with `bind` set to the address it was bound to, kept in
//! `Shared::stopped`. Starting it again binds that address (a port 0 keeps the port it was
//! given), with its fault rules.
//!
//! Invariants worth naming:
//! - a name is in at most one of `Shared::listeners` and `Shared::stopped`; moves between them
//!   take both locks (listeners first), so a reader never sees a listener in neither;
//! - every change of the set holds `Shared::changes`, an async mutex (resolving backends awaits
//!   between reading the set and writing it). Reload holds it too: it replaces the set whole and
//!   forgets the stopped listeners (after a reload the file is the truth, as for fault rules);
//! - a listener's backends never reach warren-lb itself: checked with the address just bound
//!   included, and again each time a stopped listener starts (another listener may have taken the
//!   address its backend points at meanwhile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::backend::addr::{self, OwnAddr};
use crate::config::{CloseStyle, FaultRule, ListenerConfig, ValidationError};
use crate::events::Event;
use crate::listener::{CloseCmd, ListenerState, Snapshot};
use crate::{bind_tcp, LbError, Shared};

/// Most listeners (running and stopped) the set may hold through run-time additions: each one is
/// a socket and tasks, and the API that adds them takes requests from the network.
pub const MAX_LISTENERS: usize = 1024;

/// Longest listener name accepted at run time (names are metric labels and log fields).
pub const MAX_NAME_LEN: usize = 200;

/// How long starting a listener again waits for the address its previous self held: the
/// stopped listener's socket closes when its accept task next runs, a moment after the stop.
const REBIND_WAIT: Duration = Duration::from_secs(2);

/// One listener of the set, running or stopped.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its configuration (for a running listener, the current one: backends and fault rules as
    /// changed at run time).
    pub cfg: ListenerConfig,
    /// Bound address; for a stopped listener, the address it will bind.
    pub addr: SocketAddr,
    pub running: bool,
}

/// Why a change of the listener set was refused.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("no listener `{0}`")]
    NotFound(String),
    #[error("a listener named `{0}` already exists")]
    Exists(String),
    #[error("at most {MAX_LISTENERS} listeners")]
    TooMany,
    #[error("warren-lb is shutting down")]
    ShuttingDown,
    #[error("listener names are at most {MAX_NAME_LEN} characters, without control characters")]
    BadName,
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// Binding or loading TLS material failed (the listener stays stopped, or is not added).
    #[error("{0}")]
    Start(LbError),
}

impl From<LbError> for SetError {
    fn from(e: LbError) -> Self {
        match e {
            LbError::Config(v) => SetError::Invalid(v),
            other => SetError::Start(other),
        }
    }
}

// === impl Shared (the listener set) ===

impl Shared {
    /// Every listener, running ones first (in order), then the stopped ones.
    pub fn entries(&self) -> Vec<Entry> {
        let running = self.listeners.lock();
        let stopped = self.stopped.lock();
        let mut out: Vec<Entry> = running
            .iter()
            .map(|l| Entry {
                cfg: l.snapshot().cfg.clone(),
                addr: l.addr,
                running: true,
            })
            .collect();
        out.extend(stopped.iter().map(|cfg| Entry {
            cfg: cfg.clone(),
            addr: cfg.bind,
            running: false,
        }));
        out
    }

    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.entries().into_iter().find(|e| e.cfg.name == name)
    }

    /// Adds listener `cfg` and starts it (binds `cfg.bind`) if `start`, else keeps it stopped.
    /// On any error nothing is added.
    pub async fn add_listener(&self, cfg: ListenerConfig, start: bool) -> Result<Entry, SetError> {
        let _changes = self.changes.lock().await;
        check_name(&cfg.name)?;
        if self.entry(&cfg.name).is_some() {
            return Err(SetError::Exists(cfg.name));
        }
        if self.listeners.lock().len() + self.stopped.lock().len() >= MAX_LISTENERS {
            return Err(SetError::TooMany);
        }
        cfg.validate()?;
        if start {
            let ls = self.start_locked(cfg, false).await?;
            Ok(running_entry(&ls))
        } else {
            let entry = stopped_entry(&cfg);
            self.stopped.lock().push(cfg);
            Ok(entry)
        }
    }

    /// Starts stopped listener `name` again on its address; a running one is left as it is.
    pub async fn start_listener(&self, name: &str) -> Result<Entry, SetError> {
        let _changes = self.changes.lock().await;
        if let Some(ls) = self.listener(name) {
            return Ok(running_entry(&ls));
        }
        let cfg = self
            .stopped
            .lock()
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .ok_or_else(|| SetError::NotFound(name.to_string()))?;
        let ls = self.start_locked(cfg, true).await?;
        Ok(running_entry(&ls))
    }

    /// Stops listener `name`: its socket closes, its live connections are closed (FIN), and it
    /// is kept stopped with its configuration and address. A stopped one is left as it is.
    pub async fn stop_listener(&self, name: &str, why: &str) -> Result<Entry, SetError> {
        let _changes = self.changes.lock().await;
        let Some(ls) = self.listener(name) else {
            return self
                .stopped
                .lock()
                .iter()
                .find(|c| c.name == name)
                .map(stopped_entry)
                .ok_or_else(|| SetError::NotFound(name.to_string()));
        };
        let cfg = ListenerConfig {
            bind: ls.addr,
            ..ls.snapshot().cfg.clone()
        };
        let entry = stopped_entry(&cfg);
        {
            let mut running = self.listeners.lock();
            let mut stopped = self.stopped.lock();
            running.retain(|l| !Arc::ptr_eq(l, &ls));
            stopped.push(cfg);
        }
        close_down(&ls, why);
        Ok(entry)
    }

    /// Removes listener `name`, running (closed as by [`Shared::stop_listener`]) or stopped.
    pub async fn remove_listener(&self, name: &str, why: &str) -> Result<(), SetError> {
        let _changes = self.changes.lock().await;
        self.remove_locked(name, why)
    }

    /// Replaces listener `cfg.name` (which must exist) with `cfg`: the old one is closed, the
    /// new one started if `start`. If it cannot start, it stays in the set, stopped, and the
    /// error is returned (the old one is gone either way).
    pub async fn replace_listener(
        &self,
        cfg: ListenerConfig,
        start: bool,
        why: &str,
    ) -> Result<Entry, SetError> {
        let _changes = self.changes.lock().await;
        check_name(&cfg.name)?;
        cfg.validate()?;
        self.remove_locked(&cfg.name, why)?;
        if !start {
            let entry = stopped_entry(&cfg);
            self.stopped.lock().push(cfg);
            return Ok(entry);
        }
        match self.start_locked(cfg.clone(), true).await {
            Ok(ls) => Ok(running_entry(&ls)),
            Err(e) => {
                self.stopped.lock().push(cfg);
                Err(e)
            }
        }
    }

    /// Edits the fault rules of listener `name` (running or stopped) with `edit`, under the
    /// change lock so that concurrent edits do not lose each other. `edit`'s own error is
    /// returned inside `Ok`; the edited rules are validated before they apply.
    pub async fn edit_faults<T, E>(
        &self,
        name: &str,
        edit: impl FnOnce(&mut Vec<FaultRule>) -> Result<T, E>,
    ) -> Result<Result<T, E>, SetError> {
        let _changes = self.changes.lock().await;
        if let Some(ls) = self.listener(name) {
            let mut rules = ls.snapshot().cfg.faults.clone();
            let out = match edit(&mut rules) {
                Ok(out) => out,
                Err(e) => return Ok(Err(e)),
            };
            ls.set_faults(rules)?;
            return Ok(Ok(out));
        }
        let mut stopped = self.stopped.lock();
        let cfg = stopped
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| SetError::NotFound(name.to_string()))?;
        let mut next = cfg.clone();
        let out = match edit(&mut next.faults) {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        next.validate()?;
        *cfg = next;
        Ok(Ok(out))
    }

    fn remove_locked(&self, name: &str, why: &str) -> Result<(), SetError> {
        let removed = {
            let mut running = self.listeners.lock();
            let mut stopped = self.stopped.lock();
            if let Some(i) = running.iter().position(|l| l.name == name) {
                Some(running.remove(i))
            } else if let Some(i) = stopped.iter().position(|c| c.name == name) {
                stopped.remove(i);
                None
            } else {
                return Err(SetError::NotFound(name.to_string()));
            }
        };
        if let Some(ls) = removed {
            close_down(&ls, why);
        }
        Ok(())
    }

    /// Resolves the backends, binds, checks that no backend is warren-lb itself (the new
    /// address included), then starts serving and joins the running set. The caller holds
    /// `changes` and has checked the name. `rebind`: the address may still be held a moment
    /// by this listener's stopped self (see [`REBIND_WAIT`]). A stopped listener of the name
    /// leaves the stopped set as the new one joins the running set.
    async fn start_locked(
        &self,
        cfg: ListenerConfig,
        rebind: bool,
    ) -> Result<Arc<ListenerState>, SetError> {
        if self.rt.stop.is_cancelled() {
            return Err(SetError::ShuttingDown);
        }
        let resolved = addr::resolve_all(&cfg.name, &cfg.backends)
            .await
            .map_err(ValidationError::from)?;
        let name = cfg.name.clone();
        let snap = Snapshot::build(cfg).map_err(|source| LbError::Tls {
            name: name.clone(),
            source,
        })?;
        let (tcp, bound) = bind_waiting(&name, snap.cfg.bind, rebind).await?;
        let mut own = self.own_addrs();
        own.push(OwnAddr::listener(&name, bound));
        // On refusal `tcp` is dropped here: the socket closes before anything was accepted.
        addr::check_resolved(&resolved, &own).map_err(ValidationError::from)?;
        tracing::info!(listener = %name, addr = %bound, "listening");
        let ls = ListenerState::new(snap, bound, self.rt.clone());
        ls.start(tcp);
        {
            let mut running = self.listeners.lock();
            let mut stopped = self.stopped.lock();
            stopped.retain(|c| c.name != name);
            running.push(ls.clone());
        }
        self.events().emit(Event::new(&name, "listener_added"));
        Ok(ls)
    }
}

/// Stops accepting (the socket closes), closes the live connections with a FIN, and lets the
/// backends drain what is left (connections still connecting when the order went out) within
/// the listener's `drain_timeout`.
fn close_down(ls: &Arc<ListenerState>, why: &str) {
    ls.retire();
    let cmd = CloseCmd::plain(CloseStyle::Fin, "listener_stopped", why.to_string());
    let n = ls.reset_all(&cmd);
    tracing::info!(listener = %ls.name, addr = %ls.addr, closed = n, cause = %why, "listener stopped");
}

fn running_entry(ls: &ListenerState) -> Entry {
    Entry {
        cfg: ls.snapshot().cfg.clone(),
        addr: ls.addr,
        running: true,
    }
}

fn stopped_entry(cfg: &ListenerConfig) -> Entry {
    Entry {
        cfg: cfg.clone(),
        addr: cfg.bind,
        running: false,
    }
}

/// A name a listener may take at run time: what the configuration accepts, within
/// [`MAX_NAME_LEN`] characters, without control characters (names go into logs and labels).
pub fn check_name(name: &str) -> Result<(), SetError> {
    if name.is_empty() {
        return Err(ValidationError::EmptyName.into());
    }
    if name == "admin" {
        return Err(ValidationError::ReservedName(name.to_string()).into());
    }
    if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(SetError::BadName);
    }
    Ok(())
}

/// [`bind_tcp`]; with `rebind`, an address in use is tried again for up to [`REBIND_WAIT`].
async fn bind_waiting(
    name: &str,
    addr: SocketAddr,
    rebind: bool,
) -> Result<(TcpListener, SocketAddr), LbError> {
    let deadline = tokio::time::Instant::now() + REBIND_WAIT;
    loop {
        match bind_tcp(name, addr) {
            Err(LbError::Bind { source, .. })
                if rebind
                    && addr.port() != 0
                    && source.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_names_are_checked() {
        assert!(check_name("redis").is_ok());
        assert!(check_name("a b/ü").is_ok());
        assert!(matches!(
            check_name(""),
            Err(SetError::Invalid(ValidationError::EmptyName))
        ));
        assert!(matches!(
            check_name("admin"),
            Err(SetError::Invalid(ValidationError::ReservedName(_)))
        ));
        assert!(matches!(check_name("a\nb"), Err(SetError::BadName)));
        assert!(check_name(&"x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(check_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
