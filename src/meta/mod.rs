//! The metadata store: repositories, blobs and their links, manifests, tags, tag history and
//! upload sessions, over SQLite (embedded) or PostgreSQL (scale-out).
//!
//! Every public method is one transaction that keeps one invariant; callers never hold a
//! transaction across storage I/O. SQL text is shared between the dialects (`$N` placeholders,
//! `ON CONFLICT`, `RETURNING` mean the same in both); the few statements that differ — row locks —
//! are chosen by [`Dialect`] in one place. Only this module touches sqlx. Times are passed in
//! from the application clock, never taken from the database's `now()`.

mod rows;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection as _, Executor as _, Transaction};

use crate::oci::{Digest, Reference, RepoName, Tag};
pub use rows::{BlobRow, ManifestHead, ManifestRow, ReferrerRow, TagMove, UploadRow};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed or could not be reached.
    #[error("metadata store: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("metadata migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The metadata URL is not one Berth can use.
    #[error("unsupported metadata URL `{0}` (expected sqlite:… or postgres://…)")]
    UnsupportedUrl(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Which SQL dialect the store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite in WAL mode; one writer connection serialises all writes.
    Sqlite,
    /// PostgreSQL; writers lock the rows they depend on.
    Postgres,
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Connections for readers (and, on PostgreSQL, writers).
    pub max_connections: u32,
    /// How long to wait for a free connection.
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions { max_connections: 8, acquire_timeout: Duration::from_secs(10) }
    }
}

/// The metadata store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaStore {
    read: AnyPool,
    write: AnyPool,
    dialect: Dialect,
}

/// Outcome of completing an upload.
#[derive(Debug, PartialEq, Eq)]
pub enum CompletedUpload {
    /// The uploaded bytes became the blob, stored under the given key.
    Stored,
    /// The blob already existed; the uploaded bytes under `discard_key` are now redundant.
    AlreadyStored {
        /// The key of the redundant copy, to delete after commit.
        discard_key: String,
    },
}

/// A manifest to store, with what it references.
#[derive(Debug)]
pub struct NewManifest<'a> {
    /// The digest of `payload`.
    pub digest: &'a Digest,
    /// Media type it is served with.
    pub media_type: &'a str,
    /// The referrers API's artifact type.
    pub artifact_type: Option<&'a str>,
    /// The digest of its subject, if any.
    pub subject: Option<&'a Digest>,
    /// Annotations as JSON text, if any.
    pub annotations: Option<String>,
    /// The exact bytes pushed.
    pub payload: &'a [u8],
    /// Blobs that must be linked in the repository.
    pub blobs: &'a [Digest],
    /// Manifests that must be present in the repository.
    pub children: &'a [Digest],
}

/// Why a manifest could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PutManifestError {
    /// Blobs it references are not in the repository.
    #[error("blobs not in the repository: {0:?}")]
    MissingBlobs(Vec<Digest>),
    /// Manifests it lists are not in the repository.
    #[error("manifests not in the repository: {0:?}")]
    MissingManifests(Vec<Digest>),
    /// The store failed.
    #[error(transparent)]
    Meta(#[from] Error),
}

impl From<sqlx::Error> for PutManifestError {
    fn from(e: sqlx::Error) -> Self {
        PutManifestError::Meta(Error::Database(e))
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

fn sqlite_pragmas(conn: &mut AnyConnection) -> futures_util::future::BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        conn.execute(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
        )
        .await
        .map(|_| ())
    })
}

