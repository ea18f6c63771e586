//! What the admin faces show: repositories with their sizes, tombstones, tag history, and
//! delete previews.

use super::{Error, Registry, Result};
use crate::meta::{Preview, RepositorySummary, TagMove};
use crate::oci::{Digest, RepoName, Tag};

/// A tombstone as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tombstone {
    /// Its digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: i64,
    /// When it was deleted (Unix ms).
    pub deleted_at: i64,
    /// Who deleted it.
    pub deleted_by: Option<String>,
    /// Why it is a tombstone: `deleted` (directly), `subject` (with its subject), `repository`
    /// (with its repository) or `purged`.
    pub deleted_why: String,
    /// The tags it had when deleted.
    pub tags: Vec<String>,
    /// Referrers deleted with it.
    pub referrers: Vec<String>,
    /// The subject it refers to, if it is a referrer.
    pub subject: Option<String>,
    /// Whether it can be restored.
    pub restorable: bool,
    /// Why not, when it cannot.
    pub unrestorable_reason: Option<String>,
    /// When the restore window ends and the collector may remove it (Unix ms).
    pub purge_after: i64,
}

/// What a delete preview is about.
#[derive(Debug, Clone)]
pub enum DeleteTarget {
    /// A manifest by digest.
    Manifest(RepoName, Digest),
    /// A tag.
    Tag(RepoName, Tag),
    /// A whole repository.
    Repository(RepoName),
}

impl DeleteTarget {
    /// Parses `REPO@DIGEST`, `REPO:TAG` or `REPO` — the forms the CLI and the admin API share.
    ///
    /// # Errors
    /// A message naming the part that does not parse.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if let Some((repo, digest)) = text.split_once('@') {
            let digest = Digest::parse(digest).map_err(|e| e.to_string())?;
            return Ok(DeleteTarget::Manifest(RepoName::parse(repo)?, digest));
        }
        if let Some((repo, tag)) = text.rsplit_once(':') {
            return Ok(DeleteTarget::Tag(RepoName::parse(repo)?, Tag::parse(tag)?));
        }
        Ok(DeleteTarget::Repository(RepoName::parse(text)?))
    }

    /// The repository the target is in.
    pub fn repository(&self) -> &RepoName {
        match self {
            DeleteTarget::Manifest(r, _) | DeleteTarget::Tag(r, _) | DeleteTarget::Repository(r) => r,
        }
    }
}

impl std::fmt::Display for DeleteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeleteTarget::Manifest(r, d) => write!(f, "{r}@{d}"),
            DeleteTarget::Tag(r, t) => write!(f, "{r}:{t}"),
            DeleteTarget::Repository(r) => write!(f, "{r}"),
        }
    }
}

