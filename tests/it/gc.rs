//! The online collector (`gc.enabled` is off by default; these tests run passes directly and
//! move the application clock instead of waiting): tombstones go when their restore window has
//! passed, untagged manifests when their grace has, blobs when nothing references them and their
//! grace (refreshed by HEAD) has passed — and the bytes leave storage.

use berth::oci::{Digest, RepoName};
use reqwest::Method;
use serde_json::json;

use crate::backend_test;
use crate::harness::*;

const HOUR: i64 = 3600 * 1000;
const DAY: i64 = 24 * HOUR;

impl TestRegistry {
    async fn collect(&self) -> berth::registry::GcReport {
        self.app.registry.collect(100_000).await.unwrap()
    }

    pub fn advance(&self, ms: i64) {
        self.app.registry.clock().advance_ms(ms);
    }
}

fn blob_digests(img: &PushedImage) -> Vec<Digest> {
    std::iter::once(&img.config).chain(&img.layers).map(|b| Digest::sha256_of(b)).collect()
}

backend_test!(deleted_images_are_reclaimed_after_their_window, |reg| {
    let gone = reg.push_image("gc/app", "v1", 1200).await;
    let kept = reg.push_image("gc/app", "v2", 1201).await;
    let mut gone_keys = Vec::new();
    for d in blob_digests(&gone) {
        gone_keys.push(reg.storage_key(&d).await);
    }
    assert_eq!(
        reg.req(Method::DELETE, &format!("/v2/gc/app/manifests/{}", gone.digest))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );

    // Within the restore window nothing goes, and the tombstone can still be restored.
    reg.advance(6 * DAY);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs), (0, 0), "{report:?}");

    reg.advance(DAY + HOUR);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs, report.objects_deleted), (1, 3, 3), "{report:?}");
    let repo = RepoName::parse("gc/app").unwrap();
    assert!(reg.app.registry.restore_manifest(&repo, &gone.digest, false, None).await.is_err());
    for d in blob_digests(&gone) {
        assert_eq!(reg.get(&format!("/v2/gc/app/blobs/{d}")).await.status(), 404);
    }
    // The bytes are gone from storage; what is kept pulls completely.
    let stored = reg.app.registry.blobs().list("").await.unwrap();
    for key in &gone_keys {
        assert!(!stored.contains(key), "{key} still stored");
    }
    assert_eq!(reg.get("/v2/gc/app/manifests/v2").await.bytes().await.unwrap(), kept.manifest);
    for (d, bytes) in blob_digests(&kept).iter().zip(std::iter::once(&kept.config).chain(&kept.layers)) {
        assert_eq!(reg.get(&format!("/v2/gc/app/blobs/{d}")).await.bytes().await.unwrap(), *bytes);
    }
    let fsck = reg.app.registry.fsck(true, &|_, _| {}).await.unwrap();
    assert!(fsck.clean() && fsck.orphans.is_empty(), "{fsck:?}");
    // Nothing more is due.
    reg.advance(30 * DAY);
    assert_eq!(reg.collect().await.manifests + reg.collect().await.blobs, 0);
});

backend_test!(blob_grace_is_refreshed_by_head_and_references_hold, |reg| {
    let data = random_bytes(1210, 2000);
    let digest = reg.upload_blob("gc/grace", &data).await;
    let path = format!("/v2/gc/grace/blobs/{digest}");
    reg.advance(23 * HOUR);
    reg.collect().await;
    assert_eq!(reg.get(&path).await.status(), 200, "within blob_grace");
    // A HEAD that answered 200 starts the grace again (a client may skip the upload now).
    assert_eq!(reg.req(Method::HEAD, &path).send().await.unwrap().status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    reg.advance(2 * HOUR);
    reg.collect().await;
    assert_eq!(reg.get(&path).await.status(), 200, "the HEAD refreshed the grace");
    reg.advance(23 * HOUR);
    assert_eq!(reg.collect().await.blobs, 1);
    assert_eq!(reg.get(&path).await.status(), 404);

    // A mount starts the grace again, for the repository it links into: the blob's first link
    // goes when its grace ends, the mounted one lives on, and a manifest pushed there keeps it.
    let layer = random_bytes(1212, 1500);
    let digest = reg.upload_blob("gc/grace", &layer).await;
    reg.advance(23 * HOUR);
    let res = reg
        .req(Method::POST, &format!("/v2/gc/mounted/blobs/uploads/?mount={digest}&from=gc/grace"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    reg.advance(2 * HOUR);
    assert_eq!(reg.collect().await.blobs, 0, "mounted two hours ago");
    assert_eq!(
        reg.get(&format!("/v2/gc/grace/blobs/{digest}")).await.status(),
        404,
        "the first link's grace ended"
    );
    let config = reg.upload_blob("gc/mounted", b"{}").await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest.as_str(), "size": layer.len()}],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("gc/mounted", "m", OCI_MANIFEST, &manifest).await.status(), 201);
    reg.advance(30 * DAY);
    reg.collect().await;
    let res = reg.get(&format!("/v2/gc/mounted/blobs/{digest}")).await;
    assert_eq!(res.bytes().await.unwrap().as_ref(), layer.as_slice());

    // A tagged image's blobs are never collected, however old.
    let img = reg.push_image("gc/grace", "v1", 1211).await;
    reg.advance(60 * DAY);
    reg.collect().await;
    assert_eq!(reg.get("/v2/gc/grace/manifests/v1").await.bytes().await.unwrap(), img.manifest);
    for d in blob_digests(&img) {
        assert_eq!(reg.get(&format!("/v2/gc/grace/blobs/{d}")).await.status(), 200);
    }
});

