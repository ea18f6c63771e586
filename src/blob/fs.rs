//! The filesystem backend: uploads are append-only files that become blobs by an atomic rename,
//! so completing an upload never copies or re-reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::fs_write::{BufferPool, UploadWriter};
use super::{ByteRange, Error, FsOptions, Hold, Listed, Result};
use crate::oci::{Algorithm, ContentHasher, Digest};

/// Files under a root directory.
#[derive(Debug, Clone)]
pub(super) struct FsStore {
    root: PathBuf,
    options: FsOptions,
    buffers: Arc<BufferPool>,
}

/// Size of the slices a blob is streamed in.
const READ_CHUNK: usize = 1 << 20;

impl FsStore {
    /// A filesystem store under `root` (created if missing).
    ///
    /// # Errors
    /// [`Error::Io`] when `root` cannot be created.
    pub(super) async fn open(root: impl Into<PathBuf>, options: FsOptions) -> Result<Self> {
        let root = root.into();
        tokio::fs::create_dir_all(&root).await.map_err(io_err(&root.to_string_lossy()))?;
        Ok(FsStore { root, options, buffers: Arc::default() })
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

    /// Writes `body` into the upload object `key` starting at `offset`; bytes past `offset` from
    /// an earlier, failed write are discarded first. Returns the number of bytes written. If the
    /// body fails midway, the bytes written so far stay in the file past the recorded size and
    /// are discarded by the next write. See [`UploadWriter`] for how the bytes reach disk.
    pub(super) async fn write_upload<S, E>(
        &self,
        key: &str,
        offset: u64,
        body: S,
        size_hint: Option<u64>,
        hold: Hold,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let path = self.file(key);
        let mut writer = UploadWriter::open(&path, offset, size_hint, self.options, &self.buffers, hold)
            .await
            .map_err(|e| not_found_or_io(key, e))?;
        let mut body = std::pin::pin!(body);
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => {
                    if let Err(e) = writer.write(&chunk).await {
                        failure = Some(io_err(key)(e));
                        break;
                    }
                }
                Err(e) => {
                    failure = Some(Error::Body(e.to_string()));
                    break;
                }
            }
        }
        // Always wait for the writes in flight, so none lands after this returns.
        let written = writer.finish().await.map_err(io_err(key));
        if let Some(e) = failure {
            return Err(e);
        }
        written
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
        // The blob's age is its publication, not the session's last write: the storage sweep
        // leaves alone what is younger than `blob_grace`, and the row naming this file is written
        // right after the rename.
        let f = f.into_std().await;
        let fsync = self.options.fsync;
        tokio::task::spawn_blocking(move || {
            f.set_modified(std::time::SystemTime::now())?;
            if fsync { f.sync_all() } else { Ok(()) }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(io_err(upload_key))?;
        create_parent(&to, blob_key).await?;
        tokio::fs::rename(&from, &to).await.map_err(|e| not_found_or_io(upload_key, e))?;
        if self.options.fsync
            && let Some(dir) = to.parent()
        {
            // The rename itself is durable only once its directory is: without this, a power
            // loss after the metadata commit could leave a row whose file is still named
            // `uploads/<id>`.
            let dir = tokio::fs::File::open(dir).await.map_err(io_err(blob_key))?;
            dir.sync_all().await.map_err(io_err(blob_key))?;
        }
        Ok(())
    }

    /// Deletes the object `key`; deleting a missing object succeeds (deletes are idempotent).
    ///
    /// # Errors
    /// [`Error::Io`].
    /// Hard-links the file at `from` as `key`: the bytes become a stored copy without being
    /// copied, and stay whatever later happens to `from`.
    pub(super) async fn adopt(&self, from: &Path, key: &str) -> Result<()> {
        let to = self.file(key);
        create_parent(&to, key).await?;
        tokio::fs::hard_link(from, &to).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::CrossesDevices {
                Error::Config(format!(
                    "{} is on another filesystem than {}: a hard link cannot cross filesystems",
                    from.display(),
                    self.root.display()
                ))
            } else {
                Error::Io { key: key.to_string(), source: e }
            }
        })?;
        // A link shares the source file's (old) modification time; the storage sweep judges age
        // by it, so the adopted key is touched to count from its adoption, as a publication is.
        tokio::task::spawn_blocking(move || {
            std::fs::File::options().write(true).open(&to)?.set_modified(std::time::SystemTime::now())
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(io_err(key))
    }

    /// Writes `body` (`size` bytes) as the object `key`: to a file beside it, flushed if the
    /// store flushes blobs, then renamed into place — the key holds all the bytes or none.
    pub(super) async fn write_object(&self, key: &str, size: u64, mut body: super::ByteStream) -> Result<()> {
        use futures_util::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let to = self.file(key);
        create_parent(&to, key).await?;
        let part = to.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
        let written: Result<()> = async {
            let mut file = tokio::fs::File::create(&part).await.map_err(io_err(key))?;
            let mut got = 0u64;
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(io_err(key))?;
                got += piece.len() as u64;
                file.write_all(&piece).await.map_err(io_err(key))?;
            }
            if got != size {
                return Err(Error::Io {
                    key: key.to_string(),
                    source: std::io::Error::other(format!("read {got} bytes, expected {size}")),
                });
            }
            if self.options.fsync {
                file.sync_all().await.map_err(io_err(key))?;
            }
            tokio::fs::rename(&part, &to).await.map_err(io_err(key))
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        written
    }

    /// Whether files under `dir` can be hard-linked into this store (same filesystem).
    pub(super) fn same_filesystem(&self, dir: &Path) -> Result<bool> {
        use std::os::unix::fs::MetadataExt as _;
        let here = std::fs::metadata(&self.root).map_err(io_err("."))?;
        let there = std::fs::metadata(dir).map_err(io_err(&dir.to_string_lossy()))?;
        Ok(here.dev() == there.dev())
    }

    /// Whether `dir` lies inside one of the trees this store writes and sweeps (`blobs/`,
    /// `uploads/`): a tree there would be taken for Berth's own objects.
    pub(super) fn owns_tree_of(&self, dir: &Path) -> Result<bool> {
        let dir = std::fs::canonicalize(dir).map_err(io_err(&dir.to_string_lossy()))?;
        let root = std::fs::canonicalize(&self.root).map_err(io_err("."))?;
        Ok(super::OWN_TREES.iter().any(|tree| dir.starts_with(root.join(tree))))
    }

    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        match tokio::fs::remove_file(self.file(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    /// Streams the bytes of `key`, or of `range` within it, from a read-only memory map: the
    /// bytes go from the page cache to the socket without a copy through a read buffer. Each
    /// slice releases its pages from this process's mapping once sent, so memory stays bounded.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the object is missing; [`Error::Io`].
    pub(super) async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let path = self.file(key);
        let file = std::fs::File::open(&path).map_err(|e| not_found_or_io(key, e))?;
        let len = file.metadata().map_err(io_err(key))?.len() as usize;
        let (start, end) = match range {
            Some(r) => (r.start as usize, (r.end as usize + 1).min(len)),
            None => (0, len),
        };
        let map = if len == 0 {
            None
        } else {
            // SAFETY: a published blob file is never written again — it is created under an
            // upload key, renamed into place once complete, and only ever unlinked (which keeps
            // the mapping valid). Nothing truncates or modifies it while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(key))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            Some(std::sync::Arc::new(map))
        };
        let slices = (start..end).step_by(READ_CHUNK).filter_map(move |at| {
            let map = map.clone()?;
            Some(Ok(Bytes::from_owner(MappedSlice { map, start: at, end: (at + READ_CHUNK).min(end) })))
        });
        Ok(futures_util::stream::iter(slices))
    }

    /// The size of object `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Io`].
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
            let mut hasher = ContentHasher::new(algorithm);
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                let n = file.read(&mut buf).map_err(io_err(&key))?;
                if n == 0 {
                    return Ok(hasher.finish());
                }
                hasher.update(&buf[..n]);
            }
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
            // Walk only the directory the prefix names (its part up to the last `/`).
            let start = prefix.rsplit_once('/').map_or(root.clone(), |(dir, _)| root.join(dir));
            let mut stack = vec![start];
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

    /// Up to `limit` objects with keys after `after`, in key order: a walk that visits
    /// directories in the order of the keys under them and skips those wholly before `after`.
    pub(super) async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<Listed>> {
        let root = self.root.clone();
        let after = after.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk_sorted(&root, "", &after, limit, &mut out)?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::Io { key: "list".into(), source: std::io::Error::other(e) })?
    }
}

