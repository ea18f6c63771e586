//! The S3-compatible backend, through `object_store`.
//!
//! Key layout: everything of upload session `<id>` lives under `blobs/<id>/`; each write is a new
//! object `blobs/<id>/<uuid>`, and the blob a session publishes is one of those keys (a session
//! id is a fresh UUID, so keys are never reused). Objects are never overwritten.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Deserialize;

use super::{ByteRange, ByteStream, Chunk, Error, Result};
use crate::oci::{Algorithm, Digest, UploadHasher};

/// Connection settings for an S3-compatible bucket.
#[derive(Debug, Clone, Default, Deserialize)]
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
}

fn default_true() -> bool {
    true
}
fn default_redirect_ttl() -> u64 {
    300
}
fn default_part_size() -> usize {
    16
}

/// Parts in flight per write.
const UPLOAD_CONCURRENCY: usize = 4;

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

impl S3Store {
    pub(super) fn open(config: &S3Config) -> Result<Self> {
        if config.bucket.is_empty() {
            return Err(Error::Config("storage.s3.bucket is required".into()));
        }
        if config.part_size_mib < 5 {
            return Err(Error::Config("storage.s3.part_size_mib must be at least 5".into()));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_virtual_hosted_style_request(!config.path_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &config.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let store = builder.build().map_err(|e| Error::Config(e.to_string()))?;
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
        let path = self.path(&chunk_key);
        let mut body = std::pin::pin!(body);
        let mut first = BytesMut::new();
        let mut multipart: Option<WriteMultipart> = None;
        let mut written = 0u64;
        while let Some(piece) = body.next().await {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    if let Some(m) = multipart {
                        let _ = m.abort().await;
                    }
                    return Err(Error::Body(e.to_string()));
                }
            };
            hasher.update(&piece);
            written += piece.len() as u64;
            match &mut multipart {
                Some(m) => {
                    m.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                    m.put(piece);
                }
                None => {
                    first.extend_from_slice(&piece);
                    if first.len() >= self.part_size {
                        let upload = self.store.put_multipart(&path).await?;
                        let mut m = WriteMultipart::new_with_chunk_size(upload, self.part_size);
                        m.put(std::mem::take(&mut first).freeze());
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
                self.store.put(&path, PutPayload::from(first.freeze())).await?;
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
                let upload = self.store.put_multipart(&self.path(&blob_key)).await?;
                let mut out = WriteMultipart::new_with_chunk_size(upload, self.part_size);
                for chunk in many {
                    let mut stream = self.store.get(&self.path(&chunk.key)).await?.into_stream();
                    while let Some(bytes) = stream.next().await {
                        let bytes = match bytes {
                            Ok(b) => b,
                            Err(e) => {
                                let _ = out.abort().await;
                                return Err(e.into());
                            }
                        };
                        out.wait_for_capacity(UPLOAD_CONCURRENCY).await?;
                        out.put(bytes);
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
        use sha2::Digest as _;
        let mut sha256 = sha2::Sha256::new();
        let mut sha512 = sha2::Sha512::new();
        for chunk in chunks {
            let mut stream = self.store.get(&self.path(&chunk.key)).await?.into_stream();
            while let Some(bytes) = stream.try_next().await? {
                match algorithm {
                    Algorithm::Sha256 => sha256.update(&bytes),
                    Algorithm::Sha512 => sha512.update(&bytes),
                }
            }
        }
        let text = match algorithm {
            Algorithm::Sha256 => format!("sha256:{}", hex::encode(sha256.finalize())),
            Algorithm::Sha512 => format!("sha512:{}", hex::encode(sha512.finalize())),
        };
        Digest::parse(&text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Deletes every object under `prefix` except `keep`.
    pub(super) async fn delete_prefix(&self, prefix: &str, keep: Option<&str>) -> Result<()> {
        let keep = keep.map(|k| self.path(k));
        let objects: Vec<_> = self.store.list(Some(&self.path(prefix))).try_collect().await?;
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
