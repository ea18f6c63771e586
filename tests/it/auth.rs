//! Access control: basic auth against htpasswd, rules per user/group × repository × action,
//! anonymous pull, 401 challenges versus 403, the token flow, the filtered catalog, and the actor
//! in tag history.

use berth::oci::{Digest, RepoName, Tag};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::backend_test;
use crate::harness::*;

pub const PASSWORD: &str = "s3cret-pass";
/// A throwaway EC P-256 key for the token tests.
pub const TOKEN_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgN2FN0Cgj4eUBUhJm
1QkBgP6fQMk9kzkAjpGhZQHfR6ahRANCAAQAYH2TNL+ILHfAtUguKAnYJbGIjXKK
9LdzGRGyFqdW5kxIR9SPry/ENvycedrQ5+q4PF+tmVhLC6aqaRbglcP9
-----END PRIVATE KEY-----
";

/// Restarts `reg` (same metadata and storage) with access control: `alice` may do anything,
/// `robot` (group `ci`) may pull and push `team/*`, `reader` may pull `team/*`, anyone may pull
/// `public/**`. With `tokens`, bearer tokens are on and issued by Berth.
pub async fn with_auth(reg: TestRegistry, tokens: bool) -> TestRegistry {
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\nrobot:{hash}\nreader:{hash}\n")).unwrap();
    let key = dir.path().join("token.pem");
    std::fs::write(&key, TOKEN_KEY).unwrap();
    let token = if tokens {
        format!("[token]\nservice = \"berth-test\"\nsigning_key = {:?}\n", key.display().to_string())
    } else {
        String::new()
    };
    let toml = format!(
        "htpasswd = {:?}\nanonymous_pull = [\"public/**\"]\n{token}\
         [[group]]\nname = \"ci\"\nmembers = [\"robot\"]\n\
         [[rule]]\nwho = [\"alice\"]\nrepositories = [\"**\"]\nactions = [\"pull\", \"push\", \"delete\", \"admin\"]\n\
         [[rule]]\nwho = [\"group:ci\"]\nrepositories = [\"team/*\"]\nactions = [\"pull\", \"push\"]\n\
         [[rule]]\nwho = [\"reader\"]\nrepositories = [\"team/*\"]\nactions = [\"pull\"]\n",
        htpasswd.display().to_string()
    );
    config.auth = Some(toml::from_str(&toml).unwrap());
    TestRegistry::start_with(config, dir).await
}

fn authed(reg: &TestRegistry, method: Method, path: &str, user: &str) -> reqwest::RequestBuilder {
    reg.req(method, path).basic_auth(user, Some(PASSWORD))
}

async fn push_as(reg: &TestRegistry, repo: &str, tag: &str, user: &str, seed: u64) -> (StatusCode, Digest) {
    let layer = random_bytes(seed, 2000);
    let d = Digest::sha256_of(&layer);
    let res = authed(reg, Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}"), user)
        .body(layer)
        .send()
        .await
        .unwrap();
    if res.status() != StatusCode::CREATED {
        return (res.status(), d);
    }
    let config = reg_blob(reg, repo, user, br#"{"os":"linux"}"#).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 14},
        "layers": [{"mediaType": OCI_LAYER, "digest": d.as_str(), "size": 2000}],
    }))
    .unwrap();
    let res = authed(reg, Method::PUT, &format!("/v2/{repo}/manifests/{tag}"), user)
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    (res.status(), Digest::sha256_of(&manifest))
}

async fn reg_blob(reg: &TestRegistry, repo: &str, user: &str, bytes: &[u8]) -> Digest {
    let d = Digest::sha256_of(bytes);
    let res = authed(reg, Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}"), user)
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    d
}

