//! Configuration: defaults, then a TOML file, then `BERTH_…` environment variables, then flags.
//! Validated once at start, with messages that say what is wrong and where.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::auth::AuthConfig;
pub use crate::blob::S3Config;

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Directory for the embedded deployment's data.
    pub data_dir: PathBuf,
    /// Log filter (`info`, `debug`, `berth=debug,sqlx=warn`, …).
    pub log_level: String,
    /// Log lines as text for people, or as JSON objects (one a line) for log shippers.
    pub log_json: bool,
    /// Serve `/metrics` on the main listener (needing admin on every repository when access
    /// control is on).
    pub metrics_enabled: bool,
    /// Also serve `/metrics` here, without authentication.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the web console at `/ui/`.
    pub ui_enabled: bool,
    /// Metadata store URL (`sqlite:…` or `postgres://…`).
    pub metadata_url: String,
    /// Metadata connection pool size.
    pub metadata_max_connections: u32,
    /// Seconds to wait for a metadata connection.
    pub metadata_acquire_timeout_secs: u64,
    /// Directory for blob files.
    pub storage_path: PathBuf,
    /// Flush blobs to disk before publishing them.
    pub storage_fsync: bool,
    /// Write large upload bodies with `O_DIRECT` (filesystem storage).
    pub storage_direct_io: bool,
    /// S3-compatible storage instead of the filesystem, when set.
    pub storage_s3: Option<S3Config>,
    /// Upload sessions idle this long are removed with their bytes (by the collector).
    pub upload_expire_after_secs: u64,
    /// Authentication and authorization; `None` leaves the registry open (the default, for
    /// loopback use).
    pub auth: Option<AuthConfig>,
    /// HTTPS instead of plain HTTP, when set.
    pub tls: Option<TlsConfig>,
    /// Protection against slow, oversized and abusive requests.
    pub limits: Limits,
    /// The collector's windows (deletes use `restore_window`).
    pub gc: GcSettings,
    /// Repositories whose image indexes may list children that are not in the repository
    /// (mirrors that copy one platform).
    pub sparse_index_repositories: Vec<crate::auth::Pattern>,
    /// Retention rules and how often they run.
    pub retention: RetentionSettings,
    /// Tags that can be neither moved nor deleted.
    pub immutable: crate::retention::ImmutableTags,
    /// Users (names, or `group:NAME`) whose pulls do not count as use: they refresh no pull time
    /// (`[access] ignore_pulls_from`, e.g. a scanner's account).
    pub ignore_pulls_from: Vec<String>,
    /// Pull-through caches of upstream registries (`[[proxy]]`).
    pub proxies: Vec<ProxyConfig>,
    /// Events and where they are delivered (`[events]`).
    pub events: crate::events::EventsConfig,
    /// Quota rules (`[[quotas]]`).
    pub quotas: Vec<crate::quota::QuotaRule>,
}

/// One pull-through cache (`[[proxy]]`): repositories `PREFIX/…` are read from an upstream
/// registry and kept here.
#[derive(Clone)]
pub struct ProxyConfig {
    /// The local repositories it serves: `PREFIX/NAME` is `NAME` upstream.
    pub prefix: String,
    /// The upstream registry's base URL (`https://registry-1.docker.io`).
    pub upstream: String,
    /// Credentials for the upstream (`BERTH_PROXY_<PREFIX>_USERNAME`/`_PASSWORD` override).
    pub username: Option<String>,
    /// The password; never logged.
    pub password: Option<String>,
    /// Extra CA certificates (PEM) to trust for the upstream.
    pub ca_file: Option<PathBuf>,
    /// How long a tag's resolution is trusted before the upstream is asked again.
    pub tag_ttl: Duration,
    /// The space this cache may hold; the evictor removes the least recently pulled beyond it.
    pub max_bytes: Option<u64>,
    /// Cached images not pulled for this long are evicted.
    pub evict_not_pulled_within: Option<Duration>,
    /// After a manifest is fetched, the blobs it references that no client fetched within this
    /// long are fetched (or linked from another repository of the cache), so the cache holds
    /// whole images (`None`: never, `fill_missing_after = "never"`).
    pub fill_missing_after: Option<Duration>,
    /// Serves repositories named with no known prefix (a plain mirror: Docker's
    /// `registry-mirrors`).
    pub default: bool,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("prefix", &self.prefix)
            .field("upstream", &self.upstream)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("ca_file", &self.ca_file)
            .field("tag_ttl", &self.tag_ttl)
            .field("max_bytes", &self.max_bytes)
            .field("evict_not_pulled_within", &self.evict_not_pulled_within)
            .field("fill_missing_after", &self.fill_missing_after)
            .field("default", &self.default)
            .finish()
    }
}

impl ProxyConfig {
    /// The upstream's host (and port), as containerd names it in `?ns=`.
    pub fn upstream_host(&self) -> &str {
        let rest = self.upstream.split_once("://").map_or(self.upstream.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest)
    }
}

/// The `[retention]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSettings {
    /// How often the rules run (on one replica at a time); zero runs them only on demand.
    pub interval: Duration,
    /// The rules, in order (the first that marks a tag is credited with it).
    pub rules: Vec<crate::retention::RetentionRule>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings { interval: Duration::from_secs(3600), rules: Vec::new() }
    }
}

/// The `[gc]` section.
#[derive(Debug, Clone)]
pub struct GcSettings {
    /// How long a deleted manifest stays restorable (and keeps holding what it references).
    pub restore_window: Duration,
    /// How often each replica writes the pull and `HEAD` times it noted (the collector's grace
    /// margins must exceed it).
    pub access_flush_interval: Duration,
    /// How far apart the replicas' clocks may be; with `access_flush_interval` it makes the
    /// collector's margin over `blob_grace`.
    pub clock_skew: Duration,
    /// How long an uploaded, mounted, linked or `HEAD`-answered blob is kept although nothing
    /// references it (the time between a layer push and the manifest push that uses it).
    pub blob_grace: Duration,
    /// How long a manifest left without tags is kept (extended by pulls).
    pub untagged_grace: Duration,
    /// Whether `berth serve` runs the collector (`berth gc run` works either way).
    pub enabled: bool,
    /// How often a serving replica's collector looks for due reviews.
    pub interval: Duration,
    /// Collector workers per serving replica.
    pub workers: u32,
    /// How often a step of the storage sweep and of the scrub runs (on one replica at a time).
    pub sweep_interval: Duration,
    /// The scrub re-hashes every stored blob once in this long; zero switches it off.
    pub scrub_period: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            restore_window: Duration::from_secs(7 * 24 * 3600),
            access_flush_interval: Duration::from_secs(1),
            clock_skew: Duration::from_secs(2),
            blob_grace: Duration::from_secs(24 * 3600),
            untagged_grace: Duration::from_secs(7 * 24 * 3600),
            enabled: true,
            interval: Duration::from_secs(10),
            workers: 1,
            sweep_interval: Duration::from_secs(60),
            scrub_period: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl GcSettings {
    /// Refuses windows the collector cannot keep its promises with: a zero window (a tombstone
    /// or blob would go in the instant it was made), and a `blob_grace` no longer than the
    /// margin the collector keeps over the access writer and the replicas' clocks.
    ///
    /// # Errors
    /// A message naming the setting.
    pub fn check_windows(&self) -> Result<(), ConfigError> {
        for (name, window) in [
            ("gc.restore_window", self.restore_window),
            ("gc.blob_grace", self.blob_grace),
            ("gc.untagged_grace", self.untagged_grace),
        ] {
            if window.is_zero() {
                return Err(ConfigError(format!("{name} must be more than zero")));
            }
        }
        let margin = self.access_flush_interval + self.clock_skew;
        if self.blob_grace <= margin {
            return Err(ConfigError(format!(
                "gc.blob_grace ({} ms) must exceed gc.access_flush_interval + gc.clock_skew ({} ms): \
                 a blob answered to a HEAD on one replica must outlive that replica's unwritten note of it",
                self.blob_grace.as_millis(),
                margin.as_millis()
            )));
        }
        Ok(())
    }
}

/// Parses a duration written as a number and a unit: `500ms`, `30s`, `15m`, `24h`, `7d`.
///
/// # Errors
/// A message saying what a duration looks like.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration like \"30s\", \"24h\" or \"7d\""))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{text}`: the unit must be one of ms, s, m, h, d")),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| format!("`{text}` is too long"))
}

