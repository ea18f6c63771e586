//! The filesystem backend: uploads are append-only files that become blobs by an atomic rename,
//! so completing an upload never copies or re-reads it.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::{ByteRange, Error, Result};
use crate::oci::{Algorithm, Digest, UploadHasher};

/// Files under a root directory.
#[derive(Debug, Clone)]
pub(super) struct FsStore {
    root: PathBuf,
    fsync: bool,
}

const WRITE_BUFFER: usize = 1 << 20;
const READ_CHUNK: usize = 256 * 1024;

impl FsStore {
    /// A filesystem store under `root` (created if missing). With `fsync`, completed blobs are
    /// flushed to disk before they are published.
    ///
    /// # Errors
    /// [`Error::Io`] when `root` cannot be created.
    pub(super) async fn open(root: impl Into<PathBuf>, fsync: bool) -> Result<Self> {
        let root = root.into();
        tokio::fs::create_dir_all(&root).await.map_err(io_err(&root.to_string_lossy()))?;
        Ok(FsStore { root, fsync })
    }

    /// A short description for logs.
    pub(super) fn describe(&self) -> String {
        format!("filesystem at {}", self.root.display())
    }

    fn file(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Checks that the store is usable.
    ///
    /// # Errors
    /// [`Error::Io`] when the root is not a readable directory.
    pub(super) async fn ping(&self) -> Result<()> {
        let _entries = tokio::fs::read_dir(&self.root).await.map_err(io_err("."))?;
        Ok(())
    }

    /// Creates an empty upload object at `key`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(super) async fn create_upload(&self, key: &str) -> Result<()> {
        let path = self.file(key);
        create_parent(&path, key).await?;
        tokio::fs::File::create(&path).await.map_err(io_err(key))?;
        Ok(())
    }

