//! The admin API and the admin CLI: the same operations, the same facts, through HTTP and
//! through the `berth` binary (over HTTP, and opening an embedded deployment directly).

use std::process::Command;

use berth::oci::Digest;
use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_test;
use crate::harness::*;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

impl TestRegistry {
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.req(method, &format!("/admin/v1/{path}"));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

/// Runs the CLI; returns (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(BERTH).args(args).env_remove("BERTH_CONFIG").env_remove("BERTH_URL").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

backend_test!(admin_api_round_trip, |reg| {
    let img = reg.push_image("adm/app", "v1", 400).await;
    let other = reg.push_image("adm/app", "v2", 401).await;
    let (status, repos) = reg.admin(Method::GET, "repositories", None).await;
    assert_eq!(status, 200, "{repos}");
    let app = &repos["repositories"][0];
    assert_eq!(app["name"], "adm/app");
    assert_eq!(
        (app["tags"].as_i64(), app["manifests"].as_i64(), app["tombstones"].as_i64()),
        (Some(2), Some(2), Some(0))
    );
    let blob_bytes: usize =
        [&img, &other].iter().map(|i| i.config.len() + i.layers.iter().map(Vec::len).sum::<usize>()).sum();
    let manifest_bytes = img.manifest.len() + other.manifest.len();
    assert_eq!(app["bytes_live"].as_u64(), Some((blob_bytes + manifest_bytes) as u64));

    // Preview: what deleting v1's manifest would free — its own blobs and manifest.
    let (status, preview) = reg.admin(Method::GET, &format!("preview/adm/app@{}", img.digest), None).await;
    assert_eq!(status, 200, "{preview}");
    let own = img.config.len() + img.layers.iter().map(Vec::len).sum::<usize>();
    assert_eq!(preview["bytes_freed"].as_u64(), Some((own + img.manifest.len()) as u64));
    assert_eq!(preview["blobs_freed"], 3);
    assert_eq!(preview["tags"], json!(["v1"]));
    assert_eq!(preview["refused"], Value::Null);

    // Delete through the admin API, list tombstones, restore.
    let (status, deleted) =
        reg.admin(Method::DELETE, &format!("manifests/adm/app@{}", img.digest), None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted"][0]["tags"], json!(["v1"]));
    let (_, tombstones) = reg.admin(Method::GET, "tombstones/adm/app", None).await;
    let t = &tombstones["tombstones"][0];
    assert_eq!(t["digest"], img.digest.as_str());
    assert_eq!(t["tags"], json!(["v1"]));
    assert_eq!(t["restorable"], true);
    assert_eq!(t["deleted_why"], "deleted");
    assert!(t["purge_after"].as_i64().unwrap() > t["deleted_at"].as_i64().unwrap());
    let (_, repo) = reg.admin(Method::GET, "repositories/adm/app", None).await;
    assert_eq!(repo["tombstones"], 1);
    assert_eq!(repo["bytes_in_tombstones"].as_u64(), Some((own + img.manifest.len()) as u64));
    let (status, restored) = reg.admin(Method::POST, &format!("restore/adm/app@{}", img.digest), None).await;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(reg.get("/v2/adm/app/manifests/v1").await.bytes().await.unwrap(), img.manifest);

    // History and the time machine.
    assert_eq!(reg.put_manifest("adm/app", "v1", OCI_MANIFEST, &other.manifest).await.status(), 201);
    let (status, reverted) =
        reg.admin(Method::POST, "revert/adm/app:v1", Some(json!({"previous": true}))).await;
    assert_eq!(status, 200, "{reverted}");
    assert_eq!(reverted["digest"], img.digest.as_str());
    let (_, history) = reg.admin(Method::GET, "history/adm/app:v1", None).await;
    let kinds: Vec<&str> =
        history["history"].as_array().unwrap().iter().map(|h| h["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["push", "delete", "restore", "push", "revert"]);

    // Refusals and bad input: spec-shaped errors, nothing changed.
    let (amd, arm) =
        (reg.push_image("adm/multi", "amd", 402).await, reg.push_image("adm/multi", "arm", 403).await);
    reg.push_index("adm/multi", "all", &[&amd, &arm]).await;
    let (_, preview) = reg.admin(Method::GET, &format!("preview/adm/multi@{}", amd.digest), None).await;
    assert!(preview["refused"].as_str().unwrap().contains("image index"), "{preview}");
    let (status, body) = reg.admin(Method::GET, "preview/Not A Target", None).await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (400, Some("NAME_INVALID")));
    let (status, body) = reg.admin(Method::POST, "restore/adm/app@sha256:0000", None).await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (400, Some("DIGEST_INVALID")));
    let (status, _) = reg.admin(Method::GET, "tombstones/adm/none", None).await;
    assert_eq!(status, 404);
    let (status, _) = reg.admin(Method::GET, "nothing/here", None).await;
    assert_eq!(status, 404);
    let (status, body) =
        reg.admin(Method::POST, "revert/adm/app:v1", Some(json!({"previous": true, "at": 1}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) =
        reg.admin(Method::POST, "purge", Some(json!({"digest": img.digest.as_str(), "reason": " "}))).await;
    assert_eq!(status, 400);

    // Repository delete and restore.
    let (status, deleted) = reg.admin(Method::DELETE, "repositories/adm/multi", None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted"].as_array().unwrap().len(), 3);
    assert_eq!(reg.get("/v2/adm/multi/manifests/all").await.status(), 404);
    let (status, _) = reg.admin(Method::POST, "restore/adm/multi", None).await;
    assert_eq!(status, 200);
    assert_eq!(reg.get("/v2/adm/multi/manifests/all").await.status(), 200);
    assert_eq!(reg.tags_of("adm/multi").await, json!(["all", "amd", "arm"]));

    // Purge: every manifest referencing the blob, everywhere, for good.
    let layer = Digest::sha256_of(&arm.layers[0]);
    let (status, purged) = reg
        .admin(Method::POST, "purge", Some(json!({"digest": layer.as_str(), "reason": "secret in layer"})))
        .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["bytes_deleted"], true);
    let gone: Vec<&str> =
        purged["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    assert_eq!(gone.len(), 2, "the image and the index that lists it: {purged}");
    assert_eq!(reg.get("/v2/adm/multi/manifests/all").await.status(), 404);
    assert_eq!(reg.get("/v2/adm/multi/manifests/amd").await.status(), 200, "untouched");
    let (status, refused) = reg.admin(Method::POST, &format!("restore/adm/multi@{}", arm.digest), None).await;
    assert_eq!(status, 409);
    assert!(refused["errors"][0]["message"].as_str().unwrap().contains("secret in layer"), "{refused}");
});

backend_test!(cli_over_http_reports_what_the_admin_api_reports, |reg| {
    let img = reg.push_image("cli/app", "v1", 410).await;
    let url = format!("http://{}", reg.addr);
    let (ok, out, err) = cli(&["repos", "--url", &url]);
    assert!(ok, "{err}");
    assert!(out.contains("cli/app") && out.contains("REPOSITORY"), "{out}");
    let (ok, out, err) =
        cli(&["delete", "--dry-run", &format!("cli/app@{}", img.digest), "--url", &url, "--json"]);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("previewed cli/app@{}", img.digest)), "progress on stderr: {err}");
    let cli_json: Value = serde_json::from_str(&out).unwrap();
    let (_, api_json) = reg.admin(Method::GET, &format!("preview/cli/app@{}", img.digest), None).await;
    assert_eq!(cli_json, api_json, "the same facts in the same words");

    let (ok, out, err) = cli(&["delete", &format!("cli/app@{}", img.digest), "--url", &url]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted") && out.contains("v1"), "{out}");
    assert_eq!(reg.get("/v2/cli/app/manifests/v1").await.status(), 404);
    let (ok, out, _) = cli(&["tombstones", "cli/app", "--url", &url]);
    assert!(ok && out.contains(img.digest.as_str()) && out.contains("restorable until"), "{out}");
    let (ok, out, err) = cli(&["restore", &format!("cli/app@{}", img.digest), "--url", &url]);
    assert!(ok, "{err}");
    assert!(out.contains("restored"), "{out}");
    assert_eq!(reg.get("/v2/cli/app/manifests/v1").await.status(), 200);
    let (ok, out, _) = cli(&["history", "cli/app:v1", "--url", &url]);
    assert!(ok && out.contains("delete") && out.contains("restore"), "{out}");
    // A refusal is an error exit with the registry's message.
    let (ok, _, err) = cli(&["restore", &format!("cli/app@{}", img.digest), "--url", &url]);
    assert!(!ok && err.contains("not deleted"), "{err}");
    let (ok, _, err) =
        cli(&["tags", "revert", "cli/app:v1", "--previous", "--to", img.digest.as_str(), "--url", &url]);
    assert!(!ok && err.contains("exactly one"), "{err}");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_opens_an_embedded_deployment_directly() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = reg.push_image("direct/app", "v1", 420).await;
    let data_dir = reg.app.config.data_dir.clone();
    let dir = reg.stop().await;
    let data = data_dir.to_str().unwrap();
    let (ok, out, err) = cli(&["delete", &format!("direct/app@{}", img.digest), "--data-dir", data]);
    assert!(ok, "{err}");
    assert!(out.contains("v1"), "{out}");
    let (ok, out, err) = cli(&["tombstones", "direct/app", "--data-dir", data, "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tombstones"][0]["digest"], img.digest.as_str());
    assert!(v["tombstones"][0]["deleted_by"].as_str().unwrap().starts_with("local:"));
    let (ok, _, err) = cli(&["restore", &format!("direct/app@{}", img.digest), "--data-dir", data]);
    assert!(ok, "{err}");
    let mut config = berth::config::Config::embedded(&data_dir);
    config.storage_fsync = false;
    let reg = TestRegistry::start_with(config, dir).await;
    assert_eq!(reg.get("/v2/direct/app/manifests/v1").await.bytes().await.unwrap(), img.manifest);
}

// `--config` opens the deployment a configuration file describes — here the scale-out one,
// PostgreSQL and S3 — next to the running replica, which sees the change at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_opens_a_scale_out_deployment_with_its_config_file() {
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let img = reg.push_image("cfg/app", "v1", 430).await;
    let toml = scale_out_toml(&reg.app.config);
    let file = reg.dir.path().join("berth.toml");
    std::fs::write(&file, toml).unwrap();
    let file = file.to_str().unwrap();
    let (ok, out, err) =
        cli(&["delete", "--dry-run", &format!("cfg/app@{}", img.digest), "--config", file, "--json"]);
    assert!(ok, "{err}");
    let preview: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(preview["tags"], json!(["v1"]));
    let (ok, _, err) = cli(&["delete", "cfg/app:v1", "--config", file]);
    assert!(ok, "{err}");
    assert_eq!(reg.get("/v2/cfg/app/manifests/v1").await.status(), 404);
    let (ok, _, err) = cli(&["restore", "cfg/app:v1", "--config", file]);
    assert!(ok, "{err}");
    assert_eq!(reg.get("/v2/cfg/app/manifests/v1").await.bytes().await.unwrap(), img.manifest);
}