/// The `[limits]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A client that has not sent a complete request head after this long is disconnected.
    pub header_read_timeout_secs: u64,
    /// A request body that delivers nothing for this long is aborted (nothing is recorded).
    pub body_idle_timeout_secs: u64,
    /// Largest request head (request line and headers), in bytes; larger ones get 431.
    pub max_header_bytes: usize,
    /// Requests per second allowed per client address; 0 means unlimited.
    pub requests_per_second: u32,
    /// Requests a client may make in a burst above that rate.
    pub burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            max_header_bytes: 64 * 1024,
            requests_per_second: 0,
            burst: 200,
        }
    }
}

/// The `[tls]` section: serve HTTPS with this certificate chain and key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate.
    pub key: PathBuf,
}

/// The file format; every field optional, unknown fields rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    metadata: MetadataSection,
    #[serde(default)]
    storage: StorageSection,
    #[serde(default)]
    uploads: UploadsSection,
    auth: Option<AuthConfig>,
    tls: Option<TlsConfig>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    gc: GcSection,
    #[serde(default)]
    manifests: ManifestsSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    ui: UiSection,
    #[serde(default)]
    retention: RetentionSection,
    #[serde(default)]
    immutable: Vec<ImmutableSection>,
    #[serde(default)]
    access: AccessSection,
    #[serde(default)]
    proxy: Vec<ProxySection>,
    #[serde(default)]
    events: EventsSection,
    #[serde(default)]
    quotas: Vec<QuotaSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaSection {
    name: String,
    repositories: String,
    max_bytes: Size,
    max_repositories: Option<u64>,
    warn_at: Option<f64>,
}

