//! Pull-through caches against real upstreams: a second Berth with token authentication (its
//! own issuer exercises the Bearer flow) and the reference registry (`docker-registry`, Basic
//! authentication). Byte-exact pulls through the cache, manifests recorded only once their blobs
//! are here, tag revalidation after `tag_ttl`, stale answers while the upstream is down, a
//! tampered upstream blob, one upstream fetch for many concurrent cold pulls, eviction, and
//! read-only cached repositories.

use std::time::Duration;

use berth::config::ProxyConfig;
use berth::oci::Digest;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::auth::{PASSWORD, with_auth};
use crate::backend_test;
use crate::harness::*;

/// A cache of `upstream` under `up/`, as `reg` restarted with it.
pub async fn with_proxy(reg: TestRegistry, proxy: ProxyConfig) -> TestRegistry {
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    config.proxies = vec![proxy];
    TestRegistry::start_with(config, dir).await
}

pub fn proxy_of(upstream: &str) -> ProxyConfig {
    ProxyConfig {
        prefix: "up".into(),
        upstream: upstream.trim_end_matches('/').into(),
        username: None,
        password: None,
        ca_file: None,
        tag_ttl: Duration::from_secs(300),
        max_bytes: None,
        evict_not_pulled_within: None,
        default: false,
    }
}

/// An upstream Berth holding `images` (pushed before access control is switched on), with token
/// authentication: `alice` may pull everything, anonymous only `public/**`.
async fn token_upstream(images: &[(&str, &str, u64)]) -> (TestRegistry, Vec<PushedImage>) {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let mut pushed = Vec::new();
    for (repo, tag, seed) in images {
        pushed.push(up.push_image(repo, tag, *seed).await);
    }
    (with_auth(up, true).await, pushed)
}

async fn body_of(res: reqwest::Response) -> Vec<u8> {
    assert_eq!(res.status(), StatusCode::OK, "{:?}", res.headers());
    res.bytes().await.unwrap().to_vec()
}

async fn manifest(reg: &TestRegistry, path: &str) -> reqwest::Response {
    reg.req(Method::GET, path).header("accept", OCI_MANIFEST).send().await.unwrap()
}

/// Rows of the cache's own tables and of its manifests.
async fn count(reg: &TestRegistry, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&reg.sql().await).await.unwrap();
    n
}

async fn metric(reg: &TestRegistry, name: &str) -> f64 {
    let text = reg.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn fsck_clean(reg: &TestRegistry) {
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
}

backend_test!(pulls_through_a_token_upstream_and_records_what_is_complete, |reg| {
    let (up, images) = token_upstream(&[("team/app", "v1", 7100), ("team/other", "v1", 7200)]).await;
    let mut proxy = proxy_of(&up.url(""));
    proxy.username = Some("alice".into());
    proxy.password = Some(PASSWORD.into());
    let reg = with_proxy(reg, proxy).await;
    let img = &images[0];

    // The manifest by tag: byte-exact, from the upstream (through its token realm).
    let res = manifest(&reg, "/v2/up/team/app/manifests/v1").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
    assert_eq!(body_of(res).await, img.manifest);
    // Its blobs are not here yet: the manifest is pending, not recorded.
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM manifests").await, 0);
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 1);

    // The blobs through the cache, byte-exact; the last one completes the image.
    let config = Digest::sha256_of(&img.config);
    assert_eq!(body_of(reg.get(&format!("/v2/up/team/app/blobs/{config}")).await).await, img.config);
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM manifests").await, 0);
    for layer in &img.layers {
        let d = Digest::sha256_of(layer);
        let res = reg.get(&format!("/v2/up/team/app/blobs/{d}")).await;
        assert_eq!(header(&res, "content-length"), Some(layer.len().to_string().as_str()));
        assert_eq!(&body_of(res).await, layer);
    }
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM manifests WHERE deleted_at IS NULL").await, 1);
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 0);
    let tagged: (String,) = sqlx::query_as(
        "SELECT m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id WHERE t.name = 'v1'",
    )
    .fetch_one(&reg.sql().await)
    .await
    .unwrap();
    assert_eq!(tagged.0, img.digest.as_str());
    let history: (String,) = sqlx::query_as("SELECT actor FROM tag_history WHERE tag = 'v1'")
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    assert_eq!(history.0, "proxy:up");

    // Blob HEAD of something not here: the upstream's size, nothing fetched.
    let other = Digest::sha256_of(&images[1].layers[0]);
    let res = reg.req(Method::HEAD, &format!("/v2/up/team/other/blobs/{other}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-length"), Some(images[1].layers[0].len().to_string().as_str()));
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM blobs").await, 3);

    // Tags and the upstream's unknowns.
    let tags: Value = reg.get("/v2/up/team/app/tags/list").await.json().await.unwrap();
    assert_eq!(tags["name"], "up/team/app");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    assert_oci_error(manifest(&reg, "/v2/up/team/app/manifests/nope").await, 404, "MANIFEST_UNKNOWN").await;
    let missing = Digest::sha256_of(b"not upstream");
    assert_oci_error(reg.get(&format!("/v2/up/team/app/blobs/{missing}")).await, 404, "BLOB_UNKNOWN").await;

    // Cached repositories are read-only.
    let res = reg.req(Method::POST, "/v2/up/team/app/blobs/uploads/").send().await.unwrap();
    let err = assert_oci_error(res, 405, "DENIED").await;
    assert!(err["errors"][0]["message"].as_str().unwrap().contains("pull-through cache"), "{err}");
    let res = reg.put_manifest("up/team/app", "v2", OCI_MANIFEST, &img.manifest).await;
    assert_oci_error(res, 405, "DENIED").await;
    let res = reg
        .req(Method::POST, &format!("/v2/up/team/app/blobs/uploads/?mount={config}&from=up/team/app"))
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 405, "DENIED").await;

    // The upstream stops: what is cached still pulls (a stale tag after its ttl); what is not,
    // fails with an error that names the upstream.
    up.stop().await;
    reg.app.registry.clock().advance_ms(301_000);
    assert_eq!(body_of(manifest(&reg, "/v2/up/team/app/manifests/v1").await).await, img.manifest);
    assert_eq!(body_of(reg.get(&format!("/v2/up/team/app/blobs/{config}")).await).await, img.config);
    let res = manifest(&reg, "/v2/up/team/other/manifests/v1").await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let err: Value = res.json().await.unwrap();
    assert!(err["errors"][0]["message"].as_str().unwrap().contains("upstream"), "{err}");
    assert!(metric(&reg, "berth_proxy_requests_total{proxy=\"up\",result=\"stale\"}").await >= 1.0);
    fsck_clean(&reg).await;
});