backend_test!(basic_auth_rules_and_challenges, |reg| {
    let reg = with_auth(reg, false).await;
    // No credentials: 401 with the basic challenge, everywhere that needs a caller.
    let res = reg.get("/v2/").await;
    assert_eq!(header(&res, "www-authenticate"), Some("Basic realm=\"Berth\""));
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    assert_oci_error(reg.get("/v2/team/app/tags/list").await, 401, "UNAUTHORIZED").await;
    // Wrong password, unknown user, malformed header: 401.
    let res = reg.req(Method::GET, "/v2/").basic_auth("alice", Some("nope")).send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    let res = reg.req(Method::GET, "/v2/").basic_auth("mallory", Some(PASSWORD)).send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    let res = reg.req(Method::GET, "/v2/").header("authorization", "Basic ***").send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    assert_eq!(authed(&reg, Method::GET, "/v2/", "reader").send().await.unwrap().status(), 200);

    // The CI robot may push to team/*, not elsewhere, and may not delete.
    let (status, digest) = push_as(&reg, "team/app", "v1", "robot", 1).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = push_as(&reg, "other/app", "v1", "robot", 2).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let res = authed(&reg, Method::DELETE, &format!("/v2/team/app/manifests/{digest}"), "robot")
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    // alice may delete, and the tag history says she did.
    let (status, scratch) = push_as(&reg, "team/app", "scratch", "alice", 5).await;
    assert_eq!(status, StatusCode::CREATED);
    let res = authed(&reg, Method::DELETE, &format!("/v2/team/app/manifests/{scratch}"), "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let scratch_history = reg
        .app
        .registry
        .meta()
        .tag_history(&RepoName::parse("team/app").unwrap(), &Tag::parse("scratch").unwrap())
        .await
        .unwrap();
    assert_eq!(
        scratch_history.last().map(|h| (h.kind.as_str(), h.actor.as_deref())),
        Some(("delete", Some("alice")))
    );

    // A pull-only user pulls but cannot push.
    assert_eq!(
        authed(&reg, Method::GET, "/v2/team/app/manifests/v1", "reader").send().await.unwrap().status(),
        200
    );
    let (status, _) = push_as(&reg, "team/app", "v2", "reader", 3).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let res = authed(&reg, Method::POST, "/v2/team/app/blobs/uploads/", "reader").send().await.unwrap();
    assert_oci_error(res, 403, "DENIED").await;

    // Anonymous pull of public repositories only.
    let (status, _) = push_as(&reg, "public/tools", "v1", "alice", 4).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(reg.get("/v2/public/tools/manifests/v1").await.status(), 200);
    assert_oci_error(reg.get("/v2/team/app/manifests/v1").await, 401, "UNAUTHORIZED").await;
    let res = reg.req(Method::POST, "/v2/public/tools/blobs/uploads/").send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;

    // The catalog lists only what the caller may pull.
    let list = |res: reqwest::Response| async { res.json::<Value>().await.unwrap()["repositories"].clone() };
    let all = list(authed(&reg, Method::GET, "/v2/_catalog", "alice").send().await.unwrap()).await;
    assert_eq!(all, serde_json::json!(["public/tools", "team/app"]));
    let reader = list(authed(&reg, Method::GET, "/v2/_catalog?n=1", "reader").send().await.unwrap()).await;
    assert_eq!(reader, serde_json::json!(["public/tools"]));
    let anonymous = list(reg.get("/v2/_catalog").await).await;
    assert_eq!(anonymous, serde_json::json!(["public/tools"]));

    // Mounting from a repository the caller may not pull falls back to a plain upload.
    let secret = reg_blob(&reg, "other/secret", "alice", b"secret bytes").await;
    let res = authed(
        &reg,
        Method::POST,
        &format!("/v2/team/app/blobs/uploads/?mount={secret}&from=other/secret"),
        "robot",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res =
        authed(&reg, Method::HEAD, &format!("/v2/team/app/blobs/{secret}"), "robot").send().await.unwrap();
    assert_eq!(res.status(), 404);

    // Tag history records who moved the tag.
    let history = reg
        .app
        .registry
        .meta()
        .tag_history(&RepoName::parse("team/app").unwrap(), &Tag::parse("v1").unwrap())
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].actor.as_deref(), Some("robot"));
    assert_eq!(history[0].new_digest.as_deref(), Some(digest.as_str()));
});

