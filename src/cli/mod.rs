//! The `berth` command line.

pub mod admin;
mod backup;
mod fsck;
mod import;
mod in_use;
mod progress;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

/// Berth: an OCI container registry where deleting is safe.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about, after_help = GUIDE)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The map of the commands, by what they are for, with one example each.
const GUIDE: &str = "\
Serve:
  berth serve                                    embedded: ./berth-data, 127.0.0.1:5000
  berth serve --config berth.toml                scale-out: PostgreSQL + S3 (docs/deploy.md)

Look:
  berth repos                                    repositories, bytes live and in tombstones
  berth history team/app:latest                  every push, move, delete, restore of a tag
  berth tombstones team/app                      what was deleted, by whom, restorable until

Delete and undo (docs/deleting.md):
  berth delete --dry-run team/app@sha256:...     what it would take and free, or why refused
  berth delete team/app:old                      a tag (REPO:TAG), manifest (REPO@DIGEST), repository
  berth restore team/app@sha256:...              a manifest with its tags, a tag, a repository
  berth restore --since 2h --actor ci-bot --dry-run   every delete they made in that window (bulk)
  berth retention undo 42                        what retention run 42 removed
  berth tags revert team/app:latest --previous   the time machine
  berth repos delete team/app                    a whole repository, restorable
  berth purge sha256:... --reason \"leaked key\"   a blob everywhere, now, for good

Protect what runs:
  kubectl get pods -A -o json | berth in-use kubernetes prod --registry HOST   pin what a cluster runs
  berth in-use list                              every report and what it pins

Check and collect:
  berth fsck --rehash                            metadata against storage; exit 1 if inconsistent
  berth gc run [--dry-run]                       collect what is due now (serve does it too)
  berth gc explain REPO@DIGEST | DIGEST          why it is kept, and when it will go
  berth gc status                                queues, outbox, last passes, sweep, scrub findings
  berth gc space [REPO]                          bytes live, in tombstones, in grace, due; when the rest goes

Back up and restore (docs/backup.md):
  berth backup --to /backups/berth               while serving; copies only keys not there yet
  berth backup verify --from /backups/berth      every file and key as recorded (--rehash: digests)
  berth backup restore --from /backups/berth     into an empty deployment, embedded or PostgreSQL + S3
  berth backup prune --from /backups/berth --keep 7

Move in from the reference registry (docs/migrate.md):
  berth import --from /var/lib/registry          adopt its tags and blobs in place; again to catch up
  berth import --from /var/lib/registry --final  the cut-over run (old registry read-only)

