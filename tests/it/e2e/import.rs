//! `berth import` from a store the real reference registry (Debian's `docker-registry`,
//! distribution 2.8) wrote, pushed to with skopeo: single images, a multi-arch index, a moved
//! tag, a deleted manifest, layers shared between repositories. Pre-import while it serves, a
//! catch-up after more pushes (read-only by then) that finds exactly the changes, cut-over; then
//! every tag pulls byte-exact through Berth, `berth fsck` is clean, the old registry's
//! `garbage-collect` refuses the marked store, and the collector deletes exactly the adopted
//! bytes it no longer needs.
//!
//! The scale-out deployment reads the same store from the S3 bucket: distribution 2.8's S3
//! driver cannot complete uploads against Garage (`CompleteMultipartUpload`: "No data was
//! uploaded"), so the test copies the registry's files into the bucket key for key — the S3
//! driver's layout is the filesystem driver's paths under `rootdirectory`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth::distribution::Source;
use berth::oci::Digest;
use berth::registry::ImportOptions;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::{DockerRegistry, have, layout, run, skopeo_copy};
use crate::backend_test;
use crate::harness::{OCI_INDEX, OCI_MANIFEST, TestRegistry};

const DAY: i64 = 24 * 3600 * 1000;

/// The reference registry on a filesystem root, read-only (maintenance mode) when asked.
fn reference(root: &Path, read_only: bool) -> DockerRegistry {
    DockerRegistry::start(root, &format!("  maintenance:\n    readonly:\n      enabled: {read_only}\n"), "")
}

async fn raw_manifest(reference: &str) -> String {
    run("skopeo", &["inspect", "--raw", "--tls-verify=false", reference], &[]).await
}

/// Every file under `dir` with its modification time, by path relative to `dir`.
fn files(dir: &Path) -> BTreeMap<String, std::time::SystemTime> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, meta.modified().unwrap());
            }
        }
    }
    out
}

/// Where the reference registry's store is for Berth: the directory itself, or a copy of it in
/// Berth's bucket kept up to date key for key.
struct Store {
    root: PathBuf,
    s3: Option<(std::sync::Arc<dyn ObjectStore>, String, String)>,
    mirrored: BTreeMap<String, std::time::SystemTime>,
}

impl Store {
    fn new(reg: &TestRegistry, root: PathBuf) -> Store {
        let s3 = reg.app.config.storage_s3.as_ref().map(|c| {
            let client: std::sync::Arc<dyn ObjectStore> = std::sync::Arc::new(c.client(&c.bucket).unwrap());
            let root_key = format!("{}/dist", c.prefix.as_deref().unwrap_or_default());
            (client, c.bucket.clone(), root_key)
        });
        Store { root, s3, mirrored: BTreeMap::new() }
    }

    /// The `--from` naming the store.
    fn from(&self) -> String {
        match &self.s3 {
            Some((_, bucket, root_key)) => format!("s3://{bucket}/{root_key}"),
            None => self.root.display().to_string(),
        }
    }

    /// Brings the bucket's copy up to date: new and rewritten files put, removed ones deleted.
    async fn sync(&mut self) {
        let Some((client, _, root_key)) = &self.s3 else { return };
        let now = files(&self.root);
        for (rel, modified) in &now {
            if self.mirrored.get(rel) != Some(modified) {
                let bytes = std::fs::read(self.root.join(rel)).unwrap();
                client.put(&format!("{root_key}/{rel}").into(), PutPayload::from(bytes)).await.unwrap();
            }
        }
        for rel in self.mirrored.keys().filter(|r| !now.contains_key(*r)) {
            client.delete(&format!("{root_key}/{rel}").into()).await.unwrap();
        }
        self.mirrored = now;
    }

    /// Every key (or file) of the store.
    async fn listing(&self) -> Vec<String> {
        match &self.s3 {
            Some((client, _, root_key)) => {
                use futures_util::TryStreamExt as _;
                let mut keys: Vec<String> = client
                    .list(Some(&root_key.as_str().into()))
                    .map_ok(|m| m.location.to_string())
                    .try_collect()
                    .await
                    .unwrap();
                keys.sort();
                keys
            }
            None => files(&self.root).into_keys().collect(),
        }
    }

