//! Every path that makes a manifest live again locks, then checks (issue 24): a deleted index
//! brought back by its tag comes back with its children; restores and purges racing on
//! PostgreSQL serialize on the manifest's row (made deterministic by holding that row's lock from
//! a third connection); the collector never collects a tombstone a live index lists, keeps a
//! margin over the batched `HEAD` writer, and `fsck` sees, from the payloads, what a wrong path
//! could leave.

use std::time::Duration;

use berth::meta::{RetentionDelete, RevertTarget};
use berth::oci::{Digest, RepoName, Tag};
use reqwest::Method;
use sqlx::Connection as _;

use crate::backend_test;
use crate::harness::*;

const DAY: i64 = 24 * 3600 * 1000;

fn blob_digests(img: &PushedImage) -> Vec<Digest> {
    std::iter::once(&img.config).chain(&img.layers).map(|b| Digest::sha256_of(b)).collect()
}

/// Asserts that `img` of `repo` can be pulled completely: the manifest by digest and every blob.
async fn assert_pullable(reg: &TestRegistry, repo: &str, img: &PushedImage) {
    let res = reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await;
    assert_eq!(res.status(), 200, "{repo}@{}", img.digest);
    for d in blob_digests(img) {
        assert_eq!(reg.get(&format!("/v2/{repo}/blobs/{d}")).await.status(), 200, "{repo} blob {d}");
    }
}

async fn fsck_problems(reg: &TestRegistry) -> Vec<berth::meta::Finding> {
    reg.app.registry.fsck(false, &|_, _| {}).await.unwrap().problems
}

/// Two images and an index `all` over them in `repo`; then the index and both images deleted by
/// digest (allowed: a tombstoned index holds nothing live).
async fn index_deleted_then_its_children(
    reg: &TestRegistry,
    repo: &str,
    seed: u64,
) -> (PushedImage, PushedImage, Digest) {
    let amd = reg.push_image(repo, "amd", seed).await;
    let arm = reg.push_image(repo, "arm", seed + 10).await;
    let (index, _) = reg.push_index(repo, "all", &[&amd, &arm]).await;
    for d in [&index, &amd.digest, &arm.digest] {
        let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{d}")).send().await.unwrap();
        assert_eq!(res.status(), 202, "delete {d}");
    }
    (amd, arm, index)
}

backend_test!(an_index_brought_back_by_its_tag_comes_back_with_its_children, |reg| {
    let ways = ["restore", "revert-to", "revert-previous"];
    let mut cases = Vec::new();
    for (i, way) in ways.iter().enumerate() {
        let repo = format!("revive/{way}");
        let (amd, arm, index) = index_deleted_then_its_children(&reg, &repo, 7000 + 100 * i as u64).await;
        let name = RepoName::parse(&repo).unwrap();
        let all = Tag::parse("all").unwrap();
        let registry = &reg.app.registry;
        let digest = match *way {
            "restore" => registry.restore_tag(&name, &all, false, Some("admin")).await.unwrap(),
            "revert-to" => {
                registry.revert_tag(&name, &all, RevertTarget::Digest(&index), None).await.unwrap()
            }
            _ => registry.revert_tag(&name, &all, RevertTarget::Previous, None).await.unwrap(),
        };
        assert_eq!(digest, index.as_str(), "{way}");
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/all")).await.status(), 200, "{way}");
        assert_pullable(&reg, &repo, &amd).await;
        assert_pullable(&reg, &repo, &arm).await;
        // Only the tag named comes back on the index; the children get back the tags their own
        // deletes took, as a restore by digest gives them.
        assert_eq!(reg.tags_of(&repo).await, serde_json::json!(["all", "amd", "arm"]), "{way}");
        cases.push((repo, amd, arm));
    }
    assert!(fsck_problems(&reg).await.is_empty());
    // Long after every window, the collector has taken nothing the index needs.
    reg.advance(60 * DAY);
    reg.app.registry.collect(100_000).await.unwrap();
    for (repo, amd, arm) in &cases {
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/all")).await.status(), 200);
        assert_pullable(&reg, repo, amd).await;
        assert_pullable(&reg, repo, arm).await;
    }
    let problems = fsck_problems(&reg).await;
    assert!(problems.is_empty(), "{problems:?}");
});

