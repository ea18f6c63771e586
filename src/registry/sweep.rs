//! The safety net beside the review queue, in small throttled steps that resume where the last
//! one stopped (on any replica):
//!
//! * the **storage sweep** walks every stored object in key order and sends to the outbox those
//!   older than `blob_grace` that no blob row, upload session or outbox entry accounts for —
//!   what a crash between writing bytes and recording them leaves; and it puts back on the queue
//!   rows that nothing holds and no review is pending for;
//! * the **scrub** re-hashes stored blobs at a pace that covers all of them once per
//!   `scrub_period`, and re-runs the reference checks at the start of each pass, recording what
//!   it finds (bit rot, out-of-band deletes) for `fsck`, status and logs.
//!
//! Neither takes a lock a push waits for: the sweep's outbox insert re-checks in one statement,
//! the scrub only reads.

use super::{Registry, Result};
use crate::blob::Listed;
use crate::meta::{BLOB_FINDINGS, Finding, reference_kinds};

/// Objects listed per sweep step (one listing request on S3).
const SWEEP_PAGE: usize = 1000;
/// Rows looked at per sweep step, of each kind.
const ROW_PAGE: i64 = 1000;

/// What one sweep step did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Storage objects looked at.
    pub objects_listed: u64,
    /// Objects no row accounts for, sent to the outbox.
    pub orphans: u64,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// Rows looked at.
    pub rows_listed: u64,
    /// Rows put back on the review queue.
    pub rows_requeued: u64,
    /// Whether the walk over storage reached the end (the next step starts over).
    pub storage_pass_finished: bool,
}

/// What one scrub step did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScrubReport {
    /// Blobs re-hashed.
    pub blobs_checked: u64,
    /// Their bytes.
    pub bytes_checked: u64,
    /// What was found wrong in this step.
    pub problems: Vec<Finding>,
    /// Whether the pass reached the last blob (the next step starts over).
    pub pass_finished: bool,
}

impl Registry {
    /// One step of the storage sweep: the next page of stored objects, and the next page of
    /// blob and manifest rows.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when storage or the metadata store fails (the step is repeated
    /// next time).
    pub async fn sweep_step(&self) -> Result<SweepReport> {
        let now = self.clock.now_ms();
        let mut report = SweepReport::default();

        let mut storage = self.meta.progress("sweep-storage", now).await?;
        let page = self.blobs.list_page(&storage.resume_after, SWEEP_PAGE).await?;
        report.objects_listed = page.len() as u64;
        (report.orphans, report.orphan_bytes) = self.send_orphans_to_outbox(&page, now).await?;
        match page.last().filter(|_| page.len() == SWEEP_PAGE).and_then(|last| walk_on_after(&last.key)) {
            Some(key) => storage.resume_after = key,
            None => {
                storage.resume_after.clear();
                storage.passes += 1;
                storage.pass_started_at = now;
                report.storage_pass_finished = true;
            }
        }
        storage.step_at = now;
        self.meta.save_progress("sweep-storage", &storage).await?;

        for name in ["sweep-blob-rows", "sweep-manifest-rows"] {
            let mut rows = self.meta.progress(name, now).await?;
            let after = rows.resume_after.parse().unwrap_or(0);
            let step = if name == "sweep-blob-rows" {
                self.meta.requeue_blobs(after, ROW_PAGE, now).await?
            } else {
                self.meta.requeue_manifests(after, ROW_PAGE, now).await?
            };
            if step.enqueued > 0 {
                tracing::warn!(
                    rows = step.enqueued,
                    pass = name,
                    "sweep: rows the review queue had missed are queued again"
                );
            }
            report.rows_listed += step.looked_at;
            report.rows_requeued += step.enqueued;
            match step.last_id {
                Some(id) => rows.resume_after = id.to_string(),
                None => {
                    rows.resume_after.clear();
                    rows.passes += 1;
                    rows.pass_started_at = now;
                }
            }
            rows.step_at = now;
            self.meta.save_progress(name, &rows).await?;
        }
        Ok(report)
    }

