//! `berth backup`: take a backup while Berth serves, check one, restore one into an empty
//! deployment, list and prune the backups of a location (docs/backup.md).

use std::time::Instant;

use crate::backup::Location;
use crate::backup::catalog;
use crate::quota::human_bytes;
use crate::registry::{BackupOptions, BackupProgress, RestoreOptions};

/// `berth backup`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    /// Check, restore, list or prune backups; without one, take a backup (--to).
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    /// Where to write the backup: a directory or s3://BUCKET/PREFIX (reached with the endpoint
    /// and credentials of [storage.s3], else of the environment: AWS_ENDPOINT_URL, …).
    #[arg(long, required = false)]
    pub to: Option<String>,
    /// Continue the newest incomplete backup in the location: the keys it copied are not copied
    /// again (its snapshot is taken anew).
    #[arg(long)]
    pub resume: bool,
    /// Keys copied at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Copy at most this many bytes a second (`50MB`, `1GiB`), to spare the storage serving
    /// clients.
    #[arg(long)]
    pub max_rate: Option<String>,
    /// How long the backup's hold on the outbox outlives this process if it dies (it is
    /// renewed every quarter of it): a `--resume` waits that long for a dead run's hold to lapse.
    #[arg(long, default_value = "30s")]
    pub hold_lease: String,
    /// Print the record (backup.json) as JSON.
    #[arg(long)]
    pub json: bool,
    /// The deployment to back up.
    #[command(flatten)]
    pub common: super::CommonArgs,
}

/// `berth backup …`.
#[derive(Debug, clap::Subcommand)]
pub enum BackupAction {
    /// Check a backup: every file as recorded, every key present with its size (with --rehash,
    /// its digest). Exits 1 when it finds a problem.
    Verify(VerifyArgs),
    /// Restore a backup into an empty deployment — the one the configuration names, embedded or
    /// PostgreSQL + S3 — then check it with fsck.
    Restore(RestoreArgs),
    /// The backups in a location: complete ones with their time, size and what they copied.
    List(LocationArgs),
    /// Keep the newest N complete backups; remove the others and every object no kept backup
    /// names.
    Prune(PruneArgs),
    /// The backups recorded by this deployment (through the admin API, like `berth gc status`):
    /// when, where, how much, and how each ended.
    Status(super::StatusArgs),
}

/// Names a backup location.
#[derive(Debug, clap::Args)]
pub struct LocationArgs {
    /// The location: a directory or s3://BUCKET/PREFIX.
    #[arg(long)]
    pub from: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The deployment (for its S3 endpoint and credentials).
    #[command(flatten)]
    pub common: super::CommonArgs,
}

/// `berth backup verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The location and output.
    #[command(flatten)]
    pub location: LocationArgs,
    /// The backup (default: the newest complete one).
    #[arg(long)]
    pub id: Option<String>,
    /// Also read every key and check it hashes to its digest.
    #[arg(long)]
    pub rehash: bool,
    /// Keys checked at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

/// `berth backup restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The location and output.
    #[command(flatten)]
    pub location: LocationArgs,
    /// The backup (default: the newest complete one).
    #[arg(long)]
    pub id: Option<String>,
    /// Finish a restore that stopped before loading the metadata (storage holds objects).
    #[arg(long)]
    pub resume: bool,
    /// Keys placed at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

/// `berth backup prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The location and output.
    #[command(flatten)]
    pub location: LocationArgs,
    /// How many complete backups to keep (the newest).
    #[arg(long)]
    pub keep: usize,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs `berth backup`.
///
/// # Errors
/// Whatever stopped it; a verify or fsck that found problems exits the process with 1.
pub(super) async fn run(args: BackupArgs) -> anyhow::Result<()> {
    match args.action {
        None => take(args).await,
        Some(BackupAction::Verify(a)) => verify(a).await,
        Some(BackupAction::Restore(a)) => restore(a).await,
        Some(BackupAction::List(a)) => list(a).await,
        Some(BackupAction::Prune(a)) => prune(a).await,
        Some(BackupAction::Status(_)) => unreachable!("answered through the admin API"),
    }
}

fn open_location(args: &LocationArgs) -> anyhow::Result<(crate::config::Config, Location)> {
    let config = args.common.load(None)?;
    let location = Location::open(&args.from, config.storage_s3.as_ref())?;
    Ok((config, location))
}

fn show(p: &BackupProgress, started: Instant) -> String {
    match p.phase {
        "tables" => format!("snapshot: {} tables, {} rows written", p.tables, p.rows),
        "load" => format!("loading the metadata: {} tables, {} rows", p.tables, p.rows),
        _ => {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = p.done.bytes as f64 / secs;
            let left = p.total.bytes.saturating_sub(p.done.bytes) as f64 / rate.max(1.0);
            format!(
                "{}/{} keys, {} of {} ({} copied, {}/s), about {left:.0} s left",
                p.done.keys,
                p.total.keys,
                human_bytes(p.done.bytes as i64),
                human_bytes(p.total.bytes as i64),
                human_bytes(p.copied.bytes as i64),
                human_bytes(rate as i64),
            )
        }
    }
}

fn hold_lease(text: &str) -> anyhow::Result<std::time::Duration> {
    let lease = crate::config::parse_duration(text).map_err(|e| anyhow::anyhow!("--hold-lease: {e}"))?;
    if lease < std::time::Duration::from_secs(1) {
        anyhow::bail!("--hold-lease must be at least 1s");
    }
    Ok(lease)
}