backend_test!(a_tag_restore_onto_an_index_whose_child_cannot_come_back_is_refused, |reg| {
    let repo = "revive/refused";
    let (amd, _arm, _index) = index_deleted_then_its_children(&reg, repo, 7500).await;
    // The child's layer is unlinked: the child can no longer be restored, so neither can the
    // index that lists it.
    let layer = Digest::sha256_of(&amd.layers[0]);
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/blobs/{layer}")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let name = RepoName::parse(repo).unwrap();
    let err =
        reg.app.registry.restore_tag(&name, &Tag::parse("all").unwrap(), false, None).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains(amd.digest.as_str()) && message.contains("cannot be restored"), "{message}");
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/all")).await.status(), 404);
    assert_eq!(reg.tags_of(repo).await, serde_json::json!([]));
    assert!(fsck_problems(&reg).await.is_empty());
});

backend_test!(the_collector_never_takes_a_tombstone_a_live_index_lists, |reg| {
    // A state no correct path leaves (a live index listing a tombstone), made by hand: the
    // collector must not turn it into lost data, nor mark the live index unrestorable.
    let repo = "revive/guard";
    let amd = reg.push_image(repo, "amd", 7600).await;
    let arm = reg.push_image(repo, "arm", 7610).await;
    let (index, _) = reg.push_index(repo, "all", &[&amd, &arm]).await;
    let sql = reg.sql().await;
    sqlx::query("UPDATE manifests SET deleted_at = $1, deleted_why = 'deleted' WHERE digest = $2")
        .bind(reg.app.registry.clock().now_ms())
        .bind(amd.digest.as_str())
        .execute(&sql)
        .await
        .unwrap();
    sqlx::query("DELETE FROM tags WHERE name = 'amd'").execute(&sql).await.unwrap();
    let problems = fsck_problems(&reg).await;
    let kinds: Vec<&str> = problems.iter().map(|p| p.kind).collect();
    assert!(
        kinds.contains(&"index-child-deleted") && kinds.contains(&"payload-child-missing"),
        "{problems:?}"
    );
    reg.advance(60 * DAY);
    reg.app.registry.collect(100_000).await.unwrap();
    let (unrestorable,): (Option<String>,) =
        sqlx::query_as("SELECT unrestorable FROM manifests WHERE digest = $1")
            .bind(index.as_str())
            .fetch_one(&sql)
            .await
            .unwrap();
    assert_eq!(unrestorable, None, "a live index was marked unrestorable");
    for d in blob_digests(&amd) {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
            .bind(d.as_str())
            .fetch_one(&sql)
            .await
            .unwrap();
        assert_eq!(n, 1, "blob {d} of the listed tombstone was collected");
    }
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM manifests WHERE digest = $1")
        .bind(amd.digest.as_str())
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(n, 1, "the listed tombstone was collected");
});

backend_test!(fsck_reads_what_a_manifest_references_from_its_payload, |reg| {
    let repo = "revive/fsck";
    let amd = reg.push_image(repo, "amd", 7700).await;
    let (index, _) = reg.push_index(repo, "all", &[&amd]).await;
    let img = reg.push_image(repo, "img", 7710).await;
    assert!(fsck_problems(&reg).await.is_empty());
    let sql = reg.sql().await;
    // What a wrong path could leave: the child gone with its join rows, a layer's link and
    // reference rows gone, a live manifest marked unrestorable. No join row is left to find any
    // of it by.
    for stmt in [
        "DELETE FROM manifest_children WHERE child_id IN (SELECT id FROM manifests WHERE digest = $1)",
        "DELETE FROM tags WHERE manifest_id IN (SELECT id FROM manifests WHERE digest = $1)",
        "DELETE FROM manifest_blobs WHERE manifest_id IN (SELECT id FROM manifests WHERE digest = $1)",
        "DELETE FROM manifests WHERE digest = $1",
    ] {
        sqlx::query(stmt).bind(amd.digest.as_str()).execute(&sql).await.unwrap();
    }
    let layer = Digest::sha256_of(&img.layers[1]);
    for stmt in [
        "DELETE FROM manifest_blobs WHERE blob_id IN (SELECT id FROM blobs WHERE digest = $1)",
        "DELETE FROM repository_blobs WHERE blob_id IN (SELECT id FROM blobs WHERE digest = $1)",
    ] {
        sqlx::query(stmt).bind(layer.as_str()).execute(&sql).await.unwrap();
    }
    sqlx::query("UPDATE manifests SET unrestorable = 'by hand' WHERE digest = $1")
        .bind(img.digest.as_str())
        .execute(&sql)
        .await
        .unwrap();
    let problems = fsck_problems(&reg).await;
    let has = |kind: &str, subject: &Digest, needle: &str| {
        problems.iter().any(|p| p.kind == kind && p.subject == subject.as_str() && p.detail.contains(needle))
    };
    assert!(has("payload-child-missing", &index, amd.digest.as_str()), "{problems:?}");
    assert!(has("payload-blob-missing", &img.digest, layer.as_str()), "{problems:?}");
    assert!(has("live-manifest-unrestorable", &img.digest, "by hand"), "{problems:?}");
    // Repair never "repairs" by deleting a live manifest.
    reg.app.registry.repair().await.unwrap();
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{index}")).await.status(), 200);
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 200);
});

