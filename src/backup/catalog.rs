//! What a backup location holds: the backups in it, checking one against its record
//! (`berth backup verify`), and removing the ones no longer kept (`berth backup prune`).

use std::collections::HashSet;

use anyhow::{Context as _, anyhow, bail};
use futures_util::{StreamExt as _, TryStreamExt as _};
use sha2::{Digest as _, Sha256};

use super::format::{self, LinesReader};
use super::location::{backup_path, object_path};
use super::{BackupRecord, FileRecord, KeyLine, Location};

/// A stream of key-list lines.
pub type KeyStream = futures_util::stream::BoxStream<'static, anyhow::Result<KeyLine>>;

/// The lines of the key list at `path`, as a stream (the header checked and skipped).
///
/// # Errors
/// When the list cannot be opened or is empty.
pub async fn key_lines(location: &Location, path: &str) -> anyhow::Result<KeyStream> {
    let mut reader = format::open_lines(location, path).await?;
    reader.next().await?.ok_or_else(|| anyhow!("{path}: empty"))?;
    let path = path.to_string();
    Ok(futures_util::stream::try_unfold(
        (reader, path),
        |(mut reader, path): (LinesReader, String)| async move {
            match reader.next().await? {
                Some(line) => {
                    let key = format::decode_key(&line).map_err(|e| anyhow!("{path}: {e}"))?;
                    Ok(Some((key, (reader, path))))
                }
                None => Ok(None),
            }
        },
    )
    .boxed())
}

/// A backup found in a location.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// Its id.
    pub id: String,
    /// Its record, when complete.
    pub record: Option<BackupRecord>,
}

/// Every backup in `location`, oldest first: complete ones with their records.
///
/// # Errors
/// When the location fails or a `backup.json` is malformed.
pub async fn list(location: &Location) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for id in location.children("backups").await? {
        let record = match location.get_bytes(&backup_path(&id, "backup.json")).await {
            Ok(bytes) => Some(
                serde_json::from_slice::<BackupRecord>(&bytes)
                    .with_context(|| format!("backups/{id}/backup.json"))?,
            ),
            Err(super::location::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        out.push(Listed { id, record });
    }
    Ok(out)
}

/// The backup `id` (or the newest complete one) of `location`.
///
/// # Errors
/// When there is none, or its format is not one this Berth reads.
pub async fn find_backup(location: &Location, id: Option<&str>) -> anyhow::Result<BackupRecord> {
    let mut complete: Vec<BackupRecord> =
        list(location).await?.into_iter().filter_map(|l| l.record).collect();
    // By snapshot: a resumed backup keeps its first attempt's id but has a later snapshot.
    complete.sort_by_key(|r| (r.snapshot_at, r.id.clone()));
    let mut complete = complete.into_iter();
    let record = match id {
        Some(id) => complete.into_iter().find(|r| r.id == id).ok_or_else(|| {
            anyhow!(
                "no complete backup `{id}` in {} (one without backup.json is incomplete)",
                location.name()
            )
        })?,
        None => complete.next_back().ok_or_else(|| anyhow!("no complete backup in {}", location.name()))?,
    };
    if record.format != format::FORMAT {
        bail!(
            "backup {} is in format {}; this Berth reads format {}",
            record.id,
            record.format,
            format::FORMAT
        );
    }
    Ok(record)
}

/// What `berth backup verify` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// The backup checked.
    pub id: String,
    /// Files checked (tables and the key list).
    pub files: usize,
    /// Keys checked.
    pub keys: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether the keys' bytes were hashed.
    pub rehashed: bool,
    /// Every problem found; none means the backup is whole.
    pub problems: Vec<String>,
}

/// Checks backup `id` (or the newest) of `location`: every file as recorded (size, SHA-256,
/// rows), every key present with its size — and, with `rehash`, its digest.
///
/// # Errors
/// When the location cannot be read; what is wrong with the backup is in the report.
pub async fn verify(
    location: &Location,
    id: Option<&str>,
    rehash: bool,
    jobs: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> anyhow::Result<VerifyReport> {
    let record = find_backup(location, id).await?;
    let mut report = VerifyReport { id: record.id.clone(), rehashed: rehash, ..Default::default() };
    for file in record.tables.iter().chain(std::iter::once(&record.keys.file)) {
        report.files += 1;
        if let Some(problem) = check_file(location, &record.id, file).await? {
            report.problems.push(problem);
        }
    }
    let keys = match key_lines(location, &backup_path(&record.id, &record.keys.file.file)).await {
        Ok(keys) => keys,
        Err(e) => {
            report.problems.push(format!("the key list cannot be read: {e:#}"));
            return Ok(report);
        }
    };
    let mut checked = keys
        .map(|line| async move {
            let line = line?;
            let problem = check_key(location, &line, rehash).await?;
            anyhow::Ok((line.size, problem))
        })
        .buffer_unordered(jobs.max(1));
    while let Some(result) = checked.next().await {
        let (size, problem) = match result {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(format!("{e:#}"));
                break;
            }
        };
        report.keys += 1;
        report.bytes += size;
        if let Some(problem) = problem {
            report.problems.push(problem);
        }
        if report.keys.is_multiple_of(256) {
            progress(report.keys, report.bytes);
        }
    }
    Ok(report)
}

