//! Pushing: upload sessions, cross-repository mounts and manifest pushes.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use uuid::Uuid;

use super::hashing::hash_alongside;
use super::{Error, Registry, Result};
use crate::blob::{BlobStore, Chunk, Hold};
use crate::meta::{CompletedUpload, NewManifest, PutManifestError, TagCondition, UploadRow};
use crate::oci::manifest::{self, MAX_MANIFEST_BYTES};
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag, UploadHasher};

/// Where an upload session stands.
#[derive(Debug, Clone)]
pub struct UploadStatus {
    /// The session id.
    pub id: String,
    /// Bytes received so far.
    pub size: u64,
}

/// A stored manifest.
#[derive(Debug, Clone)]
pub struct PushedManifest {
    /// Its digest.
    pub digest: Digest,
    /// Its subject, if it has one (reported in `OCI-Subject`).
    pub subject: Option<Digest>,
    /// The tags now pointing at it because of this push (reported in `OCI-Tag`).
    pub tags: Vec<Tag>,
}

/// Writes at least this long (or of unknown length) leave freed buffers worth giving back.
const LARGE_WRITE: u64 = 8 * 1024 * 1024;

/// How long a write holds an upload session (to add parts to its multipart upload) without
/// renewing; it renews every third of this while bytes arrive.
const WRITER_HOLD_MS: i64 = 120_000;

/// A write received into a session, not yet recorded.
struct Appended {
    chunks: Vec<Chunk>,
    hasher: UploadHasher,
    /// The session's size with the write.
    size: u64,
    /// The hold the write took on the session, if it took one.
    writer: Option<String>,
}

/// A chunk's declared position (from `Content-Range`).
#[derive(Debug, Clone, Copy)]
pub struct ChunkRange {
    /// First byte offset.
    pub start: u64,
    /// Last byte offset (inclusive).
    pub end: u64,
}

