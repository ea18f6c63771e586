//! Deletes and restores: tombstones, tag deletes, blob unlinks, repository deletes, purges.
//!
//! Each public method is one transaction. A delete writes a `deletes` row; the tombstones it
//! makes and the tag-history rows it writes point at that row, so a restore brings back exactly
//! what the delete took. Lock, then check: the row a delete acts on is locked `FOR UPDATE`
//! first (on PostgreSQL), and what holds it is read in later statements, which then see any push
//! that committed while the delete waited for the lock.

use sqlx::AnyConnection;

use super::events::NewEvent;
use super::gc::Review;
use super::tags::TagCondition;
use super::{Error, MetaStore, Result, TxError, transaction};
use crate::events;
use crate::oci::{Digest, RepoName, Tag};
use crate::retention::ImmutableTags;

/// Why a delete, restore or tag write did not happen; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The manifest, tag, blob or repository is not there (or not deleted, for a restore).
    #[error("{0}")]
    NotFound(String),
    /// Something still holds the item; the message names it.
    #[error("{0}")]
    Held(String),
    /// A condition (`If-Match`) did not hold.
    #[error("{0}")]
    Precondition(String),
    /// The request conflicts with the current state (a restore over a tag that moved since, a
    /// tombstone that cannot be restored); the message says why.
    #[error("{0}")]
    Conflict(String),
    /// A tag it would move or remove is immutable; the message names the tag and the rule.
    #[error("{0}")]
    Immutable(String),
}

/// A refused or failed delete.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// Refused; nothing changed.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store failed.
    #[error(transparent)]
    Meta(#[from] Error),
}

impl From<sqlx::Error> for DeleteError {
    fn from(e: sqlx::Error) -> Self {
        DeleteError::Meta(Error::Database(e))
    }
}

impl TxError for DeleteError {
    fn store_error(&self) -> Option<&Error> {
        match self {
            DeleteError::Meta(e) => Some(e),
            DeleteError::Refused(_) => None,
        }
    }
}

pub(super) type DeleteResult<T> = std::result::Result<T, DeleteError>;

pub(super) fn refuse<T>(r: Refusal) -> DeleteResult<T> {
    Err(DeleteError::Refused(r))
}

/// A manifest a delete tombstoned (or a restore brought back), with the tags that went with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AffectedManifest {
    /// The repository.
    pub repository: String,
    /// The manifest's digest.
    pub digest: String,
    /// The tags removed from it (or put back).
    pub tags: Vec<String>,
}

/// What a purge did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Purged {
    /// The blob purged.
    pub digest: String,
    /// Its size.
    pub size: i64,
    /// The storage key whose bytes the caller deletes now that the rows are gone (it is in the
    /// outbox, which deletes it later if the caller cannot: a backup holds it, storage failed).
    pub storage_key: String,
    /// Every manifest made an unrestorable tombstone, in every repository.
    pub manifests: Vec<AffectedManifest>,
    /// Repositories the blob was unlinked from.
    pub unlinked_from: Vec<String>,
}

/// Retention's condition on deleting an untagged manifest: it is still untagged and was not
/// pushed or pulled after `last_used`; the delete is credited to retention run `run_id`.
#[derive(Debug, Clone, Copy)]
pub struct RetentionDelete {
    /// The manifest's last push or pull when retention evaluated it (Unix ms).
    pub last_used: i64,
    /// The retention run.
    pub run_id: i64,
}

/// Why a manifest is removed.
#[derive(Debug, Clone, Copy)]
enum DeleteKind {
    /// A client's or administrator's delete.
    Request,
    /// Retention's delete of an untagged manifest.
    Retention(RetentionDelete),
    /// A pull-through cache's eviction (unused since `last_used`, when given).
    Eviction { last_used: Option<i64> },
}

/// A manifest row as the delete and restore code needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct Target {
    pub id: i64,
    pub digest: String,
}

impl MetaStore {
    /// The id of live repository `repo`, locked with `lock`.
    pub(super) async fn live_repository(
        tx: &mut AnyConnection,
        repo: &RepoName,
        lock: &str,
    ) -> DeleteResult<i64> {
        let sql = format!("SELECT id FROM repositories WHERE name = $1 AND deleted_at IS NULL{lock}");
        let row: Option<(i64,)> = sqlx::query_as(&sql).bind(repo.as_str()).fetch_optional(&mut *tx).await?;
        match row {
            Some((id,)) => Ok(id),
            None => refuse(Refusal::NotFound(format!("repository {repo} not known to registry"))),
        }
    }

