//! `kill -9` at random moments while images are pushed and deleted and the collector runs; after
//! each crash `berth fsck` finds the store consistent (leftover objects allowed, never a row
//! without bytes), and after a restart what was kept pulls completely.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use berth::oci::Digest;
use serde_json::json;

use crate::harness::*;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

fn serve(config: &std::path::Path, dir: &std::path::Path) -> (Child, String) {
    serve_process(&[std::ffi::OsStr::new("--config"), config.as_os_str()], &dir.join("ready"))
}

/// Pushes one image (two layers, one shared) and answers its digest, or nothing when the server
/// went away midway.
async fn push(client: &reqwest::Client, base: &str, tag: &str, seed: u64) -> Option<Digest> {
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

async fn crash_rounds(config: std::path::PathBuf, dir: std::path::PathBuf) {
    let client = reqwest::Client::new();
    let mut seed = 20_000u64;
    for round in 0..4u64 {
        let (mut child, addr) = serve(&config, &dir);
        let base = format!("http://{addr}");
        // Work until the kill lands at a moment that differs from round to round.
        let kill_at = Instant::now() + Duration::from_millis(300 + 250 * round);
        while Instant::now() < kill_at {
            seed += 1;
            let tag = format!("t{seed}");
            if let Some(digest) = push(&client, &base, &tag, seed).await
                && seed.is_multiple_of(3)
            {
                let _ = client.delete(format!("{base}/v2/crash/app/manifests/{digest}")).send().await;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let out = Command::new(BERTH).args(["fsck", "--json", "--config"]).arg(&config).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(out.status.success(), "round {round}: fsck after kill -9: {report}");
    }
    // After a restart, every tag pulls completely.
    let (mut child, addr) = serve(&config, &dir);
    let base = format!("http://{addr}");
    let tags: serde_json::Value =
        client.get(format!("{base}/v2/crash/app/tags/list")).send().await.unwrap().json().await.unwrap();
    let tags = tags["tags"].as_array().cloned().unwrap_or_default();
    assert!(!tags.is_empty());
    for tag in tags {
        let tag = tag.as_str().unwrap();
        let manifest: serde_json::Value = client
            .get(format!("{base}/v2/crash/app/manifests/{tag}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for layer in manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]) {
            let d = layer["digest"].as_str().unwrap();
            let bytes = client
                .get(format!("{base}/v2/crash/app/blobs/{d}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(Digest::sha256_of(&bytes).as_str(), d, "{tag}");
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Windows short enough for the collector to act between the kills.
const GC: &str = "[gc]\ninterval = \"50ms\"\nrestore_window = \"100ms\"\nuntagged_grace = \"100ms\"\nblob_grace = \"300ms\"\naccess_flush_interval = \"50ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_pushes_deletes_and_collection_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n{GC}", dir.path().join("data").display().to_string()))
        .unwrap();
    crash_rounds(config, dir.path().to_path_buf()).await;
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
    crash_rounds(config, dir.path().to_path_buf()).await;
}
