//! Domain operations — push, pull, list — and the only place that composes the metadata store
//! with blob storage.
//!
//! The ordering rule that keeps metadata and bytes consistent: bytes are written under a fresh,
//! never-reused key *before* the metadata transaction that makes them reachable, and deleted only
//! *after* the transaction that makes them unreachable has committed. A crash in between can leave
//! an orphaned object (found by the sweep), never a row without bytes. No axum or sqlx types
//! appear in these signatures.

mod access;
mod admin;
mod backup;
mod browse;
mod bulk_restore;
mod delete;
mod error;
mod events;
mod fsck;
mod gc;
mod hashing;
mod import;
mod in_use;
mod proxy;
mod pull;
mod push;
mod quota;
mod retention;
mod sweep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

pub use admin::{DeleteTarget, Tombstone};
pub use backup::{BackupOptions, BackupProgress, RestoreOptions, RestoreReport, restore_backup};
pub use browse::{ManifestView, Part};
pub use bulk_restore::{
    BulkItem, BulkRestoreReport, BulkRestoreView, DeleteSelectionView, MAX_SELECTED, Selection,
};
pub use delete::PurgeReport;
pub use error::Error;
pub use events::EndpointStatus;
pub use fsck::FsckReport;
pub use gc::{DryRun, ExplainTarget, GcReport, SPACE_SAMPLE_EVERY_MS};
pub use import::{ImportOptions, ImportProgress, ImportReport, Skipped};
pub use in_use::{MAX_REFERENCES, MAX_TTL_MS, parse_reference};
pub use proxy::{ByteStream, Cache, CacheStatus, Caches, EvictionReport};
pub use pull::{BlobHandle, Referrer};
pub use push::{ChunkRange, PushedManifest, UploadStatus};
pub use quota::QuotaStatus;
pub use retention::{KeptInUse, ManifestRemoval, RetentionReport, RetentionStatus, TagRemoval};
pub use sweep::{RepairReport, ScrubReport, SweepReport};

use crate::blob::BlobStore;
use crate::meta::MetaStore;
use crate::oci::RepoName;

/// Result of a registry operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The application clock, in Unix milliseconds. Tests move it forward instead of sleeping.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        wall + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock (and its clones) forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// The rules the domain operations apply, from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long a tombstone stays restorable, in milliseconds.
    pub restore_window_ms: i64,
    /// Repositories whose image indexes may list children absent from the repository.
    pub sparse_index_repositories: Vec<crate::auth::Pattern>,
    /// Upload sessions that received nothing for this long are removed, in milliseconds.
    pub upload_expire_after_ms: i64,
    /// The scrub re-hashes every stored blob once in this long, in milliseconds (`None`: off).
    pub scrub_period_ms: Option<i64>,
    /// The retention rules, in order.
    pub retention_rules: Vec<crate::retention::RetentionRule>,
    /// How often the schedule runs them, in milliseconds (0: only on demand).
    pub retention_interval_ms: i64,
    /// Users whose pulls refresh no pull time (groups already expanded).
    pub ignore_pulls_from: std::collections::HashSet<String>,
}

impl Default for Policy {
    fn default() -> Self {
        const DAY: i64 = 24 * 3600 * 1000;
        Policy {
            restore_window_ms: 7 * DAY,
            sparse_index_repositories: Vec::new(),
            upload_expire_after_ms: DAY,
            scrub_period_ms: Some(7 * DAY),
            retention_rules: Vec::new(),
            retention_interval_ms: 0,
            ignore_pulls_from: std::collections::HashSet::new(),
        }
    }
}

/// The registry: domain operations over a metadata store and blob storage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    meta: MetaStore,
    blobs: BlobStore,
    clock: Clock,
    policy: Arc<Policy>,
    upload_locks: Arc<UploadLocks>,
    access: Arc<access::AccessLog>,
    instance: Arc<str>,
    metrics: Arc<crate::metrics::BerthMetrics>,
    caches: Arc<proxy::Caches>,
    events: Arc<crate::events::EventsConfig>,
}

