//! In-use pins: what a source reports running is kept by retention and the collector, an
//! explicit delete of it is refused unless an administrator forces it, a report lapses after its
//! ttl — and the Kubernetes reporter turns recorded `kubectl` JSON into the right references.

use std::process::{Command, Stdio};

use berth::oci::Digest;
use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_test;
use crate::harness::*;
use crate::retention::{retention_test, with_rules};

const HOUR: i64 = 3600 * 1000;
const DAY: i64 = 24 * HOUR;
const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// Keep the newest `main-*` tag; remove untagged manifests older than three days.
const RULES: &str = r#"
[retention]
interval = "0s"

[[retention.rules]]
name = "last-1"
repositories = "pin/**"
tags = "main-.*"
keep_last = 1

[[retention.rules]]
name = "untagged"
repositories = "pin/**"
remove_untagged_older_than = "3d"
"#;

impl TestRegistry {
    async fn report(&self, source: &str, images: &[String], ttl: &str) -> Value {
        let (status, v) = self
            .admin(Method::PUT, &format!("in-use/{source}"), Some(json!({"images": images, "ttl": ttl})))
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    fn advance_clock(&self, ms: i64) {
        self.app.registry.clock().advance_ms(ms);
    }
}

fn tags(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{}:{}", t["repository"].as_str().unwrap(), t["tag"].as_str().unwrap_or("-")))
        .collect()
}

// Retention keeps what runs: a tag its rule selects stays while a report pins its manifest (or
// an index that lists it), reported as kept "in use by SOURCE"; the dry run says so exactly as
// the real run does; once the report lapses the next run removes it.
retention_test!(retention_keeps_what_a_report_pins, |reg| {
    let old = reg.push_image("pin/app", "main-1", 9000).await;
    reg.advance_clock(1000);
    reg.push_image("pin/app", "main-2", 9001).await;
    reg.advance_clock(1000);
    reg.push_image("pin/app", "main-3", 9002).await;
    // An index listing a child that is tagged on its own: the pin on the index keeps the child.
    let amd = reg.push_image("pin/multi", "main-a", 9003).await;
    reg.advance_clock(1000);
    reg.push_image("pin/multi", "main-b", 9004).await;
    let (index, _) = reg.push_index("pin/multi", "release", &[&amd]).await;
    // A report naming a tag pins the manifest it points at when reported.
    let v = reg.report("prod", &["pin/app:main-1".into(), format!("pin/multi@{index}")], "2h").await;
    let pinned: Vec<&str> =
        v["pinned"].as_array().unwrap().iter().map(|p| p["digest"].as_str().unwrap()).collect();
    assert_eq!(pinned, [old.digest.as_str(), index.as_str()]);
    assert_eq!(v["unresolved"], json!([]));

    let dry = reg.admin(Method::POST, "retention/run?dry_run=true", None).await.1;
    assert_eq!(tags(&dry, "tags"), ["pin/app:main-2"], "{dry}");
    assert_eq!(tags(&dry, "kept_in_use"), ["pin/app:main-1", "pin/multi:main-a"]);
    assert!(
        dry["kept_in_use"][0]["kept"].as_str().unwrap().starts_with("in use by prod, reported at "),
        "{dry}"
    );
    let run = reg.admin(Method::POST, "retention/run", None).await.1;
    assert_eq!(tags(&run, "tags"), tags(&dry, "tags"));
    assert_eq!(tags(&run, "kept_in_use"), tags(&dry, "kept_in_use"));
    assert_eq!(reg.get("/v2/pin/app/manifests/main-1").await.bytes().await.unwrap(), old.manifest);
    assert_eq!(reg.get("/v2/pin/multi/manifests/main-a").await.status(), 200);
    assert_eq!(reg.get("/v2/pin/app/manifests/main-2").await.status(), 404);

    // The report lapses: the next run takes what it kept.
    reg.advance_clock(2 * HOUR + 1);
    let run = reg.admin(Method::POST, "retention/run", None).await.1;
    assert_eq!(tags(&run, "tags"), ["pin/app:main-1", "pin/multi:main-a"], "{run}");
    assert_eq!(run["kept_in_use"], json!([]));
    let (_, list) = reg.admin(Method::GET, "in-use", None).await;
    assert_eq!(list["reports"][0]["lapsed"], true, "{list}");
});

// An explicit delete of a pinned manifest — by the OCI API, the admin API, or of its whole
// repository — is refused with 405 DENIED naming the source; an administrator forces it.
// Deleting a tag on it is not refused (the manifest stays, held by the pin).
retention_test!(a_delete_of_what_runs_is_refused_unless_forced, |reg| {
    let img = reg.push_image("pin/svc", "v1", 9010).await;
    reg.report("cluster-a", &[format!("pin/svc@{}", img.digest)], "1h").await;
    let res = reg.req(Method::DELETE, &format!("/v2/pin/svc/manifests/{}", img.digest)).send().await.unwrap();
    let err = assert_oci_error(res, 405, "DENIED").await;
    let message = err["errors"][0]["message"].as_str().unwrap().to_string();
    assert!(message.contains("in use by cluster-a, reported at"), "{message}");
    let (status, v) = reg.admin(Method::DELETE, "repositories/pin/svc", None).await;
    assert_eq!(status, 405, "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("cluster-a"), "{v}");
    // The preview says the same.
    let (_, preview) = reg.admin(Method::GET, &format!("preview/pin/svc@{}", img.digest), None).await;
    assert!(preview["refused"].as_str().unwrap_or_default().contains("cluster-a"), "{preview}");
    // A tag delete leaves the manifest: allowed.
    assert_eq!(reg.req(Method::DELETE, "/v2/pin/svc/manifests/v1").send().await.unwrap().status(), 202);
    let (status, v) =
        reg.admin(Method::DELETE, &format!("manifests/pin/svc@{}?force=true", img.digest), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(reg.get(&format!("/v2/pin/svc/manifests/{}", img.digest)).await.status(), 404);
    let (status, v) = reg.admin(Method::DELETE, "manifests/pin/svc@sha256:abc?force=maybe", None).await;
    assert_eq!(status, 400, "{v}");

    // A lapsed report refuses nothing.
    let other = reg.push_image("pin/svc", "v2", 9011).await;
    reg.report("cluster-a", &["pin/svc:v2".into()], "1m").await;
    reg.advance_clock(61_000);
    assert_eq!(
        reg.req(Method::DELETE, &format!("/v2/pin/svc/manifests/{}", other.digest))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
});

// The collector keeps a pinned manifest past its untagged grace (gc explain shows the pin); a new
// report without it, or a withdrawal, lets it go at the next pass.
retention_test!(the_collector_keeps_what_runs_until_the_pin_goes, |reg| {
    let img = reg.push_image("pin/gc", "v1", 9020).await;
    let kept = reg.push_image("pin/gc", "v2", 9021).await;
    assert_eq!(reg.req(Method::DELETE, "/v2/pin/gc/manifests/v1").send().await.unwrap().status(), 202);
    let v = reg
        .report(
            "deploys",
            &[format!("pin/gc@{}", img.digest), "pin/gc:v2".into(), "pin/none:v9".into()],
            "30d",
        )
        .await;
    assert_eq!(v["unresolved"][0]["reference"], "pin/none:v9", "{v}");
    reg.advance_clock(10 * DAY);
    let pass = reg.app.registry.collect(100_000).await.unwrap();
    assert_eq!(pass.manifests, 0, "{pass:?}");
    assert_eq!(reg.get(&format!("/v2/pin/gc/manifests/{}", img.digest)).await.status(), 200);
    let (_, explained) = reg.admin(Method::GET, &format!("explain/pin/gc@{}", img.digest), None).await;
    let holds = explained["holds"].as_array().unwrap();
    assert!(
        holds
            .iter()
            .any(|h| h["reason"] == "in-use" && h["detail"].as_str().unwrap().starts_with("by deploys")),
        "{explained}"
    );
    // Reported again without it: the collector takes it (and only it).
    reg.report("deploys", &["pin/gc:v2".into()], "30d").await;
    let pass = reg.app.registry.collect(100_000).await.unwrap();
    assert_eq!(pass.manifests, 1, "{pass:?}");
    assert_eq!(reg.get(&format!("/v2/pin/gc/manifests/{}", img.digest)).await.status(), 404);
    assert_eq!(reg.get("/v2/pin/gc/manifests/v2").await.bytes().await.unwrap(), kept.manifest);
    let (status, _) = reg.admin(Method::DELETE, "in-use/deploys", None).await;
    assert_eq!(status, 200);
    let (status, v) = reg.admin(Method::DELETE, "in-use/deploys", None).await;
    assert_eq!(status, 404, "{v}");
    let (_, list) = reg.admin(Method::GET, "in-use", None).await;
    assert_eq!(list["reports"], json!([]));
    // Bad reports change nothing.
    for (source, body) in [
        ("bad source!", json!({"images": []})),
        ("ok", json!({"images": [], "ttl": "0s"})),
        ("ok", json!({"images": [], "extra": 1})),
    ] {
        let (status, v) =
            reg.admin(Method::PUT, &format!("in-use/{}", source.replace(' ', "%20")), Some(body)).await;
        assert_eq!(status, 400, "{source}: {v}");
    }
    assert_eq!(reg.admin(Method::GET, "in-use", None).await.1["reports"], json!([]));
    // A malformed reference (a pod stuck in InvalidImageName) pins nothing but costs nothing else.
    let v = reg.report("ok", &["Pin/GC:v2".into(), "pin/gc:v2".into()], "1h").await;
    assert_eq!(v["pinned"][0]["digest"], kept.digest.as_str(), "{v}");
    assert_eq!(v["unresolved"][0]["reference"], "Pin/GC:v2", "{v}");
});

// A report naming a tag pins the digest it resolves to when reported: a later push that moves the
// tag moves nothing pinned.
retention_test!(a_reported_tag_pins_its_digest_at_report_time, |reg| {
    let first = reg.push_image("pin/tagged", "live", 9030).await;
    reg.report("edge", &["pin/tagged:live".into()], "1h").await;
    let second = reg.push_image("pin/tagged", "live", 9031).await;
    let res =
        reg.req(Method::DELETE, &format!("/v2/pin/tagged/manifests/{}", first.digest)).send().await.unwrap();
    assert_eq!(res.status(), 405);
    let res =
        reg.req(Method::DELETE, &format!("/v2/pin/tagged/manifests/{}", second.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
});

// The Kubernetes reporter, on recorded `kubectl get pods -A -o json` output: every container of
// this registry (init containers too) by the digest its node resolved, a pending one by its tag
// (`latest` when it names none), nothing from other registries, no bare local image ids, each once.
#[test]
fn the_kubernetes_reporter_reads_recorded_pods() {
    let fixture =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kubectl-pods.json")).unwrap();
    let mut child = Command::new(BERTH)
        .args(["in-use", "kubernetes", "prod", "--registry", "registry.example.com:5000", "--print"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(&fixture).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let expected = [
        "ops/cron:nightly".to_string(),
        "ops/other:v2".into(),
        format!("ops/pinned@{}", d('4')),
        "ops/tool:latest".into(),
        format!("team/migrate@{}", d('2')),
        format!("team/web@{}", d('1')),
        format!("team/worker@{}", d('3')),
    ];
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().collect::<Vec<_>>(), expected);
}

// The reporter end to end: pods as the API shows them, posted to a running Berth; what it reports
// is pinned.
backend_test!(the_kubernetes_reporter_pins_what_pods_run, |reg| {
    let img = reg.push_image("k8s/app", "v1", 9040).await;
    let pending = reg.push_image("k8s/app", "v2", 9041).await;
    let host = reg.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let pods = json!({"kind": "List", "items": [
        {"kind": "Pod", "spec": {"containers": [{"name": "app", "image": format!("{host}/k8s/app:v1")}]},
         "status": {"containerStatuses": [{"name": "app", "imageID": format!("{host}/k8s/app@{}", img.digest)}]}},
        {"kind": "Pod", "spec": {"containers": [{"name": "app", "image": format!("{host}/k8s/app:v2")}]},
         "status": {"phase": "Pending"}},
    ]});
    let mut child = Command::new(BERTH)
        .args([
            "in-use",
            "kubernetes",
            "cluster-1",
            "--registry",
            &host,
            "--ttl",
            "10m",
            "--url",
            &reg.url(""),
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(pods.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pinned: Vec<&str> =
        v["pinned"].as_array().unwrap().iter().map(|p| p["digest"].as_str().unwrap()).collect();
    let mut expected = vec![img.digest.as_str(), pending.digest.as_str()];
    expected.sort();
    let mut pinned = pinned;
    pinned.sort();
    assert_eq!(pinned, expected, "{v}");
    let res = reg
        .req(Method::DELETE, &format!("/v2/k8s/app/manifests/{}", Digest::sha256_of(&pending.manifest)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
});

// Scanner pulls don't count: with `[access] ignore_pulls_from = ["group:ci"]`, the group's
// pulls (GET and HEAD) leave a manifest's last-pull time as it was; anyone else's refresh it.
backend_test!(ignored_pullers_refresh_no_pull_time, |reg| {
    use crate::auth::{PASSWORD, with_auth};
    let reg = with_auth(reg, false).await;
    let mut config = reg.app.config.clone();
    config.ignore_pulls_from = vec!["group:ci".into()];
    let dir = reg.stop().await;
    let reg = TestRegistry::start_with(config, dir).await;
    let layer = random_bytes(9050, 500);
    let d = Digest::sha256_of(&layer);
    let up = reg
        .req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={d}"))
        .basic_auth("alice", Some(PASSWORD));
    assert_eq!(up.body(layer).send().await.unwrap().status(), 201);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": d.as_str(), "size": 500},
        "layers": [],
    }))
    .unwrap();
    let res = reg
        .req(Method::PUT, "/v2/team/app/manifests/v1")
        .basic_auth("alice", Some(PASSWORD))
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let pulled_at = || async {
        reg.app.registry.flush_access().await.unwrap();
        let (at,): (Option<i64>,) =
            sqlx::query_as("SELECT pulled_at FROM manifests").fetch_one(&reg.sql().await).await.unwrap();
        at
    };
    assert_eq!(pulled_at().await, None);
    for method in [Method::GET, Method::HEAD] {
        let res = reg
            .req(method, "/v2/team/app/manifests/v1")
            .basic_auth("robot", Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(pulled_at().await, None, "the scanner's pulls counted");
    let before = reg.app.registry.clock().now_ms();
    let res = reg
        .req(Method::GET, "/v2/team/app/manifests/v1")
        .basic_auth("reader", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let at = pulled_at().await.expect("another user's pull counts");
    assert!(at >= before, "{at} < {before}");
});

// Lock, then check (PostgreSQL, made deterministic by holding the manifest's row from a third
// connection): a report and a delete queued on the same manifest end consistently in either
// order — the report first pins it and the delete is refused; the delete first tombstones it and
// the report says it pins nothing. Never a delete of what a committed report pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_and_a_delete_racing_for_a_manifest_agree() {
    use crate::revive::LockHolder;
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    for (seed, report_first) in [(9060, true), (9070, false)] {
        let repo = format!("race/pin{seed}");
        let img = reg.push_image(&repo, "v1", seed).await;
        let mut holder =
            LockHolder::lock(&reg, "SELECT id FROM manifests WHERE digest = $1 FOR UPDATE", &img.digest)
                .await;
        let registry = reg.app.registry.clone();
        let reference = format!("{repo}@{}", img.digest);
        let report = move || {
            let (registry, reference) = (registry.clone(), reference.clone());
            tokio::spawn(async move { registry.report_in_use("racer", &[reference], 3_600_000, None).await })
        };
        let registry = reg.app.registry.clone();
        let (name, digest) = (berth::oci::RepoName::parse(&repo).unwrap(), img.digest.clone());
        let delete = move || {
            let (registry, name, digest) = (registry.clone(), name.clone(), digest.clone());
            tokio::spawn(async move { registry.delete_manifest(&name, &digest, false, None).await })
        };
        let (reported, deleted) = if report_first {
            let r = report();
            holder.wait_for_waiters(1).await;
            let d = delete();
            holder.wait_for_waiters(2).await;
            holder.release().await;
            (r.await.unwrap().unwrap(), d.await.unwrap())
        } else {
            let d = delete();
            holder.wait_for_waiters(1).await;
            let r = report();
            holder.wait_for_waiters(2).await;
            holder.release().await;
            (r.await.unwrap().unwrap(), d.await.unwrap())
        };
        if report_first {
            assert_eq!(reported.report.pinned.len(), 1);
            let err = deleted.expect_err("the delete must see the pin");
            assert!(err.to_string().contains("in use by racer"), "{err}");
            assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 200);
        } else {
            deleted.expect("the delete came first");
            assert!(reported.report.pinned.is_empty(), "{reported:?}");
            assert_eq!(reported.unresolved.len(), 1);
            assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
        }
    }
}

// Two reports of one source at once (an overlapping cron run) take turns on the source's row:
// both succeed, and the source ends with exactly the later report's pins.
backend_test!(overlapping_reports_of_one_source_take_turns, |reg| {
    let a = reg.push_image("pin/overlap", "a", 9080).await;
    let b = reg.push_image("pin/overlap", "b", 9081).await;
    for round in 0..10 {
        let mut runs = Vec::new();
        for refs in [
            vec!["pin/overlap:a".to_string()],
            vec!["pin/overlap:a".to_string(), "pin/overlap:b".to_string()],
        ] {
            let registry = reg.app.registry.clone();
            runs.push(tokio::spawn(
                async move { registry.report_in_use("cron", &refs, 3_600_000, None).await },
            ));
        }
        for run in runs {
            run.await.unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let (_, list) = reg.admin(Method::GET, "in-use", None).await;
        let pinned: Vec<&str> = list["reports"][0]["pinned"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["digest"].as_str().unwrap())
            .collect();
        assert!(pinned == [a.digest.as_str()] || pinned.len() == 2, "round {round}: {list}");
        let _ = &b;
    }
});

// A cluster's reporter needs no admin power: a rule granting `in-use` on `**` lets it report,
// list and withdraw — and nothing else (no purge, no forced delete, no pull); a rule for a part
// of the registry is not enough (a report pins anywhere); a `delete` user cannot force.
backend_test!(a_reporter_account_pins_and_can_do_nothing_else, |reg| {
    use crate::auth::PASSWORD;
    let img = reg.push_image("team/app", "v1", 9090).await;
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("cluster:{hash}\nlead:{hash}\ndeleter:{hash}\nroot:{hash}\n")).unwrap();
    let toml = format!(
        "htpasswd = {:?}\n\
         [[rule]]\nwho = [\"cluster\"]\nrepositories = [\"**\"]\nactions = [\"in-use\"]\n\
         [[rule]]\nwho = [\"lead\"]\nrepositories = [\"team/**\"]\nactions = [\"in-use\", \"pull\"]\n\
         [[rule]]\nwho = [\"deleter\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"delete\"]\n\
         [[rule]]\nwho = [\"root\"]\nrepositories = [\"**\"]\nactions = [\"admin\"]\n",
        htpasswd.display().to_string()
    );
    config.auth = Some(toml::from_str(&toml).unwrap());
    let reg = TestRegistry::start_with(config, dir).await;
    let call = |method: Method, path: &str, user: &str, body: Option<Value>| {
        let mut req = reg.req(method, &format!("/admin/v1/{path}")).basic_auth(user, Some(PASSWORD));
        if let Some(body) = body {
            req = req.json(&body);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let report = json!({"images": [format!("team/app@{}", img.digest)], "ttl": "1h"});
    assert_eq!(call(Method::PUT, "in-use/prod", "lead", Some(report.clone())).await, 403);
    assert_eq!(call(Method::PUT, "in-use/prod", "cluster", Some(report)).await, 200);
    assert_eq!(call(Method::GET, "in-use", "cluster", None).await, 200);
    let digest = img.digest.as_str();
    assert_eq!(
        call(Method::POST, "purge", "cluster", Some(json!({"digest": digest, "reason": "x"}))).await,
        403
    );
    assert_eq!(
        call(Method::DELETE, &format!("manifests/team/app@{digest}?force=true"), "cluster", None).await,
        403
    );
    assert_eq!(
        call(Method::DELETE, &format!("manifests/team/app@{digest}?force=true"), "deleter", None).await,
        403
    );
    assert_eq!(call(Method::DELETE, &format!("manifests/team/app@{digest}"), "deleter", None).await, 405);
    let pulled = reg.req(Method::GET, "/v2/team/app/manifests/v1").basic_auth("cluster", Some(PASSWORD));
    assert_eq!(pulled.send().await.unwrap().status(), 403);
    assert_eq!(
        call(Method::DELETE, &format!("manifests/team/app@{digest}?force=true"), "root", None).await,
        200
    );
    assert_eq!(call(Method::DELETE, "in-use/prod", "cluster", None).await, 200);
});
