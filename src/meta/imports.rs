//! Imports from the reference registry's storage: one record per source, the tags each run
//! brought over (what the next run compares against), and blobs adopted in place.

use super::blobs::CompletedUpload;
use super::{Error, MetaStore, Result, transaction};
use crate::oci::{Digest, RepoName};

/// An import source's record.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ImportRecord {
    /// Its id.
    pub id: i64,
    /// The source, canonically named.
    pub source: String,
    /// When the first run started (ms).
    pub started_at: i64,
    /// When the newest run started (ms).
    pub last_run_started: Option<i64>,
    /// When the newest completed run finished (ms).
    pub last_run_finished: Option<i64>,
    /// When the final run cut over (ms); until then the reference registry may still write.
    pub cut_over_at: Option<i64>,
}

/// A tag an import brought over.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ImportedTag {
    /// The tag.
    pub tag: String,
    /// Where the source had it point, and where the import pointed it.
    pub digest: String,
    /// When the source's link was last written (ms), as listed.
    pub source_modified: i64,
}

/// What adopting a blob did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// The bytes became the blob.
    Adopted,
    /// The digest is stored already: it was linked, and the adopted key is not needed.
    AlreadyStored,
    /// The key was adopted once before (and the collector has since deleted it, or will): it is
    /// never adopted again.
    KeyUsedBefore,
}

const RECORD: &str =
    "SELECT id, source, started_at, last_run_started, last_run_finished, cut_over_at FROM imports";

impl MetaStore {
    /// The record of `source`, created if missing, with its newest run marked as started `now`.
    /// Returns the record as it was before this run (its previous run's start).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn begin_import_run(&self, source: &str, now: i64, dry_run: bool) -> Result<ImportRecord> {
        let select = format!("{RECORD} WHERE source = $1");
        transaction!(self, Error, |tx| {
            if !dry_run {
                sqlx::query(
                    "INSERT INTO imports (source, started_at) VALUES ($1, $2) ON CONFLICT (source) DO NOTHING",
                )
                .bind(source)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let before: Option<ImportRecord> =
                sqlx::query_as(&select).bind(source).fetch_optional(&mut *tx).await?;
            let before = before.unwrap_or(ImportRecord {
                id: 0,
                source: source.to_string(),
                started_at: now,
                last_run_started: None,
                last_run_finished: None,
                cut_over_at: None,
            });
            if !dry_run {
                sqlx::query("UPDATE imports SET last_run_started = $1 WHERE id = $2")
                    .bind(now)
                    .bind(before.id)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(before)
        })
    }

    /// Records that the run of import `id` finished `now`, and that it cut over if `cut_over`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn finish_import_run(&self, id: i64, now: i64, cut_over: bool) -> Result<()> {
        sqlx::query(
            "UPDATE imports SET last_run_finished = $1, \
             cut_over_at = CASE WHEN $2 = 1 THEN COALESCE(cut_over_at, $1) ELSE cut_over_at END WHERE id = $3",
        )
        .bind(now)
        .bind(i64::from(cut_over))
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Every import's record, oldest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn imports(&self) -> Result<Vec<ImportRecord>> {
        Ok(sqlx::query_as(&format!("{RECORD} ORDER BY id")).fetch_all(&self.read).await?)
    }

    /// The tags import `id` brought into `repo`, by tag.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn imported_tags(&self, id: i64, repo: &str) -> Result<Vec<ImportedTag>> {
        Ok(sqlx::query_as(
            "SELECT tag, digest, source_modified FROM import_tags WHERE import_id = $1 AND repository = $2 \
             ORDER BY tag",
        )
        .bind(id)
        .bind(repo)
        .fetch_all(&self.read)
        .await?)
    }

    /// The repositories import `id` brought tags into.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn imported_repositories(&self, id: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT repository FROM import_tags WHERE import_id = $1 ORDER BY repository",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    /// Remembers that import `id` pointed `repo:tag` at `digest`, as the source had it when its
    /// link was last written at `source_modified`; `digest` `None` forgets the tag.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn record_imported_tag(
        &self,
        id: i64,
        repo: &str,
        tag: &str,
        digest: Option<&str>,
        source_modified: i64,
    ) -> Result<()> {
        let query = match digest {
            Some(d) => sqlx::query(
                "INSERT INTO import_tags (import_id, repository, tag, digest, source_modified) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (import_id, repository, tag) \
                 DO UPDATE SET digest = excluded.digest, source_modified = excluded.source_modified",
            )
            .bind(id)
            .bind(repo)
            .bind(tag)
            .bind(d)
            .bind(source_modified),
            None => {
                sqlx::query("DELETE FROM import_tags WHERE import_id = $1 AND repository = $2 AND tag = $3")
                    .bind(id)
                    .bind(repo)
                    .bind(tag)
            }
        };
        query.execute(&self.write).await?;
        Ok(())
    }

    /// Whether a blob row for `digest` exists anywhere.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn blob_stored(&self, digest: &Digest) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM blobs WHERE digest = $1")
            .bind(digest.as_str())
            .fetch_optional(&self.read)
            .await?;
        Ok(row.is_some())
    }

    /// Links the stored blob `digest` into `repo` (an import found it stored already). Returns
    /// whether it was stored.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn link_stored_blob(&self, repo: &RepoName, digest: &Digest, now: i64) -> Result<bool> {
        let sql = format!("SELECT id FROM blobs WHERE digest = $1{}", self.share_lock());
        let lock = self.share_lock();
        let grace = self.windows().blob_grace_ms;
        transaction!(self, Error, |tx| {
            let found: Option<(i64,)> =
                sqlx::query_as(&sql).bind(digest.as_str()).fetch_optional(&mut *tx).await?;
            let Some((blob_id,)) = found else {
                return Ok(false);
            };
            let repo_id = Self::ensure_repository(tx, repo, now, lock).await?;
            Self::link(tx, repo_id, blob_id, now, now.saturating_add(grace)).await?;
            Ok(true)
        })
    }

    /// Records bytes adopted under `storage_key` by import `import_id` as blob `digest` of
    /// `size` bytes (unless the digest is stored already) and links it into `repo` — the same
    /// row, link and review as an upload's completion. A key is adopted at most once.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn adopt_blob(
        &self,
        import_id: i64,
        repo: &RepoName,
        digest: &Digest,
        size: i64,
        storage_key: &str,
        now: i64,
    ) -> Result<Adoption> {
        let (lock, dialect) = (self.share_lock(), self.dialect);
        let grace = self.windows().blob_grace_ms;
        transaction!(self, Error, |tx| {
            let used: Option<(String,)> =
                sqlx::query_as("SELECT storage_key FROM adopted_keys WHERE storage_key = $1")
                    .bind(storage_key)
                    .fetch_optional(&mut *tx)
                    .await?;
            let stored: Option<(i64,)> = sqlx::query_as("SELECT id FROM blobs WHERE digest = $1")
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if used.is_some() && stored.is_none() {
                return Ok(Adoption::KeyUsedBefore);
            }
            let (blob_id, outcome) = Self::store_blob(tx, digest, size, storage_key, now, dialect).await?;
            if outcome == CompletedUpload::Stored {
                sqlx::query(
                    "INSERT INTO adopted_keys (storage_key, import_id, digest, adopted_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(storage_key)
                .bind(import_id)
                .bind(digest.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let repo_id = Self::ensure_repository(tx, repo, now, lock).await?;
            Self::link(tx, repo_id, blob_id, now, now.saturating_add(grace)).await?;
            Ok(if outcome == CompletedUpload::Stored { Adoption::Adopted } else { Adoption::AlreadyStored })
        })
    }
}
