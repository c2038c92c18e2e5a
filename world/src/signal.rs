//! Process signals: how a daemon learns it should stop.

/// Resolves when the process receives SIGTERM or SIGINT (logged once, here). If the handlers
/// cannot be installed it logs that and never resolves: stop the process with SIGKILL.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Run `then` once SIGTERM or SIGINT arrives (see [`shutdown_signal`]); abort the returned
/// handle to stop waiting.
pub fn on_shutdown_signal(then: impl FnOnce() + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        shutdown_signal().await;
        then();
    })
}
