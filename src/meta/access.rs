//! Access times, written in batches: when manifests were last pulled and blobs last answered a
//! `HEAD`.

use super::events::NewEvent;
use super::{Error, MetaStore, Result, transaction};

/// Ids per statement (inlined: they are integers read from the database).
const CHUNK: usize = 500;

impl MetaStore {
    /// Records that the manifests `manifest_ids` were pulled and the blobs `blob_ids` answered a
    /// `HEAD`, at `now`, in one transaction. Rows removed meanwhile are simply not found.
    ///
    /// # Errors
    /// [`Error::Database`].
    /// With `pull_events`, each manifest pulled is also an event (`manifest.pulled`, one per
    /// manifest and batch), written with the times.
    pub async fn record_access(
        &self,
        manifest_ids: &[i64],
        blob_ids: &[i64],
        pull_events: bool,
        now: i64,
    ) -> Result<()> {
        let lock = match self.dialect {
            super::Dialect::Sqlite => None,
            super::Dialect::Postgres => Some(" FOR NO KEY UPDATE"),
        };
        transaction!(self, Error, |tx| {
            // Blobs before manifests: the order a push locks them in (docs/design.md, lock order).
            for (table, column, ids) in
                [("blobs", "seen_at", blob_ids), ("manifests", "pulled_at", manifest_ids)]
            {
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                for chunk in ids.chunks(CHUNK) {
                    let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                    // Rows locked in id order first, as a push locks them; an UPDATE alone would
                    // take them in whatever order its scan meets them. Never moves a time
                    // backwards (replicas flush independently).
                    if let Some(lock) = lock {
                        let sql = format!("SELECT id FROM {table} WHERE id IN ({list}) ORDER BY id{lock}");
                        sqlx::query(&sql).execute(&mut *tx).await?;
                    }
                    let sql = format!(
                        "UPDATE {table} SET {column} = $1 WHERE id IN ({list}) AND ({column} IS NULL OR {column} < $1)"
                    );
                    sqlx::query(&sql).bind(now).execute(&mut *tx).await?;
                }
            }
            if pull_events {
                let mut ids = manifest_ids.to_vec();
                ids.sort_unstable();
                for chunk in ids.chunks(CHUNK) {
                    let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                    let pulled: Vec<(String, String, String, i64)> = sqlx::query_as(&format!(
                        "SELECT r.name, m.digest, m.media_type, m.size FROM manifests m \
                         JOIN repositories r ON r.id = m.repository_id WHERE m.id IN ({list}) ORDER BY m.id"
                    ))
                    .fetch_all(&mut *tx)
                    .await?;
                    for (repo, digest, media_type, size) in pulled {
                        let mut event =
                            NewEvent::new(crate::events::MANIFEST_PULLED, &repo, None, now).digest(&digest);
                        event.media_type = Some(media_type);
                        event.size = Some(size);
                        super::events::record(event);
                    }
                }
            }
            Ok(())
        })
    }
}
