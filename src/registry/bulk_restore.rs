//! Bulk restores and retention-run undo: every delete a time window, an actor or a retention run
//! made, undone delete by delete exactly as single restores would (the rule is the store's
//! revive), with conflicts reported per delete. A dry run runs the same transactions and rolls
//! them back, so it says what a real run would do at that moment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::{Error, Registry, Result};
use crate::auth::Pattern;
use crate::meta::{AffectedManifest, BulkOutcome, BulkRestoreRecord, DeleteRecord, DeleteSelection};
use crate::oci::RepoName;
use crate::time::Moment;

/// Deletes undone in one transaction (each in its own savepoint). Small, because a push to the
/// repository waits for the batch (and on SQLite every write does): 20 take about 15 ms there.
const BATCH: usize = 20;

/// The most deletes one bulk restore takes on; a selection naming more is refused (narrow it).
/// Its report lists every one, so this bounds its memory (some hundred bytes a delete).
pub const MAX_SELECTED: usize = 100_000;

/// The conflicts kept in a bulk restore's record (the response lists them all).
const CONFLICTS_RECORDED: usize = 1000;

/// Which deletes to undo: all the conditions given must hold; at least one of `since`, `until`,
/// `actor` or `run` must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Repositories matching this pattern (all, when none).
    pub repositories: Option<Pattern>,
    /// Deletes at or after this moment.
    pub since: Option<Moment>,
    /// Deletes before this moment; the start of the restore when none.
    pub until: Option<Moment>,
    /// Deletes by this actor.
    pub actor: Option<String>,
    /// Deletes by this retention run (`berth retention undo`).
    pub run: Option<i64>,
}

impl Selection {
    /// The pattern whose repositories a bulk restore may touch (`**` when none is given).
    pub fn pattern(&self) -> Pattern {
        self.repositories.clone().unwrap_or_else(|| Pattern::parse("**").expect("a valid pattern"))
    }
}

/// What became of one selected delete.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BulkItem {
    /// The delete's id.
    pub delete_id: i64,
    /// `manifest`, `tag` or `repository`.
    pub kind: String,
    /// The repository.
    pub repository: String,
    /// What the delete named: a digest, a tag, the repository.
    pub target: String,
    /// When it was deleted (Unix ms).
    pub deleted_at: i64,
    /// Who deleted it.
    pub deleted_by: Option<String>,
    /// The retention run that deleted it, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// `restored`, `unchanged` (back already) or `conflict`.
    pub outcome: &'static str,
    /// Why it is unchanged or a conflict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The manifests brought back, with the tags they got back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<AffectedManifest>,
}

/// What a bulk restore did, or — dry — would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BulkRestoreReport {
    /// The bulk restore's id (the tag history rows it wrote carry it); none for a dry run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The selection, with the time it ended at.
    pub selection: DeleteSelectionView,
    /// Whether tags pushed again since were moved back.
    pub take_tags: bool,
    /// When it started and finished (Unix ms).
    pub started_at: i64,
    /// When it finished (Unix ms).
    pub finished_at: i64,
    /// Deletes undone.
    pub restored: u64,
    /// Deletes whose items were back already.
    pub unchanged: u64,
    /// Deletes left alone, each with its reason in `items`.
    pub conflicts: u64,
    /// Every selected delete, by repository, newest first within one.
    pub items: Vec<BulkItem>,
}

/// A selection as reports and records show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeleteSelectionView {
    /// The repository pattern.
    pub repositories: String,
    /// From (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Until (Unix ms).
    pub until: i64,
    /// The actor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The retention run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
}

/// A recorded bulk restore with the deletes it undid.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BulkRestoreView {
    /// The record.
    #[serde(flatten)]
    pub record: BulkRestoreRecord,
    /// The deletes it undid, oldest first.
    pub undone: Vec<DeleteRecord>,
}

impl Registry {
    /// The deletes `selection` names that no bulk restore has undone, newest first — what a
    /// bulk restore would take on (the console's filtered trash).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a selection naming nothing or too much; [`Error::Internal`].
    pub async fn selected_deletes(&self, selection: &Selection) -> Result<Vec<DeleteRecord>> {
        let (mut deletes, _) = self.select(selection).await?;
        deletes.truncate(MAX_SELECTED);
        Ok(deletes)
    }

