//! `berth import`: adopting the reference registry's storage — its tags, the manifests they
//! reach and those manifests' blobs — through the same operations a push uses, with the blob
//! bytes adopted in place instead of copied.
//!
//! A run compares the source's tags with what the previous runs brought over (`import_tags`):
//! a tag whose link was not rewritten since is not read again, so a catch-up after a full
//! pre-import costs one listing per repository plus what changed. Every tag is committed on its
//! own, so an interrupted run continues where it stopped. One bad item (a missing blob, a
//! corrupt manifest) is reported and skipped; the rest goes on.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use futures_util::StreamExt as _;
use serde::Serialize;

use super::{Registry, Result};
use crate::distribution::Source;
use crate::meta::{Adoption, ImportRecord, ImportedTag, TagCondition};
use crate::oci::{Digest, Reference, RepoName, Tag, manifest};

/// The actor import's changes are recorded under.
const ACTOR: &str = "import";

/// A link last written this close (ms) before the previous run started is read again even if
/// its time did not change: object stores keep times to the second, and the source's clock may
/// be a little off ours.
const RECENT_MS: i64 = 60_000;

/// Repositories imported at once.
const REPOSITORY_CONCURRENCY: usize = 4;

/// How a run goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Change nothing; count what a run would do.
    pub dry_run: bool,
    /// Also import manifests no tag reaches (as untagged manifests, under `gc.untagged_grace`).
    pub untagged: bool,
    /// The final run: afterwards mark the source as Berth's and record the cut-over.
    pub cut_over: bool,
}

/// Something a run left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// `REPO:TAG`, `REPO@DIGEST` or `REPO`.
    pub item: String,
    /// Why.
    pub reason: String,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// The source, canonically named.
    pub source: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The first run from this source.
    pub first_run: bool,
    /// This run cut over: the source is marked as Berth's.
    pub cut_over: bool,
    /// Repositories in the source.
    pub repositories: u64,
    /// Tags listed in the source.
    pub tags_listed: u64,
    /// Tags as the previous run left them (not read again unless their link was rewritten).
    pub tags_unchanged: u64,
    /// Tag links read (new, rewritten, or rewritten around the previous run).
    pub links_read: u64,
    /// Tags brought over for the first time (`REPO:TAG`).
    pub tags_new: Vec<String>,
    /// Tags the source moved since the previous run.
    pub tags_moved: Vec<String>,
    /// Tags the source no longer has, removed from Berth.
    pub tags_removed: Vec<String>,
    /// Manifests stored (tagged and untagged, index children included).
    pub manifests_imported: u64,
    /// Blobs adopted in place.
    pub blobs_adopted: u64,
    /// Their bytes.
    pub bytes_adopted: u64,
    /// Blobs Berth already stored, linked into another repository.
    pub blobs_linked: u64,
    /// What was left out, and why.
    pub skipped: Vec<Skipped>,
    /// How long the run took.
    pub elapsed_ms: u64,
}

/// Where a run stands, for a progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportProgress {
    /// Repositories done.
    pub repositories_done: u64,
    /// Repositories in all.
    pub repositories: u64,
    /// Tags listed so far.
    pub tags: u64,
    /// Manifests stored so far.
    pub manifests: u64,
    /// Bytes adopted so far.
    pub bytes: u64,
}

/// One run's shared state.
struct Run<'a> {
    source: &'a Source,
    options: ImportOptions,
    import: ImportRecord,
    report: Mutex<ImportReport>,
    /// What a dry run counted already (it stores nothing, so it remembers here what it would
    /// have stored): `REPO@DIGEST` for manifests, `DIGEST` for blobs.
    counted: Mutex<HashSet<String>>,
}

