//! Events: what changed in the registry, delivered to webhooks exactly as committed
//! (docs/events.md).
//!
//! The metadata store writes an event in the transaction of each change ([`crate::meta::NewEvent`]);
//! here are the kinds, the request a change came from, the endpoints' configuration, the two
//! wire formats ([`format`]) and the delivery ([`deliver`]): one replica at a time per endpoint
//! (a lease), each stream in order, at least once, retried with backoff, then dead-lettered.

pub mod deliver;
pub mod format;

use std::time::Duration;

use crate::auth::Pattern;

/// Every kind of event, as configuration and payloads name them.
pub const KINDS: &[&str] = &[
    MANIFEST_PUSHED,
    MANIFEST_DELETED,
    MANIFEST_RESTORED,
    MANIFEST_PURGED,
    MANIFEST_COLLECTED,
    MANIFEST_PULLED,
    TAG_SET,
    TAG_DELETED,
    TAG_RESTORED,
    TAG_REVERTED,
    TAG_UNLOCKED,
    REPOSITORY_DELETED,
    REPOSITORY_RESTORED,
    BLOB_DELETED,
    BLOB_PURGED,
    BLOB_COLLECTED,
    QUOTA_WARNED,
    QUOTA_REFUSED,
];

/// A manifest was pushed (every acknowledged `PUT`, and each manifest an import or a cache fill
/// records).
pub const MANIFEST_PUSHED: &str = "manifest.pushed";
/// A manifest was deleted (a tombstone: restorable within the window).
pub const MANIFEST_DELETED: &str = "manifest.deleted";
/// A deleted manifest was restored.
pub const MANIFEST_RESTORED: &str = "manifest.restored";
/// A deleted manifest was purged (no longer restorable).
pub const MANIFEST_PURGED: &str = "manifest.purged";
/// The collector removed a manifest.
pub const MANIFEST_COLLECTED: &str = "manifest.collected";
/// Manifests were pulled (`events.pulls = true`; one event per manifest and access flush).
pub const MANIFEST_PULLED: &str = "manifest.pulled";
/// A tag was created or moved (`old_digest` says from where).
pub const TAG_SET: &str = "tag.set";
/// A tag was deleted (by a client, a manifest or repository delete, or retention).
pub const TAG_DELETED: &str = "tag.deleted";
/// A deleted tag was restored.
pub const TAG_RESTORED: &str = "tag.restored";
/// A tag was reverted to an earlier digest.
pub const TAG_REVERTED: &str = "tag.reverted";
/// An administrator lifted a tag's immutability for one change.
pub const TAG_UNLOCKED: &str = "tag.unlocked";
/// A repository was deleted.
pub const REPOSITORY_DELETED: &str = "repository.deleted";
/// A deleted repository was restored.
pub const REPOSITORY_RESTORED: &str = "repository.restored";
/// A blob was deleted from a repository (its link removed).
pub const BLOB_DELETED: &str = "blob.deleted";
/// A blob was purged from the whole registry by an administrator.
pub const BLOB_PURGED: &str = "blob.purged";
/// The collector removed a blob; `size` is the bytes freed.
pub const BLOB_COLLECTED: &str = "blob.collected";
/// A quota's scope went past its rule's `warn_at` (`size`: the bytes it holds now).
pub const QUOTA_WARNED: &str = "quota.warned";
/// A change was refused because it would take a quota's scope past a limit (`size`: what it
/// would have added).
pub const QUOTA_REFUSED: &str = "quota.refused";

/// The request a change came from, as events report it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RequestInfo {
    /// The request id (the client's `X-Request-Id`, or one Berth made; answered in the same
    /// header).
    pub id: String,
    /// The client's address.
    pub addr: String,
    /// The `Host` the client asked.
    pub host: String,
    /// The HTTP method.
    pub method: String,
    /// The client's `User-Agent`.
    pub useragent: String,
    /// The replica that served it.
    pub instance: String,
}

