//! Content-addressed blob storage: a dumb object store for blob bytes and upload sessions.
//!
//! It owns the key layout and nothing else: which blobs exist, where they are linked and whether
//! they may be deleted is the metadata store's business. Keys are never reused — every stored copy
//! of a digest gets its own key, recorded in its metadata row — so deleting a key can never remove
//! bytes that a concurrent re-upload of the same digest relies on.
//!
//! Two backends:
//! * **filesystem** (embedded): an upload is one append-only file that becomes the blob by an
//!   atomic rename — no copy, no re-read;
//! * **S3-compatible object storage** (scale-out, through `object_store`): a session's bytes are
//!   objects under the session's prefix and parts of one multipart upload the session keeps
//!   open, all listed in the session's metadata. A write that may fill a part first holds the
//!   session (one writer at a time adds parts); a write shorter than a part becomes an object of
//!   its own, folded into the next part. Objects are never overwritten, so replicas writing one
//!   session cannot destroy each other's bytes, and a replica dying mid-write loses nothing that
//!   was recorded. Completing the session completes the multipart upload: the blob is that
//!   object, with no byte copied (a session of one small object publishes that object).

mod fs;
mod fs_write;
mod s3;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// The trees under the store's root (or prefix) that Berth writes, sweeps and deletes from.
pub(crate) const OWN_TREES: [&str; 2] = ["blobs", "uploads"];
pub use s3::S3Config;

use crate::oci::{Algorithm, Digest};

/// Errors of blob storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not exist.
    #[error("object `{0}` not found in blob storage")]
    NotFound(String),
    /// The storage failed.
    #[error("blob storage I/O on `{key}`: {source}")]
    Io {
        /// The key involved.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The configuration is not usable.
    #[error("blob storage configuration: {0}")]
    Config(String),
    /// The client's request body failed while it was being stored.
    #[error("request body: {0}")]
    Body(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Whatever must stay held while bytes of a write may still reach storage — for an upload
/// session, its lock: a write cut off by a dropped request lands its last bytes before the next
/// write to the session can start.
pub type Hold = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// How the filesystem backend writes.
#[derive(Debug, Clone, Copy)]
pub struct FsOptions {
    /// Flush each completed blob to disk before publishing it.
    pub fsync: bool,
    /// Write large upload bodies past the page cache (`O_DIRECT`) where the filesystem allows.
    pub direct_io: bool,
}

/// Where a blob copy lives on the filesystem backend. The one place that turns identities into
/// paths there; on object storage, keys derive from the upload session (see [`s3`]).
#[derive(Debug, Clone, Copy)]
pub enum BlobKey<'a> {
    /// A stored copy of a blob; `copy_id` makes the key unique to this copy.
    Blob {
        /// The content's digest.
        digest: &'a Digest,
        /// A fresh id per stored copy.
        copy_id: &'a str,
    },
    /// An upload session's bytes.
    Upload(&'a str),
}

impl BlobKey<'_> {
    /// The storage path of this key, relative to the store's root.
    pub fn path(&self) -> String {
        match self {
            BlobKey::Blob { digest, copy_id } => {
                let hex = digest.hex();
                format!("blobs/{}/{}/{hex}/{copy_id}", digest.algorithm().as_str(), &hex[..2])
            }
            BlobKey::Upload(id) => format!("uploads/{id}"),
        }
    }
}

/// A byte range of an object, inclusive of both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub end: u64,
}

/// One recorded piece of an upload session on object storage: an object, or the session's open
/// multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The object holding the bytes (for an open multipart upload: the object it will become).
    pub key: String,
    /// How many bytes.
    pub len: u64,
    /// The multipart upload still open on `key`, whose recorded parts hold the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<OpenMultipart>,
}

impl Chunk {
    /// An object of `len` bytes.
    pub fn object(key: impl Into<String>, len: u64) -> Self {
        Chunk { key: key.into(), len, multipart: None }
    }
}

/// A multipart upload a session keeps open across its writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenMultipart {
    /// The store's upload id.
    pub id: String,
    /// The marker object naming it (deleting the marker aborts the upload).
    pub marker: String,
    /// The recorded parts' ids (ETags), in order: part `i + 1` is `parts[i]`.
    pub parts: Vec<String>,
}

/// An object found by [`BlobStore::list_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// When it was last written, in milliseconds since the epoch (by the store's clock).
    pub modified_ms: i64,
}

