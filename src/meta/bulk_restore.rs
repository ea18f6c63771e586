//! Bulk restores: undoing many deletes at once — those of a time window, of an actor, of a
//! retention run — each exactly as a single restore would undo it, through the same revive
//! (lock, then check; see `restores.rs`).
//!
//! A bulk restore works delete by delete (a row of `deletes`), newest first, in batches of one
//! repository: each batch is one transaction that locks the repository row first (as a single
//! restore does), then, on PostgreSQL, every link and manifest row the batch may bring back, in
//! the lock order, and then restores each delete inside a savepoint — a delete that cannot be
//! restored (a tag pushed again since, a tombstone collected) rolls back to its savepoint and is
//! reported as a conflict, the others go on. A dry run is the same transaction rolled back.

use std::collections::{HashMap, HashSet};

use sqlx::AnyConnection;

use super::deletes::{AffectedManifest, DeleteError, DeleteResult, Refusal, refuse};
use super::restores::{Revive, SinceDelete, TagsBack};
use super::tags::TagCondition;
use super::{Dialect, Error, MetaStore, Result, TxError, transaction};
use crate::oci::{RepoName, Tag};

/// The savepoint each delete of a batch is restored in.
const SAVEPOINT: &str = "bulk_item";

/// Which deletes a bulk restore undoes: all of these that are given must hold. Purges are never
/// selected (they cannot be undone), nor deletes an earlier bulk restore already undid.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeleteSelection {
    /// Deletes made at or after this time (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Deletes made before this time (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Deletes made by this actor (a user, `retention:<rule>`, `local:<user>`, `anonymous`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Deletes made by this retention run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// Only repositories whose names start with this (the caller matches patterns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_prefix: Option<String>,
    /// The prefix is a whole name.
    #[serde(skip)]
    pub repository_exact: bool,
}

/// One recorded delete, as a bulk restore selects it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct DeleteRecord {
    /// The delete's id.
    pub id: i64,
    /// `manifest`, `tag` or `repository`.
    pub kind: String,
    /// The repository.
    pub repository: String,
    /// The digest, tag or repository name the delete named.
    pub target: String,
    /// Who deleted.
    pub actor: Option<String>,
    /// When (Unix ms).
    pub at: i64,
    /// The retention run that deleted, if one did.
    pub run_id: Option<i64>,
    /// The bulk restore that undid it, if one did.
    pub restored_by: Option<i64>,
}

/// What restoring one delete did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkOutcome {
    /// Brought back: these manifests with these tags.
    Restored(Vec<AffectedManifest>),
    /// Nothing to do: what the delete took is back already; says why.
    Unchanged(String),
    /// Left alone: it cannot come back as the delete left it; says why.
    Conflict(String),
}

/// One bulk restore, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct BulkRestoreRecord {
    /// Its id (the history rows it wrote carry it).
    pub id: i64,
    /// Who ran it.
    pub actor: Option<String>,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// When it finished (Unix ms); none if it stopped before its end.
    pub finished_at: Option<i64>,
    /// The selection, as JSON.
    pub selection: String,
    /// 1 when tags pushed again since were moved back.
    pub take_tags: i64,
    /// Deletes undone.
    pub restored: i64,
    /// Deletes whose items were back already.
    pub unchanged: i64,
    /// Deletes left alone.
    pub conflicts: i64,
    /// The first conflicts with their reasons, as JSON.
    pub conflict_list: Option<String>,
}

/// A batch's transaction ended: failed, or (dry) rolled back on purpose with its outcomes.
enum BatchEnd {
    Failed(Error),
    RolledBack(Vec<BulkOutcome>),
}

impl From<Error> for BatchEnd {
    fn from(e: Error) -> Self {
        BatchEnd::Failed(e)
    }
}

impl From<sqlx::Error> for BatchEnd {
    fn from(e: sqlx::Error) -> Self {
        BatchEnd::Failed(Error::Database(e))
    }
}

impl TxError for BatchEnd {
    fn store_error(&self) -> Option<&Error> {
        match self {
            BatchEnd::Failed(e) => Some(e),
            BatchEnd::RolledBack(_) => None,
        }
    }
}