async fn take(args: BackupArgs) -> anyhow::Result<()> {
    let Some(to) = args.to.as_deref() else {
        anyhow::bail!(
            "give --to DIR or --to s3://BUCKET/PREFIX (or a subcommand: verify, restore, list, prune)"
        );
    };
    let config = args.common.load(None)?;
    let location = Location::open(to, config.storage_s3.as_ref())?;
    let max_rate = args
        .max_rate
        .as_deref()
        .map(crate::quota::parse_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--max-rate: {e}"))?;
    let app = crate::app::App::open(&config).await?;
    let options = BackupOptions {
        jobs: args.jobs,
        resume: args.resume,
        max_rate,
        lease: hold_lease(&args.hold_lease)?,
    };
    let shown = super::progress::Progress::start();
    let started = Instant::now();
    let progress = |p: &BackupProgress| {
        shown.update_counted(p.done.keys, p.total.keys, || show(p, started));
    };
    let outcome = app.registry.backup(&location, &options, &progress).await;
    app.registry.meta().close().await;
    let record = outcome?;
    shown.finish(&format!("backup {} complete", record.id));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        let rows: u64 = record.tables.iter().map(|t| t.rows).sum();
        println!(
            "backup {} of {} at snapshot {}\n  metadata: {} tables, {} rows\n  keys: {} ({}): {} copied ({}), {} already there ({})",
            record.id,
            location.name(),
            crate::time::utc_millis(record.snapshot_at),
            record.tables.len(),
            rows,
            record.keys.file.rows,
            human_bytes(record.keys.total_bytes as i64),
            record.copied.keys,
            human_bytes(record.copied.bytes as i64),
            record.present.keys,
            human_bytes(record.present.bytes as i64),
        );
    }
    Ok(())
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let (_, location) = open_location(&args.location)?;
    let shown = super::progress::Progress::start();
    let progress = |keys: u64, bytes: u64| {
        shown.update(|| format!("{keys} keys, {} checked", human_bytes(bytes as i64)))
    };
    let report = catalog::verify(&location, args.id.as_deref(), args.rehash, args.jobs, &progress).await?;
    shown.finish(&format!("checked backup {}", report.id));
    if args.location.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "backup {}: {} files, {} keys ({}){}",
            report.id,
            report.files,
            report.keys,
            human_bytes(report.bytes as i64),
            if report.rehashed { ", every key rehashed" } else { "" }
        );
        if report.problems.is_empty() {
            println!("whole: every file as recorded, every key present");
        }
        for problem in &report.problems {
            println!("PROBLEM: {problem}");
        }
    }
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let (config, location) = open_location(&args.location)?;
    let (meta, blobs) = crate::app::App::open_storage(&config).await?;
    let options = RestoreOptions { id: args.id.clone(), jobs: args.jobs, resume: args.resume };
    let shown = super::progress::Progress::start();
    let started = Instant::now();
    let progress = |p: &BackupProgress| shown.update_counted(p.done.keys, p.total.keys, || show(p, started));
    let outcome = crate::registry::restore_backup(&meta, &blobs, &location, &options, &progress).await;
    meta.close().await;
    let report = outcome?;
    shown.finish(&format!("restored backup {}", report.id));
    // The deployment opened whole, as `berth serve` would, then checked.
    let app = crate::app::App::open(&config).await?;
    let fsck = app.registry.fsck(false, &|_, _| {}).await.map_err(|e| anyhow::anyhow!("{e}"));
    app.registry.meta().close().await;
    let fsck = fsck?;
    if args.location.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "restore": report, "fsck": fsck }))?
        );
    } else {
        let rows: u64 = report.tables.iter().map(|(_, n)| n).sum();
        println!(
            "restored backup {} (snapshot {}): {} tables, {} rows\n  keys: {} linked, {} copied inside the bucket, {} written ({}), {} already there\n  fsck: {}",
            report.id,
            crate::time::utc_millis(report.snapshot_at),
            report.tables.len(),
            rows,
            report.linked.keys,
            report.copied_in_store.keys,
            report.written.keys,
            human_bytes(report.written.bytes as i64),
            report.present.keys,
            if fsck.clean() {
                "clean".to_string()
            } else {
                format!("PROBLEMS: {}", serde_json::to_string(&fsck)?)
            }
        );
    }
    if !fsck.clean() {
        std::process::exit(1);
    }
    Ok(())
}

async fn list(args: LocationArgs) -> anyhow::Result<()> {
    let (_, location) = open_location(&args)?;
    let all = catalog::list(&location).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no backups in {}", location.name());
    }
    for listed in &all {
        match &listed.record {
            Some(r) => println!(
                "{}  complete  snapshot {}  {} keys ({})  copied {} ({})  took {:.1} s",
                r.id,
                crate::time::utc(r.snapshot_at),
                r.keys.file.rows,
                human_bytes(r.keys.total_bytes as i64),
                r.copied.keys,
                human_bytes(r.copied.bytes as i64),
                (r.finished_at - r.started_at) as f64 / 1000.0
            ),
            None => println!("{}  INCOMPLETE (running, or stopped: `berth backup --resume`)", listed.id),
        }
    }
    Ok(())
}

async fn prune(args: PruneArgs) -> anyhow::Result<()> {
    let (_, location) = open_location(&args.location)?;
    let report = catalog::prune(&location, args.keep, args.dry_run).await?;
    if args.location.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let would = if report.dry_run { "would remove" } else { "removed" };
        println!(
            "kept {} backups ({}); {would} {} backups ({}) and {} objects ({})",
            report.kept.len(),
            report.kept.join(", "),
            report.removed.len(),
            report.removed.join(", "),
            report.objects,
            human_bytes(report.bytes as i64)
        );
    }
    Ok(())
}
