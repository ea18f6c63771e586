//! The safety net's side of the store: leases for background passes that one replica at a time
//! should run, where each pass stands, storage objects no row accounts for (sent to the outbox
//! under a re-check), rows the review queue missed, and what the scrub found.

use std::collections::HashSet;

use super::{Error, Finding, MetaStore, Result, transaction};

/// Where a throttled background pass stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The next step starts after this (a storage key or a row id, as text; empty: from the
    /// start).
    pub resume_after: String,
    /// When the current pass started.
    pub pass_started_at: i64,
    /// The scrub: bytes stored when the pass started (its pace derives from them).
    pub pass_total: i64,
    /// The scrub: bytes it may read before it has to wait for more time to pass.
    pub credit: i64,
    /// Passes finished.
    pub passes: i64,
    /// When the last step ran.
    pub step_at: i64,
}

/// Rows a step of the row sweep looked at, and what it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowSweep {
    /// Rows looked at.
    pub looked_at: u64,
    /// Rows put back on the review queue.
    pub enqueued: u64,
    /// The last row id looked at (`None`: the pass reached the end).
    pub last_id: Option<i64>,
}

impl MetaStore {
    /// Takes or renews lease `name` for `holder` until `now + ttl_ms`; `false` while another
    /// holder's lease runs.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn take_lease(&self, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        transaction!(self, Error, |tx| {
            sqlx::query(
                "INSERT INTO gc_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(holder)
            .bind(now + ttl_ms)
            .execute(&mut *tx)
            .await?;
            let taken = sqlx::query(
                "UPDATE gc_leases SET holder = $1, expires_at = $2 \
                 WHERE name = $3 AND (holder = $1 OR expires_at < $4)",
            )
            .bind(holder)
            .bind(now + ttl_ms)
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Ok(taken.rows_affected() == 1)
        })
    }

    /// Gives lease `name` up if `holder` has it.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM gc_leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Where pass `name` stands (a fresh pass starting at `now` if it never ran).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn progress(&self, name: &str, now: i64) -> Result<Progress> {
        let row: Option<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT resume_after, pass_started_at, pass_total, credit, passes, step_at FROM gc_progress WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.write)
        .await?;
        Ok(match row {
            Some((resume_after, pass_started_at, pass_total, credit, passes, step_at)) => {
                Progress { resume_after, pass_started_at, pass_total, credit, passes, step_at }
            }
            None => Progress { pass_started_at: now, ..Progress::default() },
        })
    }

    /// Records where pass `name` stands.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn save_progress(&self, name: &str, p: &Progress) -> Result<()> {
        sqlx::query(
            "INSERT INTO gc_progress (name, resume_after, pass_started_at, pass_total, credit, passes, step_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO UPDATE SET \
             resume_after = excluded.resume_after, pass_started_at = excluded.pass_started_at, \
             pass_total = excluded.pass_total, credit = excluded.credit, passes = excluded.passes, \
             step_at = excluded.step_at",
        )
        .bind(name)
        .bind(&p.resume_after)
        .bind(p.pass_started_at)
        .bind(p.pass_total)
        .bind(p.credit)
        .bind(p.passes)
        .bind(p.step_at)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Of `keys`, those a blob row or the outbox names: a quick first filter before the
    /// per-key re-check of [`MetaStore::orphan_to_outbox`].
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn keys_accounted_for(&self, keys: &[String]) -> Result<HashSet<String>> {
        let mut known = HashSet::new();
        for batch in keys.chunks(500) {
            let list = placeholders(batch.len());
            let sql = format!(
                "SELECT storage_key FROM blobs WHERE storage_key IN ({list}) \
                 UNION SELECT storage_key FROM gc_outbox WHERE storage_key IN ({list})"
            );
            let mut query = sqlx::query_as::<_, (String,)>(&sql);
            for key in batch {
                query = query.bind(key);
            }
            known.extend(query.fetch_all(&self.read).await?.into_iter().map(|(k,)| k));
        }
        Ok(known)
    }

    /// Sends the object under `key` to the outbox if, in one statement (one snapshot), no blob
    /// row names it and no open upload session owns it (its key, or the prefix its objects live
    /// under). Returns whether it was sent. A session's bytes become a blob in the transaction
    /// that removes the session, so the statement sees the one or the other, never neither; a
    /// transaction recording bytes written without a session is fenced off by the key's lock
    /// (see `store_blob`), and fails if the sweep was first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn orphan_to_outbox(&self, key: &str, now: i64) -> Result<bool> {
        let dialect = self.dialect;
        transaction!(self, Error, |tx| {
            if dialect == super::Dialect::Postgres {
                // The other side of the fence in `store_blob`: a transaction recording these
                // bytes holds the key's lock shared until it commits; then the check sees its row.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(key).execute(&mut *tx).await?;
            }
            let done = sqlx::query(
                "INSERT INTO gc_outbox (storage_key, enqueued_at, next_attempt) SELECT $1, $2, $2 \
                 WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE storage_key = $1) \
                 AND NOT EXISTS (SELECT 1 FROM uploads WHERE substr($1, 1, length(storage_key)) = storage_key) \
                 ON CONFLICT (storage_key) DO NOTHING",
            )
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                // Kept after the outbox row is settled: the fence must outlast it.
                sqlx::query(
                    "INSERT INTO swept_keys (storage_key, swept_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            Ok(done.rows_affected() == 1)
        })
    }

    /// Puts back on the review queue the blob rows after id `after` (at most `limit`) that
    /// nothing references and no review is pending for — what a lost enqueue (a bug, a restore of
    /// a database backup) would otherwise keep forever. The review decides; this only asks.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn requeue_blobs(&self, after: i64, limit: i64, now: i64) -> Result<RowSweep> {
        self.requeue(
            "blob",
            "SELECT id FROM blobs WHERE id > $1 ORDER BY id LIMIT $2",
            "SELECT b.id FROM blobs b WHERE b.id > $1 AND b.id <= $2 \
             AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb WHERE mb.blob_id = b.id) \
             AND NOT EXISTS (SELECT 1 FROM gc_reviews r WHERE r.kind = 'blob' AND r.item_id = b.id)",
            after,
            limit,
            now,
        )
        .await
    }

    /// Like [`MetaStore::requeue_blobs`], for manifest rows that no tag, index or subject holds.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn requeue_manifests(&self, after: i64, limit: i64, now: i64) -> Result<RowSweep> {
        self.requeue(
            "manifest",
            "SELECT id FROM manifests WHERE id > $1 ORDER BY id LIMIT $2",
            "SELECT m.id FROM manifests m WHERE m.id > $1 AND m.id <= $2 \
             AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id) \
             AND NOT EXISTS (SELECT 1 FROM manifest_children c WHERE c.child_id = m.id) \
             AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository_id = m.repository_id \
                 AND s.digest = m.subject_digest AND s.deleted_at IS NULL) \
             AND NOT EXISTS (SELECT 1 FROM gc_reviews r WHERE r.kind = 'manifest' AND r.item_id = m.id)",
            after,
            limit,
            now,
        )
        .await
    }

    async fn requeue(
        &self,
        kind: &str,
        page_sql: &str,
        missed_sql: &str,
        after: i64,
        limit: i64,
        now: i64,
    ) -> Result<RowSweep> {
        let ids: Vec<(i64,)> = sqlx::query_as(page_sql).bind(after).bind(limit).fetch_all(&self.read).await?;
        let Some(&(last,)) = ids.last() else { return Ok(RowSweep::default()) };
        let missed: Vec<(i64,)> =
            sqlx::query_as(missed_sql).bind(after).bind(last).fetch_all(&self.read).await?;
        let enqueued = missed.len() as u64;
        if !missed.is_empty() {
            let item =
                |id| if kind == "blob" { super::Review::Blob(id) } else { super::Review::Manifest(id) };
            transaction!(self, Error, |tx| {
                for &(id,) in &missed {
                    Self::enqueue(tx, item(id), now).await?;
                }
                Ok(())
            })?;
        }
        let full = ids.len() as i64 == limit;
        Ok(RowSweep { looked_at: ids.len() as u64, enqueued, last_id: full.then_some(last) })
    }

    /// Records what the scrub found about `finding.subject`, replacing an earlier finding of
    /// that kind.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn record_finding(&self, finding: &Finding, now: i64) -> Result<()> {
        let mut conn = self.write.acquire().await?;
        Self::insert_finding(&mut conn, finding, now).await?;
        Ok(())
    }

    /// Forgets findings about `subject` of the given kinds (it was found sound, or is gone).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn clear_findings(&self, subject: &str, kinds: &[&str]) -> Result<()> {
        for kind in kinds {
            sqlx::query("DELETE FROM gc_findings WHERE kind = $1 AND subject = $2")
                .bind(kind)
                .bind(subject)
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    /// Replaces the findings of the reference checks with `found`, in one transaction.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn replace_reference_findings(
        &self,
        kinds: &[&str],
        found: &[Finding],
        now: i64,
    ) -> Result<()> {
        transaction!(self, Error, |tx| {
            for kind in kinds {
                sqlx::query("DELETE FROM gc_findings WHERE kind = $1").bind(kind).execute(&mut *tx).await?;
            }
            for f in found {
                Self::insert_finding(tx, f, now).await?;
            }
            Ok(())
        })
    }

    /// Records `finding`, replacing an earlier one of its kind about its subject.
    async fn insert_finding(
        conn: &mut sqlx::AnyConnection,
        finding: &Finding,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO gc_findings (kind, subject, repository, detail, found_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (kind, subject) DO UPDATE SET repository = excluded.repository, \
             detail = excluded.detail, found_at = excluded.found_at",
        )
        .bind(finding.kind)
        .bind(&finding.subject)
        .bind(&finding.repository)
        .bind(&finding.detail)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Everything the scrub has found and not yet seen mended, oldest first.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn findings(&self) -> Result<Vec<(Finding, i64)>> {
        let rows: Vec<(String, String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT kind, subject, repository, detail, found_at FROM gc_findings ORDER BY found_at, kind, subject",
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(kind, subject, repository, detail, at)| {
                (Finding { kind: super::consistency::finding_kind(&kind), repository, subject, detail }, at)
            })
            .collect())
    }
}

/// `$1, $2, …, $n`.
pub(super) fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

impl MetaStore {
    /// Bytes of all stored blobs (each stored copy once).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn stored_bytes(&self) -> Result<i64> {
        let (bytes,): (i64,) = sqlx::query_as("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs")
            .fetch_one(&self.read)
            .await?;
        Ok(bytes)
    }

    /// Forgets findings of `kinds` last found before `at` (a pass since then did not find them).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn forget_findings_before(&self, kinds: &[&str], at: i64) -> Result<()> {
        for kind in kinds {
            sqlx::query("DELETE FROM gc_findings WHERE kind = $1 AND found_at < $2")
                .bind(kind)
                .bind(at)
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }
}
