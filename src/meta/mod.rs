//! The metadata store: repositories, blobs and their links, manifests, tags, tag history and
//! upload sessions, over SQLite (embedded) or PostgreSQL (scale-out).
//!
//! Split along the data: [`repos`] (repositories), [`blobs`] (blob rows and their links),
//! [`uploads`] (upload sessions), [`manifests`] (manifests and what they reference) and [`tags`]
//! (tags and their history), [`deletes`] and [`restores`] (tombstones made and brought back), [`in_use`] (what sources report running). Every public method is one transaction that keeps one invariant;
//! callers never hold a transaction across storage I/O. Write transactions go through
//! [`transaction!`], which retries the whole transaction when the database reports a
//! transient conflict. SQL text is shared between the dialects (`$N` placeholders, `ON CONFLICT`,
//! `RETURNING` mean the same in both); the few statements that differ — row locks — are chosen
//! by [`Dialect`] in one place. Only this module touches sqlx. Times are passed in from the
//! application clock, never taken from the database's `now()`.

mod access;
mod backup;
mod blobs;
mod browse;
mod bulk_restore;
mod consistency;
mod deletes;
mod event_delivery;
pub(crate) mod events;
mod explain;
mod gc;
mod imports;
mod in_use;
mod manifests;
mod proxy;
pub(crate) mod quotas;
mod reports;
mod repos;
mod restores;
mod retention;
mod rows;
mod space;
mod status;
mod sweep;
mod tags;
mod uploads;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection as _, Executor as _};

pub use backup::{
    BACKED_UP, BackedUp, BackupOutcome, BackupRun, Cell, EVENT_GAP, Loader, NOT_BACKED_UP, Snapshot,
};
pub use blobs::CompletedUpload;
pub use browse::{DeletedTag, TagRow, UntaggedRow};
pub use bulk_restore::{BulkOutcome, BulkRestoreRecord, DeleteRecord, DeleteSelection};
pub use consistency::{BLOB_FINDINGS, Finding, LiveManifest, PAYLOAD_FINDINGS, StoredBlob, reference_kinds};
pub use deletes::{AffectedManifest, DeleteError, Purged, Refusal, RetentionDelete};
pub use event_delivery::{DeadLetter, EndpointState, ReplaySelection, Settle, StoredEvent};
pub use events::NewEvent;
pub use explain::{Explanation, Hold, LinkState};
pub use gc::{Collected, Review, ReviewOutcome, WouldCollect};
pub use imports::{Adoption, ImportRecord, ImportedTag};
pub use in_use::{InUseReport, Pin, PinnedImage, Reported, Unresolved};
pub use manifests::{NewManifest, PutManifestError};
pub use proxy::{CachedRoot, PendingManifest, ProxyTag};
pub use quotas::{QuotaCount, QuotaState, QuotaUsage, RuleLabel};
pub use reports::{Preview, RepositorySummary, TombstoneRow};
pub use restores::RevertTarget;
pub use retention::{RunRecord, Untag, UntagOutcome, UntaggedManifest};
pub use rows::{BlobRow, ManifestHead, ManifestRow, ReferrerRow, TagMove, UploadRow};
pub use space::{Space, SpaceSample};
pub use status::{GcStatus, PassRecord};
pub use sweep::{Progress, RowSweep};
pub use tags::TagCondition;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed or could not be reached.
    #[error("metadata store: {0}")]
    Database(#[from] sqlx::Error),
    /// The database kept reporting a transient conflict (deadlock, serialization failure, busy
    /// file) through every retry, or no connection was free: nothing was written, and the same
    /// request may succeed later.
    #[error("metadata store busy: {0}")]
    Busy(String),
    /// The connection failed while committing: the transaction may or may not have been
    /// committed. Nothing that the transaction would have made reachable may be deleted on the
    /// strength of this error.
    #[error("metadata store: commit outcome unknown: {0}")]
    CommitUnknown(sqlx::Error),
    /// Migrations could not be applied.
    #[error("metadata migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The metadata URL is not one Berth can use.
    #[error("unsupported metadata URL `{0}` (expected sqlite:… or postgres://…)")]
    UnsupportedUrl(String),
    /// The change would take a quota's scope past a limit; nothing of it was written.
    #[error("{0}")]
    Quota(crate::quota::QuotaRefusal),
}