/// A connection to the registry's PostgreSQL database holding one row lock, and a way to wait
/// until `n` other backends wait on locks.
pub(crate) struct LockHolder {
    conn: sqlx::PgConnection,
    watch: sqlx::PgConnection,
}

impl LockHolder {
    pub(crate) async fn lock(reg: &TestRegistry, statement: &str, digest: &Digest) -> Self {
        Self::lock_on(reg, statement, digest.as_str()).await
    }

    /// Runs `statement` (one row, `$1` = `value`) in a transaction left open.
    pub(crate) async fn lock_on(reg: &TestRegistry, statement: &str, value: &str) -> Self {
        let url = &reg.app.config.metadata_url;
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        let watch = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        let locked = sqlx::query(statement).bind(value).fetch_all(&mut conn).await.unwrap();
        assert_eq!(locked.len(), 1, "{statement}");
        LockHolder { conn, watch }
    }

    pub(crate) async fn wait_for_waiters(&mut self, n: i64) {
        for _ in 0..500 {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut self.watch)
            .await
            .unwrap();
            if waiting >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {n} transactions ever waited for the held lock");
    }

    pub(crate) async fn release(mut self) {
        sqlx::query("COMMIT").execute(&mut self.conn).await.unwrap();
    }

    /// Ends the holding transaction without its writes.
    pub(crate) async fn roll_back(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.conn).await.unwrap();
    }
}

