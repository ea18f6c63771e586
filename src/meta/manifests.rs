//! Manifests and what they reference (blobs; index children), stored byte-for-byte.

use sqlx::AnyConnection;

use super::events::NewEvent;
use super::tags::{TagCondition, TagCtx, TagOutcome, TagWrite};
use super::{Error, MetaStore, Result, TxError, transaction};
use crate::meta::{ManifestHead, ManifestRow, ReferrerRow};
use crate::oci::{Digest, Reference, RepoName, Tag};

/// A manifest to store, with what it references.
#[derive(Debug)]
pub struct NewManifest<'a> {
    /// The digest of `payload`.
    pub digest: &'a Digest,
    /// Media type it is served with.
    pub media_type: &'a str,
    /// The referrers API's artifact type.
    pub artifact_type: Option<&'a str>,
    /// The digest of its subject, if any.
    pub subject: Option<&'a Digest>,
    /// Annotations as JSON text, if any.
    pub annotations: Option<String>,
    /// The exact bytes pushed.
    pub payload: &'a [u8],
    /// Blobs that must be linked in the repository.
    pub blobs: &'a [Digest],
    /// Manifests that must be present in the repository.
    pub children: &'a [Digest],
    /// Whether children absent from the repository are accepted (a sparse index, for
    /// repositories configured as mirrors); only present children are then referenced.
    pub sparse: bool,
}

/// Why a manifest could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PutManifestError {
    /// Blobs it references are not in the repository.
    #[error("blobs not in the repository: {0:?}")]
    MissingBlobs(Vec<Digest>),
    /// Manifests it lists are not in the repository.
    #[error("manifests not in the repository: {0:?}")]
    MissingManifests(Vec<Digest>),
    /// A tag's `If-Match` / `If-None-Match` condition did not hold; nothing was stored.
    #[error("tag {tag} points at {current:?}")]
    Precondition {
        /// The tag.
        tag: String,
        /// Where it points now.
        current: Option<String>,
    },
    /// A tag it would move is immutable; nothing was stored. The message names the rule.
    #[error("{0}")]
    Immutable(String),
    /// The store failed.
    #[error(transparent)]
    Meta(#[from] Error),
}

impl From<sqlx::Error> for PutManifestError {
    fn from(e: sqlx::Error) -> Self {
        PutManifestError::Meta(Error::Database(e))
    }
}

impl TxError for PutManifestError {
    fn store_error(&self) -> Option<&Error> {
        match self {
            PutManifestError::Meta(e) => Some(e),
            _ => None,
        }
    }
}

/// How often a step that lost a race with a concurrent delete is repeated within its transaction.
const STEP_ATTEMPTS: usize = 3;

