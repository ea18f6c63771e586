//! Retention runs and immutability lifts: the rules of `crate::retention` applied to the store.
//! Retention only removes tags (and, when a rule says so, old untagged manifests), each as a
//! restorable delete credited to `retention:<rule>` and conditional on what the rule evaluated;
//! the collector does the rest.

use std::collections::BTreeMap;

use super::{Error, Registry, Result};
use crate::auth::Pattern;
use crate::meta::{DeleteError, Refusal, RetentionDelete, RunRecord, Untag, UntagOutcome};
use crate::oci::{Digest, RepoName, Tag};
use crate::retention::{RetentionRule, removals};

/// Tags removed in one transaction.
const UNTAG_BATCH: usize = 500;

/// A tag a run removes (or, dry, would remove).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TagRemoval {
    /// The repository.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// The manifest it pointed at when the rule evaluated it.
    pub digest: String,
    /// The rule credited.
    pub rule: String,
    /// When the tag was last pushed (Unix ms).
    pub pushed_at: i64,
    /// When its manifest was last pulled (Unix ms), if ever.
    pub pulled_at: Option<i64>,
    /// A real run's outcome: `removed`, or `skipped: <why>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// An untagged manifest a run deletes (or, dry, would delete).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestRemoval {
    /// The repository.
    pub repository: String,
    /// The manifest.
    pub digest: String,
    /// The rule credited.
    pub rule: String,
    /// Its last push or pull (Unix ms).
    pub last_used: i64,
    /// A real run's outcome: `removed`, or `skipped: <why>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// What a rule would remove but an in-use report keeps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeptInUse {
    /// The repository.
    pub repository: String,
    /// The tag, or none for an untagged manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest.
    pub digest: String,
    /// The rule that would have removed it.
    pub rule: String,
    /// Why it stays: `in use by SOURCE, reported at T`.
    pub kept: String,
}

/// What a retention run did, or — dry — would do.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetentionReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// A real run's id (`berth retention undo` takes it); none for a dry run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<i64>,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// When it finished (Unix ms).
    pub finished_at: i64,
    /// Repositories some rule applies to.
    pub repositories: u64,
    /// Tags evaluated.
    pub tags_considered: u64,
    /// Every tag removal, in repository and tag order.
    pub tags: Vec<TagRemoval>,
    /// Every untagged manifest deletion.
    pub manifests: Vec<ManifestRemoval>,
    /// What the rules select but an in-use report keeps (pinned, or listed by a pinned index).
    pub kept_in_use: Vec<KeptInUse>,
    /// A dry run: bytes freed once the collector has run — blobs and manifests nothing outside
    /// these removals holds, counted per repository (a blob that removals in two repositories
    /// would both free is counted in neither).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_freed: Option<i64>,
    /// A real run: removals left alone because the tag moved or was tagged again since it was
    /// evaluated (a push won), or became immutable.
    pub skipped: u64,
    /// Repositories that failed, with why (the others went on).
    pub errors: Vec<String>,
}

