//! Pull and `HEAD` times, recorded off the request path: a read only notes an id in memory; a
//! background flush (every replica, every second by default, and once more at shutdown) writes
//! the batch in one transaction. A manifest `GET` never waits for a database write.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{Registry, Result};

/// Ids read since the last flush.
#[derive(Debug, Default)]
pub(super) struct AccessLog {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    manifests: HashSet<i64>,
    blobs: HashSet<i64>,
}

impl AccessLog {
    pub(super) fn manifest_pulled(&self, id: i64) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).manifests.insert(id);
    }

    pub(super) fn blob_seen(&self, id: i64) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).blobs.insert(id);
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn put_back(&self, batch: Pending) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.manifests.extend(batch.manifests);
        pending.blobs.extend(batch.blobs);
    }
}

impl Registry {
    /// Writes the pull and `HEAD` times noted since the last flush. A failed write keeps the
    /// batch for the next flush.
    ///
    /// # Errors
    /// [`super::Error::Internal`] when the metadata store fails.
    pub async fn flush_access(&self) -> Result<()> {
        let batch = self.access.take();
        if batch.manifests.is_empty() && batch.blobs.is_empty() {
            return Ok(());
        }
        let manifests: Vec<i64> = batch.manifests.iter().copied().collect();
        let blobs: Vec<i64> = batch.blobs.iter().copied().collect();
        if let Err(e) =
            self.meta.record_access(&manifests, &blobs, self.events.pulls, self.clock.now_ms()).await
        {
            self.access.put_back(batch);
            return Err(e.into());
        }
        Ok(())
    }
}
