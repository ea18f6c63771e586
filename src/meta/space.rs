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

struct Held {
    size: i64,
    created_at: i64,
    seen_at: i64,
    /// (repository, deleted_at, unrestorable) of every manifest referencing it.
    references: Vec<(i64, Option<i64>, bool)>,
    /// (repository, linked_at) of every link.
    links: Vec<(i64, i64)>,
}

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
        // The blobs in question, as a subquery over $1 (the repository; -1: all of them).
        let held = "SELECT b.id FROM blobs b WHERE $1 < 0 \
             OR b.id IN (SELECT blob_id FROM repository_blobs WHERE repository_id = $1) \
             OR b.id IN (SELECT mb.blob_id FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
                 WHERE m.repository_id = $1)";
        let key = repo_id.unwrap_or(-1);
        let rows: Vec<(i64, i64, i64, Option<i64>)> =
            sqlx::query_as(&format!("SELECT id, size, created_at, seen_at FROM blobs WHERE id IN ({held})"))
                .bind(key)
                .fetch_all(&self.read)
                .await?;
        let mut blobs: HashMap<i64, Held> = rows
            .into_iter()
            .map(|(id, size, created_at, seen_at)| {
                (
                    id,
                    Held {
                        size,
                        created_at,
                        seen_at: seen_at.unwrap_or(0),
                        references: Vec::new(),
                        links: Vec::new(),
                    },
                )
            })
            .collect();
        let references: Vec<(i64, i64, Option<i64>, Option<String>)> = sqlx::query_as(&format!(
            "SELECT mb.blob_id, m.repository_id, m.deleted_at, m.unrestorable FROM manifest_blobs mb \
             JOIN manifests m ON m.id = mb.manifest_id WHERE mb.blob_id IN ({held})"
        ))
        .bind(key)
        .fetch_all(&self.read)
        .await?;
        for (blob, repository, deleted_at, unrestorable) in references {
            if let Some(b) = blobs.get_mut(&blob) {
                b.references.push((repository, deleted_at, unrestorable.is_some()));
            }
        }
        let links: Vec<(i64, i64, i64)> = sqlx::query_as(&format!(
            "SELECT blob_id, repository_id, linked_at FROM repository_blobs WHERE blob_id IN ({held})"
        ))
        .bind(key)
        .fetch_all(&self.read)
        .await?;
        for (blob, repository, linked_at) in links {
            if let Some(b) = blobs.get_mut(&blob) {
                b.links.push((repository, linked_at));
            }
        }

        let mut space = Space::default();
        let mut schedule: HashMap<i64, u64> = HashMap::new();
        for b in blobs.values() {
            let size = b.size.max(0) as u64;
            space.blobs += 1;
            space.bytes_stored += size;
            let live_here =
                b.references.iter().any(|&(r, d, _)| d.is_none() && repo_id.is_none_or(|id| id == r));
            let live_anywhere = b.references.iter().any(|&(_, d, _)| d.is_none());
            if let Some(id) = repo_id {
                let elsewhere =
                    b.references.iter().any(|&(r, _, _)| r != id) || b.links.iter().any(|&(r, _)| r != id);
                if !elsewhere {
                    space.bytes_exclusive += size;
                }
            }
            if live_here {
                space.bytes_live += size;
                continue;
            }
            if live_anywhere {
                space.bytes_live_elsewhere += size;
                continue;
            }
            // Held by windows only: the tombstones' restore windows, then the blob's own grace
            // (the same deadlines the reviews use).
            let tombstones_end = b
                .references
                .iter()
                .filter_map(|&(_, d, unrestorable)| {
                    d.and_then(|d| restore_window_end(d, unrestorable, w.restore_window_ms))
                })
                .max();
            let last_link = b.links.iter().map(|&(_, at)| at).max();
            let grace_end = blob_grace_end(b.created_at, last_link, b.seen_at, w.blob_grace_ms);
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
