//! Delivery to one endpoint: on the replica holding the endpoint's lease, pending events are
//! read in batches (each stream in order), filtered, rendered and `POST`ed; the cursors move
//! past a batch only once the endpoint accepted it (any 2xx). A failed batch is sent again after a
//! pause that doubles with each failure; after `max_attempts` failures, or once its oldest event
//! is older than `max_age`, it becomes dead letters and the events behind it go on. Replays
//! (`berth events replay`) are sent before pending events.

use std::time::Duration;

use super::format::{Source, render};
use super::{EndpointConfig, WRITTEN};
use crate::meta::{Settle, StoredEvent};
use crate::registry::Registry;

/// How much longer than one request an endpoint's lease lasts (each round renews it before it
/// sends): a send never outlives the lease it started under, so a replica taking over cannot
/// overtake a batch still in flight. Also about how long delivery pauses when the delivering
/// replica dies.
const LEASE_MARGIN_MS: i64 = 10_000;
/// How long a deliverer woken by a commit, or left with less than a batch, waits for more
/// commits before it reads: fewer, larger batches under a steady stream, for that much lag.
const LINGER: Duration = Duration::from_millis(20);
/// How often an idle deliverer looks for events other replicas wrote.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// What one round did.
enum Round {
    /// Nothing to send.
    Idle,
    /// Sent (or skipped, or gave up on) a batch; more may be waiting (surely, if it was full).
    Progress {
        /// Whether the batch was as large as the endpoint's `batch`.
        full: bool,
    },
    /// The endpoint failed, or failed lately: no attempt before this time.
    PausedUntil(i64),
}

/// One endpoint's deliverer, and where it stands between rounds.
struct Deliverer {
    registry: Registry,
    endpoint: EndpointConfig,
    client: reqwest::Client,
    source: Source,
    /// The endpoint's lease (`events:NAME`); the round's records are fenced by it.
    lease: String,
    /// The stream the last batch of pending events ended with (the next starts after it).
    last_stream: String,
    /// Whether replays go first this round (they alternate with pending events while both wait,
    /// so a replay that keeps failing cannot hold live delivery up).
    replays_first: bool,
    /// Whether a record found the lease gone (another replica took it): take it again first.
    lease_lost: bool,
}

/// Delivers events to one endpoint until `stop` turns true.
pub async fn run(registry: Registry, endpoint: EndpointConfig, mut stop: tokio::sync::watch::Receiver<bool>) {
    let client = match reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(endpoint = %endpoint.name, error = %e, "cannot build the events HTTP client");
            return;
        }
    };
    let source = Source {
        registry_url: registry.events().registry_url.clone(),
        instance: registry.instance().to_string(),
    };
    let lease_ttl_ms =
        i64::try_from(endpoint.timeout.as_millis()).unwrap_or(i64::MAX).saturating_add(LEASE_MARGIN_MS);
    let mut d = Deliverer {
        lease: format!("events:{}", endpoint.name),
        registry,
        endpoint,
        client,
        source,
        last_stream: String::new(),
        replays_first: true,
        lease_lost: false,
    };
    let meta = d.registry.meta().clone();
    let instance = d.registry.instance().to_string();
    let mut wait = Duration::ZERO;
    let mut notified = Box::pin(WRITTEN.notified());
    // Until when the lease is ours (as last taken); renewed only once less than the margin's
    // half is left beyond a send, not every round.
    let mut held_until = i64::MIN;
    loop {
        let stopping = tokio::select! {
            _ = stop.changed() => true,
            () = tokio::time::sleep(wait) => false,
            // Woken by a commit: gather what the next moments commit too, into one batch.
            () = notified.as_mut(), if wait == IDLE_POLL => {
                tokio::time::sleep(LINGER).await;
                false
            }
        };
        // Armed before this round reads, so a commit during the round wakes the next one.
        notified = Box::pin(WRITTEN.notified());
        if stopping || *stop.borrow() {
            let _ = meta.release_lease(&d.lease, &instance).await;
            return;
        }
        let now = d.registry.clock().now_ms();
        if std::mem::take(&mut d.lease_lost) {
            held_until = i64::MIN;
        }
        if held_until.saturating_sub(now) < lease_ttl_ms - LEASE_MARGIN_MS / 2 {
            match meta.take_lease(&d.lease, &instance, now, lease_ttl_ms).await {
                Ok(true) => held_until = now.saturating_add(lease_ttl_ms),
                Ok(false) => {
                    held_until = i64::MIN;
                    wait = Duration::from_millis(u64::try_from(LEASE_MARGIN_MS / 3).unwrap_or(3000));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(endpoint = %d.endpoint.name, error = %e, "cannot take the events lease");
                    held_until = i64::MIN;
                    wait = IDLE_POLL;
                    continue;
                }
            }
        }
        wait = match d.round().await {
            Ok(Round::Idle) => IDLE_POLL,
            Ok(Round::Progress { full: true }) => Duration::ZERO,
            // Less than a batch was waiting: let a few more commits gather first.
            Ok(Round::Progress { full: false }) => LINGER,
            // Renewing the lease meanwhile is not needed: every replica honours the pause.
            Ok(Round::PausedUntil(at)) => Duration::from_millis(
                u64::try_from(at.saturating_sub(d.registry.clock().now_ms()).clamp(1, i64::MAX)).unwrap_or(1),
            ),
            Err(e) => {
                tracing::warn!(endpoint = %d.endpoint.name, error = %e, "events delivery failed in the metadata store");
                IDLE_POLL
            }
        };
    }
}

