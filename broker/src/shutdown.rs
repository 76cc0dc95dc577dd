//! Shutdown signals: the first SIGTERM/SIGINT cancels the token (graceful), a second one
//! exits at once.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGTERM or Ctrl-C; exits the process on the second signal.
pub fn install(token: CancellationToken) {
    tokio::spawn(async move {
        wait_signal().await;
        tracing::info!("shutdown requested");
        token.cancel();
        wait_signal().await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(1);
    });
}

#[cfg(unix)]
async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