/// Where the reference registry keeps a blob's bytes, for adopting them in place (`berth
/// import`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file of its filesystem driver.
    File(std::path::PathBuf),
    /// An object of its S3 driver: the bucket and the object's whole key there.
    Object {
        /// The bucket.
        bucket: String,
        /// The key, from the bucket's root.
        key: String,
    },
}

/// The stream `body` opens, its error made storage's.
async fn opened<E: std::fmt::Display>(
    body: impl std::future::Future<Output = std::result::Result<ByteStream, E>>,
) -> Result<ByteStream> {
    body.await.map_err(|e| Error::Body(e.to_string()))
}

/// How [`BlobStore::place`] put an object in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A hard link to the backup's file.
    Linked,
    /// A copy made by the object store inside the bucket.
    CopiedInStore,
    /// The bytes written through Berth.
    Written,
}

/// Deletes in flight at once on the filesystem.
const FS_DELETE_CONCURRENCY: usize = 16;

/// A stream of blob bytes.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Blob storage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore(Backend);

#[derive(Debug, Clone)]
enum Backend {
    /// Files under a directory.
    Filesystem(fs::FsStore),
    /// An S3-compatible bucket.
    S3(s3::S3Store),
}

impl BlobStore {
    /// A filesystem store under `root` (created if missing).
    ///
    /// # Errors
    /// [`Error::Io`] when `root` cannot be created.
    pub async fn filesystem(root: impl Into<std::path::PathBuf>, options: FsOptions) -> Result<Self> {
        Ok(BlobStore(Backend::Filesystem(fs::FsStore::open(root, options).await?)))
    }

    /// An S3-compatible store.
    ///
    /// # Errors
    /// [`Error::Config`] when the configuration is incomplete.
    pub fn s3(config: &S3Config) -> Result<Self> {
        Ok(BlobStore(Backend::S3(s3::S3Store::open(config)?)))
    }

