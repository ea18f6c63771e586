//! The S3-compatible backend, through `object_store`.
//!
//! Key layout: everything of upload session `<id>` lives under `blobs/<id>/`: objects
//! `blobs/<id>/<uuid>` (a write shorter than a part, or one that could not hold the session) and
//! the session's multipart upload to `blobs/<id>/<uuid>` with its marker `….multipart`. The blob
//! a session publishes is one of those keys (a session id is a fresh UUID, so keys are never
//! reused). Objects are never overwritten; parts are written only by the request holding the
//! session, at the numbers after the recorded ones.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{GetOptions, GetRange, MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{ByteRange, ByteStream, Chunk, Error, Listed, OpenMultipart, Result};
use crate::oci::{Algorithm, ContentHasher, Digest};

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
    5
}

/// Buffered parts in flight per write: with the part being filled, memory per upload stays near
/// four parts whatever the blob size.
const UPLOAD_CONCURRENCY: usize = 3;

/// Streamed parts in flight per write: the one being streamed and the one before, waiting for
/// the store's answer (each is kept until then). A third adds memory, not speed (measured).
const STREAMED_IN_FLIGHT: usize = 2;

/// The smallest part S3 accepts for every part but the last.
const MIN_PART: usize = 5 * 1024 * 1024;

/// The most parts S3 takes in one multipart upload.
const MAX_PARTS: usize = 10_000;

/// Parts of one size before the size doubles (four times at most), so that an upload of unknown
/// length fits in [`MAX_PARTS`]: 31 × 2,000 parts' worth, 310 GiB at 5 MiB parts, with memory
/// growing only for uploads that large.
const PARTS_PER_SIZE: usize = 2_000;

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
    /// Sends parts of known length as they arrive (unsigned payloads only); `None` buffers them.
    streamer: Option<PartStreamer>,
}

