//! Request-level protection: oversized request heads get `431`, bodies that stall are aborted,
//! and clients over their request rate get `429 TOOMANYREQUESTS`. (Connection-level limits — slow
//! request heads, and a hard cap on the read buffer — are set on the HTTP server in `server.rs`.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::future::Future as _;

use futures_util::StreamExt;

use super::error::{ApiError, ErrorCode};
use crate::config::Limits;

/// `body`, aborted with an error if it delivers nothing for `idle`: a client that announces more
/// than it sends (or stops sending) cannot hold a request, and whatever it sent is not recorded.
pub(super) fn idle_limited(body: Body, idle: Duration) -> Body {
    Body::from_stream(IdleLimited {
        inner: body.into_data_stream(),
        idle,
        deadline: Box::pin(tokio::time::sleep(idle)),
        done: false,
    })
}

/// One timer per request, pushed back whenever a chunk arrives.
struct IdleLimited {
    inner: axum::body::BodyDataStream,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl futures_util::Stream for IdleLimited {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    let message = format!("the request body sent nothing for {} s", self.idle.as_secs());
                    Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A token bucket per client address.
#[derive(Debug)]
pub(super) struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Buckets kept before idle ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 100_000;

impl RateLimiter {
    /// A limiter, or `None` when the configuration sets no limit.
    pub(super) fn new(limits: &Limits) -> Option<Self> {
        (limits.requests_per_second > 0).then(|| RateLimiter {
            per_second: f64::from(limits.requests_per_second),
            burst: f64::from(limits.burst.max(1)),
            buckets: Mutex::default(),
        })
    }

    /// Takes a token for `client`, or says how long to wait for one.
    fn take(&self, client: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_CLIENTS {
            // Clients whose bucket has refilled are indistinguishable from new ones.
            let full = self.burst;
            let rate = self.per_second;
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < full);
        }
        let (tokens, at) = buckets.entry(client).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

/// Middleware: `431` for a request whose line and headers together exceed `max_bytes`. The HTTP
/// server's own cap on its read buffer is larger (so that large bodies are read in large
/// pieces); this is where the configured limit is kept, with an error body clients can show.
pub(super) async fn limit_head(State(max_bytes): State<usize>, req: Request, next: Next) -> Response {
    if head_size(&req) > max_bytes {
        return ApiError::new(ErrorCode::Unsupported)
            .status(axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            .message(format!("request line and headers exceed {max_bytes} bytes"))
            .into_response();
    }
    next.run(req).await
}

/// The size of a request's head as sent: `METHOD target HTTP/1.1` and `name: value` lines.
fn head_size(req: &Request) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let headers: usize =
        req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    line + headers
}

/// Middleware: `429 TOOMANYREQUESTS` with `Retry-After` for a client over its rate.
pub(super) async fn rate_limit(
    State(limiter): State<Option<Arc<RateLimiter>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(limiter) = &limiter {
        let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        if let Some(client) = client
            && let Err(wait) = limiter.take(client)
        {
            return ApiError::new(ErrorCode::TooManyRequests)
                .header(header::RETRY_AFTER, (wait.as_secs() + 1).to_string())
                .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let limits = Limits { requests_per_second: 10, burst: 3, ..Limits::default() };
        let limiter = RateLimiter::new(&limits).unwrap();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        assert!((0..3).all(|_| limiter.take(a).is_ok()));
        let wait = limiter.take(a).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.take(b).is_ok(), "buckets are per client");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take(a).is_ok(), "refilled at the configured rate");
        assert!(RateLimiter::new(&Limits::default()).is_none());
    }
}