impl Deliverer {
    fn name(&self) -> &str {
        &self.endpoint.name
    }

    fn now(&self) -> i64 {
        self.registry.clock().now_ms()
    }

    /// The pause after `failures` failures in a row, in ms.
    fn backoff_ms(&self, failures: i64) -> i64 {
        let doublings = u32::try_from(failures.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        let pause = self.endpoint.backoff.saturating_mul(1 << doublings).min(self.endpoint.max_backoff);
        i64::try_from(pause.as_millis()).unwrap_or(i64::MAX)
    }

    /// One batch: of replays or of pending events (alternating while both wait), unless a
    /// failure paused the endpoint.
    async fn round(&mut self) -> Result<Round, crate::meta::Error> {
        if let Some(until) = self.registry.meta().endpoint_paused_until(self.name(), self.now()).await? {
            return Ok(Round::PausedUntil(until));
        }
        self.replays_first = !self.replays_first;
        if self.replays_first {
            if let Some(done) = self.replays().await? {
                return Ok(done);
            }
            return self.pending().await;
        }
        match self.pending().await? {
            Round::Idle => Ok(self.replays().await?.unwrap_or(Round::Idle)),
            done => Ok(done),
        }
    }

    /// Records a send of `n` events the endpoint did not accept; returns the failures in a row.
    async fn failed(&self, n: usize, error: &str, now: i64) -> Result<i64, crate::meta::Error> {
        self.registry.metrics().events_failed(self.name(), n);
        self.registry.meta().event_send_failed(self.name(), error, now, |f| self.backoff_ms(f)).await
    }

    /// Sends a batch of queued replays; `None` when none is queued.
    async fn replays(&self) -> Result<Option<Round>, crate::meta::Error> {
        let meta = self.registry.meta();
        let name = self.name();
        let replays = meta.replays_due(name, self.endpoint.batch).await?;
        if replays.is_empty() {
            return Ok(None);
        }
        let (wanted, skipped): (Vec<_>, Vec<_>) =
            replays.into_iter().partition(|(e, _)| self.endpoint.wants(&e.kind, e.repository.as_deref()));
        if !skipped.is_empty() {
            let ids: Vec<i64> = skipped.iter().map(|(e, _)| e.id).collect();
            meta.replays_settled(name, &ids, Settle::Skipped, self.now()).await?;
        }
        if wanted.is_empty() {
            return Ok(Some(Round::Progress { full: true }));
        }
        let events: Vec<StoredEvent> = wanted.into_iter().map(|(e, _)| e).collect();
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        match self.send(&events).await {
            Ok(()) => {
                meta.replays_settled(name, &ids, Settle::Delivered, self.now()).await?;
                self.registry.metrics().events_delivered(name, events.len());
                Ok(Some(Round::Progress { full: true }))
            }
            Err(error) => {
                let now = self.now();
                let how =
                    Settle::Failed { error: &error, max_attempts: i64::from(self.endpoint.max_attempts) };
                meta.replays_settled(name, &ids, how, now).await?;
                let failures = self.failed(events.len(), &error, now).await?;
                tracing::warn!(
                    endpoint = name,
                    events = events.len(),
                    failures,
                    error,
                    "replayed events not accepted"
                );
                Ok(Some(Round::PausedUntil(now.saturating_add(self.backoff_ms(failures)))))
            }
        }
    }

    /// Sends a batch of pending events.
    async fn pending(&mut self) -> Result<Round, crate::meta::Error> {
        let meta = self.registry.meta().clone();
        let lease_holder = self.registry.instance().to_string();
        let name = self.endpoint.name.clone();
        let name = name.as_str();
        let lease = (self.lease.as_str(), lease_holder.as_str());
        let pending = meta.pending_events(name, self.endpoint.batch, &self.last_stream).await?;
        let Some(last) = pending.last() else { return Ok(Round::Idle) };
        let full = pending.len() >= self.endpoint.batch;
        self.last_stream = last.stream.clone();
        let wanted = in_delivery_order(
            pending
                .iter()
                .filter(|e| self.endpoint.wants(&e.kind, e.repository.as_deref()))
                .cloned()
                .collect(),
        );
        if wanted.is_empty() {
            self.lease_lost = !meta.events_delivered(name, lease, &pending, 0, self.now()).await?;
            return Ok(Round::Progress { full });
        }
        match self.send(&wanted).await {
            Ok(()) => {
                if !meta.events_delivered(name, lease, &pending, wanted.len() as u64, self.now()).await? {
                    self.lease_lost = true;
                    // The lease ran out during the send: the replica holding it now sends them again.
                    tracing::warn!(
                        endpoint = name,
                        "lost the events lease while sending; the new holder resends"
                    );
                }
                self.registry.metrics().events_delivered(name, wanted.len());
                Ok(Round::Progress { full })
            }
            Err(error) => {
                let now = self.now();
                let failures = self.failed(wanted.len(), &error, now).await?;
                let oldest = wanted.iter().map(|e| e.at).min().unwrap_or(now);
                let max_age = i64::try_from(self.endpoint.max_age.as_millis()).unwrap_or(i64::MAX);
                if failures >= i64::from(self.endpoint.max_attempts) || now.saturating_sub(oldest) > max_age {
                    let ids: Vec<i64> = wanted.iter().map(|e| e.id).collect();
                    self.lease_lost =
                        !meta.events_dead(name, lease, &pending, &ids, failures, &error, now).await?;
                    if !self.lease_lost {
                        tracing::error!(
                            endpoint = name,
                            events = ids.len(),
                            failures,
                            error,
                            "events given up on: they are dead letters now (berth events status; berth events replay)"
                        );
                    }
                    return Ok(Round::Progress { full: true });
                }
                tracing::warn!(
                    endpoint = name,
                    events = wanted.len(),
                    failures,
                    error,
                    "events not accepted; will retry"
                );
                Ok(Round::PausedUntil(now.saturating_add(self.backoff_ms(failures))))
            }
        }
    }

    /// Posts `events` to the endpoint; `Err` says why it did not accept them.
    async fn send(&self, events: &[StoredEvent]) -> Result<(), String> {
        let endpoint = &self.endpoint;
        let (content_type, body) = render(endpoint.format, events, &self.source);
        let mut request = self
            .client
            .post(&endpoint.url)
            .timeout(endpoint.timeout)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::USER_AGENT, concat!("berth/", env!("CARGO_PKG_VERSION")))
            .header("berth-replica", self.source.instance.as_str())
            .body(body);
        for (name, value) in &endpoint.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request.send().await.map_err(|e| format!("{}: {e}", endpoint.url))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        Err(format!("{} answered {status}: {text}", endpoint.url))
    }
}

