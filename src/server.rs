//! Serving the HTTP API on a bound listener until a shutdown signal, finishing in-flight
//! requests before returning.

use std::future::Future;

use tokio::net::TcpListener;

use crate::api;
use crate::app::App;

/// Serves `app` on `listener` until `shutdown` resolves, then waits for in-flight requests.
/// Taking a bound listener lets callers (and tests) bind port 0 without races.
///
/// # Errors
/// When accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = app.registry.clone();
    let result = axum::serve(listener, api::router(app.registry)).with_graceful_shutdown(shutdown).await;
    registry.meta().close().await;
    result
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