impl Registry {
    /// Starts an upload session in `repo`.
    ///
    /// # Errors
    /// [`Error::Internal`] when storage or metadata fail.
    /// [`Error::ReadOnlyCache`] in a pull-through cache's repository; [`Error::QuotaExceeded`]
    /// when a quota's scope holding it is full already.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadStatus> {
        self.refuse_cached(repo)?;
        self.refuse_full_scope(repo).await?;
        self.open_session(repo).await
    }

    /// Opens an upload session in `repo` (a cache's fill opens one in its repository).
    pub(super) async fn open_session(&self, repo: &RepoName) -> Result<UploadStatus> {
        let id = Uuid::new_v4().to_string();
        let key = self.blobs.start_upload(&id).await?;
        let now = self.clock.now_ms();
        let row = UploadRow {
            id: id.clone(),
            repository: repo.as_str().to_string(),
            storage_key: key,
            size: 0,
            hash_state: UploadHasher::default().save(),
            chunks: "[]".into(),
            started_at: now,
            updated_at: now,
        };
        self.meta.create_upload(&row).await?;
        Ok(UploadStatus { id, size: 0 })
    }

    /// Links `digest` from `from` into `repo`. Returns whether it was mounted (false when the
    /// blob is not linked in `from`; the caller then starts a normal upload).
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn mount_blob(&self, repo: &RepoName, from: &RepoName, digest: &Digest) -> Result<bool> {
        self.refuse_cached(repo)?;
        Ok(self.meta.mount_blob(from, repo, digest, self.clock.now_ms()).await?)
    }

    async fn session(&self, repo: &RepoName, id: &str) -> Result<UploadRow> {
        match self.meta.upload(id).await? {
            Some(row) if row.repository == repo.as_str() => Ok(row),
            _ => Err(Error::BlobUploadUnknown),
        }
    }

    /// Stores `body` after the bytes session `row` holds. While bytes keep arriving the
    /// session's last-activity time is refreshed every quarter of `upload_expire_after` (at most
    /// every ten minutes), so a single long write is not taken for an abandoned session: idleness
    /// counts from the last byte (a body that stops delivering is cut off by
    /// `limits.body_idle_timeout_secs`).
    /// A write holding the session (`writer`) renews its hold instead, at least every third of
    /// [`WRITER_HOLD_MS`], and stops if it has lost it.
    #[expect(clippy::too_many_arguments, reason = "the session, its state and one write")]
    async fn write_session<S, E>(
        &self,
        row: &UploadRow,
        chunks: &mut Vec<Chunk>,
        hasher: &mut UploadHasher,
        body: S,
        hint: Option<u64>,
        guard: Hold,
        writer: Option<&str>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let mut every_ms = (self.policy.upload_expire_after_ms / 4).clamp(1000, 600_000);
        if writer.is_some() {
            every_ms = every_ms.min(WRITER_HOLD_MS / 3);
        }
        let every = std::time::Duration::from_millis(every_ms as u64);
        let shared = writer.is_some();
        let large = hint.is_none_or(|n| n >= LARGE_WRITE).then(crate::memory::LargeWrite::start);
        let (body, hashed) = hash_alongside(body, hasher.clone(), hint);
        let write =
            self.blobs.write_upload(&row.storage_key, chunks, row.size as u64, body, hint, guard, shared);
        tokio::pin!(write);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                written = &mut write => {
                    drop(large);
                    let written = written?;
                    // A write that succeeded read its body to the end, so the hash follows.
                    *hasher = hashed.await.map_err(|_| {
                        Error::Internal(format!("upload {}: the body's hash was lost", row.id).into())
                    })?;
                    return Ok(written);
                }
                _ = beat.tick() => {
                    let now = self.clock.now_ms();
                    let noted = match writer {
                        Some(w) => self.meta.renew_upload_hold(&row.id, w, now, now + WRITER_HOLD_MS).await,
                        None => self.meta.touch_upload(&row.id, row.size, now).await.map(|()| true),
                    };
                    match noted {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(Error::BlobUploadInvalid(
                                "another request took over this upload session".into(),
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(upload = %row.id, error = %e, "could not note an upload's activity");
                        }
                    }
                }
            }
        }
    }

    /// Writes `body` after the bytes session `row` holds and checks the chunk's declared
    /// position and length. A write that may add parts to the session's multipart upload holds
    /// the session first; if another request holds it, the write becomes an object of its own
    /// (and of the two, the one recorded first wins). A failed write lets go of its hold.
    async fn append<S, E>(
        &self,
        row: &UploadRow,
        range: Option<ChunkRange>,
        size_hint: Option<u64>,
        body: S,
        guard: Hold,
    ) -> Result<Appended>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        check_chunk_start(row, range)?;
        let mut hasher = restore_hasher(row)?;
        let mut chunks = session_chunks(row)?;
        let hint = announced_length(range, size_hint);
        let writer =
            if self.blobs.wants_shared_write(&chunks, hint) { self.hold_session(row).await? } else { None };
        let written = self
            .write_session(row, &mut chunks, &mut hasher, body, hint, guard, writer.as_deref())
            .await
            .and_then(|written| check_chunk_length(range, written).map(|()| written));
        match written {
            Ok(written) => Ok(Appended { chunks, hasher, size: row.size as u64 + written, writer }),
            Err(e) => {
                self.let_go(row, writer).await;
                Err(e)
            }
        }
    }

    /// Takes the hold on session `row` as it was read, unless another request has it.
    async fn hold_session(&self, row: &UploadRow) -> Result<Option<String>> {
        let writer = Uuid::new_v4().simple().to_string();
        let now = self.clock.now_ms();
        let held =
            self.meta.hold_upload(&row.id, row.size, &row.chunks, &writer, now, now + WRITER_HOLD_MS).await?;
        Ok(held.then_some(writer))
    }

    async fn let_go(&self, row: &UploadRow, writer: Option<String>) {
        if let Some(writer) = writer
            && let Err(e) = self.meta.release_upload_hold(&row.id, &writer).await
        {
            tracing::warn!(upload = %row.id, error = %e, "could not let go of an upload session (its hold runs out)");
        }
    }

    /// Records `appended` as session `row`'s new state (ending its hold), provided nobody
    /// changed the session meanwhile; returns the new row.
    async fn record(&self, row: &UploadRow, appended: Appended) -> Result<UploadRow> {
        let chunks = serde_json::to_string(&appended.chunks)
            .map_err(|e| Error::Internal(format!("upload {} chunks: {e}", row.id).into()))?;
        let state = appended.hasher.save();
        let now = self.clock.now_ms();
        let size = appended.size as i64;
        let advanced = self
            .meta
            .advance_upload(
                &row.id,
                row.size,
                &row.chunks,
                appended.writer.as_deref(),
                size,
                &state,
                &chunks,
                now,
            )
            .await;
        match advanced {
            Ok(true) => Ok(UploadRow { size, hash_state: state, chunks, updated_at: now, ..row.clone() }),
            Ok(false) => {
                // Another process wrote to this session meanwhile; its bytes win.
                self.let_go(row, appended.writer).await;
                Err(Error::RangeInvalid { size: row.size as u64, upload_id: row.id.clone() })
            }
            Err(e) => {
                self.let_go(row, appended.writer).await;
                Err(e.into())
            }
        }
    }

    /// Completes session `row`'s multipart upload, if it has one open, so that its bytes can be
    /// read and published as objects; records that and returns the new row.
    async fn seal(&self, row: UploadRow) -> Result<UploadRow> {
        let mut chunks = session_chunks(&row)?;
        if !BlobStore::needs_seal(&chunks) {
            return Ok(row);
        }
        let Some(writer) = self.hold_session(&row).await? else {
            return Err(Error::BlobUploadInvalid("another request is writing to this upload session".into()));
        };
        if let Err(e) = self.blobs.seal_upload(&mut chunks).await {
            self.let_go(&row, Some(writer)).await;
            return Err(e.into());
        }
        let hasher = restore_hasher(&row)?;
        self.record(&row, Appended { chunks, hasher, size: row.size as u64, writer: Some(writer) }).await
    }

    /// The state of upload session `id` in `repo`.
    ///
    /// # Errors
    /// [`Error::BlobUploadUnknown`].
    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadStatus> {
        let row = self.session(repo, id).await?;
        Ok(UploadStatus { id: row.id, size: row.size as u64 })
    }

    /// Appends `body` to session `id`. With `range` (a chunked `PATCH`), the chunk must start
    /// where the session ends and be exactly as long as declared; otherwise nothing is recorded.
    ///
    /// # Errors
    /// [`Error::BlobUploadUnknown`], [`Error::RangeInvalid`] for an out-of-order chunk,
    /// [`Error::SizeInvalid`] for a chunk of the wrong length, [`Error::BlobUploadInvalid`] when
    /// the body fails.
    pub async fn write_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        range: Option<ChunkRange>,
        size_hint: Option<u64>,
        body: S,
    ) -> Result<UploadStatus>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let guard: Hold = Arc::new(self.upload_locks.lock(id).await);
        let row = self.session(repo, id).await?;
        let appended = self.append(&row, range, size_hint, body, guard).await?;
        let row = self.record(&row, appended).await?;
        Ok(UploadStatus { id: row.id, size: row.size as u64 })
    }

    /// Completes session `id` with an optional final chunk: checks the content against `digest`,
    /// publishes it as a blob (or reuses the stored copy) and links it in `repo`. A digest
    /// mismatch records nothing, so the client can still finish the session correctly.
    ///
    /// # Errors
    /// [`Error::BlobUploadUnknown`], [`Error::DigestInvalid`], [`Error::BlobUploadInvalid`].
    pub async fn complete_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        range: Option<ChunkRange>,
        size_hint: Option<u64>,
        body: S,
    ) -> Result<Digest>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let guard: Hold = Arc::new(self.upload_locks.lock(id).await);
        let row = self.session(repo, id).await?;
        let appended = self.append(&row, range, size_hint, body, guard).await?;
        let (row, chunks, hasher, size) =
            if appended.writer.is_some() || BlobStore::needs_seal(&appended.chunks) {
                // Its multipart upload is completed first: what was written is recorded, then
                // the sealed state, so that whatever fails later leaves a usable session.
                let row = self.record(&row, appended).await?;
                let row = self.seal(row).await?;
                let (chunks, hasher, size) = (session_chunks(&row)?, restore_hasher(&row)?, row.size as u64);
                (row, chunks, hasher, size)
            } else {
                (row, appended.chunks, appended.hasher, appended.size)
            };
        self.check_content(&row.storage_key, &chunks, size, &hasher, digest).await?;

        let blob_key = self.blobs.commit_upload(&row.storage_key, &chunks, digest, size).await?;
        let outcome = self
            .meta
            .complete_upload(id, row.size, repo, digest, size as i64, &blob_key, self.clock.now_ms())
            .await;
        let outcome = match outcome {
            Err(e) => match self.after_failed_commit(e, &blob_key).await {
                // The commit went through after all.
                Ok(()) => CompletedUpload::Stored,
                Err(AfterFailure::RolledBack(e)) => {
                    // Leave the still-open session as it was.
                    self.blobs.revert_commit(&row.storage_key, &chunks, &blob_key, size).await;
                    if matches!(e, Error::QuotaExceeded(_)) {
                        // Refused for good: the session goes, its bytes through the outbox.
                        let objects: Vec<String> = chunks
                            .iter()
                            .flat_map(|c| {
                                std::iter::once(c.key.clone())
                                    .chain(c.multipart.as_ref().map(|m| m.marker.clone()))
                            })
                            .collect();
                        if let Err(gone) = self.meta.discard_upload(id, &objects, self.clock.now_ms()).await {
                            tracing::warn!(upload = id, error = %gone, "could not discard a refused upload");
                        }
                    }
                    return Err(e);
                }
                Err(AfterFailure::Unknown(e)) => return Err(e),
            },
            Ok(None) => {
                self.blobs.discard_commit(&chunks, &blob_key).await;
                return Err(Error::BlobUploadUnknown);
            }
            Ok(Some(outcome)) => outcome,
        };
        match outcome {
            CompletedUpload::Stored => self.blobs.finish_upload(&row.storage_key, &blob_key).await,
            CompletedUpload::AlreadyStored { discard_key } => {
                self.discard_upload(&row.storage_key, Some(&discard_key)).await;
            }
        }
        Ok(digest.clone())
    }

    /// A whole blob in one request (`POST ?digest=`). It runs as a session opened and completed
    /// at once: the session row owns the bytes while they are written, so the storage sweep and
    /// the upload expiry know them for what they are however long the write or its recording
    /// takes (a write with no row would look like an orphan to the sweep once older than
    /// `blob_grace`). Anything that fails removes the session and its bytes.
    ///
    /// # Errors
    /// [`Error::DigestInvalid`], [`Error::BlobUploadInvalid`], [`Error::Internal`].
    pub async fn upload_blob<S, E>(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size_hint: Option<u64>,
        body: S,
    ) -> Result<Digest>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let session = self.start_upload(repo).await?;
        let completed = self.complete_upload(repo, &session.id, digest, None, size_hint, body).await;
        if completed.is_err() {
            // Gone already when the recording committed after all (its reply lost).
            match self.cancel_upload(repo, &session.id).await {
                Ok(()) | Err(Error::BlobUploadUnknown) => {}
                Err(e) => {
                    tracing::warn!(upload = %session.id, error = %e, "could not cancel a failed upload")
                }
            }
        }
        completed
    }

    /// Deletes the bytes of an upload that no row names (and `copy`, a published copy no row
    /// names either). A failure only leaves an orphan for the sweep, so it is logged.
    async fn discard_upload(&self, key: &str, copy: Option<&str>) {
        if let Err(e) = self.blobs.abort_upload(key, copy).await {
            tracing::warn!(storage.key = key, error = %e, "could not delete an unrecorded upload's bytes");
        }
    }

    /// Decides what a failed blob-recording transaction means for the bytes it would have made
    /// reachable under `blob_key`. Ok when the commit went through after all (its reply was
    /// lost, but the row names the key); `RolledBack` when the database surely did not commit
    /// (the caller may undo its storage work); `Unknown` when it cannot be known — then the bytes
    /// stay where they are (an orphan for the sweep at worst), because deleting bytes a row may
    /// name would break a blob.
    async fn after_failed_commit(&self, e: crate::meta::Error, blob_key: &str) -> Result<(), AfterFailure> {
        if !matches!(e, crate::meta::Error::CommitUnknown(_)) {
            return Err(AfterFailure::RolledBack(e.into()));
        }
        match self.meta.storage_key_recorded(blob_key).await {
            Ok(true) => {
                tracing::warn!(storage.key = blob_key, error = %e, "commit reply lost, but the blob was recorded");
                Ok(())
            }
            Ok(false) | Err(_) => {
                tracing::warn!(storage.key = blob_key, error = %e, "commit outcome unknown; bytes left for the sweep");
                Err(AfterFailure::Unknown(e.into()))
            }
        }
    }

    /// Checks that the first `size` bytes stored under `key` hash to `digest`: sha256 from the
    /// state hashed while streaming, other algorithms by reading the bytes once.
    async fn check_content(
        &self,
        key: &str,
        chunks: &[Chunk],
        size: u64,
        hasher: &UploadHasher,
        digest: &Digest,
    ) -> Result<()> {
        let actual = match digest.algorithm() {
            Algorithm::Sha256 => hasher.digest(),
            other => self.blobs.upload_digest(key, chunks, size, other).await?,
        };
        if &actual != digest {
            return Err(Error::DigestInvalid(format!("content digest is {actual}, not {digest}")));
        }
        Ok(())
    }

    /// Cancels session `id`, deleting its bytes.
    ///
    /// # Errors
    /// [`Error::BlobUploadUnknown`].
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        let _guard = self.upload_locks.lock(id).await;
        self.session(repo, id).await?;
        if let Some(key) = self.meta.delete_upload(id).await?
            && let Err(e) = self.blobs.abort_upload(&key, None).await
        {
            tracing::warn!(storage.key = %key, error = %e, "could not delete a cancelled upload's bytes");
        }
        Ok(())
    }

    /// Removes upload sessions idle (nothing received) for longer than the policy's
    /// `upload_expire_after_ms`; their objects go to the collector's outbox in the same
    /// transaction, so a crash cannot leak them. Returns how many sessions were removed.
    ///
    /// # Errors
    /// [`Error::Internal`] when the metadata store fails.
    pub async fn expire_uploads(&self) -> Result<u64> {
        let mut removed = 0;
        loop {
            let now = self.clock.now_ms();
            let idle_before = now.saturating_sub(self.policy.upload_expire_after_ms);
            let n = self.meta.expire_uploads(idle_before, 500, now).await?;
            removed += n;
            if n < 500 {
                return Ok(removed);
            }
        }
    }

    /// Stores a manifest pushed to `repo` under `reference`, byte-for-byte, and points the
    /// reference's tag and `extra_tags` (`?tag=`) at it — all in one transaction, and only if
    /// `condition` holds for every tag. Tag moves are recorded in the tag history as done by
    /// `actor`. Pushing a tombstone revives it.
    ///
    /// # Errors
    /// [`Error::ManifestTooLarge`], [`Error::ManifestInvalid`], [`Error::DigestInvalid`] (the
    /// bytes do not match a digest reference), [`Error::ManifestBlobUnknown`],
    /// [`Error::PreconditionFailed`]; [`Error::ReadOnlyCache`] in a pull-through cache's
    /// repository.
    #[expect(clippy::too_many_arguments, reason = "the parts of one push request")]
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
        extra_tags: &[Tag],
        condition: TagCondition<'_>,
        actor: Option<&str>,
    ) -> Result<PushedManifest> {
        self.refuse_cached(repo)?;
        self.record_manifest(repo, reference, content_type, bytes, extra_tags, condition, actor).await
    }

    /// Records a manifest as [`Registry::put_manifest`] does — the one path for pushes, imports
    /// and a cache's fills.
    #[expect(clippy::too_many_arguments, reason = "the parts of one push request")]
    pub(super) async fn record_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
        extra_tags: &[Tag],
        condition: TagCondition<'_>,
        actor: Option<&str>,
    ) -> Result<PushedManifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::ManifestTooLarge { limit: MAX_MANIFEST_BYTES });
        }
        let parsed = manifest::parse(bytes, content_type).map_err(Error::ManifestInvalid)?;
        let (digest, tag) = match reference {
            Reference::Digest(expected) => {
                let actual = expected.same_algorithm_of(bytes);
                if &actual != expected {
                    return Err(Error::DigestInvalid(format!("manifest digest is {actual}, not {expected}")));
                }
                (actual, None)
            }
            Reference::Tag(tag) => (Digest::sha256_of(bytes), Some(tag)),
        };
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        let annotations = parsed.annotations.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default());
        let new = NewManifest {
            digest: &digest,
            media_type: &parsed.media_type,
            artifact_type: parsed.artifact_type.as_deref(),
            subject: subject.as_ref(),
            annotations,
            payload: bytes,
            blobs: &parsed.blobs,
            children: &parsed.children,
            sparse: self.takes_sparse_indexes(repo.as_str()),
        };
        let mut tags: Vec<Tag> = tag.into_iter().cloned().collect();
        for extra in extra_tags {
            if !tags.contains(extra) {
                tags.push(extra.clone());
            }
        }
        match self.meta.put_manifest(repo, &new, &tags, condition, actor, self.clock.now_ms()).await {
            Ok(()) => Ok(PushedManifest { digest, subject, tags }),
            Err(PutManifestError::Precondition { tag, current }) => {
                Err(Error::PreconditionFailed(match current {
                    Some(d) => format!("tag {tag} points at {d}"),
                    None => format!("tag {tag} does not exist"),
                }))
            }
            Err(PutManifestError::MissingBlobs(d) | PutManifestError::MissingManifests(d)) => {
                Err(Error::ManifestBlobUnknown(d))
            }
            Err(PutManifestError::Immutable(refusal)) => Err(Error::Immutable(refusal)),
            Err(PutManifestError::Meta(e)) => Err(e.into()),
        }
    }
}

