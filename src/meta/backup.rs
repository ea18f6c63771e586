//! Backups' side of the metadata: the hold that keeps the outbox from deleting what a running
//! backup's snapshot names, the record of the backups taken, the whole metadata read at one
//! snapshot, and loaded into an empty deployment.
//!
//! Which tables a backup holds is one list, [`BACKED_UP`], in the order they load; every other
//! table is in [`NOT_BACKED_UP`] with the reason (a test checks the two cover the schema).

use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use sqlx::any::AnyTypeInfoKind;
use sqlx::{AnyConnection, Row as _, ValueRef as _};

use super::{Dialect, Error, MetaStore, Result, transaction};

/// One value of a row, as backups carry it between the dialects.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes (a manifest's payload).
    Bytes(Vec<u8>),
}

/// A table a backup holds.
#[derive(Debug, Clone, Copy)]
pub struct BackedUp {
    /// Its name.
    pub name: &'static str,
    /// Columns that name rows of a table loaded later (a cycle of references): loaded as
    /// `NULL`, then set once every table is in.
    pub deferred: &'static [&'static str],
    /// The columns that identify a row, for setting the deferred ones.
    pub key: &'static [&'static str],
}

const fn table(name: &'static str) -> BackedUp {
    BackedUp { name, deferred: &[], key: &[] }
}

/// The tables a backup holds, in the order they load (every reference points backwards, but
/// for the deferred columns).
pub const BACKED_UP: &[BackedUp] = &[
    table("bulk_restores"),
    // A deleted repository names its delete, which names the repository.
    BackedUp { name: "repositories", deferred: &["delete_id"], key: &["id"] },
    table("deletes"),
    table("blobs"),
    table("repository_blobs"),
    table("manifests"),
    table("manifest_blobs"),
    table("manifest_children"),
    table("tags"),
    table("tag_history"),
    table("tag_unlocks"),
    table("retention_runs"),
    table("imports"),
    table("import_tags"),
    table("adopted_keys"),
    table("space_samples"),
    table("in_use_reports"),
    table("in_use_pins"),
    table("proxy_tags"),
    table("proxy_pending"),
    table("events"),
    table("event_counters"),
    table("event_endpoints"),
    table("event_cursors"),
    table("event_letters"),
    table("quota_usage"),
    table("quota_blobs"),
    table("gc_reviews"),
];

/// The tables a backup leaves out, and why.
pub const NOT_BACKED_UP: &[(&str, &str)] = &[
    ("uploads", "upload sessions: their bytes are not copied; clients start again"),
    ("gc_outbox", "keys to delete: the snapshot names none of them, so none is copied"),
    ("gc_leases", "which process runs the collector's jobs now"),
    ("gc_progress", "where this deployment's sweep and scrub stand"),
    ("gc_findings", "what the sweep and scrub found in this deployment's storage"),
    ("gc_passes", "this deployment's collector passes"),
    ("swept_keys", "the sweep's fence over this deployment's storage"),
    ("backup_holds", "running backups of this deployment"),
    ("backup_hold_free", "running backups of this deployment"),
    ("backup_runs", "the backups taken of this deployment"),
    ("_sqlx_migrations", "the schema is made by the restoring Berth's own migrations"),
];

/// Tables any of whose rows make a deployment not empty: a backup is restored only into a
/// deployment without them (tables filled at start from the configuration — quota usage,
/// event endpoints — do not count; a restore replaces them). The collector's queues count: a
/// key left in the target's outbox could be a key the restore puts back.
const CONTENT: &[&str] = &[
    "repositories",
    "blobs",
    "manifests",
    "uploads",
    "deletes",
    "tag_history",
    "events",
    "gc_outbox",
    "gc_reviews",
    "swept_keys",
];

/// How far a restore moves event ids and sequence numbers past the backup's: the source may
/// have delivered events after the snapshot, with the numbers that come next; consumers that
/// de-duplicate by id or sequence must not take a new event for one of those.
pub const EVENT_GAP: i64 = 1_000_000_000;

