//! The reference registry's storage (CNCF distribution, `registry:2`), read for `berth import`:
//! its layout on a filesystem root or in an S3 bucket, through one `object_store` client either
//! way. Read-only except for [`Source::mark_owned`].
//!
//! The layout under `<root>/docker/registry/v2/`:
//! * `blobs/sha256/<2 hex>/<hex>/data` — every blob and every manifest, by digest;
//! * `repositories/<name>/_manifests/revisions/sha256/<hex>/link` — the manifests of a repository;
//! * `repositories/<name>/_manifests/tags/<tag>/current/link` — where a tag points (its history
//!   under `…/index/`);
//! * `repositories/<name>/_layers/…`, `_uploads/…` — blob links and upload sessions (not read).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};

use crate::blob::Origin;
use crate::blob::S3Config;
use crate::oci::Digest;

/// The directory that stops the reference registry's `garbage-collect` from running against a
/// store Berth has adopted blobs from: its name is not a valid repository name, and the
/// collector's mark phase stops at the first repository it cannot parse — before it deletes
/// anything.
pub const OWNED_MARKER: &str = "repositories/BERTH-OWNS-THIS-STORAGE/_layers/README";

/// What the marker file says to whoever finds it.
const MARKER_TEXT: &str = "Berth (an OCI registry) adopted the blobs of this storage in place and \
deletes them when it no longer needs them. Do not run the reference registry's garbage-collect \
against it, and do not push to it: this directory makes garbage-collect fail on purpose.\n";

/// Errors reading the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source is not usable as given.
    #[error("{0}")]
    Invalid(String),
    /// Reading it failed.
    #[error("reading the reference registry's storage: {0}")]
    Store(#[from] object_store::Error),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// A tag as the source has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagLink {
    /// The tag.
    pub tag: String,
    /// When its `current/link` was last written, in milliseconds since the epoch.
    pub modified_ms: i64,
}

/// The reference registry's storage.
#[derive(Debug, Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    /// `docker/registry/v2` under the registry's root directory, within `store`.
    base: String,
    /// Where the root is, for naming blobs to adopt.
    root: Origin,
    /// How the source was named, canonically (the import's identity).
    name: String,
}

/// Directory listings in flight at once.
const LIST_CONCURRENCY: usize = 16;

impl Source {
    /// Opens `from`: a filesystem directory (the registry's `rootdirectory`) or
    /// `s3://BUCKET/ROOT`, reached with the endpoint and credentials of `s3`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when it does not name a reference registry's storage.
    pub async fn open(from: &str, s3: Option<&S3Config>) -> Result<Self> {
        let source = if let Some(rest) = from.strip_prefix("s3://") {
            let (bucket, root) = rest.split_once('/').unwrap_or((rest, ""));
            let root = root.trim_matches('/');
            if bucket.is_empty() {
                return Err(Error::Invalid(format!("`{from}`: give s3://BUCKET/ROOT")));
            }
            let s3 = s3.ok_or_else(|| {
                Error::Invalid(format!(
                    "`{from}`: an S3 source is read with the endpoint and credentials of [storage.s3]"
                ))
            })?;
            let client = s3.client(bucket).map_err(|e| Error::Invalid(e.to_string()))?;
            let base = if root.is_empty() {
                "docker/registry/v2".to_string()
            } else {
                format!("{root}/docker/registry/v2")
            };
            Source {
                store: Arc::new(client),
                root: Origin::Object { bucket: bucket.to_string(), key: root.to_string() },
                name: format!("s3://{bucket}/{root}"),
                base,
            }
        } else {
            let dir = std::fs::canonicalize(from).map_err(|e| Error::Invalid(format!("`{from}`: {e}")))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            Source {
                store: Arc::new(store),
                base: "docker/registry/v2".to_string(),
                name: dir.display().to_string(),
                root: Origin::File(dir),
            }
        };
        let probe = source.store.list_with_delimiter(Some(&source.path("repositories"))).await;
        if !matches!(probe, Ok(ref l) if !l.common_prefixes.is_empty() || !l.objects.is_empty()) {
            return Err(Error::Invalid(format!(
                "`{from}` holds no reference registry storage (no docker/registry/v2/repositories/)"
            )));
        }
        Ok(source)
    }

