//! The soak (issue 32): two PostgreSQL + S3 replicas behind a round-robin client, eight pushers
//! sharing layers and skipping every upload `HEAD` says exists, four deleters, each replica's
//! own collector and sweep, and a `berth gc run` process every 2 s — with windows of seconds.
//! Asserted: no push answered `MANIFEST_BLOB_UNKNOWN` (every blob of every push was uploaded or
//! `HEAD`-confirmed moments before), no answer was a 5xx, nothing acknowledged and not deleted
//! was lost, every listed tag pulls completely, fsck is clean, and PostgreSQL detected no
//! deadlock. `BERTH_SOAK_SECONDS` sets the length (60 in the suite; docs/testing.md runs 600).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::oci::Digest;
use reqwest::Method;
use serde_json::json;

use crate::harness::*;

const REPO: &str = "soak/app";

/// Two replicas sharing a round-robin counter, as a load balancer would spread requests.
struct Balancer {
    replicas: Vec<TestRegistry>,
    next: AtomicUsize,
}

impl Balancer {
    fn pick(&self) -> &TestRegistry {
        &self.replicas[self.next.fetch_add(1, Relaxed) % self.replicas.len()]
    }
}

/// What the soak saw go wrong, and its figures.
#[derive(Default)]
struct Tally {
    blob_unknown: Vec<String>,
    server_errors: Vec<String>,
    push_ms: Vec<u64>,
}

async fn upload(reg: &TestRegistry, bytes: &[u8], tally: &Mutex<Tally>) -> bool {
    let d = Digest::sha256_of(bytes);
    let res = reg
        .req(Method::POST, &format!("/v2/{REPO}/blobs/uploads/?digest={d}"))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    if res.status().is_server_error() {
        tally.lock().unwrap().server_errors.push(format!("upload {d}: {}", res.status()));
        return false;
    }
    assert_eq!(res.status(), 201, "upload {d}");
    true
}

