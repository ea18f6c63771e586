//! The collector's side of the store: the review queue events fill, one review at a time
//! (claim, lock the item, re-check liveness, act — in one transaction), and the delete outbox.
//!
//! Liveness (docs/design.md): a manifest is kept while a tag points at it, a live index lists
//! it, it refers to a live subject, it was pushed, pulled or untagged within `untagged_grace`, or
//! it is a restorable tombstone within `restore_window`. A blob is kept while any manifest row
//! references it (live, or a tombstone not yet collected) or it was uploaded, linked or answered
//! a `HEAD` within `blob_grace`; its link into a repository is kept while a manifest of that
//! repository references it or within the same grace. Lock, then check: the item's row is locked before anything that
//! holds it is read, so a push that share-locked it first is seen, and a push that comes after
//! finds it gone.

use sqlx::AnyConnection;

use super::events::NewEvent;

use super::{Dialect, Error, MetaStore, Result, transaction};

/// What a review is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Review {
    /// A blob row.
    Blob(i64),
    /// A manifest row.
    Manifest(i64),
}

impl Review {
    /// `blob` or `manifest`.
    pub fn kind(self) -> &'static str {
        match self {
            Review::Blob(_) => "blob",
            Review::Manifest(_) => "manifest",
        }
    }

    /// The row id.
    pub fn id(self) -> i64 {
        match self {
            Review::Blob(id) | Review::Manifest(id) => id,
        }
    }
}

/// What one review did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Manifest rows removed.
    pub manifests: u64,
    /// Blob rows removed (their keys went to the outbox).
    pub blobs: u64,
    /// Bytes of those blobs.
    pub bytes: u64,
    /// What was collected: `REPO@DIGEST`, or the blob's digest (empty when nothing was).
    pub subject: String,
    /// The reviews the collection made due at once (what a collected manifest referenced, its
    /// children and referrers): the same pass reviews them next.
    pub made_due: Vec<Review>,
}

/// An item a dry run found the collector would take now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WouldCollect {
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `REPO@DIGEST`, or the blob's digest.
    pub subject: String,
    /// The storage bytes its collection frees (a blob's size; 0 for a manifest, which lives in
    /// the metadata store).
    pub bytes: u64,
}

/// How one review ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewOutcome {
    /// Carried out (possibly collecting nothing).
    Done(Collected),
    /// Another transaction held the item (or a row its collection removes): left for a moment,
    /// never waited for (docs/design.md, lock order).
    Busy(Review),
    /// Failed; postponed.
    Failed {
        /// The item.
        item: Review,
        /// Why.
        error: String,
    },
}

/// The decision about one item.
enum Verdict {
    /// Gone, or held by something whose own change will enqueue it again: drop the review.
    Drop,
    /// Held by a window that ends then.
    Until(i64),
    /// Collected.
    Collected(Collected),
}

/// How a review runs: the clause that locks the item and the rows it removes (`NOWAIT` on
/// PostgreSQL), and whether it is a dry run's (no queue or outbox rows written).
#[derive(Clone, Copy)]
struct How {
    lock: &'static str,
    dry: bool,
}

/// What a dry run has found so far.
#[derive(Default)]
struct DryRunState {
    reviews: u64,
    /// Reviews skipped because another transaction held their item.
    busy: u64,
    found: Vec<WouldCollect>,
    /// Subjects in `found`.
    listed: std::collections::HashSet<String>,
    /// Items the dry run collected.
    collected: std::collections::HashSet<Review>,
    /// For an item a collection made due: the manifests whose collection did.
    made_due_by: std::collections::HashMap<Review, std::collections::BTreeSet<i64>>,
    /// Items last reviewed while some manifest that made them due was still there.
    stale: std::collections::BTreeSet<Review>,
}

/// How long a review waits when its item was locked by another transaction.
const ITEM_BUSY_PAUSE_MS: i64 = 250;

/// Whether PostgreSQL refused a `NOWAIT` lock because another transaction holds the row.
fn is_lock_not_available(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "55P03")
}

/// Whether PostgreSQL aborted the transaction to break a deadlock.
fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "40P01")
}

