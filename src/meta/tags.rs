//! Tags — mutable names for manifests, kept apart from them — and the history of every move.

use sqlx::AnyConnection;

use super::{Dialect, MetaStore, Result};
use crate::meta::TagMove;
use crate::oci::{Digest, RepoName, Tag};

impl MetaStore {
    /// Points `tag` at `manifest_id` and records the move in the tag history (nothing when it
    /// points there already). `lock` is [`MetaStore::update_lock_of`] for the tag row `t`: only
    /// the tag row is locked, never the manifest it pointed at (which other transactions
    /// share-lock as a reference — locking it too let two tagged index pushes deadlock). A tag
    /// that does not exist yet is created by an insert that waits for any concurrent creator, so
    /// of two creators the second sees the first's row and records the move away from it.
    #[expect(clippy::too_many_arguments, reason = "the parameters are the event")]
    pub(super) async fn set_tag(
        tx: &mut AnyConnection,
        repo_id: i64,
        tag: &Tag,
        manifest_id: i64,
        digest: &Digest,
        actor: Option<&str>,
        now: i64,
        lock: &str,
    ) -> Result<(), sqlx::Error> {
        let current_sql = format!(
            "SELECT t.manifest_id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{lock}"
        );
        let mut old_digest = None;
        let mut recorded = false;
        for _ in 0..3 {
            let created: Option<(i64,)> = sqlx::query_as(
                "INSERT INTO tags (repository_id, name, manifest_id, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (repository_id, name) DO NOTHING RETURNING manifest_id",
            )
            .bind(repo_id)
            .bind(tag.as_str())
            .bind(manifest_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if created.is_some() {
                recorded = true;
                break;
            }
            let current: Option<(i64, String)> = sqlx::query_as(&current_sql)
                .bind(repo_id)
                .bind(tag.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            // Gone between the two statements (a concurrent tag delete): create it again.
            let Some((current_id, current_digest)) = current else { continue };
            if current_id == manifest_id {
                return Ok(());
            }
            sqlx::query(
                "UPDATE tags SET manifest_id = $1, updated_at = $2 WHERE repository_id = $3 AND name = $4",
            )
            .bind(manifest_id)
            .bind(now)
            .bind(repo_id)
            .bind(tag.as_str())
            .execute(&mut *tx)
            .await?;
            old_digest = Some(current_digest);
            recorded = true;
            break;
        }
        if !recorded {
            return Err(sqlx::Error::RowNotFound);
        }
        sqlx::query(
            "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(repo_id)
        .bind(tag.as_str())
        .bind(old_digest)
        .bind(digest.as_str())
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Every move of `tag` in `repo`, oldest first: (old digest, new digest, actor, time).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn tag_history(&self, repo: &RepoName, tag: &Tag) -> Result<Vec<TagMove>> {
        Ok(sqlx::query_as(
            "SELECT h.old_digest, h.new_digest, h.actor, h.at FROM tag_history h \
             JOIN repositories r ON r.id = h.repository_id WHERE r.name = $1 AND h.tag = $2 ORDER BY h.id",
        )
        .bind(repo.as_str())
        .bind(tag.as_str())
        .fetch_all(&self.read)
        .await?)
    }

    /// Tags of `repo` after `last` in byte order, at most `limit`; `None` if the repository does
    /// not exist.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Option<Vec<String>>> {
        // One row holding the whole page, newline-separated (tags cannot contain newlines):
        // decoding thousands of rows one by one costs far more than the query.
        // Tags on tombstones are never listed (deletes remove them in the same transaction; the join
        // keeps that true whatever wrote the rows).
        let page = "SELECT t.name FROM tags t JOIN repositories r ON r.id = t.repository_id \
                    JOIN manifests m ON m.id = t.manifest_id \
                    WHERE r.name = $1 AND t.name > $2 AND m.deleted_at IS NULL ORDER BY t.name LIMIT $3";
        let sql = match self.dialect {
            // The page comes out of the (repository, name) index in order; an ORDER BY inside
            // the aggregate would sort it again through a temporary b-tree (most of the cost of
            // a 10,000-tag list). The order is checked below instead.
            Dialect::Sqlite => format!("SELECT group_concat(name, char(10)) FROM ({page})"),
            Dialect::Postgres => {
                format!("SELECT string_agg(name, E'\\n' ORDER BY name COLLATE \"C\") FROM ({page}) AS page")
            }
        };
        let (joined,): (Option<String>,) = sqlx::query_as(&sql)
            .bind(repo.as_str())
            .bind(last.unwrap_or(""))
            .bind(limit)
            .fetch_one(&self.read)
            .await?;
        let mut tags: Vec<String> =
            joined.map(|j| j.split('\n').map(str::to_string).collect()).unwrap_or_default();
        // Byte order whatever the aggregate did; linear for input already in order.
        tags.sort_unstable();
        if tags.is_empty() && !self.repository_exists(repo).await? {
            return Ok(None);
        }
        Ok(Some(tags))
    }
}