async fn check_key(location: &Location, line: &KeyLine, rehash: bool) -> anyhow::Result<Option<String>> {
    let rel = object_path(&line.key);
    match location.size(&rel).await? {
        None => return Ok(Some(format!("{} ({}) is missing", line.key, line.digest))),
        Some(size) if size != line.size => {
            return Ok(Some(format!("{} ({}) holds {size} bytes, not {}", line.key, line.digest, line.size)));
        }
        Some(_) => {}
    }
    if rehash {
        let Some(expected) = line.digest.strip_prefix("sha256:") else {
            return Ok(Some(format!("{}: digest {} cannot be checked here", line.key, line.digest)));
        };
        let mut body = location.get(&rel).await?;
        let mut sha = Sha256::new();
        while let Some(piece) = body.next().await {
            sha.update(&piece?);
        }
        let got = hex::encode(sha.finalize());
        if got != expected {
            return Ok(Some(format!("{} holds bytes of sha256:{got}, not {}", line.key, line.digest)));
        }
    }
    Ok(None)
}

/// Checks that `file` of backup `id` is as recorded: size, digest and rows; the difference, if
/// any.
///
/// # Errors
/// When the location fails.
pub async fn check_file(location: &Location, id: &str, file: &FileRecord) -> anyhow::Result<Option<String>> {
    let path = backup_path(id, &file.file);
    let mut reader = match format::open_lines(location, &path).await {
        Ok(r) => r,
        Err(format::Error::Location(super::location::Error::NotFound(_))) => {
            return Ok(Some(format!("{path} is missing")));
        }
        Err(e) => return Err(e.into()),
    };
    let mut lines = 0u64;
    loop {
        match reader.next().await {
            Ok(Some(_)) => lines += 1,
            Ok(None) => break,
            Err(e) => return Ok(Some(format!("{path} cannot be read: {e}"))),
        }
    }
    let (bytes, sha256) = reader.stored();
    if bytes != file.bytes || sha256 != file.sha256 {
        return Ok(Some(format!(
            "{path}: {bytes} bytes with SHA-256 {sha256}, recorded {} bytes with {}",
            file.bytes, file.sha256
        )));
    }
    if lines != file.rows + 1 {
        return Ok(Some(format!("{path}: {} rows, recorded {}", lines.saturating_sub(1), file.rows)));
    }
    Ok(None)
}

/// What `berth backup prune` removed (or would).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    /// Backups kept, newest first.
    pub kept: Vec<String>,
    /// Backups removed (complete ones beyond the kept, incomplete ones older than the newest kept).
    pub removed: Vec<String>,
    /// Incomplete backups newer than the newest complete one (maybe running): prune refuses.
    #[serde(skip)]
    left: Vec<String>,
    /// Objects removed: no kept backup names them.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether nothing was removed (a dry run).
    pub dry_run: bool,
}

/// Keeps the newest `keep` complete backups of `location` and removes the rest (and incomplete
/// ones older than the newest complete), then every object no kept backup names. Refused while an
/// incomplete backup newer than every complete one exists: it may be running.
///
/// # Errors
/// When the location fails; `keep` of 0.
pub async fn prune(location: &Location, keep: usize, dry_run: bool) -> anyhow::Result<PruneReport> {
    if keep == 0 {
        bail!("--keep must be at least 1");
    }
    let all = list(location).await?;
    let newest_complete = all.iter().rev().find(|l| l.record.is_some()).map(|l| l.id.clone());
    let mut report = PruneReport { dry_run, ..Default::default() };
    // Complete backups, newest snapshot first.
    let mut complete: Vec<&BackupRecord> = all.iter().filter_map(|l| l.record.as_ref()).collect();
    complete.sort_by_key(|r| std::cmp::Reverse((r.snapshot_at, r.id.clone())));
    for (i, record) in complete.iter().enumerate() {
        if i < keep {
            report.kept.push(record.id.clone());
        } else {
            report.removed.push(record.id.clone());
        }
    }
    for listed in all.iter().rev().filter(|l| l.record.is_none()) {
        if newest_complete.as_ref().is_some_and(|newest| &listed.id < newest) {
            report.removed.push(listed.id.clone());
        } else {
            report.left.push(listed.id.clone());
        }
    }
    if let Some(running) = report.left.first() {
        bail!(
            "backup {running} is incomplete and newer than every complete backup: it may be running, and a prune \
             meanwhile could remove objects it counts on. Let it finish (or `berth backup --resume` it) first"
        );
    }
    let mut named = HashSet::new();
    for record in complete.iter().take(keep) {
        // A kept backup whose key list is not as recorded cannot say what it needs: stop.
        if let Some(problem) = check_file(location, &record.id, &record.keys.file).await? {
            bail!("kept backup {}: {problem}; nothing was removed (run `berth backup verify`)", record.id);
        }
        let id = &record.id;
        let mut keys = key_lines(location, &backup_path(id, "keys.jsonl.gz")).await?;
        while let Some(line) = keys.try_next().await? {
            named.insert(line.key);
        }
    }
    if !dry_run {
        for id in &report.removed {
            let files: Vec<_> = location.list(&format!("backups/{id}")).try_collect().await?;
            // backup.json first: from then on the backup is incomplete, whatever else is left.
            location.delete(&backup_path(id, "backup.json")).await?;
            for file in files {
                location.delete(&file.path).await?;
            }
        }
    }
    let mut objects = location.list("objects");
    while let Some(object) = objects.try_next().await? {
        let key = object.path.strip_prefix("objects/").unwrap_or(&object.path);
        if !named.contains(key) {
            report.objects += 1;
            report.bytes += object.size;
            if !dry_run {
                location.delete(&object.path).await?;
            }
        }
    }
    Ok(report)
}
