//! What only pull-through caches need: each cached tag's last upstream resolution
//! (`proxy_tags`), manifests fetched before their blobs (`proxy_pending`), and the eviction's
//! reads. Cached manifests and blobs themselves are ordinary rows, recorded by the push path.

use super::{MetaStore, Result};
use crate::oci::RepoName;

/// A cached tag's last resolution upstream.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProxyTag {
    /// The digest the upstream named.
    pub digest: String,
    /// When the upstream was last asked (Unix ms).
    pub checked_at: i64,
}

/// A manifest fetched from an upstream, not yet recorded (some blob it references is not here).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingManifest {
    /// Its digest.
    pub digest: String,
    /// Its media type as the upstream served it.
    pub media_type: String,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// A cached image the evictor may take: a live manifest no live index lists.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CachedRoot {
    /// Its row id.
    pub id: i64,
    /// Its repository.
    pub repository: String,
    /// Its digest.
    pub digest: String,
    /// Its last push (fill) or pull, Unix ms.
    pub last_used: i64,
}

impl MetaStore {
    /// How tag `tag` of cached repository `repo` was last resolved upstream.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn proxy_tag(&self, repo: &RepoName, tag: &str) -> Result<Option<ProxyTag>> {
        Ok(sqlx::query_as("SELECT digest, checked_at FROM proxy_tags WHERE repository = $1 AND tag = $2")
            .bind(repo.as_str())
            .bind(tag)
            .fetch_optional(&self.read)
            .await?)
    }

    /// Records that the upstream named `digest` for tag `tag` of `repo` when asked at
    /// `checked_at` — unless a resolution asked later is recorded already.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn set_proxy_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        digest: &str,
        checked_at: i64,
    ) -> Result<()> {
        self.write_proxy_tag(
            "INSERT INTO proxy_tags (repository, tag, digest, checked_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (repository, tag) DO UPDATE SET digest = excluded.digest, checked_at = excluded.checked_at \
             WHERE proxy_tags.checked_at <= excluded.checked_at",
            repo,
            tag,
            digest,
            checked_at,
        )
        .await
    }

    async fn write_proxy_tag(
        &self,
        sql: &str,
        repo: &RepoName,
        tag: &str,
        digest: &str,
        at: i64,
    ) -> Result<()> {
        sqlx::query(sql).bind(repo.as_str()).bind(tag).bind(digest).bind(at).execute(&self.write).await?;
        Ok(())
    }

    /// Forgets tag `tag` of `repo` (the upstream no longer has it).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn drop_proxy_tag(&self, repo: &RepoName, tag: &str) -> Result<()> {
        sqlx::query("DELETE FROM proxy_tags WHERE repository = $1 AND tag = $2")
            .bind(repo.as_str())
            .bind(tag)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// The cached tags of `repo` whose last resolution was `digest`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn proxy_tags_naming(&self, repo: &RepoName, digest: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT tag FROM proxy_tags WHERE repository = $1 AND digest = $2 ORDER BY tag")
                .bind(repo.as_str())
                .bind(digest)
                .fetch_all(&self.write)
                .await?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    /// The fetched, not yet recorded manifest `digest` of `repo`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn pending_manifest(&self, repo: &RepoName, digest: &str) -> Result<Option<PendingManifest>> {
        Ok(sqlx::query_as(
            "SELECT digest, media_type, payload FROM proxy_pending WHERE repository = $1 AND digest = $2",
        )
        .bind(repo.as_str())
        .bind(digest)
        .fetch_optional(&self.read)
        .await?)
    }

    /// Every fetched, not yet recorded manifest of `repo` (read from the primary: a blob just
    /// linked decides which can be recorded now).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn pending_manifests(&self, repo: &RepoName) -> Result<Vec<PendingManifest>> {
        Ok(sqlx::query_as(
            "SELECT digest, media_type, payload FROM proxy_pending WHERE repository = $1 ORDER BY fetched_at LIMIT 1000",
        )
        .bind(repo.as_str())
        .fetch_all(&self.write)
        .await?)
    }

    /// Keeps manifest `digest` of `repo`, fetched at `now`, until its blobs are here.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn add_pending_manifest(
        &self,
        repo: &RepoName,
        digest: &str,
        media_type: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO proxy_pending (repository, digest, media_type, payload, fetched_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (repository, digest) DO UPDATE SET fetched_at = excluded.fetched_at",
        )
        .bind(repo.as_str())
        .bind(digest)
        .bind(media_type)
        .bind(payload)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Drops pending manifest `digest` of `repo` (recorded now, or abandoned).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn drop_pending_manifest(&self, repo: &RepoName, digest: &str) -> Result<()> {
        sqlx::query("DELETE FROM proxy_pending WHERE repository = $1 AND digest = $2")
            .bind(repo.as_str())
            .bind(digest)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Marks the cache's resolution of `tag` as checked at `checked_at`, if it still names
    /// `digest` (a revalidation never brings back a resolution deleted or moved meanwhile).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn touch_proxy_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        digest: &str,
        checked_at: i64,
    ) -> Result<()> {
        self.write_proxy_tag(
            "UPDATE proxy_tags SET checked_at = $4 \
             WHERE repository = $1 AND tag = $2 AND digest = $3 AND checked_at < $4",
            repo,
            tag,
            digest,
            checked_at,
        )
        .await
    }

    /// Forgets everything cached about `repo` but its content (its repository was deleted).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn drop_proxy_rows(&self, repo: &RepoName) -> Result<()> {
        let tags: Vec<(String,)> = sqlx::query_as("SELECT tag FROM proxy_tags WHERE repository = $1")
            .bind(repo.as_str())
            .fetch_all(&self.write)
            .await?;
        for (tag,) in tags {
            self.drop_proxy_tag(repo, &tag).await?;
        }
        sqlx::query("DELETE FROM proxy_pending WHERE repository = $1")
            .bind(repo.as_str())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Drops pending manifests of repositories under `prefix` fetched before `before`, and the
    /// tag resolutions checked before then that name no live manifest; returns how many rows went.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn prune_proxy_rows(&self, prefix: &str, before: i64) -> Result<u64> {
        let under = format!("{prefix}/");
        let len = under.len() as i64;
        let pending = sqlx::query(
            "DELETE FROM proxy_pending WHERE SUBSTR(repository, 1, CAST($1 AS INTEGER)) = $2 AND fetched_at < $3",
        )
        .bind(len)
        .bind(&under)
        .bind(before)
        .execute(&self.write)
        .await?;
        // One row per statement: a recording share-locks the resolutions of its tags (in tag
        // order) while holding other rows; a statement deleting many in scan order could close
        // a cycle with it.
        let stale = "FROM proxy_tags WHERE SUBSTR(repository, 1, CAST($1 AS INTEGER)) = $2 AND checked_at < $3 \
             AND NOT EXISTS (SELECT 1 FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                             WHERE r.name = proxy_tags.repository AND m.digest = proxy_tags.digest \
                               AND m.deleted_at IS NULL)";
        let candidates: Vec<(String, String)> = sqlx::query_as(&format!("SELECT repository, tag {stale}"))
            .bind(len)
            .bind(&under)
            .bind(before)
            .fetch_all(&self.write)
            .await?;
        let delete = format!("DELETE {stale} AND repository = $4 AND tag = $5");
        let mut tags = 0;
        for (repository, tag) in candidates {
            tags += sqlx::query(&delete)
                .bind(len)
                .bind(&under)
                .bind(before)
                .bind(&repository)
                .bind(&tag)
                .execute(&self.write)
                .await?
                .rows_affected();
        }
        Ok(pending.rows_affected() + tags)
    }

    /// The bytes a cache holds: the distinct blobs the live manifests of its repositories
    /// (`prefix/…`) reference.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn cache_bytes(&self, prefix: &str) -> Result<i64> {
        let under = format!("{prefix}/");
        let (bytes,): (Option<i64>,) = sqlx::query_as(
            "SELECT CAST(SUM(b.size) AS BIGINT) FROM blobs b WHERE b.id IN ( \
                 SELECT mb.blob_id FROM manifest_blobs mb \
                 JOIN manifests m ON m.id = mb.manifest_id \
                 JOIN repositories r ON r.id = m.repository_id \
                 WHERE m.deleted_at IS NULL AND r.deleted_at IS NULL AND SUBSTR(r.name, 1, CAST($1 AS INTEGER)) = $2)",
        )
        .bind(under.len() as i64)
        .bind(&under)
        .fetch_one(&self.write)
        .await?;
        Ok(bytes.unwrap_or(0))
    }

    /// The cached images of repositories under `prefix` the evictor may take, least recently
    /// used first, after `after` (`(last_used, id)` of the last one seen): live manifests no live
    /// index lists, that are not a live manifest's referrer.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn cached_roots(
        &self,
        prefix: &str,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<CachedRoot>> {
        let under = format!("{prefix}/");
        let (after_used, after_id) = after.unwrap_or((i64::MIN, i64::MIN));
        Ok(sqlx::query_as(
            "SELECT id, repository, digest, last_used FROM ( \
             SELECT m.id, r.name AS repository, m.digest, \
                    CASE WHEN m.pulled_at IS NOT NULL AND m.pulled_at > m.pushed_at THEN m.pulled_at ELSE m.pushed_at END AS last_used \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE m.deleted_at IS NULL AND r.deleted_at IS NULL AND SUBSTR(r.name, 1, CAST($1 AS INTEGER)) = $2 \
               AND NOT EXISTS (SELECT 1 FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                               WHERE c.child_id = m.id AND p.deleted_at IS NULL) \
               AND NOT (m.subject_digest IS NOT NULL AND EXISTS (SELECT 1 FROM manifests s \
                        WHERE s.repository_id = m.repository_id AND s.digest = m.subject_digest \
                          AND s.deleted_at IS NULL))) AS roots \
             WHERE last_used > $3 OR (last_used = $3 AND id > $4) \
             ORDER BY last_used, id LIMIT $5",
        )
        .bind(under.len() as i64)
        .bind(&under)
        .bind(after_used)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.write)
        .await?)
    }
}