    /// Refuses when one of `tags` (of repository `repo`) is immutable; lifts are used up on the
    /// way (and restored by the rollback if one of the others refuses).
    async fn refuse_immutable(
        tx: &mut AnyConnection,
        immutable: &ImmutableTags,
        repo_id: i64,
        repo: &RepoName,
        tags: &[String],
        now: i64,
    ) -> DeleteResult<()> {
        for tag in tags {
            if let Some(refusal) =
                Self::immutable_refusal(tx, immutable, repo_id, repo.as_str(), tag, now).await?
            {
                return refuse(Refusal::Immutable(refusal));
            }
        }
        Ok(())
    }

    /// The tags on manifest `manifest_id` (or on every manifest of repository `repo_id`), when
    /// any immutability rule is configured — otherwise none need checking.
    async fn tags_to_check(
        tx: &mut AnyConnection,
        immutable: &ImmutableTags,
        manifest_id: Option<i64>,
        repo_id: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        if immutable.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String,)> = match manifest_id {
            Some(id) => {
                sqlx::query_as("SELECT name FROM tags WHERE manifest_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?
            }
            None => {
                sqlx::query_as("SELECT name FROM tags WHERE repository_id = $1")
                    .bind(repo_id)
                    .fetch_all(&mut *tx)
                    .await?
            }
        };
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    /// The event of a cached tag deleted while its manifest was still pending (no tag row).
    fn cached_tag_forgotten(
        repo: &RepoName,
        tag: &Tag,
        digest: &str,
        actor: Option<&str>,
        now: i64,
    ) -> NewEvent {
        let mut event = NewEvent::new(events::TAG_DELETED, repo.as_str(), actor, now).tag(tag.as_str());
        event.old_digest = Some(digest.to_string());
        event.detail("pending", true)
    }

    async fn new_delete(
        tx: &mut AnyConnection,
        repo_id: Option<i64>,
        kind: &str,
        target: &str,
        actor: Option<&str>,
        reason: Option<&str>,
        now: i64,
    ) -> Result<i64, sqlx::Error> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO deletes (repository_id, kind, target, actor, reason, at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(repo_id)
        .bind(kind)
        .bind(target)
        .bind(actor)
        .bind(reason)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        Ok(id)
    }

    /// Removes every tag on manifest `m` (recording each in the history as part of delete
    /// `delete_id`); returns the tag names.
    async fn untag_all(
        tx: &mut AnyConnection,
        repo: &str,
        m: &Target,
        actor: Option<&str>,
        now: i64,
        delete_id: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let names: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM tags WHERE manifest_id = $1 ORDER BY name")
                .bind(m.id)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at, kind, delete_id) \
             SELECT repository_id, name, $1, NULL, $2, $3, 'delete', $4 FROM tags WHERE manifest_id = $5",
        )
        .bind(&m.digest)
        .bind(actor)
        .bind(now)
        .bind(delete_id)
        .bind(m.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM tags WHERE manifest_id = $1").bind(m.id).execute(&mut *tx).await?;
        for (name,) in &names {
            let mut event =
                NewEvent::new(events::TAG_DELETED, repo, actor, now).tag(name).detail("deleteId", delete_id);
            event.old_digest = Some(m.digest.clone());
            super::events::record(event);
        }
        Ok(names.into_iter().map(|(n,)| n).collect())
    }