impl Error {
    /// Whether the store was too busy to serve (retries exhausted, or no free connection): the
    /// request changed nothing and may succeed if sent again.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy(_) | Error::Database(sqlx::Error::PoolTimedOut))
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors a write transaction's body may end with: the store's own, or a refusal of the domain
/// (which rolls the transaction back like any error).
pub(crate) trait TxError: From<Error> {
    /// The store error inside, if this is one.
    fn store_error(&self) -> Option<&Error>;
}

impl TxError for Error {
    fn store_error(&self) -> Option<&Error> {
        Some(self)
    }
}

/// Whether the database refused a statement in a way that retrying the whole transaction can
/// cure: a deadlock or serialization failure (PostgreSQL), a busy or locked file (SQLite). In
/// each case the database rolled the transaction back.
fn is_transient(e: &sqlx::Error) -> bool {
    conflict_kind(e).is_some()
}

/// What kind of transient conflict `e` is: `deadlock`, `serialization` (PostgreSQL) or `busy`
/// (SQLite's locked or busy file); `None` for any other error.
fn conflict_kind(e: &sqlx::Error) -> Option<&'static str> {
    let code = e.as_database_error().and_then(|d| d.code())?;
    match code.as_ref() {
        "40P01" => Some("deadlock"),
        "40001" => Some("serialization"),
        // SQLite reports extended result codes; the primary code is the low byte.
        other => other.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)).then_some("busy"),
    }
}

/// The label of a retried transaction: why it was run again.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RetryLabels {
    /// `deadlock`, `serialization` or `busy`.
    pub reason: &'static str,
}

/// The transient conflicts write transactions met, for the metrics: every transaction run again
/// (by reason) and every deadlock PostgreSQL detected — retried or not. A deadlock means two
/// paths took the same rows in opposite orders (docs/design.md, lock order): the retry hides it
/// from the client, these counters do not.
#[derive(Debug, Clone, Default)]
pub struct Conflicts {
    /// Transactions run again, by reason.
    pub retries:
        prometheus_client::metrics::family::Family<RetryLabels, prometheus_client::metrics::counter::Counter>,
    /// Deadlocks detected.
    pub deadlocks: prometheus_client::metrics::counter::Counter,
}

impl Conflicts {
    /// Counts what `error` (ending attempt `attempt` of the transaction written at `site`) was and
    /// what is done about it; when the retries are used up, says so at WARN with the site and the
    /// database's own words (PostgreSQL's detail names the waits; the statements of both sides
    /// are in its server log).
    pub(crate) fn note<E: TxError>(&self, error: &E, decision: &Retry, attempt: u32, site: &'static str) {
        let Some(Error::Database(db)) = error.store_error() else { return };
        let Some(reason) = conflict_kind(db) else { return };
        if reason == "deadlock" {
            self.deadlocks.inc();
        }
        match decision {
            Retry::Again => {
                self.retries.get_or_create(&RetryLabels { reason }).inc();
            }
            Retry::Busy(_) => {
                let detail = db
                    .as_database_error()
                    .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
                    .and_then(|pg| pg.detail())
                    .unwrap_or_default();
                tracing::warn!(
                    reason,
                    attempts = attempt,
                    transaction = site,
                    error = %db,
                    detail,
                    "a write transaction met a conflict on every attempt and gave up (answering 503)"
                );
            }
            Retry::No => {}
        }
    }
}

/// How often a transaction that met a transient conflict is tried in all.
const WRITE_ATTEMPTS: u32 = 5;

