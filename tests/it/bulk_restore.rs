//! Bulk restores and retention-run undo, on both deployments: a run that removed 5,000 tags in
//! 50 repositories undone exactly (every tag back at its digest, byte-exact pulls, the history
//! naming the undo), a restore by actor and window with a tag pushed again meanwhile (that one a
//! conflict, the rest restored), dry run = real run, and who may restore what.

use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::*;
use crate::retention::{retention_test, with_rules};

const DAY: i64 = 24 * 3600 * 1000;

/// Tags `old-*` in `undo/…` go once not pushed for a day.
const RULES: &str = r#"
[retention]
interval = "0s"

[[retention.rules]]
name = "stale"
repositories = "undo/**"
tags = "old-.*"
remove_not_pushed_within = "1d"
"#;

/// A manifest of its own (an annotation makes each digest distinct) over one config and layer
/// uploaded once per repository: pushes `n` tags `{prefix}{i}`; returns (tag, digest, bytes).
async fn push_many(
    reg: &TestRegistry,
    repo: &str,
    prefix: &str,
    n: usize,
    seed: u64,
) -> Vec<(String, Digest, Vec<u8>)> {
    let config = format!(r#"{{"os":"linux","seed":{seed}}}"#).into_bytes();
    let layer = random_bytes(seed, 1000);
    let config_digest = reg.upload_blob(repo, &config).await;
    let layer_digest = reg.upload_blob(repo, &layer).await;
    let manifests: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let bytes = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
                "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest.as_str(), "size": layer.len()}],
                "annotations": {"i": format!("{repo}/{prefix}{i}/{seed}")},
            }))
            .unwrap();
            (format!("{prefix}{i}"), bytes)
        })
        .collect();
    for chunk in manifests.chunks(16) {
        let pushes = chunk.iter().map(|(tag, bytes)| reg.put_manifest(repo, tag, OCI_MANIFEST, bytes));
        for res in futures_util::future::join_all(pushes).await {
            assert_eq!(res.status(), StatusCode::CREATED);
        }
    }
    manifests.into_iter().map(|(tag, bytes)| (tag, Digest::sha256_of(&bytes), bytes)).collect()
}

impl TestRegistry {
    async fn bulk(&self, query: &str) -> Value {
        let (status, v) = self.admin(Method::POST, &format!("restore?{query}"), None).await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

/// (delete id, outcome) of every item, in order: what a dry run and a real run must agree on.
fn outcomes(v: &Value) -> Vec<(i64, String)> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["delete_id"].as_i64().unwrap(), i["outcome"].as_str().unwrap().to_string()))
        .collect()
}

