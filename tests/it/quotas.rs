//! Quotas: the usage each rule keeps equals an independent count after every kind of change;
//! a change past a limit is refused (403 `DENIED`, naming the rule) and leaves nothing behind;
//! concurrent writers on several replicas never go past a limit together; a rule added to a
//! registry starts from the exact usage.

use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::events::with_config;
use crate::events_test;
use crate::harness::*;

/// A rule over `team/**` limited to `max_bytes` (and `extra` lines).
fn rule(max_bytes: u64, extra: &str) -> String {
    format!("[[quotas]]\nname = \"team\"\nrepositories = \"team/**\"\nmax_bytes = {max_bytes}\n{extra}\n")
}

/// The quota rules of a configuration file's text.
fn rules_of(toml: &str) -> Vec<berth::quota::QuotaRule> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("berth.toml");
    std::fs::write(&file, toml).unwrap();
    berth::config::Config::load(Some(&file), &berth::config::Overrides::default()).unwrap().quotas
}

impl TestRegistry {
    /// The `team` rule as `GET /admin/v1/quotas/team` shows it.
    async fn quota(&self) -> Value {
        let (status, body) = self.admin(Method::GET, "quotas/team", None).await;
        assert_eq!(status, 200, "{body}");
        body["quotas"][0].clone()
    }

