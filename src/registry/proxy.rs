//! Pull-through caches: repositories `PREFIX/NAME` served from an upstream registry's `NAME`.
//!
//! Cached content is ordinary content, recorded through the push path: a fetched blob goes
//! through an upload session (bytes under a fresh key, digest checked, then linked in one
//! transaction), a fetched manifest through `put_manifest` (every reference checked under its
//! locks). A manifest is therefore recorded only once every blob it references is linked in its
//! repository — until then it is *pending* (`proxy_pending`) and served from there, so no cached
//! manifest ever names a blob that is not here, and fsck, the collector, explain and the space
//! figures see cached content as what it is. Indexes are recorded at once (a cache's
//! repositories take sparse indexes: a client pulls the platforms it wants).
//!
//! Eviction is a delete whose tombstones are at once unrestorable and due: the collector takes
//! the bytes with its usual windows, and a blob that anything else references stays.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Error, Registry, Result};
use crate::config::ProxyConfig;
use crate::meta::{ManifestRow, TagCondition};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::upstream::{DEFAULT_ACCEPT, Upstream, UpstreamError};

/// A stream of a blob's bytes to a client.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// How long, in all, a fill may wait for its first client to take chunks once the client's
/// buffer is full. Past it the client is cut off (its body ends short, so it cannot be taken for
/// success) and the fill goes on at the upstream's speed for the others: a slow reader never
/// paces a fetch others wait on for longer than this.
const CLIENT_STALL: Duration = Duration::from_secs(30);

/// Chunks buffered between a fill and its first client (a few MiB: bounded memory, room for a
/// client a little slower than the upstream).
const CLIENT_BUFFER: usize = 256;

/// One pull-through cache.
pub struct Cache {
    /// Its configuration.
    pub config: ProxyConfig,
    upstream: Upstream,
    /// Fills in flight in this process, by `REPO@DIGEST`: their outcome once known.
    fills: Mutex<HashMap<String, watch::Receiver<Option<FillEnd>>>>,
    /// The last eviction pass here.
    last_eviction: Mutex<Option<EvictionReport>>,
    /// Pending manifests being completed in this process, by `REPO@DIGEST`.
    completing: Mutex<std::collections::HashSet<String>>,
}

