//! What retention reads (repositories, their tags with push and pull times, untagged manifests)
//! and writes (conditional untags in batches, the record of each run).

use super::deletes::DeleteError;
use super::reports::Taken;
use super::tags::TagCondition;
use super::{Error, MetaStore, Result, transaction};
use crate::oci::{Digest, RepoName, Tag};
use crate::retention::TagState;

/// The newest retention runs kept.
const RUNS_KEPT: i64 = 100;

/// One untag retention asks for: `tag`, only if it still points at `digest`.
#[derive(Debug, Clone)]
pub struct Untag {
    /// The tag.
    pub tag: Tag,
    /// The manifest the rule evaluated it at.
    pub digest: Digest,
    /// The push time the rule evaluated (a push of the same manifest again refreshes it).
    pub pushed_at: i64,
    /// Who is credited (`retention:<rule>`).
    pub actor: String,
}

/// What became of one [`Untag`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UntagOutcome {
    /// Removed (restorable like any delete).
    Removed,
    /// Left alone: the tag moved, disappeared or became immutable since it was evaluated; says
    /// which.
    Skipped(String),
}

/// A manifest without tags, as retention sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UntaggedManifest {
    /// Its digest.
    pub digest: String,
    /// Its last push or pull, whichever is later.
    pub last_used: i64,
}

/// One real retention run, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct RunRecord {
    /// The replica that ran it.
    pub replica: String,
    /// `schedule`, `cli` or `admin-api`.
    pub started_by: String,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// When it finished (Unix ms).
    pub finished_at: i64,
    /// Repositories the rules applied to.
    pub repositories: i64,
    /// Tags evaluated.
    pub tags_considered: i64,
    /// Tags removed.
    pub tags_removed: i64,
    /// Untagged manifests deleted.
    pub manifests_removed: i64,
    /// Removals left alone because a push (or another change) came first.
    pub skipped: i64,
    /// Repositories or items that failed.
    pub errors: i64,
    /// Removals per rule, as a JSON object.
    pub by_rule: String,
}

