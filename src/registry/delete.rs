//! Deleting and restoring: the delete contract, written once for the OCI API, the admin API and
//! the CLI.

use super::{Error, Registry, Result};
use crate::meta::{AffectedManifest, DeleteError, Purged, Refusal, RevertTarget, TagCondition};
use crate::oci::{Digest, RepoName, Tag};

/// What a `Refusal::NotFound` means for the operation at hand.
fn refusal(e: DeleteError, not_found: fn(String) -> Error) -> Error {
    match e {
        DeleteError::Refused(Refusal::NotFound(m)) => not_found(m),
        DeleteError::Refused(Refusal::Held(m)) => Error::DeleteRefused(m),
        DeleteError::Refused(Refusal::Precondition(m)) => Error::PreconditionFailed(m),
        DeleteError::Refused(Refusal::Conflict(m)) => Error::Conflict(m),
        DeleteError::Refused(Refusal::Immutable(m)) => Error::Immutable(m),
        DeleteError::Meta(crate::meta::Error::Quota(r)) => {
            Error::Conflict(format!("{r}; an administrator may restore past it with --force"))
        }
        DeleteError::Meta(e) => e.into(),
    }
}

fn manifest_unknown(_: String) -> Error {
    Error::ManifestUnknown
}
fn blob_unknown(_: String) -> Error {
    Error::BlobUnknown
}
fn name_unknown(_: String) -> Error {
    Error::NameUnknown
}

/// What a purge did, including whether the bytes are gone from storage already.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PurgeReport {
    /// What the metadata transaction did.
    #[serde(flatten)]
    pub purged: Purged,
    /// Whether the bytes were deleted from storage; when not, `held_by_backup` or
    /// `storage_error` says why (the outbox deletes them later).
    pub bytes_deleted: bool,
    /// Whether a running backup holds the bytes (its snapshot may name the blob): the outbox
    /// deletes them when the backup ends.
    pub held_by_backup: bool,
    /// The storage failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_error: Option<String>,
}

/// Writes an audit event (target `berth::audit`): who did what to which manifests.
pub(super) fn audit(action: &str, actor: Option<&str>, subject: &str, affected: &[AffectedManifest]) {
    let manifests: Vec<String> = affected.iter().map(|m| format!("{}@{}", m.repository, m.digest)).collect();
    let tags: Vec<String> =
        affected.iter().flat_map(|m| m.tags.iter().map(|t| format!("{}:{t}", m.repository))).collect();
    tracing::info!(
        target: crate::telemetry::AUDIT,
        action,
        actor = actor.unwrap_or("anonymous"),
        subject,
        manifests = manifests.join(" "),
        tags = tags.join(" "),
        "audit"
    );
}

/// [`audit`] for a change of one tag.
pub(super) fn audit_tag(action: &str, actor: Option<&str>, repo: &RepoName, tag: &Tag, digest: &str) {
    let affected = [AffectedManifest {
        repository: repo.to_string(),
        digest: digest.to_string(),
        tags: vec![tag.to_string()],
    }];
    audit(action, actor, &format!("{repo}:{tag}"), &affected);
}

