//! Blob rows and their links into repositories.

use sqlx::AnyConnection;

use super::{Error, MetaStore, Result, transaction};
use crate::meta::BlobRow;
use crate::oci::{Digest, RepoName};

/// Outcome of recording uploaded bytes as a blob.
#[derive(Debug, PartialEq, Eq)]
pub enum CompletedUpload {
    /// The uploaded bytes became the blob, stored under the given key.
    Stored,
    /// The blob already existed; the uploaded bytes under `discard_key` are now redundant.
    AlreadyStored {
        /// The key of the redundant copy, to delete after commit.
        discard_key: String,
    },
}

/// How often a step that lost a race with a concurrent delete is repeated within its transaction.
const STEP_ATTEMPTS: usize = 3;

impl MetaStore {
    /// The blob `digest` if it is linked in `repo`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobRow>> {
        Ok(sqlx::query_as(
            "SELECT b.id, b.digest, b.size, b.storage_key FROM blobs b \
             JOIN repository_blobs rb ON rb.blob_id = b.id \
             JOIN repositories r ON r.id = rb.repository_id \
             WHERE r.name = $1 AND b.digest = $2 AND r.deleted_at IS NULL AND rb.hidden_by_delete IS NULL",
        )
        .bind(repo.as_str())
        .bind(digest.as_str())
        .fetch_optional(&self.read)
        .await?)
    }

    /// Whether a blob row names `storage_key` — read after a commit whose outcome is unknown, to
    /// learn whether the bytes under that key became a blob.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn storage_key_recorded(&self, storage_key: &str) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM blobs WHERE storage_key = $1")
            .bind(storage_key)
            .fetch_optional(&self.write)
            .await?;
        Ok(row.is_some())
    }

    /// Links `digest` into `to` if it is linked in `from` (a cross-repository mount).
    /// Returns whether it was linked.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: i64,
    ) -> Result<bool> {
        let sql = format!(
            "SELECT b.id FROM blobs b \
             JOIN repository_blobs rb ON rb.blob_id = b.id \
             JOIN repositories r ON r.id = rb.repository_id \
             WHERE r.name = $1 AND b.digest = $2 AND r.deleted_at IS NULL AND rb.hidden_by_delete IS NULL{}",
            // The blob, then its link (docs/design.md, lock order) — not the source repository's
            // row, which its delete takes before its links.
            match self.dialect {
                super::Dialect::Sqlite => "",
                super::Dialect::Postgres => " FOR SHARE OF b, rb",
            }
        );
        let lock = self.share_lock();
        let grace = self.windows().blob_grace_ms;
        transaction!(self, Error, |tx| {
            let found: Option<(i64,)> = sqlx::query_as(&sql)
                .bind(from.as_str())
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            let Some((blob_id,)) = found else {
                return Ok(false);
            };
            let repo_id = Self::ensure_repository(tx, to, now, lock).await?;
            Self::link(tx, repo_id, blob_id, now, now.saturating_add(grace)).await?;
            Ok(true)
        })
    }

    /// Links a blob into a repository — the one place every upload completion, one-request
    /// upload and mount passes through — and schedules its review for when its grace ends. A
    /// link a repository delete hid shows again.
    pub(super) async fn link(
        tx: &mut AnyConnection,
        repo_id: i64,
        blob_id: i64,
        now: i64,
        review_at: i64,
    ) -> Result<(), sqlx::Error> {
        // A new link is noted for the quotas; one that was there (hidden or not) adds nothing.
        for _ in 0..STEP_ATTEMPTS {
            let made = sqlx::query(
                "INSERT INTO repository_blobs (repository_id, blob_id, linked_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (repository_id, blob_id) DO NOTHING",
            )
            .bind(repo_id)
            .bind(blob_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if made.rows_affected() == 1 {
                super::quotas::note(super::quotas::Change::Link { repo: repo_id, blob: blob_id, delta: 1 });
                break;
            }
            let refreshed = sqlx::query(
                "UPDATE repository_blobs SET linked_at = CASE WHEN $1 > linked_at THEN $1 ELSE linked_at END, \
                 hidden_by_delete = NULL WHERE repository_id = $2 AND blob_id = $3",
            )
            .bind(now)
            .bind(repo_id)
            .bind(blob_id)
            .execute(&mut *tx)
            .await?;
            if refreshed.rows_affected() == 1 {
                break;
            }
            // The link that blocked the insert was removed before it could be refreshed (an
            // unlink committed in between): insert again.
        }
        // The queue row after the link row (docs/design.md, lock order).
        Self::enqueue(tx, super::gc::Review::Blob(blob_id), review_at).await?;
        Ok(())
    }

    /// Inserts the blob row unless the digest is stored already (then that row is share-locked).
    pub(super) async fn store_blob(
        tx: &mut AnyConnection,
        digest: &Digest,
        size: i64,
        storage_key: &str,
        now: i64,
        dialect: super::Dialect,
    ) -> Result<(i64, CompletedUpload), super::Error> {
        // The fence against the storage sweep, which may take these bytes for an orphan while
        // this transaction is on its way (a copy published outside its session's prefix, as on
        // the filesystem, whose recording is slower than `blob_grace`): whichever of the two
        // goes first wins, the other sees it. On PostgreSQL both lock the key (shared
        // here, exclusive in the sweep) before they look; SQLite's single writer orders them.
        let lock = match dialect {
            super::Dialect::Sqlite => "",
            super::Dialect::Postgres => {
                sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext($1))")
                    .bind(storage_key)
                    .execute(&mut *tx)
                    .await?;
                " FOR SHARE"
            }
        };
        let reclaimed: Option<(String,)> = sqlx::query_as(
            "SELECT storage_key FROM gc_outbox WHERE storage_key = $1 \
                 UNION ALL SELECT storage_key FROM swept_keys WHERE storage_key = $1",
        )
        .bind(storage_key)
        .fetch_optional(&mut *tx)
        .await?;
        if reclaimed.is_some() {
            return Err(super::Error::Busy(format!(
                "the uploaded bytes ({storage_key}) waited longer than gc.blob_grace to be recorded and were \
                 reclaimed; upload them again"
            )));
        }
        let existing = format!("SELECT id FROM blobs WHERE digest = $1{lock}");
        for _ in 0..STEP_ATTEMPTS {
            let inserted: Option<(i64,)> = sqlx::query_as(
                "INSERT INTO blobs (digest, size, storage_key, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (digest) DO NOTHING RETURNING id",
            )
            .bind(digest.as_str())
            .bind(size)
            .bind(storage_key)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id,)) = inserted {
                return Ok((id, CompletedUpload::Stored));
            }
            let found: Option<(i64,)> =
                sqlx::query_as(&existing).bind(digest.as_str()).fetch_optional(&mut *tx).await?;
            if let Some((id,)) = found {
                return Ok((id, CompletedUpload::AlreadyStored { discard_key: storage_key.to_string() }));
            }
            // The row that blocked the insert was removed before it could be read (a concurrent
            // collection): insert again.
        }
        Err(sqlx::Error::RowNotFound.into())
    }
}
