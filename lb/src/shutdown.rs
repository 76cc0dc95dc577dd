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

/// Waits for signals: the first SIGTERM/SIGINT cancels `shutdown`, a second one exits the process
/// at once (status 1); each SIGHUP is sent on `reload`.
pub async fn watch_signals(
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<Signal>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
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
