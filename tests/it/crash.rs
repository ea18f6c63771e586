//! `kill -9` at random moments while images are pushed and deleted and the collector runs; after
//! each crash `berth fsck` finds the store consistent (leftover objects allowed, never a row
//! without bytes), and after a restart what was kept pulls completely.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use berth::oci::Digest;
use serde_json::json;

use crate::harness::*;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

fn serve(config: &std::path::Path, ready: &std::path::Path) -> (Child, String) {
    serve_process(&[std::ffi::OsStr::new("--config"), config.as_os_str()], ready)
}

/// Pushes one image (two layers, one shared) and answers its digest, or nothing when the server
/// went away midway.
pub(crate) async fn push(client: &reqwest::Client, base: &str, tag: &str, seed: u64) -> Option<Digest> {
    let shared = random_bytes(7, 3000);
    let own = random_bytes(seed, 5000);
    let config = json!({"seed": seed}).to_string().into_bytes();
    let mut descs = Vec::new();
    for blob in [&config, &shared, &own] {
        let d = Digest::sha256_of(blob);
        let res = client
            .post(format!("{base}/v2/crash/app/blobs/uploads/?digest={d}"))
            .body(blob.clone())
            .send()
            .await
            .ok()?;
        if res.status() != 201 {
            return None;
        }
        descs.push(json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": blob.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": descs[0]["digest"], "size": config.len()},
        "layers": [descs[1], descs[2]],
    }))
    .unwrap();
    let res = client
        .put(format!("{base}/v2/crash/app/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .ok()?;
    (res.status() == 201).then(|| Digest::sha256_of(&manifest))
}

/// Kills the first replica of `configs` with SIGKILL at a different moment each round, while
/// images are pushed to and deleted from every replica (the others keep serving throughout);
/// after each kill `berth fsck` must be clean, and at the end every acknowledged push that was
/// not deleted pulls completely, through every replica.
async fn crash_rounds(configs: Vec<std::path::PathBuf>, dir: std::path::PathBuf) {
    let client = reqwest::Client::new();
    let mut seed = 20_000u64;
    let mut acknowledged = std::collections::BTreeMap::new();
    let mut survivors: Vec<(Child, String)> = configs[1..]
        .iter()
        .enumerate()
        .map(|(i, c)| serve(c, &dir.join(format!("ready-{}", i + 1))))
        .collect();
    for round in 0..4u64 {
        let (mut victim, addr) = serve(&configs[0], &dir.join("ready-0"));
        let bases: Vec<String> = std::iter::once(&addr)
            .chain(survivors.iter().map(|(_, a)| a))
            .map(|a| format!("http://{a}"))
            .collect();
        // Work until the kill lands at a moment that differs from round to round.
        let kill_at = Instant::now() + Duration::from_millis(300 + 250 * round);
        while Instant::now() < kill_at {
            seed += 1;
            let base = &bases[seed as usize % bases.len()];
            let tag = format!("t{seed}");
            if let Some(digest) = push(&client, base, &tag, seed).await {
                if seed.is_multiple_of(3) {
                    let _ = client.delete(format!("{base}/v2/crash/app/manifests/{digest}")).send().await;
                } else {
                    acknowledged.insert(tag, digest);
                }
            }
        }
        victim.kill().unwrap(); // SIGKILL
        victim.wait().unwrap();
        let out = Command::new(BERTH).args(["fsck", "--json", "--config"]).arg(&configs[0]).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(out.status.success(), "round {round}: fsck after kill -9: {report}");
    }
    // After a restart, every acknowledged push pulls completely through every replica.
    let restarted = serve(&configs[0], &dir.join("ready-0"));
    survivors.push(restarted);
    assert!(!acknowledged.is_empty());
    for (_, addr) in &survivors {
        let base = format!("http://{addr}");
        for (tag, digest) in &acknowledged {
            let res = client.get(format!("{base}/v2/crash/app/manifests/{tag}")).send().await.unwrap();
            assert_eq!(res.status(), 200, "{tag} through {addr}");
            let bytes = res.bytes().await.unwrap();
            assert_eq!(&Digest::sha256_of(&bytes), digest, "{tag} moved");
            let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            for layer in manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]) {
                let d = layer["digest"].as_str().unwrap();
                let res = client.get(format!("{base}/v2/crash/app/blobs/{d}")).send().await.unwrap();
                let bytes = res.bytes().await.unwrap();
                assert_eq!(Digest::sha256_of(&bytes).as_str(), d, "{tag}");
            }
        }
    }
    for (mut child, _) in survivors {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Windows short enough for the collector to act between the kills.
/// The sweep and the scrub run every 100 ms, so kills land in them too.
const GC: &str = "[gc]\ninterval = \"50ms\"\nrestore_window = \"100ms\"\nuntagged_grace = \"100ms\"\n\
                  blob_grace = \"300ms\"\naccess_flush_interval = \"50ms\"\nclock_skew = \"0ms\"\nsweep_interval = \"100ms\"\n\
                  scrub_period = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_pushes_deletes_and_collection_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n{GC}", dir.path().join("data").display().to_string()))
        .unwrap();
    crash_rounds(vec![config], dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_pushes_deletes_and_collection_scale_out() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let toml = format!("{}{GC}", scale_out_toml(&c));
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, toml).unwrap();
    crash_rounds(vec![config], dir.path().to_path_buf()).await;
}

/// Two replicas on one PostgreSQL and one bucket: one is killed again and again while the other
/// serves on (and takes over the sweep once the dead one's lease runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_replica_of_two_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let toml = format!("{}{GC}", scale_out_toml(&c));
    let configs: Vec<_> = (0..2).map(|i| dir.path().join(format!("replica-{i}.toml"))).collect();
    for config in &configs {
        std::fs::write(config, &toml).unwrap();
    }
    crash_rounds(configs, dir.path().to_path_buf()).await;
}