/// Runs `$body` (an expression of type `Result<T, $err>` using the connection `$tx`) in one
/// write transaction of `$store`, committing it if the body succeeds; an error rolls it back.
/// When the database reports a transient conflict — a deadlock, a serialization failure, a busy
/// file — the whole transaction is run again, a bounded number of times: the database rolled the
/// failed attempt back, so nothing is applied twice. A macro rather than a function taking a
/// closure, so the body stays an ordinary part of the calling `async fn` (and its future `Send`).
macro_rules! transaction {
    ($store:expr, $err:ty, |$tx:ident| $body:expr) => {{
        let mut attempt = 1u32;
        loop {
            let error: $err = match $store.begin().await {
                Err(e) => <$err>::from($crate::meta::Error::Database(e)),
                Ok(mut guard) => {
                    let $tx: &mut sqlx::AnyConnection = &mut *guard;
                    // Each attempt notes its events and what it changes in quota scopes afresh; the
                    // quota rows are written (and the limits checked) after the body, the events
                    // last, before COMMIT.
                    let outcome: std::result::Result<_, $err> =
                        $crate::meta::quotas::journaled($crate::meta::events::journaled(async {
                            let value = $crate::meta::events::body::<_, $err>(async { $body }).await?;
                            $crate::meta::quotas::flush(&mut *$tx, $store.quota_state())
                                .await
                                .map_err(<$err>::from)?;
                            let wrote = $crate::meta::events::flush(&mut *$tx)
                                .await
                                .map_err(|e| <$err>::from($crate::meta::Error::Database(e)))?;
                            Ok((value, wrote))
                        }))
                        .await;
                    match outcome {
                        Err(e) => e,
                        Ok((value, wrote)) => match guard.commit().await {
                            Ok(()) => {
                                if wrote {
                                    $crate::meta::events::committed();
                                }
                                break Ok(value);
                            }
                            Err(e) => <$err>::from($crate::meta::commit_error(e)),
                        },
                    }
                }
            };
            let decision = $crate::meta::retry_decision(&error, attempt);
            $store.conflicts().note(&error, &decision, attempt, concat!(module_path!(), ":", line!()));
            match decision {
                $crate::meta::Retry::Again => {
                    $crate::meta::back_off(attempt).await;
                    attempt += 1;
                }
                $crate::meta::Retry::Busy(reason) => {
                    break Err(<$err>::from($crate::meta::Error::Busy(reason)));
                }
                $crate::meta::Retry::No => {
                    if let Some($crate::meta::Error::Quota(refusal)) =
                        $crate::meta::TxError::store_error(&error)
                    {
                        $store.quota_refused(refusal).await;
                    }
                    break Err(error);
                }
            }
        }
    }};
}
pub(crate) use transaction;

/// How much the running transaction has noted (events, quota changes): a mark to go back to
/// with [`journal_truncate`] when it rolls back to a savepoint taken here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JournalMark {
    events: usize,
    quotas: usize,
}

pub(crate) fn journal_mark() -> JournalMark {
    JournalMark { events: events::mark(), quotas: quotas::mark() }
}

/// Forgets what was noted since `mark`: a savepoint taken there was rolled back.
pub(crate) fn journal_truncate(mark: JournalMark) {
    events::truncate(mark.events);
    quotas::truncate(mark.quotas);
}

/// What to do after a transaction failed.
pub(crate) enum Retry {
    /// Run it again.
    Again,
    /// Give up: the database stayed busy (the reason for the error).
    Busy(String),
    /// Return the error as it is.
    No,
}

pub(crate) fn retry_decision<E: TxError>(error: &E, attempt: u32) -> Retry {
    match error.store_error() {
        Some(Error::Database(db)) if is_transient(db) && attempt < WRITE_ATTEMPTS => Retry::Again,
        Some(Error::Database(db)) if is_transient(db) => Retry::Busy(db.to_string()),
        Some(Error::Database(db @ sqlx::Error::PoolTimedOut)) => Retry::Busy(db.to_string()),
        _ => Retry::No,
    }
}