// A retention run removes 5,000 tags across 50 repositories; a user deletes one more tag in the
// same minutes. `retention undo` brings back exactly the run's 5,000 — each at its digest,
// pulled byte for byte, its history naming the bulk restore — and not the user's delete. The
// dry run said the same; a second undo finds nothing left to do.
retention_test!(a_retention_run_of_5000_tags_is_undone_exactly, |reg| {
    let mut pushed = Vec::new();
    for r in 0..50 {
        let repo = format!("undo/r{r:02}");
        for (tag, digest, bytes) in push_many(&reg, &repo, "old-", 100, 7000 + r).await {
            pushed.push((repo.clone(), tag, digest, bytes));
        }
    }
    reg.push_image("undo/r00", "keep", 7900).await;
    reg.app.registry.clock().advance_ms(2 * DAY);
    let res = reg.req(Method::DELETE, "/v2/undo/r00/manifests/keep").send().await.unwrap();
    assert_eq!(res.status(), 202);
    let (status, run) = reg.admin(Method::POST, "retention/run?dry_run=false", None).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["tags"].as_array().unwrap().len(), 5000);
    let run_id = run["run_id"].as_i64().expect("a real run has an id");
    for r in [0, 49] {
        let v: Value = reg.get(&format!("/v2/undo/r{r:02}/tags/list")).await.json().await.unwrap();
        assert!(v["tags"].as_array().is_none_or(Vec::is_empty), "{v}");
    }
    // The status lists the run with its id.
    let (_, status) = reg.admin(Method::GET, "retention/status", None).await;
    assert_eq!(status["last_runs"][0]["id"].as_i64(), Some(run_id), "{status}");

    let dry = reg.bulk(&format!("run={run_id}&dry_run=true")).await;
    assert_eq!(
        (dry["restored"].as_i64(), dry["conflicts"].as_i64()),
        (Some(5000), Some(0)),
        "{}",
        dry["items"][0]
    );
    assert!(dry["id"].is_null());
    // Nothing changed.
    let v: Value = reg.get("/v2/undo/r07/tags/list").await.json().await.unwrap();
    assert!(v["tags"].as_array().is_none_or(Vec::is_empty), "a dry run restored {v}");

    let undo = reg.bulk(&format!("run={run_id}")).await;
    assert_eq!(outcomes(&undo), outcomes(&dry), "dry run = real run");
    let bulk_id = undo["id"].as_i64().expect("a real bulk restore has an id");
    assert_eq!(undo["restored"].as_i64(), Some(5000));

    // Every tag at its digest, its manifest byte-exact.
    for chunk in pushed.chunks(32) {
        let paths: Vec<String> =
            chunk.iter().map(|(repo, tag, _, _)| format!("/v2/{repo}/manifests/{tag}")).collect();
        let pulls = paths.iter().map(|p| reg.get(p));
        for ((repo, tag, digest, bytes), res) in chunk.iter().zip(futures_util::future::join_all(pulls).await)
        {
            assert_eq!(res.status(), 200, "{repo}:{tag}");
            assert_eq!(header(&res, "docker-content-digest"), Some(digest.as_str()), "{repo}:{tag}");
            assert_eq!(&res.bytes().await.unwrap()[..], &bytes[..], "{repo}:{tag}");
        }
    }
    // The user's delete stays.
    assert_eq!(reg.get("/v2/undo/r00/manifests/keep").await.status(), 404);
    // The history names the undo.
    let (_, history) = reg.admin(Method::GET, "history/undo/r31:old-42", None).await;
    let last = history["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "restore", "{history}");
    assert_eq!(last["bulk_restore"].as_i64(), Some(bulk_id), "{history}");
    assert_eq!(last["actor"], "anonymous");
    // The record lists the 5,000 deletes it undid; a second undo has nothing left.
    let (status, record) = reg.admin(Method::GET, &format!("restores/{bulk_id}"), None).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["undone"].as_array().unwrap().len(), 5000);
    assert_eq!(record["restored"].as_i64(), Some(5000));
    assert!(record["finished_at"].is_i64());
    let again = reg.bulk(&format!("run={run_id}")).await;
    assert_eq!(again["items"].as_array().unwrap().len(), 0, "{again}");
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
});