/// How often an unreferenced blob whose bytes an unfinished import adopted is looked at again.
const IMPORT_RECHECK_MS: i64 = 3600 * 1000;

/// When an unreferenced blob's grace ends: its upload, its last link (upload, mount) or its last
/// `HEAD`, plus `blob_grace`.
pub(super) fn blob_grace_end(created_at: i64, last_link: Option<i64>, seen_at: i64, grace: i64) -> i64 {
    created_at.max(last_link.unwrap_or(0)).max(seen_at).saturating_add(grace)
}

/// When a manifest nothing holds leaves its grace: its push, last pull or last untagging, plus
/// `untagged_grace`.
pub(super) fn untagged_grace_end(
    pushed_at: i64,
    pulled_at: Option<i64>,
    untagged_at: Option<i64>,
    grace: i64,
) -> i64 {
    pushed_at.max(pulled_at.unwrap_or(0)).max(untagged_at.unwrap_or(0)).saturating_add(grace)
}

/// Until when a tombstone is restorable (and holds what it references); `None` for one marked
/// unrestorable (purged, or an index whose child was collected).
pub(super) fn restore_window_end(deleted_at: i64, unrestorable: bool, window: i64) -> Option<i64> {
    (!unrestorable).then(|| deleted_at.saturating_add(window))
}

/// The condition on an outbox row `o` that no running backup holds it (`$1`: now, `$3`: the
/// clock margin): every live hold lists the key among those queued before it was taken — before
/// its snapshot, which therefore cannot name it. A hold lapses when its backup stops renewing it.
const NOT_HELD: &str = "NOT EXISTS (SELECT 1 FROM backup_holds h WHERE h.expires_at + $3 > $1 \
     AND NOT EXISTS (SELECT 1 FROM backup_hold_free f WHERE f.hold_id = h.id AND f.storage_key = o.storage_key))";

