//! Repositories: a repository exists once something was linked or pushed into it.

use sqlx::AnyConnection;

use super::{MetaStore, Result};
use crate::oci::RepoName;

impl MetaStore {
    /// Whether the repository exists (has ever had content linked or pushed).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repository_exists(&self, repo: &RepoName) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM repositories WHERE name = $1")
            .bind(repo.as_str())
            .fetch_optional(&self.read)
            .await?;
        Ok(row.is_some())
    }

    /// Repository names after `last`, in order, at most `limit`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn list_repositories(&self, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2")
                .bind(last.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    /// The id of `repo`, created if missing.
    pub(super) async fn ensure_repository(
        tx: &mut AnyConnection,
        repo: &RepoName,
        now: i64,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query(
            "INSERT INTO repositories (name, created_at) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(repo.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (id,): (i64,) = sqlx::query_as("SELECT id FROM repositories WHERE name = $1")
            .bind(repo.as_str())
            .fetch_one(&mut *tx)
            .await?;
        Ok(id)
    }
}
