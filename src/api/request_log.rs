//! The request log: one line per request with method, path, status, the bytes that really moved
//! in and out, and the duration — logged when the answer's body has been sent (or dropped), so a
//! streamed download's line tells its real size and time. Also adds the API version header every
//! registry answer carries. The same facts feed the request metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Frame;

use super::error::InternalError;
use crate::metrics::{BerthMetrics, RequestLabels, method_label, route_of};

/// The request as events name it: the client's `X-Request-Id` when it sent a sensible one
/// (so a client can follow its change into the events), else a new one.
fn request_info(req: &Request, instance: &str) -> crate::events::RequestInfo {
    let header = |name: header::HeaderName| {
        req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    };
    let given = header(header::HeaderName::from_static("x-request-id"));
    let id = if !given.is_empty()
        && given.len() <= 128
        && given.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        given
    } else {
        uuid::Uuid::new_v4().to_string()
    };
    crate::events::RequestInfo {
        id,
        addr: req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default(),
        host: header(header::HOST),
        method: req.method().to_string(),
        useragent: header(header::USER_AGENT),
        instance: instance.to_string(),
    }
}

/// The middleware.
pub(super) async fn log_request(
    State(registry): State<crate::registry::Registry>,
    req: Request,
    next: Next,
) -> Response {
    let metrics = registry.metrics().clone();
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let bytes_in = Arc::new(AtomicU64::new(0));
    // Only methods that carry content get a counting body; the read path stays as it is.
    let req = if matches!(method, Method::PUT | Method::PATCH | Method::POST) {
        let counter = bytes_in.clone();
        req.map(|body| Body::new(Counted { inner: body, count: counter, line: None }))
    } else {
        req
    };
    let info = request_info(&req, registry.instance());
    let request_id = HeaderValue::from_str(&info.id).ok();
    let mut res = crate::events::with_request(info, next.run(req)).await;
    if let Some(id) = request_id {
        res.headers_mut().insert(header::HeaderName::from_static("x-request-id"), id);
    }
    res.headers_mut().insert(
        header::HeaderName::from_static("docker-distribution-api-version"),
        HeaderValue::from_static("registry/2.0"),
    );
    let status = res.status().as_u16();
    if let Some(InternalError(chain)) = res.extensions().get::<InternalError>() {
        tracing::error!(http.method = %method, http.path = %path, http.status = status, error = %chain, "request failed");
    }
    let line = Line { method, path, status, started, bytes_in, metrics };
    let exact = res.body().size_hint().exact();
    match (line.method == Method::HEAD, exact) {
        // No body is sent for HEAD, whatever Content-Length says.
        (true, _) => {
            line.log(0);
            res
        }
        // A body of known size (manifests, errors, JSON): log now, the hot path gains nothing.
        (false, Some(n)) => {
            line.log(n);
            res
        }
        // A stream (blob downloads): log when it has been sent.
        (false, None) => res.map(|body| {
            Body::new(Counted { inner: body, count: Arc::new(AtomicU64::new(0)), line: Some(line) })
        }),
    }
}

/// What one log line says besides the bytes out.
struct Line {
    method: Method,
    path: String,
    status: u16,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    metrics: Arc<BerthMetrics>,
}

impl Line {
    fn log(&self, bytes_out: u64) {
        let seconds = self.started.elapsed().as_secs_f64();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let labels = RequestLabels {
            route: route_of(&self.path),
            method: method_label(&self.method),
            status: self.status,
        };
        self.metrics.request(labels, seconds, bytes_in, bytes_out);
        let duration_ms = seconds * 1000.0;
        tracing::info!(
            http.method = %self.method,
            http.path = %self.path,
            http.status = self.status,
            bytes.in = bytes_in,
            bytes.out = bytes_out,
            duration_ms = format_args!("{duration_ms:.3}"),
            "request"
        );
    }
}

/// A body that counts the data passing through it; with a `line`, it logs that line once, when
/// the body ends or is dropped (a client that went away).
struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
    line: Option<Line>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Counted {
    fn finish(&mut self) {
        if let Some(line) = self.line.take() {
            line.log(self.count.load(Ordering::Relaxed));
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}
