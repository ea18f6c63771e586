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
    let rustls = match &app.config.tls {
        None => None,
        Some(tls) => Some(
            axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("TLS certificate {} / key {}: {e}", tls.cert.display(), tls.key.display()),
                )
            })?,
        ),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = match app.config.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("metrics.listen {addr}: {e}")))?;
            tracing::info!(metrics.listen = %listener.local_addr()?, "serving /metrics");
            let mut stop = stop_rx.clone();
            let router = api::metrics_router(app.clone());
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await;
            }))
        }
    };
    let mut background = vec![tokio::spawn(flush_access_periodically(app.clone(), stop_rx.clone()))];
    if app.config.gc.enabled {
        for _ in 0..app.config.gc.workers {
            background.push(tokio::spawn(collect_periodically(app.clone(), stop_rx.clone())));
        }
        background.push(tokio::spawn(sweep_periodically(app.clone(), stop_rx.clone())));
    }
    if !app.registry.caches().is_empty() {
        background.push(tokio::spawn(evict_periodically(app.clone(), stop_rx.clone())));
    }
    for endpoint in &app.config.events.endpoints {
        background.push(tokio::spawn(crate::events::deliver::run(
            app.registry.clone(),
            endpoint.clone(),
            stop_rx.clone(),
        )));
    }
    if !app.config.retention.interval.is_zero() && !app.config.retention.rules.is_empty() {
        background.push(tokio::spawn(retain_periodically(app.clone(), stop_rx)));
    }
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        // In-flight requests get as long as they need.
        stopper.graceful_shutdown(None);
    });
    let service = api::router(app.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let limits = app.config.limits.clone();
    let listener = listener.into_std()?;
    let result = match rustls {
        None => {
            let mut server = axum_server::from_tcp(listener)?.handle(handle);
            apply_limits(server.http_builder(), &limits);
            server.serve(service).await
        }
        Some(rustls) => {
            let mut server = axum_server::from_tcp_rustls(listener, rustls)?.handle(handle);
            apply_limits(server.http_builder(), &limits);
            server.serve(service).await
        }
    };
    let _ = stop_tx.send(true);
    for task in background.into_iter().chain(metrics) {
        let _ = task.await;
    }
    registry.meta().close().await;
    result
}

/// Connection-level limits: slow request heads are cut off, and no connection buffers more than
/// [`read_buffer_bytes`].
fn apply_limits(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: &crate::config::Limits,
) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(limits.header_read_timeout_secs))
        .max_buf_size(read_buffer_bytes(limits))
        .max_headers(100);
}

/// The most a connection reads ahead. Large reads matter for uploads: with 64 KiB reads a push
/// costs a third more CPU, in wake-ups; 512 KiB costs no more than 1 MiB and keeps less memory
/// pinned by body pieces still queued for hashing or storage (docs/benchmarks.md). Request
/// heads larger than `limits.max_header_bytes` but within this buffer get their 431 from
/// `api::limits::limit_head`; beyond it the HTTP parser answers 431 itself.
fn read_buffer_bytes(limits: &crate::config::Limits) -> usize {
    limits.max_header_bytes.max(512 << 10)
}

/// Writes the noted pull and `HEAD` times every `gc.access_flush_interval`, and once more when
/// the server stops, so they are durable within that interval.
async fn flush_access_periodically(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = app.config.gc.access_flush_interval;
    loop {
        let stopping = tokio::select! {
            _ = stop.changed() => true,
            () = tokio::time::sleep(every) => false,
        };
        if let Err(e) = app.registry.flush_access().await {
            tracing::warn!(error = %e, "could not record pull and HEAD times; kept for the next flush");
        }
        if stopping {
            return;
        }
    }
}

/// Reviews passed to one collection pass; a pass that used them all is followed by another at
/// once, so a backlog drains at the store's speed rather than one pass per interval.
const REVIEWS_PER_PASS: u64 = 1000;

/// A collector worker: collects what is due every `gc.interval` while serving (several workers
/// and replicas claim different reviews).
async fn collect_periodically(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut backlog = false;
    loop {
        if !backlog {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(app.config.gc.interval) => {}
            }
        } else if *stop.borrow() {
            return;
        }
        backlog = false;
        match app.registry.collect(REVIEWS_PER_PASS).await {
            Ok(r) => {
                backlog = r.reviews == REVIEWS_PER_PASS;
                if r.manifests + r.blobs + r.uploads_expired > 0 {
                    tracing::info!(
                        gc.manifests = r.manifests,
                        gc.blobs = r.blobs,
                        gc.bytes = r.bytes,
                        gc.uploads_expired = r.uploads_expired,
                        gc.objects_deleted = r.objects_deleted,
                        "collected"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "collection pass failed; retried next time"),
        }
    }
}

/// Runs a step of the storage sweep and of the scrub every `gc.sweep_interval`, on whichever
/// replica holds the lease for it.
async fn sweep_periodically(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = app.config.gc.sweep_interval;
    let holder = app.registry.instance().to_string();
    let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
    let lease_ms = every_ms.saturating_mul(3).max(60_000);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(every) => {}
        }
        let now = app.registry.clock().now_ms();
        match app.registry.meta().take_lease("sweep", &holder, now, lease_ms).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not take the sweep lease");
                continue;
            }
        }
        match app.registry.sweep_step().await {
            Ok(r) if r.orphans + r.rows_requeued > 0 => tracing::info!(
                sweep.orphans = r.orphans,
                sweep.orphan_bytes = r.orphan_bytes,
                sweep.rows_requeued = r.rows_requeued,
                "sweep step"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep step failed; retried next time"),
        }
        if let Some(period) = app.registry.policy().scrub_period_ms
            && let Err(e) = app.registry.scrub_step(period, every_ms.saturating_mul(10)).await
        {
            tracing::warn!(error = %e, "scrub step failed; retried next time");
        }
        match app.registry.prune_events().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events.pruned = n, "delivered events past events.retain removed"),
            Err(e) => tracing::warn!(error = %e, "could not prune events; retried next time"),
        }
        if let Err(e) = app.registry.sample_space(crate::registry::SPACE_SAMPLE_EVERY_MS).await {
            tracing::warn!(error = %e, "could not sample where the space is");
        }
    }
    let _ = app.registry.meta().release_lease("sweep", &holder).await;
}

/// Runs the pull-through caches' eviction every `gc.sweep_interval`, on whichever replica holds
/// the lease for it (one evictor at a time: two would evict twice as much).
async fn evict_periodically(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = app.config.gc.sweep_interval;
    let holder = app.registry.instance().to_string();
    let lease_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX).saturating_mul(3).max(60_000);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(every) => {}
        }
        let now = app.registry.clock().now_ms();
        match app.registry.meta().take_lease("proxy-evict", &holder, now, lease_ms).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not take the eviction lease");
                continue;
            }
        }
        if let Err(e) = app.registry.evict_caches().await {
            tracing::warn!(error = %e, "cache eviction failed; retried next time");
        }
    }
    let _ = app.registry.meta().release_lease("proxy-evict", &holder).await;
}

/// Looks every minute (or every `retention.interval`, if shorter) whether a scheduled retention
/// run is due; the run happens on whichever replica holds the retention lease.
async fn retain_periodically(app: App, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = app.config.retention.interval.min(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = app.registry.scheduled_retention().await {
            tracing::warn!(error = %e, "scheduled retention run failed; retried next time");
        }
    }
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