/// `alice` administers everything, `ci` may push and delete `app/**`, `dana` administers
/// `team/**`.
async fn with_users(reg: TestRegistry) -> TestRegistry {
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    let hash = bcrypt::hash(crate::auth::PASSWORD, 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\nci:{hash}\ndana:{hash}\n")).unwrap();
    let toml = format!(
        "htpasswd = {:?}\n\
         [[rule]]\nwho = [\"alice\"]\nrepositories = [\"**\"]\nactions = [\"pull\", \"push\", \"delete\", \"admin\"]\n\
         [[rule]]\nwho = [\"ci\"]\nrepositories = [\"app/**\"]\nactions = [\"pull\", \"push\", \"delete\"]\n\
         [[rule]]\nwho = [\"dana\"]\nrepositories = [\"team/**\"]\nactions = [\"pull\", \"push\", \"delete\", \"admin\"]\n",
        htpasswd.display().to_string()
    );
    config.auth = Some(toml::from_str(&toml).unwrap());
    TestRegistry::start_with(config, dir).await
}

fn as_user(reg: &TestRegistry, method: Method, path: &str, user: &str) -> reqwest::RequestBuilder {
    reg.req(method, path).basic_auth(user, Some(crate::auth::PASSWORD))
}

// `ci` deletes tags and a manifest in a window, then pushes one of those tags again; `alice`
// deletes a tag in the same window, and `ci` deleted one before it. A bulk restore of `ci`'s
// deletes in the window brings back everything but the tag pushed again (a conflict naming
// where it points now), leaves `alice`'s delete and the earlier one alone; the dry run said
// exactly that. Only callers administering every repository the pattern can match may run it.
crate::backend_test!(a_bulk_restore_by_actor_and_window_reports_the_tag_pushed_again, |reg| {
    let reg = with_users(reg).await;
    let push = |repo: &'static str, tag: &'static str, seed: u64| {
        let reg = &reg;
        async move {
            let config = format!(r#"{{"seed":{seed}}}"#).into_bytes();
            let layer = random_bytes(seed, 1500);
            let mut digests = Vec::new();
            for bytes in [&config, &layer] {
                let d = Digest::sha256_of(bytes);
                let res = as_user(reg, Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}"), "ci")
                    .body(bytes.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                digests.push(d);
            }
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": digests[0].as_str(), "size": config.len()},
                "layers": [{"mediaType": OCI_LAYER, "digest": digests[1].as_str(), "size": layer.len()}],
            }))
            .unwrap();
            let res = as_user(reg, Method::PUT, &format!("/v2/{repo}/manifests/{tag}"), "ci")
                .header("content-type", OCI_MANIFEST)
                .body(manifest.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            (Digest::sha256_of(&manifest), manifest)
        }
    };
    let delete = |path: String, user: &'static str| {
        let reg = &reg;
        async move {
            let res = as_user(reg, Method::DELETE, &path, user).send().await.unwrap();
            assert_eq!(res.status(), 202, "{path}: {:?}", res.text().await);
        }
    };
    let (a, _) = push("app/one", "a", 100).await;
    let (b, b_bytes) = push("app/one", "b", 101).await;
    let (c, c_bytes) = push("app/one", "c", 102).await;
    let (d, _) = push("app/one", "d", 103).await;
    let (x, _) = push("app/two", "x", 104).await;
    let (y, _) = push("app/two", "y", 105).await;
    delete("/v2/app/one/manifests/d".into(), "ci").await;
    reg.app.registry.clock().advance_ms(60_000);
    let since = reg.app.registry.clock().now_ms();
    delete("/v2/app/one/manifests/a".into(), "ci").await;
    delete("/v2/app/one/manifests/b".into(), "ci").await;
    delete(format!("/v2/app/one/manifests/{c}"), "ci").await;
    delete("/v2/app/two/manifests/x".into(), "ci").await;
    delete("/v2/app/two/manifests/y".into(), "alice").await;
    // `a` pushed again meanwhile, at another image.
    let (a2, _) = push("app/one", "a", 106).await;
    let until = reg.app.registry.clock().now_ms() + 1;
    let query = format!("actor=ci&since={since}&until={until}");

    // Who may: a delete right is not enough; an administrator of team/** may restore there only.
    for (user, q, expected) in [
        ("ci", query.clone(), 403),
        ("ci", format!("{query}&repositories=app/**"), 403),
        ("dana", query.clone(), 403),
        ("dana", format!("{query}&repositories=app/one"), 403),
        ("dana", format!("{query}&repositories=team/**&dry_run=true"), 200),
    ] {
        let res = as_user(&reg, Method::POST, &format!("/admin/v1/restore?{q}"), user).send().await.unwrap();
        assert_eq!(res.status().as_u16(), expected, "{user} {q}");
    }
    let res = reg.req(Method::POST, &format!("/admin/v1/restore?{query}")).send().await.unwrap();
    assert_eq!(res.status(), 401, "anonymous");
    // Bad input changes nothing and says what is wrong.
    for q in
        ["", "since=yesterday", "actor=ci&repositories=App", "actor=ci&run=x", "actor=ci&repository=app/one"]
    {
        let res =
            as_user(&reg, Method::POST, &format!("/admin/v1/restore?{q}"), "alice").send().await.unwrap();
        assert_eq!(res.status(), 400, "{q}");
    }

    let bulk = |q: String| {
        let reg = &reg;
        async move {
            let res =
                as_user(reg, Method::POST, &format!("/admin/v1/restore?{q}"), "alice").send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }
    };
    let dry = bulk(format!("{query}&dry_run=true")).await;
    let real = bulk(query.clone()).await;
    assert_eq!(outcomes(&dry), outcomes(&real), "dry run = real run");
    assert_eq!((real["restored"].as_i64(), real["conflicts"].as_i64()), (Some(3), Some(1)), "{real}");
    let conflict = real["items"].as_array().unwrap().iter().find(|i| i["outcome"] == "conflict").unwrap();
    assert_eq!((conflict["repository"].as_str(), conflict["target"].as_str()), (Some("app/one"), Some("a")));
    assert!(conflict["reason"].as_str().unwrap().contains(a2.as_str()), "{conflict}");
    let pull = |repo: &'static str, reference: String| {
        let reg = &reg;
        async move {
            as_user(reg, Method::GET, &format!("/v2/{repo}/manifests/{reference}"), "alice")
                .send()
                .await
                .unwrap()
        }
    };
    let res = pull("app/one", "b".into()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(&res.bytes().await.unwrap()[..], &b_bytes[..]);
    let res = pull("app/one", "c".into()).await;
    assert_eq!(res.status(), 200, "the manifest delete came back with its tag");
    assert_eq!(&res.bytes().await.unwrap()[..], &c_bytes[..]);
    assert_eq!(header(&pull("app/two", "x".into()).await, "docker-content-digest"), Some(x.as_str()));
    assert_eq!(header(&pull("app/one", "a".into()).await, "docker-content-digest"), Some(a2.as_str()));
    assert_eq!(pull("app/two", "y".into()).await.status(), 404, "another actor's delete");
    assert_eq!(pull("app/one", "d".into()).await.status(), 404, "before the window");
    let _ = (&b, &d, &y);
    // The record keeps the conflict; a take_tags restore moves `a` back to what ci deleted.
    let id = real["id"].as_i64().unwrap();
    let res = as_user(&reg, Method::GET, &format!("/admin/v1/restores/{id}"), "alice").send().await.unwrap();
    let record: Value = res.json().await.unwrap();
    assert_eq!(record["conflicts"].as_i64(), Some(1), "{record}");
    assert!(record["conflict_list"].as_str().unwrap().contains("pushed again"), "{record}");
    let taken = bulk(format!("{query}&take_tags=true")).await;
    assert_eq!(taken["restored"].as_i64(), Some(1), "{taken}");
    assert_eq!(header(&pull("app/one", "a".into()).await, "docker-content-digest"), Some(a.as_str()));
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
});