Admin commands talk to http://127.0.0.1:5000 (--url, BERTH_URL; --user, --password) or open a
deployment directly (--config, --data-dir). Add --json for scripts.";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry (embedded SQLite + filesystem under ./berth-data by default).
    Serve(ServeArgs),
    /// List repositories with tag and manifest counts and their bytes live and in tombstones;
    /// delete or restore a whole repository.
    ///
    /// Examples: `berth repos`, `berth repos delete team/app`, `berth repos restore team/app`
    Repos(ReposArgs),
    /// Delete a manifest (REPO@DIGEST), a tag (REPO:TAG) or a repository (REPO); with
    /// --dry-run, say what it would take and free, or why it would be refused.
    ///
    /// Example: `berth delete --dry-run team/app@sha256:…`
    Delete(DeleteArgs),
    /// List the tombstones of a repository: when and by whom deleted, their tags and
    /// referrers, whether and until when they can be restored.
    Tombstones(RepoArgs),
    /// Restore a deleted manifest with its tags (REPO@DIGEST), a deleted tag (REPO:TAG) or a
    /// deleted repository (REPO) — or, with --since/--until/--actor/--run, every delete those
    /// select (a bulk restore; --dry-run first says what would come back and what conflicts).
    ///
    /// Examples: `berth restore team/app@sha256:…`,
    /// `berth restore --since 2026-12-07T09:00:00Z --until 2026-12-07T10:00:00Z --actor ci-bot --dry-run`
    Restore(RestoreArgs),
    /// The recorded bulk restores, or one (`berth restores ID`) with every delete it undid and
    /// every conflict.
    Restores(RestoresArgs),
    /// Show the tag history of a repository or one tag: every push, move, delete, restore
    /// and revert — when, who, from and to.
    ///
    /// Example: `berth history team/app:latest`
    History(TargetArgs),
    /// Tag operations: `berth tags revert REPO:TAG --previous` (the time machine).
    Tags(TagsArgs),
    /// The online collector: `berth gc run` carries out every review that is due and deletes
    /// the collected bytes, then exits (serving replicas also do this every `gc.interval`).
    ///
    /// Example: `berth gc run --config berth.toml`
    Gc(GcArgs),
    /// Check metadata against storage: every blob's bytes present with their size (and digest,
    /// with --rehash), every reference intact; list storage objects nothing accounts for. Exits
    /// 0 when consistent, 1 when not. Read-only; safe while Berth serves.
    ///
    /// Example: `berth fsck --config berth.toml --rehash`
    Fsck(FsckArgs),
    /// Adopt the reference registry's storage (distribution, `registry:2`): its tags, the
    /// manifests they reach and their blobs — the bytes adopted in place, never copied. Run it
    /// while the old registry serves, again (a catch-up that reads only what changed) once it is
    /// read-only, then with --final to cut over. See docs/migrate.md.
    ///
    /// Example: `berth import --from /var/lib/registry --dry-run`
    Import(ImportArgs),
    /// Retention rules: `berth retention run [--dry-run] [--repo PATTERN]` applies them now
    /// (serving replicas also do every `retention.interval`); `berth retention status` shows
    /// the rules and the last runs.
    ///
    /// Example: `berth retention run --dry-run --repo 'team/**'`
    Retention(RetentionArgs),
    /// One core's SHA-256 speed in MB/s: the implementation Berth hashes uploads with, and the
    /// `sha2` crate's portable one — for benchmark records (`OPENSSL_ia32cap` masks CPU
    /// features of the first).
    #[command(hide = true)]
    HashSpeed,
    /// What runs: sources (clusters, deploy systems) report the images they run; while a
    /// report lasts, those manifests are kept by retention and the collector, and an explicit
    /// delete is refused unless an administrator forces it.
    ///
    /// Example: `kubectl get pods -A -o json | berth in-use kubernetes prod --registry registry.example.com`
    InUse(in_use::InUseArgs),
    /// Emergency purge of a blob everywhere: every manifest referencing it is deleted for
    /// good and the bytes are removed now.
    ///
    /// Example: `berth purge sha256:… --reason "leaked credentials"`
    Purge(PurgeArgs),
    /// Pull-through caches (`[[proxy]]`): `berth proxy status` shows each cache's space, hit
    /// ratio, upstream errors and last eviction; `berth proxy evict` runs the eviction now
    /// (serving replicas also do every `gc.sweep_interval`).
    ///
    /// Example: `berth proxy status --url http://127.0.0.1:5000`
    Proxy(ProxyArgs),
    /// Events (`[[events.endpoints]]`): `berth events status` shows each endpoint's lag,
    /// oldest undelivered event, failures and dead letters; `berth events replay` delivers
    /// events again; `berth events dead` lists what an endpoint gave up on; `berth events log`
    /// lists the events as written.
    ///
    /// Example: `berth events replay --endpoint ci --since 2h`
    Events(EventsArgs),
    /// Quotas (`[[quotas]]`): `berth quota status` shows each rule's scope, the bytes and
    /// repositories it holds against the limits, and when the usage was last counted.
    ///
    /// Example: `berth quota status team-a`
    Quota(QuotaArgs),
    /// Backups of the whole deployment, taken while it serves: `berth backup --to DIR|s3://…`
    /// takes one (incremental: keys already there are not copied); `verify`, `restore` (into an
    /// empty deployment of either kind — how to move between them), `list`, `prune`.
    ///
    /// Example: `berth backup --to /backups/berth`, `berth backup restore --from /backups/berth`
    Backup(backup::BackupArgs),
}

/// `berth quota`.
#[derive(Debug, clap::Args)]
pub struct QuotaArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: QuotaAction,
}

/// `berth quota …`.
#[derive(Debug, Subcommand)]
pub enum QuotaAction {
    /// Each rule (or one): its scope, bytes used of the limit, repositories, where it warns.
    Status(QuotaStatusArgs),
}

