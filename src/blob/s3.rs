//! The S3-compatible backend, through `object_store`.
//!
//! Key layout: everything of upload session `<id>` lives under `blobs/<id>/`; each write is a new
//! object `blobs/<id>/<uuid>`, and the blob a session publishes is one of those keys (a session
//! id is a fresh UUID, so keys are never reused). Objects are never overwritten.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;
use tokio::task::JoinSet;

use super::{ByteRange, ByteStream, Chunk, Error, Listed, Result};
use crate::oci::{Algorithm, ContentHasher, Digest, UploadHasher};

/// Connection settings for an S3-compatible bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`; empty for AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region name.
    #[serde(default)]
    pub region: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (so several registries can share one).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Access key id; falls back to `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret key; falls back to `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most self-hosted stores need.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Answer blob downloads with a redirect to a presigned URL instead of streaming them.
    #[serde(default)]
    pub redirect: bool,
    /// Lifetime of presigned URLs, in seconds (keep it far below the GC grace windows).
    #[serde(default = "default_redirect_ttl")]
    pub redirect_ttl_secs: u64,
    /// Size of the parts large writes are sent in, in MiB (at least 5, S3's minimum).
    #[serde(default = "default_part_size")]
    pub part_size_mib: usize,
    /// Sign request bodies (SigV4's payload hash: one more SHA-256 of every byte sent). Unset:
    /// signed over `http://`, not over `https://` (AWS included), where TLS protects the body.
    #[serde(default)]
    pub sign_payload: Option<bool>,
}

impl Default for S3Config {
    /// The same defaults as an empty `[storage.s3]` section (minus the required bucket).
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            bucket: String::new(),
            prefix: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: default_true(),
            redirect: false,
            redirect_ttl_secs: default_redirect_ttl(),
            part_size_mib: default_part_size(),
            sign_payload: None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_redirect_ttl() -> u64 {
    300
}
fn default_part_size() -> usize {
    8
}

/// Parts in flight per write: with the part being filled, memory per upload stays near four
/// parts whatever the blob size.
const UPLOAD_CONCURRENCY: usize = 3;

/// Suffix of the marker object that names an in-progress multipart upload.
const MARKER_SUFFIX: &str = ".multipart";

/// An S3 bucket (and prefix).
#[derive(Debug, Clone)]
pub(super) struct S3Store {
    store: Arc<AmazonS3>,
    prefix: String,
    bucket: String,
    part_size: usize,
    redirect_ttl: Option<Duration>,
}

/// The key prefix of upload session `id`.
pub(super) fn session_prefix(id: &str) -> String {
    format!("blobs/{id}/")
}

impl S3Config {
    /// A client for `bucket` on this endpoint with these credentials (Berth's own bucket, or the
    /// reference registry's storage that `berth import` reads).
    ///
    /// # Errors
    /// [`Error::Config`] when the settings do not make a client.
    pub fn client(&self, bucket: &str) -> Result<object_store::aws::AmazonS3> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(!self.path_style);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &self.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let plain_http = self.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        builder = builder.with_unsigned_payload(!self.sign_payload.unwrap_or(plain_http));
        builder.build().map_err(|e| Error::Config(e.to_string()))
    }
}

impl S3Store {
    pub(super) fn open(config: &S3Config) -> Result<Self> {
        if config.bucket.is_empty() {
            return Err(Error::Config("storage.s3.bucket is required".into()));
        }
        if config.part_size_mib < 5 {
            return Err(Error::Config("storage.s3.part_size_mib must be at least 5".into()));
        }
        let store = config.client(&config.bucket)?;
        let prefix = config.prefix.as_deref().unwrap_or("").trim_matches('/');
        Ok(S3Store {
            store: Arc::new(store),
            prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            bucket: config.bucket.clone(),
            part_size: config.part_size_mib * 1024 * 1024,
            redirect_ttl: config.redirect.then(|| Duration::from_secs(config.redirect_ttl_secs)),
        })
    }

