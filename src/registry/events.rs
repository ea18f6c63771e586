//! The events faces' operations: where each endpoint's delivery stands, replays, dead letters,
//! and the pruning of delivered events (docs/events.md).

use serde::Serialize;

use super::{Error, Registry, Result};
use crate::meta::{DeadLetter, EndpointState, ReplaySelection, StoredEvent};

/// One endpoint's delivery, as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// The endpoint's name.
    pub name: String,
    /// Where it delivers.
    pub url: String,
    /// `cloudevents` or `distribution`.
    pub format: &'static str,
    /// Seconds since the oldest undelivered event happened (0: nothing waiting).
    pub lag_seconds: i64,
    /// The store's figures.
    #[serde(flatten)]
    pub state: EndpointState,
}

/// How many events a prune step removes at most.
const PRUNE_BATCH: i64 = 5_000;

impl Registry {
    /// Where every configured endpoint's delivery stands.
    ///
    /// # Errors
    /// [`Error::Internal`] when the metadata store fails.
    pub async fn events_status(&self) -> Result<Vec<EndpointStatus>> {
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        for e in &self.events.endpoints {
            let state = self.meta.endpoint_state(&e.name).await?;
            out.push(EndpointStatus {
                name: e.name.clone(),
                url: e.url.clone(),
                format: match e.format {
                    crate::events::Format::CloudEvents => "cloudevents",
                    crate::events::Format::Distribution => "distribution",
                },
                lag_seconds: state.oldest_pending_at.map_or(0, |at| (now - at).max(0) / 1000),
                state,
            });
        }
        Ok(out)
    }

    fn endpoint(&self, name: &str) -> Result<&crate::events::EndpointConfig> {
        self.events.endpoints.iter().find(|e| e.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.events.endpoints.iter().map(|e| e.name.as_str()).collect();
            Error::NotFound(format!(
                "no events endpoint `{name}` is configured (configured: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })
    }

    /// Queues events for delivery again to endpoint `name` (those its filters take); returns
    /// how many were queued.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an endpoint not configured; [`Error::Internal`].
    pub async fn replay_events(&self, name: &str, selection: ReplaySelection) -> Result<u64> {
        self.endpoint(name)?;
        let queued = self.meta.replay_events(name, selection, self.clock.now_ms()).await?;
        tracing::info!(endpoint = name, ?selection, queued, "events queued for delivery again");
        Ok(queued)
    }

    /// Endpoint `name`'s dead letters, newest first (at most `limit`).
    ///
    /// # Errors
    /// [`Error::NotFound`] for an endpoint not configured; [`Error::Internal`].
    pub async fn dead_letters(&self, name: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        self.endpoint(name)?;
        Ok(self.meta.dead_letters(name, limit).await?)
    }

    /// The events written after id `after`, in id order (at most `limit`).
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<StoredEvent>> {
        Ok(self.meta.events_after(after, limit).await?)
    }

    /// Removes events older than `events.retain` that every endpoint a replica was configured
    /// with within that window is done with; returns how many went. Run by the collector's sweep.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn prune_events(&self) -> Result<u64> {
        let retain = i64::try_from(self.events.retain.as_millis()).unwrap_or(i64::MAX);
        let before = self.clock.now_ms().saturating_sub(retain);
        let mut pruned = 0;
        // A bounded number of batches a step: the sweep comes back.
        for _ in 0..20 {
            let n = self.meta.prune_events(before, PRUNE_BATCH).await?;
            pruned += n;
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(pruned)
    }
}