backend_test!(untagged_manifests_go_after_their_grace_unless_held, |reg| {
    // An index holds its untagged children; once it goes, they go.
    let amd = reg.push_image("gc/idx", "amd", 1220).await;
    let arm = reg.push_image("gc/idx", "arm", 1221).await;
    let (index, _) = reg.push_index("gc/idx", "all", &[&amd, &arm]).await;
    for tag in ["amd", "arm"] {
        assert_eq!(
            reg.req(Method::DELETE, &format!("/v2/gc/idx/manifests/{tag}")).send().await.unwrap().status(),
            202
        );
    }
    reg.advance(8 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "the index holds its children");
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{}", amd.digest)).await.status(), 200);
    assert_eq!(reg.req(Method::DELETE, "/v2/gc/idx/manifests/all").send().await.unwrap().status(), 202);
    reg.advance(6 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "untagged grace");
    reg.advance(2 * DAY);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs), (3, 6), "{report:?}");
    for d in [&index, &amd.digest, &arm.digest] {
        assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{d}")).await.status(), 404);
    }

    // A pull extends an untagged manifest's grace; a referrer lives as long as its subject.
    let pulled = reg.push_image("gc/idx", "p", 1222).await;
    let config = reg.upload_blob("gc/idx", b"{}").await;
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": pulled.digest.as_str(), "size": pulled.manifest.len()},
    }))
    .unwrap();
    let sbom_digest = Digest::sha256_of(&sbom);
    assert_eq!(reg.put_manifest("gc/idx", sbom_digest.as_str(), OCI_MANIFEST, &sbom).await.status(), 201);
    assert_eq!(reg.req(Method::DELETE, "/v2/gc/idx/manifests/p").send().await.unwrap().status(), 202);
    reg.advance(6 * DAY);
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{}", pulled.digest)).await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    reg.advance(2 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "pulled a day and a half ago: still in grace");
    assert_eq!(
        reg.get(&format!("/v2/gc/idx/manifests/{sbom_digest}")).await.status(),
        200,
        "its subject lives"
    );
    reg.advance(6 * DAY);
    let report = reg.collect().await;
    assert_eq!(report.manifests, 2, "the image, then its referrer: {report:?}");
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{sbom_digest}")).await.status(), 404);
});

/// A registry whose collector windows are short enough to act during a test.
pub(crate) async fn with_short_windows(backend: Backend) -> Option<TestRegistry> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = match backend {
        Backend::Sqlite => {
            let mut c = berth::config::Config::embedded(dir.path());
            c.storage_fsync = false;
            c.gc.enabled = false;
            c
        }
        Backend::Postgres => scale_out_config(dir.path()).await?,
    };
    config.gc.blob_grace = std::time::Duration::from_millis(1500);
    config.gc.untagged_grace = std::time::Duration::from_millis(300);
    config.gc.restore_window = std::time::Duration::from_millis(300);
    config.gc.access_flush_interval = std::time::Duration::from_millis(100);
    // Replicas of one test share one clock.
    config.gc.clock_skew = std::time::Duration::ZERO;
    Some(TestRegistry::start_with(config, dir).await)
}