async fn first_content(conn: &mut AnyConnection) -> Result<Option<String>> {
    for table in CONTENT {
        let (n,): (i64,) =
            sqlx::query_as(&format!("SELECT COUNT(*) FROM (SELECT 1 FROM {table} LIMIT 1) AS t"))
                .fetch_one(&mut *conn)
                .await?;
        if n > 0 {
            return Ok(Some(format!("its `{table}` table has rows")));
        }
    }
    Ok(None)
}

/// A backup recorded in this deployment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupRun {
    /// Its id.
    pub id: String,
    /// Where it was written.
    pub location: String,
    /// When it started, ms since the epoch.
    pub started_at: i64,
    /// When its snapshot was taken.
    pub snapshot_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
    /// `running`, `complete` or `failed`.
    pub state: String,
    /// Keys its snapshot names.
    pub keys: i64,
    /// Their bytes.
    pub bytes: i64,
    /// Keys it copied (the rest were in the location already).
    pub keys_copied: i64,
    /// Their bytes.
    pub bytes_copied: i64,
    /// Why it failed.
    pub error: Option<String>,
}

/// How a finished backup ended, for its record.
#[derive(Debug, Clone, Default)]
pub struct BackupOutcome {
    /// Keys the snapshot names and their bytes.
    pub keys: i64,
    /// Their bytes.
    pub bytes: i64,
    /// Keys copied.
    pub keys_copied: i64,
    /// Their bytes.
    pub bytes_copied: i64,
    /// Why it failed; `None` when complete.
    pub error: Option<String>,
}

fn cell_of(row: &sqlx::any::AnyRow, i: usize) -> Result<Cell, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Cell::Null);
    }
    let kind = raw.type_info().kind();
    Ok(match kind {
        AnyTypeInfoKind::Null => Cell::Null,
        AnyTypeInfoKind::Bool => Cell::Int(i64::from(row.try_get::<bool, _>(i)?)),
        AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
            Cell::Int(row.try_get(i)?)
        }
        AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => Cell::Real(row.try_get(i)?),
        AnyTypeInfoKind::Text => Cell::Text(row.try_get(i)?),
        AnyTypeInfoKind::Blob => Cell::Bytes(row.try_get(i)?),
    })
}

/// What a column holds, as the schema declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnType {
    Int,
    Real,
    Text,
    Bytes,
}

impl ColumnType {
    fn of(declared: &str) -> ColumnType {
        let d = declared.to_ascii_lowercase();
        if d.contains("int") {
            ColumnType::Int
        } else if d.contains("bytea") || d.contains("blob") {
            ColumnType::Bytes
        } else if d.contains("real") || d.contains("doub") || d.contains("floa") || d.contains("numeric") {
            ColumnType::Real
        } else {
            ColumnType::Text
        }
    }
}

/// The columns of `table` with their declared types, in order.
async fn columns_of(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
) -> Result<Vec<(String, ColumnType)>> {
    let sql = match dialect {
        Dialect::Sqlite => "SELECT name, type FROM pragma_table_info($1) ORDER BY cid",
        Dialect::Postgres => {
            "SELECT CAST(column_name AS TEXT), CAST(data_type AS TEXT) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
        }
    };
    let rows: Vec<(String, String)> = sqlx::query_as(sql).bind(table).fetch_all(&mut *conn).await?;
    Ok(rows.into_iter().map(|(name, declared)| (name, ColumnType::of(&declared))).collect())
}

fn quoted(columns: &[String]) -> String {
    columns.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
}

/// The whole metadata as of one moment: a read-only transaction (SQLite: one read transaction
/// on the write-ahead log; PostgreSQL: `REPEATABLE READ`) that every table is read in.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    dialect: Dialect,
}

