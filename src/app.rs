//! Assembling the application from a [`Config`]: open the metadata store (running migrations)
//! and blob storage, and build the [`Registry`] over them.

use std::time::Duration;

use crate::blob::{BlobStore, FsOptions};
use crate::config::Config;
use crate::meta::{MetaStore, PoolOptions, Windows};
use crate::registry::{Clock, Policy, Registry};

/// A running Berth's shared parts.
#[derive(Debug, Clone)]
pub struct App {
    /// The domain operations.
    pub registry: Registry,
    /// Authentication and authorization, when configured.
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// The configuration it was opened with.
    pub config: Config,
}

impl App {
    /// Opens metadata and storage as configured.
    ///
    /// # Errors
    /// When the data directory, the database or the storage cannot be opened.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        Self::open_with_clock(config, Clock::default()).await
    }

    /// Opens the metadata store (applying migrations) and blob storage as configured, and
    /// nothing else: what `berth backup restore` loads a backup into before the deployment is
    /// opened whole.
    ///
    /// # Errors
    /// As [`App::open`].
    pub async fn open_storage(config: &Config) -> anyhow::Result<(MetaStore, BlobStore)> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data directory {}: {e}", config.data_dir.display())
        })?;
        let pool = PoolOptions {
            max_connections: config.metadata_max_connections,
            acquire_timeout: Duration::from_secs(config.metadata_acquire_timeout_secs),
        };
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let windows = Windows {
            blob_grace_ms: ms(config.gc.blob_grace),
            untagged_grace_ms: ms(config.gc.untagged_grace),
            restore_window_ms: ms(config.gc.restore_window),
            margin_ms: ms(config.gc.access_flush_interval).saturating_add(ms(config.gc.clock_skew)),
        };
        let meta = MetaStore::open(&config.metadata_url, &pool)
            .await?
            .with_windows(windows)
            .with_immutable(config.immutable.clone())
            .with_quotas(crate::quota::Quotas::new(
                config.quotas.clone(),
                config.proxies.iter().map(|p| p.prefix.clone()).collect(),
            ));
        let blobs = match &config.storage_s3 {
            Some(s3) => BlobStore::s3(s3)?,
            None => {
                let options = FsOptions { fsync: config.storage_fsync, direct_io: config.storage_direct_io };
                BlobStore::filesystem(&config.storage_path, options).await?
            }
        };
        Ok((meta, blobs))
    }

    /// Like [`App::open`] with a given clock (tests move it).
    ///
    /// # Errors
    /// As [`App::open`].
    pub async fn open_with_clock(config: &Config, clock: Clock) -> anyhow::Result<Self> {
        let (meta, blobs) = Self::open_storage(config).await?;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        tracing::info!(
            metadata = ?meta.dialect(),
            storage = %blobs.describe(),
            "deployment opened"
        );
        let auth = config.auth.as_ref().map(crate::auth::Auth::load).transpose()?.map(std::sync::Arc::new);
        let policy = Policy {
            restore_window_ms: i64::try_from(config.gc.restore_window.as_millis()).unwrap_or(i64::MAX),
            sparse_index_repositories: config.sparse_index_repositories.clone(),
            upload_expire_after_ms: i64::try_from(config.upload_expire_after_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            scrub_period_ms: (!config.gc.scrub_period.is_zero()).then(|| ms(config.gc.scrub_period)),
            retention_rules: config.retention.rules.clone(),
            retention_interval_ms: ms(config.retention.interval),
            ignore_pulls_from: config
                .ignore_pulls_from
                .iter()
                .flat_map(|who| match who.strip_prefix("group:") {
                    Some(group) => config
                        .auth
                        .iter()
                        .flat_map(|a| &a.groups)
                        .filter(|g| g.name == group)
                        .flat_map(|g| g.members.clone())
                        .collect::<Vec<_>>(),
                    None => vec![who.clone()],
                })
                .collect(),
        };
        let registry = Registry::new(meta, blobs, clock, policy)
            .with_caches(&config.proxies)?
            .with_events(config.events.clone());
        // Before anything is served: a new endpoint (or one no replica had configured within
        // `events.retain`) receives every event committed from here on.
        for endpoint in &config.events.endpoints {
            let retain = i64::try_from(config.events.retain.as_millis()).unwrap_or(i64::MAX);
            registry.meta().register_endpoint(&endpoint.name, registry.clock().now_ms(), retain).await?;
        }
        // Before anything is served: a rule new to the database (or whose scope changed) starts
        // from its scope's exact usage.
        for rule in registry.meta().prepare_quotas(registry.clock().now_ms()).await? {
            tracing::info!(quota = %rule, "quota usage counted from scratch");
        }
        Ok(App { registry, auth, config: config.clone() })
    }
}