/// A new, never used key under session `key` (a prefix).
fn fresh_key(key: &str) -> String {
    format!("{key}{}", uuid::Uuid::new_v4().simple())
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
        builder = builder.with_unsigned_payload(!self.signs_payload());
        builder.build().map_err(|e| Error::Config(e.to_string()))
    }

    /// Whether request bodies are signed: as configured, else only over plain `http://`.
    fn signs_payload(&self) -> bool {
        let plain_http = self.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        self.sign_payload.unwrap_or(plain_http)
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
        // Customer-provided encryption keys (SSE-C, from the environment) must go with every part,
        // which only object_store's own requests carry.
        let sse: AmazonS3ConfigKey = "aws_server_side_encryption".parse()?;
        let customer_keys = AmazonS3Builder::from_env().get_config_value(&sse).as_deref() == Some("sse-c");
        let streamer = if config.signs_payload() || customer_keys {
            None
        } else {
            let http = reqwest::Client::builder().build().map_err(|e| Error::Config(e.to_string()))?;
            Some(PartStreamer { http, resent: Counter::default() })
        };
        let prefix = config.prefix.as_deref().unwrap_or("").trim_matches('/');
        Ok(S3Store {
            store: Arc::new(store),
            prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            bucket: config.bucket.clone(),
            part_size: config.part_size_mib * 1024 * 1024,
            redirect_ttl: config.redirect.then(|| Duration::from_secs(config.redirect_ttl_secs)),
            streamer,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!("s3 bucket {} prefix {:?}", self.bucket, self.prefix)
    }

    /// The count of streamed parts sent again, if parts are streamed.
    pub(super) fn parts_resent(&self) -> Option<Counter> {
        self.streamer.as_ref().map(|s| s.resent.clone())
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
        size_hint: Option<u64>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let chunk_key = fresh_key(key);
        let mut body = std::pin::pin!(body);
        // The body's own buffers, kept as they arrived: a part is sent as a list of them, so no
        // byte is copied on its way from the socket to the store.
        let mut first = Pieces::default();
        let mut multipart: Option<PartWriter> = None;
        if let Some(total) = size_hint.filter(|&n| n >= self.part_size as u64) {
            // Long enough for parts: no need to buffer the first one to find out.
            let mut m = self.part_writer(&chunk_key).await?;
            m.plan(total);
            multipart = Some(m);
        }
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
            written += piece.len() as u64;
            match &mut multipart {
                Some(m) => m.write(piece).await?,
                None => {
                    first.push(piece);
                    if first.len >= self.part_size {
                        let mut m = self.part_writer(&chunk_key).await?;
                        if let Some(total) = size_hint {
                            m.plan(total);
                        }
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
        chunks.push(Chunk::object(chunk_key, written));
        Ok(written)
    }

    /// Whether a write of `size_hint` bytes could fill a part of the session's multipart upload
    /// (with the objects it would fold in): then it should hold the session and add parts.
    pub(super) fn wants_shared_write(&self, chunks: &[Chunk], size_hint: Option<u64>) -> bool {
        let from = fold_from(chunks, self.part_size as u64);
        let pending: u64 = chunks[from..].iter().map(|c| c.len).sum();
        size_hint.is_none_or(|n| pending + n >= self.part_size as u64)
    }

    /// Writes `body` into the session's multipart upload (starting one if none is open), after
    /// folding in the objects recorded after it; a write that does not fill a part becomes an
    /// object of its own, and so does a last piece shorter than S3's smallest part. The caller
    /// holds the session: nobody else adds parts meanwhile. Parts sent by a write that fails or
    /// is not recorded are never listed, so the next write's parts replace them.
    pub(super) async fn write_shared<S, E>(
        &self,
        key: &str,
        chunks: &mut Vec<Chunk>,
        body: S,
        size_hint: Option<u64>,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let from = fold_from(chunks, self.part_size as u64);
        let pending: u64 = chunks[from..].iter().map(|c| c.len).sum();
        let mut body = std::pin::pin!(body);
        let mut first = Pieces::default();
        let mut written = 0u64;
        // An announced length says at once whether the write fills a part; otherwise the body
        // is buffered until it does (or ends).
        let fills_part = size_hint.is_some_and(|n| pending + n >= self.part_size as u64);
        while !fills_part && pending + written < self.part_size as u64 {
            let Some(piece) = body.next().await else { break };
            let piece = piece.map_err(|e| Error::Body(e.to_string()))?;
            written += piece.len() as u64;
            first.push(piece);
        }
        if !fills_part && pending + written < self.part_size as u64 {
            if written > 0 {
                chunks.push(self.put_pieces(key, first).await?);
            }
            return Ok(written);
        }
        let open = from.checked_sub(1).map(|i| &chunks[i]).and_then(|c| c.multipart.as_ref().map(|m| (c, m)));
        let (mut writer, started) = match open {
            Some((chunk, multipart)) => (self.resume(&chunk.key, multipart), None),
            None => {
                let target = fresh_key(key);
                let writer = self.part_writer(&target).await?;
                (writer, Some(target))
            }
        };
        if let Some(total) = size_hint {
            writer.plan(pending + total);
        }
        let sent = async {
            self.fold_into(&mut writer, &chunks[from..]).await?;
            for piece in first.take_all() {
                writer.write(piece).await?;
            }
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| Error::Body(e.to_string()))?;
                written += piece.len() as u64;
                writer.write(piece).await?;
            }
            writer.flush(MIN_PART).await
        }
        .await;
        let (parts, rest) = match sent {
            Ok(sent) => sent,
            Err(e) => {
                if started.is_some() {
                    writer.abort().await;
                } else {
                    writer.stop().await;
                }
                return Err(e);
            }
        };
        let into_parts = pending + written - rest.len as u64;
        chunks.truncate(from);
        match started {
            Some(target) => chunks.push(Chunk {
                key: target,
                len: into_parts,
                multipart: Some(OpenMultipart {
                    id: writer.id.clone(),
                    marker: self.key_of_path(&writer.marker),
                    parts,
                }),
            }),
            None => {
                let chunk = chunks.last_mut().expect("the open multipart upload is recorded");
                chunk.len += into_parts;
                chunk.multipart.as_mut().expect("it is open").parts.extend(parts);
            }
        }
        if rest.len > 0 {
            chunks.push(self.put_pieces(key, rest).await?);
        }
        Ok(written)
    }

    /// Completes the session's open multipart upload with its recorded parts, the objects
    /// recorded after it sent as the last part; the upload becomes an object chunk. The caller
    /// holds the session. A completion already done (its reply lost, or by a process that died
    /// before recording it) is recognized by the object's size.
    pub(super) async fn seal(&self, chunks: &mut Vec<Chunk>) -> Result<()> {
        let Some(at) = chunks.iter().rposition(|c| c.multipart.is_some()) else { return Ok(()) };
        let open = chunks[at].multipart.clone().expect("found by its multipart upload");
        let len = chunks[at..].iter().map(|c| c.len).sum::<u64>();
        let mut writer = self.resume(&chunks[at].key, &open);
        let previous = open.parts.iter().map(|p| PartId { content_id: p.clone() }).collect();
        let completed = async {
            self.fold_into(&mut writer, &chunks[at + 1..]).await?;
            writer.complete(previous).await
        }
        .await;
        if let Err(e) = completed {
            writer.stop().await;
            match self.size(&chunks[at].key).await {
                Ok(n) if n == len => {}
                _ => return Err(e),
            }
        }
        if let Err(e) = self.delete(&open.marker).await {
            tracing::warn!(storage.key = %open.marker, error = %e, "could not delete a completed upload's marker");
        }
        let key = chunks[at].key.clone();
        chunks.truncate(at);
        chunks.push(Chunk::object(key, len));
        Ok(())
    }

    /// Stores `pieces` as a new object of session `key`, in one `PUT`.
    async fn put_pieces(&self, key: &str, pieces: Pieces) -> Result<Chunk> {
        let object = fresh_key(key);
        let len = pieces.len as u64;
        self.store.put(&self.path(&object), pieces.take_all().into_iter().collect()).await?;
        Ok(Chunk::object(object, len))
    }

    /// Streams the objects `chunks` into `writer`, in order.
    async fn fold_into(&self, writer: &mut PartWriter, chunks: &[Chunk]) -> Result<()> {
        for chunk in chunks {
            let mut stream = self.store.get(&self.path(&chunk.key)).await?.into_stream();
            while let Some(bytes) = stream.try_next().await? {
                writer.write(bytes).await?;
            }
        }
        Ok(())
    }

    /// A writer adding parts to the open multipart upload `multipart` on `key`, after its
    /// recorded parts.
    fn resume(&self, key: &str, multipart: &OpenMultipart) -> PartWriter {
        PartWriter::new(
            self.store.clone(),
            self.streamer.clone(),
            self.path(key),
            multipart.id.clone(),
            self.path(&multipart.marker),
            self.part_size,
            multipart.parts.len(),
        )
    }

    /// Publishes a session: its only chunk as it is, an empty object for an empty blob, or
    /// several chunks composed into a new object.
    pub(super) async fn commit_upload(&self, key: &str, chunks: &[Chunk], size: u64) -> Result<String> {
        let total: u64 = chunks.iter().map(|c| c.len).sum();
        if total != size {
            return Err(Error::Config(format!("session {key} records {total} bytes, expected {size}")));
        }
        if super::BlobStore::needs_seal(chunks) {
            return Err(Error::Config(format!("session {key} has a multipart upload still open")));
        }
        match chunks {
            [only] => Ok(only.key.clone()),
            [] => {
                let blob_key = fresh_key(key);
                self.store.put(&self.path(&blob_key), PutPayload::default()).await?;
                Ok(blob_key)
            }
            many => {
                let blob_key = fresh_key(key);
                let mut out = self.part_writer(&blob_key).await?;
                if let Err(e) = self.fold_into(&mut out, many).await {
                    out.abort().await;
                    return Err(e);
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
        if super::BlobStore::needs_seal(chunks) {
            return Err(Error::Config(
                "a session's multipart upload must be completed before it is read".into(),
            ));
        }
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
        Ok(PartWriter::new(self.store.clone(), self.streamer.clone(), path, id, marker, self.part_size, 0))
    }

    /// The key (relative to the prefix) of a path of this store.
    fn key_of_path(&self, path: &Path) -> String {
        path.as_ref().strip_prefix(&self.prefix).unwrap_or(path.as_ref()).to_string()
    }

    /// The key (relative to this store's prefix) of object `full_key` in `bucket`, if this
    /// store can address it: same bucket, under the prefix.
    pub(super) fn key_of(&self, bucket: &str, full_key: &str) -> Option<String> {
        (bucket == self.bucket).then(|| full_key.strip_prefix(&self.prefix).map(str::to_string)).flatten()
    }

    /// The bucket.
    pub(super) fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Copies object `full_key` of this store's bucket to `key`, inside the store (no byte
    /// passes through Berth).
    pub(super) async fn copy_in_bucket(&self, full_key: &str, key: &str) -> Result<()> {
        self.store.copy(&Path::from(full_key), &self.path(key)).await?;
        Ok(())
    }

    /// Writes `body` (`size` bytes) as object `key`: one request when small, else in parts.
    pub(super) async fn write_object(&self, key: &str, size: u64, mut body: ByteStream) -> Result<()> {
        let io = |e: std::io::Error| Error::Io { key: key.to_string(), source: e };
        let short = |got: u64| Error::Io {
            key: key.to_string(),
            source: std::io::Error::other(format!("read {got} bytes, expected {size}")),
        };
        if size <= self.part_size as u64 {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            while let Some(piece) = body.next().await {
                buf.extend_from_slice(&piece.map_err(io)?);
            }
            if buf.len() as u64 != size {
                return Err(short(buf.len() as u64));
            }
            self.store.put(&self.path(key), Bytes::from(buf).into()).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&self.path(key)).await?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut got = 0u64;
        let sent: Result<()> = async {
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(io)?;
                got += piece.len() as u64;
                writer.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                writer.put(piece);
            }
            if got == size { Ok(()) } else { Err(short(got)) }
        }
        .await;
        match sent {
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
                key: self.key_of_path(&m.location),
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
        Ok(objects.into_iter().map(|m| self.key_of_path(&m.location)).collect())
    }
}

/// From which index on a shared write folds the session's recorded objects into parts: the ones
/// after the open multipart upload, or — with none open — all of them if together they are
/// shorter than a part (a longer run, left by a session of an older Berth or by writes that
/// could not hold it, stays as it is and is composed at completion).
fn fold_from(chunks: &[Chunk], part_size: u64) -> usize {
    match chunks.iter().rposition(|c| c.multipart.is_some()) {
        Some(open) => open + 1,
        None if chunks.iter().map(|c| c.len).sum::<u64>() < part_size => 0,
        None => chunks.len(),
    }
}

/// Streams bytes into a multipart upload, a few parts in flight at once. A part whose length is
/// planned goes to the store as its bytes arrive when the store takes unsigned payloads (see
/// [`PartStreamer`]); otherwise parts are buffered whole and sent by `object_store`, which
/// retries them on transient errors.
struct PartWriter {
    store: Arc<AmazonS3>,
    streamer: Option<PartStreamer>,
    path: Path,
    id: MultipartId,
    marker: Path,
    sizes: PartSizes,
    buf: Pieces,
    /// The part being streamed, and how many of its bytes are still to come.
    streaming: Option<(mpsc::Sender<Bytes>, usize)>,
    next_part: usize,
    in_flight: JoinSet<Result<(usize, PartId)>>,
    done: Vec<(usize, PartId)>,
}

/// Sends a part of known length as an `UploadPart` to a presigned URL, its body streamed from
/// the client's request as it arrives rather than gathered first. The payload cannot be signed
/// (its hash is not known before it is sent). The part's pieces are kept (shared, not copied)
/// until the store has answered: a part the store refuses or drops — object stores answer 503
/// under load — is sent again whole by `object_store`, with its retries.
#[derive(Debug, Clone)]
struct PartStreamer {
    http: reqwest::Client,
    /// Parts sent again after their streamed request failed (`berth_storage_parts_resent`).
    resent: Counter,
}

/// How long a presigned part URL stays valid (checked when the request starts).
const PART_URL_TTL: Duration = Duration::from_secs(15 * 60);

/// How long a streamed part's request may wait for the store to take its next bytes, or to answer
/// once it has them all, before it counts as failed (and the part is sent again).
const STORE_PATIENCE: Duration = Duration::from_secs(60);

/// A streamed part's request to `url` failed: `what` happened.
fn part_failed(url: &reqwest::Url, what: String) -> Error {
    Error::Io { key: url.path().to_string(), source: std::io::Error::other(what) }
}

fn stalled(url: &reqwest::Url, what: &str) -> Error {
    part_failed(url, format!("the store {what} for {} s", STORE_PATIENCE.as_secs()))
}

/// Where a streamed part goes: the upload and its part number.
struct PartTarget {
    store: Arc<AmazonS3>,
    path: Path,
    id: MultipartId,
    idx: usize,
}

impl PartStreamer {
    /// Streams the `len` bytes `pieces` delivers as part `target`; falls back to a buffered
    /// `put_part` of the same pieces if the streamed request fails.
    async fn put(
        &self,
        target: PartTarget,
        url: reqwest::Url,
        len: usize,
        mut pieces: mpsc::Receiver<Bytes>,
    ) -> Result<PartId> {
        let (to_body, body) = mpsc::channel::<Bytes>(1);
        let mut request = std::pin::pin!(self.stream(url.clone(), len, body));
        let mut to_body = Some(to_body);
        let mut kept = Vec::new();
        // The request's outcome once known before the part was handed over whole: a store may
        // answer (503) before it has read the body, and then hold the connection without reading
        // on, so the body must stop being fed then — not only when the connection is dropped.
        let mut outcome = None;
        while let Some(piece) = pieces.recv().await {
            kept.push(piece.clone());
            let Some(body) = to_body.as_ref().filter(|_| outcome.is_none()) else { continue };
            tokio::select! {
                sent = tokio::time::timeout(STORE_PATIENCE, body.send(piece)) => match sent {
                    Ok(Ok(())) => {}
                    // The request dropped its body: it ended, and says how below.
                    Ok(Err(_)) => to_body = None,
                    Err(_) => outcome = Some(Err(stalled(&url, "took no bytes"))),
                },
                answered = &mut request => outcome = Some(answered),
            }
        }
        drop(to_body);
        let error = match outcome {
            Some(Ok(part)) => return Ok(part),
            Some(Err(e)) => e,
            None => match tokio::time::timeout(STORE_PATIENCE, &mut request).await {
                Ok(Ok(part)) => return Ok(part),
                Ok(Err(e)) => e,
                Err(_) => stalled(&url, "did not answer"),
            },
        };
        if kept.iter().map(Bytes::len).sum::<usize>() != len {
            // The write stopped before the part was whole: nothing to send again.
            return Err(error);
        }
        tracing::info!(storage.key = %target.path, part = target.idx + 1, error = %error, "streamed part failed; sending it again");
        self.resent.inc();
        let PartTarget { store, path, id, idx } = target;
        Ok(store.put_part(&path, &id, idx, kept.into_iter().collect()).await?)
    }

    async fn stream(&self, url: reqwest::Url, len: usize, pieces: mpsc::Receiver<Bytes>) -> Result<PartId> {
        let body = futures_util::stream::unfold(pieces, |mut pieces| async move {
            pieces.recv().await.map(|piece| (Ok::<_, std::io::Error>(piece), pieces))
        });
        let failed = |what: String| part_failed(&url, what);
        let response = self
            .http
            .put(url.clone())
            .header(http::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| failed(format!("part upload: {e}")))?;
        let status = response.status();
        let etag =
            response.headers().get(http::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(failed(format!("part upload answered {status}: {text}")));
        }
        let content_id = etag.ok_or_else(|| failed("part upload answered without an ETag".into()))?;
        Ok(PartId { content_id })
    }
}

/// How long a writer's parts are: `part_size` each, or — for a write whose length is known — that
/// length spread evenly over enough parts to keep [`UPLOAD_CONCURRENCY`] of them in flight (each
/// at least S3's minimum), so a 16 MiB chunk goes as three parts at once rather than two.
#[derive(Debug, Clone, Copy)]
struct PartSizes {
    part_size: usize,
    /// Parts of the plan still to send, and how many of them are one byte longer than `base`.
    planned: usize,
    longer: usize,
    base: usize,
}

impl PartSizes {
    fn fixed(part_size: usize) -> Self {
        PartSizes { part_size, planned: 0, longer: 0, base: part_size }
    }

    /// A plan for `total` bytes whose first part is number `first + 1`.
    fn for_total(part_size: usize, total: u64, first: usize) -> Self {
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        let n = total
            .div_ceil(part_size)
            .max(UPLOAD_CONCURRENCY)
            .min(total / MIN_PART)
            .min(MAX_PARTS.saturating_sub(first))
            .max(1);
        PartSizes { part_size, planned: n, longer: total % n, base: total / n }
    }

    /// The length of part number `index + 1`.
    fn next(&self, index: usize) -> usize {
        match self.planned {
            0 => self.part_size << (index / PARTS_PER_SIZE).min(4),
            _ if self.longer > 0 => self.base + 1,
            _ => self.base,
        }
    }

    fn advance(&mut self) {
        self.planned = self.planned.saturating_sub(1);
        self.longer = self.longer.saturating_sub(1);
    }
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
    /// A writer whose first part is number `first_part + 1`.
    fn new(
        store: Arc<AmazonS3>,
        streamer: Option<PartStreamer>,
        path: Path,
        id: MultipartId,
        marker: Path,
        part_size: usize,
        first_part: usize,
    ) -> Self {
        PartWriter {
            store,
            streamer,
            path,
            id,
            marker,
            sizes: PartSizes::fixed(part_size),
            buf: Pieces::default(),
            streaming: None,
            next_part: first_part,
            in_flight: JoinSet::new(),
            done: Vec::new(),
        }
    }

    /// Sizes the next parts for `total` bytes still to come (see [`PartSizes`]).
    fn plan(&mut self, total: u64) {
        self.sizes = PartSizes::for_total(self.sizes.part_size, total, self.next_part);
    }

    async fn write(&mut self, mut piece: Bytes) -> Result<()> {
        while !piece.is_empty() {
            if self.streaming.is_none()
                && self.buf.len == 0
                && self.sizes.planned > 0
                && self.streamer.is_some()
            {
                self.start_streamed_part().await?;
            }
            let Some((pieces, left)) = &mut self.streaming else { break };
            let now = piece.split_to(piece.len().min(*left));
            *left -= now.len();
            let last = *left == 0;
            let sent = pieces.send(now).await;
            if last {
                // Dropping the sender ends the part's body.
                self.streaming = None;
            }
            if sent.is_err() {
                return self.ended_early().await;
            }
        }
        if piece.is_empty() {
            return Ok(());
        }
        self.buf.push(piece);
        while self.buf.len >= self.sizes.next(self.next_part) {
            let part: PutPayload = self.buf.take(self.sizes.next(self.next_part)).into_iter().collect();
            self.sizes.advance();
            self.send(part).await?;
        }
        Ok(())
    }

    /// Starts the next planned part as a streamed upload; `write` feeds it.
    async fn start_streamed_part(&mut self) -> Result<()> {
        let streamer = self.streamer.clone().expect("only called with a streamer");
        let (idx, len) = self.next_slot().await?;
        let query = [("partNumber", (idx + 1).to_string()), ("uploadId", self.id.clone())];
        let options = SignedUrlOptions::default().with_query(query);
        let url = self.store.signed_url_opts(http::Method::PUT, &self.path, PART_URL_TTL, &options).await?;
        // One piece queued: the request body takes the client's pieces as the store reads them.
        let (pieces, queued) = mpsc::channel(1);
        let target =
            PartTarget { store: self.store.clone(), path: self.path.clone(), id: self.id.clone(), idx };
        self.in_flight.spawn(async move { Ok((idx, streamer.put(target, url, len, queued).await?)) });
        self.streaming = Some((pieces, len));
        Ok(())
    }

    /// A streamed part's task ended before its body was handed over (it was aborted or failed):
    /// its error, or one of another part.
    async fn ended_early(&mut self) -> Result<()> {
        self.streaming = None;
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        let source = std::io::Error::other("a part upload ended before its body was sent");
        Err(Error::Io { key: self.path.to_string(), source })
    }

    /// Waits until fewer than [`STREAMED_IN_FLIGHT`] parts are in flight; then takes the next
    /// part number and its planned length.
    async fn next_slot(&mut self) -> Result<(usize, usize)> {
        self.make_room(STREAMED_IN_FLIGHT).await?;
        let slot = (self.next_part, self.sizes.next(self.next_part));
        self.sizes.advance();
        self.next_part += 1;
        Ok(slot)
    }

    async fn send(&mut self, part: PutPayload) -> Result<()> {
        self.make_room(UPLOAD_CONCURRENCY).await?;
        let (store, path, id, idx) = (self.store.clone(), self.path.clone(), self.id.clone(), self.next_part);
        self.next_part += 1;
        self.in_flight.spawn(async move {
            let part_id = store.put_part(&path, &id, idx, part).await?;
            Ok((idx, part_id))
        });
        Ok(())
    }

    /// Waits until fewer than `limit` parts are in flight.
    async fn make_room(&mut self, limit: usize) -> Result<()> {
        while self.in_flight.len() >= limit {
            self.join_one().await?;
        }
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        if let Some(joined) = self.in_flight.join_next().await {
            let done = joined.map_err(|e| Error::Config(format!("part upload task failed: {e}")))??;
            self.done.push(done);
        }
        Ok(())
    }

    /// Sends what is buffered as a part if it is at least `min` bytes and waits for every part
    /// in flight. Returns the ids of the parts sent, in order, and what was too short to send.
    async fn flush(&mut self, min: usize) -> Result<(Vec<String>, Pieces)> {
        if let Some((_, left)) = self.streaming.take() {
            self.stop().await;
            return Err(Error::Body(format!("the body ended {left} bytes before its announced length")));
        }
        if self.buf.len > 0 && self.buf.len >= min {
            let part = std::mem::take(&mut self.buf).take_all().into_iter().collect();
            self.send(part).await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        self.done.sort_by_key(|(idx, _)| *idx);
        let parts = self.done.drain(..).map(|(_, p)| p.content_id).collect();
        Ok((parts, std::mem::take(&mut self.buf)))
    }

    /// Sends the rest as the last part and completes the upload with `previous` parts followed
    /// by the ones this writer sent.
    /// (With no part at all, `object_store` sends an empty one.)
    async fn complete(&mut self, mut previous: Vec<PartId>) -> Result<()> {
        let (parts, _) = self.flush(1).await?;
        previous.extend(parts.into_iter().map(|content_id| PartId { content_id }));
        self.store.complete_multipart(&self.path, &self.id, previous).await?;
        Ok(())
    }

    /// Completes an upload this writer started, deleting its marker; aborts it on failure.
    async fn finish(mut self) -> Result<()> {
        match self.complete(Vec::new()).await {
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

    /// Stops the parts in flight (the upload stays open).
    async fn stop(&mut self) {
        self.streaming = None;
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
    }

    /// Stops, and aborts the upload and deletes its marker.
    async fn abort(mut self) {
        self.stop().await;
        if self.store.abort_multipart(&self.path, &self.id).await.is_ok() {
            let _ = self.store.delete(&self.marker).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_parts_cover_the_write_exactly_and_are_never_too_short() {
        const MIB: u64 = 1024 * 1024;
        let part_size = 8 * MIB as usize;
        for total in
            [8 * MIB, 9 * MIB, 15 * MIB + 3, 16 * MIB, 3 * MIN_PART as u64 + 1, 100 * MIB + 7, 1024 * MIB]
        {
            let mut sizes = PartSizes::for_total(part_size, total, 0);
            let n = sizes.planned;
            let parts: Vec<usize> = (0..n)
                .map(|i| {
                    let len = sizes.next(i);
                    sizes.advance();
                    len
                })
                .collect();
            assert_eq!(parts.iter().sum::<usize>() as u64, total, "{total}");
            assert!(parts.iter().all(|&p| p >= MIN_PART), "{total}: {parts:?}");
            assert!(parts.iter().all(|&p| p <= part_size + MIN_PART), "{total}: {parts:?}");
            assert_eq!(sizes.next(n), part_size, "past the plan, parts are part_size again");
        }
        // Short writes spread over the parts in flight; long ones keep the configured size.
        assert_eq!(PartSizes::for_total(part_size, 16 * MIB, 0).planned, UPLOAD_CONCURRENCY);
        assert_eq!(PartSizes::for_total(part_size, 1024 * MIB, 0).base, part_size);
        // A plan never runs past S3's last part number.
        let late = PartSizes::for_total(part_size, 1024 * MIB, MAX_PARTS - 10);
        assert_eq!((late.planned, late.base), (10, 1024 * MIB as usize / 10));
    }

    #[test]
    fn parts_of_unknown_length_grow_so_that_large_uploads_fit_in_s3s_part_count() {
        let part_size = MIN_PART;
        let sizes = PartSizes::fixed(part_size);
        assert_eq!((sizes.next(0), sizes.next(PARTS_PER_SIZE - 1)), (part_size, part_size));
        assert_eq!(sizes.next(PARTS_PER_SIZE), 2 * part_size);
        assert_eq!(sizes.next(MAX_PARTS - 1), 16 * part_size);
        let most: u64 = (0..MAX_PARTS).map(|i| sizes.next(i) as u64).sum();
        assert!(most >= 300 << 30, "{most}");
    }

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
