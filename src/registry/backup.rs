//! Taking a backup of the whole deployment while it serves, and restoring one into an empty
//! deployment of either kind (docs/backup.md).
//!
//! A backup takes a hold on the outbox first, then reads the metadata at one snapshot, then
//! copies every storage key that snapshot names. The hold keeps the outbox from deleting keys
//! queued after it was taken — so none the snapshot names can go while they are copied — and
//! lapses if the backup stops renewing it. `backup.json` is written last, once every key is in
//! the location and the hold never lapsed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures_util::StreamExt as _;

use super::Registry;
use crate::backup::catalog::{check_file, find_backup, key_lines};
use crate::backup::format::{self, LinesWriter};
use crate::backup::location::{backup_path, object_path};
use crate::backup::{Amount, BackupRecord, KeyLine, KeysRecord, Location, SourceRecord};
use crate::blob::{BlobStore, Placed};
use crate::meta::{BACKED_UP, BackupOutcome, Cell, MetaStore, Snapshot};

/// How a backup runs.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Keys copied at once.
    pub jobs: usize,
    /// Continue the newest incomplete backup in the location (its id, the keys it copied).
    pub resume: bool,
    /// At most this many bytes a second copied (`None`: as fast as it goes).
    pub max_rate: Option<u64>,
    /// How long the hold lasts unless renewed (it is renewed every quarter of it).
    pub lease: Duration,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions { jobs: 8, resume: false, max_rate: None, lease: Duration::from_secs(30) }
    }
}

/// Where a backup or restore stands.
#[derive(Debug, Clone, Default)]
pub struct BackupProgress {
    /// `tables`, `keys` or `load`.
    pub phase: &'static str,
    /// Tables written (or loaded) so far.
    pub tables: usize,
    /// Rows written (or loaded) so far.
    pub rows: u64,
    /// Keys handled so far (copied or found present) and their bytes.
    pub done: Amount,
    /// Keys the snapshot names and their bytes (known once the key list is written).
    pub total: Amount,
    /// Of `done`, copied (the rest were present).
    pub copied: Amount,
}

/// Paces copies to a rate.
struct Pace {
    started: Instant,
    bytes: AtomicU64,
    rate: Option<u64>,
}

