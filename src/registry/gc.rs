//! The online collector: reviews due items one transaction at a time (see `meta::gc`), then
//! deletes the storage objects their transactions put in the outbox. Runs inside `berth serve`
//! (when `gc.enabled`) and in `berth gc run`; several workers and replicas can run it at once.

use super::{Registry, Result};
use crate::meta::{Explanation, GcStatus, PassRecord, ReviewOutcome, WouldCollect};
use crate::oci::{Digest, RepoName};

/// What `gc explain` explains: a manifest (`REPO@DIGEST`) or a blob (`DIGEST`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainTarget {
    /// A manifest of a repository.
    Manifest(RepoName, Digest),
    /// The manifest a tag of a repository points at.
    Tag(RepoName, crate::oci::Tag),
    /// A blob, wherever it is linked.
    Blob(Digest),
}

impl ExplainTarget {
    /// Parses `REPO@DIGEST`, `REPO:TAG` or `DIGEST`.
    ///
    /// # Errors
    /// A message saying what is malformed.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        match text.split_once('@') {
            Some((repo, digest)) => Ok(ExplainTarget::Manifest(
                RepoName::parse(repo)?,
                Digest::parse(digest).map_err(|e| e.to_string())?,
            )),
            None if text.contains('/') || !text.starts_with("sha") => {
                let (repo, tag) = text
                    .rsplit_once(':')
                    .filter(|(repo, _)| !repo.contains('@'))
                    .ok_or_else(|| format!("`{text}` is neither REPO@DIGEST, REPO:TAG nor a blob digest"))?;
                Ok(ExplainTarget::Tag(
                    RepoName::parse(repo)?,
                    crate::oci::Tag::parse(tag).map_err(|e| e.to_string())?,
                ))
            }
            None => Digest::parse(text)
                .map(ExplainTarget::Blob)
                .map_err(|e| format!("`{text}` is neither REPO@DIGEST, REPO:TAG nor a blob digest: {e}")),
        }
    }
}

impl std::fmt::Display for ExplainTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExplainTarget::Manifest(r, d) => write!(f, "{r}@{d}"),
            ExplainTarget::Tag(r, t) => write!(f, "{r}:{t}"),
            ExplainTarget::Blob(d) => write!(f, "{d}"),
        }
    }
}

/// What a collection pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Reviews carried out.
    pub reviews: u64,
    /// Manifest rows collected.
    pub manifests: u64,
    /// Blob rows collected.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Abandoned upload sessions removed (their objects went to the outbox).
    pub uploads_expired: u64,
    /// Reviews that failed (postponed, retried later with a growing pause).
    pub review_errors: u64,
    /// Reviews left for a moment because another transaction held their item.
    pub reviews_postponed: u64,
    /// Storage objects deleted from the outbox.
    pub objects_deleted: u64,
    /// Storage deletes that failed (retried later).
    pub objects_failed: u64,
}

/// What a collection pass would do now (`berth gc run --dry-run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DryRun {
    /// Reviews that would be carried out.
    pub reviews: u64,
    /// Items another transaction was changing: a pass would leave them for a moment, the dry
    /// run does not know what it would do.
    pub busy: u64,
    /// Manifests that would be collected.
    pub manifests: Vec<WouldCollect>,
    /// Blobs that would be collected.
    pub blobs: Vec<WouldCollect>,
    /// Storage bytes their collection would free.
    pub bytes: u64,
    /// Abandoned upload sessions that would be removed.
    pub uploads_expiring: u64,
}

impl GcReport {
    /// Adds what another pass did.
    pub fn add(&mut self, other: &GcReport) {
        self.reviews += other.reviews;
        self.manifests += other.manifests;
        self.blobs += other.blobs;
        self.bytes += other.bytes;
        self.uploads_expired += other.uploads_expired;
        self.review_errors += other.review_errors;
        self.objects_deleted += other.objects_deleted;
        self.objects_failed += other.objects_failed;
    }
}

/// Outbox keys deleted per batch (one `DeleteObjects` request on S3).
const OUTBOX_BATCH: i64 = 1000;