impl MetaStore {
    /// Upserts a review of `item` at `at`, written in the event's own transaction. The queue
    /// time is a lower bound, not a verdict: a review derives the item's real deadline from its
    /// rows and reschedules itself when it came early, so of two times the earlier one is kept —
    /// a tombstone's restore window may end before the untagged grace an earlier push asked
    /// for. Both dialects take the same statement.
    pub(super) async fn enqueue(tx: &mut AnyConnection, item: Review, at: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO gc_reviews (kind, item_id, review_after) VALUES ($1, $2, $3) \
             ON CONFLICT (kind, item_id) DO UPDATE SET review_after = CASE \
             WHEN excluded.review_after < gc_reviews.review_after THEN excluded.review_after \
             ELSE gc_reviews.review_after END",
        )
        .bind(item.kind())
        .bind(item.id())
        .bind(at)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Records in the outbox that the object under `key` is to be deleted once the calling
    /// transaction commits.
    pub(super) async fn to_outbox(tx: &mut AnyConnection, key: &str, now: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO gc_outbox (storage_key, enqueued_at, next_attempt) VALUES ($1, $2, $2) \
             ON CONFLICT (storage_key) DO NOTHING",
        )
        .bind(key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// The collector's windows.
    pub fn windows(&self) -> super::Windows {
        self.windows
    }

    /// Claims one review that is due at `now` and carries it out in one transaction. `None` when
    /// nothing is due (or everything due is claimed by other workers right now). A review that
    /// fails is postponed, the pause growing with its failures (up to an hour), and reported as
    /// [`ReviewOutcome::Failed`]: the next claim takes another item.
    ///
    /// # Errors
    /// [`Error::Database`] when the store fails outside any one item (the claim, the postponing).
    pub async fn review_one(&self, now: i64) -> Result<Option<ReviewOutcome>> {
        let claim = self.claim_sql();
        // The queue row is claimed before the item is locked — the opposite of the order the
        // events take them in (an upload, a delete or a tag move locks the item, then upserts its
        // review). So the collector never waits for the item: a busy item is left for a moment
        // (below), and no cycle can form (docs/design.md, lock order).
        let lock = match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE NOWAIT",
        };
        let w = self.windows;
        let mut claimed = None;
        let result = transaction!(self, Error, |tx| {
            claimed = None;
            let row: Option<(String, i64)> =
                sqlx::query_as(&claim).bind(now).fetch_optional(&mut *tx).await?;
            let Some((kind, id)) = row else { return Ok(None) };
            let item = if kind == "blob" { Review::Blob(id) } else { Review::Manifest(id) };
            claimed = Some(item);
            Ok(Some(Self::carry_out(tx, item, now, w, How { lock, dry: false }).await?))
        });
        match (result, claimed) {
            (Ok(done), _) => Ok(done.map(ReviewOutcome::Done)),
            (Err(Error::Database(e)), Some(item)) if is_lock_not_available(&e) => {
                // Someone is changing the item right now; their change enqueues what it needs. Only
                // ever brought forward to the pause's end, never past a later time set meanwhile.
                sqlx::query(
                    "UPDATE gc_reviews SET review_after = $1 WHERE kind = $2 AND item_id = $3 AND review_after < $1",
                )
                .bind(now.saturating_add(ITEM_BUSY_PAUSE_MS))
                .bind(item.kind())
                .bind(item.id())
                .execute(&self.write)
                .await?;
                Ok(Some(ReviewOutcome::Busy(item)))
            }
            (Err(e), Some(item)) if !e.is_busy() => {
                sqlx::query(
                    "UPDATE gc_reviews SET attempts = attempts + 1, \
                     review_after = $1 + CASE WHEN attempts >= 60 THEN 3600000 ELSE 1000 * (1 + attempts * attempts) END \
                     WHERE kind = $2 AND item_id = $3",
                )
                .bind(now)
                .bind(item.kind())
                .bind(item.id())
                .execute(&self.write)
                .await?;
                Ok(Some(ReviewOutcome::Failed { item, error: e.to_string() }))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Reviews `item` and settles its queue entry: rescheduled when a window holds it, removed
    /// when it was collected or something else holds it.
    async fn carry_out(
        tx: &mut AnyConnection,
        item: Review,
        now: i64,
        w: super::Windows,
        how: How,
    ) -> Result<Collected, sqlx::Error> {
        let verdict = match item {
            Review::Blob(id) => Self::review_blob(tx, id, now, w.blob_hold_ms(), how).await?,
            Review::Manifest(id) => Self::review_manifest(tx, id, now, w, how).await?,
        };
        if how.dry {
            // A dry run writes no queue row: it follows `made_due` instead, and must not wait for
            // (or deadlock with) a writer holding one.
            return Ok(match verdict {
                Verdict::Collected(c) => c,
                Verdict::Until(_) | Verdict::Drop => Collected::default(),
            });
        }
        Ok(match verdict {
            Verdict::Until(at) => {
                sqlx::query(
                    "UPDATE gc_reviews SET review_after = $1, attempts = 0 WHERE kind = $2 AND item_id = $3",
                )
                .bind(at.max(now + 1))
                .bind(item.kind())
                .bind(item.id())
                .execute(&mut *tx)
                .await?;
                Collected::default()
            }
            Verdict::Drop | Verdict::Collected(_) => {
                sqlx::query("DELETE FROM gc_reviews WHERE kind = $1 AND item_id = $2")
                    .bind(item.kind())
                    .bind(item.id())
                    .execute(&mut *tx)
                    .await?;
                if let Verdict::Collected(c) = verdict { c } else { Collected::default() }
            }
        })
    }

    /// What a collection pass would collect at `now` (at most `max_reviews` reviews), changing
    /// nothing: the very reviews a pass carries out, in transactions that are rolled back. No
    /// lock outlives one review and the reviews its collection made due (a collected manifest's
    /// blobs, children and referrers), so writers wait for a dry run no longer than for a pass.
    ///
    /// A pass runs until nothing is due, so an item held only by manifests collected in
    /// *different* reviews (a layer two old images share) goes too. The dry run follows that: an
    /// item made due by a collection but still held is reviewed again, in a transaction that
    /// first removes every collected manifest that made it due, until nothing changes. An item
    /// another transaction holds is skipped, as a pass skips it, and counted (`.0.1`).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn dry_run(&self, now: i64, max_reviews: u64) -> Result<((u64, u64), Vec<WouldCollect>)> {
        let mut run = DryRunState::default();
        // The due reviews in queue order, read page by page outside any transaction (by key,
        // not offset; what a review changes is rolled back, so the queue stays as it was).
        let mut after = (i64::MIN, String::new(), i64::MIN);
        'pages: loop {
            let page: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT review_after, kind, item_id FROM gc_reviews WHERE review_after <= $1 \
                 AND (review_after > $2 OR (review_after = $2 AND (kind > $3 OR (kind = $3 AND item_id > $4)))) \
                 ORDER BY review_after, kind, item_id LIMIT 500",
            )
            .bind(now)
            .bind(after.0)
            .bind(&after.1)
            .bind(after.2)
            .fetch_all(&self.write)
            .await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            for (_, kind, id) in page {
                if run.reviews >= max_reviews {
                    break 'pages;
                }
                let item = if kind == "blob" { Review::Blob(id) } else { Review::Manifest(id) };
                self.dry_review(&mut run, item, now, max_reviews).await?;
            }
        }
        // Items still held after their review, by collections of other reviews: again, with all
        // of those removed, until no review collects more.
        while run.reviews < max_reviews {
            let Some(item) = run.stale.iter().next().copied() else { break };
            run.stale.remove(&item);
            self.dry_review(&mut run, item, now, max_reviews).await?;
        }
        Ok(((run.reviews, run.busy), run.found))
    }

