//! Starting a real Berth on an ephemeral port, and domain-level helpers to drive it over HTTP.

use std::net::SocketAddr;

use berth::app::App;
use berth::config::Config;
use berth::oci::Digest;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The deployments the suite runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// SQLite metadata, filesystem blobs.
    Sqlite,
    /// The scale-out deployment: PostgreSQL metadata (a fresh database per test on the server
    /// named by `BERTH_TEST_PG_URL`) and S3 blobs (a fresh key prefix per test in the bucket named
    /// by `BERTH_TEST_S3_*`), both started by the test script.
    Postgres,
}

/// The S3 bucket for the scale-out tests, under a fresh prefix; `None` when not configured,
/// except under CI, where the test script must have started the S3 server.
pub fn s3_config() -> Option<berth::config::S3Config> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = var("BERTH_TEST_S3_ENDPOINT") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "BERTH_TEST_S3_ENDPOINT must be set under CI (scripts/test.sh sets it)"
        );
        return None;
    };
    Some(berth::config::S3Config {
        endpoint: Some(endpoint),
        region: Some("garage".into()),
        bucket: var("BERTH_TEST_S3_BUCKET").expect("BERTH_TEST_S3_BUCKET"),
        prefix: Some(format!("test-{}", uuid::Uuid::new_v4().simple())),
        access_key_id: var("BERTH_TEST_S3_KEY_ID"),
        secret_access_key: var("BERTH_TEST_S3_SECRET"),
        path_style: true,
        redirect: false,
        redirect_ttl_secs: 60,
        part_size_mib: 5,
        // Unsigned, as over https by default: parts of announced writes stream to the store.
        // (`blobs::signed_payloads_store_blobs_byte_exact_on_s3` covers signed bodies.)
        sign_payload: Some(false),
    })
}

/// The configuration of a scale-out deployment in a fresh database and prefix, or `None` when
/// PostgreSQL and S3 are not both available here.
pub async fn scale_out_config(dir: &std::path::Path) -> Option<Config> {
    let server = postgres_url()?;
    let s3 = s3_config()?;
    let mut config = Config::embedded(dir);
    config.metadata_url = fresh_postgres_database(&server).await;
    config.metadata_max_connections = 4;
    // Tests run collection passes themselves (and move the clock); a background pass would
    // race their counts.
    config.gc.enabled = false;
    config.storage_s3 = Some(s3);
    Some(config)
}

/// The `[metadata]` and `[storage]` sections of a configuration file for the scale-out
/// deployment `config` describes, for tests that run the `berth` binary on it.
pub fn scale_out_toml(config: &Config) -> String {
    let s3 = config.storage_s3.as_ref().expect("a scale-out configuration");
    format!(
        "[metadata]\nurl = {:?}\n\n[storage]\nkind = \"s3\"\n\n[storage.s3]\nendpoint = {:?}\nregion = {:?}\n\
         bucket = {:?}\nprefix = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\npart_size_mib = {}\n",
        config.metadata_url,
        s3.endpoint.as_deref().unwrap_or_default(),
        s3.region.as_deref().unwrap_or_default(),
        s3.bucket,
        s3.prefix.as_deref().unwrap_or_default(),
        s3.access_key_id.as_deref().unwrap_or_default(),
        s3.secret_access_key.as_deref().unwrap_or_default(),
        s3.part_size_mib,
    )
}

/// Starts `berth serve` on 127.0.0.1:<ephemeral> with `args` (a `--config`, a `--data-dir`…);
/// returns the process and the address it listens on, once it does.
pub fn serve_process(args: &[&std::ffi::OsStr], ready: &std::path::Path) -> (std::process::Child, String) {
    use std::time::{Duration, Instant};
    let _ = std::fs::remove_file(ready);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--listen", "127.0.0.1:0", "--ready-file"])
        .arg(ready)
        .args(args)
        .env_remove("BERTH_DATA_DIR")
        .env_remove("BERTH_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn berth");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(ready)
            && !addr.is_empty()
        {
            return (child, addr);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("berth exited: {status}");
        }
        assert!(Instant::now() < deadline, "berth did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The PostgreSQL server for the scale-out tests; `None` (the test is skipped) when not
/// configured, except under CI, where the test script must have started it.
pub fn postgres_url() -> Option<String> {
    match std::env::var("BERTH_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "BERTH_TEST_PG_URL must be set under CI (scripts/test.sh sets it)"
            );
            None
        }
    }
}