/// Appends to `out` the files under `dir` (whose keys start with `rel`) that sort after `after`,
/// in key order, until `out` holds `limit`.
fn walk_sorted(dir: &Path, rel: &str, after: &str, limit: usize, out: &mut Vec<Listed>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(rel)(e)),
    };
    // A directory sorts as its name and a slash: that is how the keys under it begin.
    let mut named = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(rel))?;
        let is_dir = entry.file_type().map_err(io_err(rel))?.is_dir();
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = if is_dir { format!("{rel}{name}/") } else { format!("{rel}{name}") };
        named.push((key, is_dir, entry.path()));
    }
    named.sort();
    for (key, is_dir, path) in named {
        if out.len() >= limit {
            return Ok(());
        }
        if is_dir {
            // Skip a directory whose every key sorts before `after`.
            if key.as_str() < after && !after.starts_with(&key) {
                continue;
            }
            walk_sorted(&path, &key, after, limit, out)?;
        } else if key.as_str() > after {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&key)(e)),
            };
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            out.push(Listed { key, size: meta.len(), modified_ms });
        }
    }
    Ok(())
}

async fn create_parent(path: &Path, key: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io_err(key))?;
    }
    Ok(())
}

/// A slice of a mapped blob that, once dropped (sent), drops its whole pages from this process's
/// mapping; they stay in the page cache.
struct MappedSlice {
    map: std::sync::Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl Drop for MappedSlice {
    fn drop(&mut self) {
        const PAGE: usize = 4096;
        let from = self.start.div_ceil(PAGE) * PAGE;
        let to = if self.end == self.map.len() { self.end } else { self.end / PAGE * PAGE };
        if to > from {
            // SAFETY: the mapping is read-only and shared with the file; dropping pages from it
            // loses nothing (a later access faults them back in from the page cache), and no
            // other slice covers these whole pages.
            let _ = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
    }
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

    fn hold() -> Hold {
        std::sync::Arc::new(())
    }

    const BOTH_WAYS: [FsOptions; 2] =
        [FsOptions { fsync: true, direct_io: true }, FsOptions { fsync: false, direct_io: false }];

    #[tokio::test]
    async fn write_discards_bytes_past_the_offset_and_commit_renames() {
        for options in BOTH_WAYS {
            write_discard_commit(options).await;
        }
    }

    async fn write_discard_commit(options: FsOptions) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path(), options).await.unwrap();
        store.create_upload("uploads/u").await.unwrap();
        let chunk =
            |b: &'static [u8]| futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b))]);
        assert_eq!(
            store.write_upload("uploads/u", 0, chunk(b"hello"), Some(1 << 20), hold()).await.unwrap(),
            5
        );
        // A body shorter than its hint leaves no reserved space behind.
        assert_eq!(std::fs::metadata(dir.path().join("uploads/u")).unwrap().len(), 5);
        // A failed write left garbage past offset 5; the next write at 5 replaces it.
        store.write_upload("uploads/u", 5, chunk(b"GARBAGE!"), None, hold()).await.unwrap();
        store.write_upload("uploads/u", 5, chunk(b" world"), None, hold()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("uploads/u")).unwrap(), b"hello world");
        store.commit_upload("uploads/u", "blobs/x", 11).await.unwrap();
        assert_eq!(store.size("blobs/x").await.unwrap(), 11);
        let body: Vec<_> =
            store.read("blobs/x", Some(ByteRange { start: 6, end: 10 })).await.unwrap().collect().await;
        assert_eq!(body.into_iter().map(|b| b.unwrap()).collect::<Vec<_>>().concat(), b"world");
        assert!(matches!(store.read("uploads/u", None).await, Err(Error::NotFound(_))));
        store.delete("blobs/x").await.unwrap();
        store.delete("blobs/x").await.unwrap();
    }

    /// Large bodies in uneven pieces, resumed at offsets inside a block and across buffers: the
    /// file holds exactly the bytes sent, whichever way it was written.
    #[tokio::test]
    async fn large_writes_at_unaligned_offsets_keep_every_byte() {
        let data: Vec<u8> = (0..11_000_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for options in BOTH_WAYS {
            let dir = tempfile::tempdir().unwrap();
            let store = FsStore::open(dir.path(), options).await.unwrap();
            store.create_upload("uploads/big").await.unwrap();
            let mut offset = 0usize;
            for end in [4_097, 5_000_001, 5_000_002, data.len()] {
                let pieces: Vec<_> = data[offset..end]
                    .chunks(65_521)
                    .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                    .collect();
                let n = store
                    .write_upload(
                        "uploads/big",
                        offset as u64,
                        futures_util::stream::iter(pieces),
                        None,
                        hold(),
                    )
                    .await
                    .unwrap();
                assert_eq!(n as usize, end - offset);
                offset = end;
            }
            assert_eq!(std::fs::read(dir.path().join("uploads/big")).unwrap(), data, "{options:?}");
        }
    }

    /// Staging buffers are reused by the next write and released once the store is idle.
    #[tokio::test(start_paused = true)]
    async fn staging_buffers_are_kept_briefly() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path(), BOTH_WAYS[0]).await.unwrap();
        store.create_upload("uploads/b").await.unwrap();
        let data = Bytes::from(vec![7u8; 9 << 20]);
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(data)]);
        store.write_upload("uploads/b", 0, body, None, hold()).await.unwrap();
        assert!(store.buffers.pooled() > 0);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert_eq!(store.buffers.pooled(), 0);
    }
}