    /// A configuration for the reference registry on the store: `fs_config` itself, or one for
    /// the bucket copy.
    fn gc_config(&self, fs_config: &Path) -> PathBuf {
        let Some((_, bucket, root_key)) = &self.s3 else { return fs_config.to_path_buf() };
        let var = |k: &str| std::env::var(k).unwrap();
        let file = fs_config.with_extension("s3.yml");
        std::fs::write(
            &file,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  s3:\n    region: garage\n    regionendpoint: {}\n    \
                 bucket: {bucket}\n    accesskey: {}\n    secretkey: {}\n    rootdirectory: /{root_key}\n    \
                 secure: false\n  delete:\n    enabled: true\n",
                var("BERTH_TEST_S3_ENDPOINT"),
                var("BERTH_TEST_S3_KEY_ID"),
                var("BERTH_TEST_S3_SECRET"),
            ),
        )
        .unwrap();
        file
    }

    /// Deletes the marker `berth import --final` placed.
    async fn remove_marker(&self) {
        let rel = format!("docker/registry/v2/{}", berth::distribution::OWNED_MARKER);
        match &self.s3 {
            Some((client, _, root_key)) => client.delete(&format!("{root_key}/{rel}").into()).await.unwrap(),
            None => std::fs::remove_file(self.root.join(rel)).unwrap(),
        }
    }

    /// Whether the source still has blob `digest`'s bytes.
    async fn has_blob(&self, digest: &Digest) -> bool {
        let rel = format!("docker/registry/v2/blobs/sha256/{}/{}/data", &digest.hex()[..2], digest.hex());
        match &self.s3 {
            Some((client, _, root_key)) => client.head(&format!("{root_key}/{rel}").into()).await.is_ok(),
            None => self.root.join(rel).exists(),
        }
    }
}

/// `berth import` as a command on `reg`'s deployment; its JSON report.
fn import_cli(
    reg: &TestRegistry,
    work: &Path,
    args: &[&str],
) -> (std::process::Output, Option<serde_json::Value>) {
    let out = berth_command(reg, work, "import").args(args).arg("--json").output().unwrap();
    let report = serde_json::from_slice(&out.stdout).ok();
    (out, report)
}

/// The `berth` binary with `reg`'s deployment: its data directory, or a configuration file for
/// the scale-out deployment.
fn berth_command(reg: &TestRegistry, work: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.arg(subcommand).env_remove("BERTH_CONFIG").env_remove("BERTH_DATA_DIR");
    if reg.app.config.storage_s3.is_some() {
        let file = work.join("berth.toml");
        std::fs::write(&file, crate::harness::scale_out_toml(&reg.app.config)).unwrap();
        cmd.arg("--config").arg(file);
    } else {
        cmd.arg("--data-dir").arg(&reg.app.config.data_dir);
    }
    cmd
}

/// A work directory with the reference registry's root and the OCI layout pushed from.
fn work_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("registry");
    std::fs::create_dir_all(&root).unwrap();
    let lay = work.path().join("lay");
    (work, root, lay)
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

