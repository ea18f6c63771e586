//! The collector's state for `berth gc status`: the queue by kind (due, overdue, the oldest due
//! item's age), the outbox, the last passes, where the sweep and the scrub stand, and what the
//! scrub has found.

use super::{Finding, MetaStore, Result};

/// Passes kept in `gc_passes`.
const PASSES_KEPT: i64 = 100;

/// One collection pass that did something.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct PassRecord {
    /// Which process ran it.
    pub replica: String,
    /// When it started and finished (Unix ms).
    pub started_at: i64,
    /// When it finished.
    pub finished_at: i64,
    /// Reviews carried out.
    pub reviews: i64,
    /// Manifests collected.
    pub manifests: i64,
    /// Blobs collected.
    pub blobs: i64,
    /// Their bytes.
    pub bytes: i64,
    /// Abandoned upload sessions removed.
    pub uploads_expired: i64,
    /// Storage objects deleted.
    pub objects_deleted: i64,
    /// Reviews and deletes that failed (retried later).
    pub errors: i64,
}

/// The review queue for one kind of item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepth {
    /// `blob` or `manifest`.
    pub kind: String,
    /// Reviews queued.
    pub queued: i64,
    /// Of those, due now.
    pub due: i64,
    /// Of those, due for longer than the overdue margin.
    pub overdue: i64,
    /// How long the oldest due review has waited (ms), if one is due.
    pub oldest_due_ms: Option<i64>,
}

/// The outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxState {
    /// Storage keys waiting to be deleted.
    pub keys: i64,
    /// Of those, keys whose delete failed at least once.
    pub failing: i64,
    /// How long the oldest key has waited (ms).
    pub oldest_ms: Option<i64>,
}

/// A background pass's progress, by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PassProgress {
    /// `sweep-storage`, `sweep-blob-rows`, `sweep-manifest-rows`, `scrub`.
    pub name: String,
    /// Where the next step starts (a storage key or a row id; empty: from the start).
    pub resume_after: String,
    /// When the current pass started.
    pub pass_started_at: i64,
    /// Passes finished.
    pub passes: i64,
    /// When the last step ran.
    pub step_at: i64,
}

/// A stored finding of the scrub.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredFinding {
    /// What was found.
    #[serde(flatten)]
    pub finding: Finding,
    /// When (Unix ms).
    pub found_at: i64,
}

/// The collector's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcStatus {
    /// The review queue, by kind.
    pub queue: Vec<QueueDepth>,
    /// The outbox.
    pub outbox: OutboxState,
    /// Abandoned upload sessions due for removal now.
    pub uploads_expiring: i64,
    /// The last passes that did something, newest first.
    pub passes: Vec<PassRecord>,
    /// The sweep's and the scrub's progress.
    pub progress: Vec<PassProgress>,
    /// What the scrub found and has not yet seen mended.
    pub findings: Vec<StoredFinding>,
}

impl MetaStore {
    /// Records a pass that did something, keeping the newest hundred.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn record_pass(&self, pass: &PassRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO gc_passes (replica, started_at, finished_at, reviews, manifests, blobs, bytes, \
             uploads_expired, objects_deleted, errors) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&pass.replica)
        .bind(pass.started_at)
        .bind(pass.finished_at)
        .bind(pass.reviews)
        .bind(pass.manifests)
        .bind(pass.blobs)
        .bind(pass.bytes)
        .bind(pass.uploads_expired)
        .bind(pass.objects_deleted)
        .bind(pass.errors)
        .execute(&self.write)
        .await?;
        self.keep_newest("gc_passes", PASSES_KEPT).await
    }

    /// Forgets all but the newest `kept` rows of `table` (a record of runs, ids ascending).
    pub(super) async fn keep_newest(&self, table: &str, kept: i64) -> Result<()> {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE id < (SELECT MIN(id) FROM \
             (SELECT id FROM {table} ORDER BY id DESC LIMIT $1) AS newest)"
        ))
        .bind(kept)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// The collector's state at `now`; reviews due for longer than `overdue_ms` count as
    /// overdue, sessions idle since `idle_before` as expiring.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn gc_status(&self, now: i64, overdue_ms: i64, idle_before: i64) -> Result<GcStatus> {
        let queue: Vec<(String, i64, i64, i64, Option<i64>)> = sqlx::query_as(
            "SELECT kind, COUNT(*), \
             SUM(CASE WHEN review_after <= $1 THEN 1 ELSE 0 END), \
             SUM(CASE WHEN review_after <= $2 THEN 1 ELSE 0 END), \
             MIN(CASE WHEN review_after <= $1 THEN review_after END) \
             FROM gc_reviews GROUP BY kind ORDER BY kind",
        )
        .bind(now)
        .bind(now - overdue_ms)
        .fetch_all(&self.read)
        .await?;
        let queue = queue
            .into_iter()
            .map(|(kind, queued, due, overdue, oldest)| QueueDepth {
                kind,
                queued,
                due,
                overdue,
                oldest_due_ms: oldest.map(|at| now - at),
            })
            .collect();
        let (keys, failing, oldest): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), MIN(enqueued_at) FROM gc_outbox",
        )
        .fetch_one(&self.read)
        .await?;
        let outbox =
            OutboxState { keys, failing: failing.unwrap_or(0), oldest_ms: oldest.map(|at| now - at) };
        let (uploads_expiring,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM uploads WHERE updated_at < $1")
                .bind(idle_before)
                .fetch_one(&self.read)
                .await?;
        let passes: Vec<PassRecord> = sqlx::query_as(
            "SELECT replica, started_at, finished_at, reviews, manifests, blobs, bytes, uploads_expired, \
             objects_deleted, errors FROM gc_passes ORDER BY id DESC LIMIT 20",
        )
        .fetch_all(&self.read)
        .await?;
        let progress: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT name, resume_after, pass_started_at, passes, step_at FROM gc_progress ORDER BY name",
        )
        .fetch_all(&self.read)
        .await?;
        let progress = progress
            .into_iter()
            .map(|(name, resume_after, pass_started_at, passes, step_at)| PassProgress {
                name,
                resume_after,
                pass_started_at,
                passes,
                step_at,
            })
            .collect();
        let findings = self
            .findings()
            .await?
            .into_iter()
            .map(|(finding, found_at)| StoredFinding { finding, found_at })
            .collect();
        Ok(GcStatus { queue, outbox, uploads_expiring, passes, progress, findings })
    }
}
