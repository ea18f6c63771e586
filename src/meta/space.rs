//! Where the space goes: the stored blobs a repository (or the whole registry) holds, each
//! counted once and put in exactly one state by the collector's own rules and deadlines —
//! derived on read from the rows, so it never drifts from them.

use std::collections::HashMap;

use super::gc::{blob_grace_end, restore_window_end};
use super::{MetaStore, Result};
use crate::oci::RepoName;

/// Bytes by state. Blob bytes only: what storage holds (manifests live in the metadata store).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    /// Blobs counted.
    pub blobs: u64,
    /// All their bytes: the sum of the states below.
    pub bytes_stored: u64,
    /// Referenced by a live manifest (of this repository, for a repository's report).
    pub bytes_live: u64,
    /// For a repository: referenced by live manifests of other repositories only (this one
    /// holds them through a link or a tombstone).
    pub bytes_live_elsewhere: u64,
    /// Held only by restorable tombstones (no live manifest anywhere references them).
    pub bytes_in_tombstones: u64,
    /// Referenced by nothing, still within `blob_grace` of their upload, link or `HEAD`.
    pub bytes_in_grace: u64,
    /// Due: the collector's next pass frees them.
    pub bytes_pending_reclaim: u64,
    /// For a repository: of its bytes, those no other repository holds (by a manifest or a
    /// link) — what deleting it frees once the windows pass.
    pub bytes_exclusive: u64,
    /// When the bytes held by windows will have become reclaimable, earliest first: `(time,
    /// bytes)` per distinct window end.
    pub reclaim_schedule: Vec<(i64, u64)>,
}

/// What decides one held blob's state, read in one row: each figure an indexed probe that stops
/// at its first match where it can, so a layer every repository shares costs about what a layer
/// used once does.
#[derive(sqlx::FromRow)]
struct BlobState {
    size: i64,
    created_at: i64,
    seen_at: i64,
    /// A live manifest of the repository in question (of any, for the whole registry) uses it.
    live_here: i64,
    /// A live manifest of any repository uses it.
    live_anywhere: i64,
    /// Another repository holds it (a manifest, live or not, or a link).
    elsewhere: i64,
    /// The newest delete of a restorable tombstone referencing it (only when nothing live does).
    last_restorable_delete: Option<i64>,
    /// The newest link into a repository.
    last_link: Option<i64>,
}

/// Whether a live manifest of repository `$1` uses blob `b`: from the repository's few manifests
/// to the blob (`CROSS JOIN` keeps SQLite from starting at the blob, whose references may be
/// every repository's).
const LIVE_IN_REPOSITORY: &str = "EXISTS (SELECT 1 FROM manifests m CROSS JOIN manifest_blobs mb \
    WHERE m.repository_id = $1 AND m.deleted_at IS NULL AND mb.manifest_id = m.id AND mb.blob_id = b.id)";

/// Whether any live manifest uses blob `b`.
const LIVE_ANYWHERE: &str = "EXISTS (SELECT 1 FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
    WHERE mb.blob_id = b.id AND m.deleted_at IS NULL)";

/// The per-blob figures over `$1` (the repository; -1: all); `{live_here}` is filled in.
const STATE: &str = "SELECT b.size, b.created_at, CAST(COALESCE(b.seen_at, 0) AS BIGINT) AS seen_at, \
    CASE WHEN {live_here} THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END AS live_here, \
    CASE WHEN {live_anywhere} THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END AS live_anywhere, \
    CASE WHEN $1 >= 0 AND (EXISTS (SELECT 1 FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
            WHERE mb.blob_id = b.id AND m.repository_id <> $1) \
        OR EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.blob_id = b.id AND rb.repository_id <> $1)) \
        THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END AS elsewhere, \
    CASE WHEN {live_anywhere} THEN NULL \
        ELSE (SELECT MAX(m.deleted_at) FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
            WHERE mb.blob_id = b.id AND m.deleted_at IS NOT NULL AND m.unrestorable IS NULL) END \
        AS last_restorable_delete, \
    (SELECT MAX(rb.linked_at) FROM repository_blobs rb WHERE rb.blob_id = b.id) AS last_link \
    FROM blobs b";