impl MetaStore {
    /// Stores a manifest in `repo` (or revives or refreshes it if present) and points `tags` at
    /// it (each only if `condition` holds for it, else nothing at all is stored), recording the
    /// tag moves, in one transaction. Every referenced blob must be
    /// linked in the repository and every child manifest present there; those rows are locked
    /// until commit so a concurrent collector cannot remove them underneath the new reference.
    ///
    /// # Errors
    /// [`PutManifestError::MissingBlobs`] / [`PutManifestError::MissingManifests`] naming what is
    /// absent; [`PutManifestError::Meta`] when the store fails.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &NewManifest<'_>,
        tags: &[Tag],
        condition: TagCondition<'_>,
        actor: Option<&str>,
        now: i64,
    ) -> Result<(), PutManifestError> {
        // Locked in one statement each, in id order: the order every other path that locks
        // several blobs or manifests takes them in (docs/design.md, lock order).
        let blob_sql = (
            "SELECT b.id, b.digest FROM blobs b JOIN repository_blobs rb ON rb.blob_id = b.id \
             WHERE rb.repository_id = $1 AND rb.hidden_by_delete IS NULL AND b.digest IN",
            format!(" ORDER BY b.id{}", self.share_lock()),
        );
        let child_sql = (
            "SELECT id, digest FROM manifests WHERE repository_id = $1 AND deleted_at IS NULL AND digest IN",
            format!(" ORDER BY id{}", self.share_lock()),
        );
        let tag_ctx = TagCtx { defer_reviews: true, ..self.tag_ctx(now) };
        let lock = self.share_lock();
        transaction!(self, PutManifestError, |tx| {
            let repo_id = Self::ensure_repository(tx, repo, now, lock).await?;
            let (blob_ids, missing) = ids_of(tx, &blob_sql, repo_id, manifest.blobs).await?;
            if !missing.is_empty() {
                return Err(PutManifestError::MissingBlobs(missing));
            }
            let (child_ids, missing) = ids_of(tx, &child_sql, repo_id, manifest.children).await?;
            if !missing.is_empty() && !manifest.sparse {
                return Err(PutManifestError::MissingManifests(missing));
            }
            let manifest_id = Self::upsert_manifest(tx, repo_id, manifest, now).await?;
            Self::write_references(tx, manifest_id, &blob_ids, &child_ids).await?;

            // A cache's resolutions are all checked (share-locked, in tag order) before any tag
            // row is locked: resolutions before tags, as a tag delete takes them.
            let mut writable = Vec::with_capacity(tags.len());
            for tag in tags {
                if !matches!(condition, TagCondition::IfCacheResolves)
                    || Self::cache_resolves(tx, repo, tag, manifest.digest, lock).await?
                {
                    writable.push(tag);
                }
            }
            let mut pushed = NewEvent::new(crate::events::MANIFEST_PUSHED, repo.as_str(), actor, now)
                .digest(manifest.digest.as_str());
            pushed.media_type = Some(manifest.media_type.to_string());
            pushed.size = i64::try_from(manifest.payload.len()).ok();
            match writable.as_slice() {
                [one] => pushed = pushed.tag(one.as_str()),
                [] => {}
                many => {
                    pushed = pushed.detail("tags", many.iter().map(|t| t.as_str()).collect::<Vec<_>>());
                }
            }
            if let Some(subject) = manifest.subject {
                pushed = pushed.detail("subject", subject.as_str());
            }
            // An image's artifact type is its config's media type: worth naming only for artifacts.
            if let Some(artifact_type) =
                manifest.artifact_type.filter(|t| *t != "application/vnd.oci.image.config.v1+json")
            {
                pushed = pushed.detail("artifactType", artifact_type);
            }
            super::events::record(pushed);
            // Several tags (an import, a cache): the rows of those that exist are locked together,
            // in name order, before any is written (as retention's batches lock theirs).
            writable.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            if writable.len() > 1 && !tag_ctx.lock.is_empty() {
                let list = (0..writable.len()).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ");
                let sql = format!(
                    "SELECT t.name FROM tags t WHERE t.repository_id = $1 AND t.name IN ({list}) ORDER BY t.name{}",
                    tag_ctx.lock
                );
                let mut q = sqlx::query(&sql).bind(repo_id);
                for tag in &writable {
                    q = q.bind(tag.as_str());
                }
                q.execute(&mut *tx).await?;
            }
            // Pushed without a tag, it is garbage once its grace passes; a tag drops the review.
            // The manifests its tags move away from may be garbage too. Queue rows come after
            // every tag row (tag rows before queue rows, as every tag writer takes them), in id
            // order (as retention's batches take them).
            let mut reviews = vec![manifest_id];
            for tag in writable {
                let write = TagWrite {
                    repo_id,
                    repo: repo.as_str(),
                    tag,
                    manifest_id,
                    digest: manifest.digest,
                    actor,
                    now,
                    kind: "push",
                    condition,
                };
                match Self::set_tag(tx, &write, &tag_ctx).await? {
                    TagOutcome::Precondition { current } => {
                        return Err(PutManifestError::Precondition { tag: tag.to_string(), current });
                    }
                    TagOutcome::Immutable(refusal) => return Err(PutManifestError::Immutable(refusal)),
                    TagOutcome::Set { moved_from } => reviews.extend(moved_from),
                    TagOutcome::Unchanged => {}
                }
            }
            reviews.sort_unstable();
            reviews.dedup();
            for id in reviews {
                Self::enqueue(tx, super::gc::Review::Manifest(id), tag_ctx.untagged_review_at).await?;
            }
            Ok(())
        })
    }

    /// Whether the cache's resolution of `tag` names `digest` now (the row share-locked, so a
    /// tag delete, which forgets the resolution first, waits for this transaction or is seen).
    async fn cache_resolves(
        tx: &mut AnyConnection,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        lock: &str,
    ) -> Result<bool, sqlx::Error> {
        let named: Option<(String,)> = sqlx::query_as(&format!(
            "SELECT digest FROM proxy_tags WHERE repository = $1 AND tag = $2{lock}"
        ))
        .bind(repo.as_str())
        .bind(tag.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        Ok(named.is_some_and(|(d,)| d == digest.as_str()))
    }

    /// Inserts the manifest row, or — pushed again — revives it if it is a tombstone and
    /// refreshes its push time. Returns its id.
    async fn upsert_manifest(
        tx: &mut AnyConnection,
        repo_id: i64,
        manifest: &NewManifest<'_>,
        now: i64,
    ) -> Result<i64, sqlx::Error> {
        for _ in 0..STEP_ATTEMPTS {
            let inserted: Option<(i64,)> = sqlx::query_as(
                "INSERT INTO manifests (repository_id, digest, media_type, artifact_type, \
                 subject_digest, annotations, size, payload, pushed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (repository_id, digest) DO NOTHING RETURNING id",
            )
            .bind(repo_id)
            .bind(manifest.digest.as_str())
            .bind(manifest.media_type)
            .bind(manifest.artifact_type)
            .bind(manifest.subject.map(Digest::as_str))
            .bind(manifest.annotations.as_deref())
            .bind(manifest.payload.len() as i64)
            .bind(manifest.payload)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id,)) = inserted {
                super::quotas::note(super::quotas::Change::Manifest {
                    repo: repo_id,
                    bytes: manifest.payload.len() as i64,
                });
                return Ok(id);
            }
            let revived: Option<(i64,)> = sqlx::query_as(
                "UPDATE manifests SET pushed_at = $1, deleted_at = NULL, delete_id = NULL, \
                 deleted_why = NULL, unrestorable = NULL \
                 WHERE repository_id = $2 AND digest = $3 RETURNING id",
            )
            .bind(now)
            .bind(repo_id)
            .bind(manifest.digest.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id,)) = revived {
                return Ok(id);
            }
            // The row that blocked the insert was removed before it could be updated (a
            // concurrent collection): insert again.
        }
        Err(sqlx::Error::RowNotFound)
    }

    /// Makes the reference rows of `manifest_id` exactly the blobs and children checked (and
    /// locked) by this transaction. A manifest pushed again has the same bytes, hence the same
    /// digests — but the rows may be gone (a purged or collected tombstone) or name blob rows
    /// stored again since, so they are rewritten rather than trusted.
    async fn write_references(
        tx: &mut AnyConnection,
        manifest_id: i64,
        blob_ids: &[i64],
        child_ids: &[i64],
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM manifest_blobs WHERE manifest_id = $1")
            .bind(manifest_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM manifest_children WHERE parent_id = $1")
            .bind(manifest_id)
            .execute(&mut *tx)
            .await?;
        for blob_id in blob_ids {
            sqlx::query(
                "INSERT INTO manifest_blobs (manifest_id, blob_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(manifest_id)
            .bind(blob_id)
            .execute(&mut *tx)
            .await?;
        }
        for child_id in child_ids {
            sqlx::query(
                "INSERT INTO manifest_children (parent_id, child_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(manifest_id)
            .bind(child_id)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// The live manifest `reference` points at in `repo`, with its bytes.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Option<ManifestRow>> {
        self.find_manifest(repo, reference, "m.id, m.digest, m.media_type, m.payload").await
    }

    /// Like [`MetaStore::manifest`] without the bytes.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn manifest_head(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestHead>> {
        self.find_manifest(repo, reference, "m.id, m.digest, m.media_type, m.size").await
    }

    async fn find_manifest<T>(
        &self,
        repo: &RepoName,
        reference: &Reference,
        columns: &str,
    ) -> Result<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    {
        let (from, key) = match reference {
            Reference::Digest(d) => {
                ("manifests m JOIN repositories r ON r.id = m.repository_id WHERE m.digest = $2", d.as_str())
            }
            Reference::Tag(t) => (
                "tags t JOIN repositories r ON r.id = t.repository_id \
                 JOIN manifests m ON m.id = t.manifest_id WHERE t.name = $2",
                t.as_str(),
            ),
        };
        let sql = format!("SELECT {columns} FROM {from} AND r.name = $1 AND m.deleted_at IS NULL");
        Ok(sqlx::query_as(&sql).bind(repo.as_str()).bind(key).fetch_optional(&self.read).await?)
    }

    /// Live manifests in `repo` whose subject is `subject`, optionally only of `artifact_type`,
    /// ordered by digest.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerRow>> {
        Ok(sqlx::query_as(
            "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.subject_digest = $2 AND m.deleted_at IS NULL \
             AND ($3 IS NULL OR m.artifact_type = $3) ORDER BY m.digest",
        )
        .bind(repo.as_str())
        .bind(subject.as_str())
        .bind(artifact_type)
        .fetch_all(&self.read)
        .await?)
    }
}

/// The row ids `sql` finds for the digests (in `repo_id`), and the digests it does not find.
async fn ids_of(
    tx: &mut AnyConnection,
    (select, order_and_lock): &(&str, String),
    repo_id: i64,
    digests: &[Digest],
) -> Result<(Vec<i64>, Vec<Digest>), sqlx::Error> {
    let mut found: Vec<(i64, String)> = Vec::with_capacity(digests.len());
    // One statement for any manifest that fits in a request (4 MiB is ~27,000 descriptors).
    for chunk in digests.chunks(10_000) {
        let list = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ");
        let sql = format!("{select} ({list}){order_and_lock}");
        let mut q = sqlx::query_as::<_, (i64, String)>(&sql).bind(repo_id);
        for digest in chunk {
            q = q.bind(digest.as_str());
        }
        found.extend(q.fetch_all(&mut *tx).await?);
    }
    let ids = found.iter().map(|(id, _)| *id).collect();
    let present: std::collections::HashSet<&str> = found.iter().map(|(_, d)| d.as_str()).collect();
    let missing = digests.iter().filter(|d| !present.contains(d.as_str())).cloned().collect();
    Ok((ids, missing))
}