    /// One step of the scrub: re-hashes blobs from where the last step stopped, at a pace that
    /// reads every stored byte once per `period_ms`. The time since the last step earns credit
    /// (stored bytes × elapsed ÷ period), and a blob is read only when the credit covers it, so a
    /// large blob waits until enough time has passed rather than being read at every step. The
    /// credit is capped at what `max_elapsed_ms` earns (or the next blob, if larger), so a replica
    /// back after a long pause does not hash for hours.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when storage or the metadata store fails.
    pub async fn scrub_step(&self, period_ms: i64, max_elapsed_ms: i64) -> Result<ScrubReport> {
        let now = self.clock.now_ms();
        let mut report = ScrubReport::default();
        let mut p = self.meta.progress("scrub", now).await?;
        if p.resume_after.is_empty() && p.credit == 0 {
            // A new pass: its pace is set by what is stored now; the reference checks run once.
            p.pass_started_at = now;
            p.pass_total = self.meta.stored_bytes().await?;
            let (problems, _) = self.meta.reference_findings().await?;
            for problem in &problems {
                tracing::error!(kind = problem.kind, subject = %problem.subject, detail = %problem.detail, "scrub: broken reference");
            }
            self.meta.replace_reference_findings(&reference_kinds(), &problems, now).await?;
            report.problems.extend(problems);
        }
        let earned =
            |ms: i64| (i128::from(p.pass_total) * i128::from(ms) / i128::from(period_ms.max(1))) as i64;
        let elapsed =
            if p.step_at == 0 { max_elapsed_ms } else { (now - p.step_at).clamp(0, max_elapsed_ms) };
        let mut after: i64 = p.resume_after.parse().unwrap_or(0);
        let mut credit = p.credit.saturating_add(earned(elapsed));
        let mut finished = false;
        let mut first = true;
        'pages: loop {
            let page = self.meta.blobs_after(after, 100).await?;
            if page.is_empty() {
                finished = true;
                break;
            }
            for blob in page {
                if first {
                    credit = credit.min(earned(max_elapsed_ms).max(blob.size));
                    first = false;
                }
                if blob.size > credit {
                    break 'pages;
                }
                credit -= blob.size;
                after = blob.id;
                report.blobs_checked += 1;
                report.bytes_checked += blob.size as u64;
                match self.check_blob(&blob.digest, blob.size as u64, &blob.storage_key, true).await? {
                    Some(problem) => {
                        tracing::error!(kind = problem.kind, blob = %problem.subject, detail = %problem.detail, "scrub: stored blob is not sound");
                        self.meta.record_finding(&problem, now).await?;
                        report.problems.push(problem);
                    }
                    None => self.meta.clear_findings(&blob.digest, &BLOB_FINDINGS).await?,
                }
            }
        }
        if finished {
            // What this pass did not find again has been mended (or its blob is gone).
            self.meta.forget_findings_before(&BLOB_FINDINGS, p.pass_started_at).await?;
            p.resume_after.clear();
            p.passes += 1;
            credit = 0;
            report.pass_finished = true;
        } else {
            p.resume_after = after.to_string();
        }
        p.credit = credit.max(0);
        p.step_at = now;
        self.meta.save_progress("scrub", &p).await?;
        Ok(report)
    }
}

/// What `fsck --repair` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// Outbox entries removed because a blob row still uses their key.
    pub outbox_entries_dropped: u64,
    /// Reviews removed because their row is gone.
    pub stale_reviews_dropped: u64,
    /// Rows nothing holds put back on the review queue.
    pub rows_requeued: u64,
    /// Storage objects older than `blob_grace` that no row accounts for, deleted.
    pub orphans_removed: u64,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// Outbox deletes that failed (retried by the collector).
    pub objects_failed: u64,
    /// Quota rules whose kept usage differed from a count from scratch, and was reset to it.
    pub quotas_reset: Vec<String>,
}