/// What a failed recording transaction left: surely nothing, or maybe a row.
enum AfterFailure {
    RolledBack(Error),
    Unknown(Error),
}

/// A chunk must start exactly where the session ends.
fn check_chunk_start(row: &UploadRow, range: Option<ChunkRange>) -> Result<()> {
    match range {
        Some(r) if r.start != row.size as u64 => {
            Err(Error::RangeInvalid { size: row.size as u64, upload_id: row.id.clone() })
        }
        _ => Ok(()),
    }
}

/// A chunk must be exactly as long as its `Content-Range` says.
fn check_chunk_length(range: Option<ChunkRange>, written: u64) -> Result<()> {
    match range {
        Some(r) if r.end - r.start + 1 != written => Err(Error::SizeInvalid(format!(
            "Content-Range declares {} bytes but the body had {written}",
            r.end - r.start + 1
        ))),
        _ => Ok(()),
    }
}

fn session_chunks(row: &UploadRow) -> Result<Vec<Chunk>> {
    serde_json::from_str(&row.chunks)
        .map_err(|e| Error::Internal(format!("upload {} has unreadable chunks: {e}", row.id).into()))
}

fn restore_hasher(row: &UploadRow) -> Result<UploadHasher> {
    UploadHasher::restore(&row.hash_state)
        .ok_or_else(|| Error::Internal(format!("upload {} has an unreadable hash state", row.id).into()))
}

/// The length a chunk announces: its `Content-Range`, else its `Content-Length`.
fn announced_length(range: Option<ChunkRange>, content_length: Option<u64>) -> Option<u64> {
    range.map(|r| r.end - r.start + 1).or(content_length)
}