    /// One dry review of `item` and its cascade, in a transaction rolled back at once; before it,
    /// the transaction removes the collected manifests that made `item` due.
    async fn dry_review(
        &self,
        run: &mut DryRunState,
        item: Review,
        now: i64,
        max_reviews: u64,
    ) -> Result<()> {
        let lock = match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE NOWAIT",
        };
        let how = How { lock, dry: true };
        let removed: Vec<i64> =
            run.made_due_by.get(&item).map(|s| s.iter().copied().collect()).unwrap_or_default();
        let mut tx = self.begin().await?;
        let mut group: Vec<(Review, Collected)> = Vec::new();
        let outcome: Result<(), sqlx::Error> = async {
            if !removed.is_empty() {
                // Only what ties `item` to the collected manifests that made it due goes (not the
                // manifests themselves: a layer a thousand old images share would lock them all).
                let ids = removed.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                let statements: Vec<String> = match item {
                    Review::Blob(_) => vec![
                        format!("SELECT manifest_id FROM manifest_blobs WHERE blob_id = $1 AND manifest_id IN ({ids}){lock}"),
                        format!("DELETE FROM manifest_blobs WHERE blob_id = $1 AND manifest_id IN ({ids})"),
                    ],
                    Review::Manifest(_) => vec![
                        format!("SELECT parent_id FROM manifest_children WHERE child_id = $1 AND parent_id IN ({ids}){lock}"),
                        format!("DELETE FROM manifest_children WHERE child_id = $1 AND parent_id IN ({ids})"),
                        // A subject among them: as if gone (a live subject holds its referrers).
                        format!(
                            "SELECT id FROM manifests WHERE id IN ({ids}) AND deleted_at IS NULL \
                             AND digest = (SELECT subject_digest FROM manifests WHERE id = $1){lock}"
                        ),
                        format!(
                            "UPDATE manifests SET deleted_at = 0, unrestorable = 'collected' WHERE id IN ({ids}) \
                             AND deleted_at IS NULL AND digest = (SELECT subject_digest FROM manifests WHERE id = $1)"
                        ),
                    ],
                };
                for sql in statements.iter().filter(|sql| !lock.is_empty() || !sql.starts_with("SELECT")) {
                    sqlx::query(sql).bind(item.id()).execute(&mut *tx).await?;
                }
            }
            let mut next = vec![item];
            while let Some(item) = next.pop() {
                if run.reviews >= max_reviews {
                    break;
                }
                run.reviews += 1;
                let done = Self::carry_out(&mut tx, item, now, self.windows, how).await?;
                next.extend(done.made_due.iter().rev());
                group.push((item, done));
            }
            Ok(())
        }
        .await;
        tx.rollback().await?;
        match outcome {
            Ok(()) => {}
            // Another writer holds a row the review needs (PostgreSQL never lets a dry run wait:
            // `NOWAIT`; a deadlock it was picked for is the same).
            Err(e) if is_lock_not_available(&e) || is_deadlock(&e) => {
                run.busy += 1;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        // What was removed before each item of the group was last reviewed: the collected
        // manifests that made the root due, and every manifest the group collected (one that made
        // an item due put it on the stack again, so it was reviewed after).
        let removed_in_group: std::collections::BTreeSet<i64> = removed
            .into_iter()
            .chain(group.iter().filter_map(|(i, d)| match i {
                Review::Manifest(id) if !d.subject.is_empty() => Some(*id),
                _ => None,
            }))
            .collect();
        for (item, done) in &group {
            if done.subject.is_empty() {
                continue;
            }
            run.collected.insert(*item);
            if run.listed.insert(done.subject.clone()) {
                run.found.push(WouldCollect {
                    kind: item.kind(),
                    subject: done.subject.clone(),
                    bytes: done.bytes,
                });
            }
            if let Review::Manifest(id) = item {
                for due in &done.made_due {
                    run.made_due_by.entry(*due).or_default().insert(*id);
                }
            }
        }
        for (item, _) in &group {
            if run.collected.contains(item) {
                run.stale.remove(item);
            } else if run.made_due_by.get(item).is_some_and(|by| !by.is_subset(&removed_in_group)) {
                run.stale.insert(*item);
            } else {
                run.stale.remove(item);
            }
        }
        Ok(())
    }

    /// The statement that claims the earliest due review, skipping those other workers hold.
    fn claim_sql(&self) -> String {
        let skip_locked = match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        format!(
            "SELECT kind, item_id FROM gc_reviews WHERE review_after <= $1 ORDER BY review_after LIMIT 1{skip_locked}"
        )
    }

    async fn review_blob(
        tx: &mut AnyConnection,
        id: i64,
        now: i64,
        grace: i64,
        how: How,
    ) -> Result<Verdict, sqlx::Error> {
        let lock = how.lock;
        let sql =
            format!("SELECT digest, size, storage_key, created_at, seen_at FROM blobs WHERE id = $1{lock}");
        let row: Option<(String, i64, String, i64, Option<i64>)> =
            sqlx::query_as(&sql).bind(id).fetch_optional(&mut *tx).await?;
        let Some((digest, size, key, created_at, seen_at)) = row else { return Ok(Verdict::Drop) };
        let seen_at = seen_at.unwrap_or(0);
        // A link that no manifest of its repository references is kept for `blob_grace` after
        // it was made (or the blob last answered a HEAD), like an unreferenced blob: the time for
        // the manifest push it announced. After that it goes even if the blob lives on elsewhere.
        let links: Vec<(i64, i64)> =
            sqlx::query_as("SELECT repository_id, linked_at FROM repository_blobs WHERE blob_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        if !lock.is_empty() {
            // The link rows it may remove, taken like the blob (an unlink or restore may hold them).
            sqlx::query(&format!("SELECT repository_id FROM repository_blobs WHERE blob_id = $1{lock}"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let cutoff = now.saturating_sub(grace);
        let mut loose_since = None;
        let prunable = seen_at <= cutoff && links.iter().any(|&(_, linked_at)| linked_at <= cutoff);
        if !prunable {
            // Nothing can go yet: look again when the oldest link's grace ends.
            loose_since = links.iter().map(|&(_, linked_at)| linked_at).min();
        } else {
            // The repositories whose manifests reference the blob: one walk of its references
            // (through the blob's index — CROSS JOIN keeps SQLite from starting at the
            // repository's manifests instead, which costs as much as the repository is large).
            let referencing: Vec<(i64,)> = sqlx::query_as(
                "SELECT DISTINCT m.repository_id FROM manifest_blobs mb CROSS JOIN manifests m \
                 WHERE mb.blob_id = $1 AND m.id = mb.manifest_id",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            for (repo, linked_at) in links {
                if referencing.iter().any(|(r,)| *r == repo) {
                    continue;
                }
                if linked_at <= cutoff && seen_at <= cutoff {
                    let unlinked =
                        sqlx::query("DELETE FROM repository_blobs WHERE repository_id = $1 AND blob_id = $2")
                            .bind(repo)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    // An unlink may have taken it since the links were read.
                    if unlinked.rows_affected() == 1 {
                        super::quotas::note(super::quotas::Change::Link { repo, blob: id, delta: -1 });
                    }
                } else {
                    loose_since = Some(loose_since.map_or(linked_at, |t: i64| t.min(linked_at)));
                }
            }
        }
        // Referenced: whatever removes the reference enqueues the blob again.
        let referenced: Option<(i64,)> =
            sqlx::query_as("SELECT manifest_id FROM manifest_blobs WHERE blob_id = $1 LIMIT 1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if referenced.is_some() {
            return Ok(match loose_since {
                Some(linked_at) => Verdict::Until(linked_at.max(seen_at).saturating_add(grace)),
                None => Verdict::Drop,
            });
        }
        let (last_link,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(linked_at) FROM repository_blobs WHERE blob_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        let grace_end = blob_grace_end(created_at, last_link, seen_at, grace);
        if grace_end > now {
            return Ok(Verdict::Until(grace_end));
        }
        // Bytes adopted in place by an import that has not cut over are still the source
        // registry's own (on S3 the key is its object): they wait for the cut-over.
        let adopted_live: Option<(i64,)> = sqlx::query_as(
            "SELECT a.import_id FROM adopted_keys a JOIN imports i ON i.id = a.import_id \
             WHERE a.storage_key = $1 AND i.cut_over_at IS NULL",
        )
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
        if adopted_live.is_some() {
            return Ok(Verdict::Until(now.saturating_add(IMPORT_RECHECK_MS)));
        }
        sqlx::query("DELETE FROM repository_blobs WHERE blob_id = $1").bind(id).execute(&mut *tx).await?;
        if !how.dry {
            Self::to_outbox(tx, &key, now).await?;
        }
        sqlx::query("DELETE FROM blobs WHERE id = $1").bind(id).execute(&mut *tx).await?;
        super::quotas::note(super::quotas::Change::BlobRemoved { blob: id });
        let mut event =
            NewEvent::new(crate::events::BLOB_COLLECTED, "", Some("collector"), now).digest(&digest);
        event.repository = None;
        event.size = Some(size);
        super::events::record(event);
        Ok(Verdict::Collected(Collected {
            manifests: 0,
            blobs: 1,
            bytes: size as u64,
            subject: digest,
            made_due: Vec::new(),
        }))
    }

    async fn review_manifest(
        tx: &mut AnyConnection,
        id: i64,
        now: i64,
        w: super::Windows,
        how: How,
    ) -> Result<Verdict, sqlx::Error> {
        let lock = how.lock;
        let sql = format!(
            "SELECT repository_id, digest, subject_digest, pushed_at, pulled_at, deleted_at, unrestorable \
             FROM manifests WHERE id = $1{lock}"
        );
        type Row = (i64, String, Option<String>, i64, Option<i64>, Option<i64>, Option<String>);
        let row: Option<Row> = sqlx::query_as(&sql).bind(id).fetch_optional(&mut *tx).await?;
        let Some((repo_id, digest, subject, pushed_at, pulled_at, deleted_at, unrestorable)) = row else {
            return Ok(Verdict::Drop);
        };
        if let Some(deleted_at) = deleted_at {
            // A tombstone a live index lists is never collected, whatever its window: the index
            // would point at nothing. (No correct path leaves that state — fsck reports it — but
            // the collector must not turn it into lost data.) Its own collection enqueues this
            // one again.
            let live_parent: Option<(i64,)> = sqlx::query_as(
                "SELECT p.id FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                 WHERE c.child_id = $1 AND p.deleted_at IS NULL LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if live_parent.is_some() {
                return Ok(Verdict::Drop);
            }
            if let Some(window_end) =
                restore_window_end(deleted_at, unrestorable.is_some(), w.restore_window_ms)
                && window_end > now
            {
                return Ok(Verdict::Until(window_end));
            }
        } else {
            // Live: kept by a tag, an index that is live or a restorable tombstone (its restore
            // needs its children), or a live subject — each of whose changes (untagging, the
            // index's collection, the subject's delete or collection) enqueues this manifest
            // again.
            let held: (i64,) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM tags WHERE manifest_id = $1) \
                 + (SELECT COUNT(*) FROM manifest_children c JOIN manifests p ON p.id = c.parent_id \
                    WHERE c.child_id = $1 AND (p.deleted_at IS NULL \
                    OR (p.unrestorable IS NULL AND p.deleted_at > $4))) \
                 + (SELECT COUNT(*) FROM manifests s WHERE s.repository_id = $2 AND s.digest = $3 \
                    AND s.deleted_at IS NULL)",
            )
            .bind(id)
            .bind(repo_id)
            .bind(subject.as_deref().unwrap_or(""))
            .bind(now.saturating_sub(w.restore_window_ms))
            .fetch_one(&mut *tx)
            .await?;
            if held.0 > 0 {
                return Ok(Verdict::Drop);
            }
            // In use: held until the reports pinning it lapse (a withdrawal or a new report
            // without it enqueues it again).
            let (pinned_until,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(p.expires_at) FROM in_use_pins p JOIN repositories r ON r.name = p.repository \
                 WHERE r.id = $1 AND p.digest = $2 AND p.expires_at > $3",
            )
            .bind(repo_id)
            .bind(&digest)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(until) = pinned_until {
                return Ok(Verdict::Until(until));
            }
            let (untagged_at,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(at) FROM tag_history WHERE repository_id = $1 AND old_digest = $2",
            )
            .bind(repo_id)
            .bind(&digest)
            .fetch_one(&mut *tx)
            .await?;
            let grace_end = untagged_grace_end(pushed_at, pulled_at, untagged_at, w.untagged_grace_ms);
            if grace_end > now {
                return Ok(Verdict::Until(grace_end));
            }
        }
        let (media_type, size): (String, i64) =
            sqlx::query_as("SELECT media_type, size FROM manifests WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        let made_due = Self::collect_manifest(tx, id, repo_id, &digest, now, how).await?;
        let (repo,): (String,) = sqlx::query_as("SELECT name FROM repositories WHERE id = $1")
            .bind(repo_id)
            .fetch_one(&mut *tx)
            .await?;
        let mut event =
            NewEvent::new(crate::events::MANIFEST_COLLECTED, &repo, Some("collector"), now).digest(&digest);
        event.media_type = Some(media_type);
        event.size = Some(size);
        if deleted_at.is_some() {
            event = event.detail("tombstone", true);
        }
        super::events::record(event);
        Ok(Verdict::Collected(Collected {
            manifests: 1,
            blobs: 0,
            bytes: 0,
            subject: format!("{repo}@{digest}"),
            made_due,
        }))
    }

    /// Removes a manifest row and its references; what it referenced, and its referrers, are
    /// reviewed next (returned, as they are enqueued due now). A tombstoned index that listed it can no longer be restored (a live one
    /// never lists it: the reviews keep such a manifest).
    async fn collect_manifest(
        tx: &mut AnyConnection,
        id: i64,
        repo_id: i64,
        digest: &str,
        now: i64,
        how: How,
    ) -> Result<Vec<Review>, sqlx::Error> {
        let lock = how.lock;
        // The rows removed below that other transactions write too (an index push's references,
        // a tag write) are locked the way the item was (`NOWAIT` in a pass): the collector holds
        // the item's queue row, so it must not wait for a writer that may want that queue row.
        if !lock.is_empty() {
            for sql in [
                "SELECT parent_id FROM manifest_children WHERE parent_id = $1 OR child_id = $1",
                "SELECT name FROM tags WHERE manifest_id = $1",
                "SELECT id FROM manifests WHERE id IN (SELECT parent_id FROM manifest_children WHERE child_id = $1) \
                 AND deleted_at IS NOT NULL AND unrestorable IS NULL",
            ] {
                sqlx::query(&format!("{sql}{lock}")).bind(id).execute(&mut *tx).await?;
            }
        }
        let children: Vec<(i64,)> =
            sqlx::query_as("SELECT child_id FROM manifest_children WHERE parent_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        let blobs: Vec<(i64,)> = sqlx::query_as("SELECT blob_id FROM manifest_blobs WHERE manifest_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let referrers: Vec<(i64,)> = sqlx::query_as(
            "SELECT id FROM manifests WHERE repository_id = $1 AND subject_digest = $2 AND id <> $3",
        )
        .bind(repo_id)
        .bind(digest)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE manifests SET unrestorable = $1 WHERE unrestorable IS NULL AND deleted_at IS NOT NULL \
             AND id IN (SELECT parent_id FROM manifest_children WHERE child_id = $2)",
        )
        .bind(format!("its child {digest} was collected"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM manifest_children WHERE parent_id = $1 OR child_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM manifest_blobs WHERE manifest_id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM tags WHERE manifest_id = $1").bind(id).execute(&mut *tx).await?;
        let removed: Option<(i64, i64)> =
            sqlx::query_as("DELETE FROM manifests WHERE id = $1 RETURNING repository_id, size")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((repo, size)) = removed {
            super::quotas::note(super::quotas::Change::Manifest { repo, bytes: -size });
        }
        let made_due: Vec<Review> = children
            .into_iter()
            .chain(referrers)
            .map(|(m,)| Review::Manifest(m))
            .chain(blobs.into_iter().map(|(b,)| Review::Blob(b)))
            .collect();
        if !how.dry {
            for &item in &made_due {
                Self::enqueue(tx, item, now).await?;
            }
        }
        Ok(made_due)
    }

    /// Storage keys in the outbox due for deletion at `now`, at most `limit`.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn outbox_due(&self, now: i64, limit: i64) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT storage_key FROM gc_outbox o WHERE next_attempt <= $1 AND {} \
             ORDER BY next_attempt LIMIT $2",
            NOT_HELD
        );
        let rows: Vec<(String,)> = sqlx::query_as(&sql)
            .bind(now)
            .bind(limit)
            .bind(self.windows.margin_ms)
            .fetch_all(&self.write)
            .await?;
        Ok(rows.into_iter().map(|(k,)| k).collect())
    }

    /// Whether `key` is in the outbox and no running backup holds it at `now`: whether it may be
    /// deleted right away (a purge's bytes).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn outbox_unheld(&self, key: &str, now: i64) -> Result<bool> {
        let sql = format!("SELECT storage_key FROM gc_outbox o WHERE storage_key = $2 AND {NOT_HELD}");
        let row: Option<(String,)> = sqlx::query_as(&sql)
            .bind(now)
            .bind(key)
            .bind(self.windows.margin_ms)
            .fetch_optional(&self.write)
            .await?;
        Ok(row.is_some())
    }

    /// Records the outcome of deleting outbox objects: `deleted` keys leave the outbox, `failed`
    /// ones are retried later, with a pause growing with their attempts.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn outbox_settle(&self, deleted: &[String], failed: &[String], now: i64) -> Result<()> {
        // One pass in key order: several collectors (replicas, `berth gc run`) may settle the same
        // keys at once, and rows taken in different orders would deadlock.
        let mut settle: Vec<(&String, bool)> =
            deleted.iter().map(|k| (k, true)).chain(failed.iter().map(|k| (k, false))).collect();
        settle.sort();
        transaction!(self, Error, |tx| {
            for (key, gone) in &settle {
                if *gone {
                    sqlx::query("DELETE FROM gc_outbox WHERE storage_key = $1")
                        .bind(*key)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(
                        "UPDATE gc_outbox SET attempts = attempts + 1, \
                         next_attempt = $1 + 1000 * (1 + attempts * attempts) WHERE storage_key = $2",
                    )
                    .bind(now)
                    .bind(*key)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Ok(())
        })
    }
}
