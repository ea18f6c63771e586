//! Backups (docs/backup.md): taken while Berth serves, restored into fresh deployments of either
//! kind, exact to the row and the byte; incremental; resumable after `kill -9`; complete while
//! the collector runs, thanks to the hold; verified; pruned.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use berth::config::Config;
use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::backend_test;
use crate::harness::*;

/// How the `berth` binary reaches a deployment: `--data-dir` (embedded) or `--config` (a file
/// with the scale-out sections).
struct Deployment {
    config: Config,
    args: Vec<std::ffi::OsString>,
    _dir: Option<tempfile::TempDir>,
}

impl Deployment {
    fn of(config: &Config, dir: &Path) -> Self {
        let args = if config.storage_s3.is_some() {
            let file = dir.join("berth.toml");
            std::fs::write(&file, scale_out_toml(config)).unwrap();
            vec!["--config".into(), file.into_os_string()]
        } else {
            vec!["--data-dir".into(), config.data_dir.clone().into_os_string()]
        };
        Deployment { config: config.clone(), args, _dir: None }
    }

    /// A fresh, empty deployment: embedded, or PostgreSQL + S3 (`None` when not available).
    async fn fresh(scale_out: bool) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let config = if scale_out {
            scale_out_config(dir.path()).await?
        } else {
            let mut c = Config::embedded(dir.path());
            c.storage_fsync = false;
            c
        };
        let mut d = Deployment::of(&config, dir.path());
        d._dir = Some(dir);
        Some(d)
    }

    /// Runs `berth ARGS` on this deployment, with S3 credentials in the environment (for S3
    /// backup locations seen from an embedded deployment).
    fn berth(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.args(args).args(&self.args).env_remove("BERTH_CONFIG").env_remove("BERTH_DATA_DIR");
        if let Some(s3) = s3_config() {
            cmd.env("AWS_ENDPOINT_URL", s3.endpoint.unwrap())
                .env("AWS_ACCESS_KEY_ID", s3.access_key_id.unwrap())
                .env("AWS_SECRET_ACCESS_KEY", s3.secret_access_key.unwrap())
                .env("AWS_REGION", "garage");
        }
        cmd.output().unwrap()
    }

    fn berth_ok(&self, args: &[&str]) -> String {
        let out = self.berth(args);
        assert!(
            out.status.success(),
            "berth {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn sql(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new().max_connections(2).connect(&self.config.metadata_url).await.unwrap()
    }
}

/// A backup location for a test: a directory, or a fresh prefix in the test bucket.
fn location(dir: &Path, on_s3: bool) -> String {
    match (on_s3, s3_config()) {
        (true, Some(s3)) => format!("s3://{}/{}-backups", s3.bucket, s3.prefix.unwrap()),
        _ => dir.join("backups").display().to_string(),
    }
}

/// Every row of every table a backup holds, sorted, as JSON text: what two deployments compare.
async fn tables(pool: &sqlx::AnyPool) -> Vec<(String, Vec<String>)> {
    use sqlx::{Column as _, Row as _};
    let mut out = Vec::new();
    for table in berth::meta::BACKED_UP {
        let rows = sqlx::query(&format!("SELECT * FROM {}", table.name)).fetch_all(pool).await.unwrap();
        let mut lines: Vec<String> = rows
            .iter()
            .map(|row| {
                let cells: Vec<Value> = (0..row.len())
                    .map(|i| {
                        let name = row.columns()[i].name().to_string();
                        let value = if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                            v.map_or(Value::Null, Value::from)
                        } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
                            v.map_or(Value::Null, Value::from)
                        } else {
                            let v: Option<Vec<u8>> = row.try_get(i).unwrap();
                            v.map_or(Value::Null, |b| Value::from(hex::encode(b)))
                        };
                        // A restore moves event numbering past a gap (docs/events.md).
                        let value = match (table.name, name.as_str(), value.as_i64()) {
                            ("event_counters" | "event_cursors", "seq", Some(v))
                                if v >= berth::meta::EVENT_GAP =>
                            {
                                Value::from(v % berth::meta::EVENT_GAP)
                            }
                            _ => value,
                        };
                        serde_json::json!([name, value])
                    })
                    .collect();
                serde_json::to_string(&cells).unwrap()
            })
            .collect();
        lines.sort();
        out.push((table.name.to_string(), lines));
    }
    out
}

