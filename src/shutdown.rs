//! Shutting down on a signal, the same way for the worker and the queen: [`signal`] resolves on SIGINT or
//! SIGTERM; each service then stops taking work and cancels its own `CancellationToken`s, finishing what
//! runs within its grace period.

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what container runtimes send), logging which.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT"),
        _ = term => tracing::info!("SIGTERM"),
    }
}
