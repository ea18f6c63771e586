//! Where each endpoint's delivery of the events stands: a cursor per (endpoint, stream), the
//! endpoint's failures, and its letters — events given up on (`dead`) or asked for again
//! (`replay`). An event is pending for an endpoint while its sequence number is above the
//! endpoint's cursor for its stream; cursors only move forward.

use std::collections::BTreeMap;

use sqlx::AnyConnection;

use super::{Error, MetaStore, Result, transaction};

/// An event as stored.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct StoredEvent {
    /// Its unique id (consumers de-duplicate by it).
    pub id: i64,
    /// The stream that orders it (its repository, or `/blobs/X`).
    #[serde(skip)]
    pub stream: String,
    /// Its place in the stream.
    pub seq: i64,
    /// When it happened (ms since the epoch).
    pub at: i64,
    /// What happened.
    pub kind: String,
    /// The repository, if any.
    pub repository: Option<String>,
    /// The digest, if any.
    pub digest: Option<String>,
    /// The media type, if known.
    pub media_type: Option<String>,
    /// The size in bytes (for collections: the bytes freed).
    pub size: Option<i64>,
    /// The tag, if any.
    pub tag: Option<String>,
    /// Where a moved tag pointed before.
    pub old_digest: Option<String>,
    /// Who made the change.
    pub actor: Option<String>,
    /// The request (JSON), if the change was made by one.
    pub request: Option<String>,
    /// Kind-specific facts (JSON).
    pub detail: Option<String>,
}

const EVENT_COLUMNS: &str = "e.id, e.stream, e.seq, e.at, e.kind, e.repository, e.digest, e.media_type, e.size, e.tag, e.old_digest, \
     e.actor, e.request, e.detail";

/// One endpoint's delivery, as the store has it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EndpointState {
    /// Events written but not yet delivered (or skipped by its filters).
    pub pending: i64,
    /// When the oldest of them happened.
    pub oldest_pending_at: Option<i64>,
    /// Failed attempts in a row on the events at the head.
    pub failures: i64,
    /// The last failure's reason.
    pub last_error: Option<String>,
    /// When it last tried to send, and last succeeded.
    pub last_attempt_at: Option<i64>,
    /// When a send last succeeded.
    pub last_success_at: Option<i64>,
    /// Events delivered, in all.
    pub delivered: i64,
    /// Events given up on, in all.
    pub failed: i64,
    /// Events in the dead-letter state now.
    pub dead_letters: i64,
    /// Events queued to be delivered again.
    pub replays: i64,
}

/// A dead letter: an event an endpoint gave up on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The event.
    pub event: StoredEvent,
    /// Attempts made.
    pub attempts: i64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was given up on.
    pub at: i64,
}

/// How replayed events were settled.
#[derive(Debug, Clone, Copy)]
pub enum Settle<'a> {
    /// The endpoint accepted them: their letters go.
    Delivered,
    /// The endpoint's filters do not take them: their letters go.
    Skipped,
    /// The endpoint did not accept them: an attempt each, dead again at `max_attempts`.
    Failed {
        /// Why.
        error: &'a str,
        /// Attempts before they are dead letters again.
        max_attempts: i64,
    },
}

/// Which events a replay delivers again.
#[derive(Debug, Clone, Copy)]
pub enum ReplaySelection {
    /// Every event that happened at or after this time (ms).
    Since(i64),
    /// One event.
    Id(i64),
    /// Every dead letter.
    Dead,
}