/// Asserts that two deployments hold the same rows in every backed-up table.
async fn assert_same_tables(a: &sqlx::AnyPool, b: &sqlx::AnyPool, what: &str) {
    let (ta, tb) = (tables(a).await, tables(b).await);
    for ((name, ra), (_, rb)) in ta.iter().zip(&tb) {
        assert_eq!(ra.len(), rb.len(), "{what}: table {name} has {} rows, restored {}", ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!(x, y, "{what}: table {name} differs");
        }
    }
}

/// What a source holds: images pushed, an index, tag moves, a deleted manifest (tombstone),
/// a deleted tag.
async fn fill(reg: &TestRegistry, seed: u64) -> Vec<(String, PushedImage)> {
    let mut images = Vec::new();
    for (i, repo) in ["team/app", "team/app", "team/db", "other/tool"].iter().enumerate() {
        let img = reg.push_image(repo, &format!("v{i}"), seed + 10 * i as u64).await;
        images.push((repo.to_string(), img));
    }
    let children: Vec<&PushedImage> = images[..2].iter().map(|(_, i)| i).collect();
    reg.push_index("team/app", "multi", &children).await;
    // A tag moved (history), then a manifest deleted (a tombstone) and a tag deleted.
    let moved = reg.push_image("team/app", "v0", seed + 100).await;
    images.push(("team/app".into(), moved));
    let (_, gone) = &images[2];
    let res =
        reg.req(Method::DELETE, &format!("/v2/team/db/manifests/{}", gone.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res = reg.req(Method::DELETE, "/v2/other/tool/manifests/v3").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    images
}

/// Pulls every manifest and blob of `images` (but the deleted one) from a deployment served by
/// `reg`, byte-exact.
async fn assert_pulls(reg: &TestRegistry, images: &[(String, PushedImage)], deleted: &Digest) {
    for (repo, img) in images {
        if &img.digest == deleted {
            assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
            continue;
        }
        let res = reg
            .req(Method::GET, &format!("/v2/{repo}/manifests/{}", img.digest))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{repo}@{}", img.digest);
        assert_eq!(res.bytes().await.unwrap().as_ref(), img.manifest.as_slice());
        for blob in std::iter::once(&img.config).chain(&img.layers) {
            let res = reg.get(&format!("/v2/{repo}/blobs/{}", Digest::sha256_of(blob))).await;
            assert_eq!(res.status(), 200);
            assert_eq!(res.bytes().await.unwrap().as_ref(), blob.as_slice());
        }
    }
}

fn record_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Backs up `reg` to `to` with the CLI, restores into `target`, and checks the target holds
/// exactly what the source held; returns the backup's record.
async fn backup_and_restore(
    reg: &TestRegistry,
    source: &Deployment,
    target: &Deployment,
    to: &str,
    images: &[(String, PushedImage)],
    deleted: &Digest,
) -> Value {
    let record = record_of(&source.berth_ok(&["backup", "--to", to, "--json"]));
    let restored = target.berth_ok(&["backup", "restore", "--from", to]);
    assert!(restored.contains("fsck: clean"), "{restored}");
    assert_same_tables(&reg.sql().await, &target.sql().await, "restored").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = target.config.clone();
    config.data_dir = target.config.data_dir.clone();
    let served = TestRegistry::start_with(config, dir).await;
    assert_pulls(&served, images, deleted).await;
    // The restored deployment takes pushes (its identity sequences were moved on); its new
    // events number past a gap, never as events the source may have sent after the snapshot.
    let (before,): (i64,) =
        sqlx::query_as("SELECT MAX(id) FROM events").fetch_one(&target.sql().await).await.unwrap();
    served.push_image("team/app", "after-restore", 9_999).await;
    let (id, seq): (i64, i64) =
        sqlx::query_as("SELECT id, seq FROM events WHERE id = (SELECT MAX(id) FROM events)")
            .fetch_one(&target.sql().await)
            .await
            .unwrap();
    assert!(id > before + berth::meta::EVENT_GAP && seq > berth::meta::EVENT_GAP, "event {id} seq {seq}");
    served.stop().await;
    record
}

backend_test!(a_backup_restores_exactly_into_a_fresh_deployment_and_the_next_copies_only_new_keys, |reg| {
    let images = fill(&reg, 7_000).await;
    let deleted = images[2].1.digest.clone();
    let source = Deployment::of(&reg.app.config, reg.dir.path());
    let work = tempfile::tempdir().unwrap();
    let to = location(work.path(), reg.on_postgres());
    let target = Deployment::fresh(reg.on_postgres()).await.unwrap();
    let first = backup_and_restore(&reg, &source, &target, &to, &images, &deleted).await;
    let keys = first["keys"]["rows"].as_u64().unwrap();
    assert_eq!(first["copied"]["keys"].as_u64().unwrap(), keys, "{first}");
    assert_eq!(first["present"]["keys"], 0);
    assert_eq!(first["tables"].as_array().unwrap().len(), berth::meta::BACKED_UP.len());

    // Into a deployment that is not empty: refused, and nothing changed there.
    let out = target.berth(&["backup", "restore", "--from", &to]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unchanged: nothing to copy. After one more image: its three blobs only.
    let again = record_of(&source.berth_ok(&["backup", "--to", &to, "--json"]));
    assert_eq!(
        (again["copied"]["keys"].as_u64(), again["present"]["keys"].as_u64()),
        (Some(0), Some(keys)),
        "{again}"
    );
    reg.push_image("team/new", "v1", 7_500).await;
    let third = record_of(&source.berth_ok(&["backup", "--to", &to, "--json"]));
    assert_eq!(
        (third["copied"]["keys"].as_u64(), third["present"]["keys"].as_u64()),
        (Some(3), Some(keys)),
        "{third}"
    );

    // Listed, verified, pruned to one: the objects the kept backup names stay, and it verifies.
    let listed = source.berth_ok(&["backup", "list", "--from", &to]);
    assert_eq!(listed.matches(" complete ").count(), 3, "{listed}");
    let verified = source.berth_ok(&["backup", "verify", "--from", &to, "--rehash"]);
    assert!(verified.contains("whole"), "{verified}");
    let pruned: Value =
        serde_json::from_str(&source.berth_ok(&["backup", "prune", "--from", &to, "--keep", "1", "--json"]))
            .unwrap();
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 2, "{pruned}");
    assert_eq!(pruned["objects"], 0, "every object is named by the newest backup: {pruned}");
    assert!(source.berth_ok(&["backup", "verify", "--from", &to, "--rehash"]).contains("whole"));

    // The metrics and the console show the newest backup.
    let metrics = reg.get("/metrics").await.text().await.unwrap();
    let line = metrics.lines().find(|l| l.starts_with("berth_backup_last_keys_copied ")).unwrap();
    assert_eq!(line, "berth_backup_last_keys_copied 3", "{metrics}");
    let html = reg.get("/ui/space").await.text().await.unwrap();
    assert!(html.contains("id=\"backups\"") && html.contains(third["id"].as_str().unwrap()), "{html}");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_moves_a_registry_between_deployments_and_back() {
    let Some(scale_out) = Deployment::fresh(true).await else {
        eprintln!("skipping: BERTH_TEST_PG_URL or BERTH_TEST_S3_ENDPOINT is not set");
        return;
    };
    // Embedded → PostgreSQL + S3, through a directory.
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let images = fill(&reg, 8_000).await;
    let deleted = images[2].1.digest.clone();
    let source = Deployment::of(&reg.app.config, reg.dir.path());
    let work = tempfile::tempdir().unwrap();
    let to = location(work.path(), false);
    backup_and_restore(&reg, &source, &scale_out, &to, &images, &deleted).await;

    // PostgreSQL + S3 → embedded, through the bucket.
    let dir = tempfile::tempdir().unwrap();
    let served = TestRegistry::start_with(scale_out.config.clone(), dir).await;
    let back_to = location(work.path(), true);
    let embedded = Deployment::fresh(false).await.unwrap();
    let record = record_of(&scale_out.berth_ok(&["backup", "--to", &back_to, "--json"]));
    assert_eq!(record["source"]["metadata"], "postgres");
    let restored = embedded.berth_ok(&["backup", "restore", "--from", &back_to]);
    assert!(restored.contains("fsck: clean"), "{restored}");
    assert_same_tables(&served.sql().await, &embedded.sql().await, "moved back").await;
    let dir = tempfile::tempdir().unwrap();
    let home = TestRegistry::start_with(embedded.config.clone(), dir).await;
    assert_pulls(&home, &images, &deleted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_removed_and_a_corrupted_key() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = reg.push_image("verify/app", "v1", 7_700).await;
    let source = Deployment::of(&reg.app.config, reg.dir.path());
    let work = tempfile::tempdir().unwrap();
    let to = location(work.path(), false);
    source.berth_ok(&["backup", "--to", &to]);
    let object = |blob: &[u8]| -> PathBuf {
        let digest = Digest::sha256_of(blob);
        let hex = digest.hex();
        let dir = PathBuf::from(&to).join(format!("objects/blobs/sha256/{}/{hex}", &hex[..2]));
        std::fs::read_dir(dir).unwrap().next().unwrap().unwrap().path()
    };
    // Same size, other bytes: only --rehash sees it.
    let corrupt = object(&img.layers[0]);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    assert!(source.berth_ok(&["backup", "verify", "--from", &to]).contains("whole"));
    let out = source.berth(&["backup", "verify", "--from", &to, "--rehash"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("not {}", Digest::sha256_of(&img.layers[0]))), "{text}");
    // Removed: plain verify sees it.
    std::fs::remove_file(object(&img.layers[1])).unwrap();
    let out = source.berth(&["backup", "verify", "--from", &to]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("({}) is missing", Digest::sha256_of(&img.layers[1]))), "{text}");
    // A restore from it stops before loading anything.
    let target = Deployment::fresh(false).await.unwrap();
    let out = target.berth(&["backup", "restore", "--from", &to]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing from the backup"));
    // A damaged table file is found too.
    let table =
        std::fs::read_dir(PathBuf::from(&to).join("backups")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(table.join("tables/tags.jsonl.gz"), b"not gzip").unwrap();
    let text =
        String::from_utf8_lossy(&source.berth(&["backup", "verify", "--from", &to]).stdout).into_owned();
    assert!(text.contains("tables/tags.jsonl.gz"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_mid_copy_resumes_without_copying_again() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    for i in 0..12 {
        reg.push_image("resume/app", &format!("v{i}"), 7_800 + 10 * i).await;
    }
    let source = Deployment::of(&reg.app.config, reg.dir.path());
    let work = tempfile::tempdir().unwrap();
    let to = location(work.path(), false);
    let objects = PathBuf::from(&to).join("objects");
    let count = |dir: &Path| walk(dir).len();
    // Slowly, one key at a time: killed once a few keys are in.
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["backup", "--to", &to, "--jobs", "1", "--max-rate", "20KB", "--hold-lease", "2s"])
        .args(&source.args)
        .env_remove("BERTH_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count(&objects) < 5 {
        assert!(std::time::Instant::now() < deadline, "the backup copied nothing");
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before it was killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = count(&objects);
    let listed = source.berth_ok(&["backup", "list", "--from", &to]);
    assert!(listed.contains("INCOMPLETE"), "{listed}");
    let out = source.berth(&["backup", "verify", "--from", &to]);
    assert!(!out.status.success(), "an incomplete backup is no backup");
    // It may be running, as far as prune can tell: prune refuses rather than remove its keys.
    let out = source.berth(&["backup", "prune", "--from", &to, "--keep", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may be running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Its hold outlives it by its lease: a resume meanwhile is refused (it may still run).
    let out = source.berth(&["backup", "--to", &to, "--resume"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("running in another process"));
    // Lapsed: its lease (2 s) and the margin (gc.access_flush_interval + gc.clock_skew, 3 s).
    std::thread::sleep(std::time::Duration::from_secs(6));
    let record = record_of(&source.berth_ok(&["backup", "--to", &to, "--resume", "--json"]));
    let total = record["keys"]["rows"].as_u64().unwrap();
    assert_eq!(total, 36);
    assert_eq!(record["present"]["keys"].as_u64().unwrap(), before as u64, "{record}");
    assert_eq!(record["copied"]["keys"].as_u64().unwrap(), total - before as u64, "{record}");
    assert_eq!(count(&objects), 36);
    let listed = source.berth_ok(&["backup", "list", "--from", &to]);
    assert_eq!((listed.matches(" complete ").count(), listed.contains("INCOMPLETE")), (1, false), "{listed}");
    assert!(source.berth_ok(&["backup", "verify", "--from", &to, "--rehash"]).contains("whole"));
    // The process that died left its hold, which lapses; its run stays recorded as running.
    let target = Deployment::fresh(false).await.unwrap();
    assert!(target.berth_ok(&["backup", "restore", "--from", &to]).contains("fsck: clean"));
}

/// Every file under `dir` (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if !path.to_string_lossy().contains('#') {
            out.push(path);
        }
    }
    out
}

/// A registry whose collector windows are a second long: what it deletes goes within seconds.
async fn quick_collector(scale_out: bool) -> Option<TestRegistry> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = if scale_out {
        scale_out_config(dir.path()).await?
    } else {
        let mut c = Config::embedded(dir.path());
        c.storage_fsync = false;
        c
    };
    config.gc.enabled = false;
    config.gc.restore_window = std::time::Duration::from_millis(500);
    config.gc.blob_grace = std::time::Duration::from_millis(500);
    config.gc.untagged_grace = std::time::Duration::from_millis(500);
    config.gc.access_flush_interval = std::time::Duration::from_millis(100);
    config.gc.clock_skew = std::time::Duration::ZERO;
    Some(TestRegistry::start_with(config, dir).await)
}

async fn key_exists(reg: &TestRegistry, key: &str) -> bool {
    !matches!(reg.app.registry.blobs().size(key).await, Err(berth::blob::Error::NotFound(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_deletes_nothing_a_running_backup_names_until_it_ends_sqlite() {
    collector_during_backup(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_deletes_nothing_a_running_backup_names_until_it_ends_postgres() {
    collector_during_backup(true).await;
}

async fn collector_during_backup(scale_out: bool) {
    let Some(reg) = quick_collector(scale_out).await else {
        eprintln!("skipping: BERTH_TEST_PG_URL or BERTH_TEST_S3_ENDPOINT is not set");
        return;
    };
    let mut doomed = Vec::new();
    for i in 0..6 {
        let img = reg.push_image("hold/app", &format!("v{i}"), 7_900 + 10 * i).await;
        doomed.push(img);
    }
    let mut keys = Vec::new();
    for img in &doomed {
        for blob in std::iter::once(&img.config).chain(&img.layers) {
            keys.push(reg.storage_key(&Digest::sha256_of(blob)).await);
        }
    }
    // A key queued before the backup starts is not named by its snapshot: it may go meanwhile.
    let early = reg.push_image("hold/early", "v1", 7_990).await;
    let mut early_keys = Vec::new();
    for blob in std::iter::once(&early.config).chain(&early.layers) {
        early_keys.push(reg.storage_key(&Digest::sha256_of(blob)).await);
    }
    let early_key = early_keys[0].clone();
    let res = reg.req(Method::DELETE, "/v2/hold/early/manifests/v1").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res =
        reg.req(Method::DELETE, &format!("/v2/hold/early/manifests/{}", early.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // Reviews only, the outbox not drained: the early image's rows go and its keys wait there.
    let sql = reg.sql().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        while reg.app.registry.meta().review_one(reg.app.registry.clock().now_ms()).await.unwrap().is_some() {
        }
        let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE storage_key IN ($1, $2, $3)")
            .bind(&early_keys[0])
            .bind(&early_keys[1])
            .bind(&early_keys[2])
            .fetch_one(&sql)
            .await
            .unwrap();
        if rows == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the early image was never collected");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(key_exists(&reg, &early_key).await);

    let work = tempfile::tempdir().unwrap();
    let location = berth::backup::Location::open(
        &location(work.path(), reg.on_postgres()),
        reg.app.config.storage_s3.as_ref(),
    )
    .unwrap();
    let options = berth::registry::BackupOptions {
        jobs: 1,
        max_rate: Some(10_000),
        lease: std::time::Duration::from_secs(4),
        ..Default::default()
    };
    let backup = {
        let registry = reg.app.registry.clone();
        let location = location.clone();
        tokio::spawn(async move { registry.backup(&location, &options, &|_| {}).await })
    };
    // Once the snapshot is taken, every image goes: deleted, collected within seconds.
    loop {
        let taken: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT snapshot_at FROM backup_runs").fetch_optional(&sql).await.unwrap();
        if taken.is_some_and(|(t,)| t.is_some()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A purge meanwhile takes the blob's rows at once; its bytes wait for the backup too.
    let purged = Digest::sha256_of(&doomed[0].layers[0]);
    let report = reg.app.registry.purge_blob(&purged, "test", None).await.unwrap();
    assert!(report.held_by_backup && !report.bytes_deleted, "{report:?}");
    for img in &doomed[1..] {
        let res =
            reg.req(Method::DELETE, &format!("/v2/hold/app/manifests/{}", img.digest)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    let mut collected = 0;
    let mut checks = 0;
    while !backup.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let report = reg.app.registry.collect(10_000).await.unwrap();
        collected += report.blobs;
        // The hold still there after the pass was there all through it: nothing it keeps went.
        let (holds,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM backup_holds").fetch_one(&sql).await.unwrap();
        if holds == 0 {
            break;
        }
        for key in &keys {
            assert!(key_exists(&reg, key).await, "{key} went while the backup that names it ran");
        }
        checks += 1;
    }
    assert!(checks >= 3, "the backup ended too soon to show anything");
    assert_eq!(collected, 17, "the collector removed the rows meanwhile (the bytes wait)");
    assert!(!key_exists(&reg, &early_key).await, "a key queued before the backup's hold went meanwhile");
    let record = backup.await.unwrap().expect("the backup completes");
    assert_eq!(record.keys.file.rows, 18);
    // Ended: what waited goes.
    reg.app.registry.collect(10_000).await.unwrap();
    for key in &keys {
        assert!(!key_exists(&reg, key).await, "{key} stayed after the backup ended");
    }
    let report = berth::backup::catalog::verify(&location, None, true, 4, &|_, _| {}).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_pushes_deletes_and_collection_restores_everything_acknowledged_sqlite() {
    backup_under_stress(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_pushes_deletes_and_collection_restores_everything_acknowledged_postgres() {
    backup_under_stress(true).await;
}

/// Pushers, a deleter and the collector (second-long windows) run while the CLI takes a backup;
/// the backup restores into a fresh deployment of the same kind where fsck is clean and every
/// image acknowledged before the snapshot pulls byte-exact.
async fn backup_under_stress(scale_out: bool) {
    let _heavy = HEAVY_LOAD.lock().await;
    let Some(reg) = quick_collector(scale_out).await else {
        eprintln!("skipping: BERTH_TEST_PG_URL or BERTH_TEST_S3_ENDPOINT is not set");
        return;
    };
    let reg = std::sync::Arc::new(reg);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let now = |reg: &TestRegistry| reg.app.registry.clock().now_ms();
    let pusher = {
        let (reg, stop) = (reg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut seed = 20_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let repo = format!("stress/keep{}", seed % 3);
                let img = reg.push_image(&repo, &format!("t{seed}"), seed).await;
                acked.push((now(&reg), repo, img));
                seed += 10;
            }
            acked
        })
    };
    let churner = {
        let (reg, stop) = (reg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seed = 40_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let img = reg.push_image("stress/churn", "latest", seed).await;
                let res = reg
                    .req(Method::DELETE, &format!("/v2/stress/churn/manifests/{}", img.digest))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
                seed += 10;
            }
        })
    };
    let collector = {
        let (reg, stop) = (reg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut blobs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                blobs += reg.app.registry.collect(10_000).await.unwrap().blobs;
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            }
            blobs
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let source = Deployment::of(&reg.app.config, reg.dir.path());
    let work = tempfile::tempdir().unwrap();
    let to = location(work.path(), scale_out);
    let record = {
        let (source_args, to) = (source.args.clone(), to.clone());
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_berth"))
                .args(["backup", "--to", &to, "--jobs", "2", "--json"])
                .args(&source_args)
                .env_remove("BERTH_CONFIG")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        record_of(&String::from_utf8_lossy(&out.stdout))
    };
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = pusher.await.unwrap();
    churner.await.unwrap();
    let collected = collector.await.unwrap();
    assert!(collected > 0, "the collector took nothing during the run");
    let snapshot_at = record["snapshot_at"].as_i64().unwrap();
    let before: Vec<_> = acked.iter().filter(|(at, _, _)| *at < snapshot_at).collect();
    assert!(
        before.len() >= 3 && before.len() < acked.len(),
        "{} of {} pushes before the snapshot",
        before.len(),
        acked.len()
    );

    let target = Deployment::fresh(scale_out).await.unwrap();
    let restored = target.berth_ok(&["backup", "restore", "--from", &to]);
    assert!(restored.contains("fsck: clean"), "{restored}");
    let dir = tempfile::tempdir().unwrap();
    let served = TestRegistry::start_with(target.config.clone(), dir).await;
    let images: Vec<(String, PushedImage)> =
        before.iter().map(|(_, repo, img)| (repo.clone(), img.clone())).collect();
    assert_pulls(&served, &images, &Digest::sha256_of(b"none")).await;
    for (_, repo, img) in &before {
        let tag = format!("t{}", serde_json::from_slice::<Value>(&img.config).unwrap()["seed"]);
        let res = served
            .req(Method::HEAD, &format!("/v2/{repo}/manifests/{tag}"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{repo}:{tag}");
    }
}

backend_test!(every_table_is_backed_up_or_left_out_on_purpose, |reg| {
    let tables = reg.app.registry.meta().schema_tables().await.unwrap();
    for table in &tables {
        let backed_up = berth::meta::BACKED_UP.iter().any(|t| t.name == table);
        let left_out = berth::meta::NOT_BACKED_UP.iter().any(|(t, _)| t == table);
        assert!(backed_up != left_out, "table `{table}`: in neither list, or in both (meta/backup.rs)");
    }
    for t in berth::meta::BACKED_UP {
        assert!(tables.iter().any(|n| n == t.name), "`{}` is not in the schema", t.name);
    }
});