/// `events` (each stream's in order) interleaved by time, each stream keeping its order.
fn in_delivery_order(events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let mut streams: std::collections::BTreeMap<String, std::collections::VecDeque<StoredEvent>> =
        std::collections::BTreeMap::new();
    for e in events {
        streams.entry(e.stream.clone()).or_default().push_back(e);
    }
    let mut out = Vec::new();
    loop {
        let next = streams.iter().filter_map(|(s, q)| q.front().map(|e| (e.at, e.id, s.clone()))).min();
        let Some((_, _, stream)) = next else { break };
        if let Some(e) = streams.get_mut(&stream).and_then(std::collections::VecDeque::pop_front) {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, stream: &str, seq: i64, at: i64) -> StoredEvent {
        StoredEvent {
            id,
            stream: stream.into(),
            seq,
            at,
            kind: "tag.set".into(),
            repository: Some(stream.into()),
            digest: None,
            media_type: None,
            size: None,
            tag: None,
            old_digest: None,
            actor: None,
            request: None,
            detail: None,
        }
    }

    #[test]
    fn delivery_order_keeps_each_stream_in_sequence() {
        // Stream a's second event happened (by the clock) before its first committed.
        let events =
            vec![event(1, "a", 1, 30), event(2, "a", 2, 10), event(3, "b", 1, 20), event(4, "b", 2, 40)];
        let order: Vec<(String, i64)> =
            in_delivery_order(events).into_iter().map(|e| (e.stream, e.seq)).collect();
        let a: Vec<i64> = order.iter().filter(|(s, _)| s == "a").map(|(_, q)| *q).collect();
        let b: Vec<i64> = order.iter().filter(|(s, _)| s == "b").map(|(_, q)| *q).collect();
        assert_eq!(a, [1, 2]);
        assert_eq!(b, [1, 2]);
        assert_eq!(order[0], ("b".to_string(), 1));
    }
}
