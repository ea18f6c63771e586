//! Read-only reports for the admin faces: repositories with their sizes, tombstones, and what a
//! delete would free.

use super::{MetaStore, Result};
use crate::oci::{Digest, RepoName, Tag};

/// One repository with its counts and sizes.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct RepositorySummary {
    /// Its name.
    pub name: String,
    /// When it was deleted (Unix ms), if it is.
    pub deleted_at: Option<i64>,
    /// Tags.
    pub tags: i64,
    /// Live manifests.
    pub manifests: i64,
    /// Tombstones.
    pub tombstones: i64,
    /// Bytes of live manifests and the distinct blobs they reference.
    pub bytes_live: i64,
    /// Bytes held only by tombstones: their own and the blobs no live manifest here references.
    pub bytes_in_tombstones: i64,
    /// The newest push or tag move (Unix ms), if any.
    pub last_push_at: Option<i64>,
    /// What quotas count for it alone: its linked blobs (hidden ones included) and every
    /// manifest row, tombstones included (docs/quotas.md).
    pub bytes_held: i64,
    /// The quota rules whose scope holds it.
    #[sqlx(skip)]
    pub quotas: Vec<String>,
}

/// A tombstone as the store records it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TombstoneRow {
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: i64,
    /// The subject it refers to, if it is a referrer.
    pub subject_digest: Option<String>,
    /// When it was deleted (Unix ms).
    pub deleted_at: i64,
    /// Why: deleted, subject, repository, purged.
    pub deleted_why: Option<String>,
    /// Why it can no longer be restored, if it cannot.
    pub unrestorable: Option<String>,
    /// Who deleted it (`anonymous` without credentials); none when no delete is recorded.
    pub deleted_by: Option<String>,
    /// The delete that made it.
    pub delete_id: Option<i64>,
}

/// What a delete would take and free.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Preview {
    /// Why the delete would be refused, if it would.
    pub refused: Option<String>,
    /// Manifests that would become tombstones (or, for a tag, be left untagged).
    pub manifests: Vec<String>,
    /// Tags that would be removed.
    pub tags: Vec<String>,
    /// Blobs that nothing else would hold (no other manifest, repository or restorable
    /// tombstone), and so would be collected once the windows pass.
    pub blobs_freed: i64,
    /// Bytes freed: those blobs and the manifests themselves.
    pub bytes_freed: i64,
}

/// Which manifests a previewed delete takes: a few by id, or all of one repository.
pub(super) enum Taken {
    Ids(Vec<i64>),
    Repository(i64),
}

pub(super) const SUMMARY: &str = "SELECT r.name, r.deleted_at, \
    (SELECT COUNT(*) FROM tags t WHERE t.repository_id = r.id) AS tags, \
    (SELECT COUNT(*) FROM manifests m WHERE m.repository_id = r.id AND m.deleted_at IS NULL) AS manifests, \
    (SELECT COUNT(*) FROM manifests m WHERE m.repository_id = r.id AND m.deleted_at IS NOT NULL) AS tombstones, \
    CAST((SELECT COALESCE(SUM(m.size), 0) FROM manifests m WHERE m.repository_id = r.id AND m.deleted_at IS NULL) \
       + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.id IN (SELECT mb.blob_id FROM manifest_blobs mb \
          JOIN manifests m ON m.id = mb.manifest_id WHERE m.repository_id = r.id AND m.deleted_at IS NULL)) \
       AS BIGINT) AS bytes_live, \
    CAST((SELECT COALESCE(SUM(m.size), 0) FROM manifests m WHERE m.repository_id = r.id AND m.deleted_at IS NOT NULL) \
       + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.id IN (SELECT mb.blob_id FROM manifest_blobs mb \
          JOIN manifests m ON m.id = mb.manifest_id WHERE m.repository_id = r.id AND m.deleted_at IS NOT NULL) \
          AND b.id NOT IN (SELECT mb.blob_id FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id \
          WHERE m.repository_id = r.id AND m.deleted_at IS NULL)) \
       AS BIGINT) AS bytes_in_tombstones, \
    CAST((SELECT MAX(x.at) FROM (SELECT MAX(m.pushed_at) AS at FROM manifests m WHERE m.repository_id = r.id \
       UNION ALL SELECT MAX(t.updated_at) AS at FROM tags t WHERE t.repository_id = r.id) x) AS BIGINT) AS last_push_at, \
    CAST((SELECT COALESCE(SUM(m.size), 0) FROM manifests m WHERE m.repository_id = r.id) \
       + (SELECT COALESCE(SUM(b.size), 0) FROM repository_blobs rb JOIN blobs b ON b.id = rb.blob_id \
          WHERE rb.repository_id = r.id) AS BIGINT) AS bytes_held \
    FROM repositories r";

