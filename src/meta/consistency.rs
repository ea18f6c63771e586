//! What `fsck` reads: every blob row, every upload session's storage, and the references that
//! must hold between rows (checked in SQL, each a set query).

use super::{MetaStore, Result};

/// A blob row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredBlob {
    /// Its row id (for paging).
    pub id: i64,
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: i64,
    /// Where its bytes are.
    pub storage_key: String,
}

/// One thing a consistency check found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// What kind of problem: a short stable name.
    pub kind: &'static str,
    /// The repository, when the finding is about one.
    pub repository: Option<String>,
    /// The manifest, tag or blob it is about.
    pub subject: String,
    /// What is wrong, in words.
    pub detail: String,
}

/// The reference checks: (kind, query returning repository, subject, detail, is an error).
const CHECKS: [(&str, &str, bool); 6] = [
    (
        "manifest-blob-not-linked",
        "SELECT r.name, m.digest, 'references blob ' || b.digest || ', which is not linked (or hidden by a repository delete) in the repository' \
         FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id JOIN blobs b ON b.id = mb.blob_id \
         JOIN repositories r ON r.id = m.repository_id WHERE m.deleted_at IS NULL AND NOT EXISTS \
         (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = m.repository_id AND rb.blob_id = mb.blob_id \
         AND rb.hidden_by_delete IS NULL)",
        true,
    ),
    (
        "index-child-deleted",
        "SELECT r.name, p.digest, 'lists ' || c.digest || ', which is a tombstone' \
         FROM manifest_children mc JOIN manifests p ON p.id = mc.parent_id JOIN manifests c ON c.id = mc.child_id \
         JOIN repositories r ON r.id = p.repository_id WHERE p.deleted_at IS NULL AND c.deleted_at IS NOT NULL",
        true,
    ),
    (
        "tag-on-tombstone",
        "SELECT r.name, t.name, 'points at ' || m.digest || ', which is a tombstone' \
         FROM tags t JOIN manifests m ON m.id = t.manifest_id JOIN repositories r ON r.id = t.repository_id \
         WHERE m.deleted_at IS NOT NULL",
        true,
    ),
    (
        "live-manifest-in-deleted-repository",
        "SELECT r.name, m.digest, 'is live although its repository is deleted' \
         FROM manifests m JOIN repositories r ON r.id = m.repository_id \
         WHERE r.deleted_at IS NOT NULL AND m.deleted_at IS NULL",
        true,
    ),
    (
        "live-manifest-unrestorable",
        "SELECT r.name, m.digest, 'is live but marked unrestorable: ' || m.unrestorable \
         FROM manifests m JOIN repositories r ON r.id = m.repository_id \
         WHERE m.deleted_at IS NULL AND m.unrestorable IS NOT NULL",
        true,
    ),
    (
        "restorable-tombstone-missing-blob",
        "SELECT r.name, m.digest, 'is marked restorable but blob ' || b.digest || ' is no longer linked' \
         FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id JOIN blobs b ON b.id = mb.blob_id \
         JOIN repositories r ON r.id = m.repository_id \
         WHERE m.deleted_at IS NOT NULL AND m.unrestorable IS NULL AND NOT EXISTS \
         (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = m.repository_id AND rb.blob_id = mb.blob_id)",
        false,
    ),
];

/// Kinds of findings from the live manifests' own payloads (checked by `fsck`, not in SQL): a
/// blob or child the payload names that the repository does not hold, or a payload that no
/// longer parses.
pub const PAYLOAD_FINDINGS: [&str; 3] =
    ["payload-blob-missing", "payload-child-missing", "payload-unreadable"];

/// A live manifest as `fsck` reads it: its payload is the truth about what it references.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LiveManifest {
    /// Its row id (for paging).
    pub id: i64,
    /// Its repository's row id.
    pub repository_id: i64,
    /// Its repository.
    pub repository: String,
    /// Its digest.
    pub digest: String,
    /// The media type it is served with.
    pub media_type: String,
    /// The bytes pushed.
    pub payload: Vec<u8>,
}

