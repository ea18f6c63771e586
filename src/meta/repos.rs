//! Repositories: a repository exists once something was linked or pushed into it.

use sqlx::AnyConnection;

use super::{MetaStore, Result};
use crate::oci::RepoName;

impl MetaStore {
    /// Whether a repository of this name was ever made (deleted or not), or an upload into it is
    /// open (a first push under way).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repository_known(&self, repo: &RepoName) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT 1 FROM repositories WHERE name = $1 UNION ALL SELECT 1 FROM uploads WHERE repository = $1 LIMIT 1",
        )
        .bind(repo.as_str())
        .fetch_optional(&self.read)
        .await?;
        Ok(row.is_some())
    }

    /// Whether `repo` exists and is not deleted.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repository_exists(&self, repo: &RepoName) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM repositories WHERE name = $1 AND deleted_at IS NULL")
                .bind(repo.as_str())
                .fetch_optional(&self.read)
                .await?;
        Ok(row.is_some())
    }

    /// Names of the repositories with something visible in them (a live manifest or a linked
    /// blob) after `last`, in order, at most `limit`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn list_repositories(&self, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT r.name FROM repositories r WHERE r.name > $1 AND r.deleted_at IS NULL \
             AND (EXISTS (SELECT 1 FROM manifests m WHERE m.repository_id = r.id AND m.deleted_at IS NULL) \
             OR EXISTS (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = r.id AND rb.hidden_by_delete IS NULL)) \
             ORDER BY r.name LIMIT $2",
        )
        .bind(last.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    /// The id of `repo`, created if missing, and share-locked (`lock`) so that a concurrent
    /// repository delete waits for this transaction or is waited for. Writing into a deleted
    /// repository makes its name live again (as an empty repository: what the delete took stays
    /// restorable). The lock is taken before the deleted mark is read, so a delete that commits
    /// while this transaction waits is seen.
    pub(super) async fn ensure_repository(
        tx: &mut AnyConnection,
        repo: &RepoName,
        now: i64,
        lock: &str,
    ) -> Result<i64, sqlx::Error> {
        let made = sqlx::query(
            "INSERT INTO repositories (name, created_at) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(repo.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let sql = format!("SELECT id, deleted_at FROM repositories WHERE name = $1{lock}");
        let (id, deleted_at): (i64, Option<i64>) =
            sqlx::query_as(&sql).bind(repo.as_str()).fetch_one(&mut *tx).await?;
        if deleted_at.is_some() {
            sqlx::query("UPDATE repositories SET deleted_at = NULL, delete_id = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if made || deleted_at.is_some() {
            super::quotas::note(super::quotas::Change::Repository { repo: id, delta: 1 });
        }
        Ok(id)
    }
}