impl Pace {
    async fn after(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = Duration::from_secs_f64(total as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A new backup id: the time to the millisecond, then a random suffix (ids sort by time).
fn new_id(now_ms: i64) -> String {
    let time = crate::time::utc_millis(now_ms).replace(['-', ':'], "");
    format!("{time}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// The incomplete backup of `location` to resume: the newest, if it is newer than every
/// complete one (an older one would rank below a backup it may be newer than).
async fn resumable(location: &Location) -> anyhow::Result<Option<String>> {
    let newest = crate::backup::catalog::list(location).await?.into_iter().next_back();
    Ok(newest.filter(|b| b.record.is_none()).map(|b| b.id))
}

impl Registry {
    /// Takes a backup into `location` while the registry serves: see the module's description.
    ///
    /// # Errors
    /// When the metadata, storage or the location fail, a key the snapshot names is missing
    /// from storage, or the hold lapsed; the backup then stays incomplete (no `backup.json`).
    pub async fn backup(
        &self,
        location: &Location,
        options: &BackupOptions,
        progress: &(dyn Fn(&BackupProgress) + Sync),
    ) -> anyhow::Result<BackupRecord> {
        let started_at = self.clock.now_ms();
        let id = match options.resume.then_some(resumable(location).await?).flatten() {
            Some(id) => {
                if self.meta.backup_running(&id, started_at).await? {
                    bail!(
                        "backup {id} is running in another process (its hold on the outbox is live); if that process \
                         died, its hold lapses within its --hold-lease: resume then"
                    );
                }
                id
            }
            None => {
                if options.resume {
                    tracing::info!("nothing to resume in {}: taking a new backup", location.name());
                }
                new_id(started_at)
            }
        };
        self.meta.backup_started(&id, &location.name(), started_at).await?;
        let outcome = self.backup_recorded(location, &id, started_at, options, progress).await;
        let finished = match &outcome {
            Ok(r) => BackupOutcome {
                keys: r.keys.file.rows as i64,
                bytes: r.keys.total_bytes as i64,
                keys_copied: r.copied.keys as i64,
                bytes_copied: r.copied.bytes as i64,
                error: None,
            },
            Err(e) => BackupOutcome { error: Some(format!("{e:#}")), ..Default::default() },
        };
        if let Err(e) = self.meta.backup_finished(&id, &finished, self.clock.now_ms()).await {
            tracing::warn!(backup = %id, error = %e, "could not record how the backup ended");
        }
        outcome
    }

    /// [`Registry::backup`] once its run is recorded: hold, snapshot, copy, `backup.json`.
    async fn backup_recorded(
        &self,
        location: &Location,
        id: &str,
        started_at: i64,
        options: &BackupOptions,
        progress: &(dyn Fn(&BackupProgress) + Sync),
    ) -> anyhow::Result<BackupRecord> {
        let lease_ms = i64::try_from(options.lease.as_millis()).unwrap_or(i64::MAX);
        // A hold per attempt: a resumed backup's dead attempt keeps its own until it lapses.
        let hold = format!("{id}/{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        self.meta.hold_outbox(&hold, self.instance(), self.clock.now_ms(), lease_ms).await?;
        let lapsed = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (meta, clock, hold, lapsed) =
                (self.meta.clone(), self.clock.clone(), hold.clone(), lapsed.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(u64::try_from(lease_ms / 4).unwrap_or(1000)))
                        .await;
                    match meta.renew_hold(&hold, clock.now_ms(), lease_ms).await {
                        Ok(true) => {}
                        Ok(false) => {
                            lapsed.store(true, Ordering::SeqCst);
                            return;
                        }
                        // A failed renewal is tried again; the lease covers a few.
                        Err(e) => {
                            tracing::warn!(backup = %hold, error = %e, "could not renew the backup's hold")
                        }
                    }
                }
            })
        };
        let outcome = self.backup_held(location, id, started_at, options, progress, &lapsed).await;
        renewer.abort();
        // A hold that cannot be renewed now has lapsed at some point: keys may have gone.
        let held = match &outcome {
            Ok(_) => {
                !lapsed.load(Ordering::SeqCst)
                    && self.meta.renew_hold(&hold, self.clock.now_ms(), lease_ms).await?
            }
            Err(_) => false,
        };
        let outcome = match outcome {
            Ok(_) if !held => Err(anyhow!(
                "the backup's hold on the outbox lapsed (it was not renewed in time): keys may be missing; run it again"
            )),
            Ok(record) => {
                // Everything the record names is durable before the record, and the record after.
                let json = serde_json::to_vec_pretty(&record)?;
                location.flush().await?;
                location.put(&backup_path(id, "backup.json"), json.into()).await?;
                location.flush().await?;
                Ok(record)
            }
            Err(e) => Err(e),
        };
        // A hold not released lapses by itself.
        if let Err(e) = self.meta.release_hold(&hold).await {
            tracing::warn!(backup = %hold, error = %e, "could not release the backup's hold; it lapses");
        }
        outcome
    }

    /// The newest `limit` backups recorded in this deployment, newest first.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn backup_runs(&self, limit: i64) -> super::Result<Vec<crate::meta::BackupRun>> {
        Ok(self.meta.backup_runs(limit).await?)
    }

    async fn backup_held(
        &self,
        location: &Location,
        id: &str,
        started_at: i64,
        options: &BackupOptions,
        progress: &(dyn Fn(&BackupProgress) + Sync),
        lapsed: &AtomicBool,
    ) -> anyhow::Result<BackupRecord> {
        let mut shown = BackupProgress { phase: "tables", ..Default::default() };
        // Before the snapshot starts: whatever was acknowledged before this moment is in it.
        let snapshot_at = self.clock.now_ms();
        let mut snapshot = self.meta.snapshot().await?;
        let schema_level = snapshot.schema_level().await?;
        let mut tables = Vec::new();
        for table in BACKED_UP {
            let file = backup_path(id, &format!("tables/{}.jsonl.gz", table.name));
            let columns = snapshot.columns(table.name).await?;
            let mut writer = LinesWriter::new(file.clone(), location.writer(&file).await?);
            writer.header(&serde_json::json!({ "table": table.name, "columns": columns }))?;
            let select = Snapshot::select(table.name, &columns);
            let mut rows = snapshot.rows(&select);
            while let Some(row) = rows.next().await {
                writer.row(&format::encode_row(&row?)).await?;
                shown.rows += 1;
                if shown.rows.is_multiple_of(10_000) {
                    progress(&shown);
                }
            }
            drop(rows);
            let mut record = writer.finish(table.name).await?;
            record.file = format!("tables/{}.jsonl.gz", table.name);
            tables.push(record);
            shown.tables += 1;
            progress(&shown);
        }
        let keys_file = backup_path(id, "keys.jsonl.gz");
        let mut writer = LinesWriter::new(keys_file.clone(), location.writer(&keys_file).await?);
        writer.header(&serde_json::json!({ "keys": ["key", "size", "digest"] }))?;
        let mut total = Amount::default();
        let mut keys = snapshot.keys();
        while let Some(key) = keys.next().await {
            let (key, size, digest) = key?;
            let size = u64::try_from(size).unwrap_or(0);
            writer.row(&format::encode_key(&KeyLine { key, size, digest })).await?;
            total.keys += 1;
            total.bytes += size;
        }
        drop(keys);
        snapshot.close().await;
        let mut keys_record = writer.finish("keys").await?;
        keys_record.file = "keys.jsonl.gz".into();
        self.meta.backup_snapshot_taken(id, snapshot_at).await?;
        shown.phase = "keys";
        shown.total = total;
        progress(&shown);

        let (copied, present) = self.copy_keys(location, id, options, &mut shown, progress, lapsed).await?;
        let (metadata, storage) = match self.meta.dialect() {
            crate::meta::Dialect::Sqlite => ("sqlite", self.blobs.describe()),
            crate::meta::Dialect::Postgres => ("postgres", self.blobs.describe()),
        };
        Ok(BackupRecord {
            format: format::FORMAT,
            id: id.to_string(),
            berth_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at,
            snapshot_at,
            finished_at: self.clock.now_ms(),
            source: SourceRecord { metadata: metadata.to_string(), storage },
            schema_level,
            tables,
            keys: KeysRecord { file: keys_record, total_bytes: total.bytes },
            copied,
            present,
        })
    }

    /// Copies every key of the backup's key list not yet in the location; returns what was
    /// copied and what was present.
    async fn copy_keys(
        &self,
        location: &Location,
        id: &str,
        options: &BackupOptions,
        shown: &mut BackupProgress,
        progress: &(dyn Fn(&BackupProgress) + Sync),
        lapsed: &AtomicBool,
    ) -> anyhow::Result<(Amount, Amount)> {
        let pace = Pace { started: Instant::now(), bytes: AtomicU64::new(0), rate: options.max_rate };
        let mut copied = Amount::default();
        let mut present = Amount::default();
        let lines = key_lines(location, &backup_path(id, "keys.jsonl.gz")).await?;
        let mut results = lines
            .map(|line| {
                let pace = &pace;
                async move {
                    let line = line?;
                    if lapsed.load(Ordering::SeqCst) {
                        bail!("the backup's hold on the outbox lapsed");
                    }
                    let target = object_path(&line.key);
                    if location.size(&target).await? == Some(line.size) {
                        return Ok((line.size, false));
                    }
                    let body = match self.blobs.read(&line.key, None).await {
                        Ok(body) => body,
                        Err(crate::blob::Error::NotFound(_)) => bail!(
                            "storage key {} ({}) named by the snapshot is missing from storage: run `berth fsck`",
                            line.key,
                            line.digest
                        ),
                        Err(e) => return Err(e.into()),
                    };
                    location.put_stream(&target, line.size, body).await.with_context(|| format!("copying {}", line.key))?;
                    pace.after(line.size).await;
                    Ok((line.size, true))
                }
            })
            .buffer_unordered(options.jobs.max(1));
        let mut last = Instant::now();
        while let Some(result) = results.next().await {
            let (size, was_copied) = result?;
            let slot = if was_copied { &mut copied } else { &mut present };
            slot.keys += 1;
            slot.bytes += size;
            shown.done.keys += 1;
            shown.done.bytes += size;
            shown.copied = copied;
            if last.elapsed() >= Duration::from_millis(500) {
                last = Instant::now();
                progress(shown);
            }
        }
        progress(shown);
        Ok((copied, present))
    }
}

/// Rows loaded per batch, at most.
const LOAD_BATCH_ROWS: usize = 1000;
/// Bytes of cells loaded per batch, about at most.
const LOAD_BATCH_BYTES: usize = 16 * 1024 * 1024;

fn cell_bytes(cell: &Cell) -> usize {
    match cell {
        Cell::Text(t) => t.len(),
        Cell::Bytes(b) => b.len(),
        _ => 8,
    }
}

/// Whether `key` can be a storage key: relative, no `.` or `..` segment, nothing empty — a key
/// list from a damaged or hostile location must not name a place outside the storage.
fn is_storage_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && !key.contains('\\')
        && key.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The backup restored.
    pub id: String,
    /// Its snapshot's time.
    pub snapshot_at: i64,
    /// Rows loaded per table.
    pub tables: Vec<(String, u64)>,
    /// Keys hard-linked from the backup (same filesystem).
    pub linked: Amount,
    /// Keys copied inside the bucket by the object store.
    pub copied_in_store: Amount,
    /// Keys whose bytes were written through Berth.
    pub written: Amount,
    /// Keys already in storage with their size (a resumed restore).
    pub present: Amount,
}