impl Registry {
    /// A registry over `meta` and `blobs` applying `policy`.
    pub fn new(meta: MetaStore, blobs: BlobStore, clock: Clock, policy: Policy) -> Self {
        let metrics = crate::metrics::BerthMetrics::new(
            blobs.parts_resent().unwrap_or_default(),
            meta.conflicts(),
            meta.quota_state(),
        );
        Registry {
            meta,
            blobs,
            clock,
            policy: Arc::new(policy),
            upload_locks: Arc::default(),
            access: Arc::default(),
            instance: instance_name().into(),
            metrics: Arc::new(metrics),
            caches: Arc::default(),
            events: Arc::default(),
        }
    }

    /// This registry delivering events as `config` says.
    #[must_use]
    pub fn with_events(mut self, config: crate::events::EventsConfig) -> Self {
        self.events = Arc::new(config);
        self
    }

    /// The events configuration.
    pub fn events(&self) -> &crate::events::EventsConfig {
        &self.events
    }

    /// This registry with the pull-through caches `configs`.
    ///
    /// # Errors
    /// When an upstream client cannot be built (an unreadable CA file).
    pub fn with_caches(mut self, configs: &[crate::config::ProxyConfig]) -> anyhow::Result<Self> {
        self.caches = Arc::new(proxy::Caches::new(configs)?);
        Ok(self)
    }

    /// Whether `repo`'s image indexes may list children absent from it: configured
    /// (`manifests.sparse_index_repositories`), or a pull-through cache's (a client pulls the
    /// platforms it wants).
    pub fn takes_sparse_indexes(&self, repo: &str) -> bool {
        self.policy.sparse_index_repositories.iter().any(|p| p.matches(repo))
            || RepoName::parse(repo).is_ok_and(|r| self.caches.of(&r).is_some())
    }

    /// This process's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::BerthMetrics> {
        &self.metrics
    }

    /// The Prometheus text exposition: the counters, with the collector's gauges read now.
    ///
    /// # Errors
    /// [`Error::Internal`] when the metadata store fails.
    pub async fn render_metrics(&self) -> Result<String> {
        let status = self.gc_status().await?;
        let sessions = self.meta.idle_uploads(i64::MAX).await?;
        for cache in self.caches.all() {
            let bytes = self.meta.cache_bytes(&cache.config.prefix).await?;
            self.metrics.set_proxy_bytes(&cache.config.prefix, bytes);
        }
        for endpoint in &self.events.endpoints {
            let state = self.meta.endpoint_state(&endpoint.name).await?;
            self.metrics.set_events_state(&endpoint.name, &state, self.clock.now_ms());
        }
        let backups = self.meta.backup_runs(20).await?;
        self.metrics.set_backups(backups.iter().find(|b| b.state == "complete"), backups.first());
        if !self.meta.quotas().is_empty() {
            for q in self.quota_status(None).await? {
                self.metrics.set_quota(&q.rule, q.used_bytes, q.max_bytes);
            }
        }
        Ok(self.metrics.render(&status, i64::try_from(sessions).unwrap_or(i64::MAX)))
    }

    /// This process's name in the collector's records and leases: host, process id and a random
    /// suffix (two registries in one process are two instances).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The rules in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The metadata store.
    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    /// The blob storage.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Checks that metadata and storage both answer.
    ///
    /// # Errors
    /// [`Error::Internal`] naming the part that failed.
    pub async fn health(&self) -> Result<()> {
        self.meta.ping().await?;
        self.blobs.ping().await?;
        Ok(())
    }
}

fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() { "host".to_string() } else { host };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// Serialises requests on one upload session within this process. Across processes the
/// compare-and-set on the session's size in the metadata store decides.
#[derive(Debug, Default)]
struct UploadLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl UploadLocks {
    async fn lock(self: &Arc<Self>, id: &str) -> UploadGuard {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        UploadGuard { locks: self.clone(), id: id.to_string(), lock, _guard: guard }
    }
}

struct UploadGuard {
    locks: Arc<UploadLocks>,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut map = self.locks.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Ours, the map's and the guard's own reference: nobody else is waiting.
        if Arc::strong_count(&self.lock) <= 3 {
            map.remove(&self.id);
        }
    }
}
