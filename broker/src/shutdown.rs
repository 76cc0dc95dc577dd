//! Shutdown signals: the first SIGTERM/SIGINT cancels the token (graceful), a second one
//! exits at once.
//!
//! The handlers are registered when [`install`] is called, before the broker binds: a SIGTERM
//! sent as soon as a listener is logged must stop the broker cleanly, not kill it.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Registers SIGTERM and SIGINT now (inside the runtime) and cancels `token` on the first;
/// exits the process on the second.
pub fn install(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        next(&mut term, &mut int).await;
        tracing::info!("shutdown requested");
        token.cancel();
        next(&mut term, &mut int).await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(1);
    });
    Ok(())
}

async fn next(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
