//! Retention rules and immutable tags against a real server, on both deployments, with the
//! registry's clock moved forward instead of sleeping.

use std::collections::BTreeSet;

use berth::config::{Config, Overrides};
use berth::oci::Digest;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::*;

const HOUR: i64 = 3600 * 1000;
const DAY: i64 = 24 * HOUR;

/// The rules of the tests: the worked examples of docs/retention.md, limited to `ret/…`.
pub(crate) const RULES: &str = r#"
[retention]
interval = "0s"

[[retention.rules]]
name = "releases"
repositories = "ret/**"
keep_tags = 'v\d+\.\d+\.\d+'

[[retention.rules]]
name = "last-2"
repositories = "ret/*"
tags = "main-.*"
keep_last = 2

[[retention.rules]]
name = "ci"
repositories = "ret/**"
tags = "ci-.*"
remove_not_pushed_within = "14d"
remove_not_pulled_within = "7d"

[[retention.rules]]
name = "untagged"
repositories = "ret/**"
remove_untagged_older_than = "3d"

[[immutable]]
name = "frozen"
repositories = "ret/**"
tags = "release-.*"
"#;

/// A registry on `backend` with `rules` (TOML, parsed as `berth serve` parses its file).
pub(crate) async fn with_rules(backend: Backend, rules: &str) -> Option<TestRegistry> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, rules).unwrap();
    let parsed = Config::load(Some(&file), &Overrides::default()).expect("the rules parse");
    let mut config = match backend {
        Backend::Sqlite => {
            let mut c = Config::embedded(dir.path());
            c.storage_fsync = false;
            c.gc.enabled = false;
            c
        }
        Backend::Postgres => scale_out_config(dir.path()).await?,
    };
    config.retention = parsed.retention;
    config.immutable = parsed.immutable;
    Some(TestRegistry::start_with(config, dir).await)
}

/// A test per deployment on a registry with the calling module's `RULES` (and its
/// `with_rules` in scope).
macro_rules! retention_test {
    ($name:ident, |$reg:ident| $body:block) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $reg = with_rules(Backend::Sqlite, RULES).await.unwrap();
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some($reg) = with_rules(Backend::Postgres, RULES).await else {
                    eprintln!("skipping: the scale-out deployment is not configured");
                    return;
                };
                $body
            }
        }
    };
}
pub(crate) use retention_test;

impl TestRegistry {
    async fn retention(&self, dry_run: bool) -> Value {
        let (status, v) = self.admin(Method::POST, &format!("retention/run?dry_run={dry_run}"), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn tag_set(&self, repo: &str) -> BTreeSet<String> {
        let v: Value = self.get(&format!("/v2/{repo}/tags/list")).await.json().await.unwrap();
        v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    }

    /// Bytes of every blob and manifest row: what storage holds once the collector caught up.
    async fn stored_bytes(&self) -> i64 {
        let sql = self.sql().await;
        let (b,): (i64,) = sqlx::query_as("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs")
            .fetch_one(&sql)
            .await
            .unwrap();
        let (m,): (i64,) = sqlx::query_as("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM manifests")
            .fetch_one(&sql)
            .await
            .unwrap();
        b + m
    }
}

/// `(repository:tag, rule)` of every tag in a report.
fn tag_removals(report: &Value) -> Vec<(String, String)> {
    report["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                format!("{}:{}", t["repository"].as_str().unwrap(), t["tag"].as_str().unwrap()),
                t["rule"].to_string(),
            )
        })
        .collect()
}