const RECORD_COLUMNS: &str = "id, actor, started_at, finished_at, selection, take_tags, restored, unchanged, \
                              conflicts, conflict_list";

impl MetaStore {
    /// The deletes `selection` names, not undone yet, newest first, at most `limit`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn deletes_matching(
        &self,
        selection: &DeleteSelection,
        limit: i64,
    ) -> Result<Vec<DeleteRecord>> {
        let mut sql = String::from(
            "SELECT d.id, d.kind, r.name AS repository, d.target, d.actor, d.at, d.run_id, d.restored_by \
             FROM deletes d JOIN repositories r ON r.id = d.repository_id \
             WHERE d.kind IN ('manifest', 'tag', 'repository') AND d.restored_by IS NULL",
        );
        // Only the conditions given, so each query can use the index on its own column.
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if selection.since.is_some() {
            sql.push_str(&format!(" AND d.at >= ${}", next()));
        }
        if selection.until.is_some() {
            sql.push_str(&format!(" AND d.at < ${}", next()));
        }
        match selection.actor.as_deref() {
            // What every face shows for a delete made without credentials.
            Some("anonymous") => sql.push_str(&format!(" AND (d.actor IS NULL OR d.actor = ${})", next())),
            Some(_) => sql.push_str(&format!(" AND d.actor = ${}", next())),
            None => {}
        }
        if selection.run.is_some() {
            sql.push_str(&format!(" AND d.run_id = ${}", next()));
        }
        match (&selection.repository_prefix, selection.repository_exact) {
            (Some(_), true) => sql.push_str(&format!(" AND r.name = ${}", next())),
            (Some(p), false) => {
                sql.push_str(&format!(" AND substr(r.name, 1, {}) = ${}", p.len(), next()));
            }
            (None, _) => {}
        }
        sql.push_str(&format!(" ORDER BY d.id DESC LIMIT ${}", next()));
        let mut query = sqlx::query_as::<_, DeleteRecord>(&sql);
        if let Some(since) = selection.since {
            query = query.bind(since);
        }
        if let Some(until) = selection.until {
            query = query.bind(until);
        }
        if let Some(actor) = &selection.actor {
            query = query.bind(actor.clone());
        }
        if let Some(run) = selection.run {
            query = query.bind(run);
        }
        if let Some(prefix) = &selection.repository_prefix {
            query = query.bind(prefix.clone());
        }
        Ok(query.bind(limit).fetch_all(&self.read).await?)
    }

    /// What restoring each of `deletes` may read or write: `t:TAG` for a tag, `m:DIGEST` for a
    /// manifest (the tombstones it made, the manifest it names, their children), `*` for
    /// everything (a repository delete). Deletes whose footprints share nothing cannot change
    /// what the other's restore finds, so they may be judged in separate transactions.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn delete_footprints(&self, deletes: &[DeleteRecord]) -> Result<HashMap<i64, HashSet<String>>> {
        let mut keys: HashMap<i64, HashSet<String>> = HashMap::new();
        for d in deletes {
            let own = keys.entry(d.id).or_default();
            match d.kind.as_str() {
                "repository" => {
                    own.insert("*".into());
                }
                "manifest" => {
                    own.insert(format!("m:{}", d.target));
                }
                _ => {
                    own.insert(format!("t:{}", d.target));
                }
            }
        }
        for chunk in deletes.chunks(500) {
            let ids = chunk.iter().map(|d| d.id.to_string()).collect::<Vec<_>>().join(",");
            let tags: Vec<(i64, String, Option<String>)> = sqlx::query_as(&format!(
                "SELECT delete_id, tag, old_digest FROM tag_history WHERE delete_id IN ({ids}) AND kind = 'delete'"
            ))
            .fetch_all(&self.read)
            .await?;
            for (d, tag, old) in tags {
                let own = keys.entry(d).or_default();
                own.insert(format!("t:{tag}"));
                own.extend(old.map(|o| format!("m:{o}")));
            }
            // The manifests each may bring back: the tombstones it made, the manifest it names
            // (a manifest delete's target, a tag delete's old digest) — then their children.
            let mut frontier: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT delete_id, id FROM manifests WHERE delete_id IN ({ids}) \
                 UNION SELECT d.id, m.id FROM deletes d JOIN manifests m \
                 ON m.repository_id = d.repository_id AND m.digest = d.target WHERE d.id IN ({ids}) AND d.kind = 'manifest' \
                 UNION SELECT h.delete_id, m.id FROM tag_history h JOIN manifests m \
                 ON m.repository_id = h.repository_id AND m.digest = h.old_digest WHERE h.delete_id IN ({ids}) \
                 AND h.kind = 'delete'"
            ))
            .fetch_all(&self.read)
            .await?;
            // A repository delete's footprint is everything already.
            let whole: HashSet<i64> = chunk.iter().filter(|d| d.kind == "repository").map(|d| d.id).collect();
            frontier.retain(|(d, _)| !whole.contains(d));
            let mut seen: HashSet<(i64, i64)> = HashSet::new();
            for _ in 0..=super::restores::MAX_DEPTH {
                frontier.retain(|pair| seen.insert(*pair));
                if frontier.is_empty() {
                    break;
                }
                let parents = frontier.iter().map(|(_, m)| m.to_string()).collect::<Vec<_>>().join(",");
                let rows: Vec<(i64, String, Option<i64>)> = sqlx::query_as(&format!(
                    "SELECT m.id, m.digest, mc.child_id FROM manifests m \
                     LEFT JOIN manifest_children mc ON mc.parent_id = m.id WHERE m.id IN ({parents})"
                ))
                .fetch_all(&self.read)
                .await?;
                let mut by_id: HashMap<i64, Vec<(&String, Option<i64>)>> = HashMap::new();
                for (id, digest, child) in &rows {
                    by_id.entry(*id).or_default().push((digest, *child));
                }
                let mut next = Vec::new();
                for (d, m) in &frontier {
                    for (digest, child) in by_id.get(m).into_iter().flatten() {
                        keys.entry(*d).or_default().insert(format!("m:{digest}"));
                        next.extend(child.map(|c| (*d, c)));
                    }
                }
                frontier = next;
            }
        }
        Ok(keys)
    }

    /// Restores `deletes` (all of repository `repo`, newest first) in one transaction, each as a
    /// single restore would but only as far as `selected` (the whole selection's delete ids)
    /// reaches, and says what became of each. The tag history rows written carry bulk restore
    /// `bulk` (none for a dry run) and the deletes undone are marked with it. `dry_run` rolls the
    /// transaction back: the outcomes are what a real run would have had at that moment.
    ///
    /// # Errors
    /// [`Error::Database`] (after the retries a deadlock gets).
    #[expect(clippy::too_many_arguments, reason = "the parts of one bulk restore batch")]
    pub async fn restore_deletes(
        &self,
        repo: &RepoName,
        deletes: &[DeleteRecord],
        selected: &std::sync::Arc<HashSet<i64>>,
        take_tags: bool,
        actor: Option<&str>,
        bulk: Option<i64>,
        dry_run: bool,
        now: i64,
    ) -> Result<Vec<BulkOutcome>> {
        if deletes.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.revive_ctx(now);
        c.tag.bulk_restore = bulk;
        c.selected = Some(selected.clone());
        let prelock = self.dialect == Dialect::Postgres;
        let outcome = transaction!(self, BatchEnd, |tx| {
            let refused =
                |why: String| Ok(deletes.iter().map(|_| BulkOutcome::Conflict(why.clone())).collect());
            let repo_id = match Self::lock_repository(tx, &c, repo).await {
                Ok(Some((id,))) => id,
                Ok(None) => return refused(format!("repository {repo} is no longer known")),
                Err(DeleteError::Refused(r)) => return refused(r.to_string()),
                Err(DeleteError::Meta(e)) => return Err(BatchEnd::Failed(e)),
            };
            if prelock {
                match Self::lock_batch(tx, &c, repo_id, deletes).await {
                    Ok(()) => {}
                    // Indexes nested too deep (a corrupt database): nothing of the batch comes back.
                    Err(DeleteError::Refused(r)) => return refused(r.to_string()),
                    Err(DeleteError::Meta(e)) => return Err(BatchEnd::Failed(e)),
                }
            }
            // Read after the repository's lock: a bulk restore of the same deletes that committed
            // meanwhile undid some.
            let ids = deletes.iter().map(|d| d.id.to_string()).collect::<Vec<_>>().join(",");
            let undone: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(&format!(
                "SELECT id, restored_by FROM deletes WHERE id IN ({ids}) AND restored_by IS NOT NULL"
            ))
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            let mut outcomes = Vec::with_capacity(deletes.len());
            for d in deletes {
                if let Some(by) = undone.get(&d.id) {
                    outcomes.push(BulkOutcome::Unchanged(format!("undone meanwhile by bulk restore {by}")));
                    continue;
                }
                sqlx::query(&format!("SAVEPOINT {SAVEPOINT}")).execute(&mut *tx).await?;
                let noted = super::journal_mark();
                let outcome = match Self::restore_delete(tx, &c, repo, repo_id, d, take_tags, actor, now)
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(DeleteError::Refused(r)) => {
                        sqlx::query(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")).execute(&mut *tx).await?;
                        // The events of what the savepoint undid go with it.
                        super::journal_truncate(noted);
                        BulkOutcome::Conflict(r.to_string())
                    }
                    Err(DeleteError::Meta(e)) => return Err(BatchEnd::Failed(e)),
                };
                sqlx::query(&format!("RELEASE SAVEPOINT {SAVEPOINT}")).execute(&mut *tx).await?;
                outcomes.push(outcome);
            }
            // Undone (by its own restore, or back already): never selected again.
            let done = deletes
                .iter()
                .zip(&outcomes)
                .filter(|(d, o)| !matches!(o, BulkOutcome::Conflict(_)) && !undone.contains_key(&d.id))
                .map(|(d, _)| d.id.to_string())
                .collect::<Vec<_>>();
            if let (false, Some(bulk)) = (done.is_empty(), bulk) {
                sqlx::query(&format!("UPDATE deletes SET restored_by = $1 WHERE id IN ({})", done.join(",")))
                    .bind(bulk)
                    .execute(&mut *tx)
                    .await?;
            }
            if dry_run {
                return Err(BatchEnd::RolledBack(outcomes));
            }
            Ok(outcomes)
        });
        match outcome {
            Ok(outcomes) | Err(BatchEnd::RolledBack(outcomes)) => Ok(outcomes),
            Err(BatchEnd::Failed(e)) => Err(e),
        }
    }

    /// Locks, in the lock order (docs/design.md), what restoring `deletes` may bring back: the
    /// links the manifests rely on (and those a repository delete hid) in blob order, then the
    /// manifest rows in id order — so a batch never holds a manifest while it waits for a link,
    /// or one manifest while it waits for another that a reporter or a purge holds. The restores
    /// that follow lock the same rows again (already theirs) and check under the locks.
    async fn lock_batch(
        tx: &mut AnyConnection,
        c: &Revive,
        repo_id: i64,
        deletes: &[DeleteRecord],
    ) -> DeleteResult<()> {
        let ids = |kinds: &[&str]| {
            deletes
                .iter()
                .filter(|d| kinds.contains(&d.kind.as_str()))
                .map(|d| d.id.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (took, tags, hid) = (ids(&["manifest", "repository"]), ids(&["tag"]), ids(&["repository"]));
        let mut roots: Vec<(i64,)> = Vec::new();
        if !took.is_empty() {
            roots.extend(
                sqlx::query_as::<_, (i64,)>(&format!(
                    "SELECT id FROM manifests WHERE repository_id = $1 AND delete_id IN ({took})"
                ))
                .bind(repo_id)
                .fetch_all(&mut *tx)
                .await?,
            );
        }
        if !tags.is_empty() {
            roots.extend(
                sqlx::query_as::<_, (i64,)>(&format!(
                    "SELECT m.id FROM tag_history h JOIN manifests m \
                     ON m.repository_id = h.repository_id AND m.digest = h.old_digest \
                     WHERE h.delete_id IN ({tags}) AND h.kind = 'delete'"
                ))
                .fetch_all(&mut *tx)
                .await?,
            );
        }
        // A manifest delete's target, wherever its row stands now (deleted again, live).
        for d in deletes.iter().filter(|d| d.kind == "manifest") {
            roots.extend(
                sqlx::query_as::<_, (i64,)>(
                    "SELECT id FROM manifests WHERE repository_id = $1 AND digest = $2",
                )
                .bind(repo_id)
                .bind(&d.target)
                .fetch_optional(&mut *tx)
                .await?,
            );
        }
        // With their children, level by level (a set query a level, not one a manifest).
        let mut all: HashSet<i64> = roots.iter().map(|(id,)| *id).collect();
        let mut level: Vec<i64> = all.iter().copied().collect();
        for _ in 0..=super::restores::MAX_DEPTH {
            if level.is_empty() {
                break;
            }
            let parents = level.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let children: Vec<(i64,)> = sqlx::query_as(&format!(
                "SELECT child_id FROM manifest_children WHERE parent_id IN ({parents})"
            ))
            .fetch_all(&mut *tx)
            .await?;
            level = children.into_iter().map(|(c,)| c).filter(|c| all.insert(*c)).collect();
        }
        let mut tree: Vec<i64> = all.into_iter().collect();
        tree.sort_unstable();
        let manifests = tree.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let mut links = Vec::new();
        if !manifests.is_empty() {
            links.push(format!(
                "rb.blob_id IN (SELECT blob_id FROM manifest_blobs WHERE manifest_id IN ({manifests}))"
            ));
        }
        if !hid.is_empty() {
            links.push(format!("rb.hidden_by_delete IN ({hid})"));
        }
        if !links.is_empty() {
            let links = links.join(" OR ");
            let hidden: Option<(i64,)> = sqlx::query_as(&format!(
                "SELECT rb.blob_id FROM repository_blobs rb WHERE rb.repository_id = $1 \
                 AND rb.hidden_by_delete IS NOT NULL AND ({links}) LIMIT 1"
            ))
            .bind(repo_id)
            .fetch_optional(&mut *tx)
            .await?;
            let lock = if hidden.is_some() { c.hidden_link_lock } else { c.link_lock };
            let _: Vec<(i64,)> = sqlx::query_as(&format!(
                "SELECT rb.blob_id FROM repository_blobs rb WHERE rb.repository_id = $1 AND ({links}) \
                 ORDER BY rb.blob_id{lock}"
            ))
            .bind(repo_id)
            .fetch_all(&mut *tx)
            .await?;
        }
        for id in &tree {
            let _: Option<(i64,)> =
                sqlx::query_as(&c.lock_manifest).bind(id).fetch_optional(&mut *tx).await?;
        }
        // Then the tags the batch may write, in name order (as retention's batches and in-use
        // reports take several).
        let all = deletes.iter().map(|d| d.id.to_string()).collect::<Vec<_>>().join(",");
        let _: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT t.name FROM tags t WHERE t.repository_id = $1 AND t.name IN \
             (SELECT tag FROM tag_history WHERE delete_id IN ({all})) ORDER BY t.name{}",
            c.tag.lock
        ))
        .bind(repo_id)
        .fetch_all(&mut *tx)
        .await?;
        Ok(())
    }

    /// Restores delete `d` of the locked repository `repo_id` as the single restore of its kind
    /// would — but only what that delete took: a tombstone deleted again since, a tag changed
    /// since (unless `take_tags`), a repository deleted again since are conflicts.
    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    async fn restore_delete(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        d: &DeleteRecord,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<BulkOutcome> {
        match d.kind.as_str() {
            "manifest" => Self::restore_manifest_delete(tx, c, repo, repo_id, d, take_tags, actor, now).await,
            "tag" => Self::restore_tag_delete(tx, c, repo, repo_id, d, take_tags, actor, now).await,
            "repository" => {
                // The delete in force now (a push may have made the name live since, and another
                // delete may have taken it again).
                let (deleted_at, in_force): (Option<i64>, Option<i64>) =
                    sqlx::query_as("SELECT deleted_at, delete_id FROM repositories WHERE id = $1")
                        .bind(repo_id)
                        .fetch_one(&mut *tx)
                        .await?;
                if deleted_at.is_some() && in_force != Some(d.id) {
                    return refuse(Refusal::Conflict(format!(
                        "repository {repo} was deleted again since (delete {})",
                        in_force.unwrap_or_default()
                    )));
                }
                let (left,): (i64,) = sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM manifests WHERE delete_id = $1 AND deleted_at IS NOT NULL) \
                     + (SELECT COUNT(*) FROM repository_blobs WHERE repository_id = $2 AND hidden_by_delete = $1)",
                )
                .bind(d.id)
                .bind(repo_id)
                .fetch_one(&mut *tx)
                .await?;
                if deleted_at.is_none() && left == 0 {
                    return Ok(BulkOutcome::Unchanged(format!(
                        "repository {repo} is live and everything its delete took is back"
                    )));
                }
                let restored =
                    Self::restore_repository_delete(tx, c, repo, repo_id, d.id, take_tags, actor, now)
                        .await?;
                Ok(BulkOutcome::Restored(restored))
            }
            other => refuse(Refusal::Conflict(format!("a delete of kind {other} cannot be restored"))),
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    async fn restore_manifest_delete(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        d: &DeleteRecord,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<BulkOutcome> {
        let digest = &d.target;
        Self::refuse_in_deleted_repository(tx, repo, repo_id, &format!("manifest {digest}")).await?;
        let Some(m) = Self::lock_for_revive(tx, c, repo_id, digest).await? else {
            return refuse(Refusal::Conflict(format!("manifest {digest} of {repo} was collected")));
        };
        // Read after the lock.
        let (deleted_at, delete_id): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT deleted_at, delete_id FROM manifests WHERE id = $1")
                .bind(m.id)
                .fetch_one(&mut *tx)
                .await?;
        if deleted_at.is_none() {
            // Pushed again since: what else the delete took (its tags on it, the referrers
            // deleted with it) still comes back.
            let mut restored = Vec::new();
            let tags = Self::restore_tags(tx, c, repo, repo_id, &m, d.id, take_tags, actor, now).await?;
            if !tags.is_empty() {
                restored.push(AffectedManifest {
                    repository: repo.to_string(),
                    digest: digest.clone(),
                    tags,
                });
            }
            let referrers: Vec<(String,)> = sqlx::query_as(
                "SELECT digest FROM manifests WHERE delete_id = $1 AND deleted_at IS NOT NULL AND repository_id = $2 \
                 ORDER BY digest",
            )
            .bind(d.id)
            .bind(repo_id)
            .fetch_all(&mut *tx)
            .await?;
            for (referrer,) in referrers {
                if let Some(r) = Self::lock_for_revive(tx, c, repo_id, &referrer).await? {
                    let tags = TagsBack::Deleted { take_tags };
                    Self::revive(tx, c, repo, repo_id, &r, tags, actor, now, 1, &mut restored).await?;
                }
            }
            if restored.is_empty() {
                return Ok(BulkOutcome::Unchanged(format!("manifest {digest} of {repo} is live")));
            }
            return Ok(BulkOutcome::Restored(restored));
        }
        if delete_id != Some(d.id) {
            return refuse(Refusal::Conflict(format!(
                "manifest {digest} of {repo} was deleted again since (delete {})",
                delete_id.unwrap_or_default()
            )));
        }
        let mut restored = Vec::new();
        let tags = TagsBack::Deleted { take_tags };
        Self::revive(tx, c, repo, repo_id, &m, tags, actor, now, 0, &mut restored).await?;
        Ok(BulkOutcome::Restored(restored))
    }

    /// Refuses while the (locked) repository is deleted: what a delete in it took comes back
    /// with the repository's own delete (selected too), never by reviving the name half-way.
    async fn refuse_in_deleted_repository(
        tx: &mut AnyConnection,
        repo: &RepoName,
        repo_id: i64,
        what: &str,
    ) -> DeleteResult<()> {
        let (deleted_at, in_force): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT deleted_at, delete_id FROM repositories WHERE id = $1")
                .bind(repo_id)
                .fetch_one(&mut *tx)
                .await?;
        if deleted_at.is_some() {
            return refuse(Refusal::Conflict(format!(
                "repository {repo} is deleted (delete {}); select its delete too to bring {what} back",
                in_force.unwrap_or_default()
            )));
        }
        Ok(())
    }

    #[expect(clippy::too_many_arguments, reason = "the parts of one restore")]
    async fn restore_tag_delete(
        tx: &mut AnyConnection,
        c: &Revive,
        repo: &RepoName,
        repo_id: i64,
        d: &DeleteRecord,
        take_tags: bool,
        actor: Option<&str>,
        now: i64,
    ) -> DeleteResult<BulkOutcome> {
        let Ok(tag) = Tag::parse(&d.target) else {
            return refuse(Refusal::Conflict(format!("`{}` is not a tag", d.target)));
        };
        Self::refuse_in_deleted_repository(tx, repo, repo_id, &format!("tag {tag}")).await?;
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT old_digest FROM tag_history WHERE delete_id = $1 AND kind = 'delete' ORDER BY id LIMIT 1",
        )
        .bind(d.id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((Some(digest),)) = row else {
            return refuse(Refusal::Conflict(format!("the delete of tag {tag} recorded no digest")));
        };
        // On PostgreSQL `lock_batch` locked the tag's row already (with the batch's others, in
        // name order).
        let current = Self::current_tag(tx, c, repo_id, &tag).await?;
        if current.as_deref() == Some(digest.as_str()) {
            return Ok(BulkOutcome::Unchanged(format!("tag {tag} points at {digest} already")));
        }
        let since = Self::tag_since_delete(tx, c, repo, repo_id, &tag, current, d.id, take_tags);
        let condition = match since.await? {
            SinceDelete::Untouched => TagCondition::IfAbsent,
            SinceDelete::TakenBack => TagCondition::Always,
            SinceDelete::LeftAlone => {
                return Ok(BulkOutcome::Unchanged(format!(
                    "a newer delete of tag {tag} in this restore decides where it points"
                )));
            }
        };
        Self::point_tag(tx, c, repo, repo_id, &tag, &digest, condition, "restore", actor, now).await?;
        Ok(BulkOutcome::Restored(vec![AffectedManifest {
            repository: repo.to_string(),
            digest,
            tags: vec![tag.to_string()],
        }]))
    }

    /// Records the start of a bulk restore; returns its id.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn start_bulk_restore(
        &self,
        actor: Option<&str>,
        selection: &str,
        take_tags: bool,
        now: i64,
    ) -> Result<i64> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO bulk_restores (actor, started_at, selection, take_tags) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(actor)
        .bind(now)
        .bind(selection)
        .bind(i64::from(take_tags))
        .fetch_one(&self.write)
        .await?;
        Ok(id)
    }

    /// Records how bulk restore `id` ended: its counts, and when it finished (none when it
    /// stopped on a failure).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn finish_bulk_restore(
        &self,
        id: i64,
        (restored, unchanged, conflicts): (i64, i64, i64),
        conflict_list: &str,
        finished_at: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE bulk_restores SET finished_at = $2, restored = $3, unchanged = $4, conflicts = $5, \
             conflict_list = $6 WHERE id = $1",
        )
        .bind(id)
        .bind(finished_at)
        .bind(restored)
        .bind(unchanged)
        .bind(conflicts)
        .bind(conflict_list)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// The newest `limit` bulk restores, newest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn bulk_restores(&self, limit: i64) -> Result<Vec<BulkRestoreRecord>> {
        Ok(sqlx::query_as(&format!("SELECT {RECORD_COLUMNS} FROM bulk_restores ORDER BY id DESC LIMIT $1"))
            .bind(limit)
            .fetch_all(&self.read)
            .await?)
    }

    /// Bulk restore `id`, with the deletes it undid (oldest first), if it is recorded.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn bulk_restore(&self, id: i64) -> Result<Option<(BulkRestoreRecord, Vec<DeleteRecord>)>> {
        let record: Option<BulkRestoreRecord> =
            sqlx::query_as(&format!("SELECT {RECORD_COLUMNS} FROM bulk_restores WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        let Some(record) = record else { return Ok(None) };
        let undone = sqlx::query_as(
            "SELECT d.id, d.kind, r.name AS repository, d.target, d.actor, d.at, d.run_id, d.restored_by \
             FROM deletes d JOIN repositories r ON r.id = d.repository_id WHERE d.restored_by = $1 ORDER BY d.id",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        Ok(Some((record, undone)))
    }
}