    /// Writes `body` into the upload object `key` starting at `offset`, feeding every byte to
    /// `hasher`; bytes past `offset` from an earlier, failed write are discarded first. Returns
    /// the number of bytes written. If the body fails midway, the bytes written so far stay in
    /// the file past the recorded size and are discarded by the next write.
    ///
    /// # Errors
    /// [`Error::Body`] when the body stream fails; [`Error::Io`] when storage does.
    pub(super) async fn write_upload<S, E>(
        &self,
        key: &str,
        offset: u64,
        body: S,
        hasher: &mut UploadHasher,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let path = self.file(key);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await
            .map_err(|e| not_found_or_io(key, e))?;
        file.set_len(offset).await.map_err(io_err(key))?;
        file.seek(SeekFrom::Start(offset)).await.map_err(io_err(key))?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut written = 0u64;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::Body(e.to_string()))?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err(key))?;
            written += chunk.len() as u64;
        }
        out.flush().await.map_err(io_err(key))?;
        Ok(written)
    }

    /// Publishes the first `size` bytes of the upload object `upload_key` as `blob_key` (an
    /// atomic rename; anything past `size` is left over from a failed write and cut off).
    ///
    /// # Errors
    /// [`Error::NotFound`] if the upload object is gone; [`Error::Io`].
    pub(super) async fn commit_upload(&self, upload_key: &str, blob_key: &str, size: u64) -> Result<()> {
        let from = self.file(upload_key);
        let to = self.file(blob_key);
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&from)
            .await
            .map_err(|e| not_found_or_io(upload_key, e))?;
        f.set_len(size).await.map_err(io_err(upload_key))?;
        if self.fsync {
            f.sync_all().await.map_err(io_err(upload_key))?;
        }
        drop(f);
        create_parent(&to, blob_key).await?;
        tokio::fs::rename(&from, &to).await.map_err(|e| not_found_or_io(upload_key, e))?;
        Ok(())
    }

    /// Deletes the object `key`; deleting a missing object succeeds (deletes are idempotent).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        match tokio::fs::remove_file(self.file(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    /// Streams the bytes of `key`, or of `range` within it.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the object is missing; [`Error::Io`].
    pub(super) async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let mut file = tokio::fs::File::open(self.file(key)).await.map_err(|e| not_found_or_io(key, e))?;
        let (start, len) = match range {
            Some(r) => (r.start, r.end - r.start + 1),
            None => (0, file.metadata().await.map_err(io_err(key))?.len()),
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await.map_err(io_err(key))?;
        }
        Ok(tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK))
    }

    /// The size of object `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Io`].
    #[cfg(test)]
    pub(super) async fn size(&self, key: &str) -> Result<u64> {
        let meta = tokio::fs::metadata(self.file(key)).await.map_err(|e| not_found_or_io(key, e))?;
        Ok(meta.len())
    }

    /// Hashes the first `len` bytes of object `key` with `algorithm` (used when a client
    /// completes an upload with a digest of another algorithm than the one hashed on the fly).
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Io`].
    pub(super) async fn digest_of(&self, key: &str, len: u64, algorithm: Algorithm) -> Result<Digest> {
        use std::io::Read as _;

        let path = self.file(key);
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(|e| not_found_or_io(&key, e))?;
            let mut file = file.take(len);
            fn hash_all<H: sha2::Digest>(file: &mut impl std::io::Read, key: &str) -> Result<String> {
                let mut h = H::new();
                let mut buf = vec![0u8; READ_CHUNK];
                loop {
                    let n = file.read(&mut buf).map_err(io_err(key))?;
                    if n == 0 {
                        return Ok(hex::encode(h.finalize()));
                    }
                    h.update(&buf[..n]);
                }
            }
            let hex = match algorithm {
                Algorithm::Sha256 => hash_all::<sha2::Sha256>(&mut file, &key)?,
                Algorithm::Sha512 => hash_all::<sha2::Sha512>(&mut file, &key)?,
            };
            Digest::parse(&format!("{}:{hex}", algorithm.as_str()))
                .map_err(|e| Error::Io { key, source: std::io::Error::other(e) })
        })
        .await
        .map_err(|e| Error::Io { key: "digest".into(), source: std::io::Error::other(e) })?
    }
}

impl FsStore {
    /// Keys of all objects under `prefix` (a key prefix such as `uploads/`), in no particular
    /// order. Used by consistency checks and tests, never on the request path.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&prefix)(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(io_err(&prefix))?;
                    let path = entry.path();
                    if entry.file_type().map_err(io_err(&prefix))?.is_dir() {
                        stack.push(path);
                    } else if let Ok(rel) = path.strip_prefix(&root) {
                        let key = rel.to_string_lossy().replace('\\', "/");
                        if key.starts_with(&prefix) {
                            keys.push(key);
                        }
                    }
                }
            }
            Ok(keys)
        })
        .await
        .map_err(|e| Error::Io { key: "list".into(), source: std::io::Error::other(e) })?
    }
}

async fn create_parent(path: &Path, key: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io_err(key))?;
    }
    Ok(())
}

pub(super) fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { key: key.to_string(), source }
}

pub(super) fn not_found_or_io(key: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound(key.to_string())
    } else {
        Error::Io { key: key.to_string(), source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_discards_bytes_past_the_offset_and_commit_renames() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path(), true).await.unwrap();
        store.create_upload("uploads/u").await.unwrap();
        let chunk =
            |b: &'static [u8]| futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b))]);
        let mut h = UploadHasher::default();
        assert_eq!(store.write_upload("uploads/u", 0, chunk(b"hello"), &mut h).await.unwrap(), 5);
        // A failed write left garbage past offset 5; the next write at 5 replaces it.
        let mut junk = h.clone();
        store.write_upload("uploads/u", 5, chunk(b"GARBAGE!"), &mut junk).await.unwrap();
        store.write_upload("uploads/u", 5, chunk(b" world"), &mut h).await.unwrap();
        assert_eq!(h.digest(), Digest::sha256_of(b"hello world"));
        store.commit_upload("uploads/u", "blobs/x", 11).await.unwrap();
        assert_eq!(store.size("blobs/x").await.unwrap(), 11);
        let body: Vec<_> =
            store.read("blobs/x", Some(ByteRange { start: 6, end: 10 })).await.unwrap().collect().await;
        assert_eq!(body.into_iter().map(|b| b.unwrap()).collect::<Vec<_>>().concat(), b"world");
        assert!(matches!(store.read("uploads/u", None).await, Err(Error::NotFound(_))));
        store.delete("blobs/x").await.unwrap();
        store.delete("blobs/x").await.unwrap();
    }
}