retention_test!(rules_remove_exactly_what_the_dry_run_listed_and_it_is_restorable, |reg| {
    // Twenty days of pushes, the clock moved forward between them; the rules run on day 20.
    let v1 = reg.push_image("ret/app", "v1.0.0", 100).await;
    reg.push_image("ret/app", "release-1", 110).await;
    reg.push_image("ret/app", "ci-old", 120).await;
    let ci_pulled = reg.push_image("ret/app", "ci-pulled", 130).await;
    let untagged = reg.push_image("ret/app", "scratch", 140).await;
    assert_eq!(reg.req(Method::DELETE, "/v2/ret/app/manifests/scratch").send().await.unwrap().status(), 202);
    let child = reg.push_image("ret/app", "child-tmp", 150).await;
    reg.push_index("ret/app", "multi", &[&child]).await;
    assert_eq!(
        reg.req(Method::DELETE, "/v2/ret/app/manifests/child-tmp").send().await.unwrap().status(),
        202
    );
    let referrer = crate::gc::push_referrer(&reg, "ret/app", &v1, 160).await;
    // An index only a CI tag holds: its untagged child goes with it.
    let child2 = reg.push_image("ret/app", "child2-tmp", 165).await;
    reg.push_index("ret/app", "ci-index", &[&child2]).await;
    assert_eq!(
        reg.req(Method::DELETE, "/v2/ret/app/manifests/child2-tmp").send().await.unwrap().status(),
        202
    );
    // Another repository the rules cover, and one they do not.
    reg.push_image("ret/other", "ci-stale", 190).await;
    reg.push_image("elsewhere/app", "ci-stale", 191).await;
    for (day, seed) in [(1, 170), (2, 171), (3, 172), (4, 173)] {
        reg.advance(DAY);
        reg.push_image("ret/app", &format!("main-{day}"), seed).await;
    }
    reg.advance(13 * DAY);
    reg.push_image("ret/app", "ci-new", 180).await;
    reg.advance(DAY);
    assert_eq!(reg.get("/v2/ret/app/manifests/ci-pulled").await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    reg.advance(2 * DAY);

    let dry = reg.retention(true).await;
    let expected = [
        ("ret/app:ci-index", "ci"),
        ("ret/app:ci-old", "ci"),
        ("ret/app:main-1", "last-2"),
        ("ret/app:main-2", "last-2"),
        ("ret/other:ci-stale", "ci"),
    ]
    .map(|(t, r)| (t.to_string(), format!("\"{r}\"")));
    assert_eq!(tag_removals(&dry), expected, "{dry:#}");
    // The untagged image goes; the index's child and the referrer of a live image stay.
    let manifests: Vec<&str> =
        dry["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    assert_eq!(manifests, [untagged.digest.as_str()], "{dry:#}");
    assert!(!manifests.contains(&child.digest.as_str()) && !manifests.contains(&referrer.as_str()));
    let freed = dry["bytes_freed"].as_i64().unwrap();
    assert!(freed > 0);
    assert!(reg.tag_set("ret/app").await.contains("main-1"), "a dry run changes nothing");

    let before = reg.stored_bytes().await;
    let real = reg.retention(false).await;
    assert_eq!(tag_removals(&real), expected, "a real run right after removes exactly those");
    assert!(real["tags"].as_array().unwrap().iter().all(|t| t["outcome"] == "removed"), "{real:#}");
    assert_eq!(real["manifests"][0]["outcome"], "removed");
    assert_eq!(
        reg.tag_set("ret/app").await,
        ["child-tmp", "ci-new", "ci-pulled", "main-3", "main-4", "multi", "release-1", "v1.0.0"]
            .into_iter()
            .filter(|t| *t != "child-tmp")
            .map(str::to_string)
            .collect()
    );
    assert_eq!(reg.tag_set("elsewhere/app").await, BTreeSet::from(["ci-stale".to_string()]));
    assert_eq!(reg.get(&format!("/v2/ret/app/manifests/{}", ci_pulled.digest)).await.status(), 200);

    // Recorded with the rule as the actor, and restorable like any delete.
    let (_, history) = reg.admin(Method::GET, "history/ret/app:main-1", None).await;
    let last = history["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["kind"].as_str(), last["actor"].as_str()), (Some("delete"), Some("retention:last-2")));
    assert_eq!(reg.admin(Method::POST, "restore/ret/app:main-1", None).await.0, 200);
    assert!(reg.tag_set("ret/app").await.contains("main-1"));
    // Removed again by the next run; nothing else is.
    let again = reg.retention(false).await;
    assert_eq!(tag_removals(&again), [("ret/app:main-1".to_string(), "\"last-2\"".to_string())]);

    // Once the collector has run, storage shrank by what the dry run said.
    let (_, status) = reg.admin(Method::GET, "retention/status", None).await;
    assert_eq!(status["last_runs"][1]["tags_removed"], 5, "{status:#}");
    assert_eq!(status["last_runs"][1]["manifests_removed"], 1);
    assert_eq!(status["rules"], json!(["releases", "last-2", "ci", "untagged"]));
    reg.advance(30 * DAY);
    while reg.app.registry.collect(100_000).await.unwrap().reviews > 0 {}
    assert_eq!(before - reg.stored_bytes().await, freed);
});

retention_test!(immutable_tags_can_be_neither_moved_nor_deleted_until_an_admin_lifts_it, |reg| {
    let one = reg.push_image("ret/frozen", "release-1", 300).await;
    let two = reg.push_image("ret/frozen", "other", 301).await;
    let denied = |what: &str, v: Value| {
        assert!(v["errors"][0]["message"].as_str().unwrap().contains("rule `frozen`"), "{what}: {v}");
    };
    // Moving it, deleting it, deleting its manifest or its repository: 403 DENIED, nothing changes.
    let res = reg.put_manifest("ret/frozen", "release-1", OCI_MANIFEST, &two.manifest).await;
    denied("move", assert_oci_error(res, 403, "DENIED").await);
    let res = reg.req(Method::DELETE, "/v2/ret/frozen/manifests/release-1").send().await.unwrap();
    denied("tag delete", assert_oci_error(res, 403, "DENIED").await);
    let res =
        reg.req(Method::DELETE, &format!("/v2/ret/frozen/manifests/{}", one.digest)).send().await.unwrap();
    denied("manifest delete", assert_oci_error(res, 403, "DENIED").await);
    let (status, v) = reg.admin(Method::DELETE, "repositories/ret/frozen", None).await;
    assert_eq!((status, v["errors"][0]["code"].as_str()), (403, Some("DENIED")));
    denied("repository delete", v);
    // The delete preview says so too.
    for target in
        ["ret/frozen:release-1".to_string(), format!("ret/frozen@{}", one.digest), "ret/frozen".into()]
    {
        let (status, v) = reg.admin(Method::GET, &format!("preview/{target}"), None).await;
        assert_eq!(status, 200);
        assert!(v["refused"].as_str().unwrap_or_default().contains("rule `frozen`"), "{target}: {v}");
    }
    // Unlinking a layer it uses is refused as for any live manifest.
    let layer = Digest::sha256_of(&one.layers[0]);
    let res = reg.req(Method::DELETE, &format!("/v2/ret/frozen/blobs/{layer}")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    let res = reg.get("/v2/ret/frozen/manifests/release-1").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(one.digest.as_str()));
    // Pushing the same content again is no move; a new immutable tag is created freely.
    assert_eq!(reg.put_manifest("ret/frozen", "release-1", OCI_MANIFEST, &one.manifest).await.status(), 201);
    assert_eq!(reg.put_manifest("ret/frozen", "release-2", OCI_MANIFEST, &two.manifest).await.status(), 201);
    // Retention never removes it, however old.
    reg.advance(400 * DAY);
    let dry = reg.retention(true).await;
    assert!(tag_removals(&dry).is_empty(), "{dry:#}");

    // An admin lifts it for one change, with a reason, recorded in the history.
    let (status, v) = reg
        .admin(
            Method::POST,
            "unlock/ret/frozen:release-1",
            Some(json!({"reason": "rebuilt for CVE-2026-1", "for": "10m"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (_, history) = reg.admin(Method::GET, "history/ret/frozen:release-1", None).await;
    let unlock = history["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(unlock["kind"], "unlock");
    assert!(unlock["note"].as_str().unwrap().contains("rebuilt for CVE-2026-1"), "{unlock}");
    assert_eq!(reg.put_manifest("ret/frozen", "release-1", OCI_MANIFEST, &two.manifest).await.status(), 201);
    // Used up: the next change is refused again.
    let res = reg.put_manifest("ret/frozen", "release-1", OCI_MANIFEST, &one.manifest).await;
    assert_oci_error(res, 403, "DENIED").await;
    // A lift that lapses unused lifts nothing.
    let (status, _) = reg
        .admin(Method::POST, "unlock/ret/frozen:release-1", Some(json!({"reason": "maybe", "for": "10m"})))
        .await;
    assert_eq!(status, 200);
    reg.advance(11 * 60 * 1000);
    let res = reg.req(Method::DELETE, "/v2/ret/frozen/manifests/release-1").send().await.unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    // Only immutable tags can be unlocked, and only existing ones; a reason is required.
    assert_eq!(reg.admin(Method::POST, "unlock/ret/frozen:other", Some(json!({"reason": "x"}))).await.0, 409);
    assert_eq!(
        reg.admin(Method::POST, "unlock/ret/frozen:release-9", Some(json!({"reason": "x"}))).await.0,
        404
    );
    assert_eq!(
        reg.admin(Method::POST, "unlock/ret/frozen:release-1", Some(json!({"reason": " "}))).await.0,
        400
    );
});

// A push racing retention always wins: each untag is conditional on the digest and push time
// the rule evaluated. A pusher keeps pushing tags (moving them, or pushing the same manifest
// again) while runs — the clock jumping past the rule's windows before each — remove every tag
// not pushed within them. At the end a tag that is there points where its last push put it, and
// a tag that is gone was last pushed before the last run's window began.
retention_test!(pushes_racing_retention_win, |reg| {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    let reg = Arc::new(reg);
    let mut images = Vec::new();
    for seed in 0..4u64 {
        images.push(reg.push_image("ret/race", &format!("ci-{seed}"), 400 + seed * 10).await);
    }
    // The condition itself: evaluated at one digest, the tag moved since — skipped.
    let repo = berth::oci::RepoName::parse("ret/race").unwrap();
    let now = reg.app.registry.clock().now_ms();
    assert_eq!(reg.put_manifest("ret/race", "ci-0", OCI_MANIFEST, &images[1].manifest).await.status(), 201);
    let stale = berth::meta::Untag {
        tag: berth::oci::Tag::parse("ci-0").unwrap(),
        digest: images[0].digest.clone(),
        pushed_at: now,
        actor: "retention:ci".into(),
    };
    let outcome = reg.app.registry.meta().untag_many(&repo, &[stale], 0, now).await.unwrap();
    assert!(
        matches!(&outcome[0], berth::meta::UntagOutcome::Skipped(why) if why.contains("moved since")),
        "{outcome:?}"
    );

    let last_run_start = Arc::new(AtomicI64::new(0));
    // The pusher goes on until the runs are done: at least 3 s and at least five runs, however
    // slow the machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let (reg, images, stop) = (reg.clone(), images.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = std::collections::BTreeMap::new();
            let mut current: std::collections::HashMap<String, usize> =
                (0..4).map(|i| (format!("ci-{i}"), i)).collect();
            let mut k = 0usize;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let tag = format!("ci-{}", k % 4);
                // Every third push is the tag's manifest again; the others move the tag.
                let pick = if k.is_multiple_of(3) { current[&tag] } else { (current[&tag] + 1 + k / 4) % 4 };
                current.insert(tag.clone(), pick);
                let img = &images[pick];
                let before = reg.app.registry.clock().now_ms();
                let res = reg.put_manifest("ret/race", &tag, OCI_MANIFEST, &img.manifest).await;
                assert_eq!(res.status(), 201);
                last.insert(tag, (img.digest.clone(), before));
            }
            last
        })
    };
    let mut runs = 0;
    while runs < 5 || std::time::Instant::now() < deadline {
        reg.advance(15 * DAY);
        last_run_start.store(reg.app.registry.clock().now_ms(), Ordering::SeqCst);
        reg.app.registry.retention_run(None, false, "test").await.unwrap();
        runs += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let last = pusher.await.unwrap();
    let window_began = last_run_start.load(Ordering::SeqCst) - 14 * DAY;
    let (mut present, mut removed) = (0, 0);
    for (tag, (digest, pushed_no_earlier_than)) in &last {
        let res = reg.get(&format!("/v2/ret/race/manifests/{tag}")).await;
        if res.status() == 200 {
            assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()), "{tag}");
            present += 1;
        } else {
            assert!(
                *pushed_no_earlier_than < window_began,
                "{tag} was pushed at {digest} within the window and is gone"
            );
            removed += 1;
        }
    }
    eprintln!(
        "race: {runs} runs; of the last pushes, {present} tags stand and {removed} were removed as stale"
    );
});

// Two replicas whose schedules fire at once run one pass between them (the lease), and a run
// that just happened is not repeated until the interval has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_scheduled_at_once_run_one_pass() {
    let scheduled = RULES.replace("interval = \"0s\"", "interval = \"1h\"");
    let Some(first) = with_rules(Backend::Postgres, &scheduled).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let second = TestRegistry::start_with(first.app.config.clone(), tempfile::tempdir().unwrap()).await;
    first.push_image("ret/app", "ci-1", 500).await;
    first.advance(20 * DAY);
    second.advance(20 * DAY);
    let (a, b) =
        tokio::join!(first.app.registry.scheduled_retention(), second.app.registry.scheduled_retention());
    let ran: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(ran.len(), 1, "one pass between the two replicas");
    assert_eq!(tag_removals(&serde_json::to_value(&ran[0]).unwrap()).len(), 1);
    // Again right away (the lease free now): not due — however many runs were asked for since.
    for _ in 0..25 {
        second.app.registry.retention_run(None, false, "cli").await.unwrap();
    }
    assert!(second.app.registry.scheduled_retention().await.unwrap().is_none());
    first.advance(HOUR + 1);
    second.advance(HOUR + 1);
    assert!(second.app.registry.scheduled_retention().await.unwrap().is_some());
    let (_, status) = second.admin(Method::GET, "retention/status", None).await;
    assert_eq!(status["last_runs"][0]["started_by"], "schedule");
    let (scheduled,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM retention_runs WHERE started_by = 'schedule'")
            .fetch_one(&second.sql().await)
            .await
            .unwrap();
    assert_eq!(scheduled, 2);
}

// The CLI face: a dry run and a real run of `berth retention run` on the embedded deployment,
// and the metrics counting what the run removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_from_the_cli_and_counts_in_the_metrics() {
    let reg = with_rules(Backend::Sqlite, RULES).await.unwrap();
    reg.push_image("ret/cli", "ci-1", 600).await;
    reg.advance(20 * DAY);
    // The CLI's own clock is real, so it sees the tag as fresh: the metrics here come from the
    // server's run instead, and the CLI run over HTTP asks that server.
    let url = format!("http://{}", reg.addr);
    let berth = env!("CARGO_BIN_EXE_berth");
    let out = std::process::Command::new(berth)
        .args(["retention", "run", "--dry-run", "--repo", "ret/**", "--url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would remove 1 tag(s)") && text.contains("ret/cli:ci-1") && text.contains("rule ci"),
        "{text}"
    );
    assert!(reg.tag_set("ret/cli").await.contains("ci-1"));
    let out = std::process::Command::new(berth)
        .args(["retention", "run", "--repo", "other/**", "--url", &url, "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["repositories"], 0, "--repo limits the run");
    let out = std::process::Command::new(berth).args(["retention", "run", "--url", &url]).output().unwrap();
    assert!(out.status.success());
    assert!(reg.tag_set("ret/cli").await.is_empty());
    let metrics = reg.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("berth_retention_removed_total{rule=\"ci\",kind=\"tag\"} 1"), "{metrics}");
    assert!(metrics.contains("berth_retention_runs_total 2"));
    let out =
        std::process::Command::new(berth).args(["retention", "status", "--url", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rules: releases, last-2, ci, untagged") && text.contains("schedule: off"),
        "{text}"
    );
}

// `berth serve` runs the rules on its schedule without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_rules_on_their_schedule() {
    let scheduled = RULES.replace("interval = \"0s\"", "interval = \"200ms\"");
    let reg = with_rules(Backend::Sqlite, &scheduled).await.unwrap();
    reg.push_image("ret/sched", "ci-1", 700).await;
    reg.advance(20 * DAY);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reg.tag_set("ret/sched").await.contains("ci-1") {
        assert!(std::time::Instant::now() < deadline, "the scheduled run never came");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, status) = reg.admin(Method::GET, "retention/status", None).await;
    assert_eq!(status["last_runs"][0]["started_by"], "schedule", "{status}");
    assert_eq!(status["interval_ms"], 200);
}
