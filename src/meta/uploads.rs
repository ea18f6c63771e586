//! Upload sessions: a row per session, holding the hash state of the bytes received so far.

use super::{CompletedUpload, Error, MetaStore, Result, transaction};
use crate::meta::UploadRow;
use crate::oci::{Digest, RepoName};

impl MetaStore {
    /// Records a new upload session.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn create_upload(&self, upload: &UploadRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO uploads (id, repository, storage_key, size, hash_state, chunks, started_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&upload.id)
        .bind(&upload.repository)
        .bind(&upload.storage_key)
        .bind(upload.size)
        .bind(&upload.hash_state)
        .bind(&upload.chunks)
        .bind(upload.started_at)
        .bind(upload.updated_at)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// The upload session `id`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn upload(&self, id: &str) -> Result<Option<UploadRow>> {
        Ok(sqlx::query_as(
            "SELECT id, repository, storage_key, size, hash_state, chunks, started_at, updated_at \
             FROM uploads WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.write)
        .await?)
    }

    /// Records that the session now holds `new_size` bytes with hash state `state` (in the
    /// objects `chunks`, on object storage), provided it still holds `expected_size` bytes in
    /// `expected_chunks` — so of two writers of one session only one can advance it — and, for a
    /// write that held the session (`writer`), that it still does; the hold ends. Returns whether
    /// it was advanced.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    #[expect(clippy::too_many_arguments, reason = "the expected and the new state of one session")]
    pub async fn advance_upload(
        &self,
        id: &str,
        expected_size: i64,
        expected_chunks: &str,
        writer: Option<&str>,
        new_size: i64,
        state: &[u8],
        chunks: &str,
        now: i64,
    ) -> Result<bool> {
        let held = if writer.is_some() { " AND writer = $8" } else { "" };
        let done = sqlx::query(&format!(
            "UPDATE uploads SET size = $1, hash_state = $2, chunks = $3, updated_at = $4, \
             writer = CASE WHEN writer = $8 THEN NULL ELSE writer END \
             WHERE id = $5 AND size = $6 AND chunks = $7{held}"
        ))
        .bind(new_size)
        .bind(state)
        .bind(chunks)
        .bind(now)
        .bind(id)
        .bind(expected_size)
        .bind(expected_chunks)
        .bind(writer.unwrap_or(""))
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Makes `writer` the only request that may add to session `id`'s open multipart upload
    /// until `until`, provided the session still holds `expected_size` bytes in `expected_chunks`
    /// and nobody else holds it (or their hold has run out). Returns whether it now holds it.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn hold_upload(
        &self,
        id: &str,
        expected_size: i64,
        expected_chunks: &str,
        writer: &str,
        now: i64,
        until: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE uploads SET writer = $1, writer_until = $2, updated_at = $3 \
             WHERE id = $4 AND size = $5 AND chunks = $6 AND (writer IS NULL OR writer_until < $3)",
        )
        .bind(writer)
        .bind(until)
        .bind(now)
        .bind(id)
        .bind(expected_size)
        .bind(expected_chunks)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Extends `writer`'s hold on session `id` to `until` (and notes activity at `now`). Returns
    /// false when it no longer holds it.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn renew_upload_hold(&self, id: &str, writer: &str, now: i64, until: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE uploads SET writer_until = $1, updated_at = $2 WHERE id = $3 AND writer = $4",
        )
        .bind(until)
        .bind(now)
        .bind(id)
        .bind(writer)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Lets go of `writer`'s hold on session `id` (a write that failed).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn release_upload_hold(&self, id: &str, writer: &str) -> Result<()> {
        sqlx::query("UPDATE uploads SET writer = NULL WHERE id = $1 AND writer = $2")
            .bind(id)
            .bind(writer)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Notes that session `id` (still holding `expected_size` bytes) is receiving bytes at `now`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn touch_upload(&self, id: &str, expected_size: i64, now: i64) -> Result<()> {
        sqlx::query("UPDATE uploads SET updated_at = $1 WHERE id = $2 AND size = $3 AND updated_at < $1")
            .bind(now)
            .bind(id)
            .bind(expected_size)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Removes an upload session; returns its storage key if it existed.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn delete_upload(&self, id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("DELETE FROM uploads WHERE id = $1 RETURNING storage_key")
                .bind(id)
                .fetch_optional(&self.write)
                .await?;
        Ok(row.map(|(k,)| k))
    }

    /// Removes up to `limit` sessions that received nothing since `idle_before` and, in the
    /// same transaction, sends the objects they recorded to the outbox (a session key that is a
    /// prefix is not an object; what a session wrote but never recorded is left to the sweep).
    /// Returns how many sessions went. Safe on several replicas at once: a session is removed by
    /// exactly one of them.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn expire_uploads(&self, idle_before: i64, limit: i64, now: i64) -> Result<u64> {
        let skip_locked = match self.dialect {
            super::Dialect::Sqlite => "",
            super::Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        let due = format!(
            "SELECT id, storage_key, chunks FROM uploads WHERE updated_at < $1 ORDER BY updated_at LIMIT $2{skip_locked}"
        );
        transaction!(self, Error, |tx| {
            let sessions: Vec<(String, String, String)> =
                sqlx::query_as(&due).bind(idle_before).bind(limit).fetch_all(&mut *tx).await?;
            for (id, key, chunks) in &sessions {
                Self::drop_session(tx, id, key, chunks, now).await?;
            }
            Ok(sessions.len() as u64)
        })
    }

    /// Removes session `id` and, in the same transaction, sends `objects` (what holds its
    /// bytes) and those it recorded to the outbox: a refused completion, of which nothing stays.
    /// Whether the session was there.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn discard_upload(&self, id: &str, objects: &[String], now: i64) -> Result<bool> {
        let lock = self.update_lock_of("uploads");
        transaction!(self, Error, |tx| {
            let session: Option<(String, String)> =
                sqlx::query_as(&format!("SELECT storage_key, chunks FROM uploads WHERE id = $1{lock}"))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((key, chunks)) = session else { return Ok(false) };
            Self::drop_session(tx, id, &key, &chunks, now).await?;
            for object in objects {
                Self::to_outbox(tx, object, now).await?;
            }
            Ok(true)
        })
    }

    /// Deletes a session's row and sends the objects it recorded to the outbox (a session key
    /// that is a prefix is not an object; what a session wrote but never recorded is left to the
    /// sweep).
    async fn drop_session(
        tx: &mut sqlx::AnyConnection,
        id: &str,
        key: &str,
        chunks: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(&mut *tx).await?;
        // An open multipart upload goes by its marker, which aborts it when deleted.
        #[derive(serde::Deserialize)]
        struct Recorded {
            key: String,
            multipart: Option<OpenMultipart>,
        }
        #[derive(serde::Deserialize)]
        struct OpenMultipart {
            marker: String,
        }
        let recorded: Vec<Recorded> = serde_json::from_str(chunks).unwrap_or_default();
        let objects = recorded
            .into_iter()
            .flat_map(|c| std::iter::once(c.key).chain(c.multipart.map(|m| m.marker)))
            .chain((!key.ends_with('/')).then(|| key.to_string()));
        for object in objects {
            Self::to_outbox(tx, &object, now).await?;
        }
        Ok(())
    }

    /// How many sessions received nothing since `idle_before` (what expiry would remove now).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn idle_uploads(&self, idle_before: i64) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM uploads WHERE updated_at < $1")
            .bind(idle_before)
            .fetch_one(&self.read)
            .await?;
        Ok(n as u64)
    }

    /// Turns a finished upload into a blob linked in its repository, in one transaction: the
    /// session (which must still hold `expected_size` bytes) is removed, the blob row is created with
    /// `storage_key` unless the digest is already stored, and the blob is linked.
    /// Returns `None` when the session no longer exists or has moved on.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    #[expect(clippy::too_many_arguments, reason = "one call site; the parameters are the event")]
    pub async fn complete_upload(
        &self,
        upload_id: &str,
        expected_size: i64,
        repo: &RepoName,
        digest: &Digest,
        size: i64,
        storage_key: &str,
        now: i64,
    ) -> Result<Option<CompletedUpload>> {
        let (lock, dialect) = (self.share_lock(), self.dialect);
        let grace = self.windows().blob_grace_ms;
        transaction!(self, Error, |tx| {
            let gone = sqlx::query("DELETE FROM uploads WHERE id = $1 AND size = $2")
                .bind(upload_id)
                .bind(expected_size)
                .execute(&mut *tx)
                .await?;
            if gone.rows_affected() != 1 {
                return Ok(None);
            }
            let (blob_id, outcome) = Self::store_blob(tx, digest, size, storage_key, now, dialect).await?;
            if let CompletedUpload::AlreadyStored { discard_key } = &outcome {
                // The redundant copy is deleted right after commit; the outbox makes sure of it
                // even if this process dies first (no row will ever name this fresh key).
                Self::to_outbox(tx, discard_key, now).await?;
            }
            let repo_id = Self::ensure_repository(tx, repo, now, lock).await?;
            Self::link(tx, repo_id, blob_id, now, now.saturating_add(grace)).await?;
            Ok(Some(outcome))
        })
    }
}