/// Kinds of findings about stored bytes (checked by `fsck` and the scrub, not in SQL).
pub const BLOB_FINDINGS: [&str; 4] = ["blob-missing", "blob-size", "blob-content", "blob-digest"];

/// Kinds of findings about the collector's queues.
const QUEUE_FINDINGS: [&str; 4] =
    ["outbox-names-live-blob", "review-of-missing-row", "reviews-overdue", "not-queued"];

/// The kind names of the reference checks.
pub fn reference_kinds() -> Vec<&'static str> {
    CHECKS.iter().map(|(kind, _, _)| *kind).collect()
}

/// The static name of a finding kind read back from the store (`"other"` for one this version
/// does not know, written by a newer one).
pub(super) fn finding_kind(kind: &str) -> &'static str {
    BLOB_FINDINGS
        .into_iter()
        .chain(QUEUE_FINDINGS)
        .chain(PAYLOAD_FINDINGS)
        .chain(reference_kinds())
        .find(|k| *k == kind)
        .unwrap_or("other")
}

impl MetaStore {
    /// Blob rows with an id above `after`, by id, at most `limit`.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn blobs_after(&self, after: i64, limit: i64) -> Result<Vec<StoredBlob>> {
        Ok(sqlx::query_as(
            "SELECT id, digest, size, storage_key FROM blobs WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// Live manifests with an id above `after`, by id, at most `limit`, with their payloads.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn live_manifests_after(&self, after: i64, limit: i64) -> Result<Vec<LiveManifest>> {
        Ok(sqlx::query_as(
            "SELECT m.id, m.repository_id, r.name AS repository, m.digest, m.media_type, m.payload \
             FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE m.id > $1 AND m.deleted_at IS NULL ORDER BY m.id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    /// Whether manifest row `id` is still there and live.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn manifest_is_live(&self, id: i64) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM manifests WHERE id = $1 AND deleted_at IS NULL")
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        Ok(row.is_some())
    }

    /// Of `blobs`, those linked into repository `repo_id` with a blob row; of `children`, those
    /// live in it — what a manifest of that repository may reference. One snapshot each.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn held_references(
        &self,
        repo_id: i64,
        blobs: &[String],
        children: &[String],
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut held = (Vec::new(), Vec::new());
        for (names, sql, out) in [
            (
                blobs,
                "SELECT b.digest FROM blobs b JOIN repository_blobs rb ON rb.blob_id = b.id \
                 WHERE rb.repository_id = $1 AND rb.hidden_by_delete IS NULL AND b.digest IN",
                &mut held.0,
            ),
            (
                children,
                "SELECT digest FROM manifests WHERE repository_id = $1 AND deleted_at IS NULL AND digest IN",
                &mut held.1,
            ),
        ] {
            for chunk in names.chunks(500) {
                let list = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ");
                let sql = format!("{sql} ({list})");
                let mut q = sqlx::query_as::<_, (String,)>(&sql).bind(repo_id);
                for name in chunk {
                    q = q.bind(name);
                }
                out.extend(q.fetch_all(&self.read).await?.into_iter().map(|(d,)| d));
            }
        }
        Ok(held)
    }

    /// The storage keys (or, on object storage, key prefixes) of the open upload sessions.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn upload_storage_keys(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT storage_key FROM uploads ORDER BY storage_key")
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().map(|(k,)| k).collect())
    }

    /// What is wrong with the collector's queues at `now`: outbox entries naming a key a blob
    /// row still uses (errors: draining them would delete live bytes), reviews of rows that no
    /// longer exist, reviews overdue by more than `overdue_ms` (is any collector running?), and
    /// rows nothing holds that no review is pending for (warnings).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn queue_findings(&self, now: i64, overdue_ms: i64) -> Result<(Vec<Finding>, Vec<Finding>)> {
        let finding =
            |kind, subject: String, detail: String| Finding { kind, repository: None, subject, detail };
        let live_keys: Vec<(String,)> = sqlx::query_as(
            "SELECT o.storage_key FROM gc_outbox o JOIN blobs b ON b.storage_key = o.storage_key",
        )
        .fetch_all(&self.read)
        .await?;
        let errors = live_keys
            .into_iter()
            .map(|(k,)| {
                finding("outbox-names-live-blob", k, "is queued for deletion but a blob row uses it".into())
            })
            .collect();
        let mut warnings = Vec::new();
        let stale: Vec<(String, i64)> = sqlx::query_as(
            "SELECT r.kind, r.item_id FROM gc_reviews r WHERE              (r.kind = 'blob' AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = r.item_id)) OR              (r.kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.id = r.item_id))",
        )
        .fetch_all(&self.read)
        .await?;
        warnings.extend(stale.into_iter().map(|(kind, id)| {
            finding(
                "review-of-missing-row",
                format!("{kind} {id}"),
                "is queued for review but its row is gone".into(),
            )
        }));
        let (overdue, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(review_after) FROM gc_reviews WHERE review_after < $1")
                .bind(now - overdue_ms)
                .fetch_one(&self.read)
                .await?;
        if let (true, Some(oldest)) = (overdue > 0, oldest) {
            warnings.push(finding(
                "reviews-overdue",
                format!("{overdue} reviews"),
                format!("were due {} s ago or earlier: is a collector running?", (now - oldest) / 1000),
            ));
        }
        for (kind, sql) in [
            (
                "blob",
                "SELECT b.digest FROM blobs b                  WHERE NOT EXISTS (SELECT 1 FROM manifest_blobs mb WHERE mb.blob_id = b.id)                  AND NOT EXISTS (SELECT 1 FROM gc_reviews r WHERE r.kind = 'blob' AND r.item_id = b.id)",
            ),
            (
                "manifest",
                "SELECT m.digest FROM manifests m                  WHERE NOT EXISTS (SELECT 1 FROM tags t WHERE t.manifest_id = m.id)                  AND NOT EXISTS (SELECT 1 FROM manifest_children c WHERE c.child_id = m.id)                  AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repository_id = m.repository_id                      AND s.digest = m.subject_digest AND s.deleted_at IS NULL)                  AND NOT EXISTS (SELECT 1 FROM gc_reviews r WHERE r.kind = 'manifest' AND r.item_id = m.id)",
            ),
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(&self.read).await?;
            warnings.extend(rows.into_iter().map(|(digest,)| {
                finding("not-queued", digest, format!("is a {kind} nothing holds, with no review pending"))
            }));
        }
        Ok((errors, warnings))
    }

    /// Repairs the queues: removes outbox entries that name a key a blob row uses and reviews
    /// of rows that are gone. Returns how many of each.
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn repair_queues(&self) -> Result<(u64, u64)> {
        let outbox =
            sqlx::query("DELETE FROM gc_outbox WHERE storage_key IN (SELECT storage_key FROM blobs)")
                .execute(&self.write)
                .await?
                .rows_affected();
        let reviews = sqlx::query(
            "DELETE FROM gc_reviews WHERE              (kind = 'blob' AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = gc_reviews.item_id)) OR              (kind = 'manifest' AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.id = gc_reviews.item_id))",
        )
        .execute(&self.write)
        .await?
        .rows_affected();
        Ok((outbox, reviews))
    }

    /// Every broken reference between rows: errors (a fetchable manifest that cannot be pulled
    /// completely, a tag on a tombstone, …) and warnings (a tombstone that says it can be restored
    /// but cannot).
    ///
    /// # Errors
    /// [`super::Error::Database`].
    pub async fn reference_findings(&self) -> Result<(Vec<Finding>, Vec<Finding>)> {
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        for (kind, sql, is_error) in CHECKS {
            let rows: Vec<(String, String, String)> = sqlx::query_as(sql).fetch_all(&self.read).await?;
            let found = rows.into_iter().map(|(repository, subject, detail)| Finding {
                kind,
                repository: Some(repository),
                subject,
                detail,
            });
            if is_error { errors.extend(found) } else { warnings.extend(found) }
        }
        Ok((errors, warnings))
    }
}