/// How a restore runs.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The backup to restore (`None`: the newest complete one).
    pub id: Option<String>,
    /// Keys placed at once.
    pub jobs: usize,
    /// Accept objects in storage already (a restore that stopped before loading the metadata).
    pub resume: bool,
}

/// Restores backup `options.id` (or the newest) of `location` into the deployment of `meta` and
/// `blobs`, which must be empty: places every key (linked or copied inside the bucket where
/// storage can, else written), then loads the metadata in one transaction. The caller runs fsck.
///
/// # Errors
/// When the deployment is not empty, the backup is from a later Berth or damaged, or a part
/// fails.
pub async fn restore_backup(
    meta: &MetaStore,
    blobs: &BlobStore,
    location: &Location,
    options: &RestoreOptions,
    progress: &(dyn Fn(&BackupProgress) + Sync),
) -> anyhow::Result<RestoreReport> {
    let record = find_backup(location, options.id.as_deref()).await?;
    if record.schema_level > meta.known_schema_level() {
        bail!(
            "backup {} was taken at schema level {}; this Berth knows up to {}: restore it with that Berth or a later one",
            record.id,
            record.schema_level,
            meta.known_schema_level()
        );
    }
    if let Some(why) = meta.not_empty().await? {
        bail!("refusing to restore into a deployment that is not empty: {why}");
    }
    if !options.resume && !blobs.list_page("", 1).await?.is_empty() {
        bail!(
            "refusing to restore into storage that holds objects ({}); restore into empty storage, or pass --resume \
             to finish a restore that stopped before loading the metadata",
            blobs.describe()
        );
    }
    let mut shown = BackupProgress {
        phase: "keys",
        total: Amount { keys: record.keys.file.rows, bytes: record.keys.total_bytes },
        ..Default::default()
    };
    progress(&shown);
    let mut report = RestoreReport {
        id: record.id.clone(),
        snapshot_at: record.snapshot_at,
        tables: Vec::new(),
        linked: Amount::default(),
        copied_in_store: Amount::default(),
        written: Amount::default(),
        present: Amount::default(),
    };
    // The key list as recorded, before anything is placed: a damaged list would place too few.
    if let Some(problem) = check_file(location, &record.id, &record.keys.file).await? {
        bail!("the backup's key list is not as recorded ({problem}): run `berth backup verify`");
    }
    let lines = key_lines(location, &backup_path(&record.id, &record.keys.file.file)).await?;
    let mut placed = lines
        .map(|line| async move {
            let line = line?;
            if !is_storage_key(&line.key) {
                bail!("the key list names `{}`, which is not a storage key", line.key);
            }
            match blobs.size(&line.key).await {
                Ok(size) if size == line.size => return Ok((line.size, None)),
                Ok(_) => blobs.delete(&line.key).await?,
                Err(crate::blob::Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let rel = object_path(&line.key);
            match location.size(&rel).await? {
                Some(size) if size == line.size => {}
                Some(size) => bail!(
                    "{rel} holds {size} bytes, the backup names {}: run `berth backup verify`",
                    line.size
                ),
                None => bail!("{rel} is missing from the backup: run `berth backup verify`"),
            }
            let how =
                blobs.place(&line.key, line.size, &location.origin_of(&rel), location.get(&rel)).await?;
            anyhow::Ok((line.size, Some(how)))
        })
        .buffer_unordered(options.jobs.max(1));
    let mut last = Instant::now();
    while let Some(result) = placed.next().await {
        let (size, how) = result?;
        let slot = match how {
            None => &mut report.present,
            Some(Placed::Linked) => &mut report.linked,
            Some(Placed::CopiedInStore) => &mut report.copied_in_store,
            Some(Placed::Written) => &mut report.written,
        };
        slot.keys += 1;
        slot.bytes += size;
        shown.done.keys += 1;
        shown.done.bytes += size;
        if last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            progress(&shown);
        }
    }
    drop(placed);
    shown.phase = "load";
    progress(&shown);
    let mut loader = match meta.loader().await? {
        Ok(loader) => loader,
        Err(why) => bail!("refusing to load the metadata: the deployment is no longer empty: {why}"),
    };
    if let Some(unknown) = record.tables.iter().find(|t| !BACKED_UP.iter().any(|b| b.name == t.name)) {
        bail!(
            "backup {} holds table `{}`, which this Berth does not know: it is from a later Berth",
            record.id,
            unknown.name
        );
    }
    // In this Berth's load order (references point backwards); a table the backup lacks (one
    // added since it was taken) stays empty.
    for spec in BACKED_UP {
        let Some(table) = record.tables.iter().find(|t| t.name == spec.name) else { continue };
        let path = backup_path(&record.id, &table.file);
        let mut reader = format::open_lines(location, &path).await?;
        let header = reader.next().await?.ok_or_else(|| anyhow!("{path}: empty"))?;
        let columns: Vec<String> = serde_json::from_value(header["columns"].clone())
            .with_context(|| format!("{path}: the header names no columns"))?;
        let mut batch: Vec<Vec<Cell>> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut rows = 0u64;
        while let Some(line) = reader.next().await? {
            let row = format::decode_row(line).map_err(|e| anyhow!("{path}: {e}"))?;
            batch_bytes += row.iter().map(cell_bytes).sum::<usize>();
            batch.push(row);
            rows += 1;
            // Bounded by rows and by bytes (manifest payloads run to megabytes).
            if batch.len() == LOAD_BATCH_ROWS || batch_bytes >= LOAD_BATCH_BYTES {
                shown.rows += batch.len() as u64;
                loader.insert(spec, &columns, std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
                progress(&shown);
            }
        }
        let stored = reader.stored();
        if stored != (table.bytes, table.sha256.clone()) || rows != table.rows {
            bail!(
                "{path} is not the file the backup recorded (size, digest or rows differ): run `berth backup verify`"
            );
        }
        shown.rows += batch.len() as u64;
        loader.insert(spec, &columns, batch).await?;
        report.tables.push((table.name.clone(), rows));
        shown.tables += 1;
        progress(&shown);
    }
    loader.finish().await?;
    meta.analyze().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_keys_inside_storage_are_storage_keys() {
        for good in ["blobs/sha256/ab/abcd/1", "blobs/0f/x", "docker/registry/v2/blobs/sha256/ab/abcd/data"] {
            assert!(is_storage_key(good), "{good}");
        }
        for bad in ["", "/etc/passwd", "blobs/../../x", "blobs//x", "./blobs/x", "blobs\\x", "blobs/x/"] {
            assert!(!is_storage_key(bad), "{bad}");
        }
    }

    #[test]
    fn ids_sort_by_time() {
        let (a, b) = (new_id(1_765_161_000_000), new_id(1_765_161_000_001));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20251208T023000.000Z-"), "{a}");
    }
}