impl MetaStore {
    /// The space `repo` holds (every blob linked in it or referenced by one of its manifests,
    /// tombstones included), or, without `repo`, every stored blob, at `now`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn space(&self, repo: Option<&RepoName>, now: i64) -> Result<Space> {
        let w = self.windows();
        let repo_id: Option<i64> = match repo {
            None => None,
            Some(name) => {
                let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM repositories WHERE name = $1")
                    .bind(name.as_str())
                    .fetch_optional(&self.read)
                    .await?;
                match row {
                    Some((id,)) => Some(id),
                    None => return Ok(Space::default()),
                }
            }
        };
        let state = |live_here: &str| {
            STATE.replace("{live_here}", live_here).replace("{live_anywhere}", LIVE_ANYWHERE)
        };
        let sql = match repo_id {
            None => state(LIVE_ANYWHERE),
            Some(_) => format!(
                "{} WHERE b.id IN (SELECT blob_id FROM repository_blobs WHERE repository_id = $1 \
                 UNION SELECT mb.blob_id FROM manifests m JOIN manifest_blobs mb ON mb.manifest_id = m.id \
                 WHERE m.repository_id = $1)",
                state(LIVE_IN_REPOSITORY)
            ),
        };
        let rows: Vec<BlobState> =
            sqlx::query_as(&sql).bind(repo_id.unwrap_or(-1)).fetch_all(&self.read).await?;

        let mut space = Space::default();
        let mut schedule: HashMap<i64, u64> = HashMap::new();
        for b in rows {
            let size = b.size.max(0) as u64;
            space.blobs += 1;
            space.bytes_stored += size;
            if repo_id.is_some() && b.elsewhere == 0 {
                space.bytes_exclusive += size;
            }
            if b.live_here != 0 {
                space.bytes_live += size;
                continue;
            }
            if b.live_anywhere != 0 {
                space.bytes_live_elsewhere += size;
                continue;
            }
            // Held by windows only: the tombstones' restore windows, then the blob's own grace
            // (the same deadlines the reviews use).
            let tombstones_end =
                b.last_restorable_delete.and_then(|d| restore_window_end(d, false, w.restore_window_ms));
            let grace_end = blob_grace_end(b.created_at, b.last_link, b.seen_at, w.blob_hold_ms());
            match tombstones_end {
                Some(end) if end > now => {
                    space.bytes_in_tombstones += size;
                    *schedule.entry(end.max(grace_end)).or_default() += size;
                }
                _ if grace_end > now => {
                    space.bytes_in_grace += size;
                    *schedule.entry(grace_end).or_default() += size;
                }
                _ => space.bytes_pending_reclaim += size,
            }
        }
        let mut schedule: Vec<(i64, u64)> = schedule.into_iter().collect();
        schedule.sort_unstable();
        space.reclaim_schedule = schedule;
        Ok(space)
    }
}

/// One sample of where the space went (bytes), for the console's storage-over-time chart.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct SpaceSample {
    /// When (Unix ms).
    pub at: i64,
    /// Bytes stored.
    pub stored: i64,
    /// Bytes live.
    pub live: i64,
    /// Bytes held only by tombstones.
    pub tombstones: i64,
    /// Bytes within a grace window.
    pub grace: i64,
    /// Bytes due for collection.
    pub pending: i64,
}

impl MetaStore {
    /// When the newest space sample was taken.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn last_space_sample_at(&self) -> Result<Option<i64>> {
        let row: (Option<i64>,) =
            sqlx::query_as("SELECT CAST(MAX(at) AS BIGINT) FROM space_samples").fetch_one(&self.read).await?;
        Ok(row.0)
    }

    /// Records `sample` and forgets samples taken before `keep_after`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn record_space_sample(&self, sample: &SpaceSample, keep_after: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO space_samples (at, stored, live, tombstones, grace, pending) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (at) DO NOTHING",
        )
        .bind(sample.at)
        .bind(sample.stored)
        .bind(sample.live)
        .bind(sample.tombstones)
        .bind(sample.grace)
        .bind(sample.pending)
        .execute(&self.write)
        .await?;
        sqlx::query("DELETE FROM space_samples WHERE at < $1").bind(keep_after).execute(&self.write).await?;
        Ok(())
    }

    /// The samples taken since `since`, oldest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn space_samples(&self, since: i64) -> Result<Vec<SpaceSample>> {
        Ok(sqlx::query_as(
            "SELECT at, stored, live, tombstones, grace, pending FROM space_samples WHERE at >= $1 ORDER BY at",
        )
        .bind(since)
        .fetch_all(&self.read)
        .await?)
    }
}
