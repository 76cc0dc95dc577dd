//! Graceful shutdown and process signals.
//!
//! Shutdown has two phases on two tokens: `stop` (stop accepting, stop health checks and timers)
//! and, once the drain deadline passes, `hard` (close every live connection). A `TaskTracker` holds
//! every connection task so the drain can wait for the last one.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Stops accepting, waits for live connections up to the longest `drain_timeout`, then closes
/// what is left and waits for it.
pub async fn drain(shared: &Shared) {
    let listeners = shared.listeners();
    let grace = listeners
        .iter()
        .map(|l| l.snapshot().cfg.drain_timeout)
        .max()
        .unwrap_or(Duration::ZERO);
    let live: usize = listeners.iter().map(|l| l.active()).sum();
    tracing::info!(live, grace = %humantime::format_duration(grace), "shutting down: stopped accepting, draining");
    shared.rt.stop.cancel();
    shared.rt.tracker.close();
    if tokio::time::timeout(grace, shared.rt.tracker.wait())
        .await
        .is_err()
    {
        let live: usize = listeners.iter().map(|l| l.active()).sum();
        tracing::warn!(
            live,
            "drain_timeout passed: closing the remaining connections"
        );
        shared.rt.hard.cancel();
        shared.rt.tracker.wait().await;
    }
    tracing::info!("drained; bye");
}

/// What a process signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Reload,
}

/// The process signals warren-lb handles, registered when this is made: make it before
/// binding, so that a signal sent as soon as a listener is up is not lost.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers SIGTERM, SIGINT and SIGHUP (inside a runtime).
    pub fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for signals: the first SIGTERM/SIGINT cancels `shutdown`, a second one exits the
    /// process at once (status 1); each SIGHUP is sent on `reload`.
    pub async fn watch(
        mut self,
        shutdown: CancellationToken,
        reload: tokio::sync::mpsc::Sender<Signal>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
                _ = self.hup.recv() => {
                    let _ = reload.send(Signal::Reload).await;
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                tracing::warn!("second stop signal: exiting now");
                std::process::exit(1);
            }
            tracing::info!("stop signal received");
            shutdown.cancel();
        }
    }
}