    async fn select(&self, selection: &Selection) -> Result<(Vec<DeleteRecord>, DeleteSelectionView)> {
        if selection.since.is_none()
            && selection.until.is_none()
            && selection.actor.is_none()
            && selection.run.is_none()
        {
            return Err(Error::Invalid(
                "a bulk restore needs since, until, actor or run: it never selects every delete ever made"
                    .into(),
            ));
        }
        let now = self.clock.now_ms();
        let since = selection.since.map(|m| m.resolve(now));
        let until = selection.until.map_or(now.saturating_add(1), |m| m.resolve(now));
        if since.is_some_and(|since| since >= until) {
            return Err(Error::Invalid("since must be before until".into()));
        }
        let pattern = selection.pattern();
        // The store selects by the pattern's plain prefix (a whole name when it has no
        // wildcard); the pattern itself is matched here.
        let prefix = pattern.as_str().split('*').next().unwrap_or_default();
        let meta = DeleteSelection {
            since,
            until: Some(until),
            actor: selection.actor.clone(),
            run: selection.run,
            repository_prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
            repository_exact: !pattern.as_str().contains('*'),
        };
        let limit = i64::try_from(MAX_SELECTED + 1).unwrap_or(i64::MAX);
        let mut deletes = self.meta.deletes_matching(&meta, limit).await?;
        // Refused before matching: a selection cut at the limit would be silently incomplete.
        let complete = deletes.len() <= MAX_SELECTED;
        // Deletes in pull-through caches are not restored: cached content is fetched again.
        deletes.retain(|d| {
            pattern.matches(&d.repository)
                && RepoName::parse(&d.repository).map_or(true, |r| self.cache_of(&r).is_none())
        });
        if !complete {
            return Err(Error::Invalid(format!(
                "the selection names more than {MAX_SELECTED} deletes; narrow it (repositories, since, until)"
            )));
        }
        let view = DeleteSelectionView {
            repositories: pattern.as_str().to_string(),
            since,
            until,
            actor: selection.actor.clone(),
            run: selection.run,
        };
        Ok((deletes, view))
    }

    /// Undoes every delete `selection` names — manifest deletes (tombstones with their tags and
    /// referrers), tag deletes, repository deletes — newest first, each as the single restore of
    /// its kind would and only what that delete took. What cannot come back (collected, deleted
    /// again since, a tag pushed again since unless `take_tags`) is a conflict; the rest goes on.
    /// A real run is recorded (`berth restores`), its history rows carry its id, and the deletes
    /// it undid are not selected again. `dry_run` runs the same transactions and rolls them
    /// back.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a selection naming nothing or too much; [`Error::Internal`] when
    /// the store fails (what was restored by then stays restored and recorded).
    pub async fn bulk_restore(
        &self,
        selection: &Selection,
        take_tags: bool,
        dry_run: bool,
        actor: Option<&str>,
    ) -> Result<BulkRestoreReport> {
        let started_at = self.clock.now_ms();
        let (deletes, view) = self.select(selection).await?;
        let selected: Arc<HashSet<i64>> = Arc::new(deletes.iter().map(|d| d.id).collect());
        let mut footprints = self.meta.delete_footprints(&deletes).await?;
        let id = if dry_run {
            None
        } else {
            let recorded = serde_json::to_string(&view).unwrap_or_default();
            Some(self.meta.start_bulk_restore(actor, &recorded, take_tags, started_at).await?)
        };
        let mut by_repository: BTreeMap<String, Vec<DeleteRecord>> = BTreeMap::new();
        for d in deletes {
            by_repository.entry(d.repository.clone()).or_default().push(d);
        }
        let mut report = BulkRestoreReport {
            id,
            dry_run,
            selection: view,
            take_tags,
            started_at,
            finished_at: 0,
            restored: 0,
            unchanged: 0,
            conflicts: 0,
            items: Vec::new(),
        };
        let mut failed = None;
        'repositories: for (name, deletes) in by_repository {
            let repo = RepoName::parse(&name).map_err(|e| Error::Internal(e.into()))?;
            for chunk in batches(deletes, &mut footprints) {
                let now = self.clock.now_ms();
                let done = self
                    .meta
                    .restore_deletes(&repo, &chunk, &selected, take_tags, actor, id, dry_run, now)
                    .await;
                match done {
                    Ok(outcomes) => {
                        for (d, outcome) in chunk.iter().zip(outcomes) {
                            report.items.push(self.bulk_item(&repo, d, outcome, actor, dry_run));
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break 'repositories;
                    }
                }
            }
        }
        for item in &report.items {
            match item.outcome {
                "restored" => report.restored += 1,
                "unchanged" => report.unchanged += 1,
                _ => report.conflicts += 1,
            }
        }
        report.finished_at = self.clock.now_ms();
        if let Some(id) = id {
            // Recorded also when a batch failed: what it restored by then, without an end.
            let conflicts: Vec<&BulkItem> =
                report.items.iter().filter(|i| i.outcome == "conflict").take(CONFLICTS_RECORDED).collect();
            let counts = (report.restored as i64, report.unchanged as i64, report.conflicts as i64);
            let list = serde_json::to_string(&conflicts).unwrap_or_default();
            let finished = failed.is_none().then_some(report.finished_at);
            self.meta.finish_bulk_restore(id, counts, &list, finished).await?;
            tracing::info!(
                bulk_restore = id,
                actor = actor.unwrap_or("anonymous"),
                restored = report.restored,
                unchanged = report.unchanged,
                conflicts = report.conflicts,
                stopped = failed.is_some(),
                "bulk restore"
            );
        }
        match failed {
            // A batch that would take a quota's scope past a limit stops the run (what earlier
            // batches restored stays, recorded): restore those deletes one by one, with --force.
            Some(crate::meta::Error::Quota(r)) => Err(Error::Conflict(format!(
                "{r}; the bulk restore stopped there — restore the rest one by one, an administrator with --force"
            ))),
            Some(e) => Err(e.into()),
            None => Ok(report),
        }
    }