impl Run<'_> {
    fn report(&self, f: impl FnOnce(&mut ImportReport)) {
        f(&mut self.report.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// In a dry run: whether `key` was counted as done.
    fn counted(&self, key: &str) -> bool {
        self.options.dry_run && self.counted.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    /// In a dry run: counts `key` as done. Returns whether it was not counted before (always
    /// true in a real run) — one check and count, so repositories looked at concurrently count a
    /// shared blob once.
    fn count(&self, key: String) -> bool {
        !self.options.dry_run || self.counted.lock().unwrap_or_else(|p| p.into_inner()).insert(key)
    }

    /// In a dry run: takes back [`Run::count`] of `key` (what it counted failed).
    fn uncount(&self, key: &str) {
        if self.options.dry_run {
            self.counted.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        }
    }

    fn skip(&self, item: String, reason: String) {
        tracing::warn!(item, reason, "import skipped an item");
        self.report(|r| r.skipped.push(Skipped { item, reason }));
    }

    /// Whether the tag must be read again: new, rewritten, or rewritten too close to when the
    /// previous run listed it to tell.
    fn must_read(&self, modified_ms: i64, previous: Option<&ImportedTag>) -> bool {
        match previous {
            None => true,
            Some(p) => {
                p.source_modified != modified_ms
                    || self.import.last_run_started.is_none_or(|at| p.source_modified >= at - RECENT_MS)
            }
        }
    }
}

impl Registry {
    /// Imports what the reference registry's storage `source` holds — see the module's
    /// documentation. `progress` is called as repositories finish.
    ///
    /// # Errors
    /// When the source cannot be adopted from here, or cannot be listed, or the metadata store
    /// fails; single items that fail are reported in [`ImportReport::skipped`].
    pub async fn import(
        &self,
        source: &Source,
        options: ImportOptions,
        progress: &(dyn Fn(ImportProgress) + Sync),
    ) -> Result<ImportReport> {
        self.blobs.check_adoptable(source.root()).map_err(|e| super::Error::Unsupported(e.to_string()))?;
        let started = std::time::Instant::now();
        let now = self.clock.now_ms();
        let import = self.meta.begin_import_run(source.name(), now, options.dry_run).await?;
        let listed = source.repositories().await.map_err(internal)?;
        let mut repositories: BTreeMap<String, bool> = listed.into_iter().map(|r| (r, true)).collect();
        if import.id != 0 {
            for gone in self.meta.imported_repositories(import.id).await? {
                repositories.entry(gone).or_insert(false);
            }
        }
        let run = Run {
            source,
            options,
            report: Mutex::new(ImportReport {
                source: source.name().to_string(),
                dry_run: options.dry_run,
                first_run: import.last_run_started.is_none(),
                repositories: repositories.values().filter(|in_source| **in_source).count() as u64,
                ..ImportReport::default()
            }),
            import,
            counted: Mutex::default(),
        };
        let total = repositories.len() as u64;
        let mut done = 0;
        let mut work = futures_util::stream::iter(repositories)
            .map(|(repo, in_source)| {
                let run = &run;
                async move { self.import_repository(run, &repo, in_source).await }
            })
            .buffer_unordered(REPOSITORY_CONCURRENCY);
        while let Some(outcome) = work.next().await {
            outcome?;
            done += 1;
            let r = run.report.lock().unwrap_or_else(|p| p.into_inner());
            progress(ImportProgress {
                repositories_done: done,
                repositories: total,
                tags: r.tags_listed,
                manifests: r.manifests_imported,
                bytes: r.bytes_adopted,
            });
        }
        drop(work);
        let mut report = run.report.into_inner().unwrap_or_else(|p| p.into_inner());
        if !options.dry_run {
            if options.cut_over {
                source.mark_owned().await.map_err(internal)?;
                report.cut_over = true;
            }
            self.meta.finish_import_run(run.import.id, self.clock.now_ms(), options.cut_over).await?;
        }
        for list in [&mut report.tags_new, &mut report.tags_moved, &mut report.tags_removed] {
            list.sort();
        }
        report.skipped.sort_by(|a, b| a.item.cmp(&b.item));
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            source = %report.source,
            dry_run = report.dry_run,
            cut_over = report.cut_over,
            new = report.tags_new.len(),
            moved = report.tags_moved.len(),
            removed = report.tags_removed.len(),
            blobs_adopted = report.blobs_adopted,
            skipped = report.skipped.len(),
            "import run finished"
        );
        Ok(report)
    }

    /// The imports recorded, oldest first: those not cut over yet are sources the reference
    /// registry may still write to.
    ///
    /// # Errors
    /// When the metadata store fails.
    pub async fn imports(&self) -> Result<Vec<ImportRecord>> {
        Ok(self.meta.imports().await?)
    }

    /// One repository: its tags against what the previous runs brought over.
    async fn import_repository(&self, run: &Run<'_>, name: &str, in_source: bool) -> Result<()> {
        let Ok(repo) = RepoName::parse(name) else {
            if in_source {
                run.skip(name.to_string(), "not a valid repository name".into());
            }
            return Ok(());
        };
        if let Err(e) = self.refuse_cached(&repo) {
            run.skip(name.to_string(), e.to_string());
            return Ok(());
        }
        let listed = if in_source { run.source.tags(name).await.map_err(internal)? } else { Vec::new() };
        let previous: BTreeMap<String, ImportedTag> = if run.import.id == 0 {
            BTreeMap::new()
        } else {
            self.meta
                .imported_tags(run.import.id, name)
                .await?
                .into_iter()
                .map(|t| (t.tag.clone(), t))
                .collect()
        };
        run.report(|r| r.tags_listed += listed.len() as u64);
        let mut present = HashSet::new();
        // What the tags point at: the untagged pass leaves these to the tags (and their reports).
        let mut targets: HashSet<String> = previous.values().map(|t| t.digest.clone()).collect();
        for link in &listed {
            present.insert(link.tag.clone());
            let before = previous.get(&link.tag);
            if !run.must_read(link.modified_ms, before) {
                run.report(|r| r.tags_unchanged += 1);
                continue;
            }
            let item = format!("{name}:{}", link.tag);
            let Ok(tag) = Tag::parse(&link.tag) else {
                run.skip(item, "not a valid tag".into());
                continue;
            };
            run.report(|r| r.links_read += 1);
            let target = match run.source.tag_target(name, &link.tag).await {
                Ok(Some(d)) => d,
                Ok(None) => continue, // deleted since the listing: the next run removes it
                Err(e) => {
                    run.skip(item, e.to_string());
                    continue;
                }
            };
            targets.insert(target.to_string());
            if before.is_some_and(|b| b.digest == target.as_str()) {
                run.report(|r| r.tags_unchanged += 1);
            } else {
                // Moved only if nothing else moved it since the previous run.
                let expected = before.and_then(|b| Digest::parse(&b.digest).ok());
                if let Err(reason) = self.import_tag(run, &repo, &tag, &target, expected.as_ref()).await {
                    run.skip(item, reason);
                    continue;
                }
                run.report(
                    |r| if before.is_some() { r.tags_moved.push(item) } else { r.tags_new.push(item) },
                );
            }
            if !run.options.dry_run {
                let at = link.modified_ms;
                self.meta
                    .record_imported_tag(run.import.id, name, &link.tag, Some(target.as_str()), at)
                    .await?;
            }
        }
        for (tag_name, before) in previous.iter().filter(|(t, _)| !present.contains(*t)) {
            let item = format!("{name}:{tag_name}");
            if !run.options.dry_run {
                let (Ok(tag), Ok(digest)) = (Tag::parse(tag_name), Digest::parse(&before.digest)) else {
                    continue;
                };
                match self.delete_tag(&repo, &tag, TagCondition::IfPointsAt(&digest), Some(ACTOR)).await {
                    Ok(_)
                    | Err(
                        super::Error::TagUnknown(_)
                        | super::Error::ManifestUnknown
                        | super::Error::NameUnknown,
                    ) => {}
                    Err(super::Error::PreconditionFailed(m) | super::Error::Immutable(m)) => {
                        run.skip(item.clone(), format!("gone from the source, but left in Berth: {m}"));
                    }
                    Err(e) => return Err(e),
                }
                self.meta.record_imported_tag(run.import.id, name, tag_name, None, 0).await?;
            }
            run.report(|r| r.tags_removed.push(item));
        }
        if run.options.untagged && in_source {
            for digest in run.source.revisions(name).await.map_err(internal)? {
                if targets.contains(digest.as_str()) {
                    continue;
                }
                if let Err(reason) = self.import_manifest(run, &repo, &digest, None).await {
                    run.skip(format!("{name}@{digest}"), reason);
                }
            }
        }
        Ok(())
    }

    /// Points `tag` at `digest` (imported first, with what it references).
    async fn import_tag(
        &self,
        run: &Run<'_>,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
        expected: Option<&Digest>,
    ) -> std::result::Result<(), String> {
        let outcome = self.import_manifest(run, repo, digest, Some((tag, expected))).await;
        match outcome {
            // The tag already points there (an interrupted run set it and stopped before
            // remembering it): nothing to do.
            Err(e) if e.starts_with(PRECONDITION) => {
                let now_at = self
                    .meta
                    .manifest(repo, &Reference::Tag(tag.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                if now_at.is_some_and(|m| m.digest == digest.as_str()) { Ok(()) } else { Err(e) }
            }
            other => other,
        }
    }

    /// Stores manifest `digest` of `repo` from the source unless Berth has it — its children and
    /// blobs first — and points `tag` at it if given.
    async fn import_manifest(
        &self,
        run: &Run<'_>,
        repo: &RepoName,
        digest: &Digest,
        tag: Option<(&Tag, Option<&Digest>)>,
    ) -> std::result::Result<(), String> {
        let key = format!("manifest {repo}@{digest}");
        if run.counted(&key) {
            return Ok(());
        }
        let existing =
            self.meta.manifest(repo, &Reference::Digest(digest.clone())).await.map_err(|e| e.to_string())?;
        let (bytes, media_type) = match existing {
            Some(_) if tag.is_none() => return Ok(()),
            Some(row) => (row.payload, row.media_type),
            None => {
                let (bytes, parsed) = self.read_source_manifest(run, repo, digest).await?;
                for child in &parsed.children {
                    Box::pin(self.import_manifest(run, repo, child, None))
                        .await
                        .map_err(|e| format!("index child {child}: {e}"))?;
                }
                for blob in &parsed.blobs {
                    self.import_blob(run, repo, blob).await.map_err(|e| format!("blob {blob}: {e}"))?;
                }
                run.report(|r| r.manifests_imported += 1);
                (bytes, parsed.media_type)
            }
        };
        if run.options.dry_run {
            run.count(key);
            return Ok(());
        }
        let (tags, condition) = match tag {
            Some((t, None)) => (vec![t.clone()], TagCondition::IfAbsent),
            Some((t, Some(d))) => (vec![t.clone()], TagCondition::IfPointsAt(d)),
            None => (Vec::new(), TagCondition::Always),
        };
        let reference = Reference::Digest(digest.clone());
        match self
            .put_manifest(repo, &reference, Some(&media_type), &bytes, &tags, condition, Some(ACTOR))
            .await
        {
            Ok(_) => Ok(()),
            Err(super::Error::PreconditionFailed(m)) => Err(format!("{PRECONDITION}{m}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A manifest's bytes from the source, checked: it is a manifest of `repo` there, its bytes
    /// hash to its digest, and Berth can store it.
    async fn read_source_manifest(
        &self,
        run: &Run<'_>,
        repo: &RepoName,
        digest: &Digest,
    ) -> std::result::Result<(Vec<u8>, manifest::ParsedManifest), String> {
        let source = run.source;
        if !source.has_revision(repo.as_str(), digest).await.map_err(|e| e.to_string())? {
            return Err(format!("manifest {digest} was deleted in the source (it has no revision link)"));
        }
        let bytes = source
            .read_blob(digest)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the bytes of manifest {digest} are missing from the source"))?;
        let actual = digest.same_algorithm_of(&bytes);
        if &actual != digest {
            return Err(format!("the bytes of manifest {digest} hash to {actual}: corrupt in the source"));
        }
        let parsed = manifest::parse(&bytes, None).map_err(|e| format!("manifest {digest}: {e}"))?;
        Ok((bytes.to_vec(), parsed))
    }

    /// Makes blob `digest` Berth's and links it into `repo`: linked as is when Berth stores it
    /// already, else adopted in place from the source.
    async fn import_blob(
        &self,
        run: &Run<'_>,
        repo: &RepoName,
        digest: &Digest,
    ) -> std::result::Result<(), String> {
        let err = |e: crate::meta::Error| e.to_string();
        if self.meta.linked_blob(repo, digest).await.map_err(err)?.is_some() {
            return Ok(());
        }
        let (linked, stored) = (format!("blob {repo}@{digest}"), format!("blob {digest}"));
        if run.counted(&linked) {
            return Ok(());
        }
        if self.meta.blob_stored(digest).await.map_err(err)? || !run.count(stored.clone()) {
            if !run.options.dry_run
                && !self.meta.link_stored_blob(repo, digest, self.clock.now_ms()).await.map_err(err)?
            {
                return Box::pin(self.import_blob(run, repo, digest)).await; // collected meanwhile
            }
            run.count(linked);
            run.report(|r| r.blobs_linked += 1);
            return Ok(());
        }
        let size = match run.source.blob_size(digest).await {
            Ok(Some(size)) => size,
            Ok(None) => {
                run.uncount(&stored);
                return Err("missing from the source's blobs".into());
            }
            Err(e) => {
                run.uncount(&stored);
                return Err(e.to_string());
            }
        };
        if run.options.dry_run {
            run.count(linked);
            run.report(|r| {
                r.blobs_adopted += 1;
                r.bytes_adopted += size;
            });
            return Ok(());
        }
        let key = self.blobs.adopt(&run.source.origin(digest), digest).await.map_err(|e| e.to_string())?;
        let size_i64 = i64::try_from(size).map_err(|_| "too large".to_string())?;
        let outcome = self
            .meta
            .adopt_blob(run.import.id, repo, digest, size_i64, &key, self.clock.now_ms())
            .await
            .map_err(err)?;
        match outcome {
            Adoption::Adopted => run.report(|r| {
                r.blobs_adopted += 1;
                r.bytes_adopted += size;
            }),
            Adoption::AlreadyStored => {
                self.blobs.discard_adopted(&key).await;
                run.report(|r| r.blobs_linked += 1);
            }
            Adoption::KeyUsedBefore => {
                return Err("adopted by an earlier run and collected since; it is never adopted twice".into());
            }
        }
        Ok(())
    }
}

/// How a failed tag condition's reason starts.
const PRECONDITION: &str = "the tag changed in Berth since the previous import: ";

fn internal(e: crate::distribution::Error) -> super::Error {
    super::Error::Internal(Box::new(e))
}