/// A size: bytes, or a string with a unit (`"500GB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsSection {
    retain: Option<String>,
    #[serde(default)]
    pulls: bool,
    registry_url: Option<String>,
    #[serde(default)]
    endpoints: Vec<EndpointSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSection {
    name: String,
    url: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    repositories: Vec<String>,
    format: Option<String>,
    timeout: Option<String>,
    batch: Option<usize>,
    backoff: Option<String>,
    max_backoff: Option<String>,
    max_attempts: Option<u32>,
    max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    prefix: String,
    upstream: String,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    tag_ttl: Option<String>,
    max_bytes: Option<u64>,
    evict_not_pulled_within: Option<String>,
    fill_missing_after: Option<String>,
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessSection {
    #[serde(default)]
    ignore_pulls_from: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionSection {
    interval: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSection {
    name: String,
    repositories: Option<String>,
    tags: Option<String>,
    keep_last: Option<u32>,
    keep_tags: Option<String>,
    remove_not_pushed_within: Option<String>,
    remove_not_pulled_within: Option<String>,
    remove_untagged_older_than: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImmutableSection {
    name: String,
    repositories: Option<String>,
    tags: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UiSection {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    enabled: Option<bool>,
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcSection {
    restore_window: Option<String>,
    access_flush_interval: Option<String>,
    clock_skew: Option<String>,
    blob_grace: Option<String>,
    untagged_grace: Option<String>,
    enabled: Option<bool>,
    interval: Option<String>,
    workers: Option<u32>,
    sweep_interval: Option<String>,
    scrub_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestsSection {
    #[serde(default)]
    sparse_index_repositories: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadsSection {
    expire_after_secs: Option<u64>,
    sweep_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataSection {
    url: Option<String>,
    max_connections: Option<u32>,
    acquire_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    kind: Option<String>,
    path: Option<PathBuf>,
    fsync: Option<bool>,
    direct_io: Option<bool>,
    s3: Option<S3Config>,
}

/// Settings given on the command line; they win over the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--log-level`
    pub log_level: Option<String>,
}

/// A configuration error, saying where the bad value came from.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// The embedded default: serve on 127.0.0.1:5000 with everything under `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            metadata_url: sqlite_url(&data_dir),
            storage_path: data_dir.join("blobs"),
            data_dir,
            log_level: "info".into(),
            log_json: false,
            metrics_enabled: true,
            ui_enabled: true,
            metrics_listen: None,
            metadata_max_connections: 8,
            metadata_acquire_timeout_secs: 10,
            storage_fsync: true,
            storage_direct_io: true,
            storage_s3: None,
            upload_expire_after_secs: 24 * 3600,
            auth: None,
            tls: None,
            limits: Limits::default(),
            gc: GcSettings::default(),
            sparse_index_repositories: Vec::new(),
            retention: RetentionSettings::default(),
            immutable: crate::retention::ImmutableTags::default(),
            ignore_pulls_from: Vec::new(),
            proxies: Vec::new(),
            events: crate::events::EventsConfig::default(),
            quotas: Vec::new(),
        }
    }

    /// Loads the configuration from an optional file, the process environment and `overrides`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or flag with the bad value.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(file, |k| std::env::var(k).ok(), overrides)
    }

    fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let parsed = match file {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?
            }
        };
        let data_dir = overrides
            .data_dir
            .clone()
            .or_else(|| env("BERTH_DATA_DIR").map(PathBuf::from))
            .or(parsed.data_dir)
            .unwrap_or_else(|| PathBuf::from("./berth-data"));
        let mut cfg = Config::embedded(&data_dir);

        let (listen, source) = if let Some(l) = &overrides.listen {
            (Some(l.clone()), "--listen")
        } else if let Some(l) = env("BERTH_LISTEN") {
            (Some(l), "BERTH_LISTEN")
        } else {
            (parsed.listen.clone(), "listen in the config file")
        };
        if let Some(listen) = listen {
            cfg.listen = listen.parse().map_err(|_| {
                ConfigError(format!("{source}: `{listen}` is not an address like 127.0.0.1:5000"))
            })?;
        }
        let level = [
            (overrides.log_level.clone(), "--log-level"),
            (env("BERTH_LOG_LEVEL"), "BERTH_LOG_LEVEL"),
            (env("RUST_LOG"), "RUST_LOG"),
            (parsed.log_level, "log_level in the config file"),
        ]
        .into_iter()
        .find_map(|(value, source)| value.map(|v| (v, source)));
        if let Some((level, source)) = level {
            check_log_filter(&level).map_err(|e| ConfigError(format!("{source}: {e}")))?;
            cfg.log_level = level;
        }
        let (format, source) = match env("BERTH_LOG_FORMAT") {
            Some(f) => (Some(f), "BERTH_LOG_FORMAT"),
            None => (parsed.log_format, "log_format in the config file"),
        };
        match format.as_deref() {
            None | Some("text") => {}
            Some("json") => cfg.log_json = true,
            Some(other) => {
                return Err(ConfigError(format!("{source}: `{other}` is not a log format (text or json)")));
            }
        }
        if let Some(enabled) = parsed.metrics.enabled {
            cfg.metrics_enabled = enabled;
        }
        if let Some(enabled) = parsed.ui.enabled {
            cfg.ui_enabled = enabled;
        }
        if let Some(v) = env("BERTH_UI_ENABLED") {
            cfg.ui_enabled = matches!(v.as_str(), "1" | "true" | "yes");
        }
        let (listen, source) = match env("BERTH_METRICS_LISTEN") {
            Some(l) => (Some(l), "BERTH_METRICS_LISTEN"),
            None => (parsed.metrics.listen, "metrics.listen"),
        };
        if let Some(listen) = listen {
            cfg.metrics_listen = Some(listen.parse().map_err(|_| {
                ConfigError(format!("{source}: `{listen}` is not an address like 127.0.0.1:9090"))
            })?);
        }
        if let Some(url) = env("BERTH_METADATA_URL").or(parsed.metadata.url) {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return Err(ConfigError(format!(
                    "metadata.url `{url}` must start with sqlite: or postgres://"
                )));
            }
            cfg.metadata_url = url;
        }
        if let Some(n) = parsed.metadata.max_connections {
            if n == 0 {
                return Err(ConfigError("metadata.max_connections must be at least 1".into()));
            }
            cfg.metadata_max_connections = n;
        }
        if let Some(s) = parsed.metadata.acquire_timeout_secs {
            cfg.metadata_acquire_timeout_secs = s;
        }
        if let Some(path) = env("BERTH_STORAGE_PATH").map(PathBuf::from).or(parsed.storage.path) {
            cfg.storage_path = path;
        }
        if let Some(fsync) = parsed.storage.fsync {
            cfg.storage_fsync = fsync;
        }
        if let Some(direct) = parsed.storage.direct_io {
            cfg.storage_direct_io = direct;
        }
        if let Some(secs) = parsed.uploads.expire_after_secs {
            cfg.upload_expire_after_secs = secs;
        }
        if parsed.uploads.sweep_interval_secs.is_some() {
            return Err(ConfigError(
                "uploads.sweep_interval_secs is gone: the collector removes abandoned upload sessions \
                 every gc.interval"
                    .into(),
            ));
        }
        cfg.auth = parsed.auth;
        cfg.tls = parsed.tls;
        if parsed.limits.header_read_timeout_secs == 0 || parsed.limits.body_idle_timeout_secs == 0 {
            return Err(ConfigError("limits: timeouts must be at least 1 second".into()));
        }
        if parsed.limits.max_header_bytes < 8192 {
            return Err(ConfigError("limits.max_header_bytes must be at least 8192".into()));
        }
        cfg.limits = parsed.limits;
        let (window, source) = match env("BERTH_GC_RESTORE_WINDOW") {
            Some(w) => (Some(w), "BERTH_GC_RESTORE_WINDOW"),
            None => (parsed.gc.restore_window, "gc.restore_window"),
        };
        if let Some(window) = window {
            cfg.gc.restore_window =
                parse_duration(&window).map_err(|e| ConfigError(format!("{source}: {e}")))?;
        }
        for (value, var, name, field) in [
            (parsed.gc.blob_grace, "BERTH_GC_BLOB_GRACE", "gc.blob_grace", &mut cfg.gc.blob_grace),
            (
                parsed.gc.untagged_grace,
                "BERTH_GC_UNTAGGED_GRACE",
                "gc.untagged_grace",
                &mut cfg.gc.untagged_grace,
            ),
            (parsed.gc.clock_skew, "BERTH_GC_CLOCK_SKEW", "gc.clock_skew", &mut cfg.gc.clock_skew),
            (parsed.gc.interval, "BERTH_GC_INTERVAL", "gc.interval", &mut cfg.gc.interval),
            (
                parsed.gc.sweep_interval,
                "BERTH_GC_SWEEP_INTERVAL",
                "gc.sweep_interval",
                &mut cfg.gc.sweep_interval,
            ),
            (parsed.gc.scrub_period, "BERTH_GC_SCRUB_PERIOD", "gc.scrub_period", &mut cfg.gc.scrub_period),
        ] {
            let (value, source) = match env(var) {
                Some(v) => (Some(v), var),
                None => (value, name),
            };
            if let Some(value) = value {
                *field = parse_duration(&value).map_err(|e| ConfigError(format!("{source}: {e}")))?;
            }
        }
        if let Some(enabled) = parsed.gc.enabled {
            cfg.gc.enabled = enabled;
        }
        if let Some(v) = env("BERTH_GC_ENABLED") {
            cfg.gc.enabled = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if cfg.gc.interval.is_zero() || cfg.gc.sweep_interval.is_zero() {
            return Err(ConfigError("gc.interval and gc.sweep_interval must be more than zero".into()));
        }
        if let Some(workers) = parsed.gc.workers {
            cfg.gc.workers = workers;
        }
        if let Some(v) = env("BERTH_GC_WORKERS") {
            cfg.gc.workers =
                v.parse().map_err(|_| ConfigError(format!("BERTH_GC_WORKERS: `{v}` is not a number")))?;
        }
        if !(1..=64).contains(&cfg.gc.workers) {
            return Err(ConfigError(
                "gc.workers must be between 1 and 64 (gc.enabled = false switches the collector off)".into(),
            ));
        }
        if let Some(every) = parsed.gc.access_flush_interval {
            let every =
                parse_duration(&every).map_err(|e| ConfigError(format!("gc.access_flush_interval: {e}")))?;
            if every.is_zero() || every > Duration::from_secs(60) {
                return Err(ConfigError("gc.access_flush_interval must be between 1ms and 60s".into()));
            }
            cfg.gc.access_flush_interval = every;
        }
        cfg.gc.check_windows()?;
        for p in &parsed.manifests.sparse_index_repositories {
            let pattern = crate::auth::Pattern::parse(p)
                .map_err(|e| ConfigError(format!("manifests.sparse_index_repositories: `{p}`: {e}")))?;
            cfg.sparse_index_repositories.push(pattern);
        }
        let (interval, source) = match env("BERTH_RETENTION_INTERVAL") {
            Some(v) => (Some(v), "BERTH_RETENTION_INTERVAL"),
            None => (parsed.retention.interval, "retention.interval"),
        };
        if let Some(interval) = interval {
            cfg.retention.interval =
                parse_duration(&interval).map_err(|e| ConfigError(format!("{source}: {e}")))?;
        }
        cfg.retention.rules = retention_rules(parsed.retention.rules)?;
        cfg.immutable = immutable_rules(parsed.immutable)?;
        for who in &parsed.access.ignore_pulls_from {
            let group = who.strip_prefix("group:");
            let known = match (group, &cfg.auth) {
                (Some(g), Some(auth)) => auth.groups.iter().any(|x| x.name == g),
                (Some(_), None) => false,
                (None, _) => !who.trim().is_empty(),
            };
            if !known {
                return Err(ConfigError(format!(
                    "access.ignore_pulls_from: {who:?} is not a user name or a group [auth] defines"
                )));
            }
        }
        cfg.ignore_pulls_from = parsed.access.ignore_pulls_from;
        cfg.proxies = proxies(parsed.proxy, &env)?;
        cfg.events = events(parsed.events, &env)?;
        cfg.quotas = quota_rules(parsed.quotas)?;
        let kind = env("BERTH_STORAGE_KIND").or(parsed.storage.kind).unwrap_or_else(|| "filesystem".into());
        match kind.as_str() {
            "filesystem" => {}
            "s3" => {
                let mut s3 = parsed.storage.s3.unwrap_or_default();
                for (var, field) in [
                    ("BERTH_S3_ENDPOINT", &mut s3.endpoint),
                    ("BERTH_S3_REGION", &mut s3.region),
                    ("BERTH_S3_PREFIX", &mut s3.prefix),
                    ("BERTH_S3_ACCESS_KEY_ID", &mut s3.access_key_id),
                    ("BERTH_S3_SECRET_ACCESS_KEY", &mut s3.secret_access_key),
                ] {
                    if let Some(v) = env(var) {
                        *field = Some(v);
                    }
                }
                if let Some(v) = env("BERTH_S3_SIGN_PAYLOAD") {
                    s3.sign_payload = Some(matches!(v.as_str(), "1" | "true" | "yes"));
                }
                if let Some(bucket) = env("BERTH_S3_BUCKET") {
                    s3.bucket = bucket;
                }
                if s3.bucket.is_empty() {
                    return Err(ConfigError(
                        "storage.kind = \"s3\" needs storage.s3.bucket (or BERTH_S3_BUCKET)".into(),
                    ));
                }
                if s3.part_size_mib < 5 {
                    return Err(ConfigError(
                        "storage.s3.part_size_mib must be at least 5 (S3's minimum part)".into(),
                    ));
                }
                // A presigned URL handed out just before a blob's grace ends must not outlive the
                // blob: keep it far shorter (a tenth) than blob_grace.
                if s3.redirect
                    && Duration::from_secs(s3.redirect_ttl_secs.saturating_mul(10)) > cfg.gc.blob_grace
                {
                    return Err(ConfigError(format!(
                        "storage.s3.redirect_ttl_secs = {} must be at most a tenth of gc.blob_grace ({} s): \
                         a presigned URL must not outlive the blob it names",
                        s3.redirect_ttl_secs,
                        cfg.gc.blob_grace.as_secs()
                    )));
                }
                cfg.storage_s3 = Some(s3);
            }
            other => {
                return Err(ConfigError(format!(
                    "storage.kind = \"{other}\" is not supported (supported: \"filesystem\", \"s3\")"
                )));
            }
        }
        Ok(cfg)
    }
}

/// The `[events]` section, checked: endpoint names unique, URLs http(s), filters known.
fn events(
    section: EventsSection,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<crate::events::EventsConfig, ConfigError> {
    use crate::events::{EndpointConfig, EventsConfig, Format, kind_filter_valid};
    let mut out = EventsConfig { pulls: section.pulls, ..EventsConfig::default() };
    if let Some(retain) = section.retain {
        out.retain = parse_duration(&retain).map_err(|e| ConfigError(format!("events.retain: {e}")))?;
    }
    if let Some(url) = section.registry_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError(format!(
                "events.registry_url `{url}` must be an http:// or https:// URL"
            )));
        }
        out.registry_url = Some(url.trim_end_matches('/').to_string());
    }
    for e in section.endpoints {
        let what = format!("events endpoint `{}`", e.name);
        if e.name.is_empty() || !e.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError(format!("{what}: the name must be letters, digits, `-`, `_` or `.`")));
        }
        if out.endpoints.iter().any(|o: &EndpointConfig| o.name == e.name) {
            return Err(ConfigError(format!("{what}: two endpoints have that name")));
        }
        if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
            return Err(ConfigError(format!("{what}: url `{}` must be an http:// or https:// URL", e.url)));
        }
        let format = match e.format.as_deref() {
            None | Some("cloudevents") => Format::CloudEvents,
            Some("distribution") => Format::Distribution,
            Some(other) => {
                return Err(ConfigError(format!(
                    "{what}: format `{other}` is not supported (\"cloudevents\" or \"distribution\")"
                )));
            }
        };
        if let Some(bad) = e.kinds.iter().find(|k| !kind_filter_valid(k)) {
            return Err(ConfigError(format!(
                "{what}: kinds: `{bad}` matches no kind (kinds: {})",
                crate::events::KINDS.join(", ")
            )));
        }
        let repositories = e
            .repositories
            .iter()
            .map(|p| {
                crate::auth::Pattern::parse(p)
                    .map_err(|m| ConfigError(format!("{what}: repositories: `{p}`: {m}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let duration = |field: &str, v: Option<String>, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(v) => parse_duration(&v).map_err(|m| ConfigError(format!("{what}: {field}: {m}"))),
            }
        };
        let timeout = duration("timeout", e.timeout, Duration::from_secs(10))?;
        let backoff = duration("backoff", e.backoff, Duration::from_secs(1))?;
        let max_backoff = duration("max_backoff", e.max_backoff, Duration::from_secs(300))?;
        let max_age = duration("max_age", e.max_age, Duration::from_secs(24 * 3600))?;
        if timeout.is_zero() || backoff.is_zero() || max_backoff < backoff || max_age.is_zero() {
            return Err(ConfigError(format!(
                "{what}: timeout, backoff and max_age must be more than zero, max_backoff at least backoff"
            )));
        }
        let batch = e.batch.unwrap_or(100);
        let max_attempts = e.max_attempts.unwrap_or(10);
        if !(1..=1000).contains(&batch) || max_attempts == 0 {
            return Err(ConfigError(format!(
                "{what}: batch must be between 1 and 1000, max_attempts more than zero"
            )));
        }
        // Secrets belong in the environment: BERTH_EVENTS_<NAME>_HEADER_<HEADER>.
        let prefix: String = e
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .collect();
        let mut headers = Vec::new();
        for (name, value) in e.headers {
            let var: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
                .collect();
            let value = env(&format!("BERTH_EVENTS_{prefix}_HEADER_{var}")).unwrap_or(value);
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(&value).is_err()
            {
                return Err(ConfigError(format!("{what}: header `{name}` is not a valid HTTP header")));
            }
            headers.push((name, value));
        }
        out.endpoints.push(EndpointConfig {
            name: e.name,
            url: e.url,
            headers,
            kinds: e.kinds,
            repositories,
            format,
            timeout,
            batch,
            backoff,
            max_backoff,
            max_attempts,
            max_age,
        });
    }
    Ok(out)
}

/// The `[[proxy]]` entries, checked: prefixes valid, distinct and not nested; one default at most.
fn proxies(
    sections: Vec<ProxySection>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<ProxyConfig>, ConfigError> {
    let mut out: Vec<ProxyConfig> = Vec::new();
    for p in sections {
        let what = format!("proxy `{}`", p.prefix);
        crate::oci::RepoName::parse(&p.prefix)
            .map_err(|e| ConfigError(format!("{what}: the prefix must be a repository name: {e}")))?;
        if let Some(other) = out.iter().find(|o| {
            o.prefix == p.prefix
                || o.prefix.starts_with(&format!("{}/", p.prefix))
                || p.prefix.starts_with(&format!("{}/", o.prefix))
        }) {
            return Err(ConfigError(format!("{what}: overlaps proxy `{}`", other.prefix)));
        }
        let upstream = p.upstream.trim_end_matches('/').to_string();
        if !(upstream.starts_with("http://") || upstream.starts_with("https://"))
            || upstream.split_once("://").is_some_and(|(_, h)| h.is_empty())
        {
            return Err(ConfigError(format!(
                "{what}: upstream `{upstream}` must be an http:// or https:// URL"
            )));
        }
        // Credentials in the URL would show wherever the upstream is named (status, errors).
        if upstream
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
        {
            return Err(ConfigError(format!(
                "{what}: the upstream URL must not hold credentials; use username and password"
            )));
        }
        if p.default && out.iter().any(|o| o.default) {
            return Err(ConfigError(format!("{what}: only one proxy may be the default")));
        }
        let var = |field: &str| {
            let name: String = p
                .prefix
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
                .collect();
            env(&format!("BERTH_PROXY_{name}_{field}"))
        };
        let duration = |field: &str, v: Option<String>| -> Result<Option<Duration>, ConfigError> {
            v.map(|v| parse_duration(&v).map_err(|e| ConfigError(format!("{what}: {field}: {e}"))))
                .transpose()
        };
        let tag_ttl = duration("tag_ttl", p.tag_ttl)?.unwrap_or(Duration::from_secs(300));
        let evict_not_pulled_within = duration("evict_not_pulled_within", p.evict_not_pulled_within)?;
        let fill_missing_after = match p.fill_missing_after.as_deref() {
            Some("never") => None,
            other => Some(
                duration("fill_missing_after", other.map(str::to_string))?.unwrap_or(Duration::from_secs(10)),
            ),
        };
        if evict_not_pulled_within.is_some_and(|d| d.is_zero()) || p.max_bytes == Some(0) {
            return Err(ConfigError(format!(
                "{what}: max_bytes and evict_not_pulled_within must be more than zero"
            )));
        }
        if let Some(ca) = &p.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError(format!("{what}: ca_file {} is not a readable file", ca.display())));
        }
        let username = var("USERNAME").or(p.username);
        let password = var("PASSWORD").or(p.password);
        if username.is_some() != password.is_some() {
            return Err(ConfigError(format!("{what}: username and password go together")));
        }
        out.push(ProxyConfig {
            prefix: p.prefix,
            upstream,
            username,
            password,
            ca_file: p.ca_file,
            tag_ttl,
            max_bytes: p.max_bytes,
            evict_not_pulled_within,
            fill_missing_after,
            default: p.default,
        });
    }
    Ok(out)
}