backend_test!(a_tag_moved_upstream_is_seen_after_its_ttl_and_not_before, |reg| {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let first = up.push_image("lib/app", "latest", 7300).await;
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;

    let seen = |reg: &TestRegistry| {
        let reg_url = reg.url("/v2/up/lib/app/manifests/latest");
        let client = reg.client.clone();
        async move {
            let res = client.get(reg_url).header("accept", OCI_MANIFEST).send().await.unwrap();
            header(&res, "docker-content-digest").unwrap().to_string()
        }
    };
    assert_eq!(seen(&reg).await, first.digest.as_str());
    let second = up.push_image("lib/app", "latest", 7301).await;
    // Within tag_ttl: the cache answers without asking.
    reg.app.registry.clock().advance_ms(200_000);
    assert_eq!(seen(&reg).await, first.digest.as_str());
    // After it: revalidated, and the move is seen.
    reg.app.registry.clock().advance_ms(200_000);
    assert_eq!(seen(&reg).await, second.digest.as_str());
    // Unchanged upstream after the ttl: a HEAD revalidates what is here.
    reg.app.registry.clock().advance_ms(400_000);
    assert_eq!(seen(&reg).await, second.digest.as_str());
    assert_eq!(metric(&reg, "berth_proxy_requests_total{proxy=\"up\",result=\"revalidated\"}").await, 1.0);
    assert_eq!(metric(&reg, "berth_proxy_requests_total{proxy=\"up\",result=\"hit\"}").await, 1.0);
    assert_eq!(metric(&reg, "berth_proxy_requests_total{proxy=\"up\",result=\"miss\"}").await, 2.0);

    // A delete evicts: gone at once and not restorable, and the next pull fetches it again.
    for layer in second.layers.iter().chain([&second.config]) {
        body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(layer))).await).await;
    }
    let res =
        reg.req(Method::DELETE, &format!("/v2/up/lib/app/manifests/{}", second.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let (why,): (String,) = sqlx::query_as("SELECT unrestorable FROM manifests WHERE digest = $1")
        .bind(second.digest.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    assert_eq!(why, "evicted");
    let res = reg
        .req(Method::GET, &format!("/v2/up/lib/app/manifests/{}", second.digest))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(body_of(res).await, second.manifest);
    fsck_clean(&reg).await;
});

backend_test!(many_concurrent_cold_pulls_cost_one_upstream_fetch, |reg| {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let big = random_bytes(7400, 24 << 20);
    let digest = up.upload_blob("lib/big", &big).await;
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;

    let mut pulls = Vec::new();
    for i in 0..20 {
        let client = reg.client.clone();
        let url = reg.url(&format!("/v2/up/lib/big/blobs/{digest}"));
        pulls.push(tokio::spawn(async move {
            let mut req = client.get(url);
            // Some ask for a range of the blob while it is being fetched.
            if i % 5 == 4 {
                req = req.header("range", "bytes=1000-1999");
            }
            let res = req.send().await.unwrap();
            (i, res.status(), res.bytes().await.unwrap())
        }));
    }
    for pull in pulls {
        let (i, status, bytes) = pull.await.unwrap();
        if i % 5 == 4 {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(&bytes[..], &big[1000..2000]);
        } else {
            assert_eq!(status, StatusCode::OK);
            assert!(bytes[..] == big[..], "pull {i} differs");
        }
    }
    assert_eq!(metric(&reg, "berth_proxy_upstream_bytes_total{proxy=\"up\"}").await, big.len() as f64);
    let upstream_gets =
        metric(&up, "berth_http_requests_total{route=\"blob\",method=\"GET\",status=\"200\"}").await;
    assert_eq!(upstream_gets, 1.0);
    // A client that goes away mid-fetch does not stop it for others.
    let other = random_bytes(7401, 8 << 20);
    let other_digest = up.upload_blob("lib/big", &other).await;
    let mut res = reg.get(&format!("/v2/up/lib/big/blobs/{other_digest}")).await;
    let _ = res.chunk().await.unwrap();
    drop(res);
    let res = reg.get(&format!("/v2/up/lib/big/blobs/{other_digest}")).await;
    assert!(body_of(res).await == other);
    assert_eq!(
        metric(&reg, "berth_proxy_upstream_bytes_total{proxy=\"up\"}").await,
        (big.len() + other.len()) as f64
    );
    fsck_clean(&reg).await;
});