impl Snapshot {
    /// The schema's migration level as the snapshot sees it.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn schema_level(&mut self) -> Result<i64> {
        let (level,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&mut *self.tx)
                .await?;
        Ok(level.unwrap_or(0))
    }

    /// The columns of `table`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        Ok(columns_of(&mut self.tx, self.dialect, table).await?.into_iter().map(|(c, _)| c).collect())
    }

    /// The statement that reads `columns` of `table` (to pass to [`Snapshot::rows`]).
    pub fn select(table: &str, columns: &[String]) -> String {
        format!("SELECT {} FROM {table}", quoted(columns))
    }

    /// The rows `select` reads, as a stream.
    pub fn rows<'a>(&'a mut self, select: &'a str) -> BoxStream<'a, Result<Vec<Cell>>> {
        sqlx::query(select)
            .fetch(&mut *self.tx)
            .map(|row| {
                let row = row?;
                (0..row.len()).map(|i| cell_of(&row, i)).collect::<Result<Vec<_>, _>>().map_err(Error::from)
            })
            .boxed()
    }

    /// Every storage key the snapshot names: key, size, digest, in key order.
    pub fn keys(&mut self) -> BoxStream<'_, Result<(String, i64, String)>> {
        sqlx::query_as("SELECT storage_key, size, digest FROM blobs ORDER BY storage_key")
            .fetch(&mut *self.tx)
            .map(|r| r.map_err(Error::from))
            .boxed()
    }

    /// Ends the snapshot.
    pub async fn close(self) {
        let _ = self.tx.rollback().await;
    }
}

/// Loads a backup's tables into an empty deployment, in one transaction: a restore that stops
/// halfway leaves nothing.
pub struct Loader {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    dialect: Dialect,
    /// Deferred columns to set once every table is in.
    deferred: Vec<Deferred>,
    /// The schema's columns of the tables loaded so far.
    schema: std::collections::HashMap<&'static str, Vec<(String, ColumnType)>>,
}

/// A column of a loaded row set once every table is in.
struct Deferred {
    table: &'static str,
    /// The row's key: columns and values.
    key: Vec<(String, Cell)>,
    column: String,
    value: Cell,
}

/// Rows per `INSERT`: well under both dialects' bound on parameters.
const ROWS_PER_INSERT: usize = 200;

