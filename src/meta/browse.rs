//! Read-only views for the web console: a repository's tags and untagged manifests with what
//! an operator wants beside them, and repository search.

use super::{MetaStore, Result};
use crate::meta::RepositorySummary;
use crate::oci::RepoName;

/// A tag as the console lists it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TagRow {
    /// The tag.
    pub tag: String,
    /// The manifest it points at.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The image's bytes: the manifest, its blobs, and for an index its children and theirs
    /// (each blob once).
    pub size: i64,
    /// For an index: how many manifests it lists.
    pub children: i64,
    /// Live manifests referring to it (signatures, SBOMs…).
    pub referrers: i64,
    /// When the tag was last pushed (ms).
    pub pushed_at: i64,
    /// Who pushed it last, if known.
    pub pushed_by: Option<String>,
    /// When the manifest was last pulled (ms), if recorded.
    pub pulled_at: Option<i64>,
}

/// A live manifest no tag points at.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct UntaggedRow {
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its own size.
    pub size: i64,
    /// The subject it refers to, for a referrer.
    pub subject_digest: Option<String>,
    /// When it was pushed (ms).
    pub pushed_at: i64,
    /// When it was last pulled (ms), if recorded.
    pub pulled_at: Option<i64>,
}

/// A tag whose last change was a delete.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeletedTag {
    /// The tag.
    pub tag: String,
    /// Where it pointed.
    pub digest: String,
    /// Who deleted it.
    pub actor: Option<String>,
    /// When (ms).
    pub at: i64,
}

impl MetaStore {
    /// Up to `limit` tags of `repo` whose last change was a delete (and that were not pushed
    /// again), newest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn deleted_tags(&self, repo: &RepoName, limit: i64) -> Result<Vec<DeletedTag>> {
        Ok(sqlx::query_as(
            "SELECT h.tag, h.old_digest AS digest, COALESCE(h.actor, 'anonymous') AS actor, h.at FROM tag_history h \
             JOIN repositories r ON r.id = h.repository_id \
             WHERE r.name = $1 AND h.kind = 'delete' AND h.old_digest IS NOT NULL \
             AND h.id = (SELECT MAX(x.id) FROM tag_history x WHERE x.repository_id = h.repository_id AND x.tag = h.tag) \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = h.repository_id AND t.name = h.tag) \
             ORDER BY h.at DESC, h.id DESC LIMIT $2",
        )
        .bind(repo.as_str())
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// Up to `limit` tags of `repo` after `after`, by name.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tag_rows(&self, repo: &RepoName, after: &str, limit: i64) -> Result<Vec<TagRow>> {
        Ok(sqlx::query_as(
            "SELECT t.name AS tag, m.digest, m.media_type, t.updated_at AS pushed_at, \
             CAST(m.size + (SELECT COALESCE(SUM(c.size), 0) FROM manifests c \
                 JOIN manifest_children mc ON mc.child_id = c.id WHERE mc.parent_id = m.id) \
               + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.id IN (SELECT mb.blob_id FROM manifest_blobs mb \
                 WHERE mb.manifest_id = m.id UNION SELECT mb.blob_id FROM manifest_children mc \
                 JOIN manifest_blobs mb ON mb.manifest_id = mc.child_id WHERE mc.parent_id = m.id)) \
               AS BIGINT) AS size, \
             CAST((SELECT COUNT(*) FROM manifest_children mc WHERE mc.parent_id = m.id) AS BIGINT) AS children, \
             CAST((SELECT COUNT(*) FROM manifests x WHERE x.repository_id = m.repository_id \
                 AND x.subject_digest = m.digest AND x.deleted_at IS NULL) AS BIGINT) AS referrers, \
             (SELECT COALESCE(h.actor, 'anonymous') FROM tag_history h WHERE h.repository_id = t.repository_id AND h.tag = t.name \
              AND h.new_digest = m.digest ORDER BY h.id DESC LIMIT 1) AS pushed_by, m.pulled_at \
             FROM tags t JOIN manifests m ON m.id = t.manifest_id JOIN repositories r ON r.id = t.repository_id \
             WHERE r.name = $1 AND t.name > $2 ORDER BY t.name LIMIT $3",
        )
        .bind(repo.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// Up to `limit` live manifests of `repo` no tag points at, newest first.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn untagged_rows(&self, repo: &RepoName, limit: i64) -> Result<Vec<UntaggedRow>> {
        Ok(sqlx::query_as(
            "SELECT m.digest, m.media_type, m.size, m.subject_digest, m.pushed_at, m.pulled_at \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id) \
             ORDER BY m.pushed_at DESC, m.id DESC LIMIT $2",
        )
        .bind(repo.as_str())
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// The tags of `repo` that point at `digest`, by name.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tags_at(&self, repo: &RepoName, digest: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT t.name FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             JOIN repositories r ON r.id = m.repository_id WHERE r.name = $1 AND m.digest = $2 ORDER BY t.name",
        )
        .bind(repo.as_str())
        .bind(digest)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    /// Up to `limit` deleted repositories, most recently deleted first, with counts and sizes.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn deleted_repositories(&self, limit: i64) -> Result<Vec<RepositorySummary>> {
        let sql = format!(
            "{} WHERE r.deleted_at IS NOT NULL ORDER BY r.deleted_at DESC, r.name LIMIT $1",
            super::reports::SUMMARY
        );
        Ok(sqlx::query_as(&sql).bind(limit).fetch_all(&self.read).await?)
    }

    /// Live repositories whose name contains `text`, after `last`, at most `limit`, with counts
    /// and sizes.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repositories_matching(
        &self,
        text: &str,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RepositorySummary>> {
        let sql = format!(
            "{} WHERE r.deleted_at IS NULL AND r.name LIKE $1 ESCAPE '\\' AND r.name > $2 ORDER BY r.name LIMIT $3",
            super::reports::SUMMARY
        );
        let escaped = text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        Ok(sqlx::query_as(&sql)
            .bind(format!("%{escaped}%"))
            .bind(last.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.read)
            .await?)
    }
}
