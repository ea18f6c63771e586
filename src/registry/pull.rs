//! Pulling and content discovery: blobs, manifests, tags, referrers and the catalog.

use tokio::sync::watch;

use super::proxy::{ByteStream, FillEnd, wait_for_fill};
use super::{Error, Registry, Result};
use crate::blob::ByteRange;
use crate::meta::{ManifestHead, ManifestRow};
use crate::oci::{Digest, Reference, RepoName};

/// A blob linked in a repository (or, in a pull-through cache, on its way), ready to be read.
#[derive(Debug)]
pub struct BlobHandle {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    repo: RepoName,
    source: Source,
}

/// Where a blob's bytes come from.
enum Source {
    /// Stored under this key.
    Stored(String),
    /// A cache's upstream, asked for the size only (a `HEAD`).
    Upstream,
    /// A cache's fill in progress: the bytes as they arrive (taken by the first read), and the
    /// fill's outcome.
    Filling(std::sync::Mutex<Option<ByteStream>>, watch::Receiver<Option<FillEnd>>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Stored(key) => f.debug_tuple("Stored").field(key).finish(),
            Source::Upstream => f.write_str("Upstream"),
            Source::Filling(..) => f.write_str("Filling"),
        }
    }
}

impl BlobHandle {
    pub(super) fn upstream(digest: Digest, size: u64, repo: RepoName) -> Self {
        BlobHandle { digest, size, repo, source: Source::Upstream }
    }

    pub(super) fn filling(
        digest: Digest,
        size: u64,
        repo: RepoName,
        stream: ByteStream,
        outcome: watch::Receiver<Option<FillEnd>>,
    ) -> Self {
        BlobHandle {
            digest,
            size,
            repo,
            source: Source::Filling(std::sync::Mutex::new(Some(stream)), outcome),
        }
    }

    /// Waits until the bytes are stored (a fill's own stream is dropped: the fill goes on).
    pub(super) async fn settled(self) -> Result<()> {
        let BlobHandle { source, digest, .. } = self;
        match source {
            Source::Filling(stream, outcome) => {
                // Nobody reads it: let go now, or the fill would wait for a reader.
                drop(stream);
                wait_for_fill(outcome, &digest).await
            }
            _ => Ok(()),
        }
    }

    /// Whether the bytes are on their way from a cache's upstream (nothing to redirect to).
    pub fn is_filling(&self) -> bool {
        !matches!(self.source, Source::Stored(_))
    }
}

/// One entry of a referrers list.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    /// The referrer's media type.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: i64,
    /// Its artifact type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its annotations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Value>,
}

impl Registry {
    /// The blob `digest` as linked in `repo`. A `HEAD` (`head`) is noted: it refreshes the
    /// blob's grace, since a client that saw 200 may skip uploading it and push a manifest that
    /// references it.
    ///
    /// # Errors
    /// [`Error::BlobUnknown`] when it is not linked there (even if stored for another repository).
    /// In a pull-through cache's repository, a blob not here is asked of the upstream.
    pub async fn blob(&self, repo: &RepoName, digest: &Digest, head: bool) -> Result<BlobHandle> {
        let Some(row) = self.meta.linked_blob(repo, digest).await? else {
            return match self.cache_of(repo) {
                Some((cache, upstream_repo)) => {
                    self.cached_blob(&cache, &upstream_repo, repo, digest, head).await
                }
                None => Err(Error::BlobUnknown),
            };
        };
        if head {
            self.access.blob_seen(row.id);
        }
        if let Some((cache, _)) = self.caches.of(repo) {
            self.metrics.proxy_request(&cache.config.prefix, "hit");
        }
        Ok(BlobHandle {
            digest: digest.clone(),
            size: row.size as u64,
            repo: repo.clone(),
            source: Source::Stored(row.storage_key),
        })
    }

    /// The blob `digest` as linked in `repo`, nothing else.
    pub(super) async fn stored_blob(&self, repo: &RepoName, digest: &Digest) -> Result<BlobHandle> {
        let row = self.meta.linked_blob(repo, digest).await?.ok_or(Error::BlobUnknown)?;
        Ok(BlobHandle {
            digest: digest.clone(),
            size: row.size as u64,
            repo: repo.clone(),
            source: Source::Stored(row.storage_key),
        })
    }