// What each delete took comes back only as that delete left it: a manifest deleted again since
// (by a delete outside the selection) and a repository deleted again since are conflicts; a
// repository delete restores the repository whole; `anonymous` selects deletes made without
// credentials; and the CLI runs the same request (`berth retention undo`, `berth restore
// --since`, `berth restores`).
crate::backend_test!(a_bulk_restore_undoes_only_what_each_delete_took, |reg| {
    let img = reg.push_image("only/img", "v1", 300).await;
    let other = reg.push_image("only/repo", "v1", 310).await;
    let since = reg.app.registry.clock().now_ms();
    // A manifest delete, restored by hand, then deleted again later (outside the window).
    let res =
        reg.req(Method::DELETE, &format!("/v2/only/img/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let (status, _) = reg.admin(Method::POST, &format!("restore/only/img@{}", img.digest), None).await;
    assert_eq!(status, 200);
    let (status, _) = reg.admin(Method::DELETE, "repositories/only/repo", None).await;
    assert_eq!(status, 200);
    reg.app.registry.clock().advance_ms(60_000);
    let until = reg.app.registry.clock().now_ms();
    reg.app.registry.clock().advance_ms(60_000);
    let res =
        reg.req(Method::DELETE, &format!("/v2/only/img/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let v = reg.bulk(&format!("actor=anonymous&since={since}&until={until}")).await;
    let by_repo =
        |repo: &str| v["items"].as_array().unwrap().iter().find(|i| i["repository"] == repo).unwrap().clone();
    let manifest = by_repo("only/img");
    assert_eq!(manifest["outcome"], "conflict", "{manifest}");
    assert!(manifest["reason"].as_str().unwrap().contains("deleted again"), "{manifest}");
    assert_eq!(by_repo("only/repo")["outcome"], "restored");
    assert_eq!(reg.get("/v2/only/repo/manifests/v1").await.status(), 200);
    assert_eq!(
        reg.get(&format!("/v2/only/repo/blobs/{}", Digest::sha256_of(&other.config))).await.status(),
        200
    );
    assert_eq!(reg.get("/v2/only/img/manifests/v1").await.status(), 404);

    // The CLI: the same requests over HTTP.
    let url = reg.url("");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .args(["--url", url.trim_end_matches('/')])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&[
        "restore",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--actor",
        "anonymous",
        "--dry-run",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("conflict manifest only/img@"), "{out}");
    assert!(out.contains("dry run: would restore 0 deletes"), "{out}");
    let (ok, out, err) = cli(&["history", "only/repo:v1"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().last().unwrap_or_default().contains("restore") && out.contains("(bulk restore "),
        "{out}"
    );
    let (ok, out, err) = cli(&["restores"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 restored, 0 unchanged, 1 conflicts"), "{out}");
    let (ok, _, err) = cli(&["restore"]);
    assert!(!ok, "a restore with neither target nor selection is refused");
    assert!(err.contains("required"), "{err}");
    let (ok, _, err) = cli(&["retention", "undo", "424242"]);
    assert!(ok, "{err}");
});

// Only what the selection took comes back, and the newest selected delete decides:
// - a tag whose manifest a later, unselected delete took stays deleted (a conflict naming it);
// - a manifest delete whose tag was pushed and deleted again since comes back as a conflict;
// - a tag deleted twice, both selected, with take_tags points where the newest delete left it;
// - a repository deleted, pushed to and deleted again comes back whole from both deletes;
// - a tag deleted twice and pushed again where the newer delete left it stays there;
// - an image pushed again by digest after its delete gets back its tag and its referrer;
// - an index and its child deleted apart come back together, the dry run judging them as the
//   real run does.
crate::backend_test!(a_bulk_restore_brings_back_only_what_the_selection_took, |reg| {
    let clock = reg.app.registry.clock().clone();
    let del = |path: String| {
        let reg = &reg;
        async move {
            let res = reg.req(Method::DELETE, &path).send().await.unwrap();
            assert_eq!(res.status(), 202, "{path}");
        }
    };
    let digest_of = |repo: &'static str, tag: &'static str| {
        let reg = &reg;
        async move {
            let res = reg.get(&format!("/v2/{repo}/manifests/{tag}")).await;
            (res.status().as_u16(), header(&res, "docker-content-digest").map(str::to_string))
        }
    };
    // Later deletes happen after `until`.
    let since = clock.now_ms();
    let a = reg.push_image("sel/a", "t", 400).await;
    del("/v2/sel/a/manifests/t".into()).await;
    let m = reg.push_image("sel/m", "t", 410).await;
    del(format!("/v2/sel/m/manifests/{}", m.digest)).await;
    let b = reg.push_image("sel/m", "t", 411).await;
    let twice_a = reg.push_image("sel/twice", "t", 420).await;
    del("/v2/sel/twice/manifests/t".into()).await;
    let twice_b = reg.push_image("sel/twice", "t", 421).await;
    del("/v2/sel/twice/manifests/t".into()).await;
    let r1 = reg.push_image("sel/repo", "one", 430).await;
    assert_eq!(reg.admin(Method::DELETE, "repositories/sel/repo", None).await.0, 200);
    let r2 = reg.push_image("sel/repo", "two", 431).await;
    assert_eq!(reg.admin(Method::DELETE, "repositories/sel/repo", None).await.0, 200);
    let amd = reg.push_image("sel/idx", "amd", 440).await;
    let arm = reg.push_image("sel/idx", "arm", 441).await;
    let (index, _) = reg.push_index("sel/idx", "all", &[&amd, &arm]).await;
    del(format!("/v2/sel/idx/manifests/{index}")).await;
    del(format!("/v2/sel/idx/manifests/{}", amd.digest)).await;
    // A tag deleted twice, then pushed again where the newer delete left it.
    let tt_x = reg.push_image("sel/tt", "t", 450).await;
    del("/v2/sel/tt/manifests/t".into()).await;
    let tt_y = reg.push_image("sel/tt", "t", 451).await;
    del("/v2/sel/tt/manifests/t".into()).await;
    assert_eq!(reg.put_manifest("sel/tt", "t", OCI_MANIFEST, &tt_y.manifest).await.status(), 201);
    let _ = tt_x;
    // An image with a referrer, deleted by digest (the referrer and the tag go with it), then
    // pushed again by digest alone.
    let x = reg.push_image("sel/ref", "x", 460).await;
    let empty = reg.upload_blob("sel/ref", b"{}").await;
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": x.digest.as_str(), "size": x.manifest.len()},
    }))
    .unwrap();
    let sbom_digest = Digest::sha256_of(&sbom);
    assert_eq!(reg.put_manifest("sel/ref", sbom_digest.as_str(), OCI_MANIFEST, &sbom).await.status(), 201);
    del(format!("/v2/sel/ref/manifests/{}", x.digest)).await;
    assert_eq!(reg.get(&format!("/v2/sel/ref/manifests/{sbom_digest}")).await.status(), 404);
    assert_eq!(reg.put_manifest("sel/ref", x.digest.as_str(), OCI_MANIFEST, &x.manifest).await.status(), 201);
    clock.advance_ms(60_000);
    let until = clock.now_ms();
    clock.advance_ms(60_000);
    del(format!("/v2/sel/a/manifests/{}", a.digest)).await;
    del("/v2/sel/m/manifests/t".into()).await;
    let _ = b;

    let query = format!("since={since}&until={until}&take_tags=true");
    let dry = reg.bulk(&format!("{query}&dry_run=true")).await;
    let real = reg.bulk(&query).await;
    assert_eq!(outcomes(&dry), outcomes(&real), "dry run = real run");
    let item = |repo: &str, target: &str| {
        real["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["repository"] == repo && i["target"] == target)
            .cloned()
            .collect::<Vec<Value>>()
    };
    let a_tag = &item("sel/a", "t")[0];
    assert_eq!(a_tag["outcome"], "conflict", "{a_tag}");
    assert!(a_tag["reason"].as_str().unwrap().contains("does not select"), "{a_tag}");
    assert_eq!(digest_of("sel/a", "t").await.0, 404);
    let m_item = &item("sel/m", m.digest.as_str())[0];
    assert_eq!(m_item["outcome"], "conflict", "{m_item}");
    assert!(m_item["reason"].as_str().unwrap().contains("deleted again"), "{m_item}");
    assert_eq!(reg.get(&format!("/v2/sel/m/manifests/{}", m.digest)).await.status(), 404);
    let twice = item("sel/twice", "t");
    assert_eq!(twice.len(), 2);
    assert_eq!(
        (twice[0]["outcome"].as_str(), twice[1]["outcome"].as_str()),
        (Some("restored"), Some("unchanged"))
    );
    assert_eq!(digest_of("sel/twice", "t").await.1.as_deref(), Some(twice_b.digest.as_str()));
    let _ = twice_a;
    for (tag, img) in [("one", &r1), ("two", &r2)] {
        let res = reg.get(&format!("/v2/sel/repo/manifests/{tag}")).await;
        assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()), "sel/repo:{tag}");
    }
    assert_eq!(digest_of("sel/idx", "all").await.1.as_deref(), Some(index.as_str()));
    assert_eq!(digest_of("sel/idx", "amd").await.1.as_deref(), Some(amd.digest.as_str()));
    assert!(
        real["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["repository"] != "sel/idx" || i["outcome"] != "conflict")
    );
    // The newest delete of the tag decides (it was back already): the older one moves nothing.
    let tt = item("sel/tt", "t");
    assert!(tt.iter().all(|i| i["outcome"] == "unchanged"), "{tt:?}");
    assert_eq!(digest_of("sel/tt", "t").await.1.as_deref(), Some(tt_y.digest.as_str()));
    // The image pushed again by digest gets back its tag and its referrer.
    let r = &item("sel/ref", x.digest.as_str())[0];
    assert_eq!(r["outcome"], "restored", "{r}");
    assert_eq!(digest_of("sel/ref", "x").await.1.as_deref(), Some(x.digest.as_str()));
    assert_eq!(reg.get(&format!("/v2/sel/ref/manifests/{sbom_digest}")).await.status(), 200);
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
});

/// The bulk restore of `repo`'s deletes since `since`, through the registry, as a task.
fn bulk_task(
    reg: &TestRegistry,
    repo: &str,
    since: i64,
) -> tokio::task::JoinHandle<Result<berth::registry::BulkRestoreReport, berth::registry::Error>> {
    let registry = reg.app.registry.clone();
    let selection = berth::registry::Selection {
        repositories: Some(berth::auth::Pattern::parse(repo).unwrap()),
        since: Some(berth::time::Moment::At(since)),
        ..Default::default()
    };
    tokio::spawn(async move { registry.bulk_restore(&selection, false, false, Some("bulk")).await })
}

// On PostgreSQL, with a third connection holding the tombstone's row so the order is exact: a
// purge queues first, a bulk restore of the manifest's delete second. The restore sees the purge
// (a conflict: it cannot be restored), nothing comes back, and fsck finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bulk_restore_waiting_behind_a_purge_sees_the_purge() {
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    let repo = "race/bulk-purge";
    let since = reg.app.registry.clock().now_ms();
    let img = reg.push_image(repo, "v1", 7950).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let mut holder = crate::revive::LockHolder::lock(
        &reg,
        "SELECT id FROM manifests WHERE digest = $1 FOR UPDATE",
        &img.digest,
    )
    .await;
    let registry = reg.app.registry.clone();
    let layer = Digest::sha256_of(&img.layers[0]);
    let purge = tokio::spawn(async move { registry.purge_blob(&layer, "a secret", Some("admin")).await });
    holder.wait_for_waiters(1).await;
    let bulk = bulk_task(&reg, repo, since);
    holder.wait_for_waiters(2).await;
    holder.release().await;
    purge.await.unwrap().expect("the purge");
    let report = bulk.await.unwrap().expect("the bulk restore runs");
    assert_eq!((report.restored, report.conflicts), (0, 1), "{:?}", report.items);
    assert!(
        report.items[0].reason.as_deref().unwrap_or_default().contains("cannot be restored"),
        "{:?}",
        report.items
    );
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
    assert_eq!(reg.get(&format!("/v2/{repo}/manifests/v1")).await.status(), 404);
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
}

// On PostgreSQL, a third connection holds a live manifest's row: a bulk restore of its deleted
// tag queues first, a delete of the manifest second. The delete, reading after its lock, sees the
// restored tag and takes it into the tombstone (restorable with it): no tag is left on a
// tombstone, and fsck finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_waiting_behind_a_bulk_restore_takes_the_restored_tag() {
    let Some(reg) = TestRegistry::try_start(Backend::Postgres).await else { return };
    let repo = "race/bulk-delete";
    let img = reg.push_image(repo, "v1", 7960).await;
    assert_eq!(reg.put_manifest(repo, "v2", OCI_MANIFEST, &img.manifest).await.status(), 201);
    let since = reg.app.registry.clock().now_ms();
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/v1")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let mut holder = crate::revive::LockHolder::lock(
        &reg,
        "SELECT id FROM manifests WHERE digest = $1 FOR UPDATE",
        &img.digest,
    )
    .await;
    let bulk = bulk_task(&reg, repo, since);
    holder.wait_for_waiters(1).await;
    let url = reg.url(&format!("/v2/{repo}/manifests/{}", img.digest));
    let client = reg.client.clone();
    let delete = tokio::spawn(async move { client.delete(url).send().await.unwrap().status() });
    holder.wait_for_waiters(2).await;
    holder.release().await;
    let report = bulk.await.unwrap().expect("the bulk restore runs");
    assert_eq!(report.restored, 1, "{:?}", report.items);
    assert_eq!(delete.await.unwrap(), 202);
    for tag in ["v1", "v2"] {
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{tag}")).await.status(), 404, "{tag}");
    }
    let (_, tombstones) = reg.admin(Method::GET, &format!("tombstones/{repo}"), None).await;
    let tags = &tombstones["tombstones"][0]["tags"];
    assert!(
        tags.as_array().unwrap().iter().any(|t| t == "v1"),
        "the delete took the restored tag: {tombstones}"
    );
    let fsck = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(fsck.clean(), "{:?}", fsck.problems);
}