impl Registry {
    /// Repairs what is safe to repair, all at once: queue entries that are wrong, rows the
    /// queue missed, and storage objects no row accounts for that are older than `blob_grace`
    /// (younger ones may still be on their way to being recorded). Never touches anything a row
    /// references.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when storage or the metadata store fails.
    pub async fn repair(&self) -> Result<RepairReport> {
        let mut report = RepairReport::default();
        (report.outbox_entries_dropped, report.stale_reviews_dropped) = self.meta.repair_queues().await?;
        report.quotas_reset =
            self.count_quotas(true).await?.into_iter().filter(|c| !c.exact()).map(|c| c.rule).collect();
        let now = self.clock.now_ms();
        for blobs in [true, false] {
            let mut after = 0;
            loop {
                let step = if blobs {
                    self.meta.requeue_blobs(after, ROW_PAGE, now).await?
                } else {
                    self.meta.requeue_manifests(after, ROW_PAGE, now).await?
                };
                report.rows_requeued += step.enqueued;
                let Some(last) = step.last_id else { break };
                after = last;
            }
        }
        let mut after = String::new();
        loop {
            let page = self.blobs.list_page(&after, SWEEP_PAGE).await?;
            let (n, bytes) = self.send_orphans_to_outbox(&page, now).await?;
            report.orphans_removed += n;
            report.orphan_bytes += bytes;
            match page.last() {
                Some(last) if page.len() == SWEEP_PAGE => after = last.key.clone(),
                _ => break,
            }
        }
        report.objects_failed = self.drain_outbox().await?.1;
        Ok(report)
    }

    /// Sends to the outbox the objects of `page` older than `blob_grace` that no blob row, upload
    /// session or outbox entry accounts for; returns how many and their bytes.
    async fn send_orphans_to_outbox(&self, page: &[Listed], now: i64) -> Result<(u64, u64)> {
        // Age is judged by the store's own clock, against `blob_grace`: far longer than any write
        // takes to be recorded (a filesystem blob's time is its publication, see `blob::fs`).
        let grace = self.meta.windows().blob_hold_ms();
        let old: Vec<&Listed> =
            page.iter().filter(|o| is_berths(&o.key) && o.modified_ms.saturating_add(grace) <= now).collect();
        let keys: Vec<String> = old.iter().map(|o| o.key.clone()).collect();
        let known = self.meta.keys_accounted_for(&keys).await?;
        let (mut count, mut bytes) = (0, 0);
        for object in old.into_iter().filter(|o| !known.contains(&o.key)) {
            // Claimed and still there (an object its own outbox entry deleted between the listing
            // and the claim is not counted: deleting it again is harmless).
            if self.meta.orphan_to_outbox(&object.key, now).await?
                && !matches!(self.blobs.size(&object.key).await, Err(crate::blob::Error::NotFound(_)))
            {
                // Warned: only a crash, a bug or a hand-made change leaves such an object.
                tracing::warn!(storage.key = %object.key, bytes = object.size, modified_ms = object.modified_ms, "object without a row goes");
                count += 1;
                bytes += object.size;
            }
        }
        Ok((count, bytes))
    }
}

/// Where the walk goes on after `key`: from there if it is one of Berth's keys, else from the
/// next of Berth's prefixes — so a tree Berth never writes (the rest of a shared bucket, the
/// reference registry's tree an import adopted blobs from) costs one page, not a walk through
/// it. `None`: nothing of Berth's comes after.
fn walk_on_after(key: &str) -> Option<String> {
    if is_berths(key) {
        Some(key.to_string())
    } else if key < "blobs/" {
        Some("blobs/".into())
    } else if key < "uploads/" {
        Some("uploads/".into())
    } else {
        None
    }
}

/// Whether `key` is under one of the prefixes Berth writes (anything else in a shared bucket is
/// not the sweep's business).
fn is_berths(key: &str) -> bool {
    key.starts_with("blobs/") || key.starts_with("uploads/")
}

#[cfg(test)]
mod tests {
    use super::walk_on_after;

    #[test]
    fn the_walk_skips_what_berth_never_writes() {
        assert_eq!(walk_on_after("blobs/sha256/ab/x").as_deref(), Some("blobs/sha256/ab/x"));
        assert_eq!(walk_on_after("a-shared-file").as_deref(), Some("blobs/"));
        assert_eq!(walk_on_after("blobs.txt").as_deref(), Some("blobs/"));
        assert_eq!(
            walk_on_after("dist/docker/registry/v2/blobs/sha256/ab/x/data").as_deref(),
            Some("uploads/")
        );
        assert_eq!(walk_on_after("uploads/u1").as_deref(), Some("uploads/u1"));
        assert_eq!(walk_on_after("zzz/old"), None);
        // Nothing Berth writes sorts between a skipped key and where the walk goes on.
        assert!("blobs.txt" < "blobs/" && "blobs/\u{10ffff}" < "blobsz" && "blobsz" < "uploads/");
    }
}