backend_test!(import_from_the_reference_registry_pre_import_catch_up_cut_over, |reg| {
    if !have("skopeo") || !have("docker-registry") {
        return;
    }
    let (work, root, lay) = work_dirs();
    let one = layout::image(&lay, 31, "amd64");
    let two = layout::image(&lay, 32, "amd64");
    let arm = layout::image(&lay, 33, "arm64");
    let amd = layout::image(&lay, 34, "amd64");
    let multi = layout::index(&lay, &[(&amd, "amd64"), (&arm, "arm64")]);
    let doomed = layout::image(&lay, 35, "amd64");
    let later = layout::image(&lay, 36, "amd64");
    layout::finish(
        &lay,
        &[
            ("one", &one, OCI_MANIFEST),
            ("two", &two, OCI_MANIFEST),
            ("multi", &multi, OCI_INDEX),
            ("doomed", &doomed, OCI_MANIFEST),
            ("later", &later, OCI_MANIFEST),
        ],
    );
    let src = |tag: &str| format!("oci:{}:{tag}", lay.display());

    // The old registry in use: pushes, a tag moved, a manifest deleted, layers shared.
    let old = reference(&root, false);
    let at = |path: &str| format!("docker://{}/{path}", old.addr);
    skopeo_copy(&src("one"), &at("app/single:v1")).await;
    skopeo_copy(&src("one"), &at("app/single:latest")).await;
    skopeo_copy(&src("two"), &at("app/single:latest")).await;
    skopeo_copy(&src("multi"), &at("app/multi:1.0")).await;
    skopeo_copy(&src("multi"), &at("app/multi:latest")).await;
    skopeo_copy(&src("one"), &at("other/repo:v1")).await;
    skopeo_copy(&src("doomed"), &at("app/doomed:x")).await;
    run("skopeo", &["delete", "--tls-verify=false", &at(&format!("app/doomed@{}", doomed.digest))], &[])
        .await;

    let mut store = Store::new(&reg, root.clone());
    store.sync().await;
    let source = Source::open(&store.from(), reg.app.config.storage_s3.as_ref()).await.unwrap();

    // Pre-import, first dry: it says exactly what the real run then does.
    let dry = reg
        .app
        .registry
        .import(&source, ImportOptions { dry_run: true, ..Default::default() }, &|_| {})
        .await
        .unwrap();
    let real = reg.app.registry.import(&source, ImportOptions::default(), &|_| {}).await.unwrap();
    let expected_tags =
        ["app/multi:1.0", "app/multi:latest", "app/single:latest", "app/single:v1", "other/repo:v1"];
    for report in [&dry, &real] {
        assert_eq!(report.tags_new, expected_tags, "{report:?}");
        assert!(report.skipped.is_empty() && report.tags_moved.is_empty(), "{report:?}");
        // one, two, amd, arm and the index (stored once for its two tags, and counted once by
        // the dry run too); config + 2 layers each for four images.
        assert_eq!((report.manifests_imported, report.blobs_adopted), (6, 12), "{report:?}");
    }
    assert_eq!(dry.bytes_adopted, real.bytes_adopted);
    assert!(!real.cut_over);

    // Serving is refused until the import cuts over.
    let out = berth_command(&reg, work.path(), "serve").args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has not cut over"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // More happens in the old registry before it goes read-only: a new tag, a tag moved, a
    // manifest deleted (with its tag).
    skopeo_copy(&src("later"), &at("app/single:v2")).await;
    skopeo_copy(&src("two"), &at("app/single:v1")).await;
    run("skopeo", &["delete", "--tls-verify=false", &at(&format!("other/repo@{}", one.digest))], &[]).await;
    old.stop();
    let old = reference(&root, true);
    let at = |path: &str| format!("docker://{}/{path}", old.addr);
    store.sync().await;

    // The catch-up and cut-over picks up exactly those changes.
    let (out, report) = import_cli(&reg, work.path(), &["--from", &store.from(), "--final"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = report.unwrap();
    assert_eq!(names(&report["tags_new"]), ["app/single:v2"], "{report}");
    assert_eq!(names(&report["tags_moved"]), ["app/single:v1"], "{report}");
    assert_eq!(names(&report["tags_removed"]), ["other/repo:v1"], "{report}");
    assert_eq!(report["skipped"], serde_json::json!([]));
    assert_eq!((report["manifests_imported"].as_u64(), report["blobs_adopted"].as_u64()), (Some(1), Some(3)));
    assert_eq!(report["cut_over"], true);

    // Every tag the old registry has pulls byte-exact from Berth, with all it references.
    let berth = |path: &str| format!("docker://{}/{path}", reg.addr);
    for tag in ["app/single:v1", "app/single:latest", "app/single:v2", "app/multi:1.0"] {
        assert_eq!(raw_manifest(&berth(tag)).await, raw_manifest(&at(tag)).await, "{tag}");
        let pulled = work.path().join(format!("pulled-{}", tag.replace([':', '/'], "-")));
        skopeo_copy(&berth(tag), &format!("oci:{}:x", pulled.display())).await;
        let blobs = files(&pulled.join("blobs/sha256"));
        for name in blobs.keys() {
            let bytes = std::fs::read(pulled.join("blobs/sha256").join(name)).unwrap();
            assert_eq!(Digest::sha256_of(&bytes).hex(), name, "{tag}: a blob pulled intact");
        }
    }
    let res = reg.get("/v2/other/repo/tags/list").await;
    let tags: serde_json::Value = res.json().await.unwrap_or_default();
    assert!(tags["tags"].as_array().is_none_or(|t| t.is_empty()), "{tags}");
    let fsck = berth_command(&reg, work.path(), "fsck").output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    old.stop();

    // The old registry's collector refuses the store now (run on the bucket with its S3
    // driver, which only lists, reads and deletes here), and deletes nothing.
    let before = store.listing().await;
    let gc = Command::new("docker-registry")
        .arg("garbage-collect")
        .arg(store.gc_config(&root.with_extension("yml")))
        // The S3 driver refuses a custom CA bundle with its own transport; none is needed here.
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap();
    assert!(!gc.status.success(), "garbage-collect ran: {}", String::from_utf8_lossy(&gc.stdout));
    assert!(
        String::from_utf8_lossy(&gc.stderr).contains("BERTH-OWNS-THIS-STORAGE"),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(store.listing().await, before, "garbage-collect deleted something");

    // Serving is allowed now.
    let ready = work.path().join("ready");
    let mut serve = berth_command(&reg, work.path(), "serve")
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&ready).map_or(true, |s| s.is_empty()) {
        assert!(serve.try_wait().unwrap().is_none(), "berth serve exited after the cut-over");
        assert!(std::time::Instant::now() < deadline, "berth serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = serve.kill();
    let _ = serve.wait();

    // Without the marker, serving is refused again; the final run puts it back.
    store.remove_marker().await;
    let out = berth_command(&reg, work.path(), "serve").args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("marker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, _) = import_cli(&reg, work.path(), &["--from", &store.from(), "--final"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let source = Source::open(&store.from(), reg.app.config.storage_s3.as_ref()).await.unwrap();
    assert!(source.is_marked().await.unwrap());

    // The collector deletes exactly the adopted bytes it no longer needs — `later`'s, once its
    // only tag is deleted, and `one`'s, untagged since the catch-up — when the windows have
    // passed: on S3 the adopted objects themselves and nothing else; on the filesystem Berth's
    // hard links, while the old root keeps its own files.
    let before = store.listing().await;
    // (Pull times are recorded in batches, with the clock of the flush: flush before moving it.)
    reg.app.registry.flush_access().await.unwrap();
    let repo = berth::oci::RepoName::parse("app/single").unwrap();
    let v2 = berth::oci::Tag::parse("v2").unwrap();
    reg.app.registry.delete_tag(&repo, &v2, berth::meta::TagCondition::Always, None).await.unwrap();
    let garbage: Vec<Digest> = later.blobs.iter().chain(&one.blobs).cloned().collect();
    let mut berth_keys = Vec::new();
    for d in &garbage {
        berth_keys.push(reg.storage_key(d).await);
    }
    reg.app.registry.clock().advance_ms(8 * DAY);
    reg.app.registry.collect(100_000).await.unwrap();
    reg.app.registry.clock().advance_ms(2 * DAY);
    reg.app.registry.collect(100_000).await.unwrap();
    let on_s3 = reg.app.config.storage_s3.is_some();
    for d in &garbage {
        assert_eq!(reg.get(&format!("/v2/app/single/blobs/{d}")).await.status(), 404);
        assert_eq!(store.has_blob(d).await, !on_s3, "{d}");
    }
    let after = store.listing().await;
    let removed: Vec<&String> = before.iter().filter(|k| !after.contains(k)).collect();
    if on_s3 {
        let mut expected: Vec<String> = berth_keys
            .iter()
            .map(|k| {
                format!("{}/{k}", reg.app.config.storage_s3.as_ref().unwrap().prefix.as_deref().unwrap())
            })
            .collect();
        expected.sort();
        assert_eq!(removed, expected.iter().collect::<Vec<_>>());
    } else {
        assert!(removed.is_empty(), "{removed:?}");
        for key in &berth_keys {
            assert!(!reg.app.config.storage_path.join(key).exists(), "{key}");
        }
    }
    for tag in ["app/single:v1", "app/multi:1.0"] {
        let pulled = work.path().join(format!("kept-{}", tag.replace([':', '/'], "-")));
        skopeo_copy(&berth(tag), &format!("oci:{}:x", pulled.display())).await;
    }
    let fsck = berth_command(&reg, work.path(), "fsck").output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
});

/// PUTs `bytes` (an OCI manifest) to `repo:reference` of the reference registry.
async fn put_manifest(addr: &str, repo: &str, reference: &str, bytes: &[u8]) {
    let res = reqwest::Client::new()
        .put(format!("http://{addr}/v2/{repo}/manifests/{reference}"))
        .header("content-type", OCI_MANIFEST)
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
}

/// The digest `reference` of `repo` resolves to on a registry at `addr`, if any.
async fn resolve(addr: &str, repo: &str, reference: &str) -> Option<String> {
    let res = reqwest::Client::new()
        .head(format!("http://{addr}/v2/{repo}/manifests/{reference}"))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap();
    (res.status() == 200).then(|| res.headers()["docker-content-digest"].to_str().unwrap().to_string())
}

backend_test!(an_interrupted_import_continues_and_bad_items_are_skipped, |reg| {
    if !have("skopeo") || !have("docker-registry") {
        return;
    }
    let (work, root, lay) = work_dirs();
    let images: Vec<_> = (0..6).map(|i| layout::image(&lay, 50 + i, "amd64")).collect();
    let missing = layout::image(&lay, 60, "amd64");
    let corrupt = layout::image(&lay, 61, "amd64");
    let untagged = layout::image(&lay, 62, "amd64");
    let mut tags: Vec<(String, &layout::Written, &str)> =
        images.iter().enumerate().map(|(i, w)| (format!("i{i}"), w, OCI_MANIFEST)).collect();
    tags.push(("missing".into(), &missing, OCI_MANIFEST));
    tags.push(("corrupt".into(), &corrupt, OCI_MANIFEST));
    tags.push(("untagged".into(), &untagged, OCI_MANIFEST));
    let refs: Vec<(&str, &layout::Written, &str)> =
        tags.iter().map(|(t, w, m)| (t.as_str(), *w, *m)).collect();
    layout::finish(&lay, &refs);
    let src = |tag: &str| format!("oci:{}:{tag}", lay.display());

    // Six repositories of ten tags each, two broken images, one manifest pushed by digest only.
    let old = reference(&root, false);
    let at = |path: &str| format!("docker://{}/{path}", old.addr);
    for (i, image) in images.iter().enumerate() {
        skopeo_copy(&src(&format!("i{i}")), &at(&format!("many/r{i}:t0"))).await;
        for t in 1..10 {
            put_manifest(&old.addr, &format!("many/r{i}"), &format!("t{t}"), &image.bytes).await;
        }
    }
    skopeo_copy(&src("missing"), &at("bad/missing:x")).await;
    skopeo_copy(&src("corrupt"), &at("bad/corrupt:x")).await;
    skopeo_copy(&src("untagged"), &at("many/r0:gone")).await;
    run("skopeo", &["delete", "--tls-verify=false", &at(&format!("many/r0@{}", untagged.digest))], &[]).await;
    put_manifest(&old.addr, "many/r0", untagged.digest.as_str(), &untagged.bytes).await;
    let blob_file =
        |d: &Digest| root.join(format!("docker/registry/v2/blobs/sha256/{}/{}/data", &d.hex()[..2], d.hex()));
    std::fs::remove_file(blob_file(&missing.blobs[1])).unwrap();
    std::fs::write(blob_file(&corrupt.digest), b"{\"schemaVersion\": 2}").unwrap();
    let mut store = Store::new(&reg, root.clone());
    store.sync().await;

    // The first run is killed once it has brought some tags over.
    let mut first = berth_command(&reg, work.path(), "import")
        .args(["--from", &store.from()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = reg.sql().await;
    let recorded = || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM import_tags").fetch_one(&db).await.unwrap_or((0,));
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while recorded().await < 5 {
        assert!(first.try_wait().unwrap().is_none(), "the import finished before it could be interrupted");
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let done_before = recorded().await;
    assert!((5..60).contains(&done_before), "{done_before} tags recorded when killed");

    // The next run continues: it brings over the rest, with the untagged manifest this time;
    // the broken images are reported and the rest goes on.
    let (out, report) = import_cli(&reg, work.path(), &["--from", &store.from(), "--untagged"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("imported 8 repositories"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = report.unwrap();
    let new = names(&report["tags_new"]);
    assert_eq!(new.len() as i64 + done_before, 60, "{report}");
    let skipped: Vec<(String, String)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["item"].as_str().unwrap().to_string(), s["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "bad/corrupt:x");
    assert!(skipped[0].1.contains("hash to"), "{skipped:?}");
    assert_eq!(skipped[1].0, "bad/missing:x");
    assert!(skipped[1].1.contains("missing from the source"), "{skipped:?}");

    // Every tag resolves as in the old registry; the untagged manifest is there by digest.
    for i in 0..6 {
        for t in 0..10 {
            let (repo, tag) = (format!("many/r{i}"), format!("t{t}"));
            assert_eq!(
                resolve(&reg.addr.to_string(), &repo, &tag).await,
                resolve(&old.addr, &repo, &tag).await
            );
        }
    }
    assert_eq!(
        resolve(&reg.addr.to_string(), "many/r0", untagged.digest.as_str()).await.as_deref(),
        Some(untagged.digest.as_str())
    );
    assert_eq!(resolve(&reg.addr.to_string(), "bad/missing", "x").await, None);
    old.stop();

    // A run with nothing changed changes nothing (and reports the broken images again).
    let (_, again) = import_cli(&reg, work.path(), &["--from", &store.from()]);
    let again = again.unwrap();
    assert_eq!(again["tags_new"], serde_json::json!([]), "{again}");
    assert_eq!(
        (again["manifests_imported"].as_u64(), again["skipped"].as_array().unwrap().len()),
        (Some(0), 2),
        "{again}"
    );
    let fsck = berth_command(&reg, work.path(), "fsck").output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
});
