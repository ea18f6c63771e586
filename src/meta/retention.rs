//! What retention reads (repositories, their tags with push and pull times, untagged manifests)
//! and writes (conditional untags in batches, the record of each run).

use std::collections::HashMap;

use super::deletes::DeleteError;
use super::gc::Review;
use super::reports::Taken;
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
    /// The run's id: what `berth retention undo` takes.
    pub id: i64,
    /// The replica that ran it.
    pub replica: String,
    /// `schedule`, `cli` or `admin-api`.
    pub started_by: String,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// When it finished (Unix ms); 0 while it runs, or if it stopped before its end.
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

    /// Removes `untags` as part of retention run `run_id` (at most a few hundred: the statements bind a handful of values per tag)
    /// from repository `repo` in one transaction, each only if the tag still points where it was
    /// evaluated, was not pushed again since, and is not immutable — so a push racing retention
    /// wins. Each removal is a delete of its own (restorable, in the history with its actor),
    /// written as `MetaStore::untag` writes one, but set-based: a few statements for the batch.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn untag_many(
        &self,
        repo: &RepoName,
        untags: &[Untag],
        run_id: i64,
        now: i64,
    ) -> Result<Vec<UntagOutcome>> {
        let share = self.share_lock();
        let untagged_review_at = now.saturating_add(self.windows().untagged_grace_ms);
        let immutable = self.immutable.clone();
        // Locked in name order, so two batches (or a batch and a multi-tag push) cannot deadlock.
        let current_sql = format!(
            "SELECT t.name, m.digest, t.updated_at, t.manifest_id FROM tags t JOIN manifests m ON m.id = t.manifest_id \
             WHERE t.repository_id = $1 AND t.name IN ({}) ORDER BY t.name{}",
            numbered(2, untags.len()),
            self.update_lock_of("t")
        );
        transaction!(self, Error, |tx| {
            let repo_id = match Self::live_repository(tx, repo, share).await {
                Ok(id) => id,
                Err(DeleteError::Refused(r)) => {
                    return Ok(vec![UntagOutcome::Skipped(r.to_string()); untags.len()]);
                }
                Err(DeleteError::Meta(e)) => return Err(e),
            };
            if untags.is_empty() {
                return Ok(Vec::new());
            }
            let mut query = sqlx::query_as::<_, (String, String, i64, i64)>(&current_sql).bind(repo_id);
            for u in untags {
                query = query.bind(u.tag.as_str());
            }
            let current: HashMap<String, (String, i64, i64)> =
                query.fetch_all(&mut *tx).await?.into_iter().map(|(n, d, at, m)| (n, (d, at, m))).collect();
            // Under the tags' locks: a report share-locks the tags of what it pins.
            let pinned = Self::pinned_in(tx, repo.as_str(), repo_id, now).await?;
            let mut outcomes = Vec::with_capacity(untags.len());
            let mut removals: Vec<(&Untag, i64)> = Vec::new();
            for u in untags {
                let outcome = match current.get(u.tag.as_str()) {
                    None => UntagOutcome::Skipped("gone since it was evaluated".into()),
                    Some((digest, _, _)) if digest != u.digest.as_str() => {
                        UntagOutcome::Skipped(format!("moved since: now at {digest}"))
                    }
                    Some((_, pushed_at, _)) if *pushed_at != u.pushed_at => {
                        UntagOutcome::Skipped("pushed again since".into())
                    }
                    Some(_) if let Some(rule) = immutable.rule_for(repo.as_str(), u.tag.as_str()) => {
                        UntagOutcome::Skipped(format!("immutable (rule `{rule}`)"))
                    }
                    Some((digest, _, _)) if let Some(pin) = pinned.get(digest) => {
                        UntagOutcome::Skipped(format!("kept: {pin}"))
                    }
                    Some((_, _, manifest_id)) => {
                        removals.push((u, *manifest_id));
                        UntagOutcome::Removed
                    }
                };
                outcomes.push(outcome);
            }
            if removals.is_empty() {
                return Ok(outcomes);
            }
            // One delete per tag, so each restores alone.
            let sql = format!(
                "INSERT INTO deletes (repository_id, kind, target, actor, reason, at, run_id) VALUES {} \
                 RETURNING id, target",
                rows(removals.len(), 7)
            );
            let mut query = sqlx::query_as::<_, (i64, String)>(&sql);
            for (u, _) in &removals {
                query = query
                    .bind(repo_id)
                    .bind("tag")
                    .bind(u.tag.as_str())
                    .bind(&u.actor)
                    .bind(None::<String>)
                    .bind(now)
                    .bind(run_id);
            }
            let delete_ids: HashMap<String, i64> =
                query.fetch_all(&mut *tx).await?.into_iter().map(|(id, t)| (t, id)).collect();
            let sql = format!(
                "INSERT INTO tag_history (repository_id, tag, old_digest, new_digest, actor, at, kind, delete_id) VALUES {}",
                rows(removals.len(), 8)
            );
            let mut query = sqlx::query(&sql);
            for (u, _) in &removals {
                query = query
                    .bind(repo_id)
                    .bind(u.tag.as_str())
                    .bind(u.digest.as_str())
                    .bind(None::<String>)
                    .bind(&u.actor)
                    .bind(now)
                    .bind("delete")
                    .bind(delete_ids.get(u.tag.as_str()).copied());
            }
            query.execute(&mut *tx).await?;
            for (u, _) in &removals {
                let mut event = super::events::NewEvent::new(
                    crate::events::TAG_DELETED,
                    repo.as_str(),
                    Some(&u.actor),
                    now,
                )
                .tag(u.tag.as_str())
                .detail("retentionRun", run_id);
                if let Some(id) = delete_ids.get(u.tag.as_str()) {
                    event = event.detail("deleteId", *id);
                }
                event.old_digest = Some(u.digest.to_string());
                super::events::record(event);
            }
            let sql = format!(
                "DELETE FROM tags WHERE repository_id = $1 AND name IN ({})",
                numbered(2, removals.len())
            );
            let mut query = sqlx::query(&sql).bind(repo_id);
            for (u, _) in &removals {
                query = query.bind(u.tag.as_str());
            }
            query.execute(&mut *tx).await?;
            // The manifests left behind may be garbage once their grace has passed (the same
            // upsert as `MetaStore::enqueue`, which keeps the earlier of two times).
            let mut manifests: Vec<i64> = removals.iter().map(|(_, m)| *m).collect();
            manifests.sort_unstable();
            manifests.dedup();
            let sql = format!(
                "INSERT INTO gc_reviews (kind, item_id, review_after) VALUES {} \
                 ON CONFLICT (kind, item_id) DO UPDATE SET review_after = CASE \
                 WHEN excluded.review_after < gc_reviews.review_after THEN excluded.review_after \
                 ELSE gc_reviews.review_after END",
                rows(manifests.len(), 3)
            );
            let mut query = sqlx::query(&sql);
            for m in &manifests {
                query = query.bind(Review::Manifest(*m).kind()).bind(*m).bind(untagged_review_at);
            }
            query.execute(&mut *tx).await?;
            Ok(outcomes)
        })
    }

    /// What removing `tags` and deleting the untagged `manifests` of repository `repo_id` would
    /// free once the collector has run: the manifests left with no tag and no live index above
    /// them (and their referrers, and the children only they list), and the blobs nothing
    /// outside them holds. Reads the repository's tags, index edges and live manifests once and
    /// works the rest out in memory.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn retention_frees(
        &self,
        repo_id: i64,
        tags: &[String],
        manifests: &[String],
        pinned: &std::collections::HashSet<&str>,
    ) -> Result<i64> {
        use std::collections::{HashMap, HashSet};
        let tag_rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, manifest_id FROM tags WHERE repository_id = $1")
                .bind(repo_id)
                .fetch_all(&self.read)
                .await?;
        let live: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT id, digest, subject_digest FROM manifests WHERE repository_id = $1 AND deleted_at IS NULL",
        )
        .bind(repo_id)
        .fetch_all(&self.read)
        .await?;
        // (child, parent) for every live parent in the repository.
        let edges: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT c.child_id, c.parent_id FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
             WHERE p.repository_id = $1 AND p.deleted_at IS NULL",
        )
        .bind(repo_id)
        .fetch_all(&self.read)
        .await?;
        let removed: HashSet<&str> = tags.iter().map(String::as_str).collect();
        let mut kept_tags: HashMap<i64, usize> = HashMap::new();
        let mut candidates: HashSet<i64> = HashSet::new();
        for (name, manifest) in &tag_rows {
            if removed.contains(name.as_str()) {
                candidates.insert(*manifest);
            } else {
                *kept_tags.entry(*manifest).or_default() += 1;
            }
        }
        let by_digest: HashMap<&str, i64> = live.iter().map(|(id, d, _)| (d.as_str(), *id)).collect();
        // A manifest an in-use report pins stays as if tagged.
        for d in pinned {
            if let Some(id) = by_digest.get(d) {
                *kept_tags.entry(*id).or_default() += 1;
            }
        }
        candidates.extend(manifests.iter().filter_map(|d| by_digest.get(d.as_str()).copied()));
        let mut parents: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut children: HashMap<i64, Vec<i64>> = HashMap::new();
        for (child, parent) in &edges {
            parents.entry(*child).or_default().push(*parent);
            children.entry(*parent).or_default().push(*child);
        }
        // Freed: a candidate with no tag left, every live index above it freed too; then the
        // untagged children only freed indexes list. Repeated until nothing changes.
        let mut freed: HashSet<i64> =
            candidates.iter().copied().filter(|m| !kept_tags.contains_key(m)).collect();
        // Bounded, though each round only settles what the previous one changed.
        for _ in 0..64 {
            let before = freed.clone();
            freed.retain(|m| parents.get(m).is_none_or(|ps| ps.iter().all(|p| before.contains(p))));
            let orphaned: Vec<i64> = freed
                .iter()
                .flat_map(|p| children.get(p).into_iter().flatten().copied())
                .filter(|c| {
                    !kept_tags.contains_key(c)
                        && parents.get(c).is_some_and(|ps| ps.iter().all(|p| freed.contains(p)))
                })
                .collect();
            freed.extend(orphaned);
            if freed == before {
                break;
            }
        }
        // Their referrers go with them, transitively.
        let mut group: Vec<(i64, String)> = Vec::new();
        let digest_of: HashMap<i64, &str> = live.iter().map(|(id, d, _)| (*id, d.as_str())).collect();
        let mut queue: Vec<i64> = freed.iter().copied().collect();
        let mut seen: HashSet<i64> = HashSet::new();
        while let Some(id) = queue.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Some(digest) = digest_of.get(&id) else { continue };
            group.push((id, digest.to_string()));
            queue.extend(live.iter().filter(|(_, _, s)| s.as_deref() == Some(*digest)).map(|(r, _, _)| *r));
        }
        if group.is_empty() {
            return Ok(0);
        }
        group.sort();
        let ids = group.iter().map(|(id, _)| *id).collect();
        Ok(self.preview(repo_id, &group, Taken::Ids(ids)).await?.bytes_freed)
    }

    /// Records the start of a real retention run; returns its id, which every delete the run
    /// makes carries.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn start_retention_run(&self, replica: &str, started_by: &str, started_at: i64) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO retention_runs (replica, started_by, started_at, finished_at, repositories, tags_considered, \
             tags_removed, manifests_removed, skipped, errors, by_rule) \
             VALUES ($1, $2, $3, 0, 0, 0, 0, 0, 0, 0, '{}') RETURNING id",
        )
        .bind(replica)
        .bind(started_by)
        .bind(started_at)
        .fetch_one(&self.write)
        .await?;
        Ok(id)
    }

    /// Records how run `run.id` ended and forgets all but the newest hundred runs (their deletes
    /// keep the run's id, so an undo still finds them).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn finish_retention_run(&self, run: &RunRecord) -> Result<()> {
        sqlx::query(
            "UPDATE retention_runs SET finished_at = $2, repositories = $3, tags_considered = $4, tags_removed = $5, \
             manifests_removed = $6, skipped = $7, errors = $8, by_rule = $9 WHERE id = $1",
        )
        .bind(run.id)
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
        self.keep_newest("retention_runs", RUNS_KEPT).await
    }

    /// When the newest finished run started by `started_by` started, if one is recorded (a run
    /// that stopped before its end does not count: the schedule runs again).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn last_retention_run_by(&self, started_by: &str) -> Result<Option<i64>> {
        let row: (Option<i64>,) = sqlx::query_as(
            "SELECT CAST(MAX(started_at) AS BIGINT) FROM retention_runs WHERE started_by = $1 AND finished_at > 0",
        )
        .bind(started_by)
        .fetch_one(&self.read)
        .await?;
        Ok(row.0)
    }

    /// The newest `limit` real retention runs, newest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn retention_runs(&self, limit: i64) -> Result<Vec<RunRecord>> {
        Ok(sqlx::query_as(
            "SELECT id, replica, started_by, started_at, finished_at, repositories, tags_considered, tags_removed, \
             manifests_removed, skipped, errors, by_rule FROM retention_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }
}

/// `$first, $first+1, …` for `n` values.
fn numbered(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// `($1, …, $cols), ($cols+1, …), …` for `n` rows of `cols` values.
fn rows(n: usize, cols: usize) -> String {
    (0..n).map(|r| format!("({})", numbered(r * cols + 1, cols))).collect::<Vec<_>>().join(", ")
}