impl Loader {
    /// Loads `rows` (cells of `columns`, as backed up) into `table`.
    ///
    /// # Errors
    /// [`Error::Database`]; a column this schema does not have (a backup from a later Berth).
    pub async fn insert(&mut self, table: &BackedUp, columns: &[String], rows: Vec<Vec<Cell>>) -> Result<()> {
        if !self.schema.contains_key(table.name) {
            let columns = columns_of(&mut self.tx, self.dialect, table.name).await?;
            self.schema.insert(table.name, columns);
        }
        let schema = &self.schema[table.name];
        let mut types = Vec::with_capacity(columns.len());
        for column in columns {
            match schema.iter().find(|(name, _)| name == column) {
                Some((_, t)) => types.push(*t),
                None => {
                    return Err(Error::Database(sqlx::Error::Protocol(format!(
                        "column `{column}` of table `{}` is not in this schema: the backup is from a later Berth",
                        table.name
                    ))));
                }
            }
        }
        let position = |name: &str| columns.iter().position(|c| c == name);
        let deferred: Vec<usize> = table.deferred.iter().filter_map(|c| position(c)).collect();
        let key: Vec<usize> = table.key.iter().filter_map(|c| position(c)).collect();
        let overriding = match self.dialect {
            Dialect::Postgres => " OVERRIDING SYSTEM VALUE",
            Dialect::Sqlite => "",
        };
        for batch in rows.chunks(ROWS_PER_INSERT) {
            let mut values = Vec::with_capacity(batch.len());
            let mut n = 0;
            for _ in batch {
                let row: Vec<String> = (0..columns.len())
                    .map(|_| {
                        n += 1;
                        format!("${n}")
                    })
                    .collect();
                values.push(format!("({})", row.join(", ")));
            }
            let sql = format!(
                "INSERT INTO {} ({}){overriding} VALUES {}",
                table.name,
                quoted(columns),
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for row in batch {
                if row.len() != columns.len() {
                    return Err(Error::Database(sqlx::Error::Protocol(format!(
                        "a row of `{}` has {} cells for {} columns",
                        table.name,
                        row.len(),
                        columns.len()
                    ))));
                }
                for (i, cell) in row.iter().enumerate() {
                    let cell = if deferred.contains(&i) { &Cell::Null } else { cell };
                    query = bind(query, cell, types[i]).map_err(|why| {
                        Error::Database(sqlx::Error::Protocol(format!(
                            "{}.{}: {why}",
                            table.name, columns[i]
                        )))
                    })?;
                }
                for &i in &deferred {
                    if row[i] != Cell::Null {
                        let key = key.iter().map(|&k| (columns[k].clone(), row[k].clone())).collect();
                        self.deferred.push(Deferred {
                            table: table.name,
                            key,
                            column: columns[i].clone(),
                            value: row[i].clone(),
                        });
                    }
                }
            }
            query.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// Sets the deferred columns, moves PostgreSQL's identity sequences past the loaded ids and
    /// commits.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn finish(mut self) -> Result<()> {
        for Deferred { table, key, column, value } in std::mem::take(&mut self.deferred) {
            let schema = self.schema.get(table).cloned().unwrap_or_default();
            let type_of = |c: &str| schema.iter().find(|(n, _)| n == c).map_or(ColumnType::Text, |(_, t)| *t);
            let conditions: Vec<String> =
                key.iter().enumerate().map(|(i, (c, _))| format!("\"{c}\" = ${}", i + 2)).collect();
            let sql = format!("UPDATE {table} SET \"{column}\" = $1 WHERE {}", conditions.join(" AND "));
            let protocol = |why: String| Error::Database(sqlx::Error::Protocol(why));
            let mut query = bind(sqlx::query(&sql), &value, type_of(&column)).map_err(protocol)?;
            for (c, v) in &key {
                query = bind(query, v, type_of(c)).map_err(protocol)?;
            }
            query.execute(&mut *self.tx).await?;
        }
        // New events number past what the source may have delivered after the snapshot. An
        // endpoint that had everything keeps having everything; one that lagged catches up on
        // the backed-up events, then jumps the gap with the next new one.
        sqlx::query(
            "UPDATE event_cursors SET seq = seq + $1 \
             WHERE seq >= (SELECT c.seq FROM event_counters c WHERE c.stream = event_cursors.stream)",
        )
        .bind(EVENT_GAP)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("UPDATE event_counters SET seq = seq + $1")
            .bind(EVENT_GAP)
            .execute(&mut *self.tx)
            .await?;
        if self.dialect == Dialect::Sqlite {
            sqlx::query(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'events', 0 \
                 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events')",
            )
            .execute(&mut *self.tx)
            .await?;
            sqlx::query(
                "UPDATE sqlite_sequence SET seq = (SELECT COALESCE(MAX(id), 0) FROM events) + $1 WHERE name = 'events'",
            )
            .bind(EVENT_GAP)
            .execute(&mut *self.tx)
            .await?;
        }
        if self.dialect == Dialect::Postgres {
            let generated: Vec<(String, String)> = sqlx::query_as(
                "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = current_schema() \
                 AND (is_identity = 'YES' OR column_default LIKE 'nextval(%')",
            )
            .fetch_all(&mut *self.tx)
            .await?;
            for (table, column) in generated {
                if BACKED_UP.iter().any(|t| t.name == table) {
                    let gap = if table == "events" { EVENT_GAP } else { 0 };
                    let sql = format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), \
                         (SELECT COALESCE(MAX({column}), 0) + 1 + {gap} FROM {table}), false)"
                    );
                    sqlx::query(&sql).execute(&mut *self.tx).await?;
                }
            }
        }
        self.tx.commit().await.map_err(super::commit_error)
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds `cell` for a column of type `column`, converting between the dialects' types.
fn bind<'q>(query: AnyQuery<'q>, cell: &Cell, column: ColumnType) -> Result<AnyQuery<'q>, String> {
    Ok(match (cell, column) {
        (Cell::Null, ColumnType::Int) => query.bind(None::<i64>),
        (Cell::Null, ColumnType::Real) => query.bind(None::<f64>),
        (Cell::Null, ColumnType::Text) => query.bind(None::<String>),
        (Cell::Null, ColumnType::Bytes) => query.bind(None::<Vec<u8>>),
        (Cell::Int(i), ColumnType::Int) => query.bind(*i),
        (Cell::Int(i), ColumnType::Real) => query.bind(*i as f64),
        (Cell::Int(i), ColumnType::Text) => query.bind(i.to_string()),
        (Cell::Real(f), ColumnType::Real) => query.bind(*f),
        (Cell::Text(s), ColumnType::Text) => query.bind(s.clone()),
        (Cell::Text(s), ColumnType::Int) => query.bind(s.parse::<i64>().map_err(|e| format!("`{s}`: {e}"))?),
        (Cell::Text(s), ColumnType::Bytes) => query.bind(s.clone().into_bytes()),
        (Cell::Bytes(b), ColumnType::Bytes) => query.bind(b.clone()),
        (Cell::Bytes(b), ColumnType::Text) => {
            query.bind(String::from_utf8(b.clone()).map_err(|_| "bytes that are not text".to_string())?)
        }
        (cell, column) => return Err(format!("{cell:?} does not fit a {column:?} column")),
    })
}