/// Pushes, deletes and collection at once, with windows short enough that the collector really
/// collects: writers push images sharing layers (skipping a shared layer's upload when `HEAD`
/// says it is there, as clients do), a deleter removes tags and manifests, the collector runs
/// continuously. Afterwards every listed tag pulls completely, every acknowledged push whose tag
/// was not deleted still resolves where it put it, and fsck finds no problem. A push may answer
/// MANIFEST_BLOB_UNKNOWN only when a blob really was collected before it (the writer then
/// uploads again); those are counted.
async fn stress(replicas: Vec<TestRegistry>) {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    let _heavy = HEAVY_LOAD.lock().await;
    let replicas: Vec<Arc<TestRegistry>> = replicas.into_iter().map(Arc::new).collect();
    let n = replicas.len();
    let reg = replicas[0].clone();
    let shared: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(1300 + i, 4000)).collect();
    let config = br#"{"os":"linux"}"#.to_vec();
    let acked: Arc<Mutex<HashMap<String, Digest>>> = Arc::default();
    let deleted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);

    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let (reg, shared, config, acked, retries) =
            (reg.clone(), shared.clone(), config.clone(), acked.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while std::time::Instant::now() < deadline {
                k += 1;
                let own = random_bytes(10_000 + w * 1000 + k, 3000);
                let common = &shared[(k % 3) as usize];
                let tag = format!("w{w}-{k}");
                loop {
                    // The shared layer: skipped when HEAD says it is there.
                    let d = Digest::sha256_of(common);
                    let head =
                        reg.req(Method::HEAD, &format!("/v2/stress/app/blobs/{d}")).send().await.unwrap();
                    if head.status() != 200 {
                        reg.upload_blob("stress/app", common).await;
                    }
                    let cfg = reg.upload_blob("stress/app", &config).await;
                    let own_d = reg.upload_blob("stress/app", &own).await;
                    let manifest = serde_json::to_vec(&json!({
                        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": cfg.as_str(), "size": config.len()},
                        "layers": [
                            {"mediaType": OCI_LAYER, "digest": d.as_str(), "size": common.len()},
                            {"mediaType": OCI_LAYER, "digest": own_d.as_str(), "size": own.len()},
                        ],
                    }))
                    .unwrap();
                    let res = reg.put_manifest("stress/app", &tag, OCI_MANIFEST, &manifest).await;
                    match res.status().as_u16() {
                        201 => {
                            acked.lock().unwrap().insert(tag.clone(), Digest::sha256_of(&manifest));
                            break;
                        }
                        400 => {
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => panic!("push {tag}: {other} {:?}", res.text().await),
                    }
                }
            }
        }));
    }
    {
        let reg = replicas[1 % n].clone();
        let (acked, deleted) = (acked.clone(), deleted.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while std::time::Instant::now() < deadline {
                n += 1;
                let victim = acked
                    .lock()
                    .unwrap()
                    .iter()
                    .nth((n * 7 % 13) as usize)
                    .map(|(t, d)| (t.clone(), d.clone()));
                if let Some((tag, digest)) = victim {
                    deleted.lock().unwrap().insert(tag.clone());
                    let path = if n.is_multiple_of(3) {
                        format!("/v2/stress/app/manifests/{digest}")
                    } else {
                        format!("/v2/stress/app/manifests/{tag}")
                    };
                    let status = reg.req(Method::DELETE, &path).send().await.unwrap().status().as_u16();
                    assert!(matches!(status, 202 | 404), "delete {path}: {status}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        }));
    }
    let collected: Arc<Mutex<(u64, u64, u64)>> = Arc::default();
    let mut collectors = Vec::new();
    for reg in &replicas {
        let (reg, stop, collected) = (reg.clone(), stop.clone(), collected.clone());
        collectors.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = reg.app.registry.collect(1000).await.unwrap();
                // The storage sweep runs as fast as it can too: nothing a push wrote may look
                // like an orphan to it.
                let sweep = reg.app.registry.sweep_step().await.unwrap();
                {
                    let mut c = collected.lock().unwrap();
                    c.0 += r.manifests;
                    c.1 += r.blobs;
                    c.2 += sweep.orphans;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in collectors {
        c.await.unwrap();
    }

    // Every listed tag pulls completely.
    let tags: serde_json::Value = reg.get("/v2/stress/app/tags/list").await.json().await.unwrap();
    let tags: Vec<String> = serde_json::from_value(tags["tags"].clone()).unwrap();
    for tag in &tags {
        let res = reg.get(&format!("/v2/stress/app/manifests/{tag}")).await;
        assert_eq!(res.status(), 200, "{tag}");
        let manifest: serde_json::Value = res.json().await.unwrap();
        for layer in manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]) {
            let d = layer["digest"].as_str().unwrap();
            let res = reg.get(&format!("/v2/stress/app/blobs/{d}")).await;
            assert_eq!(res.status(), 200, "{tag} needs {d}");
            assert_eq!(Digest::sha256_of(&res.bytes().await.unwrap()).as_str(), d);
        }
    }
    // Every acknowledged push not deleted later still resolves where it put its tag.
    let deleted = deleted.lock().unwrap().clone();
    let kept: Vec<(String, Digest)> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| !deleted.contains(*t))
        .map(|(t, d)| (t.clone(), d.clone()))
        .collect();
    for (tag, digest) in &kept {
        let res = reg.get(&format!("/v2/stress/app/manifests/{tag}")).await;
        assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()), "{tag}");
    }
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
    let acked_n = acked.lock().unwrap().len();
    let (manifests, blobs, orphans) = *collected.lock().unwrap();
    // The sweep may take objects here, but only garbage: a duplicate upload's bytes, which its
    // request deletes right after the transaction that found the digest stored, can be older
    // than this test's 1.5 s grace on a loaded machine, and then the sweep deletes them too.
    // Nothing a row names was taken: fsck found every blob's bytes, and every tag pulled.
    eprintln!(
        "stress: {acked_n} pushes acknowledged, {} deleted, {} pushes retried after MANIFEST_BLOB_UNKNOWN; \
         collected {manifests} manifests and {blobs} blobs meanwhile; the sweep took {orphans} leftovers",
        deleted.len(),
        retries.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(acked_n > 20, "the writers made progress");
    assert!(manifests > 0 && blobs > 0, "the collector collected while the others worked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_deletes_and_collection_at_once_lose_nothing_sqlite() {
    stress(vec![with_short_windows(Backend::Sqlite).await.unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_deletes_and_collection_at_once_lose_nothing_postgres() {
    let Some(reg) = with_short_windows(Backend::Postgres).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    stress(vec![reg]).await;
}

// The same on two replicas of one scale-out deployment: writers on both, the deleter on the
// second, a collector on each (they claim reviews with SKIP LOCKED and never collect one item
// twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_deletes_and_collection_on_two_replicas_lose_nothing() {
    let Some(first) = with_short_windows(Backend::Postgres).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let second = TestRegistry::start_with(first.app.config.clone(), tempfile::tempdir().unwrap()).await;
    stress(vec![first, second]).await;
}

// `berth serve` runs the collector in the background when `gc.enabled` (the default): a deleted
// image's bytes leave storage without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_collects_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    config.storage_fsync = false;
    assert!(config.gc.enabled, "on by default");
    config.gc.interval = std::time::Duration::from_millis(100);
    config.gc.blob_grace = std::time::Duration::from_millis(200);
    config.gc.access_flush_interval = std::time::Duration::from_millis(50);
    config.gc.clock_skew = std::time::Duration::ZERO;
    config.gc.restore_window = std::time::Duration::from_millis(200);
    let reg = TestRegistry::start_with(config, dir).await;
    let img = reg.push_image("gc/bg", "v1", 1400).await;
    let key = reg.storage_key(&Digest::sha256_of(&img.layers[0])).await;
    assert_eq!(
        reg.req(Method::DELETE, &format!("/v2/gc/bg/manifests/{}", img.digest))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reg.app.registry.blobs().list("").await.unwrap().contains(&key) {
        if std::time::Instant::now() > deadline {
            let sql = reg.sql().await;
            let rows: Vec<(String, i64, i64)> =
                sqlx::query_as("SELECT kind, item_id, review_after FROM gc_reviews")
                    .fetch_all(&sql)
                    .await
                    .unwrap();
            let now = reg.app.registry.clock().now_ms();
            panic!(
                "not collected in the background; now {now}, reviews {rows:?}, manual {:?}",
                reg.app.registry.collect(100).await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

// `berth gc run` collects what is due and exits; fsck is clean afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_run_collects_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[storage]\nfsync = false\n[gc]\nenabled = false\nrestore_window = \"1ms\"\nblob_grace = \"200ms\"\n\
             access_flush_interval = \"10ms\"\nclock_skew = \"0ms\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let loaded = berth::config::Config::load(Some(&config), &berth::config::Overrides::default()).unwrap();
    let reg = TestRegistry::start_with(loaded, tempfile::tempdir().unwrap()).await;
    let img = reg.push_image("gc/cli", "v1", 1500).await;
    assert_eq!(
        reg.req(Method::DELETE, &format!("/v2/gc/cli/manifests/{}", img.digest))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let _ = reg.stop().await;
    // Past blob_grace and the collector's margin over it (flush interval + clock skew).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let berth = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    // The dry run lists exactly what the pass then collects.
    let out = berth(&["gc", "run", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["manifests"][0]["subject"], format!("gc/cli@{}", img.digest), "{plan}");
    assert_eq!(plan["blobs"].as_array().map(Vec::len), Some(3), "{plan}");
    let out = berth(&["gc", "run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reviewed"), "progress on stderr");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["manifests"].as_u64(), report["blobs"].as_u64()), (Some(1), Some(3)), "{report}");
    assert_eq!(report["bytes"], plan["bytes"]);
    assert_eq!(report["objects_deleted"], 3);
    let out = berth(&["fsck", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let fsck: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fsck["blobs_checked"], 0);
    assert_eq!(fsck["orphans"], serde_json::json!([]));
}

/// Pushes an artifact whose subject is `subject` in `repo` (a signature or SBOM); returns its
/// digest.
pub(crate) async fn push_referrer(
    reg: &TestRegistry,
    repo: &str,
    subject: &PushedImage,
    seed: u64,
) -> Digest {
    let config = reg.upload_blob(repo, b"{}").await;
    let payload = random_bytes(seed, 1500);
    let layer = reg.upload_blob(repo, &payload).await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": layer.as_str(), "size": payload.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest.as_str(), "size": subject.manifest.len()},
    }))
    .unwrap();
    let digest = Digest::sha256_of(&artifact);
    assert_eq!(reg.put_manifest(repo, digest.as_str(), OCI_MANIFEST, &artifact).await.status(), 201);
    digest
}

// Reclaim: push every kind of thing (images, an index, a referrer, a chunked upload, a mount,
// abandoned and cancelled uploads, bytes a crash left unrecorded), delete everything but one
// image in every way there is, wait out the windows, and storage holds exactly what that image
// needs: no object, row or queue entry is left over.
backend_test!(storage_returns_to_what_live_content_needs, |reg| {
    let kept = reg.push_image("reclaim/kept", "v1", 1300).await;
    let a = reg.push_image("reclaim/app", "a", 1301).await;
    let b = reg.push_image("reclaim/app", "b", 1302).await;
    let (_index, _) = reg.push_index("reclaim/app", "multi", &[&a, &b]).await;
    push_referrer(&reg, "reclaim/app", &a, 1303).await;
    // A layer shared with the kept image, mounted into another repository.
    let shared = Digest::sha256_of(&kept.layers[0]);
    let res = reg
        .req(Method::POST, &format!("/v2/reclaim/other/blobs/uploads/?mount={shared}&from=reclaim/kept"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let other = reg.push_image("reclaim/other", "x", 1304).await;
    // A chunked upload of three chunks (composed into one object on S3).
    let chunked = random_bytes(1305, 3 * 1024);
    let loc = reg.start_upload("reclaim/other").await;
    for i in 0..3 {
        assert_eq!(reg.patch_chunk(&loc, &chunked, i * 1024, (i + 1) * 1024).await.status(), 202);
    }
    let digest = Digest::sha256_of(&chunked);
    let sep = if loc.contains('?') { '&' } else { '?' };
    assert_eq!(
        reg.req(Method::PUT, &format!("{loc}{sep}digest={digest}")).send().await.unwrap().status(),
        201
    );
    // An upload abandoned after two chunks, and one cancelled.
    let abandoned = reg.start_upload("reclaim/other").await;
    for i in 0..2 {
        assert_eq!(reg.patch_chunk(&abandoned, &chunked, i * 1024, (i + 1) * 1024).await.status(), 202);
    }
    let cancelled = reg.start_upload("reclaim/other").await;
    assert_eq!(reg.patch_chunk(&cancelled, &chunked, 0, 1024).await.status(), 202);
    assert_eq!(reg.req(Method::DELETE, &cancelled).send().await.unwrap().status(), 204);
    // Bytes a crash left behind without a row.
    reg.leave_unrecorded_bytes("reclaim-crashed", 777).await;

    // Delete everything but `kept`: tags (the children of the index are held by its tombstone
    // until that goes, then by their untagged grace), a manifest by digest, a whole repository.
    let reg = &reg;
    let del = |path: String| async move { reg.req(Method::DELETE, &path).send().await.unwrap().status() };
    assert_eq!(del("/v2/reclaim/app/manifests/multi".into()).await, 202);
    assert_eq!(del("/v2/reclaim/app/manifests/a".into()).await, 202);
    assert_eq!(del("/v2/reclaim/app/manifests/b".into()).await, 202);
    assert_eq!(del(format!("/v2/reclaim/other/manifests/{}", other.digest)).await, 202);
    let res = reg.req(Method::DELETE, "/admin/v1/repositories/reclaim/other").send().await.unwrap();
    assert!(res.status().is_success(), "{:?}", res.text().await);
    // The unreferenced chunked blob and the mounted link go by blob_grace, tombstones by the
    // restore window, the referrer with its subject, the abandoned upload by its expiry, the
    // crash leftovers by the sweep.
    reg.advance(8 * DAY);
    let mut rounds = 0;
    loop {
        let pass = reg.collect().await;
        let sweep = reg.app.registry.sweep_step().await.unwrap();
        rounds += 1;
        if pass.reviews == 0 && sweep.orphans == 0 && sweep.storage_pass_finished {
            break;
        }
        assert!(rounds < 10, "still collecting after {rounds} rounds: {pass:?} {sweep:?}");
    }
    reg.app.registry.drain_outbox().await.unwrap();

    let mut needed = Vec::new();
    for d in blob_digests(&kept) {
        needed.push(reg.storage_key(&d).await);
    }
    needed.sort();
    let mut stored = reg.app.registry.blobs().list("").await.unwrap();
    stored.sort();
    assert_eq!(stored, needed, "storage holds exactly the kept image's blobs");
    let sql = reg.sql().await;
    for (table, expected) in [
        ("blobs", 3),
        ("manifests", 1),
        ("tags", 1),
        ("uploads", 0),
        ("gc_outbox", 0),
        ("manifest_children", 0),
        ("repository_blobs", 3),
    ] {
        let (n,): (i64,) =
            sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&sql).await.unwrap();
        assert_eq!(n, expected, "rows in {table}");
    }
    assert_eq!(reg.get("/v2/reclaim/kept/manifests/v1").await.bytes().await.unwrap(), kept.manifest);
    let fsck = reg.app.registry.fsck(true, &|_, _| {}).await.unwrap();
    assert!(fsck.clean() && fsck.orphans.is_empty() && fsck.warnings.is_empty(), "{fsck:?}");
});

// A blob pushed to a repository whose manifest never came there is unlinked from it after
// blob_grace, even though another repository's image keeps the blob itself.
backend_test!(a_link_no_manifest_of_its_repository_uses_goes_after_blob_grace, |reg| {
    let img = reg.push_image("links/used", "v1", 1310).await;
    let layer = &img.layers[0];
    let digest = reg.upload_blob("links/stray", layer).await;
    reg.advance(23 * HOUR);
    reg.collect().await;
    assert_eq!(reg.get(&format!("/v2/links/stray/blobs/{digest}")).await.status(), 200, "within grace");
    reg.advance(2 * HOUR);
    let pass = reg.collect().await;
    assert_eq!(pass.blobs, 0, "{pass:?}");
    assert_eq!(reg.get(&format!("/v2/links/stray/blobs/{digest}")).await.status(), 404);
    let res = reg.get(&format!("/v2/links/used/blobs/{digest}")).await;
    assert_eq!(res.bytes().await.unwrap().as_ref(), layer.as_slice());
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean() && fsck.warnings.is_empty(), "{fsck:?}");
});

// One item whose review fails (here a trigger refuses to delete its row) is postponed with a
// growing pause; the rest of the queue is collected meanwhile, and the item once it can be.
backend_test!(a_failing_review_is_postponed_and_the_rest_goes_on, |reg| {
    let poisoned = reg.upload_blob("gc/poison", &random_bytes(1320, 500)).await;
    let fine = reg.upload_blob("gc/poison", &random_bytes(1321, 600)).await;
    let sql = reg.sql().await;
    let (create_trigger, drop_trigger): (Vec<String>, Vec<&str>) = if reg.on_postgres() {
        (
            vec![
                format!(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN \
                     IF OLD.digest = '{poisoned}' THEN RAISE EXCEPTION 'poisoned for the test'; END IF; \
                     RETURN OLD; END $body$"
                ),
                "CREATE TRIGGER poison BEFORE DELETE ON blobs FOR EACH ROW EXECUTE FUNCTION poison()".into(),
            ],
            vec!["DROP TRIGGER poison ON blobs", "DROP FUNCTION poison()"],
        )
    } else {
        (
            vec![format!(
                "CREATE TRIGGER poison BEFORE DELETE ON blobs WHEN OLD.digest = '{poisoned}' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned for the test'); END"
            )],
            vec!["DROP TRIGGER poison"],
        )
    };
    for statement in &create_trigger {
        sqlx::query(statement).execute(&sql).await.unwrap();
    }
    reg.advance(DAY + HOUR);
    let pass = reg.collect().await;
    assert_eq!((pass.blobs, pass.bytes, pass.review_errors), (1, 600, 1), "{pass:?}");
    assert_eq!(reg.get(&format!("/v2/gc/poison/blobs/{fine}")).await.status(), 404);
    assert_eq!(reg.get(&format!("/v2/gc/poison/blobs/{poisoned}")).await.status(), 200);
    // Postponed: not retried at once.
    assert_eq!(reg.collect().await.review_errors, 0);
    for statement in drop_trigger {
        sqlx::query(statement).execute(&sql).await.unwrap();
    }
    reg.advance(2000);
    let pass = reg.collect().await;
    assert_eq!((pass.blobs, pass.bytes, pass.review_errors), (1, 500, 0), "{pass:?}");
    assert_eq!(reg.get(&format!("/v2/gc/poison/blobs/{poisoned}")).await.status(), 404);
});

// A dry run changes nothing and lists exactly what the pass right after collects: the same
// reviews, rolled back.
backend_test!(a_dry_run_lists_exactly_what_the_pass_then_collects, |reg| {
    let gone = reg.push_image("gc/dry", "a", 1330).await;
    let kept = reg.push_image("gc/dry", "b", 1331).await;
    let unused = reg.upload_blob("gc/dry", &random_bytes(1332, 900)).await;
    let abandoned = reg.start_upload("gc/dry").await;
    assert_eq!(reg.patch_chunk(&abandoned, &random_bytes(1333, 100), 0, 100).await.status(), 202);
    let res = reg.req(Method::DELETE, &format!("/v2/gc/dry/manifests/{}", gone.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    reg.advance(8 * DAY);
    let sql = reg.sql().await;
    let rows = || async {
        let mut counts = Vec::new();
        for table in ["gc_reviews", "gc_outbox", "blobs", "manifests", "repository_blobs", "uploads"] {
            let (n,): (i64,) =
                sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&sql).await.unwrap();
            counts.push(n);
        }
        counts
    };
    let before = rows().await;
    let plan = reg.app.registry.dry_run(u64::MAX).await.unwrap();
    assert_eq!(rows().await, before, "the dry run changed rows");
    let subjects: Vec<&str> = plan.manifests.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, [format!("gc/dry@{}", gone.digest)]);
    let mut blobs: Vec<String> = plan.blobs.iter().map(|b| b.subject.clone()).collect();
    blobs.sort();
    let mut expected: Vec<String> =
        blob_digests(&gone).iter().map(|d| d.to_string()).chain([unused.to_string()]).collect();
    expected.sort();
    assert_eq!(blobs, expected);
    let gone_bytes: u64 = std::iter::once(&gone.config).chain(&gone.layers).map(|b| b.len() as u64).sum();
    assert_eq!((plan.bytes, plan.uploads_expiring), (gone_bytes + 900, 1));

    let pass = reg.collect().await;
    assert_eq!((pass.manifests, pass.blobs, pass.bytes), (1, 4, plan.bytes), "{pass:?}");
    assert_eq!(pass.uploads_expired, 1);
    assert_eq!(reg.get("/v2/gc/dry/manifests/b").await.bytes().await.unwrap(), kept.manifest);
    assert_eq!(reg.app.registry.dry_run(u64::MAX).await.unwrap().manifests.len(), 0);
});

/// Pushes, untagged, an image made of `config_seed`'s config and the given layers.
async fn push_with_layers(
    reg: &TestRegistry,
    repo: &str,
    config_seed: u64,
    layers: &[Vec<u8>],
) -> PushedImage {
    let config =
        json!({"architecture": "amd64", "os": "linux", "seed": config_seed}).to_string().into_bytes();
    let config_digest = reg.upload_blob(repo, &config).await;
    let mut descs = Vec::new();
    for layer in layers {
        let d = reg.upload_blob(repo, layer).await;
        descs.push(json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": layer.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let digest = Digest::sha256_of(&manifest);
    let res = reg.put_manifest(repo, digest.as_str(), OCI_MANIFEST, &manifest).await;
    assert_eq!(res.status(), 201);
    PushedImage { digest, manifest, config, layers: layers.to_vec() }
}

// A layer shared by two images that go in two different reviews is freed only once both are
// collected: a pass, which runs until nothing is due, takes it — and so must the dry run, whose
// reviews are rolled back one by one. Likewise an index's children and their layers, in the
// index's own cascade.
backend_test!(a_dry_run_follows_what_collections_in_different_reviews_free_together, |reg| {
    let repo = "gc/dry-shared";
    let shared = random_bytes(1340, 4000);
    let a = push_with_layers(&reg, repo, 1341, &[shared.clone(), random_bytes(1342, 700)]).await;
    let b = push_with_layers(&reg, repo, 1343, std::slice::from_ref(&shared)).await;
    let c = push_with_layers(&reg, repo, 1344, &[random_bytes(1345, 900)]).await;
    let d = push_with_layers(&reg, repo, 1346, &[random_bytes(1345, 900)]).await;
    let (index, _) = reg.push_index(repo, "all", &[&c, &d]).await;
    for digest in [&a.digest, &b.digest, &index] {
        let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{digest}")).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    reg.advance(8 * DAY);
    let plan = reg.app.registry.dry_run(u64::MAX).await.unwrap();
    let mut manifests: Vec<String> = plan.manifests.iter().map(|m| m.subject.clone()).collect();
    manifests.sort();
    let mut expected: Vec<String> =
        [&a.digest, &b.digest, &c.digest, &d.digest, &index].iter().map(|d| format!("{repo}@{d}")).collect();
    expected.sort();
    assert_eq!(manifests, expected);
    let mut blobs: Vec<String> = plan.blobs.iter().map(|b| b.subject.clone()).collect();
    blobs.sort();
    let mut expected: Vec<String> = [&a, &b, &c, &d]
        .iter()
        .flat_map(|i| blob_digests(i))
        .map(|d| d.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    expected.sort();
    assert_eq!(blobs, expected, "the shared layer and the children's layers are listed, each once");
    assert_eq!(plan.busy, 0);

    let pass = reg.collect().await;
    assert_eq!((pass.manifests, pass.blobs, pass.bytes), (5, expected.len() as u64, plan.bytes), "{pass:?}");
    assert_eq!(reg.app.registry.dry_run(u64::MAX).await.unwrap(), berth::registry::DryRun::default());
});

// A dry run holds no lock longer than one review and its cascade: while it waits in a later
// review, a writer can take the rows of an earlier one (which a single pass-long transaction
// kept locked until its rollback). Made deterministic by locking a table the later review
// reads, from another connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_releases_each_review_before_the_next() {
    use sqlx::Connection;
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    assert!(reg.on_postgres());
    let repo = "gc/dry-locks";
    let unused = reg.upload_blob(repo, &random_bytes(1350, 800)).await;
    reg.advance(2 * DAY);
    let img = reg.push_image(repo, "v1", 1351).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    reg.advance(8 * DAY);

    let url = &reg.app.config.metadata_url;
    let mut holder = sqlx::PgConnection::connect(url).await.unwrap();
    let mut writer = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    // The tombstone's review ends by reading its repository's name: it waits there.
    sqlx::query("LOCK TABLE repositories IN ACCESS EXCLUSIVE MODE").execute(&mut holder).await.unwrap();
    let registry = reg.app.registry.clone();
    let dry = tokio::spawn(async move { registry.dry_run(u64::MAX).await });
    let mut waited = false;
    for _ in 0..500 {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'SELECT name FROM repositories%'",
        )
        .fetch_one(&mut writer)
        .await
        .unwrap();
        if waiting > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(waited, "the dry run never reached the tombstone's review");
    // The unused blob was reviewed (and "collected") first: its row is free again.
    sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
    let row = sqlx::query("SELECT id FROM blobs WHERE digest = $1 FOR UPDATE NOWAIT")
        .bind(unused.as_str())
        .fetch_all(&mut writer)
        .await;
    sqlx::query("ROLLBACK").execute(&mut writer).await.unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let plan = dry.await.unwrap().unwrap();
    assert_eq!(row.expect("a reviewed blob's row is still locked by the dry run").len(), 1);
    assert!(plan.blobs.iter().any(|b| b.subject == unused.as_str()), "{plan:?}");
    assert_eq!(plan.manifests.len(), 1, "{plan:?}");
}

// A blob uploaded again (a client that did not ask first) leaves a redundant copy: the
// completion deletes it right after its commit, and puts its key in the outbox in the commit
// itself, so even a crash in between cannot leave it behind.
backend_test!(a_duplicate_uploads_copy_goes_through_the_outbox, |reg| {
    let bytes = random_bytes(1290, 4000);
    let digest = reg.upload_blob("gc/dup", &bytes).await;
    let key = reg.storage_key(&digest).await;
    assert_eq!(reg.upload_blob("gc/dup", &bytes).await, digest);
    let db = reg.sql().await;
    let outbox: Vec<(String,)> =
        sqlx::query_as("SELECT storage_key FROM gc_outbox").fetch_all(&db).await.unwrap();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    assert_ne!(outbox[0].0, key, "never the stored copy");
    let stored = reg.app.registry.blobs().list("").await.unwrap();
    assert!(!stored.contains(&outbox[0].0), "deleted right after the commit");
    // The collector settles it (deleting a missing object succeeds); the blob is intact.
    let report = reg.collect().await;
    assert_eq!(report.objects_deleted, 1, "{report:?}");
    let left: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM gc_outbox").fetch_one(&db).await.unwrap();
    assert_eq!(left.0, 0);
    assert_eq!(reg.get(&format!("/v2/gc/dup/blobs/{digest}")).await.bytes().await.unwrap(), bytes);
    let fsck = reg.app.registry.fsck(true, &|_, _| {}).await.unwrap();
    assert!(fsck.clean() && fsck.orphans.is_empty(), "{fsck:?}");
});