backend_test!(token_flow, |reg| {
    let reg = with_auth(reg, true).await;
    let res = reg.get("/v2/team/app/tags/list").await;
    let challenge = header(&res, "www-authenticate").unwrap().to_string();
    let realm = reg.url("/auth/token");
    assert_eq!(
        challenge,
        format!("Bearer realm=\"{realm}\",service=\"berth-test\",scope=\"repository:team/app:pull\"")
    );
    assert_oci_error(res, 401, "UNAUTHORIZED").await;

    // A token for the robot, asking for more than it may have.
    let token_for = |user: Option<&'static str>, scope: &'static str| {
        let mut req =
            reg.client.get(reg.url("/auth/token")).query(&[("service", "berth-test"), ("scope", scope)]);
        if let Some(u) = user {
            req = req.basic_auth(u, Some(PASSWORD));
        }
        async move { req.send().await.unwrap() }
    };
    let res = token_for(Some("robot"), "repository:team/app:pull,push,delete").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 300);
    let bearer = |method: Method, path: &str| reg.req(method, path).bearer_auth(&token);

    // The token allows what it grants …
    let layer = b"token layer".to_vec();
    let d = Digest::sha256_of(&layer);
    let res = bearer(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={d}"))
        .body(layer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(bearer(Method::HEAD, &format!("/v2/team/app/blobs/{d}")).send().await.unwrap().status(), 200);
    // … and for anything else answers 401 with the scope to ask for.
    let res = bearer(Method::DELETE, &format!("/v2/team/app/blobs/{d}")).send().await.unwrap();
    assert!(header(&res, "www-authenticate").unwrap().contains("scope=\"repository:team/app:delete\""));
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    let res = bearer(Method::GET, "/v2/other/tags/list").send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;

    // Wrong password: no token. Anonymous: a token good for public pulls only.
    let res = reg.client.get(reg.url("/auth/token")).basic_auth("robot", Some("wrong")).send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    let anon: Value = token_for(None, "repository:public/x:pull,push").await.json().await.unwrap();
    let anon = anon["token"].as_str().unwrap().to_string();
    let res = reg.req(Method::GET, "/v2/public/x/tags/list").bearer_auth(&anon).send().await.unwrap();
    assert_oci_error(res, 404, "NAME_UNKNOWN").await; // allowed through, the repository does not exist
    let res = reg.req(Method::POST, "/v2/public/x/blobs/uploads/").bearer_auth(&anon).send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;

    // Tampered and expired tokens are refused: the robot's claims under another token's signature.
    let (claims, _) = token.rsplit_once('.').unwrap();
    let (_, other_signature) = anon.rsplit_once('.').unwrap();
    let tampered = format!("{claims}.{other_signature}");
    let res = reg.req(Method::GET, "/v2/").bearer_auth(&tampered).send().await.unwrap();
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    reg.app.registry.clock().advance_ms(301 * 1000);
    let res = bearer(Method::HEAD, &format!("/v2/team/app/blobs/{d}")).send().await.unwrap();
    assert_eq!(res.status(), 401);
});

// The admin API decides each request by the rule of its operation (docs/auth.md): changes and
// previews need what the change needs, a repository's records need `pull`, the whole registry
// needs admin on `**`; the repository list shows what the caller may read; the CLI passes
// credentials.
backend_test!(admin_api_needs_the_admin_permission, |reg| {
    let reg = with_auth(reg, false).await;
    let (status, digest) = push_as(&reg, "team/app", "v1", "robot", 11).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = push_as(&reg, "public/tools", "v1", "alice", 12).await;
    assert_eq!(status, StatusCode::CREATED);
    let path = format!("/admin/v1/preview/team/app@{digest}");
    let res = reg.get(&path).await;
    assert_oci_error(res, 401, "UNAUTHORIZED").await;
    for user in ["robot", "reader"] {
        let res = authed(&reg, Method::GET, &path, user).send().await.unwrap();
        assert_oci_error(res, 403, "DENIED").await;
        let res = authed(&reg, Method::DELETE, "/admin/v1/repositories/team/app", user).send().await.unwrap();
        assert_oci_error(res, 403, "DENIED").await;
        let res = authed(&reg, Method::GET, "/admin/v1/repositories", user).send().await.unwrap();
        let list: Value = res.json().await.unwrap();
        let names: Vec<&str> =
            list["repositories"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["public/tools", "team/app"], "{user} may read these, administers none");
    }
    let res = authed(&reg, Method::GET, &path, "alice").send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The collector's status is the whole registry's: admin on every repository (`**`).
    assert_oci_error(reg.get("/admin/v1/gc/status").await, 401, "UNAUTHORIZED").await;
    let res = authed(&reg, Method::GET, "/admin/v1/gc/status", "robot").send().await.unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    let res = authed(&reg, Method::GET, "/admin/v1/gc/status", "alice").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = authed(&reg, Method::GET, "/admin/v1/space", "robot").send().await.unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    assert_eq!(authed(&reg, Method::GET, "/admin/v1/space", "alice").send().await.unwrap().status(), 200);
    // Retention concerns every repository too; lifting a tag's immutability needs admin on its
    // repository (here no rule makes it immutable, so alice gets past access control to a 409).
    for (method, path) in
        [(Method::POST, "/admin/v1/retention/run?dry_run=true"), (Method::GET, "/admin/v1/retention/status")]
    {
        let res = authed(&reg, method.clone(), path, "robot").send().await.unwrap();
        assert_oci_error(res, 403, "DENIED").await;
        assert_eq!(authed(&reg, method, path, "alice").send().await.unwrap().status(), 200, "{path}");
    }
    let unlock = |user| {
        authed(&reg, Method::POST, "/admin/v1/unlock/team/app:v1", user)
            .json(&serde_json::json!({"reason": "x"}))
    };
    assert_oci_error(unlock("robot").send().await.unwrap(), 403, "DENIED").await;
    assert_eq!(unlock("alice").send().await.unwrap().status(), 409);
    // So are the metrics on the main listener.
    assert_oci_error(reg.get("/metrics").await, 401, "UNAUTHORIZED").await;
    let res = authed(&reg, Method::GET, "/metrics", "robot").send().await.unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    assert_eq!(authed(&reg, Method::GET, "/metrics", "alice").send().await.unwrap().status(), 200);
    // Explaining a manifest is a record of its repository: `pull` on it.
    let res = authed(&reg, Method::GET, &format!("/admin/v1/explain/team/app@{digest}"), "robot")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = authed(&reg, Method::GET, &format!("/admin/v1/explain/public/tools@{digest}"), "robot")
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["state"], "gone", "not in public/tools: {body}");
    let res = authed(&reg, Method::GET, &format!("/admin/v1/explain/other/app@{digest}"), "robot")
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 403, "DENIED").await;
    let res = authed(&reg, Method::GET, &format!("/admin/v1/explain/team/app@{digest}"), "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let list: Value = authed(&reg, Method::GET, "/admin/v1/repositories", "alice")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["repositories"].as_array().unwrap().len(), 2);
    // A purge needs admin on every repository holding the blob, and tells nobody else whether
    // a blob exists.
    let layer = Digest::sha256_of(&random_bytes(11, 2000));
    for blob in [layer, Digest::sha256_of(b"stored nowhere")] {
        let body = serde_json::json!({"digest": blob.as_str(), "reason": "test"});
        let res = authed(&reg, Method::POST, "/admin/v1/purge", "robot").json(&body).send().await.unwrap();
        assert_oci_error(res, 403, "DENIED").await;
    }
    assert_eq!(
        authed(&reg, Method::GET, "/v2/team/app/manifests/v1", "robot").send().await.unwrap().status(),
        200
    );
    // The CLI over HTTP with credentials, recorded as the acting user.
    let url = format!("http://{}", reg.addr);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["delete", &format!("team/app@{digest}"), "--url", &url, "--user", "alice"])
        .env("BERTH_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["repos", "delete", "team/app", "--url", &url, "--user", "robot", "--password", PASSWORD])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    let password_file = reg.dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["tombstones", "team/app", "--url", &url, "--user", "alice", "--password-file"])
        .arg(&password_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(digest.as_str()));
    let history = reg
        .app
        .registry
        .meta()
        .tag_history(&RepoName::parse("team/app").unwrap(), &Tag::parse("v1").unwrap())
        .await
        .unwrap();
    assert_eq!(
        history.last().map(|h| (h.kind.as_str(), h.actor.as_deref())),
        Some(("delete", Some("alice")))
    );
});
