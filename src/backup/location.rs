//! Where backups are kept: a directory or an S3 bucket and prefix, through `object_store`.
//!
//! Layout under the location's root (docs/backup.md):
//!
//! ```text
//! objects/<storage key>                    the blob bytes, shared by every backup there
//! backups/<id>/tables/<table>.jsonl.gz     one table of the metadata, as of the snapshot
//! backups/<id>/keys.jsonl.gz               every storage key the snapshot names: key, size, digest
//! backups/<id>/progress.json               rewritten while the backup runs
//! backups/<id>/backup.json                 written last: a backup without it is incomplete
//! ```
//!
//! Storage keys are never reused, so an object already under `objects/` with the size the
//! snapshot names holds exactly those bytes: a later backup skips it.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, WriteMultipart};

use crate::blob::{ByteStream, Origin, S3Config};

/// Errors of a backup location.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The location is not usable as given.
    #[error("backup location: {0}")]
    Invalid(String),
    /// The object does not exist.
    #[error("`{0}` is not in the backup location")]
    NotFound(String),
    /// The store failed.
    #[error("backup location: {0}")]
    Store(#[from] object_store::Error),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Objects smaller than this are written with one request; larger ones in parts.
const ONE_REQUEST: u64 = 8 * 1024 * 1024;
/// The size of the parts larger objects are written in.
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight per object.
const PARTS_IN_FLIGHT: usize = 2;

/// A directory or an S3 bucket and prefix holding backups. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    /// The key prefix of the location's root inside the store (`""` or ending in `/`).
    base: String,
    root: Root,
}

#[derive(Debug, Clone)]
enum Root {
    Dir(PathBuf),
    Bucket { bucket: String, prefix: String },
}

/// An object under the location's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path relative to the root.
    pub path: String,
    /// Its size.
    pub size: u64,
}

