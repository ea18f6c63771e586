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
const CHECKS: [(&str, &str, bool); 5] = [
    (
        "manifest-blob-not-linked",
        "SELECT r.name, m.digest, 'references blob ' || b.digest || ', which is not linked in the repository' \
         FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id JOIN blobs b ON b.id = mb.blob_id \
         JOIN repositories r ON r.id = m.repository_id WHERE m.deleted_at IS NULL AND NOT EXISTS \
         (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = m.repository_id AND rb.blob_id = mb.blob_id)",
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
        "restorable-tombstone-missing-blob",
        "SELECT r.name, m.digest, 'is marked restorable but blob ' || b.digest || ' is no longer linked' \
         FROM manifest_blobs mb JOIN manifests m ON m.id = mb.manifest_id JOIN blobs b ON b.id = mb.blob_id \
         JOIN repositories r ON r.id = m.repository_id \
         WHERE m.deleted_at IS NOT NULL AND m.unrestorable IS NULL AND NOT EXISTS \
         (SELECT 1 FROM repository_blobs rb WHERE rb.repository_id = m.repository_id AND rb.blob_id = mb.blob_id)",
        false,
    ),
];

/// Kinds of findings about stored bytes (checked by `fsck` and the scrub, not in SQL).
pub const BLOB_FINDINGS: [&str; 4] = ["blob-missing", "blob-size", "blob-content", "blob-digest"];

/// The kind names of the reference checks.
pub fn reference_kinds() -> Vec<&'static str> {
    CHECKS.iter().map(|(kind, _, _)| *kind).collect()
}

/// The static name of a finding kind read back from the store (`"other"` for one this version
/// does not know, written by a newer one).
pub(super) fn finding_kind(kind: &str) -> &'static str {
    BLOB_FINDINGS.into_iter().chain(reference_kinds()).find(|k| *k == kind).unwrap_or("other")
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