impl Registry {
    /// Repositories after `last` (deleted ones too), with counts and sizes.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn repositories(&self, last: Option<&str>, limit: i64) -> Result<Vec<RepositorySummary>> {
        let mut repos = self.meta.repository_summaries(last, limit).await?;
        for r in &mut repos {
            r.quotas = self.quotas_covering(&r.name);
        }
        Ok(repos)
    }

    /// The names of the quota rules whose scope holds `repo`.
    pub fn quotas_covering(&self, repo: &str) -> Vec<String> {
        let quotas = self.meta.quotas();
        quotas.covering(repo).into_iter().map(|i| quotas.rules()[i].name.clone()).collect()
    }

    /// One repository's counts and sizes.
    ///
    /// # Errors
    /// [`Error::NameUnknown`].
    pub async fn repository(&self, repo: &RepoName) -> Result<RepositorySummary> {
        let mut summary = self.meta.repository_summary(repo).await?.ok_or(Error::NameUnknown)?;
        summary.quotas = self.quotas_covering(repo.as_str());
        Ok(summary)
    }

    /// The tombstones of `repo`, newest first.
    ///
    /// # Errors
    /// [`Error::NameUnknown`].
    pub async fn tombstones(&self, repo: &RepoName) -> Result<Vec<Tombstone>> {
        if self.meta.repository_summary(repo).await?.is_none() {
            return Err(Error::NameUnknown);
        }
        let rows = self.meta.tombstones(repo).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (tags, referrers) = match row.delete_id {
                Some(d) => (
                    self.meta.tags_taken_by(repo, d, &row.digest).await?,
                    if row.deleted_why.as_deref() == Some("deleted") {
                        self.meta.referrers_deleted_with(repo, d).await?
                    } else {
                        Vec::new()
                    },
                ),
                None => (Vec::new(), Vec::new()),
            };
            out.push(Tombstone {
                purge_after: row.deleted_at.saturating_add(self.policy.restore_window_ms),
                restorable: row.unrestorable.is_none(),
                digest: row.digest,
                media_type: row.media_type,
                size: row.size,
                deleted_at: row.deleted_at,
                deleted_by: row.deleted_by,
                deleted_why: row.deleted_why.unwrap_or_else(|| "deleted".into()),
                tags,
                referrers,
                subject: row.subject_digest,
                unrestorable_reason: row.unrestorable,
            });
        }
        Ok(out)
    }

    /// Every tag move in `repo` (of `tag` only, if given), oldest first.
    ///
    /// # Errors
    /// [`Error::NameUnknown`].
    pub async fn history(&self, repo: &RepoName, tag: Option<&Tag>) -> Result<Vec<TagMove>> {
        if self.meta.repository_summary(repo).await?.is_none() {
            return Err(Error::NameUnknown);
        }
        Ok(self.meta.history(repo, tag).await?)
    }

    /// What deleting `target` would take and free, and whether it would be refused — without
    /// changing anything.
    ///
    /// # Errors
    /// [`Error::ManifestUnknown`], [`Error::TagUnknown`], [`Error::NameUnknown`].
    pub async fn delete_preview(&self, target: &DeleteTarget) -> Result<Preview> {
        let mut preview = self.delete_preview_ignoring_immutability(target).await?;
        // The tags the delete would remove, checked against the immutability rules as the
        // delete itself checks them (a lift an administrator granted is not counted here).
        if preview.refused.is_none() {
            let repo = target.repository().as_str();
            preview.refused = preview.tags.iter().find_map(|tag| {
                self.meta
                    .immutable()
                    .rule_for(repo, tag)
                    .map(|rule| format!("tag {tag} in repository {repo} is immutable (rule `{rule}`)"))
            });
        }
        Ok(preview)
    }

    async fn delete_preview_ignoring_immutability(&self, target: &DeleteTarget) -> Result<Preview> {
        match target {
            DeleteTarget::Manifest(repo, digest) => self
                .meta
                .preview_manifest_delete(repo, digest, self.clock.now_ms())
                .await?
                .ok_or(Error::ManifestUnknown),
            DeleteTarget::Tag(repo, tag) => self
                .meta
                .preview_tag_delete(repo, tag)
                .await?
                .ok_or_else(|| Error::TagUnknown(format!("tag {tag} not in repository {repo}"))),
            DeleteTarget::Repository(repo) => self
                .meta
                .preview_repository_delete(repo, self.clock.now_ms())
                .await?
                .ok_or(Error::NameUnknown),
        }
    }

    /// Repositories where blob `digest` is linked or referenced (whom a purge affects).
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn repositories_holding(&self, digest: &Digest) -> Result<Vec<String>> {
        Ok(self.meta.repositories_holding(digest).await?)
    }

    /// Restores what `target` names: a tombstone with its tags (`REPO@DIGEST`), a deleted tag
    /// (`REPO:TAG`) or a deleted repository (`REPO`). Returns what came back. A restore that
    /// would take a quota's scope past a limit is refused ([`Error::Conflict`]) unless
    /// `over_quota`.
    ///
    /// # Errors
    /// As the restore operations.
    pub async fn restore(
        &self,
        target: &DeleteTarget,
        take_tags: bool,
        over_quota: bool,
        actor: Option<&str>,
    ) -> Result<Vec<crate::meta::AffectedManifest>> {
        crate::meta::quotas::over_limit(over_quota, self.restore_target(target, take_tags, actor)).await
    }

    async fn restore_target(
        &self,
        target: &DeleteTarget,
        take_tags: bool,
        actor: Option<&str>,
    ) -> Result<Vec<crate::meta::AffectedManifest>> {
        match target {
            DeleteTarget::Manifest(repo, digest) => {
                self.restore_manifest(repo, digest, take_tags, actor).await
            }
            DeleteTarget::Tag(repo, tag) => {
                let digest = self.restore_tag(repo, tag, take_tags, actor).await?;
                Ok(vec![crate::meta::AffectedManifest {
                    repository: repo.to_string(),
                    digest,
                    tags: vec![tag.to_string()],
                }])
            }
            DeleteTarget::Repository(repo) => self.restore_repository(repo, take_tags, actor).await,
        }
    }
}