impl Location {
    /// Opens `spec`: a directory (created if missing) or `s3://BUCKET/PREFIX`. An S3 location is
    /// reached with the endpoint and credentials of `s3` (the deployment's `[storage.s3]`) when
    /// given, else those of the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …).
    ///
    /// # Errors
    /// [`Error::Invalid`] when it cannot be opened.
    pub fn open(spec: &str, s3: Option<&S3Config>) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                return Err(Error::Invalid(format!("`{spec}`: give s3://BUCKET/PREFIX")));
            }
            let client = match s3 {
                Some(config) => config.client(bucket).map_err(|e| Error::Invalid(e.to_string()))?,
                None => {
                    let builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                    let http = builder
                        .get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint)
                        .is_some_and(|e| e.starts_with("http://"));
                    builder.with_allow_http(http).build().map_err(|e| Error::Invalid(e.to_string()))?
                }
            };
            Ok(Location {
                store: Arc::new(client),
                base: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
                root: Root::Bucket { bucket: bucket.to_string(), prefix: prefix.to_string() },
            })
        } else {
            if spec.is_empty() {
                return Err(Error::Invalid("give a directory or s3://BUCKET/PREFIX".into()));
            }
            std::fs::create_dir_all(spec).map_err(|e| Error::Invalid(format!("`{spec}`: {e}")))?;
            let dir = std::fs::canonicalize(spec).map_err(|e| Error::Invalid(format!("`{spec}`: {e}")))?;
            // Not flushed file by file: `flush` flushes the whole filesystem once, before the
            // record that makes a backup complete is written (as `cp` then `sync`).
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            Ok(Location { store: Arc::new(store), base: String::new(), root: Root::Dir(dir) })
        }
    }

    /// The location as an operator names it.
    pub fn name(&self) -> String {
        match &self.root {
            Root::Dir(dir) => dir.display().to_string(),
            Root::Bucket { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
        }
    }

    fn path(&self, rel: &str) -> Path {
        Path::from(format!("{}{rel}", self.base))
    }

    /// Where the object at `rel` is, for storage that can take it without copying its bytes
    /// through Berth (a hard link, a copy inside one bucket).
    pub fn origin_of(&self, rel: &str) -> Origin {
        match &self.root {
            Root::Dir(dir) => Origin::File(dir.join(rel)),
            Root::Bucket { bucket, .. } => {
                Origin::Object { bucket: bucket.clone(), key: format!("{}{rel}", self.base) }
            }
        }
    }

    /// Makes everything written so far durable: on a directory, one `syncfs` of its filesystem
    /// (files are not flushed one by one); an object store's writes are durable when answered.
    ///
    /// # Errors
    /// When the filesystem cannot be flushed.
    pub async fn flush(&self) -> Result<()> {
        let Root::Dir(dir) = &self.root else { return Ok(()) };
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd as _;
            let handle = std::fs::File::open(&dir)?;
            // SAFETY: `syncfs` takes an open descriptor, which `handle` keeps open for the call.
            if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
        .map_err(|e| Error::Invalid(format!("flushing the backup: {e}")))?
        .map_err(|e| Error::Invalid(format!("flushing the backup: {e}")))
    }

    /// The size of the object at `rel`, `None` when there is none.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` as the object at `rel` (replacing it), in one request.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        self.store.put(&self.path(rel), bytes.into()).await?;
        Ok(())
    }

    /// Writes the `size` bytes of `body` as the object at `rel`: small objects in one request,
    /// larger ones in parts; the object appears whole or not at all.
    ///
    /// # Errors
    /// When reading `body` or the store fails, or `body` does not hold `size` bytes.
    pub async fn put_stream(&self, rel: &str, size: u64, mut body: ByteStream) -> Result<()> {
        let short = |got: u64| Error::Invalid(format!("`{rel}`: read {got} bytes, expected {size}"));
        let io = |e: std::io::Error| Error::Invalid(format!("`{rel}`: reading the source: {e}"));
        if size < ONE_REQUEST {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            while let Some(piece) = body.next().await {
                buf.extend_from_slice(&piece.map_err(io)?);
            }
            if buf.len() as u64 != size {
                return Err(short(buf.len() as u64));
            }
            return self.put(rel, buf.into()).await;
        }
        let upload = self.store.put_multipart(&self.path(rel)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut got = 0u64;
        let outcome: Result<()> = async {
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(io)?;
                got += piece.len() as u64;
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.put(piece);
            }
            if got == size { Ok(()) } else { Err(short(got)) }
        }
        .await;
        match outcome {
            Ok(()) => {
                writer.finish().await?;
                Ok(())
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// A writer of the object at `rel`, fed piece by piece (a table of the metadata).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn writer(&self, rel: &str) -> Result<WriteMultipart> {
        let upload = self.store.put_multipart(&self.path(rel)).await?;
        Ok(WriteMultipart::new_with_chunk_size(upload, PART))
    }

    /// Streams the object at `rel`.
    ///
    /// # Errors
    /// [`Error::NotFound`]; others when the store fails.
    pub async fn get(&self, rel: &str) -> Result<ByteStream> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(r.into_stream().map_err(std::io::Error::other).boxed()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(rel.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole object at `rel` (a small one).
    ///
    /// # Errors
    /// [`Error::NotFound`]; others when the store fails.
    pub async fn get_bytes(&self, rel: &str) -> Result<Bytes> {
        match self.store.get(&self.path(rel)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(rel.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The names of the directories right under `rel` (the backups under `backups`), sorted.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn children(&self, rel: &str) -> Result<Vec<String>> {
        let listed = self.store.list_with_delimiter(Some(&self.path(rel))).await?;
        let mut names: Vec<String> =
            listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// Every object under `rel`, in no particular order.
    pub fn list(&self, rel: &str) -> futures_util::stream::BoxStream<'_, Result<Entry>> {
        let base = self.base.clone();
        self.store
            .list(Some(&self.path(rel)))
            .map(move |item| {
                let meta = item?;
                let path = meta.location.as_ref().strip_prefix(&base).unwrap_or(meta.location.as_ref());
                Ok(Entry { path: path.to_string(), size: meta.size })
            })
            .boxed()
    }

    /// Deletes the object at `rel`; deleting a missing one succeeds.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The path of the copy of storage key `key`.
pub fn object_path(key: &str) -> String {
    format!("objects/{key}")
}

/// The path of a file of backup `id`.
pub fn backup_path(id: &str, file: &str) -> String {
    format!("backups/{id}/{file}")
}