/// A rule's name: it appears in the history as `retention:<name>` and in refusals.
fn rule_name(kind: &str, name: &str, seen: &mut Vec<String>) -> Result<String, ConfigError> {
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return Err(ConfigError(format!(
            "{kind} `{name}`: a rule's name is lowercase letters, digits, `.`, `_` and `-`"
        )));
    }
    if seen.iter().any(|s| s == name) {
        return Err(ConfigError(format!("{kind} `{name}` is defined twice")));
    }
    seen.push(name.to_string());
    Ok(name.to_string())
}

fn rule_repositories(kind: &str, name: &str, p: Option<&str>) -> Result<crate::auth::Pattern, ConfigError> {
    let p = p.unwrap_or("**");
    crate::auth::Pattern::parse(p)
        .map_err(|e| ConfigError(format!("{kind} `{name}`: repositories `{p}`: {e}")))
}

fn rule_tags(
    kind: &str,
    name: &str,
    field: &str,
    p: &str,
) -> Result<crate::retention::TagPattern, ConfigError> {
    crate::retention::TagPattern::parse(p).map_err(|e| ConfigError(format!("{kind} `{name}`: {field}: {e}")))
}

fn retention_rules(sections: Vec<RuleSection>) -> Result<Vec<crate::retention::RetentionRule>, ConfigError> {
    let kind = "retention rule";
    let mut seen = Vec::new();
    let mut rules = Vec::with_capacity(sections.len());
    for r in sections {
        let name = rule_name(kind, &r.name, &mut seen)?;
        let ms = |field: &str, v: Option<String>| -> Result<Option<i64>, ConfigError> {
            v.map(|v| {
                let d =
                    parse_duration(&v).map_err(|e| ConfigError(format!("{kind} `{name}`: {field}: {e}")))?;
                if d.is_zero() {
                    return Err(ConfigError(format!("{kind} `{name}`: {field} must be more than zero")));
                }
                Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            })
            .transpose()
        };
        let rule = crate::retention::RetentionRule {
            repositories: rule_repositories(kind, &name, r.repositories.as_deref())?,
            tags: r.tags.as_deref().map(|p| rule_tags(kind, &name, "tags", p)).transpose()?,
            keep_last: r.keep_last,
            keep_tags: r.keep_tags.as_deref().map(|p| rule_tags(kind, &name, "keep_tags", p)).transpose()?,
            remove_not_pushed_within_ms: ms("remove_not_pushed_within", r.remove_not_pushed_within)?,
            remove_not_pulled_within_ms: ms("remove_not_pulled_within", r.remove_not_pulled_within)?,
            remove_untagged_older_than_ms: ms("remove_untagged_older_than", r.remove_untagged_older_than)?,
            name,
        };
        if rule.keep_last == Some(0) {
            return Err(ConfigError(format!(
                "{kind} `{}`: keep_last must be at least 1 (leave it out to keep no tag by recency)",
                rule.name
            )));
        }
        if rule.keep_last.is_none()
            && rule.keep_tags.is_none()
            && rule.remove_not_pushed_within_ms.is_none()
            && rule.remove_not_pulled_within_ms.is_none()
            && rule.remove_untagged_older_than_ms.is_none()
        {
            return Err(ConfigError(format!(
                "{kind} `{}` does nothing: give it keep_last, keep_tags, remove_not_pushed_within, \
                 remove_not_pulled_within or remove_untagged_older_than",
                rule.name
            )));
        }
        rules.push(rule);
    }
    Ok(rules)
}