/// Waits a little, more after each attempt, so two transactions that deadlocked do not meet
/// again at once.
pub(crate) async fn back_off(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt * attempt))).await;
}

/// Which SQL dialect the store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite in WAL mode; one writer connection serialises all writes.
    Sqlite,
    /// PostgreSQL; writers lock the rows they depend on.
    Postgres,
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Connections for readers (and, on PostgreSQL, writers).
    pub max_connections: u32,
    /// How long to wait for a free connection.
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions { max_connections: 8, acquire_timeout: Duration::from_secs(10) }
    }
}

/// The collector's windows, in milliseconds: the review times events enqueue.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// How long an unreferenced blob is kept after its last upload, link or `HEAD`.
    pub blob_grace_ms: i64,
    /// How long a manifest without tags is kept after its last push, pull or untagging.
    pub untagged_grace_ms: i64,
    /// How long a tombstone stays restorable.
    pub restore_window_ms: i64,
    /// What the collector adds to `blob_grace` before it takes a blob or link: a replica notes a
    /// `HEAD` in memory and writes it up to one access flush interval later, and replicas' clocks
    /// differ — so an event still in a replica's memory, or stamped by a slower clock, is never
    /// outrun (`gc.access_flush_interval` + `gc.clock_skew`).
    pub margin_ms: i64,
}

impl Windows {
    /// How long after its last upload, link or `HEAD` an unreferenced blob (or link) is kept:
    /// `blob_grace` plus the margin.
    pub fn blob_hold_ms(&self) -> i64 {
        self.blob_grace_ms.saturating_add(self.margin_ms)
    }
}

impl Default for Windows {
    fn default() -> Self {
        const DAY: i64 = 24 * 3600 * 1000;
        Windows {
            blob_grace_ms: DAY,
            untagged_grace_ms: 7 * DAY,
            restore_window_ms: 7 * DAY,
            margin_ms: 3000,
        }
    }
}

/// The metadata store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaStore {
    read: AnyPool,
    write: AnyPool,
    dialect: Dialect,
    windows: Windows,
    /// Tags no client may move or delete; checked inside the transactions that change tags.
    immutable: std::sync::Arc<crate::retention::ImmutableTags>,
    /// The transient conflicts its write transactions met.
    conflicts: Conflicts,
    /// The quota rules it keeps and enforces.
    quota: std::sync::Arc<quotas::QuotaState>,
}

/// The migrations of `dialect`. Migrations applied by a newer Berth that this one does not know
/// are accepted (their checksums are still verified for the ones it knows): replicas are upgraded
/// one at a time, so an older replica must be able to restart after a newer one migrated. That
/// only works because migrations are additive — see docs/deploy.md.
fn migrator(dialect: Dialect) -> sqlx::migrate::Migrator {
    let mut migrator = match dialect {
        Dialect::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
    };
    migrator.set_ignore_missing(true);
    migrator
}

fn sqlite_pragmas(conn: &mut AnyConnection) -> futures_util::future::BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        conn.execute(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
        )
        .await
        .map(|_| ())
    })
}