    /// The source's canonical name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry's root directory, for checking it can be adopted from.
    pub fn root(&self) -> &Origin {
        &self.root
    }

    fn path(&self, rel: &str) -> Path {
        Path::from(format!("{}/{rel}", self.base))
    }

    /// Every repository, sorted: each directory under `repositories/` that has `_manifests`.
    /// Names are as stored; the caller checks they are valid.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn repositories(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut level = vec![String::new()];
        while !level.is_empty() {
            let listings: Vec<_> = futures_util::stream::iter(level.drain(..))
                .map(|dir| async move {
                    let rel = if dir.is_empty() {
                        "repositories".to_string()
                    } else {
                        format!("repositories/{dir}")
                    };
                    let listing = self.store.list_with_delimiter(Some(&self.path(&rel))).await?;
                    Ok::<_, Error>((dir, listing))
                })
                .buffer_unordered(LIST_CONCURRENCY)
                .try_collect()
                .await?;
            for (dir, listing) in listings {
                for prefix in listing.common_prefixes {
                    let Some(name) = prefix.filename() else { continue };
                    let child = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
                    if name == "_manifests" {
                        found.push(dir.clone());
                    } else if !name.starts_with('_') {
                        level.push(child);
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The tags of `repo` with when each last moved (one listing of its `_manifests/tags/`).
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn tags(&self, repo: &str) -> Result<Vec<TagLink>> {
        let mut tags: Vec<TagLink> = self
            .files_under(&format!("repositories/{repo}/_manifests/tags"))
            .await?
            .into_iter()
            .filter_map(|(rel, modified_ms)| {
                let tag = rel.strip_suffix("/current/link")?;
                (!tag.contains('/')).then(|| TagLink { tag: tag.to_string(), modified_ms })
            })
            .collect();
        tags.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(tags)
    }

    /// Where `tag` of `repo` points now; `None` when it is gone.
    ///
    /// # Errors
    /// When the store fails, or the link does not hold a digest.
    pub async fn tag_target(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        self.read_link(&format!("repositories/{repo}/_manifests/tags/{tag}/current/link")).await
    }

    /// Whether `digest` is a manifest of `repo` (its revision link exists: a manifest deleted
    /// through the API loses it, while its bytes stay until the registry's collector runs).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn has_revision(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let rel = format!(
            "repositories/{repo}/_manifests/revisions/{}/{}/link",
            digest.algorithm().as_str(),
            digest.hex()
        );
        Ok(self.read_link(&rel).await?.is_some())
    }

    /// Every manifest of `repo` (its revision links), sorted.
    ///
    /// # Errors
    /// When the store cannot be listed.
    pub async fn revisions(&self, repo: &str) -> Result<Vec<Digest>> {
        let mut out: Vec<Digest> = self
            .files_under(&format!("repositories/{repo}/_manifests/revisions"))
            .await?
            .into_iter()
            .filter_map(|(rel, _)| {
                let (algorithm, rest) = rel.split_once('/')?;
                let hex = rest.strip_suffix("/link")?;
                Digest::parse(&format!("{algorithm}:{hex}")).ok()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every file under `rel`, as its path below `rel` and when it was last written (ms).
    async fn files_under(&self, rel: &str) -> Result<Vec<(String, i64)>> {
        let dir = self.path(rel);
        let objects: Vec<_> = self.store.list(Some(&dir)).try_collect().await?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let below = o.location.as_ref().strip_prefix(dir.as_ref())?.trim_start_matches('/');
                Some((below.to_string(), o.last_modified.timestamp_millis()))
            })
            .collect())
    }

    fn blob_rel(digest: &Digest) -> String {
        let hex = digest.hex();
        format!("blobs/{}/{}/{hex}/data", digest.algorithm().as_str(), &hex[..2])
    }

    /// The size of blob `digest`; `None` when the source does not have it.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.store.head(&self.path(&Self::blob_rel(digest))).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The bytes of blob `digest` (for manifests: small); `None` when the source does not have it.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(&Self::blob_rel(digest))).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Where the bytes of blob `digest` are, for [`crate::blob::BlobStore::adopt`].
    pub fn origin(&self, digest: &Digest) -> Origin {
        let rel = format!("docker/registry/v2/{}", Self::blob_rel(digest));
        match &self.root {
            Origin::File(dir) => Origin::File(dir.join(rel)),
            Origin::Object { bucket, key } => Origin::Object {
                bucket: bucket.clone(),
                key: if key.is_empty() { rel } else { format!("{key}/{rel}") },
            },
        }
    }

    /// Places the marker ([`OWNED_MARKER`]) that stops the reference registry's offline
    /// collector from running against this storage.
    ///
    /// # Errors
    /// When it cannot be written.
    pub async fn mark_owned(&self) -> Result<()> {
        self.store.put(&self.path(OWNED_MARKER), Bytes::from_static(MARKER_TEXT.as_bytes()).into()).await?;
        Ok(())
    }

    /// Whether the marker is in place.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn is_marked(&self) -> Result<bool> {
        match self.store.head(&self.path(OWNED_MARKER)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_link(&self, rel: &str) -> Result<Option<Digest>> {
        let bytes = match self.store.get(&self.path(rel)).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&bytes);
        Digest::parse(text.trim())
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{rel} does not hold a digest: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &std::path::Path, rel: &str, text: &str) {
        let path = root.join("docker/registry/v2").join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[tokio::test]
    async fn reads_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"m");
        let link = d.to_string();
        write(dir.path(), "repositories/app/_manifests/tags/v1/current/link", &link);
        write(
            dir.path(),
            &format!("repositories/app/_manifests/tags/v1/index/sha256/{}/link", d.hex()),
            &link,
        );
        write(dir.path(), &format!("repositories/app/_manifests/revisions/sha256/{}/link", d.hex()), &link);
        write(dir.path(), "repositories/team/a/b/_manifests/revisions/sha256/x/link", "junk");
        write(dir.path(), "repositories/team/a/b/_layers/sha256/y/link", "junk");
        write(dir.path(), "repositories/team/a/_uploads/u/startedat", "");
        write(dir.path(), &format!("blobs/sha256/{}/{}/data", &d.hex()[..2], d.hex()), "m");
        let source = Source::open(dir.path().to_str().unwrap(), None).await.unwrap();

        assert_eq!(source.repositories().await.unwrap(), ["app", "team/a/b"]);
        let tags = source.tags("app").await.unwrap();
        assert_eq!(tags.iter().map(|t| t.tag.as_str()).collect::<Vec<_>>(), ["v1"]);
        assert!(tags[0].modified_ms > 0);
        assert!(source.tags("team/a/b").await.unwrap().is_empty(), "no tags directory");
        assert_eq!(source.tag_target("app", "v1").await.unwrap(), Some(d.clone()));
        assert_eq!(source.tag_target("app", "v2").await.unwrap(), None);
        assert!(source.has_revision("app", &d).await.unwrap());
        assert_eq!(source.revisions("app").await.unwrap(), std::slice::from_ref(&d));
        assert!(source.revisions("team/a/b").await.unwrap().is_empty(), "an unreadable revision is left out");
        assert_eq!(source.blob_size(&d).await.unwrap(), Some(1));
        assert_eq!(source.read_blob(&Digest::sha256_of(b"other")).await.unwrap(), None);
        assert!(matches!(source.origin(&d), Origin::File(p) if p.exists()));

        assert!(!source.is_marked().await.unwrap());
        source.mark_owned().await.unwrap();
        assert!(source.is_marked().await.unwrap());
        assert_eq!(source.repositories().await.unwrap(), ["app", "team/a/b"], "the marker is no repository");
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_registry_store() {
        let dir = tempfile::tempdir().unwrap();
        let err = Source::open(dir.path().to_str().unwrap(), None).await.unwrap_err();
        assert!(err.to_string().contains("no reference registry storage"), "{err}");
        let err = Source::open("s3://bucket/root", None).await.unwrap_err();
        assert!(err.to_string().contains("[storage.s3]"), "{err}");
    }
}