    /// Makes `m` a tombstone of delete `delete_id`, reviewed by the collector at `review_at`
    /// (when its restore window ends).
    async fn tombstone(
        tx: &mut AnyConnection,
        m: &Target,
        delete_id: i64,
        why: &str,
        unrestorable: Option<&str>,
        now: i64,
        review_at: i64,
    ) -> Result<(), sqlx::Error> {
        Self::enqueue(tx, Review::Manifest(m.id), review_at).await?;
        sqlx::query(
            "UPDATE manifests SET deleted_at = $1, delete_id = $2, deleted_why = $3, unrestorable = $4 WHERE id = $5",
        )
        .bind(now)
        .bind(delete_id)
        .bind(why)
        .bind(unrestorable)
        .bind(m.id)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Live image indexes of the repository that list manifest `id` as a child, except those in
    /// `except`.
    async fn live_parents(
        tx: &mut AnyConnection,
        id: i64,
        except: &[i64],
    ) -> Result<Vec<Target>, sqlx::Error> {
        let parents: Vec<Target> = sqlx::query_as(
            "SELECT p.id, p.digest FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
             WHERE c.child_id = $1 AND p.deleted_at IS NULL ORDER BY p.digest",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        Ok(parents.into_iter().filter(|p| !except.contains(&p.id)).collect())
    }

    /// Live manifests of the repository whose subject is one of `group`, transitively (a
    /// signature of an SBOM of an image), locked with `lock`.
    async fn live_referrers(
        tx: &mut AnyConnection,
        repo_id: i64,
        root: &Target,
        lock: &str,
    ) -> Result<Vec<Target>, sqlx::Error> {
        let sql = format!(
            "SELECT id, digest FROM manifests WHERE repository_id = $1 AND subject_digest = $2 \
             AND deleted_at IS NULL ORDER BY digest{lock}"
        );
        let mut found: Vec<Target> = Vec::new();
        let mut frontier = vec![root.digest.clone()];
        while let Some(subject) = frontier.pop() {
            let referrers: Vec<Target> =
                sqlx::query_as(&sql).bind(repo_id).bind(&subject).fetch_all(&mut *tx).await?;
            for r in referrers {
                if r.id != root.id && !found.iter().any(|f| f.id == r.id) {
                    frontier.push(r.digest.clone());
                    found.push(r);
                }
            }
        }
        Ok(found)
    }

    /// Tombstones manifest `digest` of `repo` with its referrers and removes their tags, in one
    /// transaction. Refused while a live image index in the repository lists it (or one of the
    /// referrers going with it), while a tag on them is immutable, and — with `retention`,
    /// retention's condition — when it has a tag or was pushed or pulled after the time
    /// retention evaluated (retention evaluated it untagged and unused; a push, tag or pull
    /// since wins: checked under the row's lock). Refused while an in-use report pins it or a
    /// referrer going with it, unless `force`.
    ///
    /// # Errors
    /// [`Refusal::NotFound`], [`Refusal::Held`] naming the index or the pin; [`DeleteError::Meta`].
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        retention: Option<RetentionDelete>,
        force: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        let kind = retention.map_or(DeleteKind::Request, DeleteKind::Retention);
        self.remove_manifest(repo, digest, kind, force, actor, now).await
    }

    /// Evicts cached manifest `digest` of `repo` (a pull-through cache's repository): removed
    /// like a delete, with its tags and referrers, but the tombstones are `unrestorable`
    /// (`evicted`) and due for the collector at once — cached content is fetched again, not
    /// restored. Refused like [`MetaStore::delete_manifest`] with retention's condition: when
    /// it was pulled after `last_used` (checked under its lock), or while a live index lists it
    /// or (unless `force`) a report pins it.
    ///
    /// # Errors
    /// As [`MetaStore::delete_manifest`].
    pub async fn evict_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        last_used: Option<i64>,
        force: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        self.remove_manifest(repo, digest, DeleteKind::Eviction { last_used }, force, actor, now).await
    }

