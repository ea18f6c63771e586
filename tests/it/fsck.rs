//! `berth fsck`: a consistent deployment is reported clean; missing bytes, wrong sizes, wrong
//! content (with --rehash) and broken references are problems; objects nothing accounts for are
//! listed as reclaimable leftovers, not as problems.

use std::process::Command;

use berth::oci::Digest;

use crate::backend_test;
use crate::harness::*;

async fn fsck(reg: &TestRegistry, rehash: bool) -> berth::registry::FsckReport {
    reg.app.registry.fsck(rehash, &|_, _| {}).await.unwrap()
}

backend_test!(fsck_reports_problems_and_leftovers, |reg| {
    let img = reg.push_image("fsck/app", "v1", 900).await;
    // A chunked upload still open is accounted for by its session.
    let loc = reg.start_upload("fsck/app").await;
    reg.patch_chunk(&loc, &random_bytes(901, 1000), 0, 1000).await;
    let report = fsck(&reg, true).await;
    assert!(report.clean(), "{report:?}");
    assert_eq!(report.blobs_checked, 3);
    assert!(report.orphans.is_empty(), "{:?}", report.orphans);

    // Bytes written and never recorded (a crash between the two): a leftover, not a problem.
    reg.leave_unrecorded_bytes("orphan-session", 500).await;
    let blobs = reg.app.registry.blobs();
    let report = fsck(&reg, false).await;
    assert!(report.clean(), "{report:?}");
    assert_eq!(report.orphans.len(), 1, "{:?}", report.orphans);
    assert_eq!(report.orphan_bytes, 500);

    // A layer's bytes gone: a problem naming the blob.
    let layer = Digest::sha256_of(&img.layers[0]);
    blobs.delete(&reg.storage_key(&layer).await).await.unwrap();
    let report = fsck(&reg, false).await;
    assert!(!report.clean());
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert_eq!(
        (report.problems[0].kind, report.problems[0].subject.as_str()),
        ("blob-missing", layer.as_str())
    );

    // A tag left on a tombstone: a broken reference.
    let sql = reg.sql().await;
    sqlx::query("UPDATE manifests SET deleted_at = 1 WHERE digest = $1")
        .bind(img.digest.as_str())
        .execute(&sql)
        .await
        .unwrap();
    let report = fsck(&reg, false).await;
    assert!(report.problems.iter().any(|p| p.kind == "tag-on-tombstone" && p.subject == "v1"), "{report:?}");
});

backend_test!(fsck_checks_the_collector_queues_and_repair_mends_what_is_safe, |reg| {
    let img = reg.push_image("fsck/queues", "v1", 920).await;
    let unused = reg.upload_blob("fsck/queues", &random_bytes(921, 400)).await;
    let layer = Digest::sha256_of(&img.layers[0]);
    let layer_key = reg.storage_key(&layer).await;
    let sql = reg.sql().await;
    // A lost review, a review of a row that is gone, and — the dangerous one — an outbox entry
    // naming bytes a live image uses.
    sqlx::query(
        "DELETE FROM gc_reviews WHERE kind = 'blob' AND item_id = (SELECT id FROM blobs WHERE digest = $1)",
    )
    .bind(unused.as_str())
    .execute(&sql)
    .await
    .unwrap();
    sqlx::query("INSERT INTO gc_reviews (kind, item_id, review_after) VALUES ('manifest', 999999, 0)")
        .execute(&sql)
        .await
        .unwrap();
    sqlx::query("INSERT INTO gc_outbox (storage_key, enqueued_at, next_attempt) VALUES ($1, 0, $2)")
        .bind(&layer_key)
        .bind(i64::MAX / 2)
        .execute(&sql)
        .await
        .unwrap();
    let report = fsck(&reg, false).await;
    let kinds = |f: &[berth::meta::Finding]| f.iter().map(|f| f.kind).collect::<Vec<_>>();
    assert_eq!(kinds(&report.problems), ["outbox-names-live-blob"], "{report:?}");
    let warnings = kinds(&report.warnings);
    for kind in ["review-of-missing-row", "reviews-overdue", "not-queued"] {
        assert!(warnings.contains(&kind), "{kind} in {report:?}");
    }
    let orphan = reg.leave_unrecorded_bytes("fsck-orphan", 300).await;

    // Repair leaves the young orphan (its row may be on its way) …
    let repaired = reg.app.registry.repair().await.unwrap();
    assert_eq!((repaired.outbox_entries_dropped, repaired.stale_reviews_dropped), (1, 1), "{repaired:?}");
    assert_eq!((repaired.rows_requeued, repaired.orphans_removed), (1, 0), "{repaired:?}");
    let report = fsck(&reg, true).await;
    assert!(report.clean() && report.warnings.is_empty(), "{report:?}");
    assert_eq!(report.orphans, std::slice::from_ref(&orphan));
    // … and deletes it once it is older than blob_grace, and nothing else.
    reg.app.registry.clock().advance_ms(24 * 3600 * 1000 + 60_000);
    let repaired = reg.app.registry.repair().await.unwrap();
    assert_eq!((repaired.orphans_removed, repaired.orphan_bytes), (1, 300), "{repaired:?}");
    let report = fsck(&reg, true).await;
    assert!(report.clean() && report.orphans.is_empty(), "{report:?}");
    let res = reg.get(&format!("/v2/fsck/queues/blobs/{layer}")).await;
    assert_eq!(res.bytes().await.unwrap().as_ref(), img.layers[0].as_slice());
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_rehash_finds_changed_bytes_and_the_cli_exit_status_says_so() {
    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = reg.push_image("fsck/cli", "v1", 910).await;
    let layer = Digest::sha256_of(&img.layers[1]);
    let path = reg.app.config.storage_path.join(reg.storage_key(&layer).await);
    let data_dir = reg.app.config.data_dir.clone();
    let _dir = reg.stop().await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("fsck")
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("BERTH_CONFIG")
            .output()
            .unwrap()
    };
    let out = run(&["--rehash"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("consistent"));
    // Not on a terminal: progress comes as plain lines on stderr, ending with what was done.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("checked 3 blobs") && progress.contains(" s"), "{progress}");

    // Same size, other bytes: only a re-hash can tell.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(run(&[]).status.success(), "sizes still match");
    let out = run(&["--rehash", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"][0]["kind"], "blob-content");
    assert_eq!(report["problems"][0]["subject"], layer.as_str());
    // Repair never rewrites bytes: changed content stays a problem.
    let out = run(&["--rehash", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["repaired"]["orphans_removed"], 0);
    assert_eq!(report["problems"][0]["kind"], "blob-content");
}
