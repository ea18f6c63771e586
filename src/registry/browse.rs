//! Read-only views the web console shows: repository search, a repository's tags and untagged
//! manifests, a manifest taken apart.

use serde_json::Value;

use super::{Error, Referrer, Registry, Result};
use crate::meta::{DeletedTag, ManifestRow, RepositorySummary, TagRow, UntaggedRow};
use crate::oci::{Digest, Reference, RepoName};

/// A descriptor as a manifest lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Part {
    /// Its media type.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// For an index child: its platform (`os/architecture[/variant]`), if given.
    pub platform: Option<String>,
}

/// A manifest taken apart for reading.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ManifestView {
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its bytes, as pushed.
    pub payload: String,
    /// An image's config.
    pub config: Option<Part>,
    /// An image's layers.
    pub layers: Vec<Part>,
    /// An index's children.
    pub children: Vec<Part>,
    /// The manifest it refers to, for a referrer.
    pub subject: Option<String>,
    /// Its annotations.
    pub annotations: Vec<(String, String)>,
    /// The tags pointing at it.
    pub tags: Vec<String>,
    /// The manifests referring to it (signatures, SBOMs…).
    pub referrers: Vec<Referrer>,
}

impl Registry {
    /// Live repositories whose name contains `text`, after `last`, at most `limit`.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn repositories_matching(
        &self,
        text: &str,
        last: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RepositorySummary>> {
        Ok(self.meta.repositories_matching(text, last, limit).await?)
    }

    /// Up to `limit` deleted repositories, most recently deleted first.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn deleted_repositories(&self, limit: i64) -> Result<Vec<RepositorySummary>> {
        Ok(self.meta.deleted_repositories(limit).await?)
    }

    /// Up to `limit` tags of `repo` after `after`, with what each points at.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn tag_rows(&self, repo: &RepoName, after: &str, limit: i64) -> Result<Vec<TagRow>> {
        Ok(self.meta.tag_rows(repo, after, limit).await?)
    }

    /// Up to `limit` deleted tags of `repo` (not pushed again since), newest first.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn deleted_tags(&self, repo: &RepoName, limit: i64) -> Result<Vec<DeletedTag>> {
        Ok(self.meta.deleted_tags(repo, limit).await?)
    }

    /// Up to `limit` live manifests of `repo` no tag points at, newest first.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn untagged_rows(&self, repo: &RepoName, limit: i64) -> Result<Vec<UntaggedRow>> {
        Ok(self.meta.untagged_rows(repo, limit).await?)
    }

    /// Manifest `digest` of `repo` taken apart, with its tags and referrers. Reading it is not a
    /// pull (it extends no grace).
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`].
    pub async fn manifest_view(&self, repo: &RepoName, digest: &Digest) -> Result<ManifestView> {
        let (row, json) = self.manifest_json(repo, digest).await?;
        let list = |key: &str| parts(&json, key);
        let annotations = json["annotations"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default();
        let payload = serde_json::to_string_pretty(&json)
            .unwrap_or_else(|_| String::from_utf8_lossy(&row.payload).to_string());
        Ok(ManifestView {
            config: json.get("config").map(part),
            layers: list("layers"),
            children: list("manifests"),
            subject: json["subject"]["digest"].as_str().map(str::to_string),
            annotations,
            tags: self.meta.tags_at(repo, &row.digest).await?,
            referrers: self.referrers(repo, digest, None).await?,
            digest: row.digest,
            media_type: row.media_type,
            payload,
        })
    }

    /// The platforms an index lists, read from the index alone.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`].
    pub async fn index_platforms(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<String>> {
        let (_, json) = self.manifest_json(repo, digest).await?;
        Ok(parts(&json, "manifests").into_iter().filter_map(|p| p.platform).collect())
    }

    async fn manifest_json(&self, repo: &RepoName, digest: &Digest) -> Result<(ManifestRow, Value)> {
        let row = self
            .meta
            .manifest(repo, &Reference::Digest(digest.clone()))
            .await?
            .ok_or(Error::ManifestUnknown)?;
        let json = serde_json::from_slice(&row.payload).unwrap_or(Value::Null);
        Ok((row, json))
    }
}

/// The descriptors a manifest lists under `key` (`layers`, `manifests`).
fn parts(json: &Value, key: &str) -> Vec<Part> {
    json[key].as_array().map(|a| a.iter().map(part).collect()).unwrap_or_default()
}

/// A descriptor, read leniently (the manifest was validated when it was pushed).
fn part(v: &Value) -> Part {
    Part {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: v["digest"].as_str().unwrap_or_default().to_string(),
        size: v["size"].as_u64().unwrap_or(0),
        platform: v.get("platform").map(|p| {
            let mut text =
                format!("{}/{}", p["os"].as_str().unwrap_or("?"), p["architecture"].as_str().unwrap_or("?"));
            if let Some(variant) = p["variant"].as_str() {
                text.push('/');
                text.push_str(variant);
            }
            text
        }),
    }
}