impl Registry {
    /// Deletes manifest `digest` of `repo`: it becomes a tombstone with its referrers, and every
    /// tag on them is removed (recorded in the history) — one transaction. `force` deletes it
    /// even while an in-use report pins it (the caller must administer the repository).
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`]; [`Error::DeleteRefused`] while a live index lists it or,
    /// unless `force`, a report pins it.
    ///
    /// In a pull-through cache's repository a delete evicts: the manifest goes as above, but
    /// nothing stays restorable (the upstream has it) and the collector may take its bytes at
    /// once.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        force: bool,
        actor: Option<&str>,
    ) -> Result<Vec<AffectedManifest>> {
        let now = self.clock.now_ms();
        if self.cache_of(repo).is_some() {
            let pending = self.meta.pending_manifest(repo, digest.as_str()).await?.is_some();
            self.meta.drop_pending_manifest(repo, digest.as_str()).await?;
            let evicted = match self.meta.evict_manifest(repo, digest, None, force, actor, now).await {
                Err(crate::meta::DeleteError::Refused(Refusal::NotFound(_))) if pending => Vec::new(),
                other => other.map_err(|e| refusal(e, manifest_unknown))?,
            };
            audit("evict-manifest", actor, &format!("{repo}@{digest}"), &evicted);
            return Ok(evicted);
        }
        let deleted = self
            .meta
            .delete_manifest(repo, digest, None, force, actor, now)
            .await
            .map_err(|e| refusal(e, manifest_unknown))?;
        audit("delete-manifest", actor, &format!("{repo}@{digest}"), &deleted);
        Ok(deleted)
    }

    /// Deletes tag `tag` of `repo` (the manifest stays), if `condition` holds. Returns the
    /// digest it pointed at.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`] for a tag that does not exist; [`Error::PreconditionFailed`].
    pub async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        condition: TagCondition<'_>,
        actor: Option<&str>,
    ) -> Result<String> {
        let now = self.clock.now_ms();
        // In a cache, the tag's resolution is forgotten with it: the next pull of the tag asks
        // the upstream again — also when the tag names a manifest still pending (no tag row yet).
        let cached = self.cache_of(repo).is_some();
        let digest = self
            .meta
            .delete_tag(repo, tag, condition, cached, actor, now)
            .await
            .map_err(|e| refusal(e, manifest_unknown))?;
        audit_tag("delete-tag", actor, repo, tag, &digest);
        Ok(digest)
    }

    /// Unlinks blob `digest` from `repo`; tombstones that referenced it can no longer be
    /// restored.
    ///
    /// # Errors
    /// [`Error::BlobUnknown`]; [`Error::DeleteRefused`] while a live manifest references it.
    pub async fn unlink_blob(&self, repo: &RepoName, digest: &Digest, actor: Option<&str>) -> Result<()> {
        let now = self.clock.now_ms();
        self.meta.unlink_blob(repo, digest, actor, now).await.map_err(|e| refusal(e, blob_unknown))?;
        audit("unlink-blob", actor, &format!("{repo}@{digest}"), &[]);
        Ok(())
    }

    /// Deletes repository `repo`: everything in it becomes a tombstone, restorable. Refused
    /// while an in-use report pins one of its manifests, unless `force`.
    ///
    /// # Errors
    /// [`Error::NameUnknown`]; [`Error::DeleteRefused`] (pinned).
    pub async fn delete_repository(
        &self,
        repo: &RepoName,
        force: bool,
        actor: Option<&str>,
    ) -> Result<Vec<AffectedManifest>> {
        let now = self.clock.now_ms();
        let deleted = self
            .meta
            .delete_repository(repo, force, actor, now)
            .await
            .map_err(|e| refusal(e, name_unknown))?;
        if self.cache_of(repo).is_some() {
            self.meta.drop_proxy_rows(repo).await?;
        }
        audit("delete-repository", actor, repo.as_str(), &deleted);
        Ok(deleted)
    }

    /// Restores a deleted repository with its tags.
    ///
    /// # Errors
    /// [`Error::NameUnknown`], [`Error::Conflict`].
    pub async fn restore_repository(
        &self,
        repo: &RepoName,
        take_tags: bool,
        actor: Option<&str>,
    ) -> Result<Vec<AffectedManifest>> {
        // A deleted cache repository is fetched again, never restored.
        self.refuse_cached(repo)?;
        let now = self.clock.now_ms();
        let restored = self
            .meta
            .restore_repository(repo, take_tags, actor, now)
            .await
            .map_err(|e| refusal(e, name_unknown))?;
        audit("restore-repository", actor, repo.as_str(), &restored);
        Ok(restored)
    }

    /// Restores tombstone `digest` of `repo` with its tags and the referrers deleted with it.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`] (no such manifest in the repository), [`Error::Conflict`] with
    /// the reason it cannot be restored (also when it is not deleted).
    pub async fn restore_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        take_tags: bool,
        actor: Option<&str>,
    ) -> Result<Vec<AffectedManifest>> {
        // Cached content is fetched again, never restored (evictions are unrestorable anyway).
        self.refuse_cached(repo)?;
        let now = self.clock.now_ms();
        let restored = self
            .meta
            .restore_manifest(repo, digest, take_tags, actor, now)
            .await
            .map_err(|e| refusal(e, manifest_unknown))?;
        audit("restore-manifest", actor, &format!("{repo}@{digest}"), &restored);
        Ok(restored)
    }

    /// Puts a deleted tag back where it pointed. Returns that digest.
    ///
    /// # Errors
    /// [`Error::TagUnknown`], [`Error::Conflict`].
    pub async fn restore_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        take_tags: bool,
        actor: Option<&str>,
    ) -> Result<String> {
        // A cached tag follows its upstream.
        self.refuse_cached(repo)?;
        let now = self.clock.now_ms();
        let digest = self
            .meta
            .restore_tag(repo, tag, take_tags, actor, now)
            .await
            .map_err(|e| refusal(e, Error::TagUnknown))?;
        audit_tag("restore-tag", actor, repo, tag, &digest);
        Ok(digest)
    }

    /// The time machine: puts `tag` back where it pointed (see [`RevertTarget`]).
    ///
    /// # Errors
    /// [`Error::TagUnknown`], [`Error::Conflict`].
    pub async fn revert_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        target: RevertTarget<'_>,
        actor: Option<&str>,
    ) -> Result<String> {
        // A cached tag follows its upstream.
        self.refuse_cached(repo)?;
        let now = self.clock.now_ms();
        let digest = self
            .meta
            .revert_tag(repo, tag, target, actor, now)
            .await
            .map_err(|e| refusal(e, Error::TagUnknown))?;
        audit_tag("revert-tag", actor, repo, tag, &digest);
        Ok(digest)
    }

    /// Emergency purge of blob `digest` everywhere: every manifest referencing it becomes an
    /// unrestorable tombstone in the same transaction, and the bytes are deleted right after it
    /// commits — not by the collector.
    ///
    /// # Errors
    /// [`Error::BlobUnknown`].
    pub async fn purge_blob(
        &self,
        digest: &Digest,
        reason: &str,
        actor: Option<&str>,
    ) -> Result<PurgeReport> {
        self.purge_blob_within(digest, reason, actor, None).await
    }

    /// [`Registry::purge_blob`] on behalf of a caller authorized over the repositories `within`
    /// (those holding the blob when it was authorized): refused if it is held elsewhere by the
    /// time the purge has the blob locked.
    ///
    /// # Errors
    /// [`Error::BlobUnknown`], [`Error::Conflict`].
    pub async fn purge_blob_within(
        &self,
        digest: &Digest,
        reason: &str,
        actor: Option<&str>,
        within: Option<&[String]>,
    ) -> Result<PurgeReport> {
        let now = self.clock.now_ms();
        let purged = self
            .meta
            .purge_blob(digest, reason, actor, within, now)
            .await
            .map_err(|e| refusal(e, blob_unknown))?;
        let key = purged.storage_key.clone();
        // A running backup whose snapshot may name the blob holds its bytes: they go when it ends.
        let held = !self.meta.outbox_unheld(&key, now).await?;
        let mut deleted = Ok(());
        if !held {
            deleted = self.blobs.delete(&key).await;
            for attempt in 1..=3 {
                if deleted.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                deleted = self.blobs.delete(&key).await;
            }
            match &deleted {
                Ok(()) => {
                    self.meta.outbox_settle(std::slice::from_ref(&key), &[], self.clock.now_ms()).await?
                }
                Err(e) => {
                    tracing::error!(storage.key = %key, error = %e, "purged blob's bytes could not be deleted (the outbox retries)")
                }
            }
        }
        tracing::warn!(digest = %digest, reason, actor, manifests = purged.manifests.len(), held_by_backup = held, "blob purged");
        audit("purge-blob", actor, digest.as_str(), &purged.manifests);
        Ok(PurgeReport {
            bytes_deleted: !held && deleted.is_ok(),
            held_by_backup: held,
            storage_error: deleted.err().map(|e| e.to_string()),
            purged,
        })
    }
}