fn immutable_rules(sections: Vec<ImmutableSection>) -> Result<crate::retention::ImmutableTags, ConfigError> {
    let kind = "immutable rule";
    let mut seen = Vec::new();
    let mut rules = Vec::with_capacity(sections.len());
    for r in sections {
        let name = rule_name(kind, &r.name, &mut seen)?;
        rules.push(crate::retention::ImmutableRule {
            repositories: rule_repositories(kind, &name, r.repositories.as_deref())?,
            tags: rule_tags(kind, &name, "tags", &r.tags)?,
            name,
        });
    }
    Ok(crate::retention::ImmutableTags(rules))
}

/// The `[[quotas]]` rules, checked: names unique, a scope, a positive limit, `warn_at` in (0, 1].
fn quota_rules(sections: Vec<QuotaSection>) -> Result<Vec<crate::quota::QuotaRule>, ConfigError> {
    let kind = "quota";
    let mut seen = Vec::new();
    let mut rules = Vec::with_capacity(sections.len());
    for q in sections {
        let name = rule_name(kind, &q.name, &mut seen)?;
        let max_bytes = match q.max_bytes {
            Size::Bytes(0) => Err("must be more than zero".to_string()),
            Size::Bytes(n) if n > i64::MAX as u64 => Err("is more than Berth can count".to_string()),
            Size::Bytes(n) => Ok(n),
            Size::Text(t) => crate::quota::parse_size(&t),
        }
        .map_err(|e| ConfigError(format!("{kind} `{name}`: max_bytes {e}")))?;
        if q.max_repositories == Some(0) {
            return Err(ConfigError(format!("{kind} `{name}`: max_repositories must be more than zero")));
        }
        let warn_at = q.warn_at.unwrap_or(0.9);
        if !(warn_at > 0.0 && warn_at <= 1.0) {
            return Err(ConfigError(format!("{kind} `{name}`: warn_at is a fraction above 0 and at most 1")));
        }
        rules.push(crate::quota::QuotaRule {
            repositories: rule_repositories(kind, &name, Some(&q.repositories))?,
            max_bytes,
            max_repositories: q.max_repositories,
            warn_at,
            name,
        });
    }
    Ok(rules)
}