    fn bulk_item(
        &self,
        repo: &RepoName,
        d: &DeleteRecord,
        outcome: BulkOutcome,
        actor: Option<&str>,
        dry_run: bool,
    ) -> BulkItem {
        let (outcome, reason, restored) = match outcome {
            BulkOutcome::Restored(restored) => {
                if !dry_run {
                    super::delete::audit(
                        "bulk-restore",
                        actor,
                        &format!("{repo} delete {}", d.id),
                        &restored,
                    );
                }
                ("restored", None, restored)
            }
            BulkOutcome::Unchanged(why) => ("unchanged", Some(why), Vec::new()),
            BulkOutcome::Conflict(why) => ("conflict", Some(why), Vec::new()),
        };
        BulkItem {
            delete_id: d.id,
            kind: d.kind.clone(),
            repository: d.repository.clone(),
            target: d.target.clone(),
            deleted_at: d.at,
            deleted_by: d.actor.clone(),
            run: d.run_id,
            outcome,
            reason,
            restored,
        }
    }

    /// The newest recorded bulk restores, newest first.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn bulk_restores(&self, limit: i64) -> Result<Vec<BulkRestoreRecord>> {
        Ok(self.meta.bulk_restores(limit).await?)
    }

    /// Bulk restore `id` with the deletes it undid.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Internal`].
    pub async fn bulk_restore_record(&self, id: i64) -> Result<BulkRestoreView> {
        match self.meta.bulk_restore(id).await? {
            Some((record, undone)) => Ok(BulkRestoreView { record, undone }),
            None => Err(Error::NotFound(format!("no bulk restore {id} is recorded"))),
        }
    }
}

/// Splits one repository's `deletes` (newest first) into the batches a bulk restore runs, each
/// one transaction: deletes whose footprints share a tag or a manifest (a tag deleted twice, a
/// tag and the manifest it pointed at, an index and its child) always in the same batch, in
/// order, so each is judged after the ones it depends on — in a dry run (each batch rolled back)
/// exactly as in the real run. Unrelated deletes fill batches up to [`BATCH`].
fn batches(
    deletes: Vec<DeleteRecord>,
    footprints: &mut HashMap<i64, HashSet<String>>,
) -> Vec<Vec<DeleteRecord>> {
    // Union-find over the deletes, joined by shared footprint keys.
    let mut parent: Vec<usize> = (0..deletes.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut owner: HashMap<String, usize> = HashMap::new();
    let everything: Vec<usize> = (0..deletes.len())
        .filter(|&i| footprints.get(&deletes[i].id).is_some_and(|k| k.contains("*")))
        .collect();
    for (i, d) in deletes.iter().enumerate() {
        for key in footprints.remove(&d.id).unwrap_or_default() {
            match owner.get(&key) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a] = b;
                }
                None => {
                    owner.insert(key, i);
                }
            }
        }
    }
    // A repository delete touches everything of its repository.
    if let Some(&first) = everything.first() {
        for i in 0..deletes.len() {
            let (a, b) = (root(&mut parent, i), root(&mut parent, first));
            parent[a] = b;
        }
    }
    // Groups in the order of their newest delete; each keeps newest-first order.
    let mut groups: Vec<Vec<DeleteRecord>> = Vec::new();
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    for (i, d) in deletes.into_iter().enumerate() {
        let r = root(&mut parent, i);
        let g = *group_of.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(d);
    }
    let mut out: Vec<Vec<DeleteRecord>> = Vec::new();
    for group in groups {
        match out.last_mut() {
            Some(batch) if batch.len() + group.len() <= BATCH => batch.extend(group),
            _ => out.push(group),
        }
    }
    // Within a batch, newest first again (groups do not depend on each other).
    for batch in &mut out {
        batch.sort_by_key(|d| std::cmp::Reverse(d.id));
    }
    out
}