impl MetaStore {
    /// Ids and names of the live repositories, in name order.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn live_repositories(&self) -> Result<Vec<(i64, String)>> {
        Ok(sqlx::query_as("SELECT id, name FROM repositories WHERE deleted_at IS NULL ORDER BY name")
            .fetch_all(&self.read)
            .await?)
    }

    /// Every tag of repository `repo_id` with the time of its last push and of its manifest's
    /// last pull.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn tag_states(&self, repo_id: i64) -> Result<Vec<TagState>> {
        let rows: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT t.name, m.digest, t.updated_at, m.pulled_at FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND m.deleted_at IS NULL",
        )
        .bind(repo_id)
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, digest, pushed_at, pulled_at)| TagState { name, digest, pushed_at, pulled_at })
            .collect())
    }

    /// The live manifests of repository `repo_id` without tags, last pushed or pulled before
    /// `before`, that no live index lists and that are not referrers of a live manifest.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn untagged_manifests(&self, repo_id: i64, before: i64) -> Result<Vec<UntaggedManifest>> {
        Ok(sqlx::query_as(
            "SELECT m.digest, CASE WHEN m.pulled_at > m.pushed_at THEN m.pulled_at ELSE m.pushed_at END AS last_used \
             FROM manifests m WHERE m.repository_id = $1 AND m.deleted_at IS NULL \
             AND m.pushed_at < $2 AND (m.pulled_at IS NULL OR m.pulled_at < $2) \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id) \
             AND NOT EXISTS (SELECT 1 FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                             WHERE c.child_id = m.id AND p.deleted_at IS NULL) \
             AND NOT (m.subject_digest IS NOT NULL AND EXISTS (SELECT 1 FROM manifests s \
                      WHERE s.repository_id = m.repository_id AND s.digest = m.subject_digest AND s.deleted_at IS NULL)) \
             ORDER BY m.digest",
        )
        .bind(repo_id)
        .bind(before)
        .fetch_all(&self.read)
        .await?)
    }

    /// Removes `untags` from repository `repo` in one transaction, each only if the tag still
    /// points where it was evaluated, was not pushed again since, and is not immutable — so a
    /// push racing retention wins.
    /// Each removal is a delete of its own (restorable, in the history with its actor).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn untag_many(&self, repo: &RepoName, untags: &[Untag], now: i64) -> Result<Vec<UntagOutcome>> {
        let share = self.share_lock();
        let ctx = self.untag_ctx(now);
        let current_sql = format!(
            "SELECT m.digest, t.updated_at FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name = $2{}",
            self.update_lock_of("t")
        );
        transaction!(self, Error, |tx| {
            let mut outcomes = Vec::with_capacity(untags.len());
            let repo_id = match Self::live_repository(tx, repo, share).await {
                Ok(id) => id,
                Err(DeleteError::Refused(r)) => {
                    outcomes.resize(untags.len(), UntagOutcome::Skipped(r.to_string()));
                    return Ok(outcomes);
                }
                Err(DeleteError::Meta(e)) => return Err(e),
            };
            for u in untags {
                let current: Option<(String, i64)> = sqlx::query_as(&current_sql)
                    .bind(repo_id)
                    .bind(u.tag.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let skipped = match current {
                    None => Some("gone since it was evaluated".to_string()),
                    Some((digest, _)) if digest != u.digest.as_str() => {
                        Some(format!("moved since: now at {digest}"))
                    }
                    Some((_, pushed_at)) if pushed_at != u.pushed_at => {
                        Some("pushed again since".to_string())
                    }
                    Some(_) => None,
                };
                if let Some(why) = skipped {
                    outcomes.push(UntagOutcome::Skipped(why));
                    continue;
                }
                // The tag row is locked now: only immutability can still refuse.
                let condition = TagCondition::IfPointsAt(&u.digest);
                match Self::untag(tx, &ctx, repo_id, repo, &u.tag, condition, Some(&u.actor), now).await {
                    Ok(_) => outcomes.push(UntagOutcome::Removed),
                    Err(DeleteError::Refused(r)) => outcomes.push(UntagOutcome::Skipped(r.to_string())),
                    Err(DeleteError::Meta(e)) => return Err(e),
                }
            }
            Ok(outcomes)
        })
    }

    /// What removing `tags` and deleting the untagged `manifests` of repository `repo_id` would
    /// free once the collector has run: the manifests left with no tag and no live index above
    /// them (and their referrers), and the blobs nothing outside them holds.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn retention_frees(&self, repo_id: i64, tags: &[String], manifests: &[String]) -> Result<i64> {
        let mut freed: Vec<(i64, String)> = Vec::new();
        for tag in tags {
            let row: Option<(i64, String)> = sqlx::query_as(
                "SELECT m.id, m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id \
                 WHERE t.repository_id = $1 AND t.name = $2",
            )
            .bind(repo_id)
            .bind(tag)
            .fetch_optional(&self.read)
            .await?;
            if let Some(m) = row
                && !freed.contains(&m)
            {
                freed.push(m);
            }
        }
        for digest in manifests {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2 AND deleted_at IS NULL",
            )
            .bind(repo_id)
            .bind(digest)
            .fetch_optional(&self.read)
            .await?;
            if let Some((id,)) = row {
                freed.push((id, digest.clone()));
            }
        }
        // Keep only the manifests nothing else will hold: a tag not removed, or a live index
        // that stays. Repeated until nothing changes, since dropping one may keep its children.
        loop {
            let before = freed.len();
            let ids: Vec<i64> = freed.iter().map(|(id, _)| *id).collect();
            let mut kept = Vec::with_capacity(freed.len());
            for (id, digest) in freed {
                let tags_of: Vec<(String,)> = sqlx::query_as("SELECT name FROM tags WHERE manifest_id = $1")
                    .bind(id)
                    .fetch_all(&self.read)
                    .await?;
                let parents: Vec<(i64,)> = sqlx::query_as(
                    "SELECT p.id FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                     WHERE c.child_id = $1 AND p.deleted_at IS NULL",
                )
                .bind(id)
                .fetch_all(&self.read)
                .await?;
                let tag_stays = tags_of.iter().any(|(t,)| !tags.contains(t));
                let index_stays = parents.iter().any(|(p,)| !ids.contains(p));
                if !(tag_stays || index_stays) {
                    kept.push((id, digest));
                }
            }
            freed = kept;
            if freed.len() == before {
                break;
            }
        }
        // The children of a freed index go with it when nothing else holds them.
        let mut i = 0;
        while i < freed.len() {
            let children: Vec<(i64, String)> = sqlx::query_as(
                "SELECT c.id, c.digest FROM manifest_children mc JOIN manifests c ON c.id = mc.child_id \
                 WHERE mc.parent_id = $1 AND c.deleted_at IS NULL \
                 AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = c.id)",
            )
            .bind(freed[i].0)
            .fetch_all(&self.read)
            .await?;
            for child in children {
                let others: Vec<(i64,)> = sqlx::query_as(
                    "SELECT p.id FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                     WHERE c.child_id = $1 AND p.deleted_at IS NULL",
                )
                .bind(child.0)
                .fetch_all(&self.read)
                .await?;
                if others.iter().all(|(p,)| freed.iter().any(|(f, _)| f == p)) && !freed.contains(&child) {
                    freed.push(child);
                }
            }
            i += 1;
        }
        let mut group: Vec<(i64, String)> = Vec::new();
        for (id, digest) in &freed {
            for member in self.with_referrers(repo_id, *id, digest).await? {
                if !group.contains(&member) {
                    group.push(member);
                }
            }
        }
        if group.is_empty() {
            return Ok(0);
        }
        let ids = group.iter().map(|(id, _)| *id).collect();
        Ok(self.preview(repo_id, &group, Taken::Ids(ids)).await?.bytes_freed)
    }

    /// Records a real retention run and forgets all but the newest hundred.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn record_retention_run(&self, run: &RunRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO retention_runs (replica, started_by, started_at, finished_at, repositories, tags_considered, \
             tags_removed, manifests_removed, skipped, errors, by_rule) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&run.replica)
        .bind(&run.started_by)
        .bind(run.started_at)
        .bind(run.finished_at)
        .bind(run.repositories)
        .bind(run.tags_considered)
        .bind(run.tags_removed)
        .bind(run.manifests_removed)
        .bind(run.skipped)
        .bind(run.errors)
        .bind(&run.by_rule)
        .execute(&self.write)
        .await?;
        sqlx::query(
            "DELETE FROM retention_runs WHERE id < (SELECT MIN(id) FROM \
             (SELECT id FROM retention_runs ORDER BY id DESC LIMIT $1) AS newest)",
        )
        .bind(RUNS_KEPT)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// The newest `limit` real retention runs, newest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn retention_runs(&self, limit: i64) -> Result<Vec<RunRecord>> {
        Ok(sqlx::query_as(
            "SELECT replica, started_by, started_at, finished_at, repositories, tags_considered, tags_removed, \
             manifests_removed, skipped, errors, by_rule FROM retention_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }
}