/// Checks a log filter: comma-separated directives, each a level (`error`, `warn`, `info`,
/// `debug`, `trace`, `off`) or `target=level`. A bare word that is not a level would be read as a
/// target and silence everything else, so it is refused rather than guessed at.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    let bad = |d: &str| {
        format!(
            "`{d}` is not a log level; use one of error, warn, info, debug, trace, off, or target=level (e.g. berth=debug,sqlx=warn)"
        )
    };
    if filter.trim().is_empty() {
        return Err(bad(filter));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let ok = match directive.rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(bad(directive));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map(|_| ()).map_err(|e| format!("`{filter}`: {e}"))
}

fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite:{}", data_dir.join("metadata.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_checked() {
        let o = Overrides::default();
        let ok = "[events]\nretain = \"2d\"\nregistry_url = \"https://r.example.com/\"\n\
                  [[events.endpoints]]\nname = \"ci-hook\"\nurl = \"https://ci.example.com/h\"\nformat = \"distribution\"\n\
                  kinds = [\"tag.*\", \"manifest.pushed\"]\nrepositories = [\"team/**\"]\nheaders = { Authorization = \"in-file\" }\n";
        let c = load(ok, &[("BERTH_EVENTS_CI_HOOK_HEADER_AUTHORIZATION", "Bearer from-env")], &o).unwrap();
        assert_eq!(c.events.retain, Duration::from_secs(2 * 24 * 3600));
        assert_eq!(c.events.registry_url.as_deref(), Some("https://r.example.com"));
        let e = &c.events.endpoints[0];
        assert_eq!(e.format, crate::events::Format::Distribution);
        assert_eq!(e.headers, [("Authorization".to_string(), "Bearer from-env".to_string())]);
        assert!(!format!("{e:?}").contains("from-env"), "header values must not be printed");
        assert!(e.wants("tag.deleted", Some("team/app")));
        assert!(!e.wants("tag.deleted", Some("other/app")));
        assert!(!e.wants("manifest.deleted", Some("team/app")));
        assert!(!e.wants("blob.collected", None), "registry-wide events pass no repository filter");
        for (bad, says) in [
            ("[[events.endpoints]]\nname = \"a b\"\nurl = \"https://h\"\n", "the name"),
            ("[[events.endpoints]]\nname = \"a\"\nurl = \"ftp://h\"\n", "http://"),
            (
                "[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\n[[events.endpoints]]\nname = \"a\"\nurl = \"https://i\"\n",
                "two endpoints",
            ),
            (
                "[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nkinds = [\"tags.*\"]\n",
                "matches no kind",
            ),
            ("[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nformat = \"xml\"\n", "not supported"),
            ("[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nbatch = 0\n", "batch"),
            (
                "[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nrepositories = [\"A\"]\n",
                "repositories",
            ),
            (
                "[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nbackoff = \"5m\"\nmax_backoff = \"1s\"\n",
                "max_backoff",
            ),
            ("[events]\nretain = \"forever\"\n", "events.retain"),
            ("[[events.endpoints]]\nname = \"a\"\nurl = \"https://h\"\nsecret = 1\n", "unknown field"),
        ] {
            let e = load(bad, &[], &o).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn proxies_are_checked() {
        let o = Overrides::default();
        let ok = "[[proxy]]\nprefix = \"hub\"\nupstream = \"https://registry-1.docker.io/\"\nusername = \"u\"\n\
                  password = \"p\"\ntag_ttl = \"1m\"\nmax_bytes = 1000\ndefault = true\n";
        let c = load(ok, &[("BERTH_PROXY_HUB_PASSWORD", "from-env")], &o).unwrap();
        let p = &c.proxies[0];
        assert_eq!(p.upstream, "https://registry-1.docker.io");
        assert_eq!(p.upstream_host(), "registry-1.docker.io");
        assert_eq!(p.password.as_deref(), Some("from-env"));
        assert_eq!(p.tag_ttl, Duration::from_secs(60));
        assert_eq!(p.fill_missing_after, Some(Duration::from_secs(10)));
        assert!(!format!("{p:?}").contains("from-env"), "the password must not be printed");
        for (bad, says) in [
            ("[[proxy]]\nprefix = \"Hub\"\nupstream = \"https://h\"\n", "repository name"),
            (
                "[[proxy]]\nprefix = \"a\"\nupstream = \"https://h\"\n[[proxy]]\nprefix = \"a/b\"\nupstream = \"https://i\"\n",
                "overlaps",
            ),
            ("[[proxy]]\nprefix = \"a\"\nupstream = \"ftp://h\"\n", "http://"),
            ("[[proxy]]\nprefix = \"a\"\nupstream = \"https://u:secret@h\"\n", "must not hold credentials"),
            ("[[proxy]]\nprefix = \"a\"\nupstream = \"https://h\"\nusername = \"u\"\n", "go together"),
            (
                "[[proxy]]\nprefix = \"a\"\nupstream = \"https://h\"\ndefault = true\n[[proxy]]\nprefix = \"b\"\nupstream = \"https://i\"\ndefault = true\n",
                "only one",
            ),
            ("[[proxy]]\nprefix = \"a\"\nupstream = \"https://h\"\ntag_ttl = \"soon\"\n", "tag_ttl"),
            ("[[proxy]]\nprefix = \"a\"\nupstream = \"https://h\"\nmax_bytes = 0\n", "more than zero"),
        ] {
            let e = load(bad, &[], &o).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    fn load(toml: &str, env: &[(&str, &str)], o: &Overrides) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, toml).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::load_from(Some(&path), |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()), o)
    }

    #[test]
    fn bad_log_levels_stop_with_their_source() {
        for (flag, env_var, file) in
            [(Some("verbose"), None, None), (None, Some("bogus"), None), (None, None, Some("xx=["))]
        {
            let o = Overrides { log_level: flag.map(str::to_string), ..Overrides::default() };
            let env: Vec<(&str, &str)> = env_var.map(|v| ("BERTH_LOG_LEVEL", v)).into_iter().collect();
            let toml = file.map(|f| format!("log_level = {f:?}\n")).unwrap_or_default();
            let e = load(&toml, &env, &o).unwrap_err().to_string();
            let source = if flag.is_some() {
                "--log-level"
            } else if env_var.is_some() {
                "BERTH_LOG_LEVEL"
            } else {
                "config file"
            };
            assert!(e.contains(source) && e.contains("log level"), "{e}");
        }
        for good in ["info", "debug", "berth=debug,sqlx=warn", "WARN"] {
            let o = Overrides { log_level: Some(good.into()), ..Overrides::default() };
            assert_eq!(load("", &[], &o).unwrap().log_level, good);
        }
        let e = load("", &[("RUST_LOG", "loud")], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("RUST_LOG"), "{e}");
    }

    #[test]
    fn the_console_is_on_unless_switched_off() {
        assert!(load("", &[], &Overrides::default()).unwrap().ui_enabled);
        assert!(!load("[ui]\nenabled = false\n", &[], &Overrides::default()).unwrap().ui_enabled);
        let c =
            load("[ui]\nenabled = false\n", &[("BERTH_UI_ENABLED", "true")], &Overrides::default()).unwrap();
        assert!(c.ui_enabled, "the environment wins over the file");
        assert!(load("[ui]\nlisten = \"x\"\n", &[], &Overrides::default()).is_err(), "unknown keys refused");
    }

    #[test]
    fn durations_and_the_gc_section() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert!(parse_duration("7 days").unwrap_err().contains("unit"));
        assert!(parse_duration("d").is_err());
        let c = load(
            "[gc]\nrestore_window = \"2h\"\n[manifests]\nsparse_index_repositories = [\"mirror/**\"]\n",
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.gc.restore_window, Duration::from_secs(7200));
        assert!(c.sparse_index_repositories[0].matches("mirror/library/alpine"));
        let e = load("", &[("BERTH_GC_RESTORE_WINDOW", "soon")], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("BERTH_GC_RESTORE_WINDOW"), "{e}");
        let c =
            load("[gc]\nblob_grace = \"5s\"\nuntagged_grace = \"2s\"\n", &[], &Overrides::default()).unwrap();
        assert_eq!((c.gc.blob_grace, c.gc.untagged_grace), (Duration::from_secs(5), Duration::from_secs(2)));
        // Presigned URLs must live far shorter than blob_grace.
        let s3 = "[storage]\nkind = \"s3\"\n[storage.s3]\nbucket = \"b\"\nredirect = true\nredirect_ttl_secs = 600\n";
        let e = load(&format!("{s3}[gc]\nblob_grace = \"1h\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("redirect_ttl_secs"), "{e}");
        assert!(load(&format!("{s3}[gc]\nblob_grace = \"2h\"\n"), &[], &Overrides::default()).is_ok());
        // Log format.
        assert!(load("log_format = \"json\"\n", &[], &Overrides::default()).unwrap().log_json);
        assert!(!load("", &[], &Overrides::default()).unwrap().log_json);
        let e = load("", &[("BERTH_LOG_FORMAT", "xml")], &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("BERTH_LOG_FORMAT"), "{e}");
        // The collector's workers and the safety net's pace.
        let c = load(
            "[gc]\nworkers = 4\nsweep_interval = \"30s\"\nscrub_period = \"0s\"\n",
            &[("BERTH_GC_INTERVAL", "2s")],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.gc.workers, 4);
        assert_eq!((c.gc.interval, c.gc.sweep_interval), (Duration::from_secs(2), Duration::from_secs(30)));
        assert!(c.gc.scrub_period.is_zero());
        for (toml, fragment) in [
            ("[gc]\nworkers = 0\n", "gc.workers"),
            ("[gc]\nsweep_interval = \"0s\"\n", "sweep_interval"),
            ("[uploads]\nsweep_interval_secs = 600\n", "gc.interval"),
        ] {
            let e = load(toml, &[], &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(fragment), "{toml}: {e}");
        }
    }

    #[test]
    fn defaults_are_the_embedded_deployment() {
        let c = Config::load_from(None, |_| None, &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.data_dir, PathBuf::from("./berth-data"));
        assert!(c.metadata_url.starts_with("sqlite:") && c.metadata_url.ends_with("metadata.db"));
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let toml = "listen = \"127.0.0.1:1\"\nlog_level = \"warn\"\n";
        assert_eq!(load(toml, &[], &Overrides::default()).unwrap().listen.port(), 1);
        assert_eq!(
            load(toml, &[("BERTH_LISTEN", "127.0.0.1:2")], &Overrides::default()).unwrap().listen.port(),
            2
        );
        let o = Overrides { listen: Some("127.0.0.1:3".into()), ..Default::default() };
        assert_eq!(load(toml, &[("BERTH_LISTEN", "127.0.0.1:2")], &o).unwrap().listen.port(), 3);
    }

    #[test]
    fn errors_say_where() {
        let e = load("listen = \"nope\"", &[], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("listen in the config file") && e.contains("nope"), "{e}");
        let e = load("lisen = \"x\"", &[], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("lisen"), "{e}");
        let e = load("[metadata]\nurl = \"mysql://x\"", &[], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("metadata.url"), "{e}");
        let e = load("", &[("BERTH_LISTEN", "x")], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("BERTH_LISTEN"), "{e}");
        let e = load("[storage]\nkind = \"s3\"\n", &[], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("bucket"), "{e}");
        let e = load("[storage]\nkind = \"tape\"\n", &[], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("tape"), "{e}");
    }

    #[test]
    fn s3_storage_from_file_and_env() {
        let toml = "[storage]\nkind = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://x:1\"\n";
        let c = load(toml, &[("BERTH_S3_PREFIX", "p")], &Overrides::default()).unwrap();
        let s3 = c.storage_s3.unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.endpoint.as_deref(), s3.prefix.as_deref()),
            ("b", Some("http://x:1"), Some("p"))
        );
        assert!(s3.path_style && !s3.redirect && s3.part_size_mib == 5);
        // Entirely from the environment: the same defaults.
        let c = load("", &[("BERTH_STORAGE_KIND", "s3"), ("BERTH_S3_BUCKET", "b")], &Overrides::default())
            .unwrap();
        let s3 = c.storage_s3.unwrap();
        assert!(s3.path_style && s3.part_size_mib == 5 && s3.redirect_ttl_secs == 300);
        assert_eq!(s3.sign_payload, None, "decided by the endpoint's scheme");
        let c = load(
            "[storage]\nkind = \"s3\"\n[storage.s3]\nbucket = \"b\"\nsign_payload = false\n",
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.storage_s3.unwrap().sign_payload, Some(false));
        let env = [("BERTH_STORAGE_KIND", "s3"), ("BERTH_S3_BUCKET", "b"), ("BERTH_S3_SIGN_PAYLOAD", "true")];
        assert_eq!(
            load("", &env, &Overrides::default()).unwrap().storage_s3.unwrap().sign_payload,
            Some(true)
        );
    }

    #[test]
    fn quotas_are_checked() {
        let ok = "[[quotas]]\nname = \"team-a\"\nrepositories = \"team-a/**\"\nmax_bytes = \"5GB\"\n\
                  max_repositories = 20\nwarn_at = 0.8\n[[quotas]]\nname = \"all\"\nrepositories = \"**\"\nmax_bytes = 1000\n";
        let c = load(ok, &[], &Overrides::default()).unwrap();
        assert_eq!(c.quotas[0].max_bytes, 5_000_000_000);
        assert_eq!(c.quotas[0].max_repositories, Some(20));
        assert_eq!(c.quotas[1].warn_at, 0.9);
        for (bad, says) in [
            ("[[quotas]]\nname = \"a\"\nrepositories = \"**\"\nmax_bytes = 0\n", "more than zero"),
            ("[[quotas]]\nname = \"a\"\nrepositories = \"**\"\nmax_bytes = \"5 furlongs\"\n", "unit"),
            ("[[quotas]]\nname = \"a\"\nrepositories = \"**\"\nmax_bytes = 1\nwarn_at = 1.5\n", "warn_at"),
            (
                "[[quotas]]\nname = \"a\"\nrepositories = \"**\"\nmax_bytes = 1\nmax_repositories = 0\n",
                "max_repositories",
            ),
            ("[[quotas]]\nname = \"A\"\nrepositories = \"**\"\nmax_bytes = 1\n", "lowercase"),
            ("[[quotas]]\nname = \"a\"\nrepositories = \"**\"\n", "max_bytes"),
            (
                "[[quotas]]\nname = \"a\"\nrepositories = \"**\"\nmax_bytes = 1\n[[quotas]]\nname = \"a\"\nrepositories = \"x\"\nmax_bytes = 1\n",
                "twice",
            ),
        ] {
            let e = load(bad, &[], &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn retention_rules_and_immutable_tags() {
        let toml = r#"
[retention]
interval = "30m"
[[retention.rules]]
name = "ci"
repositories = "team/**"
tags = "ci-.*"
keep_last = 5
remove_not_pushed_within = "14d"
remove_not_pulled_within = "7d"
[[retention.rules]]
name = "releases"
keep_tags = 'v\d+\.\d+\.\d+'
[[immutable]]
name = "releases"
tags = "release-.*"
"#;
        let c = load(toml, &[], &Overrides::default()).unwrap();
        assert_eq!(c.retention.interval, Duration::from_secs(1800));
        let ci = &c.retention.rules[0];
        assert_eq!((ci.name.as_str(), ci.keep_last), ("ci", Some(5)));
        assert_eq!(ci.remove_not_pushed_within_ms, Some(14 * 86_400_000));
        assert!(ci.repositories.matches("team/a/b") && !ci.repositories.matches("other"));
        assert!(c.retention.rules[1].repositories.matches_everything());
        assert!(c.retention.rules[1].keep_tags.as_ref().unwrap().matches("v1.22.3"));
        assert_eq!(c.immutable.rule_for("any/repo", "release-7"), Some("releases"));
        assert_eq!(c.immutable.rule_for("any/repo", "latest"), None);
        let c = load("", &[("BERTH_RETENTION_INTERVAL", "0s")], &Overrides::default()).unwrap();
        assert!(c.retention.interval.is_zero() && c.retention.rules.is_empty());

        let err = |toml: &str| load(toml, &[], &Overrides::default()).unwrap_err().to_string();
        assert!(
            err("[[retention.rules]]\nname = \"x\"\ntags = \"(\"\nkeep_last = 1\n")
                .contains("retention rule `x`: tags")
        );
        assert!(err("[[retention.rules]]\nname = \"x\"\n").contains("does nothing"));
        assert!(
            err("[[retention.rules]]\nname = \"x\"\nkeep_last = 0\n")
                .contains("keep_last must be at least 1")
        );
        assert!(
            err("[[retention.rules]]\nname = \"x\"\nremove_not_pushed_within = \"soon\"\n")
                .contains("remove_not_pushed_within")
        );
        assert!(
            err("[[retention.rules]]\nname = \"x\"\nkeep_last = 1\n[[retention.rules]]\nname = \"x\"\nkeep_last = 2\n")
                .contains("defined twice")
        );
        assert!(err("[[retention.rules]]\nname = \"Bad Name\"\nkeep_last = 1\n").contains("a rule's name"));
        assert!(
            err("[[immutable]]\nname = \"x\"\nrepositories = \"UPPER\"\ntags = \"a\"\n")
                .contains("immutable rule `x`")
        );
        assert!(err("[[retention.rules]]\nname = \"x\"\nkeep_last = 1\nfoo = 1\n").contains("unknown field"));
    }

    #[test]
    fn windows_the_collector_cannot_keep_are_refused() {
        for toml in [
            "[gc]\nrestore_window = \"0s\"\n",
            "[gc]\nblob_grace = \"0ms\"\n",
            "[gc]\nuntagged_grace = \"0s\"\n",
            // The default margin is 1 s of access flush + 2 s of clock skew.
            "[gc]\nblob_grace = \"3s\"\n",
            "[gc]\nblob_grace = \"2s\"\naccess_flush_interval = \"500ms\"\nclock_skew = \"1500ms\"\n",
        ] {
            let err = load(toml, &[], &Overrides::default()).expect_err(toml).to_string();
            assert!(err.contains("gc."), "{toml}: {err}");
        }
        let ok = load(
            "[gc]\nblob_grace = \"2s\"\naccess_flush_interval = \"500ms\"\nclock_skew = \"1s\"\n",
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(ok.gc.clock_skew, Duration::from_secs(1));
        let env = [("BERTH_GC_CLOCK_SKEW", "10ms")];
        let ok = load(
            "[gc]\nblob_grace = \"100ms\"\naccess_flush_interval = \"50ms\"\n",
            &env,
            &Overrides::default(),
        );
        assert_eq!(ok.unwrap().gc.clock_skew, Duration::from_millis(10));
    }
}