/// On PostgreSQL only (the lock points are PostgreSQL's; SQLite's one writer serializes these).
async fn postgres_registry() -> Option<TestRegistry> {
    let reg = TestRegistry::try_start(Backend::Postgres).await?;
    assert!(reg.on_postgres());
    Some(reg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_waiting_behind_a_purge_sees_the_purge() {
    let Some(reg) = postgres_registry().await else { return };
    let repo = "race/restore";
    let img = reg.push_image(repo, "v1", 7800).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    // Hold the tombstone's row; the purge queues on it first, the restore second.
    let mut holder =
        LockHolder::lock(&reg, "SELECT id FROM manifests WHERE digest = $1 FOR UPDATE", &img.digest).await;
    let registry = reg.app.registry.clone();
    let layer = Digest::sha256_of(&img.layers[0]);
    let purge = tokio::spawn(async move { registry.purge_blob(&layer, "a secret", Some("admin")).await });
    holder.wait_for_waiters(1).await;
    let registry = reg.app.registry.clone();
    let (name, digest) = (RepoName::parse(repo).unwrap(), img.digest.clone());
    let restore = tokio::spawn(async move { registry.restore_manifest(&name, &digest, false, None).await });
    holder.wait_for_waiters(2).await;
    holder.release().await;
    purge.await.unwrap().expect("the purge");
    let err = restore.await.unwrap().expect_err("a restore of a purged manifest must be refused");
    assert!(err.to_string().contains("cannot be restored"), "{err}");
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/v1")).await.status(), 404);
    let problems = fsck_problems(&reg).await;
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_sees_an_index_pushed_while_it_waited() {
    let Some(reg) = postgres_registry().await else { return };
    let repo = "race/purge";
    let img = reg.push_image(repo, "v1", 7900).await;
    // An in-flight push elsewhere share-locks the image; the purge must wait for its own lock
    // on the image before it reads which indexes list it.
    let mut holder =
        LockHolder::lock(&reg, "SELECT id FROM manifests WHERE digest = $1 FOR SHARE", &img.digest).await;
    let registry = reg.app.registry.clone();
    let layer = Digest::sha256_of(&img.layers[0]);
    let purge = tokio::spawn(async move { registry.purge_blob(&layer, "a secret", Some("admin")).await });
    holder.wait_for_waiters(1).await;
    // An index over the image, pushed while the purge waits.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.manifest.len()}],
    }))
    .unwrap();
    let index_digest = Digest::sha256_of(&index);
    let url = reg.url(&format!("/v2/{repo}/manifests/all"));
    let client = reg.client.clone();
    let push = tokio::spawn(async move {
        client.put(url).header("content-type", OCI_INDEX).body(index).send().await.unwrap().status()
    });
    // The push either completes (its share lock is compatible with the one held) or queues.
    for _ in 0..100 {
        if push.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.release().await;
    let purged = purge.await.unwrap().expect("the purge");
    let pushed = push.await.unwrap();
    if pushed == 201 {
        // The index came in before the purge read the image's parents: it is purged too.
        assert!(
            purged.purged.manifests.iter().any(|m| m.digest == index_digest.as_str()),
            "the purge missed the index pushed while it waited: {:?}",
            purged.purged.manifests
        );
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/all")).await.status(), 404);
    } else {
        assert_eq!(pushed, 400, "a push after the purge finds the image gone");
    }
    let problems = fsck_problems(&reg).await;
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_restore_racing_a_purge_never_leaves_a_tag_on_a_tombstone() {
    let Some(reg) = postgres_registry().await else { return };
    let repo = "race/tag";
    let img = reg.push_image(repo, "v1", 8000).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/v1")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let mut holder =
        LockHolder::lock(&reg, "SELECT id FROM manifests WHERE digest = $1 FOR UPDATE", &img.digest).await;
    let registry = reg.app.registry.clone();
    let layer = Digest::sha256_of(&img.layers[0]);
    let purge = tokio::spawn(async move { registry.purge_blob(&layer, "a secret", Some("admin")).await });
    holder.wait_for_waiters(1).await;
    let registry = reg.app.registry.clone();
    let name = RepoName::parse(repo).unwrap();
    let restore =
        tokio::spawn(
            async move { registry.restore_tag(&name, &Tag::parse("v1").unwrap(), false, None).await },
        );
    holder.wait_for_waiters(2).await;
    holder.release().await;
    purge.await.unwrap().expect("the purge");
    assert!(restore.await.unwrap().is_err(), "the tag was put back on a purged manifest");
    assert_eq!(reg.tags_of(repo).await, serde_json::json!([]));
    let problems = fsck_problems(&reg).await;
    assert!(problems.is_empty(), "{problems:?}");
}

backend_test!(a_blob_answered_to_head_outlives_the_unwritten_note_of_it, |reg| {
    // The access writer flushes every 30 s (real time); the test moves the application clock,
    // so the HEAD below stays in memory, as it would on a replica between two flushes.
    let dir = tempfile::tempdir().unwrap();
    let mut config = match reg.on_postgres() {
        true => scale_out_config(dir.path()).await.unwrap(),
        false => {
            let mut c = berth::config::Config::embedded(dir.path());
            c.storage_fsync = false;
            c.gc.enabled = false;
            c
        }
    };
    drop(reg);
    config.gc.blob_grace = Duration::from_secs(3600);
    config.gc.access_flush_interval = Duration::from_secs(30);
    config.gc.clock_skew = Duration::from_secs(2);
    let reg = TestRegistry::start_with(config, dir).await;
    let repo = "margin/app";
    let config_blob = br#"{"architecture":"amd64","os":"linux","margin":1}"#.to_vec();
    let config_digest = reg.upload_blob(repo, &config_blob).await;
    reg.advance(3600 * 1000 - 10_000);
    let head = reg.req(Method::HEAD, &format!("/v2/{repo}/blobs/{config_digest}")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    // Past the upload's grace; the HEAD's time is still only in this replica's memory.
    reg.advance(20_000);
    reg.app.registry.collect(100_000).await.unwrap();
    let layer = random_bytes(8100, 2000);
    let layer_digest = reg.upload_blob(repo, &layer).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config_blob.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest.as_str(), "size": layer.len()}],
    }))
    .unwrap();
    let res = reg.put_manifest(repo, "v1", OCI_MANIFEST, &manifest).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
});