impl MetaStore {
    /// Makes endpoint `name` known (a replica configured with it starts). A new endpoint — or
    /// one no replica was configured with for `forgotten_after_ms` — starts at the present: its
    /// cursors are set to every stream's counter, so it receives the events committed from now
    /// on. Returns whether it started at the present.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn register_endpoint(&self, name: &str, now: i64, forgotten_after_ms: i64) -> Result<bool> {
        let seen_sql = format!(
            "SELECT seen_at FROM event_endpoints WHERE name = $1{}",
            self.update_lock_of("event_endpoints")
        );
        transaction!(self, Error, |tx| {
            let seen: Option<(i64,)> = sqlx::query_as(&seen_sql).bind(name).fetch_optional(&mut *tx).await?;
            let fresh = match seen {
                None => {
                    sqlx::query(
                        "INSERT INTO event_endpoints (name, created_at, seen_at) VALUES ($1, $2, $2)",
                    )
                    .bind(name)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    true
                }
                Some((seen_at,)) => {
                    sqlx::query("UPDATE event_endpoints SET seen_at = $2 WHERE name = $1")
                        .bind(name)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    seen_at < now.saturating_sub(forgotten_after_ms)
                }
            };
            if fresh {
                sqlx::query("DELETE FROM event_cursors WHERE endpoint = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM event_letters WHERE endpoint = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO event_cursors (endpoint, stream, seq) SELECT $1, stream, seq FROM event_counters \
                     WHERE true ON CONFLICT (endpoint, stream) DO NOTHING",
                )
                .bind(name)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE event_endpoints SET failures = 0, last_error = NULL, next_attempt_at = NULL WHERE name = $1",
                )
                .bind(name)
                .execute(&mut *tx)
                .await?;
            }
            Ok(fresh)
        })
    }

    /// When `endpoint` may be sent to next, if a failure set a pause that has not passed.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn endpoint_paused_until(&self, endpoint: &str, now: i64) -> Result<Option<i64>> {
        let row: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT next_attempt_at FROM event_endpoints WHERE name = $1")
                .bind(endpoint)
                .fetch_optional(&self.write)
                .await?;
        Ok(row.and_then(|(at,)| at).filter(|at| *at > now))
    }

    /// Up to `limit` events pending for `endpoint`, each stream's in order (from at most 256
    /// streams a call, in name order from the first after `after`).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn pending_events(
        &self,
        endpoint: &str,
        limit: usize,
        after: &str,
    ) -> Result<Vec<StoredEvent>> {
        // Round-robin over the streams: from the one after the last served, wrapping around, so
        // no stream waits behind busier ones earlier in name order.
        let sql = "SELECT c.stream, COALESCE(k.seq, 0) FROM event_counters c \
             LEFT JOIN event_cursors k ON k.endpoint = $1 AND k.stream = c.stream \
             WHERE c.seq > COALESCE(k.seq, 0) AND c.stream > $2 ORDER BY c.stream LIMIT 256";
        let mut streams: Vec<(String, i64)> =
            sqlx::query_as(sql).bind(endpoint).bind(after).fetch_all(&self.read).await?;
        if streams.is_empty() && !after.is_empty() {
            streams = sqlx::query_as(sql).bind(endpoint).bind("").fetch_all(&self.read).await?;
        }
        let mut out = Vec::new();
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events e WHERE e.stream = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3"
        );
        // Each stream gets its share of the batch, so a busy one does not hold the others back.
        let share = (limit / streams.len().max(1)).max(8);
        for (stream, after) in streams {
            if out.len() >= limit {
                break;
            }
            let rows: Vec<StoredEvent> = sqlx::query_as(&sql)
                .bind(&stream)
                .bind(after)
                .bind(i64::try_from(share.min(limit - out.len())).unwrap_or(i64::MAX))
                .fetch_all(&self.read)
                .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// Records that `events` (pending ones, of which `sent` matched the endpoint's filters) are
    /// done with for `endpoint`: its cursors move past them, its failures are reset.
    ///
    /// # Errors
    /// [`Error::Database`].
    /// Only the holder of the endpoint's lease `lease` (name, holder) records anything (`false`
    /// otherwise).
    pub async fn events_delivered(
        &self,
        endpoint: &str,
        lease: (&str, &str),
        events: &[StoredEvent],
        sent: u64,
        now: i64,
    ) -> Result<bool> {
        let ends = stream_ends(events);
        let fence = self.lease_fence();
        transaction!(self, Error, |tx| {
            if !holds(tx, &fence, lease).await? {
                return Ok(false);
            }
            advance(tx, endpoint, &ends).await?;
            sqlx::query(
                "UPDATE event_endpoints SET failures = 0, last_error = NULL, last_attempt_at = $2, \
                 last_success_at = $2, seen_at = $2, next_attempt_at = NULL, delivered = delivered + $3 \
                 WHERE name = $1",
            )
            .bind(endpoint)
            .bind(now)
            .bind(i64::try_from(sent).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
            Ok(true)
        })
    }

    /// The statement that checks (and, on PostgreSQL, holds until commit) a lease.
    fn lease_fence(&self) -> String {
        format!("SELECT holder FROM gc_leases WHERE name = $1 AND holder = $2{}", self.share_lock())
    }

    /// Records a failed send to `endpoint`; returns its failures in a row. No replica sends to
    /// it again until `retry_after_ms(failures)` has passed.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn event_send_failed(
        &self,
        endpoint: &str,
        error: &str,
        now: i64,
        retry_after_ms: impl Fn(i64) -> i64,
    ) -> Result<i64> {
        transaction!(self, Error, |tx| {
            let (failures,): (i64,) = sqlx::query_as(
                "UPDATE event_endpoints SET failures = failures + 1, last_error = $2, last_attempt_at = $3, \
                 seen_at = $3 WHERE name = $1 RETURNING CAST(failures AS BIGINT)",
            )
            .bind(endpoint)
            .bind(error)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("UPDATE event_endpoints SET next_attempt_at = $2 WHERE name = $1")
                .bind(endpoint)
                .bind(now.saturating_add(retry_after_ms(failures)))
                .execute(&mut *tx)
                .await?;
            Ok(failures)
        })
    }

    /// Gives `endpoint`'s delivery of `dead` up: they become dead letters (visible, replayable);
    /// the cursors move past every event of `events` (which holds them), and the failures are
    /// reset for the events behind them.
    ///
    /// # Errors
    /// [`Error::Database`].
    #[expect(clippy::too_many_arguments, reason = "the parts of one give-up")]
    pub async fn events_dead(
        &self,
        endpoint: &str,
        lease: (&str, &str),
        events: &[StoredEvent],
        dead: &[i64],
        attempts: i64,
        error: &str,
        now: i64,
    ) -> Result<bool> {
        let ends = stream_ends(events);
        let mut dead = dead.to_vec();
        dead.sort_unstable();
        let fence = self.lease_fence();
        transaction!(self, Error, |tx| {
            if !holds(tx, &fence, lease).await? {
                return Ok(false);
            }
            for id in &dead {
                sqlx::query(
                    "INSERT INTO event_letters (endpoint, event_id, state, attempts, last_error, at) \
                     VALUES ($1, $2, 'dead', $3, $4, $5) ON CONFLICT (endpoint, event_id) DO UPDATE SET \
                     state = 'dead', attempts = excluded.attempts, last_error = excluded.last_error, at = excluded.at",
                )
                .bind(endpoint)
                .bind(*id)
                .bind(attempts)
                .bind(error)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            advance(tx, endpoint, &ends).await?;
            sqlx::query(
                "UPDATE event_endpoints SET failures = 0, failed = failed + $2, last_attempt_at = $3, \
                 next_attempt_at = NULL WHERE name = $1",
            )
            .bind(endpoint)
            .bind(i64::try_from(dead.len()).unwrap_or(i64::MAX))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Ok(true)
        })
    }

    /// Up to `limit` events queued to be delivered again to `endpoint`, oldest first, with the
    /// attempts made at each.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn replays_due(&self, endpoint: &str, limit: usize) -> Result<Vec<(StoredEvent, i64)>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, CAST(l.attempts AS BIGINT) AS attempts FROM event_letters l \
             JOIN events e ON e.id = l.event_id WHERE l.endpoint = $1 AND l.state = 'replay' ORDER BY e.id LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(endpoint)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| {
                use sqlx::{FromRow as _, Row as _};
                Ok((StoredEvent::from_row(row)?, row.try_get::<i64, _>("attempts")?))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::Database)
    }

    /// Settles replayed events `ids` of `endpoint` as `how`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn replays_settled(
        &self,
        endpoint: &str,
        ids: &[i64],
        how: Settle<'_>,
        now: i64,
    ) -> Result<()> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        transaction!(self, Error, |tx| {
            for id in &ids {
                match how {
                    Settle::Delivered | Settle::Skipped => {
                        sqlx::query("DELETE FROM event_letters WHERE endpoint = $1 AND event_id = $2")
                            .bind(endpoint)
                            .bind(*id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Settle::Failed { error, max_attempts } => {
                        sqlx::query(
                            "UPDATE event_letters SET attempts = attempts + 1, last_error = $3, at = $4, \
                             state = CASE WHEN attempts + 1 >= $5 THEN 'dead' ELSE state END \
                             WHERE endpoint = $1 AND event_id = $2",
                        )
                        .bind(endpoint)
                        .bind(*id)
                        .bind(error)
                        .bind(now)
                        .bind(max_attempts)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            if let Settle::Delivered = how {
                sqlx::query(
                    "UPDATE event_endpoints SET last_attempt_at = $2, last_success_at = $2, seen_at = $2, \
                     failures = 0, last_error = NULL, next_attempt_at = NULL, delivered = delivered + $3 \
                     WHERE name = $1",
                )
                .bind(endpoint)
                .bind(now)
                .bind(i64::try_from(ids.len()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        })
    }

    /// Queues events for delivery again to `endpoint`; returns how many.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn replay_events(&self, endpoint: &str, selection: ReplaySelection, now: i64) -> Result<u64> {
        let (filter, value) = match selection {
            ReplaySelection::Since(at) => ("SELECT id AS id FROM events WHERE at >= $3", at),
            ReplaySelection::Id(id) => ("SELECT id AS id FROM events WHERE id = $3", id),
            ReplaySelection::Dead => (
                "SELECT event_id AS id FROM event_letters WHERE endpoint = $1 AND state = 'dead' AND event_id > $3",
                0,
            ),
        };
        // `WHERE true`: SQLite needs it to tell the upsert's ON CONFLICT from a join's ON.
        let sql = format!(
            "INSERT INTO event_letters (endpoint, event_id, state, attempts, at) SELECT $1, x.id, 'replay', 0, $2 \
             FROM ({filter}) x WHERE true ON CONFLICT (endpoint, event_id) DO UPDATE SET state = 'replay', \
             attempts = 0, at = excluded.at"
        );
        transaction!(self, Error, |tx| {
            let done = sqlx::query(&sql).bind(endpoint).bind(now).bind(value).execute(&mut *tx).await?;
            Ok(done.rows_affected())
        })
    }

    /// Where `endpoint`'s delivery stands.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn endpoint_state(&self, endpoint: &str) -> Result<EndpointState> {
        let (pending, oldest): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT CAST(SUM(c.seq - COALESCE(k.seq, 0)) AS BIGINT), MIN(e.at) FROM event_counters c \
             LEFT JOIN event_cursors k ON k.endpoint = $1 AND k.stream = c.stream \
             LEFT JOIN events e ON e.stream = c.stream AND e.seq = COALESCE(k.seq, 0) + 1 \
             WHERE c.seq > COALESCE(k.seq, 0)",
        )
        .bind(endpoint)
        .fetch_one(&self.read)
        .await?;
        // failures, last_error, last_attempt_at, last_success_at, delivered, failed
        type Row = (i64, Option<String>, Option<i64>, Option<i64>, i64, i64);
        let row: Option<Row> = sqlx::query_as(
            "SELECT CAST(failures AS BIGINT), last_error, last_attempt_at, last_success_at, delivered, failed \
             FROM event_endpoints WHERE name = $1",
        )
        .bind(endpoint)
        .fetch_optional(&self.read)
        .await?;
        let (dead, replays): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN state = 'replay' THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM event_letters l JOIN events e ON e.id = l.event_id WHERE l.endpoint = $1",
        )
        .bind(endpoint)
        .fetch_one(&self.read)
        .await?;
        let (failures, last_error, last_attempt_at, last_success_at, delivered, failed) =
            row.unwrap_or_default();
        Ok(EndpointState {
            pending: pending.unwrap_or(0),
            oldest_pending_at: oldest,
            failures,
            last_error,
            last_attempt_at,
            last_success_at,
            delivered,
            failed,
            dead_letters: dead,
            replays,
        })
    }

    /// `endpoint`'s dead letters, newest first (at most `limit`).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn dead_letters(&self, endpoint: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, CAST(l.attempts AS BIGINT) AS attempts, l.last_error AS letter_error, \
             l.at AS letter_at FROM event_letters l JOIN events e ON e.id = l.event_id \
             WHERE l.endpoint = $1 AND l.state = 'dead' ORDER BY l.at DESC, e.id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql).bind(endpoint).bind(limit).fetch_all(&self.read).await?;
        rows.iter()
            .map(|row| {
                use sqlx::{FromRow as _, Row as _};
                Ok(DeadLetter {
                    event: StoredEvent::from_row(row)?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("letter_error")?,
                    at: row.try_get("letter_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Error::Database)
    }

    /// Events with an id above `after`, in id order (at most `limit`): the log as written.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<StoredEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.id > $1 ORDER BY e.id LIMIT $2");
        Ok(sqlx::query_as(&sql).bind(after).bind(limit).fetch_all(&self.read).await?)
    }

    /// Removes up to `limit` events that happened before `before` and that every endpoint seen
    /// since `before` (registered or delivered to by some replica: `event_endpoints.seen_at`) is
    /// done with — delivered or given up, and no letter of such an endpoint names them. Returns
    /// how many went. Goes by the endpoints in the database, not this replica's configuration,
    /// so a replica that does not know an endpoint never prunes its events.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn prune_events(&self, before: i64, limit: i64) -> Result<u64> {
        let sql = "DELETE FROM events WHERE id IN (SELECT e.id FROM events e WHERE e.at < $1 \
             AND NOT EXISTS (SELECT 1 FROM event_letters l JOIN event_endpoints p ON p.name = l.endpoint \
               WHERE l.event_id = e.id AND p.seen_at >= $1) \
             AND NOT EXISTS (SELECT 1 FROM event_endpoints p WHERE p.seen_at >= $1 AND NOT EXISTS ( \
               SELECT 1 FROM event_cursors k WHERE k.endpoint = p.name AND k.stream = e.stream AND k.seq >= e.seq)) \
             ORDER BY e.at LIMIT $2)";
        transaction!(self, Error, |tx| {
            Ok(sqlx::query(sql).bind(before).bind(limit).execute(&mut *tx).await?.rows_affected())
        })
    }
}

/// The highest sequence number of each stream among `events`.
fn stream_ends(events: &[StoredEvent]) -> BTreeMap<String, i64> {
    let mut ends = BTreeMap::new();
    for e in events {
        let end = ends.entry(e.stream.clone()).or_insert(e.seq);
        *end = (*end).max(e.seq);
    }
    ends
}

/// Whether `lease` (name, holder) is held, checked with `fence` ([`MetaStore::lease_fence`]).
async fn holds(tx: &mut AnyConnection, fence: &str, lease: (&str, &str)) -> Result<bool, sqlx::Error> {
    let held: Option<(String,)> =
        sqlx::query_as(fence).bind(lease.0).bind(lease.1).fetch_optional(&mut *tx).await?;
    Ok(held.is_some())
}

/// Moves `endpoint`'s cursors forward to `ends` (never back).
async fn advance(
    tx: &mut AnyConnection,
    endpoint: &str,
    ends: &BTreeMap<String, i64>,
) -> Result<(), sqlx::Error> {
    for (stream, seq) in ends {
        sqlx::query(
            "INSERT INTO event_cursors (endpoint, stream, seq) VALUES ($1, $2, $3) \
             ON CONFLICT (endpoint, stream) DO UPDATE SET seq = CASE WHEN excluded.seq > event_cursors.seq \
             THEN excluded.seq ELSE event_cursors.seq END",
        )
        .bind(endpoint)
        .bind(stream)
        .bind(*seq)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