async fn soak(seconds: u64) {
    let _heavy = HEAVY_LOAD.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = scale_out_config(dir.path()).await else { return };
    config.gc.enabled = true;
    config.gc.interval = Duration::from_millis(200);
    config.gc.sweep_interval = Duration::from_millis(500);
    config.gc.blob_grace = Duration::from_secs(5);
    config.gc.untagged_grace = Duration::from_secs(1);
    config.gc.restore_window = Duration::from_secs(1);
    // A quota over everything the soak pushes, far from its limit: every transaction keeps it,
    // and it must come out exact (and add no deadlock).
    config.quotas = vec![berth::quota::QuotaRule {
        name: "soak".into(),
        repositories: berth::auth::Pattern::parse("**").unwrap(),
        max_bytes: 1 << 40,
        max_repositories: None,
        warn_at: 0.9,
    }];
    // The defaults of a real deployment: a 1 s access flush and 2 s of allowed clock skew.
    let first = TestRegistry::start_with(config.clone(), dir).await;
    let second = TestRegistry::start_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let lb = Arc::new(Balancer { replicas: vec![first, second], next: AtomicUsize::new(0) });
    let db = lb.replicas[0].sql().await;
    let deadlocks = || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
                .fetch_one(&db)
                .await
                .unwrap();
        n
    };
    let deadlocks_before = deadlocks().await;
    // `berth gc run` against the same deployment, every 2 s, as from cron.
    let gc_dir = tempfile::tempdir().unwrap();
    let gc_config = gc_dir.path().join("berth.toml");
    std::fs::write(
        &gc_config,
        format!(
            "data_dir = {:?}\n{}\n[gc]\nenabled = false\nblob_grace = \"5s\"\nuntagged_grace = \"1s\"\nrestore_window = \"1s\"\n\
             [[quotas]]\nname = \"soak\"\nrepositories = \"**\"\nmax_bytes = 1099511627776\n",
            gc_dir.path().display().to_string(),
            scale_out_toml(&config)
        ),
    )
    .unwrap();

    let shared: Arc<Vec<Vec<u8>>> = Arc::new((0..6).map(|i| random_bytes(30_000 + i, 4096)).collect());
    let acked: Arc<Mutex<HashMap<String, Digest>>> = Arc::default();
    let deleted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let (pushes, deletes, skipped) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (lb, shared, acked, tally, pushes, skipped) =
            (lb.clone(), shared.clone(), acked.clone(), tally.clone(), pushes.clone(), skipped.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < deadline {
                k += 1;
                let started = Instant::now();
                let mut layers = Vec::new();
                let mut ok = true;
                for common in [&shared[((w + k) % 6) as usize], &shared[((w + 2 * k + 1) % 6) as usize]] {
                    let d = Digest::sha256_of(common);
                    let head =
                        lb.pick().req(Method::HEAD, &format!("/v2/{REPO}/blobs/{d}")).send().await.unwrap();
                    if head.status().is_server_error() {
                        tally.lock().unwrap().server_errors.push(format!("HEAD {d}: {}", head.status()));
                    }
                    if head.status() == 200 {
                        skipped.fetch_add(1, Relaxed);
                    } else {
                        ok &= upload(lb.pick(), common, &tally).await;
                    }
                    if !layers.iter().any(|(l, _): &(Digest, usize)| *l == d) {
                        layers.push((d, common.len()));
                    }
                }
                let own = random_bytes(1_000_000 * (w + 1) + k, 2048);
                let config = format!(r#"{{"os":"linux","w":{w},"k":{k}}}"#).into_bytes();
                ok &= upload(lb.pick(), &own, &tally).await;
                ok &= upload(lb.pick(), &config, &tally).await;
                if !ok {
                    continue;
                }
                layers.push((Digest::sha256_of(&own), own.len()));
                let descriptors: Vec<serde_json::Value> = layers
                    .iter()
                    .map(|(d, size)| json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": size}))
                    .collect();
                let cfg = Digest::sha256_of(&config);
                let manifest = serde_json::to_vec(&json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": cfg.as_str(), "size": config.len()},
                    "layers": descriptors,
                }))
                .unwrap();
                let tag = format!("w{w}-{k}");
                let res = lb.pick().put_manifest(REPO, &tag, OCI_MANIFEST, &manifest).await;
                let status = res.status().as_u16();
                match status {
                    201 => {
                        acked.lock().unwrap().insert(tag, Digest::sha256_of(&manifest));
                        pushes.fetch_add(1, Relaxed);
                        tally.lock().unwrap().push_ms.push(started.elapsed().as_millis() as u64);
                    }
                    400 => {
                        let body = res.text().await.unwrap();
                        tally.lock().unwrap().blob_unknown.push(format!("{tag}: {body}"));
                    }
                    s if s >= 500 => {
                        tally.lock().unwrap().server_errors.push(format!("push {tag}: {s}"));
                    }
                    other => panic!("push {tag}: {other}"),
                }
            }
        }));
    }
    for d in 0..4u64 {
        let (lb, acked, deleted, tally, deletes) =
            (lb.clone(), acked.clone(), deleted.clone(), tally.clone(), deletes.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = d;
            while Instant::now() < deadline {
                n += 4;
                // Paced, and never a spin without an await: the servers share these threads.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let victim = {
                    let acked = acked.lock().unwrap();
                    let mut deleted = deleted.lock().unwrap();
                    let len = acked.len().max(1);
                    let pick =
                        acked.iter().nth((n as usize * 7919) % len).map(|(t, d)| (t.clone(), d.clone()));
                    pick.filter(|(t, _)| deleted.insert(t.clone()))
                };
                let Some((tag, digest)) = victim else { continue };
                let path = if n % 3 == 0 {
                    format!("/v2/{REPO}/manifests/{digest}")
                } else {
                    format!("/v2/{REPO}/manifests/{tag}")
                };
                let status = lb.pick().req(Method::DELETE, &path).send().await.unwrap().status();
                if status.is_server_error() {
                    tally.lock().unwrap().server_errors.push(format!("delete {path}: {status}"));
                } else {
                    assert!(matches!(status.as_u16(), 202 | 404), "delete {path}: {status}");
                    deletes.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    let gc_runs = {
        let (stop, gc_config) = (stop.clone(), gc_config.clone());
        tokio::spawn(async move {
            let mut runs = 0u64;
            while !stop.load(Relaxed) {
                let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
                    .args(["gc", "run", "--config"])
                    .arg(&gc_config)
                    .env_remove("BERTH_DATA_DIR")
                    .env_remove("BERTH_CONFIG")
                    .output()
                    .await
                    .unwrap();
                assert!(out.status.success(), "berth gc run: {}", String::from_utf8_lossy(&out.stderr));
                runs += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            runs
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Relaxed);
    let gc_runs = gc_runs.await.unwrap();

    // Everything acknowledged and not deleted resolves where it was put and pulls completely.
    let deleted = deleted.lock().unwrap().clone();
    let kept: Vec<(String, Digest)> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| !deleted.contains(*t))
        .map(|(t, d)| (t.clone(), d.clone()))
        .collect();
    let reg = &lb.replicas[1];
    for (tag, digest) in &kept {
        let res = reg.get(&format!("/v2/{REPO}/manifests/{tag}")).await;
        assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()), "{tag} was lost");
        let manifest: serde_json::Value = res.json().await.unwrap();
        for blob in manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]) {
            let d = blob["digest"].as_str().unwrap();
            let res = reg.get(&format!("/v2/{REPO}/blobs/{d}")).await;
            assert_eq!(res.status(), 200, "{tag} dangles: {d}");
        }
    }
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
    for count in reg.app.registry.count_quotas(false).await.unwrap() {
        assert!(count.exact(), "the quota kept through the soak: {count:?}");
    }
    let metrics = reg.get("/metrics").await.text().await.unwrap()
        + &lb.replicas[0].get("/metrics").await.text().await.unwrap();
    let retries: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("berth_db_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    let deadlocks_after = deadlocks().await;
    let tally = tally.lock().unwrap();
    let mut push_ms = tally.push_ms.clone();
    push_ms.sort_unstable();
    let p99 = push_ms.get(push_ms.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(0);
    eprintln!(
        "soak {seconds} s on 2 replicas: {} pushes, {} deletes, {} uploads skipped after HEAD, {gc_runs} `berth gc run`s, \
         {} MANIFEST_BLOB_UNKNOWN, {} 5xx, {retries} transaction retries, {} deadlocks, push p99 {p99} ms",
        pushes.load(Relaxed),
        deletes.load(Relaxed),
        skipped.load(Relaxed),
        tally.blob_unknown.len(),
        tally.server_errors.len(),
        deadlocks_after - deadlocks_before,
    );
    assert!(
        tally.blob_unknown.is_empty(),
        "pushes refused for blobs uploaded or HEAD-confirmed: {:?}",
        tally.blob_unknown
    );
    assert!(tally.server_errors.is_empty(), "5xx answers: {:?}", tally.server_errors);
    assert_eq!(deadlocks_after, deadlocks_before, "PostgreSQL detected deadlocks");
    assert!(pushes.load(Relaxed) > 20 && deletes.load(Relaxed) > 5, "the soak made progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_on_two_replicas_answers_no_5xx_and_no_blob_unknown() {
    let seconds = std::env::var("BERTH_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    soak(seconds).await;
}