    /// What `team/**` holds, counted here from the rows with SQL of the test's own: the distinct
    /// blobs linked in its repositories (hidden links too), every manifest row there, and its
    /// repositories not deleted.
    async fn count_team(&self) -> (i64, i64) {
        let sql = self.sql().await;
        let (blobs,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b WHERE b.id IN \
             (SELECT rb.blob_id FROM repository_blobs rb JOIN repositories r ON r.id = rb.repository_id \
              WHERE r.name LIKE 'team/%')",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        let (manifests,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(m.size), 0) AS BIGINT) FROM manifests m \
             JOIN repositories r ON r.id = m.repository_id WHERE r.name LIKE 'team/%'",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        let (repos,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM repositories WHERE name LIKE 'team/%' AND deleted_at IS NULL",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        (blobs + manifests, repos)
    }

    /// Asserts the kept usage equals the independent count, and that the registry's own count
    /// from scratch (what fsck runs) agrees with what it keeps. Returns the bytes.
    async fn assert_usage_exact(&self, step: &str) -> i64 {
        let q = self.quota().await;
        let (bytes, repos) = self.count_team().await;
        assert_eq!(q["used_bytes"].as_i64(), Some(bytes), "bytes after {step}: {q}");
        assert_eq!(q["used_repositories"].as_i64(), Some(repos), "repositories after {step}: {q}");
        for count in self.app.registry.count_quotas(false).await.unwrap() {
            assert!(count.exact(), "after {step}: {count:?}");
        }
        bytes
    }

    /// Uploads `bytes` to `repo` in one request; returns the response.
    async fn try_upload(&self, repo: &str, bytes: &[u8]) -> reqwest::Response {
        let d = Digest::sha256_of(bytes);
        self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// The events of `kind` written so far.
    async fn events_of(&self, kind: &str) -> Vec<Value> {
        let (_, body) = self.admin(Method::GET, "events?after=0&n=10000", None).await;
        body["events"].as_array().unwrap().iter().filter(|e| e["kind"] == kind).cloned().collect()
    }
}

events_test!(usage_is_exact_after_every_kind_of_change, |backend| {
    let reg = with_config(backend, &rule(1 << 30, "")).await.unwrap();
    assert!(reg.quota().await["counted_at"].as_i64().is_some(), "counted before serving");
    reg.assert_usage_exact("start").await;

    let one = reg.push_image("team/a", "v1", 1).await;
    let after_one = reg.assert_usage_exact("a first push").await;
    let image_bytes: i64 =
        (one.config.len() + one.layers.iter().map(Vec::len).sum::<usize>() + one.manifest.len()) as i64;
    assert_eq!(after_one, image_bytes);

    // The same image in a second repository of the scope: the blobs count once, the manifest
    // row (its bytes stored again) twice.
    reg.push_image("team/b", "v1", 1).await;
    assert_eq!(reg.assert_usage_exact("a shared push").await, after_one + one.manifest.len() as i64);

    // Outside the scope: nothing. Then a mount from there into the scope adds the blob.
    let other = reg.push_image("other/x", "v1", 2).await;
    let before = reg.assert_usage_exact("a push outside").await;
    let layer = Digest::sha256_of(&other.layers[0]);
    let res = reg
        .req(Method::POST, &format!("/v2/team/c/blobs/uploads/?mount={layer}&from=other/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(reg.assert_usage_exact("a mount").await, before + other.layers[0].len() as i64);
    // Uploaded again where it is linked: nothing new.
    assert_eq!(reg.try_upload("team/c", &other.layers[0]).await.status(), StatusCode::CREATED);
    reg.assert_usage_exact("an upload of a linked blob").await;

    // A tag move, a delete (the tombstone still counts), a restore.
    let three = reg.push_image("team/a", "v1", 3).await;
    reg.assert_usage_exact("a tag move").await;
    let res = reg.req(Method::DELETE, &format!("/v2/team/a/manifests/{}", one.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let held = reg.assert_usage_exact("a manifest delete").await;
    let (status, body) = reg.admin(Method::POST, &format!("restore/team/a@{}", one.digest), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reg.assert_usage_exact("a restore").await, held);

    // A repository delete takes a repository from the count but none of its bytes.
    let (status, body) = reg.admin(Method::DELETE, "repositories/team/b", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reg.quota().await["used_repositories"], 2);
    assert_eq!(reg.assert_usage_exact("a repository delete").await, held);
    let (status, body) = reg.admin(Method::POST, "restore/team/b", None).await;
    assert_eq!(status, 200, "{body}");
    reg.assert_usage_exact("a repository restore").await;

    // An unlink frees what no other repository of the scope links.
    let res = reg.req(Method::DELETE, &format!("/v2/team/c/blobs/{layer}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(reg.assert_usage_exact("an unlink").await, held - other.layers[0].len() as i64);

    // A purge frees at once.
    let secret = Digest::sha256_of(&three.layers[1]);
    reg.app.registry.purge_blob(&secret, "a test", Some("admin")).await.unwrap();
    reg.assert_usage_exact("a purge").await;

    // Collection: everything deleted, then past every window.
    for repo in ["team/a", "team/b", "team/c"] {
        let (status, body) = reg.admin(Method::DELETE, &format!("repositories/{repo}"), None).await;
        assert!(status == 200 || status == 404, "{body}");
    }
    reg.assert_usage_exact("deleting everything").await;
    reg.app.registry.clock().advance_ms(30 * 24 * 3600 * 1000);
    reg.app.registry.collect(100_000).await.unwrap();
    reg.app.registry.collect(100_000).await.unwrap();
    assert_eq!(reg.assert_usage_exact("collection").await, 0, "the collector freed everything");
});

events_test!(a_change_past_the_limit_is_refused_and_leaves_nothing, |backend| {
    // Room for one image (~8.6 KB) and not much more.
    let reg = with_config(backend, &rule(12_000, "warn_at = 0.5\nmax_repositories = 2")).await.unwrap();
    let one = reg.push_image("team/a", "v1", 10).await;
    let used = reg.assert_usage_exact("a push").await;
    assert_eq!(reg.events_of("quota.warned").await.len(), 1, "the push crossed warn_at");

    // An upload past the limit: 403 DENIED naming the rule; the session and its bytes go.
    let big = random_bytes(99, 5000);
    let res = reg.try_upload("team/a", &big).await;
    let body = assert_oci_error(res, 403, "DENIED").await;
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("quota `team`") && message.contains("team/**"), "{message}");
    assert_eq!(reg.assert_usage_exact("a refused upload").await, used);
    let sql = reg.sql().await;
    let (sessions,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM uploads").fetch_one(&sql).await.unwrap();
    assert_eq!(sessions, 0, "the refused session is gone");
    let (stored,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
        .bind(Digest::sha256_of(&big).as_str())
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // Its bytes are in the outbox, and gone from storage once it drains.
    let (queued,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM gc_outbox").fetch_one(&sql).await.unwrap();
    assert!(queued >= 1, "the refused upload's bytes go through the outbox");
    reg.app.registry.drain_outbox().await.unwrap();
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.clean(), "{:?}", report.problems);
    assert!(report.orphans.is_empty(), "nothing of the refused upload stays: {:?}", report.orphans);

    // A manifest past the limit: fill up with a blob, then a manifest that does not fit.
    let filler = random_bytes(98, (12_000 - used - 100) as usize);
    assert_eq!(reg.try_upload("team/a", &filler).await.status(), StatusCode::CREATED);
    let used = reg.assert_usage_exact("filling up").await;
    let layer = Digest::sha256_of(&filler);
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": Digest::sha256_of(&one.config).as_str(), "size": one.config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer.as_str(), "size": filler.len()}],
    }))
    .unwrap();
    let res = reg.put_manifest("team/a", "v2", OCI_MANIFEST, &manifest).await;
    assert_oci_error(res, 403, "DENIED").await;
    assert_eq!(reg.get("/v2/team/a/manifests/v2").await.status(), 404, "nothing recorded");
    assert_eq!(reg.assert_usage_exact("a refused manifest").await, used);
    assert_eq!(reg.events_of("quota.refused").await.len(), 2);
    let metrics = reg.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("berth_quota_refusals_total{rule=\"team\"} 2"), "{metrics}");
    assert!(metrics.contains(&format!("berth_quota_used_bytes{{rule=\"team\"}} {used}")), "{metrics}");
    assert!(metrics.contains("berth_quota_limit_bytes{rule=\"team\"} 12000"), "{metrics}");

    // A tombstone still counts; a purge frees at once.
    let res = reg.req(Method::DELETE, &format!("/v2/team/a/manifests/{}", one.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_oci_error(reg.put_manifest("team/a", "v2", OCI_MANIFEST, &manifest).await, 403, "DENIED").await;
    reg.app.registry.purge_blob(&Digest::sha256_of(&one.layers[1]), "room", Some("admin")).await.unwrap();
    assert_eq!(reg.put_manifest("team/a", "v2", OCI_MANIFEST, &manifest).await.status(), StatusCode::CREATED);
    reg.assert_usage_exact("a push after a purge").await;

    // Repositories: two at most. A third is refused; a delete frees a place; the deleted
    // repository's restore is then refused (409) unless forced.
    let small = random_bytes(97, 10);
    assert_eq!(reg.try_upload("team/b", &small).await.status(), StatusCode::CREATED);
    let body = assert_oci_error(reg.try_upload("team/c", &small).await, 403, "DENIED").await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("repositories"), "{body}");
    let (status, _) = reg.admin(Method::DELETE, "repositories/team/b", None).await;
    assert_eq!(status, 200);
    assert_eq!(reg.try_upload("team/c", &small).await.status(), StatusCode::CREATED);
    let (status, body) = reg.admin(Method::POST, "restore/team/b", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("quota `team`"), "{body}");
    let (status, body) = reg.admin(Method::POST, "restore/team/b?force=true", None).await;
    assert_eq!(status, 200, "{body}");
    let q = reg.quota().await;
    assert_eq!(q["used_repositories"], 3, "forced past the limit: {q}");
    reg.assert_usage_exact("a forced restore").await;

    // The faces: the repository list, the console (a bar per rule), the CLI.
    let (_, repos) = reg.admin(Method::GET, "repositories", None).await;
    let a = repos["repositories"].as_array().unwrap().iter().find(|r| r["name"] == "team/a").unwrap().clone();
    assert_eq!(a["quotas"], serde_json::json!(["team"]));
    assert!(a["bytes_held"].as_i64().unwrap() > 0);
    for page in ["/ui/space", "/ui/repo?name=team/a"] {
        let html = reg.get(page).await.text().await.unwrap();
        assert!(
            html.contains("id=\"quotas\"") && html.contains("team/**") && html.contains("class=\"bar\""),
            "{page}: {html}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["quota", "status", "--url", &reg.url("")])
        .env_remove("BERTH_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("team (team/**)") && text.contains("3 of 2 repositories"),
        "{text}"
    );
    let (status, _) = reg.admin(Method::GET, "quotas/nope", None).await;
    assert_eq!(status, 404);

    // Filled to the byte: allowed; then a new upload session is refused at once.
    let used = reg.quota().await["used_bytes"].as_i64().unwrap();
    let last = random_bytes(96, (12_000 - used) as usize);
    assert_eq!(reg.try_upload("team/a", &last).await.status(), StatusCode::CREATED);
    assert_eq!(reg.quota().await["used_bytes"], 12_000);
    let res = reg.req(Method::POST, "/v2/team/a/blobs/uploads/").send().await.unwrap();
    let body = assert_oci_error(res, 403, "DENIED").await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("is full"), "{body}");
    // A forced restore is for administrators of every repository: the quota covers more than one.
    let forced = berth::admin::AdminRequest::Restore {
        target: berth::registry::DeleteTarget::Repository(berth::oci::RepoName::parse("team/b").unwrap()),
        take_tags: false,
        force: true,
    };
    assert_eq!(forced.operation(), berth::auth::Operation::AdministerRegistry);
});

events_test!(counts_from_scratch_during_changes_keep_the_usage_exact, |backend| {
    let reg = with_config(backend, &rule(1 << 30, "")).await.unwrap();
    let shared = random_bytes(60, 4000);
    let d = Digest::sha256_of(&shared);
    let changes = {
        let (client, base) = (reg.client.clone(), reg.url(""));
        let (shared, d) = (shared.clone(), d.clone());
        tokio::spawn(async move {
            // Links that are neither a blob's first nor its last in the scope, and some that are.
            for i in 0..40 {
                let res = client
                    .post(format!("{base}/v2/team/s{}/blobs/uploads/?digest={d}", i % 5))
                    .body(shared.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let res =
                    client.delete(format!("{base}/v2/team/s{}/blobs/{d}", (i + 2) % 5)).send().await.unwrap();
                assert!(res.status() == 202 || res.status() == 404, "{}", res.status());
            }
        })
    };
    for _ in 0..10 {
        reg.app.registry.count_quotas(true).await.unwrap();
        reg.app.registry.count_quotas(false).await.unwrap();
    }
    changes.await.unwrap();
    reg.assert_usage_exact("counts during changes").await;
});

events_test!(a_refused_pushs_uploaded_blobs_are_reclaimed, |backend| {
    let reg = with_config(backend, &rule(9_000, "")).await.unwrap();
    let one = reg.push_image("team/a", "v1", 40).await;
    let before = reg.assert_usage_exact("a push").await;
    // The layers of a second image fit; its manifest does not.
    let layer = random_bytes(41, (9_000 - before - 50) as usize);
    assert_eq!(reg.try_upload("team/a", &layer).await.status(), StatusCode::CREATED);
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": Digest::sha256_of(&one.config).as_str(), "size": one.config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": Digest::sha256_of(&layer).as_str(), "size": layer.len()}],
        "annotations": {"padding": "x".repeat(200)},
    }))
    .unwrap();
    assert_oci_error(reg.put_manifest("team/a", "v2", OCI_MANIFEST, &manifest).await, 403, "DENIED").await;
    assert_eq!(reg.assert_usage_exact("a refused manifest").await, before + layer.len() as i64);
    // Nothing references the layer: the collector takes it once its grace has passed, and the
    // scope has the room back.
    reg.app.registry.clock().advance_ms(2 * 24 * 3600 * 1000);
    reg.app.registry.collect(100_000).await.unwrap();
    reg.app.registry.drain_outbox().await.unwrap();
    assert_eq!(reg.assert_usage_exact("collecting the refused push's layer").await, before);
    let d = Digest::sha256_of(&layer);
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
        .bind(d.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the refused push's layer is reclaimed");
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.clean() && report.orphans.is_empty(), "{:?} {:?}", report.problems, report.orphans);
});

events_test!(a_rule_added_to_a_registry_starts_from_the_exact_usage, |backend| {
    let reg = with_config(backend, "").await.unwrap();
    reg.push_image("team/a", "v1", 20).await;
    reg.push_image("team/b", "v1", 20).await;
    reg.push_image("other/c", "v1", 21).await;
    let res = reg.req(Method::DELETE, "/v2/team/b/manifests/v1").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // Restarted on the same data with a rule: counted before serving.
    let mut config = reg.app.config.clone();
    config.quotas = rules_of(&rule(1 << 30, ""));
    let dir = reg.stop().await;
    let reg = TestRegistry::start_with(config.clone(), dir).await;
    reg.assert_usage_exact("a rule added").await;
    // Its scope changed: counted again.
    config.quotas[0].repositories = berth::auth::Pattern::parse("team/a").unwrap();
    let dir = reg.stop().await;
    let reg = TestRegistry::start_with(config, dir).await;
    let q = reg.quota().await;
    let (blobs, manifests): (i64, i64) = {
        let sql = reg.sql().await;
        let (b,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b JOIN repository_blobs rb ON rb.blob_id = b.id \
             JOIN repositories r ON r.id = rb.repository_id WHERE r.name = 'team/a'",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        let (m,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(m.size), 0) AS BIGINT) FROM manifests m JOIN repositories r ON r.id = m.repository_id \
             WHERE r.name = 'team/a'",
        )
        .fetch_one(&sql)
        .await
        .unwrap();
        (b, m)
    };
    assert_eq!(q["used_bytes"].as_i64(), Some(blobs + manifests), "{q}");
    assert_eq!(q["repositories"], "team/a");
});

/// The lock order a count from scratch relies on, exactly (PostgreSQL; SQLite's one writer
/// orders everything): while the usage row is held as a count holds it, a change to the rule's blob
/// rows waits — even one adding no bytes (a blob's second link in the scope), which a count
/// interleaving with it would otherwise undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_a_scope_waits_for_a_count_holding_its_usage_row() {
    let Some(reg) = with_config(Backend::Postgres, &rule(1 << 30, "")).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let shared = random_bytes(70, 3000);
    assert_eq!(reg.try_upload("team/a", &shared).await.status(), StatusCode::CREATED);
    // team/b exists already: the second link adds neither bytes nor a repository.
    assert_eq!(reg.try_upload("team/b", &random_bytes(71, 10)).await.status(), StatusCode::CREATED);
    let sql = reg.sql().await;
    let mut count = sql.begin().await.unwrap();
    sqlx::query("SELECT bytes FROM quota_usage WHERE rule = 'team' FOR UPDATE")
        .execute(&mut *count)
        .await
        .unwrap();
    let second_link = {
        let (client, base, d) = (reg.client.clone(), reg.url(""), Digest::sha256_of(&shared));
        let shared = shared.clone();
        tokio::spawn(async move {
            client
                .post(format!("{base}/v2/team/b/blobs/uploads/?digest={d}"))
                .body(shared)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(!second_link.is_finished(), "the link went past a count holding the usage row");
    count.rollback().await.unwrap();
    assert_eq!(second_link.await.unwrap(), StatusCode::CREATED);
    reg.assert_usage_exact("a link after the count").await;
}

/// Pushes images of `seed..` into `team/w{writer}` until refused; returns the bytes of what was
/// acknowledged (each blob unique to this writer).
async fn push_until_refused(base: String, writer: u64) -> (i64, u32) {
    let client = reqwest::Client::new();
    let mut acknowledged = 0i64;
    let mut refusals = 0;
    for i in 0..40u64 {
        let seed = 1000 * (writer + 1) + i;
        let blob = random_bytes(seed, 700 + (seed % 300) as usize);
        let d = Digest::sha256_of(&blob);
        let res = client
            .post(format!("{base}/v2/team/w{writer}/blobs/uploads/?digest={d}"))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            201 => acknowledged += blob.len() as i64,
            403 => refusals += 1,
            other => panic!("upload answered {other}: {}", res.text().await.unwrap_or_default()),
        }
    }
    (acknowledged, refusals)
}

/// Eight writers, spread over `replicas`, push into one scope near its limit at once.
async fn eight_writers_never_exceed_the_limit(replicas: &[TestRegistry]) {
    let limit = 60_000i64;
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        let base = replicas[writer as usize % replicas.len()].url("");
        tasks.push(tokio::spawn(push_until_refused(base, writer)));
    }
    let mut acknowledged = 0;
    let mut refusals = 0;
    for t in tasks {
        let (bytes, refused) = t.await.unwrap();
        acknowledged += bytes;
        refusals += refused;
    }
    assert!(refusals > 0, "the writers reached the limit");
    assert!(acknowledged <= limit, "{acknowledged} acknowledged bytes over a limit of {limit}");
    assert!(acknowledged > limit - 2000, "the scope filled up: {acknowledged}");
    let reg = &replicas[0];
    assert_eq!(reg.assert_usage_exact("the writers").await, acknowledged, "exactly what was acknowledged");
    let (sessions,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM uploads").fetch_one(&reg.sql().await).await.unwrap();
    assert_eq!(sessions, 0, "every refused session went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_never_exceed_the_limit_on_one_node() {
    let reg = with_config(Backend::Sqlite, &rule(60_000, "")).await.unwrap();
    eight_writers_never_exceed_the_limit(std::slice::from_ref(&reg)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_on_two_replicas_never_exceed_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    config.gc.enabled = false;
    config.quotas = rules_of(&rule(60_000, ""));
    let replicas = vec![
        TestRegistry::start_with(config.clone(), tempfile::tempdir().unwrap()).await,
        TestRegistry::start_with(config, tempfile::tempdir().unwrap()).await,
    ];
    eight_writers_never_exceed_the_limit(&replicas).await;
}