backend_test!(retention_deletes_an_untagged_manifest_only_if_unused_since_it_looked, |reg| {
    let repo = "revive/retention";
    let img = reg.push_image(repo, "v1", 8200).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/v1")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let name = RepoName::parse(repo).unwrap();
    let meta = reg.app.registry.meta();
    // Retention looked at it when it was last used at its push; then someone pulled it.
    let (evaluated,): (i64,) = sqlx::query_as("SELECT pushed_at FROM manifests WHERE digest = $1")
        .bind(img.digest.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    reg.advance(1000);
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    let now = reg.app.registry.clock().now_ms();
    let refused = meta
        .delete_manifest(
            &name,
            &img.digest,
            Some(RetentionDelete { last_used: evaluated, run_id: 0 }),
            false,
            Some("retention:r"),
            now,
        )
        .await;
    assert!(
        matches!(refused, Err(berth::meta::DeleteError::Refused(berth::meta::Refusal::Precondition(_)))),
        "{refused:?}"
    );
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 200);
    // Evaluated after the pull, it goes.
    let (pulled,): (i64,) = sqlx::query_as("SELECT pulled_at FROM manifests WHERE digest = $1")
        .bind(img.digest.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    meta.delete_manifest(
        &name,
        &img.digest,
        Some(RetentionDelete { last_used: pulled, run_id: 0 }),
        false,
        Some("retention:r"),
        now,
    )
    .await
    .unwrap();
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
});

backend_test!(the_collector_keeps_bytes_an_unfinished_import_adopted, |reg| {
    // On S3 an adopted key is the source registry's own object: until the import cuts over, the
    // collector (a `berth gc run`, or `serve --allow-unfinished-import`) must not delete it.
    let repo = "revive/import";
    let img = reg.push_image(repo, "v1", 8300).await;
    let layer = Digest::sha256_of(&img.layers[0]);
    let key = reg.storage_key(&layer).await;
    let sql = reg.sql().await;
    let (import_id,): (i64,) =
        sqlx::query_as("INSERT INTO imports (source, started_at) VALUES ('file:///old', 0) RETURNING id")
            .fetch_one(&sql)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO adopted_keys (storage_key, import_id, digest, adopted_at) VALUES ($1, $2, $3, 0)",
    )
    .bind(&key)
    .bind(import_id)
    .bind(layer.as_str())
    .execute(&sql)
    .await
    .unwrap();
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    reg.advance(30 * DAY);
    reg.app.registry.collect(100_000).await.unwrap();
    reg.app.registry.collect(100_000).await.unwrap();
    let count = |d: Digest| {
        let sql = sql.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
                .bind(d.as_str())
                .fetch_one(&sql)
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(count(layer.clone()).await, 1, "an adopted blob went before its import cut over");
    assert_eq!(count(Digest::sha256_of(&img.layers[1])).await, 0, "a blob Berth stored itself went");
    assert!(reg.app.registry.blobs().size(&key).await.is_ok(), "the adopted bytes were deleted");
    sqlx::query("UPDATE imports SET cut_over_at = 1 WHERE id = $1")
        .bind(import_id)
        .execute(&sql)
        .await
        .unwrap();
    reg.advance(2 * 3600 * 1000);
    reg.app.registry.collect(100_000).await.unwrap();
    assert_eq!(count(layer).await, 0, "after the cut-over the blob is garbage like any other");
});

backend_test!(an_import_root_inside_berths_own_trees_is_refused, |reg| {
    use berth::blob::Origin;
    let blobs = reg.app.registry.blobs();
    let inside = match &reg.app.config.storage_s3 {
        Some(s3) => {
            let prefix = s3.prefix.clone().unwrap_or_default();
            vec![
                Origin::Object { bucket: s3.bucket.clone(), key: format!("{prefix}/blobs/old") },
                Origin::Object { bucket: s3.bucket.clone(), key: format!("{prefix}/uploads") },
            ]
        }
        None => {
            let root = &reg.app.config.storage_path;
            for tree in ["blobs/old", "uploads/old"] {
                std::fs::create_dir_all(root.join(tree)).unwrap();
            }
            vec![Origin::File(root.join("blobs/old")), Origin::File(root.join("uploads/old"))]
        }
    };
    for origin in inside {
        let err = blobs.check_adoptable(&origin).expect_err("a root inside Berth's own trees");
        assert!(err.to_string().contains("inside Berth's own"), "{err}");
    }
    let beside = match &reg.app.config.storage_s3 {
        Some(s3) => Origin::Object {
            bucket: s3.bucket.clone(),
            key: format!("{}/registry", s3.prefix.clone().unwrap_or_default()),
        },
        None => {
            let dir = reg.app.config.storage_path.join("registry");
            std::fs::create_dir_all(&dir).unwrap();
            Origin::File(dir)
        }
    };
    blobs.check_adoptable(&beside).expect("a root beside Berth's trees");
});

/// A pushed image as the interleaving test remembers it: digest, manifest size, layers.
type Pushed = (Digest, usize, Vec<Digest>);

/// A small deterministic generator for the interleaving test's choices.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Restores (single and bulk), reverts, purges, unlinks, tag moves, index pushes, deletes and the
/// collector, all against each other on `replicas` of one deployment with windows of
/// milliseconds; afterwards, judged from the manifests' own payloads: every listed tag pulls
/// completely (an index's children and their blobs too), and fsck — whose payload checks do not
/// trust the reference rows — finds nothing.
async fn interleave(replicas: Vec<TestRegistry>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    const REPO: &str = "mix/app";
    let _heavy = HEAVY_LOAD.lock().await;
    let replicas: Vec<Arc<TestRegistry>> = replicas.into_iter().map(Arc::new).collect();
    let n = replicas.len();
    let pool: Arc<Vec<Vec<u8>>> = Arc::new((0..4).map(|i| random_bytes(9000 + i, 3000)).collect());
    // Recently pushed images: (digest, manifest bytes, layer digests).
    let recent: Arc<Mutex<Vec<Pushed>>> = Arc::default();
    let ops = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let stop = Arc::new(AtomicBool::new(false));
    let name = RepoName::parse(REPO).unwrap();
    let mut tasks = Vec::new();
    for w in 0..2u64 {
        let (reg, pool, recent, ops) =
            (replicas[w as usize % n].clone(), pool.clone(), recent.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut dice = Dice(0x9e37_79b9 + w);
            let mut k = 0u64;
            while std::time::Instant::now() < deadline {
                k += 1;
                ops.fetch_add(1, Relaxed);
                if dice.roll(4) == 0 {
                    // An index over two recent images, moving one of three index tags.
                    let children: Vec<(Digest, usize)> = {
                        let r = recent.lock().unwrap();
                        if r.len() < 2 {
                            continue;
                        }
                        let a = r.len() - 1 - dice.roll(r.len().min(6));
                        let b = r.len() - 1 - dice.roll(r.len().min(6));
                        vec![(r[a].0.clone(), r[a].1), (r[b].0.clone(), r[b].1)]
                    };
                    let manifests: Vec<serde_json::Value> = children
                        .iter()
                        .map(|(d, size)| serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.as_str(), "size": size}))
                        .collect();
                    let index = serde_json::to_vec(&serde_json::json!({
                        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
                    }))
                    .unwrap();
                    let res = reg.put_manifest(REPO, &format!("i{}", dice.roll(3)), OCI_INDEX, &index).await;
                    // A child deleted or collected meanwhile: refused, as it must be.
                    assert!(matches!(res.status().as_u16(), 201 | 400), "index push: {}", res.status());
                    continue;
                }
                let common = &pool[dice.roll(pool.len())];
                let d = Digest::sha256_of(common);
                let head = reg.req(Method::HEAD, &format!("/v2/{REPO}/blobs/{d}")).send().await.unwrap();
                if head.status() != 200 {
                    reg.upload_blob(REPO, common).await;
                }
                let config = format!(r#"{{"os":"linux","w":{w},"k":{k}}}"#).into_bytes();
                let own = random_bytes(20_000 + w * 100_000 + k, 1500);
                let cfg = reg.upload_blob(REPO, &config).await;
                let own_d = reg.upload_blob(REPO, &own).await;
                let manifest = serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": cfg.as_str(), "size": config.len()},
                    "layers": [
                        {"mediaType": OCI_LAYER, "digest": d.as_str(), "size": common.len()},
                        {"mediaType": OCI_LAYER, "digest": own_d.as_str(), "size": own.len()},
                    ],
                }))
                .unwrap();
                let res = reg.put_manifest(REPO, &format!("t{}", dice.roll(6)), OCI_MANIFEST, &manifest).await;
                match res.status().as_u16() {
                    201 => recent.lock().unwrap().push((Digest::sha256_of(&manifest), manifest.len(), vec![d, own_d])),
                    // A blob purged or unlinked between its upload and the push.
                    400 => {}
                    other => panic!("push: {other} {:?}", res.text().await),
                }
            }
        }));
    }
    // Deletes, restores, reverts, purges and unlinks, through every replica.
    let purged_by_us: Arc<Mutex<Vec<Digest>>> = Arc::default();
    for (i, reg) in replicas.iter().enumerate() {
        let (reg, recent, ops, busy, name, purged) =
            (reg.clone(), recent.clone(), ops.clone(), busy.clone(), name.clone(), purged_by_us.clone());
        tasks.push(tokio::spawn(async move {
            let mut dice = Dice(0x51_7cc1_b727 + i as u64);
            while std::time::Instant::now() < deadline {
                let picked = {
                    let r = recent.lock().unwrap();
                    if r.is_empty() {
                        None
                    } else {
                        Some(r[r.len() - 1 - dice.roll(r.len().min(12))].clone())
                    }
                };
                let Some((digest, _, layers)) = picked else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                ops.fetch_add(1, Relaxed);
                let tag = Tag::parse(&format!("{}{}", ["t", "i"][dice.roll(2)], dice.roll(3))).unwrap();
                let registry = &reg.app.registry;
                let outcome = match dice.roll(10) {
                    0 | 1 => {
                        let res = reg
                            .req(Method::DELETE, &format!("/v2/{REPO}/manifests/{digest}"))
                            .send()
                            .await
                            .unwrap();
                        assert!(matches!(res.status().as_u16(), 202 | 404 | 405), "delete: {}", res.status());
                        Ok(())
                    }
                    2 => {
                        let res = reg
                            .req(Method::DELETE, &format!("/v2/{REPO}/manifests/{tag}"))
                            .send()
                            .await
                            .unwrap();
                        assert!(matches!(res.status().as_u16(), 202 | 404), "tag delete: {}", res.status());
                        Ok(())
                    }
                    3 => registry
                        .restore_manifest(&name, &digest, dice.roll(2) == 0, Some("mix"))
                        .await
                        .map(drop),
                    4 => registry.restore_tag(&name, &tag, dice.roll(2) == 0, Some("mix")).await.map(drop),
                    5 => {
                        registry.revert_tag(&name, &tag, RevertTarget::Previous, Some("mix")).await.map(drop)
                    }
                    6 => registry
                        .revert_tag(&name, &tag, RevertTarget::Digest(&digest), Some("mix"))
                        .await
                        .map(drop),
                    7 => {
                        let res = reg
                            .req(Method::DELETE, &format!("/v2/{REPO}/blobs/{}", layers[1]))
                            .send()
                            .await
                            .unwrap();
                        assert!(matches!(res.status().as_u16(), 202 | 404 | 405), "unlink: {}", res.status());
                        Ok(())
                    }
                    9 => {
                        // Every delete of the last moments undone at once, or (dry) judged.
                        let selection = berth::registry::Selection {
                            repositories: Some(berth::auth::Pattern::parse(REPO).unwrap()),
                            since: Some(berth::time::Moment::Ago(200)),
                            ..Default::default()
                        };
                        let (take_tags, dry_run) = (dice.roll(2) == 0, dice.roll(3) == 0);
                        registry.bulk_restore(&selection, take_tags, dry_run, Some("mix")).await.map(drop)
                    }
                    _ => {
                        // Purges are rarer: each takes an image's own layer everywhere.
                        if dice.roll(3) == 0 {
                            let done = registry.purge_blob(&layers[1], "interleaving", Some("mix")).await;
                            if done.is_ok() {
                                purged.lock().unwrap().push(digest.clone());
                            }
                            done.map(drop)
                        } else {
                            Ok(())
                        }
                    }
                };
                match outcome {
                    Ok(()) => {}
                    Err(berth::registry::Error::Unavailable(_)) => {
                        busy.fetch_add(1, Relaxed);
                    }
                    Err(berth::registry::Error::Internal(e)) => panic!("internal error: {e}"),
                    // Refusals (not found, not deleted, cannot be restored, a tag moved since…).
                    Err(_) => {}
                }
            }
        }));
    }
    // A cluster reporting what it runs (some recent images), now and then withdrawing: deletes of
    // what it pins are refused; purges (which no pin holds back) are noted.
    {
        let (reg, recent, ops) = (replicas[n - 1].clone(), recent.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            let mut dice = Dice(0x0dd_ba11);
            while std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let picked: Vec<String> = {
                    let r = recent.lock().unwrap();
                    (0..r.len().min(3))
                        .map(|_| format!("{REPO}@{}", r[r.len() - 1 - dice.roll(r.len().min(12))].0))
                        .collect()
                };
                ops.fetch_add(1, Relaxed);
                let outcome = if dice.roll(8) == 0 {
                    reg.app.registry.withdraw_in_use("mix-cluster", None).await
                } else {
                    reg.app.registry.report_in_use("mix-cluster", &picked, 3_600_000, None).await.map(drop)
                };
                match outcome {
                    Ok(())
                    | Err(berth::registry::Error::NotFound(_) | berth::registry::Error::Unavailable(_)) => {}
                    Err(e) => panic!("in-use report: {e}"),
                }
            }
        }));
    }
    let mut collectors = Vec::new();
    for reg in &replicas {
        let (reg, stop, ops) = (reg.clone(), stop.clone(), ops.clone());
        collectors.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                reg.app.registry.collect(1000).await.unwrap();
                ops.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Relaxed);
    for c in collectors {
        c.await.unwrap();
    }
    // Let the windows pass and collect once more: nothing a live manifest needs may go.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    replicas[0].app.registry.collect(100_000).await.unwrap();
    let reg = &replicas[0];
    let tags: serde_json::Value = reg.get(&format!("/v2/{REPO}/tags/list")).await.json().await.unwrap();
    let tags: Vec<String> = serde_json::from_value(tags["tags"].clone()).unwrap_or_default();
    for tag in &tags {
        let res = reg.get(&format!("/v2/{REPO}/manifests/{tag}")).await;
        assert_eq!(res.status(), 200, "{tag}");
        let manifest: serde_json::Value = res.json().await.unwrap();
        let mut images = vec![manifest.clone()];
        for child in manifest["manifests"].as_array().into_iter().flatten() {
            let d = child["digest"].as_str().unwrap();
            let res = reg.get(&format!("/v2/{REPO}/manifests/{d}")).await;
            assert_eq!(res.status(), 200, "{tag} lists {d}");
            images.push(res.json().await.unwrap());
        }
        for image in images.iter().filter(|m| m["config"].is_object()) {
            for blob in image["layers"].as_array().unwrap().iter().chain([&image["config"]]) {
                let d = blob["digest"].as_str().unwrap();
                let res = reg.get(&format!("/v2/{REPO}/blobs/{d}")).await;
                assert_eq!(res.status(), 200, "{tag} needs {d}");
                assert_eq!(Digest::sha256_of(&res.bytes().await.unwrap()).as_str(), d);
            }
        }
    }
    // What the cluster's report pins is live, unless a purge (which no pin holds back) took it.
    let purged: Vec<Digest> = purged_by_us.lock().unwrap().clone();
    let mut pins = 0;
    for report in reg.app.registry.in_use_reports().await.unwrap() {
        for pin in report.pinned {
            pins += 1;
            let res = reg.get(&format!("/v2/{REPO}/manifests/{}", pin.digest)).await;
            assert!(
                res.status() == 200 || purged.iter().any(|d| d.as_str() == pin.digest),
                "pinned {} answered {}",
                pin.digest,
                res.status()
            );
        }
    }
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
    let ops = ops.load(Relaxed);
    eprintln!(
        "interleave on {n} replica(s): {ops} operations, {} pushes acknowledged, {} tags left, {} answered busy, \
         {pins} pins checked live",
        recent.lock().unwrap().len(),
        tags.len(),
        busy.load(Relaxed)
    );
    // A progress guard only (the count itself is printed): a loaded CI machine does fewer.
    assert!(ops > 400, "only {ops} operations");
}

