//! `gc explain`: every hold on a manifest or a blob, when each ends, and when the collector
//! takes the item if nothing changes — checked against what the collector then does. And
//! `gc status`: queues, passes, the sweep's and the scrub's progress and findings.

use std::process::Command;

use berth::oci::Digest;
use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_test;
use crate::harness::*;

const HOUR: i64 = 3600 * 1000;
const DAY: i64 = 24 * HOUR;

async fn explain(reg: &TestRegistry, target: &str) -> Value {
    let (status, v) = reg.admin(Method::GET, &format!("explain/{target}"), None).await;
    assert_eq!(status, 200, "{target}: {v}");
    v
}

fn holds(v: &Value) -> Vec<(String, String)> {
    v["holds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["reason"].as_str().unwrap().to_string(), h["detail"].as_str().unwrap().to_string()))
        .collect()
}

backend_test!(explain_says_what_holds_an_item_and_when_it_goes, |reg| {
    let img = reg.push_image("ex/app", "v1", 1500).await;
    let manifest = format!("ex/app@{}", img.digest);
    let layer = Digest::sha256_of(&img.layers[0]);

    // Tagged: held by its tag, for as long as the tag stays.
    let v = explain(&reg, &manifest).await;
    assert_eq!((v["kind"].as_str(), v["state"].as_str()), (Some("manifest"), Some("live")));
    assert_eq!(holds(&v), [("tag".to_string(), "v1".to_string())]);
    assert_eq!((v["collect_at"].clone(), v["due"].clone()), (Value::Null, json!(false)));
    // Its layer: referenced by it, linked where it is referenced.
    let v = explain(&reg, layer.as_str()).await;
    assert_eq!(v["state"], "live");
    assert_eq!(v["size"], img.layers[0].len());
    assert!(holds(&v).contains(&("referenced-by".to_string(), manifest.clone())), "{v}");
    assert_eq!(v["links"], json!([{"repository": "ex/app", "referenced": true}]));
    assert_eq!(v["collect_at"], Value::Null);

    // Deleted: a tombstone held by its restore window, the layer by the tombstone.
    let res = reg.req(Method::DELETE, &format!("/v2/ex/app/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let v = explain(&reg, &manifest).await;
    assert_eq!(v["state"], "tombstone");
    assert_eq!(holds(&v)[0].0, "restore-window");
    let window_end = v["collect_at"].as_i64().unwrap();
    let now = reg.app.registry.clock().now_ms();
    assert!((window_end - now - 7 * DAY).abs() < 60_000, "{v}");
    // A review is queued for no later than that (the push queued one for its own untagged grace,
    // which ends earlier here; a review that comes early reschedules itself).
    let review_at = v["review_at"].as_i64().unwrap();
    assert!(review_at <= window_end && review_at > now, "{v}");
    let v = explain(&reg, layer.as_str()).await;
    assert_eq!(holds(&v)[0], ("referenced-by".to_string(), format!("{manifest} (deleted)")));
    assert_eq!(v["collect_at"].as_i64(), Some(window_end));

    // The collector agrees: nothing goes a minute before, both go a minute after.
    reg.app.registry.clock().advance_ms(window_end - reg.app.registry.clock().now_ms() - 60_000);
    assert_eq!(explain(&reg, &manifest).await["due"], false);
    assert_eq!(reg.app.registry.collect(1000).await.unwrap().manifests, 0);
    reg.app.registry.clock().advance_ms(120_000);
    assert_eq!(explain(&reg, &manifest).await["due"], true);
    let pass = reg.app.registry.collect(1000).await.unwrap();
    assert_eq!((pass.manifests, pass.blobs), (1, 3), "{pass:?}");
    assert_eq!(explain(&reg, &manifest).await["state"], "gone");
    assert_eq!(explain(&reg, layer.as_str()).await["state"], "gone");
});

backend_test!(explain_covers_grace_windows_indexes_and_loose_links, |reg| {
    // An untagged manifest: its grace runs from the push, and a pull moves it.
    let child = reg.push_image("ex/idx", "c", 1510).await;
    let res = reg.req(Method::DELETE, "/v2/ex/idx/manifests/c").send().await.unwrap();
    assert_eq!(res.status(), 202);
    let target = format!("ex/idx@{}", child.digest);
    let v = explain(&reg, &target).await;
    assert_eq!(holds(&v)[0].0, "untagged-grace");
    let first = v["collect_at"].as_i64().unwrap();
    reg.app.registry.clock().advance_ms(DAY);
    assert_eq!(reg.get(&format!("/v2/ex/idx/manifests/{}", child.digest)).await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    let v = explain(&reg, &target).await;
    assert!(v["collect_at"].as_i64().unwrap() >= first + DAY - 1000, "the pull extended the grace: {v}");

    // Listed by a live index: held by it, with no end of its own.
    let (index, _) = reg.push_index("ex/idx", "multi", &[&child]).await;
    let v = explain(&reg, &target).await;
    assert!(holds(&v).contains(&("index".to_string(), format!("ex/idx@{index}"))), "{v}");
    assert_eq!(v["collect_at"], Value::Null);

    // Deleted, the index still holds its child while it can be restored.
    let res = reg.req(Method::DELETE, &format!("/v2/ex/idx/manifests/{index}")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let v = explain(&reg, &target).await;
    let held = v["holds"].as_array().unwrap().iter().find(|h| h["reason"] == "index").cloned().unwrap();
    assert_eq!(held["detail"], format!("ex/idx@{index} (deleted)"));
    assert!(held["until"].as_i64().is_some(), "{v}");

    // A referrer (an SBOM) is held by its live subject.
    let subject = reg.push_image("ex/ref", "s", 1512).await;
    let sbom_digest = crate::gc::push_referrer(&reg, "ex/ref", &subject, 1513).await;
    let v = explain(&reg, &format!("ex/ref@{sbom_digest}")).await;
    assert!(holds(&v).contains(&("subject".to_string(), format!("ex/ref@{}", subject.digest))), "{v}");
    assert_eq!(v["collect_at"], Value::Null);

    // A blob uploaded and never used: its grace, and its link's.
    let data = random_bytes(1511, 700);
    let blob = reg.upload_blob("ex/loose", &data).await;
    let v = explain(&reg, blob.as_str()).await;
    assert_eq!(holds(&v)[0].0, "blob-grace");
    let grace_end = v["collect_at"].as_i64().unwrap();
    assert_eq!(v["links"][0]["repository"], "ex/loose");
    assert_eq!(v["links"][0]["referenced"], false);
    assert_eq!(v["links"][0]["until"].as_i64(), Some(grace_end));
    reg.app.registry.clock().advance_ms(grace_end - reg.app.registry.clock().now_ms() + 1000);
    assert_eq!(explain(&reg, blob.as_str()).await["due"], true);
    assert_eq!(reg.app.registry.collect(1000).await.unwrap().blobs, 1);

    // Bad names are refused the way the API refuses them elsewhere.
    let (status, v) = reg.admin(Method::GET, "explain/Not-A-Repo@sha256:00", None).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = reg.admin(Method::GET, "explain/sha256:xyz", None).await;
    assert_eq!((status, v["errors"][0]["code"].as_str()), (400, Some("DIGEST_INVALID")), "{v}");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_explains_in_words() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = reg.push_image("ex/cli", "v1", 1520).await;
    // Runs `berth gc ARGS… --url` against the registry; answers its output.
    let gc = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("gc")
            .args(args)
            .args(["--url", &reg.url("")])
            .env_remove("BERTH_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = gc(&["explain", &format!("ex/cli@{}", img.digest)]);
    assert!(text.contains("is live") && text.contains("held: tag v1"), "{text}");
    assert!(text.contains("not collected while"), "{text}");
    let text = gc(&["status"]);
    assert!(text.contains("queue blob") && text.contains("outbox: 0 keys"), "{text}");
    assert!(text.contains("the scrub has found nothing wrong"), "{text}");
    let text = gc(&["space", "ex/cli"]);
    assert!(text.starts_with("ex/cli: 3 blobs") && text.contains("held by this repository alone"), "{text}");
}

async fn status(reg: &TestRegistry) -> Value {
    let (code, v) = reg.admin(Method::GET, "gc/status", None).await;
    assert_eq!(code, 200, "{v}");
    v
}

backend_test!(gc_status_shows_queues_passes_progress_and_findings, |reg| {
    let gone = reg.push_image("st/app", "a", 1530).await;
    let kept = reg.push_image("st/app", "b", 1531).await;
    let res = reg.req(Method::DELETE, &format!("/v2/st/app/manifests/{}", gone.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let v = status(&reg).await;
    let queued = |v: &Value, kind: &str, field: &str| {
        v["queue"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["kind"] == kind)
            .map_or(0, |q| q[field].as_i64().unwrap())
    };
    assert!(queued(&v, "manifest", "queued") >= 1 && queued(&v, "blob", "queued") >= 1, "{v}");
    assert_eq!((queued(&v, "manifest", "due"), queued(&v, "blob", "due")), (0, 0), "{v}");
    assert_eq!(v["passes"], json!([]));

    // A week later, unattended: everything due, and overdue.
    reg.app.registry.clock().advance_ms(8 * DAY);
    let v = status(&reg).await;
    assert!(queued(&v, "manifest", "overdue") >= 1, "{v}");
    assert!(v["queue"][0]["oldest_due_ms"].as_i64().unwrap() > HOUR, "{v}");
    let pass = reg.app.registry.collect(1000).await.unwrap();
    let v = status(&reg).await;
    assert_eq!(v["passes"][0]["replica"], reg.app.registry.instance());
    assert_eq!(v["passes"][0]["manifests"].as_u64(), Some(pass.manifests));
    assert_eq!(v["passes"][0]["blobs"].as_u64(), Some(pass.blobs));
    assert_eq!((queued(&v, "manifest", "due"), queued(&v, "blob", "due")), (0, 0), "{v}");
    assert_eq!(v["outbox"]["keys"], 0);

    // The sweep's progress and the scrub's findings.
    let layer = Digest::sha256_of(&kept.layers[0]);
    reg.app.registry.blobs().delete(&reg.storage_key(&layer).await).await.unwrap();
    reg.app.registry.sweep_step().await.unwrap();
    reg.app.registry.scrub_step(1, 1000).await.unwrap();
    let v = status(&reg).await;
    let progress: Vec<&str> =
        v["progress"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(progress.contains(&"sweep-storage") && progress.contains(&"scrub"), "{v}");
    assert_eq!(v["findings"][0]["kind"], "blob-missing", "{v}");
    assert_eq!(v["findings"][0]["subject"], layer.as_str());
});

/// Sum of the sizes of every stored object (no upload session is open when it is called).
async fn bytes_in_storage(reg: &TestRegistry) -> u64 {
    let (mut after, mut total) = (String::new(), 0);
    loop {
        let page = reg.app.registry.blobs().list_page(&after, 1000).await.unwrap();
        total += page.iter().map(|o| o.size).sum::<u64>();
        match page.last() {
            Some(last) if page.len() == 1000 => after = last.key.clone(),
            _ => return total,
        }
    }
}

async fn space(reg: &TestRegistry, repo: Option<&str>) -> Value {
    let path = repo.map_or("space".to_string(), |r| format!("space/{r}"));
    let (code, v) = reg.admin(Method::GET, &path, None).await;
    assert_eq!(code, 200, "{v}");
    v
}

fn total(blobs: &[&[u8]]) -> u64 {
    blobs.iter().map(|b| b.len() as u64).sum()
}

// Where the space goes, exactly: each state's bytes from the rows, the total equal to the bytes
// in storage (files on disk, objects in the bucket) through pushes, shared layers, deletes,
// restores and collection.
backend_test!(space_accounting_matches_storage_and_the_collector, |reg| {
    let a = reg.push_image("sp/a", "a", 1700).await;
    // sp/b shares a's first layer and has its own config and layer.
    let shared = &a.layers[0];
    reg.upload_blob("sp/b", shared).await;
    let b_own = random_bytes(1701, 4000);
    let b_config = br#"{"b":true}"#.to_vec();
    reg.upload_blob("sp/b", &b_own).await;
    reg.upload_blob("sp/b", &b_config).await;
    let b_manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": Digest::sha256_of(&b_config).as_str(), "size": b_config.len()},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": Digest::sha256_of(shared).as_str(), "size": shared.len()},
            {"mediaType": OCI_LAYER, "digest": Digest::sha256_of(&b_own).as_str(), "size": b_own.len()},
        ],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("sp/b", "b", OCI_MANIFEST, &b_manifest).await.status(), 201);
    // In sp/a: an image deleted (its blobs held by the tombstone), an unused upload (in grace).
    let c = reg.push_image("sp/a", "c", 1702).await;
    let res = reg.req(Method::DELETE, &format!("/v2/sp/a/manifests/{}", c.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let unused = random_bytes(1703, 900);
    reg.upload_blob("sp/a", &unused).await;
    // A delete restored: live again.
    let res = reg.req(Method::DELETE, &format!("/v2/sp/a/manifests/{}", a.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let (code, v) = reg.admin(Method::POST, &format!("restore/sp/a@{}", a.digest), None).await;
    assert_eq!(code, 200, "{v}");

    let a_blobs = total(&[&a.config, &a.layers[0], &a.layers[1]]);
    let c_blobs = total(&[&c.config, &c.layers[0], &c.layers[1]]);
    let b_blobs = total(&[&b_config, &b_own]);
    let v = space(&reg, Some("sp/a")).await;
    assert_eq!(v["bytes_live"], a_blobs, "{v}");
    assert_eq!(v["bytes_in_tombstones"], c_blobs, "{v}");
    assert_eq!(v["bytes_in_grace"], unused.len(), "{v}");
    assert_eq!((v["bytes_live_elsewhere"].as_u64(), v["bytes_pending_reclaim"].as_u64()), (Some(0), Some(0)));
    assert_eq!(v["bytes_exclusive"], a_blobs - shared.len() as u64 + c_blobs + unused.len() as u64, "{v}");
    let v = space(&reg, Some("sp/b")).await;
    assert_eq!(v["bytes_live"], b_blobs + shared.len() as u64, "{v}");
    assert_eq!(v["bytes_exclusive"], b_blobs, "{v}");
    let all = space(&reg, None).await;
    assert_eq!(all["bytes_stored"], a_blobs + b_blobs + c_blobs + unused.len() as u64, "{all}");
    assert_eq!(all["bytes_stored"], bytes_in_storage(&reg).await);

    // A day on: the unused blob is due, and the collector frees exactly that.
    reg.app.registry.clock().advance_ms(DAY + HOUR);
    let v = space(&reg, Some("sp/a")).await;
    assert_eq!(
        (v["bytes_in_grace"].as_u64(), v["bytes_pending_reclaim"].as_u64()),
        (Some(0), Some(unused.len() as u64))
    );
    let schedule = v["reclaim_schedule"].as_array().unwrap();
    assert_eq!(schedule.len(), 1, "{v}");
    assert_eq!(schedule[0][1], c_blobs, "the tombstone's blobs, when its window ends");
    let pass = reg.app.registry.collect(1000).await.unwrap();
    assert_eq!(pass.bytes, unused.len() as u64);
    let all = space(&reg, None).await;
    assert_eq!(all["bytes_stored"], bytes_in_storage(&reg).await);
    assert_eq!(all["bytes_pending_reclaim"], 0);

    // A week on: the tombstone's blobs are due, then gone; what is left is what lives.
    reg.app.registry.clock().advance_ms(7 * DAY);
    assert_eq!(space(&reg, Some("sp/a")).await["bytes_pending_reclaim"], c_blobs);
    reg.app.registry.collect(1000).await.unwrap();
    let all = space(&reg, None).await;
    assert_eq!(all["bytes_stored"], a_blobs + b_blobs);
    assert_eq!(all["bytes_live"], a_blobs + b_blobs);
    assert_eq!(all["bytes_stored"], bytes_in_storage(&reg).await);
});