impl MetaStore {
    /// Takes a backup's hold on the outbox for `lease_ms`: from now until it is released or
    /// lapses, the outbox deletes only the keys queued before this transaction (those the
    /// backup's snapshot, taken after it, cannot name). Holds that lapsed are cleared.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn hold_outbox(&self, id: &str, holder: &str, now: i64, lease_ms: i64) -> Result<()> {
        let lapsed = now.saturating_sub(self.windows.margin_ms);
        transaction!(self, Error, |tx| {
            sqlx::query(
                "DELETE FROM backup_hold_free WHERE hold_id IN (SELECT id FROM backup_holds WHERE expires_at < $1)",
            )
            .bind(lapsed)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM backup_holds WHERE expires_at < $1")
                .bind(lapsed)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO backup_holds (id, holder, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(holder)
            .bind(now)
            .bind(now.saturating_add(lease_ms))
            .execute(&mut *tx)
            .await?;
            // What is queued now was removed from the metadata before the hold — before the
            // snapshot: it may go. (Keys queued while this runs are not seen, and wait: safe.)
            sqlx::query(
                "INSERT INTO backup_hold_free (hold_id, storage_key) SELECT $1, storage_key FROM gc_outbox",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }

    /// Extends hold `id` to `now + lease_ms`; `false` when it lapsed (or is gone) — the outbox
    /// may have deleted keys its backup needs, and the backup must not complete.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn renew_hold(&self, id: &str, now: i64, lease_ms: i64) -> Result<bool> {
        transaction!(self, Error, |tx| {
            let renewed =
                sqlx::query("UPDATE backup_holds SET expires_at = $1 WHERE id = $2 AND expires_at > $3")
                    .bind(now.saturating_add(lease_ms))
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            Ok(renewed == 1)
        })
    }

    /// Releases hold `id`: what it kept waiting may go.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn release_hold(&self, id: &str) -> Result<()> {
        transaction!(self, Error, |tx| {
            sqlx::query("DELETE FROM backup_hold_free WHERE hold_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM backup_holds WHERE id = $1").bind(id).execute(&mut *tx).await?;
            Ok(())
        })
    }

    /// Records that backup `id` to `location` started.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn backup_started(&self, id: &str, location: &str, now: i64) -> Result<()> {
        transaction!(self, Error, |tx| {
            sqlx::query(
                "INSERT INTO backup_runs (id, location, started_at, state) VALUES ($1, $2, $3, 'running') \
                 ON CONFLICT (id) DO UPDATE SET started_at = $3, state = 'running', finished_at = NULL, error = NULL",
            )
            .bind(id)
            .bind(location)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }

    /// Records when backup `id`'s snapshot was taken.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn backup_snapshot_taken(&self, id: &str, at: i64) -> Result<()> {
        transaction!(self, Error, |tx| {
            sqlx::query("UPDATE backup_runs SET snapshot_at = $1 WHERE id = $2")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }

    /// Records how backup `id` ended.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn backup_finished(&self, id: &str, outcome: &BackupOutcome, now: i64) -> Result<()> {
        let state = if outcome.error.is_none() { "complete" } else { "failed" };
        transaction!(self, Error, |tx| {
            sqlx::query(
                "UPDATE backup_runs SET finished_at = $1, state = $2, keys = $3, bytes = $4, \
                 keys_copied = $5, bytes_copied = $6, error = $7 WHERE id = $8",
            )
            .bind(now)
            .bind(state)
            .bind(outcome.keys)
            .bind(outcome.bytes)
            .bind(outcome.keys_copied)
            .bind(outcome.bytes_copied)
            .bind(outcome.error.clone())
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }

    /// The newest `limit` backups recorded, newest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn backup_runs(&self, limit: i64) -> Result<Vec<BackupRun>> {
        let rows = sqlx::query(
            "SELECT id, location, started_at, snapshot_at, finished_at, state, keys, bytes, keys_copied, \
             bytes_copied, error FROM backup_runs ORDER BY started_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BackupRun {
                    id: r.try_get(0)?,
                    location: r.try_get(1)?,
                    started_at: r.try_get(2)?,
                    snapshot_at: r.try_get(3)?,
                    finished_at: r.try_get(4)?,
                    state: r.try_get(5)?,
                    keys: r.try_get(6)?,
                    bytes: r.try_get(7)?,
                    keys_copied: r.try_get(8)?,
                    bytes_copied: r.try_get(9)?,
                    error: r.try_get(10)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::from)
    }

    /// Opens a snapshot of the whole metadata.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let tx = match self.dialect {
            Dialect::Sqlite => self.read.begin().await?,
            Dialect::Postgres => {
                self.read.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?
            }
        };
        let mut snapshot = Snapshot { tx, dialect: self.dialect };
        // SQLite's read transaction starts at its first read: take it now.
        snapshot.schema_level().await?;
        Ok(snapshot)
    }

    /// The highest migration level this Berth knows.
    pub fn known_schema_level(&self) -> i64 {
        super::migrator(self.dialect).iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Why this deployment cannot take a restore (a table holding content), or `None` if it is
    /// empty.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn not_empty(&self) -> Result<Option<String>> {
        first_content(&mut *self.read.acquire().await?).await
    }

    /// Starts loading a backup: one write transaction that first makes sure, holding off every
    /// writer (SQLite: the write lock; PostgreSQL: the content tables locked against writes),
    /// that the deployment is still empty — `Ok(Err(why))` when not —, then removes the rows
    /// the start put in the tables to load (quota usage, event endpoints).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn loader(&self) -> Result<std::result::Result<Loader, String>> {
        let mut tx = self.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", CONTENT.join(", ")))
                .execute(&mut *tx)
                .await?;
        }
        if let Some(why) = first_content(&mut tx).await? {
            return Ok(Err(why));
        }
        for table in BACKED_UP.iter().rev() {
            sqlx::query(&format!("DELETE FROM {}", table.name)).execute(&mut *tx).await?;
        }
        Ok(Ok(Loader { tx, dialect: self.dialect, deferred: Vec::new(), schema: Default::default() }))
    }

    /// Whether a backup with `id` still holds the outbox at `now`: another process is taking
    /// it.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn backup_running(&self, id: &str, now: i64) -> Result<bool> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM backup_holds WHERE id LIKE $1 AND expires_at + $2 > $3")
                .bind(format!("{id}/%"))
                .bind(self.windows.margin_ms)
                .bind(now)
                .fetch_one(&self.read)
                .await?;
        Ok(n > 0)
    }

    /// Refreshes the planner's statistics after a bulk load (PostgreSQL).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn analyze(&self) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("ANALYZE").execute(&self.write).await?;
        }
        Ok(())
    }

    /// Every table of the schema, for checking that each is either backed up or left out on
    /// purpose.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn schema_tables(&self) -> Result<Vec<String>> {
        let sql = match self.dialect {
            Dialect::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Dialect::Postgres => {
                "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1"
            }
        };
        let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&self.read).await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }
}
