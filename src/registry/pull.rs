//! Pulling and content discovery: blobs, manifests, tags, referrers and the catalog.

use bytes::Bytes;
use futures_util::Stream;

use super::{Error, Registry, Result};
use crate::blob::ByteRange;
use crate::meta::{ManifestHead, ManifestRow};
use crate::oci::{Digest, Reference, RepoName};

/// A blob linked in a repository, ready to be read.
#[derive(Debug, Clone)]
pub struct BlobHandle {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    repo: RepoName,
    storage_key: String,
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
    pub async fn blob(&self, repo: &RepoName, digest: &Digest, head: bool) -> Result<BlobHandle> {
        let row = self.meta.linked_blob(repo, digest).await?.ok_or(Error::BlobUnknown)?;
        if head {
            self.access.blob_seen(row.id);
        }
        Ok(BlobHandle {
            digest: digest.clone(),
            size: row.size as u64,
            repo: repo.clone(),
            storage_key: row.storage_key,
        })
    }

    /// Streams a blob's bytes, or `range` of them.
    ///
    /// # Errors
    /// [`Error::RangeNotSatisfiable`] when `range` is outside the blob; [`Error::BlobUnknown`]
    /// when the blob was unlinked or collected since `blob` was looked up; [`Error::Internal`]
    /// when the bytes are missing although metadata still names them (a consistency failure,
    /// reported by `fsck` too).
    pub async fn read_blob(
        &self,
        blob: &BlobHandle,
        range: Option<ByteRange>,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        if let Some(r) = range
            && (r.start > r.end || r.end >= blob.size)
        {
            return Err(Error::RangeNotSatisfiable { size: blob.size });
        }
        match self.blobs.read(&blob.storage_key, range).await {
            Ok(stream) => Ok(stream),
            Err(crate::blob::Error::NotFound(key)) => {
                // Gone between the lookup and the read: fine if metadata moved on meanwhile.
                let now = self.meta.linked_blob(&blob.repo, &blob.digest).await?;
                if now.is_some_and(|row| row.storage_key == blob.storage_key) {
                    return Err(crate::blob::Error::NotFound(key).into());
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
        Ok(self.blobs.redirect_url(&blob.storage_key).await?)
    }

    /// The manifest `reference` in `repo`, with its bytes, pulled by `puller`.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`].
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        puller: Option<&str>,
    ) -> Result<ManifestRow> {
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
        puller: Option<&str>,
    ) -> Result<ManifestHead> {
        let row = self.meta.manifest_head(repo, reference).await?.ok_or(Error::ManifestUnknown)?;
        self.pulled(row.id, puller);
        Ok(row)
    }

    /// Notes a pull of manifest row `id`, unless `puller`'s pulls do not count as use
    /// (`[access] ignore_pulls_from`: a scanner reading everything is not running it).
    fn pulled(&self, id: i64, puller: Option<&str>) {
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