impl RetentionReport {
    /// Removals per rule (tags and manifests).
    pub fn by_rule(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        let done = |o: &Option<String>| self.dry_run || o.as_deref() == Some("removed");
        for t in self.tags.iter().filter(|t| done(&t.outcome)) {
            *counts.entry(t.rule.clone()).or_insert(0) += 1;
        }
        for m in self.manifests.iter().filter(|m| done(&m.outcome)) {
            *counts.entry(m.rule.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn removed(&self) -> (i64, i64) {
        let tags = self.tags.iter().filter(|t| t.outcome.as_deref() == Some("removed")).count();
        let manifests = self.manifests.iter().filter(|m| m.outcome.as_deref() == Some("removed")).count();
        (tags as i64, manifests as i64)
    }
}

/// What the admin status shows about retention.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetentionStatus {
    /// The rules' names, in order.
    pub rules: Vec<String>,
    /// The immutability rules' names.
    pub immutable: Vec<String>,
    /// How often the schedule runs the rules (milliseconds; 0: only on demand).
    pub interval_ms: i64,
    /// The newest real runs, newest first.
    pub last_runs: Vec<RunRecord>,
}

impl Registry {
    /// Applies the retention rules to every live repository (those matching `only`, if given).
    /// A dry run changes nothing and says what would go and the bytes that would be freed; a
    /// real run removes exactly that, except what a concurrent push changed since (each untag
    /// is conditional on the digest evaluated), records the run and counts it in the metrics.
    /// `started_by` says what asked (`schedule`, `cli`, `admin-api`).
    ///
    /// # Errors
    /// [`Error::Internal`] when the repositories cannot be listed; a repository that fails is
    /// reported in [`RetentionReport::errors`] and the run goes on.
    pub async fn retention_run(
        &self,
        only: Option<&Pattern>,
        dry_run: bool,
        started_by: &str,
    ) -> Result<RetentionReport> {
        let rules = &self.policy.retention_rules;
        // Pulls this replica noted but has not written yet count as pulls ("not pulled within").
        if let Err(e) = self.flush_access().await {
            tracing::warn!(error = %e, "retention runs without this replica's latest pull times");
        }
        let now = self.clock.now_ms();
        let mut report = RetentionReport { dry_run, started_at: now, ..RetentionReport::default() };
        if dry_run {
            report.bytes_freed = Some(0);
        } else {
            // Recorded first: every delete the run makes carries its id, for an undo.
            report.run_id = Some(self.meta.start_retention_run(self.instance(), started_by, now).await?);
        }
        for (repo_id, name) in self.meta.live_repositories().await? {
            if only.is_some_and(|p| !p.matches(&name)) || !rules.iter().any(|r| r.repositories.matches(&name))
            {
                continue;
            }
            report.repositories += 1;
            if let Err(e) = self.retention_repository(rules, repo_id, &name, now, &mut report).await {
                tracing::warn!(repository = %name, error = %e, "retention could not finish a repository");
                report.errors.push(format!("{name}: {e}"));
            }
        }
        report.finished_at = self.clock.now_ms();
        if let Some(id) = report.run_id {
            let (tags_removed, manifests_removed) = report.removed();
            let record = RunRecord {
                id,
                replica: self.instance().to_string(),
                started_by: started_by.to_string(),
                started_at: report.started_at,
                finished_at: report.finished_at,
                repositories: report.repositories as i64,
                tags_considered: report.tags_considered as i64,
                tags_removed,
                manifests_removed,
                skipped: report.skipped as i64,
                errors: report.errors.len() as i64,
                by_rule: serde_json::to_string(&report.by_rule()).unwrap_or_default(),
            };
            self.meta.finish_retention_run(&record).await?;
            self.metrics.retention(&report);
            tracing::info!(
                run_id = id,
                started_by,
                tags_removed,
                manifests_removed,
                skipped = report.skipped,
                errors = report.errors.len(),
                "retention run"
            );
        }
        Ok(report)
    }

    /// Evaluates and (unless dry) applies the rules to one repository.
    async fn retention_repository(
        &self,
        rules: &[RetentionRule],
        repo_id: i64,
        name: &str,
        now: i64,
        report: &mut RetentionReport,
    ) -> Result<()> {
        let repo = RepoName::parse(name).map_err(|e| Error::Internal(e.into()))?;
        let tags = self.meta.tag_states(repo_id).await?;
        report.tags_considered += tags.len() as u64;
        let mut planned: Vec<TagRemoval> = removals(rules, name, &tags, self.meta.immutable(), now)
            .into_iter()
            .map(|r| {
                let t = &tags[r.tag];
                TagRemoval {
                    repository: name.to_string(),
                    tag: t.name.clone(),
                    digest: t.digest.clone(),
                    rule: rules[r.rule].name.clone(),
                    pushed_at: t.pushed_at,
                    pulled_at: t.pulled_at,
                    outcome: None,
                }
            })
            .collect();
        planned.sort_by(|a, b| a.tag.cmp(&b.tag));
        // What runs stays; the untags check again under their locks.
        let pinned = self.meta.pinned_manifests(name, repo_id, now).await?;
        planned.retain(|t| match pinned.get(&t.digest) {
            None => true,
            Some(pin) => {
                report.kept_in_use.push(KeptInUse {
                    repository: name.to_string(),
                    tag: Some(t.tag.clone()),
                    digest: t.digest.clone(),
                    rule: t.rule.clone(),
                    kept: pin.to_string(),
                });
                false
            }
        });
        let mut untagged: Vec<ManifestRemoval> = Vec::new();
        for rule in rules.iter().filter(|r| r.repositories.matches(name)) {
            let Some(age) = rule.remove_untagged_older_than_ms else { continue };
            for m in self.meta.untagged_manifests(repo_id, now.saturating_sub(age)).await? {
                if let Some(pin) = pinned.get(&m.digest) {
                    if !report.kept_in_use.iter().any(|k| k.tag.is_none() && k.digest == m.digest) {
                        report.kept_in_use.push(KeptInUse {
                            repository: name.to_string(),
                            tag: None,
                            digest: m.digest,
                            rule: rule.name.clone(),
                            kept: pin.to_string(),
                        });
                    }
                    continue;
                }
                if !untagged.iter().any(|u| u.digest == m.digest) {
                    untagged.push(ManifestRemoval {
                        repository: name.to_string(),
                        digest: m.digest,
                        rule: rule.name.clone(),
                        last_used: m.last_used,
                        outcome: None,
                    });
                }
            }
        }
        if report.dry_run {
            if !planned.is_empty() || !untagged.is_empty() {
                let tag_names: Vec<String> = planned.iter().map(|t| t.tag.clone()).collect();
                let digests: Vec<String> = untagged.iter().map(|m| m.digest.clone()).collect();
                let pinned_digests = pinned.keys().map(String::as_str).collect();
                let freed = self.meta.retention_frees(repo_id, &tag_names, &digests, &pinned_digests).await?;
                report.bytes_freed = Some(report.bytes_freed.unwrap_or(0) + freed);
            }
        } else {
            let run_id = report.run_id.unwrap_or_default();
            self.apply_untags(&repo, &mut planned, run_id, now, report).await?;
            for m in &mut untagged {
                m.outcome = Some(self.delete_untagged(&repo, m, run_id).await?);
                if m.outcome.as_deref() != Some("removed") {
                    report.skipped += 1;
                }
            }
        }
        report.tags.append(&mut planned);
        report.manifests.append(&mut untagged);
        Ok(())
    }

    /// Removes `planned` tags of `repo` in batches, noting each outcome.
    async fn apply_untags(
        &self,
        repo: &RepoName,
        planned: &mut [TagRemoval],
        run_id: i64,
        now: i64,
        report: &mut RetentionReport,
    ) -> Result<()> {
        for batch in planned.chunks_mut(UNTAG_BATCH) {
            let untags: Vec<Untag> = batch
                .iter()
                .filter_map(|t| {
                    Some(Untag {
                        tag: Tag::parse(&t.tag).ok()?,
                        digest: Digest::parse(&t.digest).ok()?,
                        pushed_at: t.pushed_at,
                        actor: format!("retention:{}", t.rule),
                    })
                })
                .collect();
            let outcomes = self.meta.untag_many(repo, &untags, run_id, now).await?;
            for (t, outcome) in batch.iter_mut().zip(outcomes) {
                t.outcome = Some(match outcome {
                    UntagOutcome::Removed => {
                        if let Ok(tag) = Tag::parse(&t.tag) {
                            let actor = format!("retention:{}", t.rule);
                            super::delete::audit_tag("delete-tag", Some(&actor), repo, &tag, &t.digest);
                        }
                        "removed".to_string()
                    }
                    UntagOutcome::Skipped(why) => {
                        report.skipped += 1;
                        format!("skipped: {why}")
                    }
                });
            }
        }
        Ok(())
    }

    /// Deletes untagged manifest `m` unless it was tagged, pushed, pulled (or listed by an index)
    /// since it was evaluated.
    async fn delete_untagged(&self, repo: &RepoName, m: &ManifestRemoval, run_id: i64) -> Result<String> {
        let Ok(digest) = Digest::parse(&m.digest) else { return Ok("skipped: bad digest".into()) };
        let actor = format!("retention:{}", m.rule);
        match self
            .meta
            .delete_manifest(
                repo,
                &digest,
                Some(RetentionDelete { last_used: m.last_used, run_id }),
                false,
                Some(&actor),
                self.clock.now_ms(),
            )
            .await
        {
            Ok(affected) => {
                super::delete::audit("delete-manifest", Some(&actor), &format!("{repo}@{digest}"), &affected);
                Ok("removed".into())
            }
            // Tagged or listed since, gone, or made immutable: a concurrent change wins.
            Err(DeleteError::Refused(r)) => Ok(format!("skipped: {r}")),
            Err(DeleteError::Meta(e)) => Err(e.into()),
        }
    }

    /// Lifts the immutability of `tag` in `repo` for one change (a move or a delete) during
    /// `for_ms`, recorded in the tag history with `reason`. Returns the digest the tag points at.
    ///
    /// # Errors
    /// [`Error::TagUnknown`]; [`Error::Conflict`] when no rule makes the tag immutable.
    pub async fn lift_immutability(
        &self,
        repo: &RepoName,
        tag: &Tag,
        for_ms: i64,
        reason: &str,
        actor: Option<&str>,
    ) -> Result<String> {
        let now = self.clock.now_ms();
        let digest = self
            .meta
            .lift_immutability(repo, tag, now.saturating_add(for_ms), actor, reason, now)
            .await
            .map_err(|e| match e {
                DeleteError::Refused(Refusal::NotFound(m)) => Error::TagUnknown(m),
                DeleteError::Refused(r) => Error::Conflict(r.to_string()),
                DeleteError::Meta(e) => e.into(),
            })?;
        super::delete::audit_tag("unlock-tag", actor, repo, tag, &digest);
        Ok(digest)
    }

    /// The retention rules, the schedule and the last runs.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn retention_status(&self) -> Result<RetentionStatus> {
        Ok(RetentionStatus {
            rules: self.policy.retention_rules.iter().map(|r| r.name.clone()).collect(),
            immutable: self.meta.immutable().0.iter().map(|r| r.name.clone()).collect(),
            interval_ms: self.policy.retention_interval_ms,
            last_runs: self.meta.retention_runs(10).await?,
        })
    }

    /// Runs the rules if the schedule says a run is due and this replica holds the retention
    /// lease (so replicas scheduled at once run one pass between them). Returns the report of
    /// the run, if there was one.
    ///
    /// # Errors
    /// [`Error::Internal`].
    pub async fn scheduled_retention(&self) -> Result<Option<RetentionReport>> {
        let interval = self.policy.retention_interval_ms;
        if interval == 0 || self.policy.retention_rules.is_empty() {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        // Longer than any run takes; a replica that dies mid-run lets another take over then.
        const LEASE_MS: i64 = 15 * 60 * 1000;
        if !self.meta.take_lease("retention", self.instance(), now, LEASE_MS).await? {
            return Ok(None);
        }
        let due = self.meta.last_retention_run_by("schedule").await?.is_none_or(|at| at + interval <= now);
        let report = if due { Some(self.retention_run(None, false, "schedule").await?) } else { None };
        self.meta.release_lease("retention", self.instance()).await?;
        Ok(report)
    }
}