    pub(super) fn describe(&self) -> String {
        format!("s3 bucket {} prefix {:?}", self.bucket, self.prefix)
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    pub(super) async fn ping(&self) -> Result<()> {
        // Listing one page proves the bucket exists and the credentials work.
        let mut list = self.store.list(Some(&self.path("blobs")));
        if let Some(item) = list.next().await {
            item?;
        }
        Ok(())
    }

    /// Writes `body` as a new object under session `key`, buffering the first part so that small
    /// writes are one `PUT`.
    pub(super) async fn write_upload<S, E>(
        &self,
        key: &str,
        chunks: &mut Vec<Chunk>,
        body: S,
        hasher: &mut UploadHasher,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let chunk_key = format!("{key}{}", uuid::Uuid::new_v4().simple());
        let mut body = std::pin::pin!(body);
        // The body's own buffers, kept as they arrived: a part is sent as a list of them, so no
        // byte is copied on its way from the socket to the store.
        let mut first = Pieces::default();
        let mut multipart: Option<PartWriter> = None;
        let mut written = 0u64;
        while let Some(piece) = body.next().await {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    if let Some(m) = multipart {
                        m.abort().await;
                    }
                    return Err(Error::Body(e.to_string()));
                }
            };
            hasher.update(&piece);
            written += piece.len() as u64;
            match &mut multipart {
                Some(m) => m.write(piece).await?,
                None => {
                    first.push(piece);
                    if first.len >= self.part_size {
                        let mut m = self.part_writer(&chunk_key).await?;
                        for piece in std::mem::take(&mut first).take_all() {
                            m.write(piece).await?;
                        }
                        multipart = Some(m);
                    }
                }
            }
        }
        match multipart {
            Some(m) => {
                m.finish().await?;
            }
            None if written == 0 => return Ok(0),
            None => {
                let payload: PutPayload = first.take_all().into_iter().collect();
                self.store.put(&self.path(&chunk_key), payload).await?;
            }
        }
        chunks.push(Chunk { key: chunk_key, len: written });
        Ok(written)
    }

    /// Publishes a session: its only chunk as it is, an empty object for an empty blob, or
    /// several chunks composed into a new object.
    pub(super) async fn commit_upload(&self, key: &str, chunks: &[Chunk], size: u64) -> Result<String> {
        let total: u64 = chunks.iter().map(|c| c.len).sum();
        if total != size {
            return Err(Error::Config(format!("session {key} records {total} bytes, expected {size}")));
        }
        match chunks {
            [only] => Ok(only.key.clone()),
            [] => {
                let blob_key = format!("{key}{}", uuid::Uuid::new_v4().simple());
                self.store.put(&self.path(&blob_key), PutPayload::default()).await?;
                Ok(blob_key)
            }
            many => {
                let blob_key = format!("{key}{}", uuid::Uuid::new_v4().simple());
                let mut out = self.part_writer(&blob_key).await?;
                for chunk in many {
                    let mut stream = match self.store.get(&self.path(&chunk.key)).await {
                        Ok(r) => r.into_stream(),
                        Err(e) => {
                            out.abort().await;
                            return Err(e.into());
                        }
                    };
                    while let Some(bytes) = stream.next().await {
                        match bytes {
                            Ok(b) => out.write(b).await?,
                            Err(e) => {
                                out.abort().await;
                                return Err(e.into());
                            }
                        }
                    }
                }
                out.finish().await?;
                Ok(blob_key)
            }
        }
    }

    pub(super) async fn revert_commit(&self, chunks: &[Chunk], blob_key: &str) -> Result<()> {
        // A single chunk was published as it is; nothing to undo. A composed copy goes.
        if chunks.iter().any(|c| c.key == blob_key) { Ok(()) } else { self.delete(blob_key).await }
    }

    pub(super) async fn digest_of(&self, chunks: &[Chunk], algorithm: Algorithm) -> Result<Digest> {
        let mut hasher = ContentHasher::new(algorithm);
        for chunk in chunks {
            let mut stream = self.store.get(&self.path(&chunk.key)).await?.into_stream();
            while let Some(bytes) = stream.try_next().await? {
                hasher.update(&bytes);
            }
        }
        Ok(hasher.finish())
    }

    /// Deletes every object under `prefix` except `keep`, first aborting the multipart uploads
    /// that markers there name (writes cut off by a crash).
    pub(super) async fn delete_prefix(&self, prefix: &str, keep: Option<&str>) -> Result<()> {
        let keep = keep.map(|k| self.path(k));
        let objects: Vec<_> = self.store.list(Some(&self.path(prefix))).try_collect().await?;
        for marker in objects.iter().filter(|m| m.location.as_ref().ends_with(MARKER_SUFFIX)) {
            let target = marker.location.as_ref().trim_end_matches(MARKER_SUFFIX).to_string();
            if let Ok(id) = self.store.get(&marker.location).await {
                let id = String::from_utf8_lossy(&id.bytes().await?).to_string();
                // Already completed or aborted uploads answer an error; that is fine.
                let _ = self.store.abort_multipart(&Path::from(target), &id).await;
            }
        }
        let doomed = objects.into_iter().map(|m| m.location).filter(move |p| Some(p) != keep.as_ref());
        let paths = futures_util::stream::iter(doomed.map(Ok)).boxed();
        let mut results = self.store.delete_stream(paths);
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Starts a multipart upload to `key`, leaving a marker that names it until it completes or
    /// is aborted, so that session cleanup can abort it if this process dies mid-write.
    async fn part_writer(&self, key: &str) -> Result<PartWriter> {
        let path = self.path(key);
        let id = self.store.create_multipart(&path).await?;
        let marker = self.path(&format!("{key}{MARKER_SUFFIX}"));
        self.store.put(&marker, PutPayload::from(id.clone().into_bytes())).await?;
        Ok(PartWriter {
            store: self.store.clone(),
            path,
            id,
            marker,
            part_size: self.part_size,
            buf: Pieces::default(),
            next_part: 0,
            in_flight: JoinSet::new(),
            done: Vec::new(),
        })
    }

    /// The key (relative to this store's prefix) of object `full_key` in `bucket`, if this
    /// store can address it: same bucket, under the prefix.
    pub(super) fn key_of(&self, bucket: &str, full_key: &str) -> Option<String> {
        (bucket == self.bucket).then(|| full_key.strip_prefix(&self.prefix).map(str::to_string)).flatten()
    }

    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn read(&self, key: &str, range: Option<ByteRange>) -> Result<ByteStream> {
        let options =
            GetOptions { range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)), ..Default::default() };
        let result = match self.store.get_opts(&self.path(key), options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::NotFound(key.to_string())),
            Err(e) => return Err(e.into()),
        };
        Ok(result.into_stream().map_err(std::io::Error::other).boxed())
    }

    pub(super) async fn redirect_url(&self, key: &str) -> Result<Option<String>> {
        let Some(ttl) = self.redirect_ttl else { return Ok(None) };
        let url = self.store.signed_url(http::Method::GET, &self.path(key), ttl).await?;
        Ok(Some(url.to_string()))
    }

    pub(super) async fn size(&self, key: &str) -> Result<u64> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(meta.size),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(key.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` objects with keys after `after`, in key order (one listing request per
    /// thousand keys).
    pub(super) async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<Listed>> {
        let root = (!self.prefix.is_empty()).then(|| Path::from(self.prefix.trim_end_matches('/')));
        let offset = self.path(after);
        let objects: Vec<_> =
            self.store.list_with_offset(root.as_ref(), &offset).take(limit).try_collect().await?;
        Ok(objects
            .into_iter()
            .map(|m| Listed {
                key: m
                    .location
                    .as_ref()
                    .strip_prefix(&self.prefix)
                    .unwrap_or(m.location.as_ref())
                    .to_string(),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            })
            .collect())
    }

    /// Deletes `keys` in bulk (`DeleteObjects`, a thousand keys a request). A marker of an
    /// interrupted multipart upload first aborts the upload it names. Returns each key's outcome;
    /// a missing object counts as deleted.
    pub(super) async fn delete_many(&self, keys: &[String]) -> Vec<(String, Result<()>)> {
        let mut outcomes = Vec::with_capacity(keys.len());
        let mut plain = Vec::with_capacity(keys.len());
        for key in keys {
            if key.ends_with(MARKER_SUFFIX) {
                let outcome = self.abort_marked(key).await;
                if outcome.is_err() {
                    outcomes.push((key.clone(), outcome));
                    continue;
                }
            }
            plain.push(key.clone());
        }
        let paths: Vec<_> = plain.iter().map(|k| Ok(self.path(k))).collect();
        let paths = futures_util::stream::iter(paths).boxed();
        // A failed request reports one error for all its keys, so outcomes are matched by key:
        // a key not reported deleted failed with the last error seen.
        let mut deleted = std::collections::HashSet::new();
        let mut last_error = None;
        let mut results = self.store.delete_stream(paths);
        while let Some(result) = results.next().await {
            match result {
                Ok(path) => {
                    deleted.insert(path);
                }
                Err(object_store::Error::NotFound { path, .. }) => {
                    deleted.insert(Path::from(path));
                }
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        for key in plain {
            let outcome = if deleted.contains(&self.path(&key)) {
                Ok(())
            } else {
                let why = last_error.clone().unwrap_or_else(|| "not reported deleted".into());
                Err(Error::Io { key: key.clone(), source: std::io::Error::other(why) })
            };
            outcomes.push((key, outcome));
        }
        outcomes
    }

    /// Aborts the multipart upload that the marker `key` names (it may have completed or been
    /// aborted already: that is fine).
    async fn abort_marked(&self, key: &str) -> Result<()> {
        let id = match self.store.get(&self.path(key)).await {
            Ok(r) => String::from_utf8_lossy(&r.bytes().await?).to_string(),
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let target = self.path(key.trim_end_matches(MARKER_SUFFIX));
        let _ = self.store.abort_multipart(&target, &id).await;
        Ok(())
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let objects: Vec<_> = self.store.list(Some(&self.path(prefix))).try_collect().await?;
        Ok(objects
            .into_iter()
            .map(|m| {
                m.location.as_ref().strip_prefix(&self.prefix).unwrap_or(m.location.as_ref()).to_string()
            })
            .collect())
    }
}

/// Streams bytes into a multipart upload in fixed-size parts, a few in flight at once.
struct PartWriter {
    store: Arc<AmazonS3>,
    path: Path,
    id: MultipartId,
    marker: Path,
    part_size: usize,
    buf: Pieces,
    next_part: usize,
    in_flight: JoinSet<object_store::Result<(usize, PartId)>>,
    done: Vec<(usize, PartId)>,
}

/// Buffers as they arrived, in order, and their total length.
#[derive(Default)]
struct Pieces {
    queue: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
    fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        self.queue.push_back(piece);
    }

    /// The first `n` bytes (at most `len`), splitting a buffer at the boundary without copying.
    fn take(&mut self, mut n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(mut piece) = self.queue.pop_front() else { break };
            if piece.len() > n {
                let rest = piece.split_off(n);
                self.queue.push_front(rest);
            }
            n -= piece.len();
            self.len -= piece.len();
            out.push(piece);
        }
        out
    }

    fn take_all(mut self) -> Vec<Bytes> {
        let len = self.len;
        self.take(len)
    }
}

impl PartWriter {
    async fn write(&mut self, piece: Bytes) -> Result<()> {
        self.buf.push(piece);
        while self.buf.len >= self.part_size {
            let part: PutPayload = self.buf.take(self.part_size).into_iter().collect();
            self.send(part).await?;
        }
        Ok(())
    }

    async fn send(&mut self, part: PutPayload) -> Result<()> {
        while self.in_flight.len() >= UPLOAD_CONCURRENCY {
            self.join_one().await?;
        }
        let (store, path, id, idx) = (self.store.clone(), self.path.clone(), self.id.clone(), self.next_part);
        self.next_part += 1;
        self.in_flight.spawn(async move {
            let part_id = store.put_part(&path, &id, idx, part).await?;
            Ok((idx, part_id))
        });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        if let Some(joined) = self.in_flight.join_next().await {
            let done = joined.map_err(|e| Error::Config(format!("part upload task failed: {e}")))??;
            self.done.push(done);
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<()> {
        let rest = std::mem::take(&mut self.buf);
        let result = async {
            if rest.len > 0 || self.next_part == 0 {
                self.send(rest.take_all().into_iter().collect()).await?;
            }
            while !self.in_flight.is_empty() {
                self.join_one().await?;
            }
            self.done.sort_by_key(|(idx, _)| *idx);
            let parts = self.done.iter().map(|(_, p)| p.clone()).collect();
            self.store.complete_multipart(&self.path, &self.id, parts).await?;
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                let _ = self.store.delete(&self.marker).await;
                Ok(())
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn abort(mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if self.store.abort_multipart(&self.path, &self.id).await.is_ok() {
            let _ = self.store.delete(&self.marker).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hand_out_exact_parts_without_losing_or_reordering_bytes() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut pieces = Pieces::default();
        // Uneven buffers, as a request body delivers them.
        let mut at = 0;
        for size in [1, 7, 300, 64, 128, 500] {
            pieces.push(Bytes::copy_from_slice(&data[at..at + size]));
            at += size;
        }
        assert_eq!(pieces.len, 1000);
        let mut out = Vec::new();
        for part in [256, 256, 256] {
            let taken = pieces.take(part);
            assert_eq!(taken.iter().map(Bytes::len).sum::<usize>(), part);
            out.extend(taken.iter().flat_map(|b| b.iter().copied()));
        }
        assert_eq!(pieces.len, 232);
        out.extend(pieces.take_all().iter().flat_map(|b| b.iter().copied()));
        assert_eq!(out, data);
    }
}