    async fn remove_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        kind: DeleteKind,
        force: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        let retention = match kind {
            DeleteKind::Retention(r) => Some(r),
            _ => None,
        };
        let last_used = match kind {
            DeleteKind::Retention(r) => Some(r.last_used),
            DeleteKind::Eviction { last_used } => last_used,
            DeleteKind::Request => None,
        };
        let evicting = matches!(kind, DeleteKind::Eviction { .. });
        let share = self.share_lock();
        let update = self.update_lock_of("manifests");
        let window = self.windows().restore_window_ms;
        let immutable = self.immutable.clone();
        let target_sql = format!(
            "SELECT id, digest FROM manifests WHERE repository_id = $1 AND digest = $2 AND deleted_at IS NULL{update}"
        );
        transaction!(self, DeleteError, |tx| {
            let repo_id = Self::live_repository(tx, repo, share).await?;
            let target: Option<Target> = sqlx::query_as(&target_sql)
                .bind(repo_id)
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let Some(target) = target else {
                return refuse(Refusal::NotFound(format!("manifest {digest} not in repository {repo}")));
            };
            if retention.is_some() {
                let tagged: Option<(String,)> =
                    sqlx::query_as("SELECT name FROM tags WHERE manifest_id = $1 LIMIT 1")
                        .bind(target.id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some((tag,)) = tagged {
                    return refuse(Refusal::Precondition(format!("manifest {digest} is tagged {tag} now")));
                }
            }
            if let Some(last_used) = last_used {
                let (pushed_at, pulled_at): (i64, Option<i64>) =
                    sqlx::query_as("SELECT pushed_at, pulled_at FROM manifests WHERE id = $1")
                        .bind(target.id)
                        .fetch_one(&mut *tx)
                        .await?;
                if pushed_at.max(pulled_at.unwrap_or(0)) > last_used {
                    let who = if evicting { "the evictor" } else { "retention" };
                    return refuse(Refusal::Precondition(format!(
                        "manifest {digest} was pushed or pulled since {who} looked at it"
                    )));
                }
            }
            let referrers = Self::live_referrers(tx, repo_id, &target, &update).await?;
            let group: Vec<i64> = std::iter::once(target.id).chain(referrers.iter().map(|r| r.id)).collect();
            for m in std::iter::once(&target).chain(&referrers) {
                if let Some(index) = Self::live_parents(tx, m.id, &group).await?.first() {
                    let what = if m.id == target.id {
                        String::new()
                    } else {
                        format!(" (its referrer {})", m.digest)
                    };
                    return refuse(Refusal::Held(format!(
                        "manifest {}{what} is listed by the image index {} in repository {repo}; delete the index first",
                        target.digest, index.digest
                    )));
                }
            }
            for m in std::iter::once(&target).chain(&referrers) {
                let tags = Self::tags_to_check(tx, &immutable, Some(m.id), repo_id).await?;
                Self::refuse_immutable(tx, &immutable, repo_id, repo, &tags, now).await?;
                // Checked under the manifest's lock: a report pins after locking it too.
                if let Some(pin) = Self::pins_on(tx, repo.as_str(), &m.digest, now).await?.first()
                    && !force
                {
                    return refuse(Refusal::Held(format!(
                        "manifest {} in repository {repo} is {pin}; an administrator may delete it with force",
                        m.digest
                    )));
                }
            }
            let reason = evicting.then_some("evicted from the pull-through cache");
            let delete_id =
                Self::new_delete(tx, Some(repo_id), "manifest", digest.as_str(), actor, reason, now).await?;
            if let Some(RetentionDelete { run_id, .. }) = retention {
                sqlx::query("UPDATE deletes SET run_id = $1 WHERE id = $2")
                    .bind(run_id)
                    .bind(delete_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut affected = Vec::new();
            let (first, unrestorable, review_at) = if evicting {
                ("evicted", Some("evicted"), now)
            } else {
                ("deleted", None, now.saturating_add(window))
            };
            for (m, why) in std::iter::once((&target, first)).chain(referrers.iter().map(|r| (r, "subject")))
            {
                let tags = Self::untag_all(tx, repo.as_str(), m, actor, now, delete_id).await?;
                Self::tombstone(tx, m, delete_id, why, unrestorable, now, review_at).await?;
                let mut event = NewEvent::new(events::MANIFEST_DELETED, repo.as_str(), actor, now)
                    .digest(&m.digest)
                    .detail("deleteId", delete_id);
                if m.id != target.id {
                    event = event.detail("subjectDeleted", target.digest.as_str());
                }
                if let Some(reason) = reason {
                    event = event.detail("reason", reason);
                }
                if let Some(RetentionDelete { run_id, .. }) = retention {
                    event = event.detail("retentionRun", run_id);
                }
                super::events::record(event);
                affected.push(AffectedManifest {
                    repository: repo.to_string(),
                    digest: m.digest.clone(),
                    tags,
                });
            }
            Ok(affected)
        })
    }

    /// Removes tag `tag` of `repo` (only if `condition` holds), recording the delete in the tag
    /// history. Returns the digest it pointed at.
    ///
    /// # Errors
    /// [`Refusal::NotFound`], [`Refusal::Precondition`]; [`DeleteError::Meta`].
    pub async fn delete_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        condition: TagCondition<'_>,
        cached: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<String> {
        let share = self.share_lock();
        let current_sql = format!(
            "SELECT m.digest, m.id FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{}",
            self.update_lock_of("t")
        );
        let untagged_review_at = now.saturating_add(self.windows().untagged_grace_ms);
        let immutable = self.immutable.clone();
        transaction!(self, DeleteError, |tx| {
            // In a pull-through cache, the cache's resolution of the tag goes first and in this
            // transaction (before the tag row, as a fill's recording takes them): a fill that read
            // it earlier either committed before this or finds it gone (`IfCacheResolves`). A tag
            // resolved to a manifest still pending has no tag row; forgetting it is the delete.
            let resolved: Option<(String,)> = if cached {
                sqlx::query_as("DELETE FROM proxy_tags WHERE repository = $1 AND tag = $2 RETURNING digest")
                    .bind(repo.as_str())
                    .bind(tag.as_str())
                    .fetch_optional(&mut *tx)
                    .await?
            } else {
                None
            };
            let resolved = resolved.map(|(d,)| d);
            let repo_id = match Self::live_repository(tx, repo, share).await {
                Err(DeleteError::Refused(Refusal::NotFound(_))) if resolved.is_some() => {
                    let d = resolved.clone().unwrap_or_default();
                    return if condition.holds(Some(&d)) {
                        super::events::record(Self::cached_tag_forgotten(repo, tag, &d, actor, now));
                        Ok(d)
                    } else {
                        refuse(Refusal::Precondition(format!("tag {tag} points at {d}")))
                    };
                }
                r => r?,
            };
            let current: Option<(String, i64)> = sqlx::query_as(&current_sql)
                .bind(repo_id)
                .bind(tag.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let manifest_id = current.as_ref().map(|(_, id)| *id);
            let current = current.map(|(d, _)| d);
            // A cached tag resolved to a manifest still pending is judged by that resolution.
            if !condition.holds(current.as_deref().or(resolved.as_deref())) {
                return refuse(Refusal::Precondition(match &current {
                    Some(d) => format!("tag {tag} points at {d}"),
                    None => format!("tag {tag} does not exist"),
                }));
            }
            let Some(old) = current else {
                if let Some(digest) = resolved {
                    super::events::record(Self::cached_tag_forgotten(repo, tag, &digest, actor, now));
                    return Ok(digest);
                }
                return refuse(Refusal::NotFound(format!("tag {tag} not in repository {repo}")));
            };
            Self::refuse_immutable(tx, &immutable, repo_id, repo, &[tag.to_string()], now).await?;
            let delete_id =
                Self::new_delete(tx, Some(repo_id), "tag", tag.as_str(), actor, None, now).await?;
            Self::record_tag_move(
                tx,
                repo_id,
                repo.as_str(),
                tag.as_str(),
                Some(&old),
                None,
                actor,
                now,
                "delete",
                Some(delete_id),
                None,
            )
            .await?;
            sqlx::query("DELETE FROM tags WHERE repository_id = $1 AND name = $2")
                .bind(repo_id)
                .bind(tag.as_str())
                .execute(&mut *tx)
                .await?;
            if let Some(id) = manifest_id {
                Self::enqueue(tx, Review::Manifest(id), untagged_review_at).await?;
            }
            Ok(old)
        })
    }

    /// Unlinks blob `digest` from `repo`. Refused while a live manifest of the repository
    /// references it; tombstones that reference it can no longer be restored afterwards.
    ///
    /// # Errors
    /// [`Refusal::NotFound`], [`Refusal::Held`] naming the manifest (and a tag on it);
    /// [`DeleteError::Meta`].
    pub async fn unlink_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<()> {
        let share = self.share_lock();
        let link_sql = format!(
            "SELECT rb.blob_id FROM repository_blobs rb JOIN blobs b ON b.id = rb.blob_id \
             WHERE rb.repository_id = $1 AND b.digest = $2 AND rb.hidden_by_delete IS NULL{}",
            self.update_lock_of("rb")
        );
        transaction!(self, DeleteError, |tx| {
            let repo_id = Self::live_repository(tx, repo, share).await?;
            let link: Option<(i64,)> = sqlx::query_as(&link_sql)
                .bind(repo_id)
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let Some((blob_id,)) = link else {
                return refuse(Refusal::NotFound(format!("blob {digest} not linked in repository {repo}")));
            };
            let holder: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT m.digest, (SELECT MIN(t.name) FROM tags t WHERE t.manifest_id = m.id) \
                 FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
                 WHERE mb.blob_id = $1 AND m.repository_id = $2 AND m.deleted_at IS NULL \
                 ORDER BY m.digest LIMIT 1",
            )
            .bind(blob_id)
            .bind(repo_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((manifest, tag)) = holder {
                let by = tag.map_or(String::new(), |t| format!(" (tagged {t})"));
                return refuse(Refusal::Held(format!(
                    "blob {digest} is referenced by manifest {manifest}{by} in repository {repo}; delete the manifest first"
                )));
            }
            let who = actor.unwrap_or("anonymous");
            let reason =
                format!("blob {digest} was unlinked from {repo} by {who} at {}", crate::time::utc(now));
            sqlx::query(
                "UPDATE manifests SET unrestorable = $1 WHERE repository_id = $2 AND deleted_at IS NOT NULL \
                 AND unrestorable IS NULL AND id IN (SELECT manifest_id FROM manifest_blobs WHERE blob_id = $3)",
            )
            .bind(&reason)
            .bind(repo_id)
            .bind(blob_id)
            .execute(&mut *tx)
            .await?;
            let delete_id =
                Self::new_delete(tx, Some(repo_id), "blob", digest.as_str(), actor, None, now).await?;
            super::events::record(
                NewEvent::new(events::BLOB_DELETED, repo.as_str(), actor, now)
                    .digest(digest.as_str())
                    .detail("deleteId", delete_id),
            );
            let unlinked =
                sqlx::query("DELETE FROM repository_blobs WHERE repository_id = $1 AND blob_id = $2")
                    .bind(repo_id)
                    .bind(blob_id)
                    .execute(&mut *tx)
                    .await?;
            if unlinked.rows_affected() == 1 {
                super::quotas::note(super::quotas::Change::Link { repo: repo_id, blob: blob_id, delta: -1 });
            }
            // Perhaps unreferenced and unlinked everywhere now: the review checks the grace.
            Self::enqueue(tx, Review::Blob(blob_id), now).await?;
            Ok(())
        })
    }

    /// Deletes repository `repo`: every live manifest becomes a tombstone, every tag is removed
    /// (and recorded), and the name is hidden — all restorable with [`MetaStore::restore_repository`].
    ///
    /// # Errors
    /// [`Refusal::NotFound`]; [`DeleteError::Meta`].
    pub async fn delete_repository(
        &self,
        repo: &RepoName,
        force: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<Vec<AffectedManifest>> {
        let update = self.repository_lock();
        let lock_live = format!(
            "SELECT id FROM manifests WHERE repository_id = $1 AND deleted_at IS NULL ORDER BY id{}",
            self.update_lock_of("manifests")
        );
        let lock_links = format!(
            "SELECT blob_id FROM repository_blobs WHERE repository_id = $1 AND hidden_by_delete IS NULL ORDER BY blob_id{}",
            self.update_lock_of("repository_blobs")
        );
        let window = self.windows().restore_window_ms;
        let immutable = self.immutable.clone();
        transaction!(self, DeleteError, |tx| {
            let repo_id = Self::live_repository(tx, repo, update).await?;
            let tags = Self::tags_to_check(tx, &immutable, None, repo_id).await?;
            Self::refuse_immutable(tx, &immutable, repo_id, repo, &tags, now).await?;
            let delete_id =
                Self::new_delete(tx, Some(repo_id), "repository", repo.as_str(), actor, None, now).await?;
            super::quotas::note(super::quotas::Change::Repository { repo: repo_id, delta: -1 });
            // Its links stay (a restore needs them) but hide: a push into the name since must not
            // find what the delete took. Links before manifests (docs/design.md, lock order).
            let _: Vec<(i64,)> = sqlx::query_as(&lock_links).bind(repo_id).fetch_all(&mut *tx).await?;
            sqlx::query(
                "UPDATE repository_blobs SET hidden_by_delete = $1 WHERE repository_id = $2 AND hidden_by_delete IS NULL",
            )
            .bind(delete_id)
            .bind(repo_id)
            .execute(&mut *tx)
            .await?;
            // Set statements, not one per manifest: a large repository must not hold the writer
            // (SQLite's only one) for long.
            // Locked first, in id order (docs/design.md, lock order), so a purge cannot tombstone
            // one of them before the updates below and have it reported as this delete's.
            let _: Vec<(i64,)> = sqlx::query_as(&lock_live).bind(repo_id).fetch_all(&mut *tx).await?;
            if !force {
                let pinned: Option<(String, String, i64)> = sqlx::query_as(
                    "SELECT m.digest, p.source, r.reported_at FROM in_use_pins p \
                     JOIN in_use_reports r ON r.source = p.source \
                     JOIN manifests m ON m.repository_id = $1 AND m.digest = p.digest AND m.deleted_at IS NULL \
                     WHERE p.repository = $2 AND p.expires_at > $3 ORDER BY r.reported_at, p.source LIMIT 1",
                )
                .bind(repo_id)
                .bind(repo.as_str())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((digest, source, reported_at)) = pinned {
                    return refuse(Refusal::Held(format!(
                        "repository {repo} holds manifest {digest}, in use by {source}, reported at {}; \
                         an administrator may delete it with force",
                        crate::time::utc(reported_at)
                    )));
                }
            }
            let live: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT m.digest, t.name FROM manifests m LEFT JOIN tags t ON t.manifest_id = m.id \
                 WHERE m.repository_id = $1 AND m.deleted_at IS NULL ORDER BY m.digest, t.name",
            )
            .bind(repo_id)
            .fetch_all(&mut *tx)
            .await?;
            let mut affected: Vec<AffectedManifest> = Vec::new();
            for (digest, tag) in live {
                if affected.last().is_none_or(|a| a.digest != digest) {
                    affected.push(AffectedManifest {
                        repository: repo.to_string(),
                        digest,
                        tags: Vec::new(),
                    });
                }
                if let (Some(tag), Some(last)) = (tag, affected.last_mut()) {
                    last.tags.push(tag);
                }
            }
            sqlx::query(
                "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at, kind, delete_id) \
                 SELECT t.repository_id, t.name, m.digest, NULL, $1, $2, 'delete', $3 \
                 FROM tags t JOIN manifests m ON m.id = t.manifest_id WHERE t.repository_id = $4",
            )
            .bind(actor)
            .bind(now)
            .bind(delete_id)
            .bind(repo_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM tags WHERE repository_id = $1").bind(repo_id).execute(&mut *tx).await?;
            for a in &affected {
                for tag in &a.tags {
                    let mut event = NewEvent::new(events::TAG_DELETED, repo.as_str(), actor, now)
                        .tag(tag)
                        .detail("deleteId", delete_id);
                    event.old_digest = Some(a.digest.clone());
                    super::events::record(event);
                }
                super::events::record(
                    NewEvent::new(events::MANIFEST_DELETED, repo.as_str(), actor, now)
                        .digest(&a.digest)
                        .detail("deleteId", delete_id)
                        .detail("repositoryDeleted", true),
                );
            }
            super::events::record(
                NewEvent::new(events::REPOSITORY_DELETED, repo.as_str(), actor, now)
                    .detail("deleteId", delete_id)
                    .detail("manifests", affected.len()),
            );
            // Queue rows after the tag rows (docs/design.md, lock order).
            sqlx::query(
                "INSERT INTO gc_reviews (kind, item_id, review_after) \
                 SELECT 'manifest', id, $1 FROM manifests WHERE repository_id = $2 AND deleted_at IS NULL \
                 ON CONFLICT (kind, item_id) DO UPDATE SET review_after = CASE \
                 WHEN excluded.review_after < gc_reviews.review_after THEN excluded.review_after \
                 ELSE gc_reviews.review_after END",
            )
            .bind(now.saturating_add(window))
            .bind(repo_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE manifests SET deleted_at = $1, delete_id = $2, deleted_why = 'repository' \
                 WHERE repository_id = $3 AND deleted_at IS NULL",
            )
            .bind(now)
            .bind(delete_id)
            .bind(repo_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE repositories SET deleted_at = $1, delete_id = $2 WHERE id = $3")
                .bind(now)
                .bind(delete_id)
                .bind(repo_id)
                .execute(&mut *tx)
                .await?;
            Ok(affected)
        })
    }

    /// Purges blob `digest` everywhere: every manifest that references it — and every index
    /// that lists such a manifest — in every repository becomes a tombstone that can never be
    /// restored, their tags are removed, the blob is unlinked everywhere and its row removed.
    /// The caller deletes the bytes (under the returned key) once this has committed. With
    /// `within` (the repositories holding the blob when the caller was authorized), the purge is
    /// refused if, under the blob's lock, it is held anywhere else: a push or mount since must not
    /// be purged on the strength of a permission over the other holders.
    ///
    /// # Errors
    /// [`Refusal::NotFound`], [`Refusal::Conflict`] (held beyond `within`); [`DeleteError::Meta`].
    pub async fn purge_blob(
        &self,
        digest: &Digest,
        reason: &str,
        actor: Option<&str>,
        within: Option<&[String]>,
        now: i64,
    ) -> DeleteResult<Purged> {
        let blob_sql = format!(
            "SELECT id, size, storage_key FROM blobs WHERE digest = $1{}",
            self.update_lock_of("blobs")
        );
        let lock_manifest =
            format!("SELECT id FROM manifests WHERE id = $1{}", self.update_lock_of("manifests"));
        let lock_links = format!(
            "SELECT repository_id FROM repository_blobs WHERE blob_id = $1 ORDER BY repository_id{}",
            self.update_lock_of("repository_blobs")
        );
        transaction!(self, DeleteError, |tx| {
            let blob: Option<(i64, i64, String)> =
                sqlx::query_as(&blob_sql).bind(digest.as_str()).fetch_optional(&mut *tx).await?;
            let Some((blob_id, size, storage_key)) = blob else {
                return refuse(Refusal::NotFound(format!("blob {digest} not known to registry")));
            };
            // Links before manifests (docs/design.md, lock order): a restore share-locks the
            // links it relies on before the manifests it revives.
            let _: Vec<(i64,)> = sqlx::query_as(&lock_links).bind(blob_id).fetch_all(&mut *tx).await?;
            if let Some(within) = within {
                // Read under the blob's lock: pushes and mounts that reference or link it
                // share-lock it, so none can add a holder before this transaction ends.
                let holders: Vec<(String,)> = sqlx::query_as(
                    "SELECT r.name FROM repositories r WHERE r.id IN ( \
                       SELECT repository_id FROM repository_blobs WHERE blob_id = $1 \
                       UNION SELECT m.repository_id FROM manifest_blobs mb \
                       JOIN manifests m ON m.id = mb.manifest_id WHERE mb.blob_id = $1)",
                )
                .bind(blob_id)
                .fetch_all(&mut *tx)
                .await?;
                if holders.iter().any(|(name,)| !within.contains(name)) {
                    return refuse(Refusal::Conflict(format!(
                        "blob {digest} is now held by a repository it was not held by when this purge was \
                         authorized; send the purge again"
                    )));
                }
            }
            let delete_id =
                Self::new_delete(tx, None, "purge", digest.as_str(), actor, Some(reason), now).await?;
            let why = format!("purged: {reason}");
            // The manifests that reference the blob, then every index above them.
            let mut doomed: Vec<(Target, String, String)> = sqlx::query_as::<_, (i64, String, String)>(
                "SELECT m.id, m.digest, r.name FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
                 JOIN repositories r ON r.id = m.repository_id WHERE mb.blob_id = $1 ORDER BY m.id",
            )
            .bind(blob_id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(id, digest, repo)| (Target { id, digest }, repo, why.clone()))
            .collect();
            // Lock, then check: each doomed manifest is locked before its parents are read, so
            // an index pushed meanwhile (its push share-locks the child) is seen and doomed too,
            // and a restore or tag write that locked it first is seen by the statements below.
            let mut i = 0;
            while i < doomed.len() {
                let child = doomed[i].0.clone();
                let locked: Option<(i64,)> =
                    sqlx::query_as(&lock_manifest).bind(child.id).fetch_optional(&mut *tx).await?;
                if locked.is_none() {
                    // Collected meanwhile: nothing left to tombstone.
                    doomed.remove(i);
                    continue;
                }
                let parents: Vec<(i64, String, String)> = sqlx::query_as(
                    "SELECT p.id, p.digest, r.name FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                     JOIN repositories r ON r.id = p.repository_id WHERE c.child_id = $1 ORDER BY p.id",
                )
                .bind(child.id)
                .fetch_all(&mut *tx)
                .await?;
                for (id, pd, repo) in parents {
                    if !doomed.iter().any(|(t, _, _)| t.id == id) {
                        let because =
                            format!("{why} (it lists {}, which referenced the purged blob)", child.digest);
                        doomed.push((Target { id, digest: pd }, repo, because));
                    }
                }
                i += 1;
            }
            let mut manifests = Vec::with_capacity(doomed.len());
            for (m, repo, because) in &doomed {
                // Tag rows before queue rows (docs/design.md, lock order). Unrestorable: collectable
                // at once.
                let tags = Self::untag_all(tx, repo.as_str(), m, actor, now, delete_id).await?;
                Self::enqueue(tx, Review::Manifest(m.id), now).await?;
                sqlx::query(
                    "UPDATE manifests SET deleted_at = COALESCE(deleted_at, $1), delete_id = COALESCE(delete_id, $2), \
                     deleted_why = COALESCE(deleted_why, 'purged'), unrestorable = $3 WHERE id = $4",
                )
                .bind(now)
                .bind(delete_id)
                .bind(because)
                .bind(m.id)
                .execute(&mut *tx)
                .await?;
                super::events::record(
                    NewEvent::new(events::MANIFEST_PURGED, repo, actor, now)
                        .digest(&m.digest)
                        .detail("deleteId", delete_id)
                        .detail("reason", because.as_str()),
                );
                manifests.push(AffectedManifest { repository: repo.clone(), digest: m.digest.clone(), tags });
            }
            manifests.sort_by(|a, b| (&a.repository, &a.digest).cmp(&(&b.repository, &b.digest)));
            let unlinked: Vec<(String,)> = sqlx::query_as(
                "SELECT r.name FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
                 WHERE rb.blob_id = $1 ORDER BY r.name",
            )
            .bind(blob_id)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM manifest_blobs WHERE blob_id = $1")
                .bind(blob_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM repository_blobs WHERE blob_id = $1")
                .bind(blob_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM blobs WHERE id = $1").bind(blob_id).execute(&mut *tx).await?;
            // Through the outbox like every deletion of bytes, so a running backup's hold is
            // honoured: the caller deletes them at once unless a backup holds them.
            Self::to_outbox(tx, &storage_key, now).await?;
            super::quotas::note(super::quotas::Change::BlobRemoved { blob: blob_id });
            let mut event = NewEvent::new(events::BLOB_PURGED, "", actor, now)
                .digest(digest.as_str())
                .detail("deleteId", delete_id)
                .detail("reason", reason)
                .detail("unlinkedFrom", unlinked.iter().map(|(n,)| n.as_str()).collect::<Vec<_>>());
            event.repository = None;
            event.size = Some(size);
            super::events::record(event);
            Ok(Purged {
                digest: digest.to_string(),
                size,
                storage_key,
                manifests,
                unlinked_from: unlinked.into_iter().map(|(n,)| n).collect(),
            })
        })
    }
}
