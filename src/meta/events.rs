//! Events: the record of every change, written by the change's own transaction, and the state
//! of their delivery to each endpoint (docs/events.md).
//!
//! A transaction's code notes its changes with [`record`] as it makes them; the
//! [`transaction!`](super::transaction) macro gives each attempt a fresh journal and, as the last
//! statements before `COMMIT`, writes what was noted ([`flush`]). So an event exists exactly when
//! its change committed: a refused or rolled-back attempt leaves its journal behind with
//! everything else. The flush bumps each stream's counter row (streams in name order) and takes
//! the events' sequence numbers from it; the row stays locked until commit, so within a stream a
//! higher sequence number is a later commit, and a reader that has seen the counter at `n` will
//! find every event up to `n`. The counter rows are the last rows any transaction locks, so they
//! add no cycle to the lock order.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sqlx::AnyConnection;

tokio::task_local! {
    static JOURNAL: RefCell<Vec<NewEvent>>;
}

/// One change, as noted by the transaction making it.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    /// What happened (`manifest.pushed`, `tag.deleted`, …; [`crate::events::KINDS`]).
    pub kind: &'static str,
    /// The repository it happened in (`None` for registry-wide blob events).
    pub repository: Option<String>,
    /// The manifest's or blob's digest.
    pub digest: Option<String>,
    /// Its media type.
    pub media_type: Option<String>,
    /// Its size in bytes (for collections: the bytes freed).
    pub size: Option<i64>,
    /// The tag, for tag events (and a push by tag).
    pub tag: Option<String>,
    /// Where a moved tag pointed before.
    pub old_digest: Option<String>,
    /// Who: a user, `retention:RULE`, `collector`, `import`, `proxy:PREFIX`.
    pub actor: Option<String>,
    /// When (the application clock).
    pub at: i64,
    /// Kind-specific facts.
    pub detail: Option<serde_json::Value>,
}

impl NewEvent {
    /// An event of `kind` in `repository`, by `actor`, at `at`.
    pub fn new(kind: &'static str, repository: &str, actor: Option<&str>, at: i64) -> Self {
        NewEvent {
            kind,
            repository: Some(repository.to_string()),
            actor: actor.map(str::to_string),
            at,
            ..Default::default()
        }
    }

    /// The same event about `digest`.
    #[must_use]
    pub fn digest(mut self, digest: &str) -> Self {
        self.digest = Some(digest.to_string());
        self
    }

    /// The same event about tag `tag`.
    #[must_use]
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = Some(tag.to_string());
        self
    }

    /// The same event with a detail `key` set to `value`.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        let detail = self.detail.get_or_insert_with(|| serde_json::json!({}));
        if let Some(map) = detail.as_object_mut() {
            map.insert(key.to_string(), value.into());
        }
        self
    }

    /// The stream that orders it: its repository, or one of 16 registry-wide blob streams
    /// (by the digest's first hex digit, so collectors do not queue on one counter row).
    fn stream(&self) -> String {
        match &self.repository {
            Some(r) => r.clone(),
            None => {
                let hex = self.digest.as_deref().and_then(|d| d.split_once(':')).map_or("", |(_, h)| h);
                format!("/blobs/{}", hex.chars().next().unwrap_or('0'))
            }
        }
    }
}

/// Notes `event` in the journal of the transaction running on this task. Outside a write
/// transaction (a dry run's rolled-back review) nothing is noted.
pub(crate) fn record(event: NewEvent) {
    let _ = JOURNAL.try_with(|j| j.borrow_mut().push(event));
}

/// How many events the running transaction has noted: a mark to [`truncate`] back to when the
/// transaction rolls back to a savepoint taken here.
pub(crate) fn mark() -> usize {
    JOURNAL.try_with(|j| j.borrow().len()).unwrap_or(0)
}

/// Forgets the events noted since `mark`: their changes were rolled back to a savepoint.
pub(crate) fn truncate(mark: usize) {
    let _ = JOURNAL.try_with(|j| j.borrow_mut().truncate(mark));
}

/// When the running transaction's changes happened, as its events say (the application clock),
/// or the system clock when it noted none.
pub(crate) fn journal_time() -> i64 {
    JOURNAL
        .try_with(|j| j.borrow().iter().map(|e| e.at).max())
        .ok()
        .flatten()
        .unwrap_or_else(crate::time::system_now_ms)
}

/// Runs one attempt of a write transaction's body with a fresh journal.
pub(crate) async fn journaled<F: std::future::Future>(body: F) -> F::Output {
    JOURNAL.scope(RefCell::new(Vec::new()), body).await
}

/// Awaits a transaction body, fixing its error type (so `?` and `return Err(..)` in it infer).
pub(crate) async fn body<T, E>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, E> {
    f.await
}

/// Wakes this replica's deliverers: a transaction that wrote events committed.
pub(crate) fn committed() {
    crate::events::WRITTEN.notify_waiters();
}

/// How many event rows one statement inserts.
const INSERT_CHUNK: usize = 64;

/// Writes the events noted in this attempt's journal: the last statements of the transaction.
/// Returns whether there were any.
pub(crate) async fn flush(tx: &mut AnyConnection) -> Result<bool, sqlx::Error> {
    let noted = JOURNAL.try_with(|j| std::mem::take(&mut *j.borrow_mut())).unwrap_or_default();
    if noted.is_empty() {
        return Ok(false);
    }
    let request = crate::events::current_request().map(|r| r.to_json());
    // Streams in name order: the fixed order of the counter rows' locks.
    let mut streams: BTreeMap<String, Vec<NewEvent>> = BTreeMap::new();
    for event in noted {
        streams.entry(event.stream()).or_default().push(event);
    }
    for (stream, events) in streams {
        let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
        let (last,): (i64,) = sqlx::query_as(
            "INSERT INTO event_counters (stream, seq) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET seq = event_counters.seq + excluded.seq RETURNING seq",
        )
        .bind(&stream)
        .bind(n)
        .fetch_one(&mut *tx)
        .await?;
        let mut seq = last - n;
        for chunk in events.chunks(INSERT_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| {
                    let cols = (1..=COLUMNS).map(|c| format!("${}", i * COLUMNS + c)).collect::<Vec<_>>();
                    format!("({})", cols.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO events (stream, seq, at, kind, repository, digest, media_type, size, tag, \
                 old_digest, actor, request, detail) VALUES {values}"
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                seq += 1;
                q = q
                    .bind(stream.clone())
                    .bind(seq)
                    .bind(e.at)
                    .bind(e.kind)
                    .bind(e.repository.clone())
                    .bind(e.digest.clone())
                    .bind(e.media_type.clone())
                    .bind(e.size)
                    .bind(e.tag.clone())
                    .bind(e.old_digest.clone())
                    .bind(e.actor.clone())
                    .bind(request.clone())
                    .bind(e.detail.as_ref().map(serde_json::Value::to_string));
            }
            q.execute(&mut *tx).await?;
        }
    }
    Ok(true)
}

/// The columns [`flush`] writes per event.
const COLUMNS: usize = 13;