impl MetaStore {
    /// Opens the store at `url` (`sqlite:path` or `postgres://…`) and applies migrations.
    ///
    /// # Errors
    /// [`Error`] when the URL is unsupported, the database cannot be reached, or a migration fails.
    pub async fn open(url: &str, pool: &PoolOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        if url.starts_with("sqlite:") {
            Self::open_sqlite(url, pool).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = AnyConnectOptions::from_str(url)?;
            let pg = AnyPoolOptions::new()
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout)
                .connect_with(opts)
                .await?;
            // sqlx takes an advisory lock, so replicas starting together migrate once.
            migrator(Dialect::Postgres).run(&pg).await?;
            Ok(MetaStore {
                read: pg.clone(),
                write: pg,
                dialect: Dialect::Postgres,
                windows: Windows::default(),
                immutable: Default::default(),
                conflicts: Conflicts::default(),
                quota: Default::default(),
            })
        } else {
            Err(Error::UnsupportedUrl(url.to_string()))
        }
    }

    async fn open_sqlite(url: &str, pool: &PoolOptions) -> Result<Self> {
        let url = if url.contains('?') { url.to_string() } else { format!("{url}?mode=rwc") };
        let opts = AnyConnectOptions::from_str(&url)?;
        // One writer connection: SQLite allows a single writer anyway, and queueing in the pool
        // is cheaper than busy-waiting on the file lock.
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool.acquire_timeout)
            .after_connect(|c, _| sqlite_pragmas(c))
            .connect_with(opts.clone())
            .await?;
        migrator(Dialect::Sqlite).run(&write).await?;
        let read = AnyPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            .after_connect(|c, _| sqlite_pragmas(c))
            .connect_with(opts)
            .await?;
        Ok(MetaStore {
            read,
            write,
            dialect: Dialect::Sqlite,
            windows: Windows::default(),
            immutable: Default::default(),
            conflicts: Conflicts::default(),
            quota: Default::default(),
        })
    }

    /// The same store with the collector's `windows`.
    #[must_use]
    pub fn with_windows(mut self, windows: Windows) -> Self {
        self.windows = windows;
        self
    }

    /// The same store refusing changes to the tags `immutable` covers.
    #[must_use]
    pub fn with_immutable(mut self, immutable: crate::retention::ImmutableTags) -> Self {
        self.immutable = std::sync::Arc::new(immutable);
        self
    }

    /// The same store keeping and enforcing `quotas`.
    #[must_use]
    pub fn with_quotas(mut self, quotas: crate::quota::Quotas) -> Self {
        self.quota = std::sync::Arc::new(quotas::QuotaState::new(quotas, self.dialect));
        self
    }

    /// The transient conflicts its write transactions met (the metrics read them).
    pub fn conflicts(&self) -> &Conflicts {
        &self.conflicts
    }

    /// The immutability rules this store enforces.
    pub fn immutable(&self) -> &crate::retention::ImmutableTags {
        &self.immutable
    }

    /// The dialect in use.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// Checks that the database answers.
    ///
    /// # Errors
    /// [`Error::Database`] when it does not.
    pub async fn ping(&self) -> Result<()> {
        self.read.acquire().await?.ping().await?;
        Ok(())
    }

    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            // IMMEDIATE takes the write lock up front, so a transaction never fails halfway
            // when it upgrades from reading to writing.
            Dialect::Sqlite => self.write.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.write.begin().await,
        }
    }

    /// The clause that locks the rows a write depends on until commit (shared lock), so a
    /// concurrent delete of those rows waits or is waited for. SQLite's single writer already
    /// serialises writers.
    fn share_lock(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR SHARE",
        }
    }

    /// The lock a repository delete or restore takes on the repository's row: exclusive against
    /// other deletes, restores and pushes (which share-lock it), but not against the foreign-key
    /// checks of rows that merely name the repository (a purge's history rows), which would put
    /// the repository after the links in those paths' order.
    fn repository_lock(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR NO KEY UPDATE",
        }
    }

    /// Like [`MetaStore::share_lock`], but exclusive, and only on the rows of `table` (an alias
    /// in the query): for rows the transaction will update. Locking only the named table keeps
    /// a join from also locking the rows it merely reads.
    fn update_lock_of(&self, table: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => String::new(),
            Dialect::Postgres => format!(" FOR UPDATE OF {table}"),
        }
    }
}

/// Classifies a failed `COMMIT`: a refusal by the database (it answered, so it did not commit)
/// stays a database error; anything else — the connection broke, the reply was lost — leaves the
/// outcome unknown.
pub(crate) fn commit_error(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Database(_) => Error::Database(e),
        other => Error::CommitUnknown(other),
    }
}
