//! Checking metadata against storage (`berth fsck`): every blob row's bytes present with their
//! size (and, with `rehash`, their digest), every reference between rows intact, and the storage
//! objects no row accounts for, and the collector's queues. Read-only (`--repair` is
//! `Registry::repair`, run before the check); safe while Berth serves.

use std::collections::HashSet;

use super::{Registry, Result};
use crate::blob::Chunk;
use crate::meta::Finding;
use crate::oci::Digest;

/// What `fsck` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FsckReport {
    /// Blob rows checked.
    pub blobs_checked: u64,
    /// Their bytes, by the rows.
    pub bytes_checked: u64,
    /// Whether the bytes were re-hashed.
    pub rehashed: bool,
    /// Inconsistencies: data that is missing, wrong, or referenced where it must not be. Any of
    /// these makes the report unclean.
    pub problems: Vec<Finding>,
    /// Things that are not corruption but not as they should be either (a tombstone marked
    /// restorable that cannot be).
    pub warnings: Vec<Finding>,
    /// Storage objects no blob row or upload session accounts for: what a crash between writing
    /// bytes and recording them leaves. Not corruption — reclaimable space.
    pub orphans: Vec<String>,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// What `--repair` did before the check, when asked to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<super::RepairReport>,
}

impl FsckReport {
    /// Whether no problem was found (orphans and warnings do not count).
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Rows read per page.
const PAGE: i64 = 1000;

/// Reviews due longer ago than this are reported: no collector has been running.
pub(super) const OVERDUE_MS: i64 = 3600 * 1000;

impl Registry {
    /// Checks metadata against storage. `progress` is told (blobs done, bytes done) as the pass
    /// goes.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store or storage cannot be read at all.
    pub async fn fsck(&self, rehash: bool, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<FsckReport> {
        let mut report = FsckReport { rehashed: rehash, ..FsckReport::default() };
        // Storage is listed before the rows are read: bytes are written before the rows that
        // name them, so an object listed here either has its row by the time the rows are read,
        // or really is unaccounted for (or its row is still being written: a warning at worst).
        let mut listed = self.blobs.list("blobs/").await?;
        listed.extend(self.blobs.list("uploads/").await?);
        let mut accounted: HashSet<String> = HashSet::new();
        let mut after = 0;
        loop {
            let page = self.meta.blobs_after(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for blob in page {
                report.blobs_checked += 1;
                report.bytes_checked += blob.size as u64;
                if let Some(problem) =
                    self.check_blob(&blob.digest, blob.size as u64, &blob.storage_key, rehash).await?
                {
                    report.problems.push(problem);
                }
                accounted.insert(blob.storage_key);
                progress(report.blobs_checked, report.bytes_checked);
            }
        }
        let sessions = self.meta.upload_storage_keys().await?;
        for key in listed {
            // A session owns its key (filesystem) or everything under its prefix (S3).
            if accounted.contains(&key)
                || sessions.iter().any(|s| key == *s || (s.ends_with('/') && key.starts_with(s.as_str())))
            {
                continue;
            }
            report.orphan_bytes += self.blobs.size(&key).await.unwrap_or(0);
            report.orphans.push(key);
        }
        report.orphans.sort();
        let (problems, warnings) = self.meta.reference_findings().await?;
        report.problems.extend(problems);
        report.problems.extend(self.payload_findings().await?);
        report.warnings.extend(warnings);
        let (problems, warnings) = self.meta.queue_findings(self.clock.now_ms(), OVERDUE_MS).await?;
        report.problems.extend(problems);
        report.warnings.extend(warnings);
        // Each quota's kept usage against a count from scratch (taken under the usage row's lock,
        // so concurrent pushes into the scope cannot make a difference appear).
        for count in self.count_quotas(false).await? {
            if !count.exact() {
                report.problems.push(Finding {
                    kind: "quota-usage",
                    repository: None,
                    subject: count.rule.clone(),
                    detail: format!(
                        "kept usage is {} bytes and {} repositories, a count from scratch finds {} bytes and {} \
                         repositories ({} blobs' link counts differ); `berth fsck --repair` resets it",
                        count.recorded_bytes,
                        count.recorded_repositories,
                        count.counted_bytes,
                        count.counted_repositories,
                        count.blobs_differing
                    ),
                });
            }
        }
        Ok(report)
    }

    /// Checks every live manifest against its own payload, independently of the reference rows
    /// (which a wrong path could have removed with what they named): each blob it names must be
    /// linked in its repository (whose bytes the blob pass checks), each manifest an index lists
    /// must be live there (unless the repository takes sparse indexes). Pages through the
    /// manifests by id; a manifest deleted while it was being checked is passed over.
    async fn payload_findings(&self) -> Result<Vec<Finding>> {
        let mut findings = Vec::new();
        let mut after = 0;
        loop {
            let page = self.meta.live_manifests_after(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for m in page {
                let finding = |kind, detail: String| Finding {
                    kind,
                    repository: Some(m.repository.clone()),
                    subject: m.digest.clone(),
                    detail,
                };
                let parsed = match crate::oci::manifest::parse(&m.payload, Some(&m.media_type)) {
                    Ok(p) => p,
                    Err(e) => {
                        findings.push(finding(
                            "payload-unreadable",
                            format!("its stored payload does not parse: {e}"),
                        ));
                        continue;
                    }
                };
                let blobs: Vec<String> = parsed.blobs.iter().map(|d| d.to_string()).collect();
                let sparse = self.takes_sparse_indexes(&m.repository);
                let children: Vec<String> =
                    if sparse { Vec::new() } else { parsed.children.iter().map(|d| d.to_string()).collect() };
                let (held_blobs, held_children) =
                    self.meta.held_references(m.repository_id, &blobs, &children).await?;
                let missing_blobs: Vec<&String> = blobs.iter().filter(|b| !held_blobs.contains(b)).collect();
                let missing_children: Vec<&String> =
                    children.iter().filter(|c| !held_children.contains(c)).collect();
                if (missing_blobs.is_empty() && missing_children.is_empty())
                    || !self.meta.manifest_is_live(m.id).await?
                {
                    continue;
                }
                for b in missing_blobs {
                    findings.push(finding(
                        "payload-blob-missing",
                        format!("is live and its payload names blob {b}, which the repository does not hold"),
                    ));
                }
                for c in missing_children {
                    findings.push(finding(
                        "payload-child-missing",
                        format!("is live and lists manifest {c}, which is not live in the repository"),
                    ));
                }
            }
        }
        Ok(findings)
    }

    /// Checks one blob's bytes: present, of the recorded size, and (with `rehash`) hashing to
    /// its digest. Missing bytes whose row has gone meanwhile are not a problem (a concurrent
    /// delete).
    pub(super) async fn check_blob(
        &self,
        digest: &str,
        size: u64,
        key: &str,
        rehash: bool,
    ) -> Result<Option<Finding>> {
        let finding = |kind, detail: String| {
            Some(Finding { kind, repository: None, subject: digest.to_string(), detail })
        };
        let stored = match self.blobs.size(key).await {
            Ok(n) => n,
            Err(crate::blob::Error::NotFound(_)) => {
                if !self.meta.storage_key_recorded(key).await? {
                    return Ok(None);
                }
                return Ok(finding("blob-missing", format!("bytes missing from storage (key {key})")));
            }
            Err(e) => return Err(e.into()),
        };
        if stored != size {
            return Ok(finding(
                "blob-size",
                format!("stored object has {stored} bytes, the row says {size} (key {key})"),
            ));
        }
        if rehash {
            let Ok(expected) = Digest::parse(digest) else {
                return Ok(finding("blob-digest", format!("the row's digest `{digest}` does not parse")));
            };
            // The same read-and-hash that checks an upload's digest: one object of `size` bytes.
            let whole = [Chunk::object(key, size)];
            let actual = self.blobs.upload_digest(key, &whole, size, expected.algorithm()).await?;
            if actual != expected {
                return Ok(finding("blob-content", format!("bytes hash to {actual} (key {key})")));
            }
        }
        Ok(None)
    }
}