    /// The count of object-store parts that were streamed, failed, and were sent again (`None`
    /// where parts are not streamed), for the metrics.
    pub fn parts_resent(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        match &self.0 {
            Backend::Filesystem(_) => None,
            Backend::S3(s) => s.parts_resent(),
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match &self.0 {
            Backend::Filesystem(s) => s.describe(),
            Backend::S3(s) => s.describe(),
        }
    }

    /// Checks that the store answers.
    ///
    /// # Errors
    /// When it does not.
    pub async fn ping(&self) -> Result<()> {
        match &self.0 {
            Backend::Filesystem(s) => s.ping().await,
            Backend::S3(s) => s.ping().await,
        }
    }

    /// Prepares storage for upload session `id`; returns the session's storage key.
    ///
    /// # Errors
    /// When storage fails.
    pub async fn start_upload(&self, id: &str) -> Result<String> {
        match &self.0 {
            Backend::Filesystem(s) => {
                let key = BlobKey::Upload(id).path();
                s.create_upload(&key).await?;
                Ok(key)
            }
            Backend::S3(_) => Ok(s3::session_prefix(id)),
        }
    }

    /// Whether a write of `size_hint` bytes (`None`: not announced) to a session recorded as
    /// `chunks` should hold the session first, to add parts to its shared multipart upload
    /// ([`BlobStore::write_upload`]'s `shared`). Only on object storage, only for writes that may
    /// fill a part.
    pub fn wants_shared_write(&self, chunks: &[Chunk], size_hint: Option<u64>) -> bool {
        match &self.0 {
            Backend::Filesystem(_) => false,
            Backend::S3(s) => s.wants_shared_write(chunks, size_hint),
        }
    }

    /// Stores `body` as the bytes of session `key` from `offset` on (the caller hashes them);
    /// on object storage `chunks` is updated to what the session then holds. Returns the bytes
    /// written. Nothing becomes part of the session until the caller records the new size (and
    /// chunks). `size_hint` is the length the client announced, used to reserve space up front;
    /// `hold` stays held until the last byte has reached storage, even if this future is dropped.
    /// `shared`: the caller holds the session, so the write may add parts to its open multipart
    /// upload (otherwise it becomes an object of its own).
    ///
    /// # Errors
    /// [`Error::Body`] when the body fails; other errors when storage does.
    #[allow(clippy::too_many_arguments)] // each is a distinct input of one write
    pub async fn write_upload<S, E>(
        &self,
        key: &str,
        chunks: &mut Vec<Chunk>,
        offset: u64,
        body: S,
        size_hint: Option<u64>,
        hold: Hold,
        shared: bool,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        match &self.0 {
            Backend::Filesystem(s) => s.write_upload(key, offset, body, size_hint, hold).await,
            Backend::S3(s) if shared => s.write_shared(key, chunks, body, size_hint).await,
            Backend::S3(s) => s.write_upload(key, chunks, body, size_hint).await,
        }
    }

    /// Whether the session recorded as `chunks` has a multipart upload to complete before its
    /// bytes can be read or published ([`BlobStore::seal_upload`]).
    pub fn needs_seal(chunks: &[Chunk]) -> bool {
        chunks.iter().any(|c| c.multipart.is_some())
    }

    /// Completes the session's open multipart upload, folding the objects recorded after it into
    /// its last part, and updates `chunks`. The caller holds the session and records the result.
    ///
    /// # Errors
    /// When storage fails.
    pub async fn seal_upload(&self, chunks: &mut Vec<Chunk>) -> Result<()> {
        match &self.0 {
            Backend::Filesystem(_) => Ok(()),
            Backend::S3(s) => s.seal(chunks).await,
        }
    }

    /// The digest of the session's first `size` bytes computed with `algorithm` (for digests
    /// other than the sha256 hashed while streaming).
    ///
    /// # Errors
    /// When storage fails.
    pub async fn upload_digest(
        &self,
        key: &str,
        chunks: &[Chunk],
        size: u64,
        algorithm: Algorithm,
    ) -> Result<Digest> {
        match &self.0 {
            Backend::Filesystem(s) => s.digest_of(key, size, algorithm).await,
            Backend::S3(s) => s.digest_of(chunks, algorithm).await,
        }
    }

    /// Publishes the session's `size` bytes as a blob copy of `digest`; returns its new key.
    ///
    /// # Errors
    /// When storage fails.
    pub async fn commit_upload(
        &self,
        key: &str,
        chunks: &[Chunk],
        digest: &Digest,
        size: u64,
    ) -> Result<String> {
        match &self.0 {
            Backend::Filesystem(s) => {
                let copy_id = uuid::Uuid::new_v4().simple().to_string();
                let blob_key = BlobKey::Blob { digest, copy_id: &copy_id }.path();
                s.commit_upload(key, &blob_key, size).await?;
                Ok(blob_key)
            }
            Backend::S3(s) => s.commit_upload(key, chunks, size).await,
        }
    }

    /// Undoes [`BlobStore::commit_upload`] when the metadata could not record it, so the session
    /// stays usable where possible. Best effort.
    pub async fn revert_commit(&self, key: &str, chunks: &[Chunk], blob_key: &str, size: u64) {
        let result = match &self.0 {
            Backend::Filesystem(s) => s.commit_upload(blob_key, key, size).await,
            Backend::S3(s) => s.revert_commit(chunks, blob_key).await,
        };
        if let Err(e) = result {
            tracing::warn!(storage.key = blob_key, error = %e, "could not revert a blob commit");
        }
    }

    /// Deletes the copy [`BlobStore::commit_upload`] published when the session turned out to be
    /// gone or moved on (another process completed or advanced it). A key that is one of the
    /// session's own chunks is left alone: the live session still lists it, or the process that
    /// completed the session published that very object as its blob. Best effort.
    pub async fn discard_commit(&self, chunks: &[Chunk], blob_key: &str) {
        if chunks.iter().any(|c| c.key == blob_key) {
            return;
        }
        if let Err(e) = self.delete(blob_key).await {
            tracing::warn!(storage.key = blob_key, error = %e, "could not delete an unused blob copy");
        }
    }

    /// Deletes what a committed session leaves behind besides its blob (the chunks composed into
    /// it, objects of writes that lost a race). Best effort: leftovers are found by the sweep.
    pub async fn finish_upload(&self, key: &str, blob_key: &str) {
        if let Backend::S3(s) = &self.0
            && let Err(e) = s.delete_prefix(key, Some(blob_key)).await
        {
            tracing::warn!(storage.key = key, error = %e, "could not clean up an upload session");
        }
    }

    /// Deletes every object of session `key`, and `blob_key` if given (a copy that turned out
    /// redundant).
    ///
    /// # Errors
    /// When storage fails.
    pub async fn abort_upload(&self, key: &str, blob_key: Option<&str>) -> Result<()> {
        match &self.0 {
            Backend::Filesystem(s) => {
                s.delete(key).await?;
                if let Some(b) = blob_key {
                    s.delete(b).await?;
                }
                Ok(())
            }
            Backend::S3(s) => s.delete_prefix(key, None).await,
        }
    }

    /// Checks that blobs under `root` (the reference registry's storage) can be adopted without
    /// copying a byte: on the filesystem, hard links need the same filesystem; on S3 the objects
    /// must be in this bucket, under this prefix, to be named as they are.
    ///
    /// # Errors
    /// [`Error::Config`] saying why not.
    pub fn check_adoptable(&self, root: &Origin) -> Result<()> {
        let inside_own_tree = || {
            Error::Config(format!(
                "the reference registry's root lies inside Berth's own {} tree, which Berth sweeps \
                 and deletes from; keep it beside them",
                OWN_TREES.join("/ or ")
            ))
        };
        match (&self.0, root) {
            (Backend::Filesystem(s), Origin::File(dir)) => {
                if s.owns_tree_of(dir)? {
                    Err(inside_own_tree())
                } else if s.same_filesystem(dir)? {
                    Ok(())
                } else {
                    Err(Error::Config(format!(
                        "{} is on another filesystem than {}: blobs are adopted by hard links, which \
                         cannot cross filesystems; move one of them",
                        dir.display(),
                        s.describe()
                    )))
                }
            }
            (Backend::S3(s), Origin::Object { bucket, key }) => match s.key_of(bucket, key) {
                Some(relative) => {
                    let relative = relative.trim_start_matches('/');
                    let inside = OWN_TREES
                        .iter()
                        .any(|tree| relative == *tree || relative.starts_with(&format!("{tree}/")));
                    if inside { Err(inside_own_tree()) } else { Ok(()) }
                }
                None => Err(Error::Config(format!(
                    "s3://{bucket}/{key} is outside Berth's storage ({}): blobs are adopted where they \
                     are, so the reference registry's root must be in Berth's bucket, under its prefix",
                    s.describe()
                ))),
            },
            (Backend::Filesystem(_), Origin::Object { .. }) => Err(Error::Config(
                "an S3 store is imported into the scale-out deployment (storage.kind = \"s3\")".into(),
            )),
            (Backend::S3(_), Origin::File(_)) => Err(Error::Config(
                "a filesystem store is imported into the embedded deployment (storage.kind = \"filesystem\")"
                    .into(),
            )),
        }
    }

    /// Makes the bytes at `origin` a stored copy of `digest` without copying them and returns
    /// its key: on the filesystem a hard link under a fresh key (the collector later deletes that
    /// link, nothing else); on S3 the object itself, named where it is (the collector later
    /// deletes exactly that object).
    ///
    /// # Errors
    /// [`Error::Config`] when `origin` cannot be adopted here; others when storage fails.
    pub async fn adopt(&self, origin: &Origin, digest: &Digest) -> Result<String> {
        match (&self.0, origin) {
            (Backend::Filesystem(s), Origin::File(path)) => {
                let copy_id = uuid::Uuid::new_v4().simple().to_string();
                let key = BlobKey::Blob { digest, copy_id: &copy_id }.path();
                s.adopt(path, &key).await?;
                Ok(key)
            }
            (Backend::S3(s), Origin::Object { bucket, key }) if s.key_of(bucket, key).is_some() => {
                Ok(s.key_of(bucket, key).unwrap_or_default())
            }
            // Not adoptable here: the check says why.
            _ => self.check_adoptable(origin).and(Err(Error::Config(format!("cannot adopt {origin:?}")))),
        }
    }

    /// Undoes [`BlobStore::adopt`] when the digest turned out to be stored already: removes the
    /// hard link; an object adopted where it is stays (it was never Berth's). Best effort.
    pub async fn discard_adopted(&self, key: &str) {
        if let Backend::Filesystem(s) = &self.0
            && let Err(e) = s.delete(key).await
        {
            tracing::warn!(storage.key = key, error = %e, "could not remove an unused hard link");
        }
    }

    /// Puts the `size` bytes at `origin` (a backup's copy) in place as object `key`, without
    /// copying them through Berth where the store can: a hard link on the same filesystem, a copy
    /// inside the bucket on S3; else the bytes of `body` (a stream of them, opened only then) are
    /// written. Says which.
    ///
    /// # Errors
    /// When storage or `body` fails.
    pub async fn place<E: std::fmt::Display>(
        &self,
        key: &str,
        size: u64,
        origin: &Origin,
        body: impl std::future::Future<Output = std::result::Result<ByteStream, E>>,
    ) -> Result<Placed> {
        match (&self.0, origin) {
            (Backend::Filesystem(s), Origin::File(path))
                if path.parent().is_some_and(|dir| s.same_filesystem(dir).unwrap_or(false)) =>
            {
                s.adopt(path, key).await?;
                Ok(Placed::Linked)
            }
            (Backend::Filesystem(s), _) => {
                s.write_object(key, size, opened(body).await?).await?;
                Ok(Placed::Written)
            }
            (Backend::S3(s), Origin::Object { bucket, key: full }) if s.bucket() == bucket => {
                match s.copy_in_bucket(full, key).await {
                    Ok(()) => Ok(Placed::CopiedInStore),
                    // CopyObject stops at 5 GiB: such an object is streamed.
                    Err(e) => {
                        tracing::debug!(storage.key = key, error = %e, "copy inside the bucket failed; streaming");
                        s.write_object(key, size, opened(body).await?).await?;
                        Ok(Placed::Written)
                    }
                }
            }
            (Backend::S3(s), _) => {
                s.write_object(key, size, opened(body).await?).await?;
                Ok(Placed::Written)
            }
        }
    }

    /// Deletes object `key`; deleting a missing object succeeds (deletes are idempotent).
    ///
    /// # Errors
    /// When storage fails.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match &self.0 {
            Backend::Filesystem(s) => s.delete(key).await,
            Backend::S3(s) => s.delete(key).await,
        }
    }

    /// Deletes `keys` (on object storage in bulk requests, on the filesystem a few at a time);
    /// returns each key's outcome. Deleting a missing object succeeds.
    pub async fn delete_many(&self, keys: &[String]) -> Vec<(String, Result<()>)> {
        use futures_util::StreamExt as _;
        match &self.0 {
            Backend::Filesystem(s) => {
                futures_util::stream::iter(keys.iter().cloned())
                    .map(|key| async move {
                        let outcome = s.delete(&key).await;
                        (key, outcome)
                    })
                    .buffer_unordered(FS_DELETE_CONCURRENCY)
                    .collect()
                    .await
            }
            Backend::S3(s) => s.delete_many(keys).await,
        }
    }

    /// Up to `limit` objects whose keys sort after `after`, in key order — a page of a walk
    /// over everything stored that can resume where it stopped.
    ///
    /// # Errors
    /// When storage fails.
    pub async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<Listed>> {
        match &self.0 {
            Backend::Filesystem(s) => s.list_page(after, limit).await,
            Backend::S3(s) => s.list_page(after, limit).await,
        }
    }

    /// Streams the bytes of `key`, or of `range` within it.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the object is missing; others when storage fails.
    pub async fn read(&self, key: &str, range: Option<ByteRange>) -> Result<ByteStream> {
        match &self.0 {
            Backend::Filesystem(s) => Ok(Box::pin(s.read(key, range).await?)),
            Backend::S3(s) => s.read(key, range).await,
        }
    }

    /// A short-lived URL a client can fetch `key` from directly, when the store is configured
    /// to redirect blob downloads.
    ///
    /// # Errors
    /// When signing fails.
    pub async fn redirect_url(&self, key: &str) -> Result<Option<String>> {
        match &self.0 {
            Backend::Filesystem(_) => Ok(None),
            Backend::S3(s) => s.redirect_url(key).await,
        }
    }

    /// The size of object `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the object is missing; others when storage fails.
    pub async fn size(&self, key: &str) -> Result<u64> {
        match &self.0 {
            Backend::Filesystem(s) => s.size(key).await,
            Backend::S3(s) => s.size(key).await,
        }
    }

    /// Keys of all objects under `prefix`, in no particular order. For consistency checks and
    /// tests, never on the request path.
    ///
    /// # Errors
    /// When storage fails.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match &self.0 {
            Backend::Filesystem(s) => s.list(prefix).await,
            Backend::S3(s) => s.list(prefix).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_per_copy() {
        let d = Digest::sha256_of(b"x");
        let a = BlobKey::Blob { digest: &d, copy_id: "1" }.path();
        let b = BlobKey::Blob { digest: &d, copy_id: "2" }.path();
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("blobs/sha256/{}/{}/", &d.hex()[..2], d.hex())));
        assert_eq!(BlobKey::Upload("u").path(), "uploads/u");
    }
}