impl Registry {
    /// Why `target` is kept, every hold with when it ends, and when the collector will take it
    /// if nothing changes.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn explain(&self, target: &ExplainTarget) -> Result<Explanation> {
        let now = self.clock.now_ms();
        Ok(match target {
            ExplainTarget::Manifest(repo, digest) => self.meta.explain_manifest(repo, digest, now).await?,
            ExplainTarget::Tag(repo, tag) => {
                let reference = crate::oci::Reference::Tag(tag.clone());
                let Some(head) = self.meta.manifest_head(repo, &reference).await? else {
                    return Err(super::Error::TagUnknown(format!("tag {tag} not in repository {repo}")));
                };
                let digest = Digest::parse(&head.digest).map_err(|e| super::Error::Internal(Box::new(e)))?;
                self.meta.explain_manifest(repo, &digest, now).await?
            }
            ExplainTarget::Blob(digest) => self.meta.explain_blob(digest, now).await?,
        })
    }

    /// Where the space goes: the blobs `repo` holds (or all of them), by state.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn space(&self, repo: Option<&RepoName>) -> Result<crate::meta::Space> {
        Ok(self.meta.space(repo, self.clock.now_ms()).await?)
    }

    /// Records where the space is now unless a sample is younger than `every_ms` (the replica
    /// running the storage sweep calls this; the console charts the samples). Returns whether
    /// it took one.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn sample_space(&self, every_ms: i64) -> Result<bool> {
        let now = self.clock.now_ms();
        if self.meta.last_space_sample_at().await?.is_some_and(|at| at > now - every_ms) {
            return Ok(false);
        }
        let s = self.meta.space(None, now).await?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let sample = crate::meta::SpaceSample {
            at: now,
            stored: n(s.bytes_stored),
            live: n(s.bytes_live),
            tombstones: n(s.bytes_in_tombstones),
            grace: n(s.bytes_in_grace),
            pending: n(s.bytes_pending_reclaim),
        };
        self.meta.record_space_sample(&sample, now - SPACE_SAMPLES_KEPT_MS).await?;
        Ok(true)
    }

    /// The space samples of the last `period_ms`, oldest first.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn space_history(&self, period_ms: i64) -> Result<Vec<crate::meta::SpaceSample>> {
        Ok(self.meta.space_samples(self.clock.now_ms() - period_ms).await?)
    }

    /// The collector's state: queues, outbox, the last passes, the sweep's and the scrub's
    /// progress and findings. A review due for longer than an hour counts as overdue.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn gc_status(&self) -> Result<GcStatus> {
        let now = self.clock.now_ms();
        let idle_before = now.saturating_sub(self.policy.upload_expire_after_ms);
        Ok(self.meta.gc_status(now, super::fsck::OVERDUE_MS, idle_before).await?)
    }

    /// What [`Registry::collect`] would collect now, without changing anything: the same
    /// reviews, carried out in a transaction that is rolled back.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn dry_run(&self, max_reviews: u64) -> Result<DryRun> {
        let now = self.clock.now_ms();
        let ((reviews, busy), found) = self.meta.dry_run(now, max_reviews).await?;
        let (blobs, manifests): (Vec<_>, Vec<_>) = found.into_iter().partition(|w| w.kind == "blob");
        let bytes = blobs.iter().map(|b| b.bytes).sum();
        let idle_before = now.saturating_sub(self.policy.upload_expire_after_ms);
        let uploads_expiring = self.meta.idle_uploads(idle_before).await?;
        Ok(DryRun { reviews, busy, manifests, blobs, bytes, uploads_expiring })
    }

    /// Carries out up to `max_reviews` due reviews, removes abandoned upload sessions, then
    /// drains the outbox.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails (what was done so far stays done).
    pub async fn collect(&self, max_reviews: u64) -> Result<GcReport> {
        let started_at = self.clock.now_ms();
        let mut report = GcReport::default();
        while report.reviews < max_reviews {
            let Some(outcome) = self.meta.review_one(self.clock.now_ms()).await? else { break };
            report.reviews += 1;
            match outcome {
                ReviewOutcome::Done(done) => {
                    report.manifests += done.manifests;
                    report.blobs += done.blobs;
                    report.bytes += done.bytes;
                    if !done.subject.is_empty() {
                        let action = if done.blobs > 0 { "collect-blob" } else { "collect-manifest" };
                        tracing::info!(
                            target: crate::telemetry::AUDIT,
                            action,
                            actor = "collector",
                            subject = done.subject,
                            bytes = done.bytes,
                            "audit"
                        );
                    }
                }
                ReviewOutcome::Busy(_) => {
                    report.reviews_postponed += 1;
                }
                ReviewOutcome::Failed { item, error } => {
                    tracing::warn!(gc.kind = item.kind(), gc.item = item.id(), %error, "review failed; retried later");
                    report.review_errors += 1;
                }
            }
        }
        report.uploads_expired = self.expire_uploads().await?;
        let (deleted, failed) = self.drain_outbox().await?;
        report.objects_deleted = deleted;
        report.objects_failed = failed;
        self.metrics.collection(&report);
        if report.manifests + report.blobs + report.uploads_expired + deleted + failed + report.review_errors
            > 0
        {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let record = PassRecord {
                replica: self.instance.to_string(),
                started_at,
                finished_at: self.clock.now_ms(),
                reviews: n(report.reviews),
                manifests: n(report.manifests),
                blobs: n(report.blobs),
                bytes: n(report.bytes),
                uploads_expired: n(report.uploads_expired),
                objects_deleted: n(deleted),
                errors: n(report.review_errors + failed),
            };
            if let Err(e) = self.meta.record_pass(&record).await {
                tracing::warn!(error = %e, "could not record a collection pass");
            }
        }
        Ok(report)
    }

    /// Deletes the storage objects whose rows are gone (idempotent: deleting a missing object
    /// succeeds). A failing key is retried later with a growing pause and never stops the rest.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn drain_outbox(&self) -> Result<(u64, u64)> {
        let (mut deleted, mut failed) = (0, 0);
        loop {
            let keys = self.meta.outbox_due(self.clock.now_ms(), OUTBOX_BATCH).await?;
            if keys.is_empty() {
                return Ok((deleted, failed));
            }
            let outcomes = self.blobs.delete_many(&keys).await;
            let (mut done, mut failing) = (Vec::new(), Vec::new());
            for (key, outcome) in outcomes {
                match outcome {
                    Ok(()) => done.push(key),
                    Err(e) => {
                        tracing::warn!(storage.key = %key, error = %e, "could not delete a collected object; will retry");
                        failing.push(key);
                    }
                }
            }
            self.meta.outbox_settle(&done, &failing, self.clock.now_ms()).await?;
            let progressed = !done.is_empty();
            deleted += done.len() as u64;
            failed += failing.len() as u64;
            if !progressed {
                return Ok((deleted, failed));
            }
        }
    }
}

/// How long space samples are kept.
const SPACE_SAMPLES_KEPT_MS: i64 = 90 * 24 * 3600 * 1000;

/// How often the replica running the sweep samples where the space is.
pub const SPACE_SAMPLE_EVERY_MS: i64 = 3600 * 1000;