/// `berth quota status`.
#[derive(Debug, clap::Args)]
pub struct QuotaStatusArgs {
    /// Only this rule.
    pub rule: Option<String>,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth events`.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: EventsAction,
}

/// `berth events …`.
#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// Each endpoint: events pending and the oldest of them (the lag), delivered and given up
    /// in all, dead letters, queued replays, failures in a row and the last error.
    Status(StatusArgs),
    /// Deliver events to an endpoint again (it de-duplicates by event id): every event since a
    /// time, one event, or every dead letter.
    Replay(EventsReplayArgs),
    /// An endpoint's dead letters (events it gave up on), newest first.
    Dead(EventsDeadArgs),
    /// The events as written, oldest first.
    Log(EventsLogArgs),
}

/// `berth events replay`.
#[derive(Debug, clap::Args)]
pub struct EventsReplayArgs {
    /// The endpoint (its `name`).
    #[arg(long)]
    pub endpoint: String,
    /// Every event that happened since this moment: a UTC time, Unix ms, or an age (`2h`).
    #[arg(long, conflicts_with_all = ["id", "dead"])]
    pub since: Option<String>,
    /// One event, by id.
    #[arg(long, conflicts_with = "dead")]
    pub id: Option<i64>,
    /// Every dead letter of the endpoint.
    #[arg(long)]
    pub dead: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth events dead`.
#[derive(Debug, clap::Args)]
pub struct EventsDeadArgs {
    /// The endpoint (its `name`).
    #[arg(long)]
    pub endpoint: String,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth events log`.
#[derive(Debug, clap::Args)]
pub struct EventsLogArgs {
    /// List events after this id.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ProxyAction,
}

/// `berth proxy …`.
#[derive(Debug, Subcommand)]
pub enum ProxyAction {
    /// Each cache: bytes held and its cap, answers by result (hit, miss, revalidated, stale,
    /// error) and the hit ratio, bytes read upstream, the last eviction.
    Status(StatusArgs),
    /// Evict now what each cache should no longer hold (not pulled within
    /// `evict_not_pulled_within`; least recently pulled beyond `max_bytes`).
    Evict(StatusArgs),
}

/// `berth repos`.
#[derive(Debug, clap::Args)]
pub struct ReposArgs {
    /// What to do with a repository; without one, list them.
    #[command(subcommand)]
    pub action: Option<ReposAction>,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth repos …`.
#[derive(Debug, Subcommand)]
pub enum ReposAction {
    /// Show one repository.
    Show(RepoArgs),
    /// Delete a repository: everything in it becomes a restorable tombstone.
    Delete(RepoDeleteArgs),
    /// Restore a deleted repository with its tags.
    Restore(RepoRestoreArgs),
}

/// A command on one repository.
#[derive(Debug, clap::Args)]
pub struct RepoArgs {
    /// The repository.
    pub repo: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth repos delete`.
#[derive(Debug, clap::Args)]
pub struct RepoDeleteArgs {
    /// The repository.
    pub repo: String,
    /// Only say what would be deleted and freed.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete it even while an in-use report pins one of its manifests.
    #[arg(long, conflicts_with = "dry_run")]
    pub force: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth repos restore`.
#[derive(Debug, clap::Args)]
pub struct RepoRestoreArgs {
    /// The repository.
    pub repo: String,
    /// Move tags pushed again since the delete back to what the delete took.
    #[arg(long)]
    pub take_tags: bool,
    /// Restore even if it takes a quota's scope past its limit.
    #[arg(long)]
    pub force: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// A command on a target: REPO, REPO:TAG or REPO@DIGEST.
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// REPO, REPO:TAG or REPO@DIGEST.
    pub target: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// REPO@DIGEST, REPO:TAG or REPO.
    pub target: String,
    /// Only say what would be deleted and freed, or why it would be refused.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete even what an in-use report pins (needs `admin` on the repository).
    #[arg(long, conflicts_with = "dry_run")]
    pub force: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// REPO@DIGEST, REPO:TAG or REPO; none for a bulk restore.
    #[arg(required_unless_present_any = ["since", "until", "actor", "run"])]
    pub target: Option<String>,
    /// Move tags pushed again since the delete back to what the delete took.
    #[arg(long)]
    pub take_tags: bool,
    /// Restore even if it takes a quota's scope past its limit.
    #[arg(long, requires = "target")]
    pub force: bool,
    /// Bulk: deletes made at or after this moment (a UTC time, Unix ms, or a duration ago: 2h).
    #[arg(long, conflicts_with = "target")]
    pub since: Option<String>,
    /// Bulk: deletes made before this moment [default: now].
    #[arg(long, conflicts_with = "target")]
    pub until: Option<String>,
    /// Bulk: deletes made by this actor (a user, `retention:RULE`, `local:USER`).
    #[arg(long, conflicts_with = "target")]
    pub actor: Option<String>,
    /// Bulk: deletes made by this retention run (as `berth retention undo` does).
    #[arg(long, conflicts_with = "target")]
    pub run: Option<i64>,
    /// Bulk: only repositories matching this pattern (`*` within a path segment, `**` across).
    #[arg(long, conflicts_with = "target")]
    pub repos: Option<String>,
    /// Bulk: change nothing; list what would come back and what would conflict.
    #[arg(long, conflicts_with = "target")]
    pub dry_run: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth restores`.
#[derive(Debug, clap::Args)]
pub struct RestoresArgs {
    /// A bulk restore's id: show it with every delete it undid.
    pub id: Option<i64>,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth tags`.
#[derive(Debug, clap::Args)]
pub struct TagsArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: TagsAction,
}

/// `berth tags …`.
#[derive(Debug, Subcommand)]
pub enum TagsAction {
    /// Put a tag back where it pointed: at a digest, at a time, or one step back — while that
    /// manifest is still held.
    Revert(RevertArgs),
    /// Lift an immutable tag's protection for one move or delete (recorded in its history with
    /// the reason); it lapses unused after --for.
    Unlock(UnlockArgs),
}

/// `berth tags unlock`.
#[derive(Debug, clap::Args)]
pub struct UnlockArgs {
    /// REPO:TAG.
    pub target: String,
    /// Why (recorded in the tag history).
    #[arg(long)]
    pub reason: String,
    /// How long the lift lasts if unused.
    #[arg(long = "for", default_value = "1h")]
    pub for_: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth retention`.
#[derive(Debug, clap::Args)]
pub struct RetentionArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: RetentionAction,
}

/// `berth retention …`.
#[derive(Debug, Subcommand)]
pub enum RetentionAction {
    /// Apply the retention rules now: remove the tags (and old untagged manifests) they select,
    /// each a restorable delete credited to `retention:<rule>`.
    Run(RetentionRunArgs),
    /// The rules, the schedule and the last runs (with their ids).
    Status(StatusArgs),
    /// Undo a run: restore exactly what run RUN_ID removed (a bulk restore of its deletes), each
    /// as a single restore would; tags pushed again since are conflicts unless --take-tags.
    Undo(RetentionUndoArgs),
}

/// `berth retention undo`.
#[derive(Debug, clap::Args)]
pub struct RetentionUndoArgs {
    /// The run's id (`berth retention status` lists them).
    pub run: i64,
    /// Change nothing; list what would come back and what would conflict.
    #[arg(long)]
    pub dry_run: bool,
    /// Move tags pushed again since the run back.
    #[arg(long)]
    pub take_tags: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth retention run`.
#[derive(Debug, clap::Args)]
pub struct RetentionRunArgs {
    /// Change nothing: list what would go, by which rule, and the bytes it would free once the
    /// collector has run.
    #[arg(long)]
    pub dry_run: bool,
    /// Only repositories matching this pattern (`*` within a path segment, `**` across).
    #[arg(long)]
    pub repo: Option<String>,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth tags revert`.
#[derive(Debug, clap::Args)]
pub struct RevertArgs {
    /// REPO:TAG.
    pub target: String,
    /// The digest to point the tag at.
    #[arg(long)]
    pub to: Option<String>,
    /// Where the tag pointed at this time (2026-11-30T21:00:00Z, or Unix milliseconds).
    #[arg(long)]
    pub at: Option<String>,
    /// Where the tag pointed before its latest move.
    #[arg(long)]
    pub previous: bool,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: GcAction,
}

/// `berth gc …`.
#[derive(Debug, Subcommand)]
pub enum GcAction {
    /// One pass over everything due now, then exit.
    Run(GcRunArgs),
    /// Why a manifest (REPO@DIGEST) or a blob (DIGEST) is kept: every hold, when each ends,
    /// and when the collector will take it if nothing changes.
    ///
    /// Example: `berth gc explain team/app@sha256:…`
    Explain(GcExplainArgs),
    /// The collector's state: queue depth by kind, overdue reviews, the outbox, the last passes,
    /// the sweep's and the scrub's progress, and what the scrub found.
    Status(StatusArgs),
    /// Where the space goes: bytes live, held by tombstones, in grace, due for reclaim, and when
    /// the rest becomes reclaimable — for a repository (with what it alone holds) or all.
    ///
    /// Example: `berth gc space team/app`
    Space(GcSpaceArgs),
}

/// `berth gc space`.
#[derive(Debug, clap::Args)]
pub struct GcSpaceArgs {
    /// A repository; without one, the whole registry.
    pub repo: Option<String>,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth gc status`, `berth retention status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth gc explain`.
#[derive(Debug, clap::Args)]
pub struct GcExplainArgs {
    /// `REPO@DIGEST` for a manifest, `DIGEST` for a blob.
    pub target: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// `berth gc run`.
#[derive(Debug, clap::Args)]
pub struct GcRunArgs {
    /// List what a pass would collect now and the bytes it would free, changing nothing (the
    /// pass's own reviews in a transaction that is rolled back).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Common settings (the deployment to collect).
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth fsck`.
#[derive(Debug, clap::Args)]
pub struct FsckArgs {
    /// Also read every blob and check it hashes to its digest.
    #[arg(long)]
    pub rehash: bool,
    /// First repair what is safe to repair: drop queue entries that are wrong, queue rows the
    /// collector missed, delete storage objects no row accounts for that are older than
    /// gc.blob_grace. Never deletes anything a manifest references.
    #[arg(long)]
    pub repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Common settings (the deployment to check).
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The reference registry's storage: its root directory (`storage.filesystem.rootdirectory`)
    /// or `s3://BUCKET/ROOT` (`storage.s3.rootdirectory` in that bucket, read with Berth's S3
    /// endpoint and credentials).
    #[arg(long, required_unless_present = "list")]
    pub from: Option<String>,
    /// Count what a run would do — tags, manifests, blobs and bytes — changing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also import manifests no tag reaches (kept as untagged manifests, under gc.untagged_grace).
    #[arg(long)]
    pub untagged: bool,
    /// The cut-over run (the old registry stopped or read-only): afterwards the storage is
    /// marked as Berth's, which stops the old registry's garbage-collect, and `berth serve`
    /// starts without --allow-unfinished-import.
    #[arg(long = "final", conflicts_with = "dry_run")]
    pub cut_over: bool,
    /// List the imports recorded and whether each cut over.
    #[arg(long, conflicts_with_all = ["from", "dry_run", "untagged", "cut_over"])]
    pub list: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Common settings (the deployment to import into).
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `berth purge`.
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    /// The blob's digest.
    pub digest: String,
    /// Why (recorded; restore refusals show it).
    #[arg(long)]
    pub reason: String,
    /// How to reach Berth.
    #[command(flatten)]
    pub conn: admin::Connection,
}

/// Settings shared by commands that open the registry.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded deployment's data [default: ./berth-data] [env: BERTH_DATA_DIR]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log filter: a level (error, warn, info, debug, trace) or target=level list, e.g.
    /// `berth=debug,sqlx=warn` [default: info] [env: BERTH_LOG_LEVEL, then RUST_LOG]
    #[arg(long)]
    pub log_level: Option<String>,
}

/// `berth serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Common settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on; port 0 picks a free port [default: 127.0.0.1:5000] [env:
    /// BERTH_LISTEN]
    #[arg(long)]
    pub listen: Option<String>,
    /// Write the bound address to this file once the server accepts connections.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Serve although an import has not cut over, or its source lost the marker that stops the
    /// reference registry's garbage-collect (it may still write to, or collect from, the storage
    /// Berth adopted blobs from).
    #[arg(long, env = "BERTH_ALLOW_UNFINISHED_IMPORT")]
    pub allow_unfinished_import: bool,
}

impl CommonArgs {
    /// Loads the configuration these arguments point at.
    ///
    /// # Errors
    /// A configuration error that says where the bad value is.
    pub fn load(&self, listen: Option<String>) -> anyhow::Result<Config> {
        let overrides =
            Overrides { listen, data_dir: self.data_dir.clone(), log_level: self.log_level.clone() };
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever stopped the command, for `main` to print.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    use crate::admin::AdminRequest as Req;
    use crate::registry::DeleteTarget;
    let repo = |name: &str| crate::oci::RepoName::parse(name).map_err(|m| anyhow::anyhow!("`{name}`: {m}"));
    let (conn, request) = match cli.command {
        Command::Serve(args) => return serve(args).await,
        Command::Fsck(args) => return fsck::run(args).await,
        Command::Backup(backup::BackupArgs { action: Some(backup::BackupAction::Status(a)), .. }) => {
            (a.conn, Req::Backups)
        }
        Command::Backup(args) => return backup::run(args).await,
        Command::Import(args) => return import::run(args).await,
        Command::InUse(args) => return in_use::run(args).await,
        Command::HashSpeed => {
            println!("{}", hash_speed());
            return Ok(());
        }
        Command::Gc(GcArgs { action: GcAction::Run(args) }) => return gc_run(args).await,
        Command::Repos(ReposArgs { action: None, conn }) => {
            (conn, Req::Repositories { last: None, n: 100_000 })
        }
        Command::Repos(ReposArgs { action: Some(action), .. }) => match action {
            ReposAction::Show(a) => (a.conn, Req::Repository(repo(&a.repo)?)),
            ReposAction::Delete(a) => {
                let target = DeleteTarget::Repository(repo(&a.repo)?);
                let request = match (a.dry_run, a.force) {
                    (true, _) => Req::Preview(target),
                    (false, true) => Req::ForceDelete(target),
                    (false, false) => Req::Delete(target),
                };
                (a.conn, request)
            }
            ReposAction::Restore(a) => (
                a.conn,
                Req::Restore {
                    target: DeleteTarget::Repository(repo(&a.repo)?),
                    take_tags: a.take_tags,
                    force: a.force,
                },
            ),
        },
        Command::Delete(a) => {
            let target = admin::target(&a.target)?;
            let request = match (a.dry_run, a.force, &target) {
                (true, ..) => Req::Preview(target),
                (false, true, DeleteTarget::Manifest(..) | DeleteTarget::Repository(_)) => {
                    Req::ForceDelete(target)
                }
                (false, ..) => Req::Delete(target),
            };
            (a.conn, request)
        }
        Command::Tombstones(a) => (a.conn, Req::Tombstones(repo(&a.repo)?)),
        Command::Restore(a) => match &a.target {
            Some(target) => (
                a.conn,
                Req::Restore { target: admin::target(target)?, take_tags: a.take_tags, force: a.force },
            ),
            None => {
                let moment = |flag: &str, v: &Option<String>| {
                    v.as_deref()
                        .map(|t| crate::time::parse_moment(t).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
                        .transpose()
                };
                let selection = crate::registry::Selection {
                    repositories: a
                        .repos
                        .as_deref()
                        .map(|p| {
                            crate::auth::Pattern::parse(p).map_err(|e| anyhow::anyhow!("--repos `{p}`: {e}"))
                        })
                        .transpose()?,
                    since: moment("since", &a.since)?,
                    until: moment("until", &a.until)?,
                    actor: a.actor.clone(),
                    run: a.run,
                };
                (a.conn, Req::BulkRestore { selection, take_tags: a.take_tags, dry_run: a.dry_run })
            }
        },
        Command::Restores(a) => match a.id {
            Some(id) => (a.conn, Req::BulkRestoreRecord(id)),
            None => (a.conn, Req::BulkRestores),
        },
        Command::History(a) => match admin::target(&a.target)? {
            DeleteTarget::Repository(r) => (a.conn, Req::History(r, None)),
            DeleteTarget::Tag(r, t) => (a.conn, Req::History(r, Some(t))),
            DeleteTarget::Manifest(..) => anyhow::bail!("history is kept per tag: give REPO or REPO:TAG"),
        },
        Command::Tags(TagsArgs { action: TagsAction::Revert(a) }) => {
            let DeleteTarget::Tag(repo, tag) = admin::target(&a.target)? else {
                anyhow::bail!("`{}`: give REPO:TAG", a.target);
            };
            let to = admin::revert_to(a.to.as_deref(), a.at.as_deref(), a.previous)?;
            (a.conn, Req::Revert { repo, tag, to })
        }
        Command::Gc(GcArgs { action: GcAction::Status(a) }) => (a.conn, Req::GcStatus),
        Command::Proxy(ProxyArgs { action: ProxyAction::Status(a) }) => (a.conn, Req::ProxyStatus),
        Command::Proxy(ProxyArgs { action: ProxyAction::Evict(a) }) => (a.conn, Req::ProxyEvict),
        Command::Gc(GcArgs { action: GcAction::Space(a) }) => {
            let target = a.repo.as_deref().map(repo).transpose()?;
            (a.conn, Req::Space(target))
        }
        Command::Gc(GcArgs { action: GcAction::Explain(a) }) => {
            let target =
                crate::registry::ExplainTarget::parse(&a.target).map_err(|m| anyhow::anyhow!("{m}"))?;
            (a.conn, Req::Explain(target))
        }
        Command::Tags(TagsArgs { action: TagsAction::Unlock(a) }) => {
            let DeleteTarget::Tag(repo, tag) = admin::target(&a.target)? else {
                anyhow::bail!("`{}`: give REPO:TAG", a.target);
            };
            let period = crate::config::parse_duration(&a.for_).map_err(|e| anyhow::anyhow!("--for: {e}"))?;
            let for_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
            (a.conn, Req::Unlock { repo, tag, for_ms, reason: a.reason })
        }
        Command::Retention(RetentionArgs { action: RetentionAction::Run(a) }) => {
            let only = a
                .repo
                .as_deref()
                .map(|p| crate::auth::Pattern::parse(p).map_err(|e| anyhow::anyhow!("--repo `{p}`: {e}")))
                .transpose()?;
            (a.conn, Req::RetentionRun { dry_run: a.dry_run, only })
        }
        Command::Retention(RetentionArgs { action: RetentionAction::Status(a) }) => {
            (a.conn, Req::RetentionStatus)
        }
        Command::Retention(RetentionArgs { action: RetentionAction::Undo(a) }) => {
            let selection = crate::registry::Selection { run: Some(a.run), ..Default::default() };
            (a.conn, Req::BulkRestore { selection, take_tags: a.take_tags, dry_run: a.dry_run })
        }
        Command::Events(EventsArgs { action: EventsAction::Status(a) }) => (a.conn, Req::EventsStatus),
        Command::Quota(QuotaArgs { action: QuotaAction::Status(a) }) => (a.conn, Req::QuotaStatus(a.rule)),
        Command::Events(EventsArgs { action: EventsAction::Log(a) }) => {
            (a.conn, Req::EventsLog { after: a.after, n: a.limit.clamp(1, 10_000) })
        }
        Command::Events(EventsArgs { action: EventsAction::Dead(a) }) => {
            (a.conn, Req::DeadLetters { endpoint: a.endpoint, n: a.limit.clamp(1, 10_000) })
        }
        Command::Events(EventsArgs { action: EventsAction::Replay(a) }) => {
            let selection = match (a.since.as_deref(), a.id, a.dead) {
                (Some(since), None, false) => crate::admin::Replay::Since(
                    crate::time::parse_moment(since).map_err(|e| anyhow::anyhow!("--since: {e}"))?,
                ),
                (None, Some(id), false) => crate::admin::Replay::Id(id),
                (None, None, true) => crate::admin::Replay::Dead,
                _ => anyhow::bail!("give one of --since TIME, --id ID or --dead"),
            };
            (a.conn, Req::ReplayEvents { endpoint: a.endpoint, selection })
        }
        Command::Purge(a) => {
            let digest =
                crate::oci::Digest::parse(&a.digest).map_err(|e| anyhow::anyhow!("`{}`: {e}", a.digest))?;
            (a.conn, Req::Purge { digest, reason: a.reason })
        }
    };
    admin::run(&conn, request).await
}

/// MB/s of Berth's SHA-256 and SHA-512 and of the `sha2` crate's, each over 512 MiB on this
/// thread.
fn hash_speed() -> serde_json::Value {
    use sha2::Digest as _;
    let block = vec![0x5au8; 1 << 20];
    let rate = |hash: &mut dyn FnMut(&[u8])| {
        let start = std::time::Instant::now();
        for _ in 0..512 {
            hash(&block);
        }
        512.0 * 1.048_576 / start.elapsed().as_secs_f64()
    };
    let mut berth = crate::oci::sha256::Sha256::default();
    let berth_rate = rate(&mut |b| berth.update(b));
    let mut crate_hasher = sha2::Sha256::new();
    let crate_rate = rate(&mut |b| crate_hasher.update(b));
    std::hint::black_box((berth.finish(), crate_hasher.finalize()));
    let mut berth512 = crate::oci::ContentHasher::new(crate::oci::Algorithm::Sha512);
    let berth512_rate = rate(&mut |b| berth512.update(b));
    let mut crate512 = sha2::Sha512::new();
    let crate512_rate = rate(&mut |b| crate512.update(b));
    std::hint::black_box((berth512.finish(), crate512.finalize()));
    serde_json::json!({
        "berth_sha256_MBps": berth_rate.round(),
        "sha2_crate_MBps": crate_rate.round(),
        "berth_sha512_MBps": berth512_rate.round(),
        "sha2_crate_sha512_MBps": crate512_rate.round(),
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.common.load(args.listen.clone())?;
    crate::telemetry::init(&config.log_level, config.log_json);
    crate::memory::tune_allocator();
    // Bind first: a port in use stops Berth before it creates or opens anything.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let app = crate::app::App::open(&config).await?;
    if !args.allow_unfinished_import {
        import::refuse_live_sources(&app.registry, &config).await?;
    }
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, data_dir = %config.data_dir.display(), "berth is serving");
    if let Some(path) = &args.ready_file {
        std::fs::write(path, addr.to_string())?;
    }
    crate::server::serve(listener, app, crate::server::shutdown_signal()).await?;
    tracing::info!("berth stopped");
    Ok(())
}

async fn gc_run(args: GcRunArgs) -> anyhow::Result<()> {
    let config = args.common.load(None)?;
    let app = crate::app::App::open(&config).await?;
    if args.dry_run {
        let plan = app.registry.dry_run(u64::MAX).await.map_err(|e| anyhow::anyhow!("{e}"));
        app.registry.meta().close().await;
        let plan = plan?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            for item in plan.manifests.iter().chain(&plan.blobs) {
                println!("would collect {} {} ({} bytes)", item.kind, item.subject, item.bytes);
            }
            println!(
                "a pass now would review {}, collect {} manifests and {} blobs, free {} bytes, and remove {} abandoned upload sessions",
                plan.reviews,
                plan.manifests.len(),
                plan.blobs.len(),
                plan.bytes,
                plan.uploads_expiring
            );
            if plan.busy > 0 {
                println!("{} items were being changed by other writers and were not reviewed", plan.busy);
            }
        }
        return Ok(());
    }
    let mut total = crate::registry::GcReport::default();
    let shown = progress::Progress::start();
    // Until nothing is due: each pass may make more due (a collected manifest's blobs).
    loop {
        let r = app.registry.collect(1000).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let progressed = r.reviews > 0;
        total.add(&r);
        shown.update(|| {
            format!(
                "{} reviewed, {} manifests and {} blobs ({} MiB) collected",
                total.reviews,
                total.manifests,
                total.blobs,
                total.bytes / (1024 * 1024)
            )
        });
        if !progressed {
            break;
        }
    }
    shown.finish(&format!("reviewed {}", total.reviews));
    app.registry.meta().close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&total)?);
    } else {
        println!(
            "reviewed {}, collected {} manifests and {} blobs ({} bytes), expired {} upload sessions; deleted {} objects{}",
            total.reviews,
            total.manifests,
            total.blobs,
            total.bytes,
            total.uploads_expired,
            total.objects_deleted,
            if total.objects_failed > 0 {
                format!(", {} deletes to retry", total.objects_failed)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