// One test, one deployment after the other (embedded, then one and two PostgreSQL + S3
// replicas): two such loads at once would starve the suite's other stress tests on two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_purges_unlinks_and_the_collector_interleaved_lose_nothing() {
    let embedded = crate::gc::with_short_windows(Backend::Sqlite).await.unwrap();
    interleave(vec![embedded]).await;
    let Some(reg) = crate::gc::with_short_windows(Backend::Postgres).await else { return };
    interleave(vec![reg]).await;
    let first = crate::gc::with_short_windows(Backend::Postgres).await.unwrap();
    let second = TestRegistry::start_with(first.app.config.clone(), tempfile::tempdir().unwrap()).await;
    interleave(vec![first, second]).await;
}

backend_test!(explain_accepts_a_tag_and_explains_what_it_points_at, |reg| {
    use berth::registry::ExplainTarget;
    let img = reg.push_image("revive/explain", "v1", 8400).await;
    let registry = &reg.app.registry;
    let by_tag = registry.explain(&ExplainTarget::parse("revive/explain:v1").unwrap()).await.unwrap();
    let by_digest = registry
        .explain(&ExplainTarget::parse(&format!("revive/explain@{}", img.digest)).unwrap())
        .await
        .unwrap();
    assert_eq!(serde_json::to_value(&by_tag).unwrap(), serde_json::to_value(&by_digest).unwrap());
    let missing = registry.explain(&ExplainTarget::parse("revive/explain:nope").unwrap()).await;
    assert!(matches!(missing, Err(berth::registry::Error::TagUnknown(_))), "{missing:?}");
    assert!(ExplainTarget::parse(img.digest.as_str()).is_ok_and(|t| matches!(t, ExplainTarget::Blob(_))));
});

backend_test!(who_deleted_without_credentials_reads_anonymous_in_every_face, |reg| {
    let img = reg.push_image("revive/who", "v1", 8500).await;
    let res =
        reg.req(Method::DELETE, &format!("/v2/revive/who/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let body: serde_json::Value = reg.get("/admin/v1/tombstones/revive/who").await.json().await.unwrap();
    let text = body.to_string();
    assert!(text.contains("\"deleted_by\":\"anonymous\""), "{text}");
    let body: serde_json::Value = reg.get("/admin/v1/history/revive/who:v1").await.json().await.unwrap();
    let text = body.to_string();
    assert!(text.contains("\"actor\":\"anonymous\"") && !text.contains("\"actor\":null"), "{text}");
});