impl RequestInfo {
    /// As stored with the event.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

tokio::task_local! {
    static REQUEST: RequestInfo;
}

/// Runs `f` as the handling of request `info`: the events its changes write name it.
pub async fn with_request<F: std::future::Future>(info: RequestInfo, f: F) -> F::Output {
    REQUEST.scope(info, f).await
}

/// The request being handled on this task, if any.
pub fn current_request() -> Option<RequestInfo> {
    REQUEST.try_with(Clone::clone).ok()
}

/// Woken when a transaction of this process that wrote events commits.
pub(crate) static WRITTEN: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The `[events]` section.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// How long events are kept (once every endpoint is done with them).
    pub retain: Duration,
    /// Whether pulls are events (`manifest.pulled`, written with the batched pull times).
    pub pulls: bool,
    /// The registry's URL as clients know it, for payloads' `url`s and CloudEvents' `source`.
    pub registry_url: Option<String>,
    /// Where events are delivered.
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retain: Duration::from_secs(7 * 24 * 3600),
            pulls: false,
            registry_url: None,
            endpoints: Vec::new(),
        }
    }
}

/// The wire format of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// CloudEvents 1.0, JSON: structured mode for one event, batched mode for several.
    CloudEvents,
    /// The reference registry's notification envelope.
    Distribution,
}

/// One `[[events.endpoints]]`.
#[derive(Clone)]
pub struct EndpointConfig {
    /// Its name (in status, metrics, replays).
    pub name: String,
    /// Where events are `POST`ed.
    pub url: String,
    /// Headers sent with every request (`Authorization`, …); never logged.
    pub headers: Vec<(String, String)>,
    /// Kinds delivered (`tag.*` matches every tag kind); empty: the format's default.
    pub kinds: Vec<String>,
    /// Repositories whose events are delivered; empty: all (registry-wide blob events too).
    pub repositories: Vec<Pattern>,
    /// The wire format.
    pub format: Format,
    /// How long one request may take.
    pub timeout: Duration,
    /// The most events one request carries.
    pub batch: usize,
    /// The pause after the first failure (doubled after each, up to `max_backoff`).
    pub backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// Attempts before events become dead letters.
    pub max_attempts: u32,
    /// Events older than this are given up on at their next failure.
    pub max_age: Duration,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("kinds", &self.kinds)
            .field("repositories", &self.repositories)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .field("batch", &self.batch)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_attempts", &self.max_attempts)
            .field("max_age", &self.max_age)
            .finish()
    }
}

/// The kinds the `distribution` format delivers unless `kinds` says otherwise: the reference
/// registry's actions (push, pull, delete).
pub const DISTRIBUTION_KINDS: &[&str] =
    &[MANIFEST_PUSHED, MANIFEST_DELETED, TAG_DELETED, BLOB_DELETED, MANIFEST_PULLED];

impl EndpointConfig {
    /// Whether an event of `kind` in `repository` goes to this endpoint.
    pub fn wants(&self, kind: &str, repository: Option<&str>) -> bool {
        let kind_ok = if self.kinds.is_empty() {
            self.format == Format::CloudEvents || DISTRIBUTION_KINDS.contains(&kind)
        } else {
            self.kinds.iter().any(|k| kind_matches(k, kind))
        };
        let repo_ok = self.repositories.is_empty()
            || repository.is_some_and(|r| self.repositories.iter().any(|p| p.matches(r)));
        kind_ok && repo_ok
    }
}

/// Whether filter `filter` (a kind, `PREFIX.*`, or `*`) matches `kind`.
pub fn kind_matches(filter: &str, kind: &str) -> bool {
    filter == "*"
        || filter == kind
        || filter.strip_suffix(".*").is_some_and(|p| kind.strip_prefix(p).is_some_and(|r| r.starts_with('.')))
}

/// Whether `filter` can match any kind (configuration checks it).
pub fn kind_filter_valid(filter: &str) -> bool {
    KINDS.iter().any(|k| kind_matches(filter, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_filters_match_kinds_and_families() {
        assert!(kind_matches("tag.*", TAG_SET));
        assert!(kind_matches("*", BLOB_COLLECTED));
        assert!(kind_matches("manifest.pushed", MANIFEST_PUSHED));
        assert!(!kind_matches("tag.*", MANIFEST_PUSHED));
        assert!(!kind_matches("ta.*", TAG_SET));
        assert!(kind_filter_valid("blob.*"));
        assert!(!kind_filter_valid("blobs.*"));
        assert!(!kind_filter_valid("manifest.push"));
    }
}