/// Frees a completion's entry however its task ends.
struct Completing {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for Completing {
    fn drop(&mut self) {
        self.cache.completing.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The pull-through caches of a registry.
#[derive(Debug, Default)]
pub struct Caches {
    list: Vec<Arc<Cache>>,
}

/// What an eviction pass did for one cache.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EvictionReport {
    /// The cache (its prefix).
    pub proxy: String,
    /// When it ran (Unix ms).
    pub at: i64,
    /// The cache's bytes before.
    pub bytes_before: i64,
    /// The cache's bytes after (the collector frees the storage with its usual windows).
    pub bytes_after: i64,
    /// `REPO@DIGEST` of every manifest evicted.
    pub evicted: Vec<String>,
    /// Candidates left alone (pulled meanwhile, pinned, listed), with the reason.
    pub kept: Vec<String>,
}

/// Where a cache stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStatus {
    /// Its prefix.
    pub prefix: String,
    /// Its upstream.
    pub upstream: String,
    /// Whether it serves names with no known prefix.
    pub default: bool,
    /// How long a tag's resolution is trusted, in seconds.
    pub tag_ttl_secs: u64,
    /// The bytes it holds.
    pub bytes: i64,
    /// Its cap, if any.
    pub max_bytes: Option<u64>,
    /// Eviction of what was not pulled for this long, in seconds.
    pub evict_not_pulled_within_secs: Option<u64>,
    /// Answers by result, in this process: hit, miss, revalidated, stale, error.
    pub requests: HashMap<&'static str, u64>,
    /// Hits (and revalidations) among answers that were not errors, in this process.
    pub hit_ratio: Option<f64>,
    /// Bytes read from the upstream, in this process.
    pub upstream_bytes: u64,
    /// The last eviction pass in this process.
    pub last_eviction: Option<EvictionReport>,
}

/// Which results `CacheStatus::requests` counts.
pub(super) const RESULTS: [&str; 5] = ["hit", "miss", "revalidated", "stale", "error"];

impl Caches {
    /// The caches configured.
    ///
    /// # Errors
    /// When an upstream client cannot be built (an unreadable CA file).
    pub fn new(configs: &[ProxyConfig]) -> anyhow::Result<Self> {
        let list = configs
            .iter()
            .map(|c| {
                Ok(Arc::new(Cache {
                    config: c.clone(),
                    upstream: Upstream::new(c)?,
                    fills: Mutex::default(),
                    last_eviction: Mutex::default(),
                    completing: Mutex::default(),
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Caches { list })
    }

    /// Whether any cache is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The caches.
    pub fn all(&self) -> &[Arc<Cache>] {
        &self.list
    }

    /// The cache serving `repo`, with the upstream's name for it.
    pub fn of(&self, repo: &RepoName) -> Option<(&Arc<Cache>, String)> {
        self.list.iter().find_map(|c| {
            let rest = repo.as_str().strip_prefix(&c.config.prefix)?.strip_prefix('/')?;
            Some((c, rest.to_string()))
        })
    }
}

/// Whether an upstream failure is one a stale copy may stand in for.
fn transient(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Failed(_) | UpstreamError::RateLimited(_))
}

/// A domain error for an upstream failure on a read of `what`.
fn upstream_error(cache: &Cache, e: UpstreamError, blob: bool) -> Error {
    match e {
        UpstreamError::NotFound if blob => Error::BlobUnknown,
        UpstreamError::NotFound => Error::ManifestUnknown,
        // What the upstream will not show us does not exist for our clients (registries answer
        // 401 for a repository that is absent as for one that is private); the log says why.
        UpstreamError::Refused(m) => {
            tracing::warn!(proxy = cache.config.prefix, upstream = cache.config.upstream, error = %m, "the upstream refused access");
            if blob { Error::BlobUnknown } else { Error::ManifestUnknown }
        }
        e => Error::Upstream {
            rate_limited: matches!(e, UpstreamError::RateLimited(_)),
            message: format!(
                "upstream {} of proxy `{}` failed: {e}",
                cache.config.upstream, cache.config.prefix
            ),
        },
    }
}

impl Registry {
    /// The cache `repo` belongs to and the upstream's name for it.
    pub fn cache_of(&self, repo: &RepoName) -> Option<(Arc<Cache>, String)> {
        self.caches.of(repo).map(|(c, up)| (c.clone(), up))
    }

    /// The pull-through caches.
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Refuses writes into a cache's repositories: only its upstream fills them.
    ///
    /// # Errors
    /// [`Error::ReadOnlyCache`].
    pub fn refuse_cached(&self, repo: &RepoName) -> Result<()> {
        match self.caches.of(repo) {
            Some((cache, _)) => Err(Error::ReadOnlyCache(format!(
                "repository {repo} is a pull-through cache of {} (proxy `{}`): it is read-only",
                cache.config.upstream, cache.config.prefix
            ))),
            None => Ok(()),
        }
    }

    /// The local name a mirror request for `repo` is served under, when it is not the name
    /// itself: with containerd's `?ns=HOST`, the cache whose upstream is `HOST`; otherwise the
    /// default cache's, for a name under no cache's prefix that is no local repository.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the prefixed name is too long; [`Error::Internal`].
    pub async fn mirror_name(&self, repo: &RepoName, ns: Option<&str>) -> Result<Option<RepoName>> {
        if self.caches.is_empty() || self.caches.of(repo).is_some() {
            return Ok(None);
        }
        let cache = match ns {
            Some(ns) => self.caches.all().iter().find(|c| same_host(c.config.upstream_host(), ns)),
            None => match self.caches.all().iter().find(|c| c.config.default) {
                // A local name, even deleted, never falls through to the upstream.
                Some(c) if !self.meta.repository_known(repo).await? => Some(c),
                _ => None,
            },
        };
        let Some(cache) = cache else { return Ok(None) };
        let name = format!("{}/{repo}", cache.config.prefix);
        RepoName::parse(&name).map(Some).map_err(|e| Error::Invalid(format!("{name}: {e}")))
    }

    /// Manifest `reference` of cached repository `repo`: from the cache when it may answer,
    /// else from the upstream (recorded on the way).
    #[expect(clippy::too_many_arguments, reason = "a cached read: the cache, the names, the request")]
    pub(super) async fn cached_manifest(
        &self,
        cache: &Arc<Cache>,
        upstream_repo: &str,
        repo: &RepoName,
        reference: &Reference,
        accept: Option<&str>,
        head: bool,
        puller: Option<&str>,
    ) -> Result<ManifestRow> {
        let prefix = cache.config.prefix.as_str();
        let accept = upstream_accept(accept);
        let accept = accept.as_str();
        let now = self.clock.now_ms();
        let tag = match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.local_cached(repo, d.as_str(), puller).await? {
                    self.metrics.proxy_request(prefix, "hit");
                    return Ok(m);
                }
                let fetched =
                    self.fetch_manifest(cache, upstream_repo, repo, reference, accept, None, !head).await;
                self.metrics.proxy_request(prefix, if fetched.is_ok() { "miss" } else { "error" });
                return fetched;
            }
            Reference::Tag(tag) => tag,
        };
        let ttl = i64::try_from(cache.config.tag_ttl.as_millis()).unwrap_or(i64::MAX);
        let known = self.meta.proxy_tag(repo, tag.as_str()).await?;
        let cached = match &known {
            Some(k) => self.local_cached(repo, &k.digest, puller).await?,
            None => None,
        };
        if let (Some(k), Some(m)) = (&known, &cached) {
            if now.saturating_sub(k.checked_at) < ttl {
                self.metrics.proxy_request(prefix, "hit");
                return Ok(m.clone());
            }
            // Revalidate: a HEAD is cheap (Docker Hub does not count it as a pull).
            match cache.upstream.manifest(upstream_repo, tag.as_str(), accept, true).await {
                Ok(head) if head.digest.as_deref() == Some(k.digest.as_str()) => {
                    self.meta.touch_proxy_tag(repo, tag.as_str(), &k.digest, now).await?;
                    self.metrics.proxy_request(prefix, "revalidated");
                    return Ok(m.clone());
                }
                Ok(_) => {}
                Err(UpstreamError::NotFound) => {
                    self.meta.drop_proxy_tag(repo, tag.as_str()).await?;
                    self.metrics.proxy_request(prefix, "error");
                    return Err(Error::ManifestUnknown);
                }
                Err(e) if transient(&e) => {
                    tracing::warn!(proxy = prefix, %repo, %tag, error = %e, "upstream failed; serving the cached manifest");
                    self.metrics.proxy_request(prefix, "stale");
                    return Ok(m.clone());
                }
                Err(e) => {
                    self.metrics.proxy_request(prefix, "error");
                    return Err(upstream_error(cache, e, false));
                }
            }
        }
        match self.fetch_manifest(cache, upstream_repo, repo, reference, accept, Some(tag), !head).await {
            Ok(m) => {
                self.metrics.proxy_request(prefix, "miss");
                Ok(m)
            }
            Err(Error::Upstream { message, .. }) if cached.is_some() => {
                tracing::warn!(proxy = prefix, %repo, %tag, error = %message, "upstream failed; serving the cached manifest");
                self.metrics.proxy_request(prefix, "stale");
                Ok(cached.unwrap_or_else(|| unreachable!()))
            }
            Err(e) => {
                if matches!(e, Error::ManifestUnknown) {
                    self.meta.drop_proxy_tag(repo, tag.as_str()).await?;
                }
                self.metrics.proxy_request(prefix, "error");
                Err(e)
            }
        }
    }

    /// Manifest `digest` of cached repository `repo` as recorded, or as fetched and pending.
    async fn local_cached(
        &self,
        repo: &RepoName,
        digest: &str,
        puller: Option<&str>,
    ) -> Result<Option<ManifestRow>> {
        let Ok(d) = Digest::parse(digest) else { return Ok(None) };
        if let Some(row) = self.meta.manifest(repo, &Reference::Digest(d)).await? {
            self.pulled(row.id, puller);
            return Ok(Some(row));
        }
        Ok(self.meta.pending_manifest(repo, digest).await?.map(|p| ManifestRow {
            id: 0,
            digest: p.digest,
            media_type: p.media_type,
            payload: p.payload,
        }))
    }

    /// Fetches manifest `reference` from the upstream, checks it against its digest, and
    /// records it (or keeps it pending); `tag` is the tag it was asked by.
    #[expect(clippy::too_many_arguments, reason = "a cached read: the cache, the names, the request")]
    async fn fetch_manifest(
        &self,
        cache: &Arc<Cache>,
        upstream_repo: &str,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
        tag: Option<&Tag>,
        complete: bool,
    ) -> Result<ManifestRow> {
        let reference_text = match reference {
            Reference::Digest(d) => d.to_string(),
            Reference::Tag(t) => t.to_string(),
        };
        // Of two fetches of a tag at once, the one asked later decides its resolution.
        let asked_at = self.clock.now_ms();
        let fetched = cache
            .upstream
            .manifest(upstream_repo, &reference_text, accept, false)
            .await
            .map_err(|e| upstream_error(cache, e, false))?;
        let bytes = fetched.bytes.unwrap_or_default();
        let digest = match reference {
            Reference::Digest(expected) => expected.same_algorithm_of(&bytes),
            Reference::Tag(_) => match fetched.digest.as_deref().map(Digest::parse) {
                Some(Ok(named)) => named.same_algorithm_of(&bytes),
                _ => Digest::sha256_of(&bytes),
            },
        };
        let named = match reference {
            Reference::Digest(d) => Some(d.to_string()),
            Reference::Tag(_) => fetched.digest.clone(),
        };
        if let Some(named) = named
            && named != digest.as_str()
        {
            return Err(Error::Upstream {
                rate_limited: false,
                message: format!(
                    "upstream {} of proxy `{}` served a manifest whose digest is {digest}, not {named}; nothing was stored",
                    cache.config.upstream, cache.config.prefix
                ),
            });
        }
        let media_type = if fetched.media_type.is_empty() || fetched.media_type == "application/octet-stream"
        {
            crate::oci::manifest::parse(&bytes, None).map(|p| p.media_type).unwrap_or_default()
        } else {
            fetched.media_type
        };
        let now = self.clock.now_ms();
        if let Some(tag) = tag {
            self.meta.set_proxy_tag(repo, tag.as_str(), digest.as_str(), asked_at).await?;
        }
        let id =
            self.record_cached_manifest(cache, repo, &digest, &media_type, &bytes, now, complete).await?;
        Ok(ManifestRow { id, digest: digest.to_string(), media_type, payload: bytes.to_vec() })
    }

    /// Records a fetched manifest through the push path with the cached tags naming it, when
    /// everything it references is here; otherwise keeps it pending. Returns its row id (0
    /// when pending or not recordable).
    #[expect(clippy::too_many_arguments, reason = "a fetched manifest and how it came")]
    async fn record_cached_manifest(
        &self,
        cache: &Arc<Cache>,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
        now: i64,
        complete: bool,
    ) -> Result<i64> {
        let tags: Vec<Tag> = self
            .meta
            .proxy_tags_naming(repo, digest.as_str())
            .await?
            .iter()
            .filter_map(|t| Tag::parse(t).ok())
            .collect();
        let actor = format!("proxy:{}", cache.config.prefix);
        let recorded = self
            .record_manifest(
                repo,
                &Reference::Digest(digest.clone()),
                Some(media_type),
                bytes,
                &tags,
                TagCondition::IfCacheResolves,
                Some(&actor),
            )
            .await;
        match recorded {
            Ok(_) => {
                self.meta.drop_pending_manifest(repo, digest.as_str()).await?;
                let row = self.meta.manifest_head(repo, &Reference::Digest(digest.clone())).await?;
                Ok(row.map_or(0, |r| r.id))
            }
            Err(Error::ManifestBlobUnknown(_)) => {
                self.meta.add_pending_manifest(repo, digest.as_str(), media_type, bytes, now).await?;
                let blobs =
                    crate::oci::manifest::parse(bytes, Some(media_type)).map(|p| p.blobs).unwrap_or_default();
                if complete {
                    self.complete_later(cache, repo, digest, blobs);
                }
                Ok(0)
            }
            Err(e) => {
                // Served as fetched, not kept (a manifest Berth does not take, an immutable
                // tag): the next request asks the upstream again.
                tracing::warn!(proxy = cache.config.prefix, %repo, %digest, error = %e, "fetched manifest not recorded");
                Ok(0)
            }
        }
    }

    /// Records the pending manifests of `repo` whose blobs are all linked now.
    async fn record_completed(&self, cache: &Arc<Cache>, repo: &RepoName) -> Result<()> {
        for pending in self.meta.pending_manifests(repo).await? {
            let Ok(parsed) = crate::oci::manifest::parse(&pending.payload, Some(&pending.media_type)) else {
                continue;
            };
            let mut complete = true;
            for blob in &parsed.blobs {
                if self.meta.linked_blob(repo, blob).await?.is_none() {
                    complete = false;
                    break;
                }
            }
            if complete && let Ok(digest) = Digest::parse(&pending.digest) {
                let now = self.clock.now_ms();
                self.record_cached_manifest(
                    cache,
                    repo,
                    &digest,
                    &pending.media_type,
                    &pending.payload,
                    now,
                    false,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Blob `digest` of cached repository `repo`, not linked here: its size from the upstream
    /// (a `HEAD`), or its bytes — fetched once however many ask at a time, streamed to the
    /// first asker while they are stored, and to the others from storage once recorded.
    pub(super) async fn cached_blob(
        &self,
        cache: &Arc<Cache>,
        upstream_repo: &str,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
    ) -> Result<super::pull::BlobHandle> {
        let prefix = cache.config.prefix.as_str();
        if head {
            let size = cache.upstream.blob_size(upstream_repo, digest.as_str()).await.map_err(|e| {
                self.metrics.proxy_request(prefix, "error");
                upstream_error(cache, e, true)
            })?;
            return Ok(super::pull::BlobHandle::upstream(digest.clone(), size, repo.clone()));
        }
        let key = format!("{repo}@{digest}");
        let joined = {
            let mut fills = cache.fills.lock().unwrap_or_else(|p| p.into_inner());
            match fills.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    fills.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        let done = match joined {
            Err(rx) => {
                // Another request is fetching it: wait for its outcome, then read what it stored.
                wait_for_fill(rx, digest).await?;
                self.metrics.proxy_request(prefix, "hit");
                return self.stored_blob(repo, digest).await;
            }
            Ok(tx) => tx,
        };
        // From here the fill's task owns the slot (freed when the task ends, however it ends),
        // so this request going away changes nothing for those who wait on it.
        let outcome = done.subscribe();
        let (started_tx, started_rx) = oneshot::channel();
        let fill = Fill {
            registry: self.clone(),
            cache: cache.clone(),
            upstream_repo: upstream_repo.to_string(),
            repo: repo.clone(),
            digest: digest.clone(),
            key,
            done,
        };
        tokio::spawn(fill.run(started_tx));
        match started_rx.await {
            Ok(Started::Streaming { length, body }) => {
                let stream: ByteStream = Box::pin(receiver_stream(body));
                Ok(super::pull::BlobHandle::filling(digest.clone(), length, repo.clone(), stream, outcome))
            }
            // Here already, or no length to announce: answer from storage once it is stored.
            Ok(Started::FromStorage) => {
                wait_for_fill(outcome, digest).await?;
                self.stored_blob(repo, digest).await
            }
            Ok(Started::Failed(end)) => Err(end.into_error(digest)),
            Err(_) => Err(FillEnd::Failed(format!("the fetch of {digest} stopped")).into_error(digest)),
        }
    }

    /// Makes blob `digest` of cached repository `repo` here: linked from another repository of
    /// the same cache when one holds it (content of the same upstream; never a repository
    /// outside the cache, whose content the upstream may not be entitled to), else fetched.
    async fn complete_blob(
        &self,
        cache: &Arc<Cache>,
        upstream_repo: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<()> {
        if self.meta.linked_blob(repo, digest).await?.is_some() {
            return Ok(());
        }
        let under = format!("{}/", cache.config.prefix);
        let holders: Vec<String> =
            self.repositories_holding(digest).await?.into_iter().filter(|h| h.starts_with(&under)).collect();
        // Linked only if the upstream serves it in this repository too: its access rules, not
        // another cached repository's, decide who may read it.
        if !holders.is_empty() && cache.upstream.blob_size(upstream_repo, digest.as_str()).await.is_ok() {
            for holder in holders {
                if let Ok(from) = RepoName::parse(&holder)
                    && self.meta.mount_blob(&from, repo, digest, self.clock.now_ms()).await?
                {
                    return Ok(());
                }
            }
        }
        self.cached_blob(cache, upstream_repo, repo, digest, false).await?.settled().await
    }

    /// After `fill_missing_after`, makes the blobs of pending manifest `digest` that no client
    /// fetched meanwhile here (a client skips layers it has already), then records it: the
    /// cache holds whole images, not manifests waiting forever for a blob nobody asks for.
    fn complete_later(&self, cache: &Arc<Cache>, repo: &RepoName, digest: &Digest, blobs: Vec<Digest>) {
        let Some(after) = cache.config.fill_missing_after else { return };
        let Some((_, upstream_repo)) = self.caches.of(repo) else { return };
        let key = format!("{repo}@{digest}");
        // One completion per manifest at a time (20 cold pulls of one tag start one).
        if !cache.completing.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
            return;
        }
        let (registry, cache, repo, digest) = (self.clone(), cache.clone(), repo.clone(), digest.clone());
        tokio::spawn(async move {
            let _done = Completing { cache: cache.clone(), key };
            tokio::time::sleep(after).await;
            // Completed meanwhile, or the repository deleted: nothing to do.
            let pending =
                registry.meta.pending_manifest(&repo, digest.as_str()).await.ok().flatten().is_some();
            let deleted = registry.meta.repository_known(&repo).await.unwrap_or(true)
                && !registry.meta.repository_exists(&repo).await.unwrap_or(false);
            if !pending || deleted {
                return;
            }
            for blob in &blobs {
                if let Err(e) = registry.complete_blob(&cache, &upstream_repo, &repo, blob).await {
                    tracing::warn!(proxy = cache.config.prefix, %repo, %blob, error = %e, "could not complete a cached image");
                    return;
                }
            }
            if let Err(e) = registry.record_completed(&cache, &repo).await {
                tracing::warn!(proxy = cache.config.prefix, %repo, error = %e, "could not record a completed image");
            }
        });
    }

    /// Tags of cached repository `repo` as the upstream lists them (`query`: `n`, `last`),
    /// or as cached when the upstream fails.
    ///
    /// # Errors
    /// [`Error::Upstream`] when the upstream fails and nothing is cached.
    pub async fn cached_read(
        &self,
        repo: &RepoName,
        path: &str,
    ) -> Result<Option<(String, Bytes, Option<String>)>> {
        let Some((cache, upstream_repo)) = self.cache_of(repo) else { return Ok(None) };
        match cache.upstream.read(&upstream_repo, path).await {
            Ok((content_type, body, link)) => {
                // The upstream's pagination link names its repository; ours is the cache's.
                let link = link.map(|l| l.replace(&format!("/v2/{upstream_repo}/"), &format!("/v2/{repo}/")));
                Ok(Some((content_type, body, link)))
            }
            Err(UpstreamError::NotFound) => {
                Err(if path.starts_with("tags/") { Error::NameUnknown } else { Error::ManifestUnknown })
            }
            Err(e) => {
                tracing::warn!(proxy = cache.config.prefix, %repo, error = %e, "upstream failed; answering from the cache");
                self.metrics.proxy_request(&cache.config.prefix, "stale");
                Ok(None)
            }
        }
    }

    /// Evicts what each cache should no longer hold: manifests not pulled within its
    /// `evict_not_pulled_within`, then the least recently used until it is under `max_bytes`.
    ///
    /// # Errors
    /// [`Error::Internal`] when the metadata store fails.
    pub async fn evict_caches(&self) -> Result<Vec<EvictionReport>> {
        let mut reports = Vec::new();
        for cache in self.caches.all() {
            let report = self.evict(cache).await?;
            *cache.last_eviction.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
            reports.push(report);
        }
        Ok(reports)
    }

    async fn evict(&self, cache: &Cache) -> Result<EvictionReport> {
        const BATCH: i64 = 100;
        let prefix = cache.config.prefix.as_str();
        let now = self.clock.now_ms();
        let actor = format!("proxy:{prefix}");
        let mut report = EvictionReport {
            proxy: prefix.to_string(),
            at: now,
            bytes_before: self.meta.cache_bytes(prefix).await?,
            ..EvictionReport::default()
        };
        // Each pass pages through the candidates from the least recently used, past those it
        // must keep (pinned, listed, pulled meanwhile), so they never stall eviction. An evicted
        // index leaves its children as candidates of the next pass.
        if let Some(within) = cache.config.evict_not_pulled_within {
            let before = now.saturating_sub(i64::try_from(within.as_millis()).unwrap_or(i64::MAX));
            let mut after = None;
            'age: loop {
                let roots = self.meta.cached_roots(prefix, after, BATCH).await?;
                for root in &roots {
                    if root.last_used >= before {
                        break 'age;
                    }
                    after = Some((root.last_used, root.id));
                    self.evict_root(root, &actor, now, &mut report).await?;
                }
                if roots.len() < BATCH as usize {
                    break;
                }
            }
        }
        if let Some(max) = cache.config.max_bytes {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            let mut after = None;
            'space: while self.meta.cache_bytes(prefix).await? > max {
                let roots = self.meta.cached_roots(prefix, after, BATCH).await?;
                for root in &roots {
                    after = Some((root.last_used, root.id));
                    if self.evict_root(root, &actor, now, &mut report).await?
                        && self.meta.cache_bytes(prefix).await? <= max
                    {
                        break 'space;
                    }
                }
                if roots.len() < BATCH as usize {
                    break;
                }
            }
        }
        report.kept.sort();
        report.kept.dedup();
        // Pending manifests nobody completed, and tag resolutions of evicted images.
        let keep_ms =
            i64::try_from(cache.config.tag_ttl.as_millis()).unwrap_or(i64::MAX).max(24 * 3600 * 1000);
        self.meta.prune_proxy_rows(prefix, now.saturating_sub(keep_ms)).await?;
        report.bytes_after = self.meta.cache_bytes(prefix).await?;
        if !report.evicted.is_empty() {
            tracing::info!(
                proxy = prefix,
                evicted = report.evicted.len(),
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                "evicted from the pull-through cache"
            );
        }
        Ok(report)
    }

    /// Evicts one cached image, unless it was used since `root` was read (or is pinned,
    /// listed): then it is noted as kept.
    async fn evict_root(
        &self,
        root: &crate::meta::CachedRoot,
        actor: &str,
        now: i64,
        report: &mut EvictionReport,
    ) -> Result<bool> {
        let (Ok(repo), Ok(digest)) = (RepoName::parse(&root.repository), Digest::parse(&root.digest)) else {
            return Ok(false);
        };
        let item = format!("{}@{}", root.repository, root.digest);
        match self.meta.evict_manifest(&repo, &digest, Some(root.last_used), false, Some(actor), now).await {
            Ok(_) => {
                report.evicted.push(item);
                Ok(true)
            }
            Err(crate::meta::DeleteError::Refused(r)) => {
                report.kept.push(format!("{item}: {r}"));
                Ok(false)
            }
            Err(crate::meta::DeleteError::Meta(e)) => Err(e.into()),
        }
    }

    /// Where each cache stands.
    ///
    /// # Errors
    /// [`Error::Internal`] when the metadata store fails.
    pub async fn cache_status(&self) -> Result<Vec<CacheStatus>> {
        let mut out = Vec::new();
        for cache in self.caches.all() {
            let c = &cache.config;
            let bytes = self.meta.cache_bytes(&c.prefix).await?;
            self.metrics.set_proxy_bytes(&c.prefix, bytes);
            let requests: HashMap<&'static str, u64> =
                RESULTS.iter().map(|r| (*r, self.metrics.proxy_requests(&c.prefix, r))).collect();
            let hits = requests["hit"] + requests["revalidated"];
            let answered = hits + requests["miss"] + requests["stale"];
            out.push(CacheStatus {
                prefix: c.prefix.clone(),
                upstream: c.upstream.clone(),
                default: c.default,
                tag_ttl_secs: c.tag_ttl.as_secs(),
                bytes,
                max_bytes: c.max_bytes,
                evict_not_pulled_within_secs: c.evict_not_pulled_within.map(|d| d.as_secs()),
                hit_ratio: (answered > 0).then(|| hits as f64 / answered as f64),
                requests,
                upstream_bytes: self.metrics.proxy_upstream_total(&c.prefix),
                last_eviction: cache.last_eviction.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            });
        }
        Ok(out)
    }
}

/// What the upstream is asked for a manifest: every type the cache keeps, plus what the client
/// named. A tag's resolution is stored for every client, so it must not depend on one client's
/// list (an old client's would turn an index into one platform's manifest for all).
fn upstream_accept(client: Option<&str>) -> String {
    let mut types: Vec<&str> = DEFAULT_ACCEPT.split(',').map(str::trim).collect();
    for t in client.unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bare = t.split(';').next().unwrap_or("").trim();
        if !bare.is_empty() && bare != "*/*" && !types.contains(&bare) {
            types.push(bare);
        }
    }
    types.join(", ")
}

/// `docker.io` is what clients call Docker Hub; its registry answers at `registry-1.docker.io`.
fn same_host(upstream_host: &str, ns: &str) -> bool {
    let hub = |h: &str| matches!(h, "docker.io" | "registry-1.docker.io" | "index.docker.io");
    upstream_host.eq_ignore_ascii_case(ns) || (hub(upstream_host) && hub(ns))
}

/// How a fill ended, for the requests waiting on it.
#[derive(Debug, Clone)]
pub(super) enum FillEnd {
    /// Recorded: read it from storage.
    Stored,
    /// The upstream does not have it.
    NotFound,
    /// It failed; nothing was stored.
    Failed(String),
    /// The upstream is rate limiting; nothing was stored.
    RateLimited(String),
}

impl FillEnd {
    fn into_error(self, digest: &Digest) -> Error {
        match self {
            FillEnd::Stored => Error::Internal(format!("blob {digest} was stored, yet not found").into()),
            FillEnd::NotFound => Error::BlobUnknown,
            FillEnd::Failed(message) => Error::Upstream { rate_limited: false, message },
            FillEnd::RateLimited(message) => Error::Upstream { rate_limited: true, message },
        }
    }
}

/// Waits for a fill's end; `Ok` once the blob is stored.
pub(super) async fn wait_for_fill(mut rx: watch::Receiver<Option<FillEnd>>, digest: &Digest) -> Result<()> {
    match rx.wait_for(Option::is_some).await.map(|o| o.clone()).ok().flatten() {
        Some(FillEnd::Stored) => Ok(()),
        Some(end) => Err(end.into_error(digest)),
        None => Err(FillEnd::Failed(format!("the fetch of {digest} stopped")).into_error(digest)),
    }
}

/// What a fill tells the request that started it, once the upstream answered.
enum Started {
    /// The bytes as they arrive, `length` in all.
    Streaming { length: u64, body: mpsc::Receiver<std::io::Result<Bytes>> },
    /// Read it from storage once the fill is done (it was here already, or the upstream named
    /// no length to announce).
    FromStorage,
    /// The upstream failed; nothing was stored.
    Failed(FillEnd),
}

/// The sending end to a fill's first client, shared by the tee and the end of the fill, with
/// what is left of its stall budget; no sender once the client is gone or cut off (every sender
/// dropped, so its body ends short).
type ClientSlot = Arc<Mutex<(Option<mpsc::Sender<std::io::Result<Bytes>>>, Duration)>>;

/// Sends `item` to the client in `slot`; waits only while the stall budget lasts, then cuts the
/// client off (or when it is gone).
async fn send_to_client(slot: &ClientSlot, item: std::io::Result<Bytes>) {
    let (sender, budget) = {
        let s = slot.lock().unwrap_or_else(|p| p.into_inner());
        (s.0.clone(), s.1)
    };
    let Some(sender) = sender else { return };
    let item = match sender.try_send(item) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Full(item)) => item,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            slot.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
            return;
        }
    };
    let started = tokio::time::Instant::now();
    let sent = matches!(tokio::time::timeout(budget, sender.send(item)).await, Ok(Ok(())));
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    s.1 = s.1.saturating_sub(started.elapsed());
    if !sent || s.1.is_zero() {
        s.0 = None;
    }
}

fn receiver_stream(
    mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One blob fetch, in a task of its own: upstream → an upload session (hashed, checked, linked)
/// and → the first client, one chunk behind, so that the last chunk reaches the client only once
/// the blob is recorded: a body that fails its digest ends short and cannot be taken for success.
struct Fill {
    registry: Registry,
    cache: Arc<Cache>,
    upstream_repo: String,
    repo: RepoName,
    digest: Digest,
    key: String,
    done: watch::Sender<Option<FillEnd>>,
}

impl Drop for Fill {
    /// The fill is over (done, failed, or its task panicked): the next miss starts a new one.
    fn drop(&mut self) {
        self.cache.fills.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl Fill {
    async fn run(self, started: oneshot::Sender<Started>) {
        let prefix = self.cache.config.prefix.clone();
        let metrics = self.registry.metrics.clone();
        // Recorded since the request looked (a fill that just ended): nothing to fetch.
        if matches!(self.registry.meta.linked_blob(&self.repo, &self.digest).await, Ok(Some(_))) {
            let _ = self.done.send(Some(FillEnd::Stored));
            let _ = started.send(Started::FromStorage);
            return;
        }
        let upstream_blob = match self.cache.upstream.blob(&self.upstream_repo, self.digest.as_str()).await {
            Ok(b) => b,
            Err(e) => {
                metrics.proxy_request(&prefix, "error");
                let end = match upstream_error(&self.cache, e, true) {
                    Error::BlobUnknown => FillEnd::NotFound,
                    e @ Error::Upstream { rate_limited: true, .. } => FillEnd::RateLimited(e.to_string()),
                    e => FillEnd::Failed(e.to_string()),
                };
                let _ = self.done.send(Some(end.clone()));
                let _ = started.send(Started::Failed(end));
                return;
            }
        };
        metrics.proxy_request(&prefix, "miss");
        let length = upstream_blob.length;
        let client: ClientSlot = Arc::new(Mutex::new((None, CLIENT_STALL)));
        let start = match length {
            // An empty body is never polled: answer it from storage.
            Some(length) if length > 0 => {
                let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
                client.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(tx);
                Started::Streaming { length, body: rx }
            }
            _ => Started::FromStorage,
        };
        // The request may be gone: the fill goes on for the others and for the cache.
        let _ = started.send(start);
        let last: Arc<Mutex<Option<Bytes>>> = Arc::default();
        let (held, tee_client) = (last.clone(), client.clone());
        // A body of unannounced length is cut at the cache's cap: a blob larger than the whole
        // cache could not be kept (an announced length is held to by the HTTP client).
        let cap = if length.is_none() { self.cache.config.max_bytes } else { None };
        let tee = futures_util::stream::unfold(
            (Some(upstream_blob.body), None::<Bytes>, 0u64),
            move |(body, mut previous, mut read)| {
                let (held, client, metrics, prefix) =
                    (held.clone(), tee_client.clone(), metrics.clone(), prefix.clone());
                async move {
                    // After an error the stream ends (`body` is gone).
                    let mut body = body?;
                    match body.next().await {
                        Some(Ok(chunk)) => {
                            metrics.proxy_upstream_read(&prefix, chunk.len() as u64);
                            read += chunk.len() as u64;
                            if let Some(cap) = cap.filter(|cap| read > *cap) {
                                let e = std::io::Error::other(format!(
                                    "the upstream's blob grew past the cache's max_bytes ({cap} bytes)"
                                ));
                                return Some((Err(e), (None, None, read)));
                            }
                            if let Some(p) = previous.take() {
                                send_to_client(&client, Ok(p)).await;
                            }
                            previous = Some(chunk.clone());
                            Some((Ok::<Bytes, std::io::Error>(chunk), (Some(body), previous, read)))
                        }
                        Some(Err(e)) => Some((Err(e), (None, None, read))),
                        None => {
                            *held.lock().unwrap_or_else(|p| p.into_inner()) = previous.take();
                            None
                        }
                    }
                }
            },
        );
        let recorded = self.store(tee, length).await;
        let end = match recorded {
            Ok(()) => {
                let chunk = last.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(chunk) = chunk {
                    send_to_client(&client, Ok(chunk)).await;
                }
                FillEnd::Stored
            }
            Err(e) => {
                tracing::warn!(proxy = self.cache.config.prefix, repo = %self.repo, digest = %self.digest, error = %e, "blob fetch failed; nothing stored");
                send_to_client(&client, Err(std::io::Error::other(e.to_string()))).await;
                FillEnd::Failed(e.to_string())
            }
        };
        client.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
        let _ = self.done.send(Some(end));
    }

    /// Writes the bytes through an upload session, which checks them against the digest and
    /// links the blob; then records the pending manifests this blob completes.
    async fn store<S>(&self, body: S, length: Option<u64>) -> Result<()>
    where
        S: Stream<Item = std::io::Result<Bytes>>,
    {
        let r = &self.registry;
        let session = r.open_session(&self.repo).await?;
        let completed = r.complete_upload(&self.repo, &session.id, &self.digest, None, length, body).await;
        if let Err(e) = completed {
            match r.cancel_upload(&self.repo, &session.id).await {
                Ok(()) | Err(Error::BlobUploadUnknown) => {}
                Err(c) => tracing::warn!(upload = %session.id, error = %c, "could not cancel a failed fill"),
            }
            return Err(match e {
                Error::DigestInvalid(m) => Error::Upstream {
                    rate_limited: false,
                    message: format!(
                        "upstream {} of proxy `{}` served wrong bytes for {}: {m}; nothing was stored",
                        self.cache.config.upstream, self.cache.config.prefix, self.digest
                    ),
                },
                e => e,
            });
        }
        if let Err(e) = r.record_completed(&self.cache, &self.repo).await {
            tracing::warn!(proxy = self.cache.config.prefix, repo = %self.repo, error = %e, "could not record the manifests a fill completed");
        }
        Ok(())
    }
}