/// Creates a fresh database on the test server and returns its URL.
pub async fn fresh_postgres_database(server: &str) -> String {
    use sqlx::Connection as _;
    let name = format!("berth_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(server).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
    let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
    format!("{base}/{name}")
}

/// A Berth serving on 127.0.0.1:<ephemeral> from a temporary directory.
pub struct TestRegistry {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub app: App,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestRegistry {
    /// Starts a registry on `backend`; `None` when that deployment is not available here.
    pub async fn try_start(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = match backend {
            Backend::Sqlite => {
                let mut config = Config::embedded(dir.path());
                config.storage_fsync = false;
                config.gc.enabled = false;
                config
            }
            Backend::Postgres => scale_out_config(dir.path()).await?,
        };
        Some(Self::start_with(config, dir).await)
    }

    /// Starts a registry with `config`, its data under `dir`.
    pub async fn start_with(config: Config, dir: tempfile::TempDir) -> Self {
        show_warnings_of_failed_tests();
        let app = App::open(&config).await.expect("open app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(berth::server::serve(listener, app.clone(), async {
            let _ = rx.await;
        }));
        TestRegistry { addr, client: reqwest::Client::new(), app, dir, shutdown: Some(tx), task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.expect("request")
    }

    /// Stops the server, waits for it to finish in-flight requests, and hands back its data
    /// directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// A connection pool on the registry's own metadata database, for tests that look at or
    /// tamper with rows directly.
    pub async fn sql(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(2)
            .connect(&self.app.config.metadata_url)
            .await
            .expect("connect to the metadata database")
    }

    /// The storage key the blob row of `digest` names.
    pub async fn storage_key(&self, digest: &Digest) -> String {
        let (key,): (String,) = sqlx::query_as("SELECT storage_key FROM blobs WHERE digest = $1")
            .bind(digest.as_str())
            .fetch_one(&self.sql().await)
            .await
            .expect("a blob row");
        key
    }

    /// Writes `len` bytes to storage as upload session `session` writes them, recording nothing —
    /// what a crash between writing bytes and recording them leaves. Returns the object's key.
    pub async fn leave_unrecorded_bytes(&self, session: &str, len: usize) -> String {
        let blobs = self.app.registry.blobs();
        let key = blobs.start_upload(session).await.unwrap();
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; len]))]);
        let mut chunks = Vec::new();
        blobs
            .write_upload(&key, &mut chunks, 0, body, Some(len as u64), std::sync::Arc::new(()), false)
            .await
            .unwrap();
        chunks.pop().map_or(key, |c| c.key)
    }

    /// Whether this registry runs on PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.app.config.metadata_url.starts_with("postgres")
    }

    /// Pushes an image index of `children` (already pushed to `repo`) under `reference`;
    /// returns its digest and bytes.
    pub async fn push_index(
        &self,
        repo: &str,
        reference: &str,
        children: &[&PushedImage],
    ) -> (Digest, Vec<u8>) {
        let manifests: Vec<Value> = children
            .iter()
            .map(
                |c| json!({"mediaType": OCI_MANIFEST, "digest": c.digest.as_str(), "size": c.manifest.len()}),
            )
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        }))
        .unwrap();
        let res = self.put_manifest(repo, reference, OCI_INDEX, &index).await;
        assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
        (Digest::sha256_of(&index), index)
    }

    /// Uploads `bytes` in one `POST ?digest=` and returns their digest.
    pub async fn upload_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let res = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "upload of {digest}: {:?}", res.text().await);
        digest
    }

    /// Opens an upload session in `repo`; returns its location.
    pub async fn start_upload(&self, repo: &str) -> String {
        let res = self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        res.headers()["location"].to_str().unwrap().to_string()
    }

    /// Sends `data[start..end]` to the session at `location` as a chunk with its Content-Range.
    pub async fn patch_chunk(&self, location: &str, data: &[u8], start: usize, end: usize) -> Response {
        self.req(Method::PATCH, location)
            .header("content-range", format!("{start}-{}", end - 1))
            .header("content-type", "application/octet-stream")
            .body(data[start..end].to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Pushes a manifest by tag or digest; returns the response.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Uploads a config and `layers` random layers and pushes an image manifest under `tag`.
    pub async fn push_image(&self, repo: &str, tag: &str, seed: u64) -> PushedImage {
        let config = json!({"architecture": "amd64", "os": "linux", "seed": seed}).to_string().into_bytes();
        let layers = vec![random_bytes(seed, 3000), random_bytes(seed + 1, 5000)];
        let config_digest = self.upload_blob(repo, &config).await;
        let mut layer_descs = Vec::new();
        for layer in &layers {
            let d = self.upload_blob(repo, layer).await;
            layer_descs.push(json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": layer.len()}));
        }
        let manifest = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
            "layers": layer_descs,
        }))
        .unwrap();
        let res = self.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
        PushedImage { digest: Digest::sha256_of(&manifest), manifest, config, layers }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Clone)]
pub struct PushedImage {
    pub digest: Digest,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
}

/// Deterministic pseudo-random bytes (xorshift), so fixtures are reproducible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Asserts an OCI error answer: status, and `code` as the first error's code.
pub async fn assert_oci_error(res: Response, status: u16, code: &str) -> Value {
    let got = res.status().as_u16();
    let ct = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "status; body {body}");
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert_eq!(body["errors"][0]["code"], code, "body {body}");
    assert!(body["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()));
    body
}

pub fn header<'a>(res: &'a Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Defines a test that runs once per deployment (a module with one test per backend).
#[macro_export]
macro_rules! backend_test {
    ($name:ident, |$reg:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $reg =
                    $crate::harness::TestRegistry::try_start($crate::harness::Backend::Sqlite).await.unwrap();
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some($reg) =
                    $crate::harness::TestRegistry::try_start($crate::harness::Backend::Postgres).await
                else {
                    eprintln!("skipping: BERTH_TEST_PG_URL or BERTH_TEST_S3_ENDPOINT is not set");
                    return;
                };
                $body
            }
        }
    };
}

/// Sends the servers' warnings and errors to the test's captured output, so a failing test shows
/// why the server answered as it did (a passing test's output is discarded).
fn show_warnings_of_failed_tests() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::new("berth=warn"))
        .try_init();
}

/// Held by the suite's load tests (the stress and interleaving runs), so that no two of them run
/// at once on two cores and starve each other's progress guards.
pub static HEAVY_LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