    /// Streams a blob's bytes, or `range` of them.
    ///
    /// # Errors
    /// [`Error::RangeNotSatisfiable`] when `range` is outside the blob; [`Error::BlobUnknown`]
    /// when the blob was unlinked or collected since `blob` was looked up; [`Error::Internal`]
    /// when the bytes are missing although metadata still names them (a consistency failure,
    /// reported by `fsck` too).
    /// A cache's fill is read as it arrives; a range of it once it is stored.
    pub async fn read_blob(&self, blob: &BlobHandle, range: Option<ByteRange>) -> Result<ByteStream> {
        if let Some(r) = range
            && (r.start > r.end || r.end >= blob.size)
        {
            return Err(Error::RangeNotSatisfiable { size: blob.size });
        }
        let key = match &blob.source {
            Source::Stored(key) => key.clone(),
            Source::Upstream => return Err(Error::Internal("a blob's size was asked, not its bytes".into())),
            Source::Filling(stream, outcome) => {
                let stream = stream.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let (None, Some(stream)) = (range, stream) {
                    return Ok(stream);
                }
                // A range: the fill goes on without this reader; serve the range once stored.
                wait_for_fill(outcome.clone(), &blob.digest).await?;
                let stored = self.stored_blob(&blob.repo, &blob.digest).await?;
                return Box::pin(self.read_blob(&stored, range)).await;
            }
        };
        match self.blobs.read(&key, range).await {
            Ok(stream) => Ok(Box::pin(stream)),
            Err(crate::blob::Error::NotFound(key)) => {
                // Gone between the lookup and the read: fine if metadata moved on meanwhile.
                let now = self.meta.linked_blob(&blob.repo, &blob.digest).await?;
                if now.is_some_and(|row| row.storage_key == key) {
                    return Err(crate::blob::Error::NotFound(key).into());
                }
                // A cache's blob collected under a pull is fetched again (or read where it is
                // linked now).
                if self.cache_of(&blob.repo).is_some() {
                    let again = Box::pin(self.blob(&blob.repo, &blob.digest, false)).await?;
                    return Box::pin(self.read_blob(&again, range)).await;
                }
                Err(Error::BlobUnknown)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A short-lived URL the client may download `blob` from directly, when storage is configured
    /// to redirect downloads.
    ///
    /// # Errors
    /// [`Error::Internal`] when signing fails.
    pub async fn blob_redirect(&self, blob: &BlobHandle) -> Result<Option<String>> {
        match &blob.source {
            Source::Stored(key) => Ok(self.blobs.redirect_url(key).await?),
            _ => Ok(None),
        }
    }

    /// The manifest `reference` in `repo`, with its bytes, pulled by `puller`.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`].
    /// In a pull-through cache's repository, the upstream is asked as the cache's rules say,
    /// with the client's `accept` list.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: Option<&str>,
        puller: Option<&str>,
    ) -> Result<ManifestRow> {
        if let Some((cache, upstream_repo)) = self.cache_of(repo) {
            return self
                .cached_manifest(&cache, &upstream_repo, repo, reference, accept, false, puller)
                .await;
        }
        let row = self.meta.manifest(repo, reference).await?.ok_or(Error::ManifestUnknown)?;
        self.pulled(row.id, puller);
        Ok(row)
    }

    /// The manifest `reference` in `repo`, without its bytes, asked for by `puller`.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`].
    pub async fn manifest_head(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: Option<&str>,
        puller: Option<&str>,
    ) -> Result<ManifestHead> {
        if let Some((cache, upstream_repo)) = self.cache_of(repo) {
            let m =
                self.cached_manifest(&cache, &upstream_repo, repo, reference, accept, true, puller).await?;
            let size = m.payload.len() as i64;
            return Ok(ManifestHead { id: m.id, digest: m.digest, media_type: m.media_type, size });
        }
        let row = self.meta.manifest_head(repo, reference).await?.ok_or(Error::ManifestUnknown)?;
        self.pulled(row.id, puller);
        Ok(row)
    }

    /// Notes a pull of manifest row `id`, unless `puller`'s pulls do not count as use
    /// (`[access] ignore_pulls_from`: a scanner reading everything is not running it).
    pub(super) fn pulled(&self, id: i64, puller: Option<&str>) {
        if puller.is_none_or(|p| !self.policy.ignore_pulls_from.contains(p)) {
            self.access.manifest_pulled(id);
        }
    }

    /// Tags of `repo` after `last`, at most `limit`.
    ///
    /// # Errors
    /// [`Error::NameUnknown`] when the repository does not exist.
    pub async fn tags(&self, repo: &RepoName, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        self.meta.list_tags(repo, last, limit).await?.ok_or(Error::NameUnknown)
    }

    /// Manifests in `repo` whose subject is `subject`, optionally of one artifact type.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let rows = self.meta.referrers(repo, subject, artifact_type).await?;
        Ok(rows
            .into_iter()
            .map(|r| Referrer {
                media_type: r.media_type,
                digest: r.digest,
                size: r.size,
                artifact_type: r.artifact_type,
                annotations: r.annotations.and_then(|a| serde_json::from_str(&a).ok()),
            })
            .collect())
    }

    /// Repository names after `last`, at most `limit`.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn catalog(&self, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        Ok(self.meta.list_repositories(last, limit).await?)
    }
}