impl MetaStore {
    /// Repositories (deleted ones too) after `last`, in order, at most `limit`, with counts and
    /// sizes.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repository_summaries(
        &self,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RepositorySummary>> {
        let sql = format!("{SUMMARY} WHERE r.name > $1 ORDER BY r.name LIMIT $2");
        Ok(sqlx::query_as(&sql).bind(last.unwrap_or("")).bind(limit).fetch_all(&self.read).await?)
    }

    /// One repository's summary.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repository_summary(&self, repo: &RepoName) -> Result<Option<RepositorySummary>> {
        let sql = format!("{SUMMARY} WHERE r.name = $1");
        Ok(sqlx::query_as(&sql).bind(repo.as_str()).fetch_optional(&self.read).await?)
    }

    /// The tombstones of `repo`, newest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tombstones(&self, repo: &RepoName) -> Result<Vec<TombstoneRow>> {
        Ok(sqlx::query_as(
            "SELECT m.digest, m.media_type, m.size, m.subject_digest, m.deleted_at, m.deleted_why, \
             m.unrestorable, CASE WHEN d.id IS NULL THEN NULL ELSE COALESCE(d.actor, 'anonymous') END AS deleted_by, m.delete_id \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             LEFT JOIN deletes d ON d.id = m.delete_id \
             WHERE r.name = $1 AND m.deleted_at IS NOT NULL ORDER BY m.deleted_at DESC, m.digest",
        )
        .bind(repo.as_str())
        .fetch_all(&self.read)
        .await?)
    }

    /// The tags delete `delete_id` removed from `digest` in `repo`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tags_taken_by(&self, repo: &RepoName, delete_id: i64, digest: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT h.tag FROM tag_history h JOIN repositories r ON r.id = h.repository_id \
             WHERE r.name = $1 AND h.delete_id = $2 AND h.old_digest = $3 AND h.kind = 'delete' ORDER BY h.tag",
        )
        .bind(repo.as_str())
        .bind(delete_id)
        .bind(digest)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    /// Referrers deleted together with tombstone `digest` by delete `delete_id`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn referrers_deleted_with(&self, repo: &RepoName, delete_id: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT m.digest FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.delete_id = $2 AND m.deleted_why = 'subject' ORDER BY m.digest",
        )
        .bind(repo.as_str())
        .bind(delete_id)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(d,)| d).collect())
    }

    /// Repositories where blob `digest` is linked or referenced by a manifest.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repositories_holding(&self, digest: &Digest) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT r.name FROM repositories r WHERE r.id IN ( \
               SELECT rb.repository_id FROM repository_blobs rb JOIN blobs b ON b.id = rb.blob_id WHERE b.digest = $1 \
               UNION SELECT m.repository_id FROM manifest_blobs mb JOIN blobs b ON b.id = mb.blob_id \
               JOIN manifests m ON m.id = mb.manifest_id WHERE b.digest = $1) ORDER BY r.name",
        )
        .bind(digest.as_str())
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    async fn repo_id(&self, repo: &RepoName) -> Result<Option<i64>> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM repositories WHERE name = $1 AND deleted_at IS NULL")
                .bind(repo.as_str())
                .fetch_optional(&self.read)
                .await?;
        Ok(row.map(|(id,)| id))
    }

    /// What deleting manifest `digest` of `repo` would take and free; `None` if there is no such
    /// live manifest.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn preview_manifest_delete(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: i64,
    ) -> Result<Option<Preview>> {
        let Some(repo_id) = self.repo_id(repo).await? else { return Ok(None) };
        let Some(id) = self.live_manifest_id(repo_id, digest.as_str()).await? else { return Ok(None) };
        let group = self.with_referrers(repo_id, id, digest.as_str()).await?;
        let mut preview =
            self.preview(repo_id, &group, Taken::Ids(group.iter().map(|(id, _)| *id).collect())).await?;
        let ids: Vec<i64> = group.iter().map(|(id, _)| *id).collect();
        for (member, member_digest) in &group {
            let parents: Vec<(i64, String)> = sqlx::query_as(
                "SELECT p.id, p.digest FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                 WHERE c.child_id = $1 AND p.deleted_at IS NULL",
            )
            .bind(member)
            .fetch_all(&self.read)
            .await?;
            if let Some((_, index)) = parents.iter().find(|(p, _)| !ids.contains(p)) {
                preview.refused = Some(format!(
                    "manifest {member_digest} is listed by the image index {index} in repository {repo}; delete the index first"
                ));
                break;
            }
        }
        if preview.refused.is_none() {
            let mut conn = self.read.acquire().await?;
            for (_, member_digest) in &group {
                if let Some(pin) = Self::pins_on(&mut conn, repo.as_str(), member_digest, now).await?.first()
                {
                    preview.refused = Some(format!(
                        "manifest {member_digest} in repository {repo} is {pin}; an administrator may delete it with force"
                    ));
                    break;
                }
            }
        }
        Ok(Some(preview))
    }

    /// What deleting tag `tag` of `repo` would take and free: nothing but the tag while another
    /// tag or a live index holds its manifest; else the manifest (and its referrers) once
    /// `untagged_grace` passes. `None` if there is no such tag.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn preview_tag_delete(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Preview>> {
        let Some(repo_id) = self.repo_id(repo).await? else { return Ok(None) };
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT m.id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2",
        )
        .bind(repo_id)
        .bind(tag.as_str())
        .fetch_optional(&self.read)
        .await?;
        let Some((id, digest)) = row else { return Ok(None) };
        let (others,): (i64,) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM tags WHERE manifest_id = $1 AND name <> $2) \
             + (SELECT COUNT(*) FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                WHERE c.child_id = $1 AND p.deleted_at IS NULL)",
        )
        .bind(id)
        .bind(tag.as_str())
        .fetch_one(&self.read)
        .await?;
        if others > 0 {
            return Ok(Some(Preview { tags: vec![tag.to_string()], ..Preview::default() }));
        }
        let group = self.with_referrers(repo_id, id, &digest).await?;
        let mut preview =
            self.preview(repo_id, &group, Taken::Ids(group.iter().map(|(id, _)| *id).collect())).await?;
        preview.tags = vec![tag.to_string()];
        Ok(Some(preview))
    }

    /// What deleting repository `repo` would take and free; `None` if there is no such live
    /// repository.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn preview_repository_delete(&self, repo: &RepoName, now: i64) -> Result<Option<Preview>> {
        let Some(repo_id) = self.repo_id(repo).await? else { return Ok(None) };
        let live: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, digest FROM manifests WHERE repository_id = $1 AND deleted_at IS NULL ORDER BY digest",
        )
        .bind(repo_id)
        .fetch_all(&self.read)
        .await?;
        let mut preview = self.preview(repo_id, &live, Taken::Repository(repo_id)).await?;
        let mut conn = self.read.acquire().await?;
        let pinned = Self::pinned_in(&mut conn, repo.as_str(), repo_id, now).await?;
        if let Some((digest, pin)) = live.iter().find_map(|(_, d)| pinned.get(d).map(|p| (d, p))) {
            preview.refused = Some(format!(
                "repository {repo} holds manifest {digest}, {pin}; an administrator may delete it with force"
            ));
        }
        Ok(Some(preview))
    }

    async fn live_manifest_id(&self, repo_id: i64, digest: &str) -> Result<Option<i64>> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2 AND deleted_at IS NULL",
        )
        .bind(repo_id)
        .bind(digest)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|(id,)| id))
    }

    /// The manifest and its live referrers, transitively.
    async fn with_referrers(&self, repo_id: i64, id: i64, digest: &str) -> Result<Vec<(i64, String)>> {
        let mut group = vec![(id, digest.to_string())];
        let mut i = 0;
        while i < group.len() {
            let subject = group[i].1.clone();
            let referrers: Vec<(i64, String)> = sqlx::query_as(
                "SELECT id, digest FROM manifests WHERE repository_id = $1 AND subject_digest = $2 \
                 AND deleted_at IS NULL",
            )
            .bind(repo_id)
            .bind(&subject)
            .fetch_all(&self.read)
            .await?;
            for r in referrers {
                if !group.iter().any(|(g, _)| *g == r.0) {
                    group.push(r);
                }
            }
            i += 1;
        }
        Ok(group)
    }

    /// Tags and freed bytes of a delete that takes `taken`.
    pub(super) async fn preview(
        &self,
        repo_id: i64,
        manifests: &[(i64, String)],
        taken: Taken,
    ) -> Result<Preview> {
        let (taken_sql, outside) = match &taken {
            Taken::Ids(ids) => {
                // Ids come from the database: integers, safe to inline.
                let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                (format!("SELECT id FROM manifests WHERE id IN ({list})"), format!("m2.id NOT IN ({list})"))
            }
            Taken::Repository(id) => (
                format!("SELECT id FROM manifests WHERE repository_id = {id}"),
                format!("m2.repository_id <> {id}"),
            ),
        };
        let tags: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT name FROM tags WHERE manifest_id IN ({taken_sql}) ORDER BY name"
        ))
        .fetch_all(&self.read)
        .await?;
        let held_elsewhere = format!(
            "EXISTS (SELECT 1 FROM manifest_blobs mb2 JOIN manifests m2 ON m2.id = mb2.manifest_id \
             WHERE mb2.blob_id = b.id AND {outside} AND m2.unrestorable IS NULL) \
             OR EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.blob_id = b.id AND rb.repository_id <> $1)"
        );
        // A repository delete also frees blobs only linked there, referenced by nothing.
        let candidates = match taken {
            Taken::Ids(_) => {
                format!("SELECT mb.blob_id FROM manifest_blobs mb WHERE mb.manifest_id IN ({taken_sql})")
            }
            Taken::Repository(_) => {
                "SELECT rb.blob_id FROM repository_blobs rb WHERE rb.repository_id = $1".to_string()
            }
        };
        let (blobs, blob_bytes): (i64, i64) = sqlx::query_as(&format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b \
             WHERE b.id IN ({candidates}) AND NOT ({held_elsewhere})"
        ))
        .bind(repo_id)
        .fetch_one(&self.read)
        .await?;
        let (manifest_bytes,): (i64,) = sqlx::query_as(&format!(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM manifests WHERE id IN ({taken_sql})"
        ))
        .fetch_one(&self.read)
        .await?;
        Ok(Preview {
            refused: None,
            manifests: manifests.iter().map(|(_, d)| d.clone()).collect(),
            tags: tags.into_iter().map(|(t,)| t).collect(),
            blobs_freed: blobs,
            bytes_freed: blob_bytes + manifest_bytes,
        })
    }
}