impl MetaStore {
    /// Opens the store at `url` (`sqlite:path` or `postgres://…`) and applies migrations.
    ///
    /// # Errors
    /// [`Error`] when the URL is unsupported, the database cannot be reached, or a migration fails.
    pub async fn open(url: &str, pool: &PoolOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        if url.starts_with("sqlite:") {
            Self::open_sqlite(url, pool).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = AnyConnectOptions::from_str(url)?;
            let pg = AnyPoolOptions::new()
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout)
                .connect_with(opts)
                .await?;
            // sqlx takes an advisory lock, so replicas starting together migrate once.
            POSTGRES_MIGRATIONS.run(&pg).await?;
            Ok(MetaStore { read: pg.clone(), write: pg, dialect: Dialect::Postgres })
        } else {
            Err(Error::UnsupportedUrl(url.to_string()))
        }
    }

    async fn open_sqlite(url: &str, pool: &PoolOptions) -> Result<Self> {
        let url = if url.contains('?') { url.to_string() } else { format!("{url}?mode=rwc") };
        let opts = AnyConnectOptions::from_str(&url)?;
        // One writer connection: SQLite allows a single writer anyway, and queueing in the pool
        // is cheaper than busy-waiting on the file lock.
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool.acquire_timeout)
            .after_connect(|c, _| sqlite_pragmas(c))
            .connect_with(opts.clone())
            .await?;
        SQLITE_MIGRATIONS.run(&write).await?;
        let read = AnyPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            .after_connect(|c, _| sqlite_pragmas(c))
            .connect_with(opts)
            .await?;
        Ok(MetaStore { read, write, dialect: Dialect::Sqlite })
    }

    /// The dialect in use.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// Checks that the database answers.
    ///
    /// # Errors
    /// [`Error::Database`] when it does not.
    pub async fn ping(&self) -> Result<()> {
        self.read.acquire().await?.ping().await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Any>> {
        Ok(match self.dialect {
            // IMMEDIATE takes the write lock up front, so a transaction never fails halfway
            // when it upgrades from reading to writing.
            Dialect::Sqlite => self.write.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.write.begin().await?,
        })
    }

    /// The clause that locks the rows a write depends on until commit (shared lock), so a
    /// concurrent delete of those rows waits or is waited for. SQLite's single writer already
    /// serialises writers.
    fn share_lock(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR SHARE",
        }
    }

    /// Like [`MetaStore::share_lock`], but exclusive: for rows the transaction will update.
    fn update_lock(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    // ---------------------------------------------------------------- repositories

    /// Whether the repository exists (has ever had content linked or pushed).
    ///
    /// # Errors
    /// [`Error::Database`].
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
    /// [`Error::Database`].
    pub async fn list_repositories(&self, last: Option<&str>, limit: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM repositories WHERE name > $1 ORDER BY name LIMIT $2")
                .bind(last.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.read)
                .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    async fn ensure_repository(
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

    // ---------------------------------------------------------------- blobs

    /// The blob `digest` if it is linked in `repo`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobRow>> {
        Ok(sqlx::query_as(
            "SELECT b.digest, b.size, b.storage_key FROM blobs b \
             JOIN repository_blobs rb ON rb.blob_id = b.id \
             JOIN repositories r ON r.id = rb.repository_id \
             WHERE r.name = $1 AND b.digest = $2",
        )
        .bind(repo.as_str())
        .bind(digest.as_str())
        .fetch_optional(&self.read)
        .await?)
    }

    /// Links `digest` into `to` if it is linked in `from` (a cross-repository mount).
    /// Returns whether it was linked.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT b.id FROM blobs b \
             JOIN repository_blobs rb ON rb.blob_id = b.id \
             JOIN repositories r ON r.id = rb.repository_id \
             WHERE r.name = $1 AND b.digest = $2{}",
            self.share_lock()
        );
        let found: Option<(i64,)> =
            sqlx::query_as(&sql).bind(from.as_str()).bind(digest.as_str()).fetch_optional(&mut *tx).await?;
        let Some((blob_id,)) = found else {
            return Ok(false);
        };
        let repo_id = Self::ensure_repository(&mut tx, to, now).await?;
        Self::link(&mut tx, repo_id, blob_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn link(tx: &mut AnyConnection, repo_id: i64, blob_id: i64, now: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO repository_blobs (repository_id, blob_id, linked_at) VALUES ($1, $2, $3) \
             ON CONFLICT (repository_id, blob_id) DO UPDATE SET linked_at = excluded.linked_at",
        )
        .bind(repo_id)
        .bind(blob_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- uploads

    /// Records a new upload session.
    ///
    /// # Errors
    /// [`Error::Database`].
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
    /// [`Error::Database`].
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
    /// objects `chunks`, on object storage), provided it still holds `expected_size` — so of two
    /// writers of one session only one can advance it. Returns whether it was advanced.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn advance_upload(
        &self,
        id: &str,
        expected_size: i64,
        new_size: i64,
        state: &[u8],
        chunks: &str,
        now: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE uploads SET size = $1, hash_state = $2, chunks = $3, updated_at = $4 \
             WHERE id = $5 AND size = $6",
        )
        .bind(new_size)
        .bind(state)
        .bind(chunks)
        .bind(now)
        .bind(id)
        .bind(expected_size)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes an upload session; returns its storage key if it existed.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn delete_upload(&self, id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> =
            sqlx::query_as("DELETE FROM uploads WHERE id = $1 RETURNING storage_key")
                .bind(id)
                .fetch_optional(&self.write)
                .await?;
        Ok(row.map(|(k,)| k))
    }

    /// Removes up to `limit` sessions that received nothing since `idle_before`, returning their
    /// storage keys (whose objects the caller deletes after this commits). Safe to run on several
    /// replicas at once: a session is returned to exactly one of them.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn expire_uploads(&self, idle_before: i64, limit: i64) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "DELETE FROM uploads WHERE id IN \
             (SELECT id FROM uploads WHERE updated_at < $1 ORDER BY updated_at LIMIT $2) \
             AND updated_at < $1 RETURNING storage_key",
        )
        .bind(idle_before)
        .bind(limit)
        .fetch_all(&self.write)
        .await?;
        Ok(rows.into_iter().map(|(k,)| k).collect())
    }

    /// Turns a finished upload into a blob linked in its repository, in one transaction: the
    /// session (which must still hold `expected_size` bytes) is removed, the blob row is created with
    /// `storage_key` unless the digest is already stored, and the blob is linked.
    /// Returns `None` when the session no longer exists or has moved on.
    ///
    /// # Errors
    /// [`Error::Database`].
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
        let mut tx = self.begin().await?;
        let gone = sqlx::query("DELETE FROM uploads WHERE id = $1 AND size = $2")
            .bind(upload_id)
            .bind(expected_size)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() != 1 {
            return Ok(None);
        }
        let (blob_id, outcome) =
            Self::store_blob(&mut tx, digest, size, storage_key, now, self.share_lock()).await?;
        let repo_id = Self::ensure_repository(&mut tx, repo, now).await?;
        Self::link(&mut tx, repo_id, blob_id, now).await?;
        tx.commit().await?;
        Ok(Some(outcome))
    }

    /// Records bytes stored under `storage_key` as blob `digest` (unless the digest is stored
    /// already) and links it in `repo`, in one transaction — a whole blob pushed in one request.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn store_and_link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: i64,
        storage_key: &str,
        now: i64,
    ) -> Result<CompletedUpload> {
        let mut tx = self.begin().await?;
        let (blob_id, outcome) =
            Self::store_blob(&mut tx, digest, size, storage_key, now, self.share_lock()).await?;
        let repo_id = Self::ensure_repository(&mut tx, repo, now).await?;
        Self::link(&mut tx, repo_id, blob_id, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Inserts the blob row unless the digest is stored already.
    async fn store_blob(
        tx: &mut AnyConnection,
        digest: &Digest,
        size: i64,
        storage_key: &str,
        now: i64,
        lock: &str,
    ) -> Result<(i64, CompletedUpload), sqlx::Error> {
        let inserted: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO blobs (digest, size, storage_key, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (digest) DO NOTHING RETURNING id",
        )
        .bind(digest.as_str())
        .bind(size)
        .bind(storage_key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((id,)) = inserted {
            return Ok((id, CompletedUpload::Stored));
        }
        let sql = format!("SELECT id FROM blobs WHERE digest = $1{lock}");
        let (id,): (i64,) = sqlx::query_as(&sql).bind(digest.as_str()).fetch_one(&mut *tx).await?;
        Ok((id, CompletedUpload::AlreadyStored { discard_key: storage_key.to_string() }))
    }

    // ---------------------------------------------------------------- manifests and tags

    /// Stores a manifest in `repo` (or revives or refreshes it if present) and optionally points
    /// `tag` at it, recording the tag move, in one transaction. Every referenced blob must be
    /// linked in the repository and every child manifest present there; those rows are locked
    /// until commit so a concurrent collector cannot remove them underneath the new reference.
    ///
    /// # Errors
    /// [`PutManifestError::MissingBlobs`] / [`PutManifestError::MissingManifests`] naming what is
    /// absent; [`PutManifestError::Meta`] when the store fails.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: &NewManifest<'_>,
        tag: Option<&Tag>,
        actor: Option<&str>,
        now: i64,
    ) -> Result<(), PutManifestError> {
        let mut tx = self.begin().await?;
        let repo_id = Self::ensure_repository(&mut tx, repo, now).await?;

        let blob_sql = format!(
            "SELECT b.id FROM blobs b JOIN repository_blobs rb ON rb.blob_id = b.id \
             WHERE rb.repository_id = $1 AND b.digest = $2{}",
            self.share_lock()
        );
        let mut blob_ids = Vec::with_capacity(manifest.blobs.len());
        let mut missing = Vec::new();
        for digest in manifest.blobs {
            let row: Option<(i64,)> = sqlx::query_as(&blob_sql)
                .bind(repo_id)
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some((id,)) => blob_ids.push(id),
                None => missing.push(digest.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(PutManifestError::MissingBlobs(missing));
        }

        let child_sql = format!(
            "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2 \
             AND deleted_at IS NULL{}",
            self.share_lock()
        );
        let mut child_ids = Vec::with_capacity(manifest.children.len());
        for digest in manifest.children {
            let row: Option<(i64,)> = sqlx::query_as(&child_sql)
                .bind(repo_id)
                .bind(digest.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some((id,)) => child_ids.push(id),
                None => missing.push(digest.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(PutManifestError::MissingManifests(missing));
        }

        let inserted: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO manifests (repository_id, digest, media_type, artifact_type, \
             subject_digest, annotations, size, payload, pushed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (repository_id, digest) DO NOTHING RETURNING id",
        )
        .bind(repo_id)
        .bind(manifest.digest.as_str())
        .bind(manifest.media_type)
        .bind(manifest.artifact_type)
        .bind(manifest.subject.map(Digest::as_str))
        .bind(manifest.annotations.as_deref())
        .bind(manifest.payload.len() as i64)
        .bind(manifest.payload)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let manifest_id = match inserted {
            Some((id,)) => {
                for blob_id in &blob_ids {
                    sqlx::query("INSERT INTO manifest_blobs (manifest_id, blob_id) VALUES ($1, $2)")
                        .bind(id)
                        .bind(blob_id)
                        .execute(&mut *tx)
                        .await?;
                }
                for child_id in &child_ids {
                    sqlx::query("INSERT INTO manifest_children (parent_id, child_id) VALUES ($1, $2)")
                        .bind(id)
                        .bind(child_id)
                        .execute(&mut *tx)
                        .await?;
                }
                id
            }
            // Pushed again: the same bytes, so the same references. Pushing revives a tombstone
            // and refreshes the push time.
            None => {
                let (id,): (i64,) = sqlx::query_as(
                    "UPDATE manifests SET pushed_at = $1, deleted_at = NULL \
                     WHERE repository_id = $2 AND digest = $3 RETURNING id",
                )
                .bind(now)
                .bind(repo_id)
                .bind(manifest.digest.as_str())
                .fetch_one(&mut *tx)
                .await?;
                id
            }
        };

        if let Some(tag) = tag {
            Self::set_tag(
                &mut tx,
                repo_id,
                tag,
                manifest_id,
                manifest.digest,
                actor,
                now,
                self.update_lock(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    #[expect(clippy::too_many_arguments, reason = "one call site; the parameters are the event")]
    async fn set_tag(
        tx: &mut AnyConnection,
        repo_id: i64,
        tag: &Tag,
        manifest_id: i64,
        digest: &Digest,
        actor: Option<&str>,
        now: i64,
        lock: &str,
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "SELECT t.manifest_id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{lock}"
        );
        let current: Option<(i64, String)> =
            sqlx::query_as(&sql).bind(repo_id).bind(tag.as_str()).fetch_optional(&mut *tx).await?;
        if current.as_ref().is_some_and(|(id, _)| *id == manifest_id) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO tags (repository_id, name, manifest_id, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (repository_id, name) DO UPDATE SET manifest_id = excluded.manifest_id, \
             updated_at = excluded.updated_at",
        )
        .bind(repo_id)
        .bind(tag.as_str())
        .bind(manifest_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(repo_id)
        .bind(tag.as_str())
        .bind(current.map(|(_, d)| d))
        .bind(digest.as_str())
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// The live manifest `reference` points at in `repo`, with its bytes.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn manifest(&self, repo: &RepoName, reference: &Reference) -> Result<Option<ManifestRow>> {
        self.find_manifest(repo, reference, "m.digest, m.media_type, m.payload").await
    }

    /// Like [`MetaStore::manifest`] without the bytes.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn manifest_head(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<ManifestHead>> {
        self.find_manifest(repo, reference, "m.digest, m.media_type, m.size").await
    }

    async fn find_manifest<T>(
        &self,
        repo: &RepoName,
        reference: &Reference,
        columns: &str,
    ) -> Result<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    {
        let (from, key) = match reference {
            Reference::Digest(d) => {
                ("manifests m JOIN repositories r ON r.id = m.repository_id WHERE m.digest = $2", d.as_str())
            }
            Reference::Tag(t) => (
                "tags t JOIN repositories r ON r.id = t.repository_id \
                 JOIN manifests m ON m.id = t.manifest_id WHERE t.name = $2",
                t.as_str(),
            ),
        };
        let sql = format!("SELECT {columns} FROM {from} AND r.name = $1 AND m.deleted_at IS NULL");
        Ok(sqlx::query_as(&sql).bind(repo.as_str()).bind(key).fetch_optional(&self.read).await?)
    }

    /// Every move of `tag` in `repo`, oldest first: (old digest, new digest, actor, time).
    ///
    /// # Errors
    /// [`Error::Database`].
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
    /// [`Error::Database`].
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Option<Vec<String>>> {
        // One row holding the whole page, newline-separated (tags cannot contain newlines):
        // decoding thousands of rows one by one costs far more than the query.
        let page = "SELECT t.name FROM tags t JOIN repositories r ON r.id = t.repository_id \
                    WHERE r.name = $1 AND t.name > $2 ORDER BY t.name LIMIT $3";
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

    /// Live manifests in `repo` whose subject is `subject`, optionally only of `artifact_type`,
    /// ordered by digest.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerRow>> {
        Ok(sqlx::query_as(
            "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = $1 AND m.subject_digest = $2 AND m.deleted_at IS NULL \
             AND ($3 IS NULL OR m.artifact_type = $3) ORDER BY m.digest",
        )
        .bind(repo.as_str())
        .bind(subject.as_str())
        .bind(artifact_type)
        .fetch_all(&self.read)
        .await?)
    }
}
