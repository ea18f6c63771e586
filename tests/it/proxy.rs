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
use crate::revive::LockHolder;

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
        fill_missing_after: Some(Duration::from_secs(10)),
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

    // Eviction never takes a blob other content references: a local image shares a layer.
    let shared = &second.layers[0];
    let keep = reg.upload_blob("local/keep", shared).await;
    let config = reg.upload_blob("local/keep", b"{}").await;
    let local = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": keep.as_str(), "size": shared.len()}],
    }))
    .unwrap();
    assert_eq!(
        reg.put_manifest("local/keep", "v1", OCI_MANIFEST, &local).await.status(),
        StatusCode::CREATED
    );
    for layer in second.layers.iter().chain([&second.config]) {
        body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(layer))).await).await;
    }
    let res =
        reg.req(Method::DELETE, &format!("/v2/up/lib/app/manifests/{}", second.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // Past every window, twice: the manifest goes first, then what it alone referenced.
    for _ in 0..2 {
        reg.app.registry.clock().advance_ms(30 * 24 * 3600 * 1000);
        reg.app.registry.collect(10_000).await.unwrap();
    }
    reg.app.registry.drain_outbox().await.unwrap();
    assert_eq!(&body_of(reg.get(&format!("/v2/local/keep/blobs/{keep}")).await).await, shared);
    let only_cached = Digest::sha256_of(&second.layers[1]);
    assert_eq!(count(&reg, &format!("SELECT COUNT(*) FROM blobs WHERE digest = '{only_cached}'")).await, 0);
    fsck_clean(&reg).await;

    // The console marks cached repositories and shows the cache on the space page.
    let list = reg.get("/ui/").await.text().await.unwrap();
    assert!(list.contains("pull-through cache of http://") && list.contains(">cache</span>"), "{list}");
    let page = reg.get("/ui/repo?name=up/lib/app").await.text().await.unwrap();
    assert!(page.contains("id=\"cache\"") && page.contains("/lib/app"), "{page}");
    let space = reg.get("/ui/space").await.text().await.unwrap();
    assert!(space.contains("id=\"caches\"") && space.contains("Pull-through caches"), "{space}");
    let status = berth_cli(&["proxy", "status", "--url", &reg.url("")]);
    assert!(status.contains("up/…") && status.contains("revalidated"), "{status}");
});

/// Runs the `berth` CLI; returns its output.
fn berth_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(BERTH).args(args).output().unwrap();
    assert!(out.status.success(), "berth {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GETs `url`, hashing the body as it streams (with Berth's own SHA-256: the CPU's SHA
/// instructions even in a debug build); (status, its SHA-256, its length). A body cut short (the
/// first client of a fill that fell too far behind it) is asked for again, as real clients do:
/// the cut must never look like success, and the retry must be whole.
async fn streamed_digest(
    client: &reqwest::Client,
    url: String,
    range: Option<&str>,
) -> (StatusCode, Digest, usize) {
    for _ in 0..2 {
        let mut req = client.get(&url);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let mut res = req.send().await.unwrap();
        let status = res.status();
        let mut hasher = berth::oci::sha256::Sha256::default();
        let mut len = 0;
        let whole = loop {
            match res.chunk().await {
                Ok(Some(chunk)) => {
                    len += chunk.len();
                    hasher.update(&chunk);
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        if whole {
            let digest = Digest::parse(&format!("sha256:{}", hex::encode(hasher.finish()))).unwrap();
            return (status, digest, len);
        }
    }
    panic!("{url}: cut short twice");
}

backend_test!(many_concurrent_cold_pulls_cost_one_upstream_fetch, |reg| {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let big = random_bytes(7400, 256 << 20);
    let digest = up.upload_blob("lib/big", &big).await;
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;

    // 20 cold pulls at once of a 256 MiB blob; some ask for a range of it while it is fetched.
    let range_digest = Digest::sha256_of(&big[1000..2000]);
    let mut pulls = Vec::new();
    for i in 0..20 {
        let client = reg.client.clone();
        let url = reg.url(&format!("/v2/up/lib/big/blobs/{digest}"));
        pulls.push(tokio::spawn(async move {
            let range = (i % 5 == 4).then_some("bytes=1000-1999");
            (i, streamed_digest(&client, url, range).await)
        }));
    }
    for pull in pulls {
        let (i, (status, got, len)) = pull.await.unwrap();
        if i % 5 == 4 {
            assert_eq!((status, &got, len), (StatusCode::PARTIAL_CONTENT, &range_digest, 1000), "pull {i}");
        } else {
            assert_eq!((status, &got, len), (StatusCode::OK, &digest, big.len()), "pull {i}");
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

/// The reference registry (`docker-registry`) on a filesystem root, with Basic authentication
/// (`alice`), listening on a free loopback port.
pub struct ReferenceUpstream {
    pub registry: crate::e2e::DockerRegistry,
    pub root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ReferenceUpstream {
    pub fn start() -> Option<Self> {
        if !crate::e2e::have("docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash(PASSWORD, 4).unwrap())).unwrap();
        let auth = format!("auth:\n  htpasswd:\n    realm: upstream\n    path: {}\n", htpasswd.display());
        let registry = crate::e2e::DockerRegistry::start(&root, "", &auth);
        Some(ReferenceUpstream { registry, root, _dir: dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.registry.addr)
    }

    fn req(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let url = if url.starts_with("http") { url.to_string() } else { format!("{}{url}", self.url()) };
        reqwest::Client::new().request(method, url).basic_auth("alice", Some(PASSWORD))
    }

    /// Uploads `bytes` to `repo` in one request.
    pub async fn upload(&self, repo: &str, bytes: &[u8]) -> Digest {
        let d = Digest::sha256_of(bytes);
        let res = self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let location = header(&res, "location").unwrap().to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let res = self
            .req(Method::PUT, &format!("{location}{sep}digest={d}"))
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
        d
    }

    /// Pushes an image like [`TestRegistry::push_image`].
    pub async fn push_image(&self, repo: &str, tag: &str, seed: u64) -> PushedImage {
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "seed": seed})
            .to_string()
            .into_bytes();
        let layers = vec![random_bytes(seed, 3000), random_bytes(seed + 1, 5000)];
        let config_digest = self.upload(repo, &config).await;
        let mut descs = Vec::new();
        for layer in &layers {
            let d = self.upload(repo, layer).await;
            descs
                .push(serde_json::json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": layer.len()}));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        let res = self
            .req(Method::PUT, &format!("/v2/{repo}/manifests/{tag}"))
            .header("content-type", OCI_MANIFEST)
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "{:?}", res.text().await);
        PushedImage { digest: Digest::sha256_of(&manifest), manifest, config, layers }
    }

    /// Replaces the stored bytes of `digest` with as many other bytes.
    pub fn tamper(&self, digest: &Digest) {
        let hex = digest.hex();
        let data = self.root.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
        let len = std::fs::metadata(&data).unwrap().len() as usize;
        std::fs::write(&data, random_bytes(99, len)).unwrap();
    }
}

backend_test!(a_basic_auth_reference_upstream_a_tampered_blob_and_mirror_names, |reg| {
    let Some(up) = ReferenceUpstream::start() else { return };
    let img = up.push_image("lib/app", "v1", 7500).await;
    let mut proxy = proxy_of(&up.url());
    proxy.username = Some("alice".into());
    proxy.password = Some(PASSWORD.into());
    proxy.default = true;
    let reg = with_proxy(reg, proxy).await;

    // By prefix, by the default mirror (no prefix), and by containerd's ?ns=: the same cache.
    for path in [
        "/v2/up/lib/app/manifests/v1".to_string(),
        "/v2/lib/app/manifests/v1".to_string(),
        format!("/v2/lib/app/manifests/v1?ns={}", up.registry.addr),
    ] {
        let res = manifest(&reg, &path).await;
        assert_eq!(body_of(res).await, img.manifest, "{path}");
    }
    for blob in img.layers.iter().chain([&img.config]) {
        let d = Digest::sha256_of(blob);
        assert_eq!(&body_of(reg.get(&format!("/v2/lib/app/blobs/{d}")).await).await, blob);
    }
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM manifests m JOIN repositories r ON r.id = m.repository_id WHERE r.name = 'up/lib/app'").await, 1);
    // A local repository of that name is served locally; pushes of unprefixed names stay local.
    let local = reg.push_image("lib/mine", "v1", 7501).await;
    assert_eq!(body_of(manifest(&reg, "/v2/lib/mine/manifests/v1").await).await, local.manifest);

    // A blob whose upstream bytes do not match its digest: the pull fails visibly (the body
    // ends short) and nothing is stored, then or on a second try.
    let bad = up.upload("lib/app", &random_bytes(7502, 200_000)).await;
    up.tamper(&bad);
    for _ in 0..2 {
        let res = reg.get(&format!("/v2/up/lib/app/blobs/{bad}")).await;
        match res.status() {
            StatusCode::OK => assert!(res.bytes().await.is_err(), "a tampered blob's body must not complete"),
            status => assert_eq!(status, StatusCode::BAD_GATEWAY),
        }
        let stored = count(&reg, &format!("SELECT COUNT(*) FROM blobs WHERE digest = '{bad}'")).await;
        assert_eq!(stored, 0);
    }
    // The upload sessions of the failed fills are gone with their bytes.
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM uploads").await, 0);
    fsck_clean(&reg).await;
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.orphans.is_empty(), "{:?}", report.orphans);
});

/// Pushes an image with one layer of `size` random bytes; returns it.
async fn push_sized(up: &TestRegistry, repo: &str, tag: &str, seed: u64, size: usize) -> PushedImage {
    let config = serde_json::json!({"os": "linux", "seed": seed}).to_string().into_bytes();
    let layer = random_bytes(seed, size);
    let c = up.upload_blob(repo, &config).await;
    let l = up.upload_blob(repo, &layer).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": c.as_str(), "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": l.as_str(), "size": size}],
    }))
    .unwrap();
    assert_eq!(up.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await.status(), StatusCode::CREATED);
    PushedImage { digest: Digest::sha256_of(&manifest), manifest, config, layers: vec![layer] }
}

/// Pulls `img` through the cache by tag; every byte checked.
async fn pull_all(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    img: &PushedImage,
) -> Result<(), String> {
    let res = client
        .get(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if res.status() != StatusCode::OK {
        return Err(format!("manifest {repo}:{tag}: {}", res.status()));
    }
    if res.bytes().await.map_err(|e| e.to_string())? != img.manifest {
        return Err(format!("manifest {repo}:{tag} differs"));
    }
    for blob in img.layers.iter().chain([&img.config]) {
        let d = Digest::sha256_of(blob);
        let res =
            client.get(format!("{base}/v2/{repo}/blobs/{d}")).send().await.map_err(|e| e.to_string())?;
        if res.status() != StatusCode::OK {
            return Err(format!("blob {d} of {repo}: {}", res.status()));
        }
        let got = res.bytes().await.map_err(|e| format!("blob {d} of {repo}: {e}"))?;
        if got[..] != blob[..] {
            return Err(format!("blob {d} of {repo} differs"));
        }
    }
    Ok(())
}

backend_test!(eviction_keeps_the_cache_under_its_cap_while_pulls_run, |reg| {
    const MIB: usize = 1 << 20;
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let mut images = Vec::new();
    for i in 0..6u64 {
        images.push(push_sized(&up, &format!("lib/app{i}"), "v1", 7600 + i * 10, MIB).await);
    }
    let mut proxy = proxy_of(&up.url(""));
    proxy.max_bytes = Some(3 * MIB as u64);
    // The clock jumps days below; a fill in flight must not look like an abandoned upload.
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    config.proxies = vec![proxy];
    config.upload_expire_after_secs = 365 * 24 * 3600;
    let reg = TestRegistry::start_with(config, dir).await;
    let base = reg.url("");
    for (i, img) in images.iter().enumerate() {
        pull_all(&reg.client, &base, &format!("up/lib/app{i}"), "v1", img).await.unwrap();
    }
    let registry = reg.app.registry.clone();
    assert!(registry.meta().cache_bytes("up").await.unwrap() > 6 * MIB as i64);

    // Pulls of every image go on while the evictor and the collector run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pullers = Vec::new();
    for p in 0..3usize {
        let (client, base, images, stop) = (reg.client.clone(), base.clone(), images.clone(), stop.clone());
        pullers.push(tokio::spawn(async move {
            let mut pulls = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = (pulls * 7 + p) % images.len();
                pull_all(&client, &base, &format!("up/lib/app{i}"), "v1", &images[i]).await?;
                pulls += 1;
            }
            Ok::<usize, String>(pulls)
        }));
    }
    for _ in 0..4 {
        registry.flush_access().await.unwrap();
        // Pulls refill what is evicted meanwhile: the bound is checked once they stop.
        registry.evict_caches().await.unwrap();
        // Past every window: the collector takes what eviction left unreferenced.
        registry.clock().advance_ms(3 * 24 * 3600 * 1000);
        registry.collect(10_000).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pullers {
        let pulls = p.await.unwrap().unwrap();
        assert!(pulls > 0);
    }
    let reports = registry.evict_caches().await.unwrap();
    assert!(reports[0].bytes_after <= 3 * MIB as i64, "{reports:?}");
    assert!(
        !reports[0].evicted.is_empty() || registry.meta().cache_bytes("up").await.unwrap() <= 3 * MIB as i64
    );
    registry.clock().advance_ms(3 * 24 * 3600 * 1000);
    registry.collect(10_000).await.unwrap();
    registry.drain_outbox().await.unwrap();
    fsck_clean(&reg).await;
    // What the collector left is what the cache holds, plus nothing unaccounted for.
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.bytes_checked <= 4 * MIB as u64, "{report:?}");

    // Not pulled within evict_not_pulled_within: evicted whatever the space.
    let mut config = reg.app.config.clone();
    let dir = reg.stop().await;
    config.proxies[0].max_bytes = None;
    config.proxies[0].evict_not_pulled_within = Some(Duration::from_secs(3600));
    let reg = TestRegistry::start_with(config, dir).await;
    // A new process has a new clock: move it past the times the first one wrote.
    reg.app.registry.clock().advance_ms(20 * 24 * 3600 * 1000);
    pull_all(&reg.client, &reg.url(""), "up/lib/app0", "v1", &images[0]).await.unwrap();
    // Pull times are written with the time of their flush.
    reg.app.registry.flush_access().await.unwrap();
    reg.app.registry.clock().advance_ms(2 * 3600 * 1000);
    pull_all(&reg.client, &reg.url(""), "up/lib/app1", "v1", &images[1]).await.unwrap();
    reg.app.registry.flush_access().await.unwrap();
    let reports = reg.app.registry.evict_caches().await.unwrap();
    let evicted = reports[0].evicted.join(" ");
    assert!(evicted.contains("up/lib/app0@"), "{reports:?}");
    assert!(!evicted.contains("up/lib/app1@"), "{reports:?}");
    let status: Value = reg.get("/admin/v1/proxies").await.json().await.unwrap();
    assert_eq!(status["proxies"][0]["prefix"], "up");
    assert_eq!(
        status["proxies"][0]["last_eviction"]["evicted"].as_array().unwrap().len(),
        reports[0].evicted.len()
    );
});

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

fn proxy_toml(upstream: &str) -> String {
    format!("[[proxy]]\nprefix = \"up\"\nupstream = {upstream:?}\n")
}

async fn blob_rows(metadata_url: &str, digest: &Digest) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(metadata_url).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
        .bind(digest.as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// `kill -9` of the cache while it fetches a large blob: after a restart nothing of it is
/// visible, `berth fsck` is clean, and the next pull fetches it whole.
async fn kill_9_mid_fetch(config_toml: String, metadata_url: String, dir: &std::path::Path) {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let big = random_bytes(7700, 64 << 20);
    let digest = up.upload_blob("lib/big", &big).await;
    let config = dir.join("berth.toml");
    std::fs::write(&config, format!("{config_toml}{}", proxy_toml(&up.url("")))).unwrap();
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    let (mut cache, addr) = serve_process(&args, &dir.join("ready"));
    let client = reqwest::Client::new();
    let mut res = client.get(format!("http://{addr}/v2/up/lib/big/blobs/{digest}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut got = 0;
    while got < (4 << 20) {
        got += res.chunk().await.unwrap().expect("more bytes").len();
    }
    cache.kill().unwrap(); // SIGKILL, mid-fetch
    cache.wait().unwrap();
    assert!(res.bytes().await.is_err(), "a body cut by the crash must not look complete");
    assert_eq!(blob_rows(&metadata_url, &digest).await, 0, "no partial blob is recorded");
    let out =
        std::process::Command::new(BERTH).args(["fsck", "--json", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "fsck after kill -9: {}", String::from_utf8_lossy(&out.stdout));

    let (mut cache, addr) = serve_process(&args, &dir.join("ready"));
    let res = client.get(format!("http://{addr}/v2/up/lib/big/blobs/{digest}")).send().await.unwrap();
    assert!(body_of(res).await == big);
    assert_eq!(blob_rows(&metadata_url, &digest).await, 1);
    cache.kill().unwrap();
    cache.wait().unwrap();
    let out =
        std::process::Command::new(BERTH).args(["fsck", "--json", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "fsck: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fetch_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = berth::config::Config::embedded(&data).metadata_url;
    kill_9_mid_fetch(format!("data_dir = {:?}\n", data.display().to_string()), url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fetch_scale_out() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    kill_9_mid_fetch(scale_out_toml(&c), c.metadata_url.clone(), dir.path()).await;
}

/// Two replicas of one cache (one PostgreSQL, one bucket): concurrent cold pulls through both
/// fetch the blob at most once per replica, every pull is byte-exact, and one blob is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_cache() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = push_sized(&up, "lib/app", "v1", 7800, 16 << 20).await;
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, format!("{}{}", scale_out_toml(&c), proxy_toml(&up.url("")))).unwrap();
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    let replicas: Vec<_> =
        (0..2).map(|i| serve_process(&args, &dir.path().join(format!("ready-{i}")))).collect();
    let bases: Vec<String> = replicas.iter().map(|(_, a)| format!("http://{a}")).collect();
    let client = reqwest::Client::new();
    let mut pulls = Vec::new();
    for i in 0..10 {
        let (client, base, img) = (client.clone(), bases[i % 2].clone(), img.clone());
        pulls.push(tokio::spawn(async move { pull_all(&client, &base, "up/lib/app", "v1", &img).await }));
    }
    for p in pulls {
        p.await.unwrap().unwrap();
    }
    let layer_gets =
        metric(&up, "berth_http_requests_total{route=\"blob\",method=\"GET\",status=\"200\"}").await;
    // Two blobs (config and layer), each fetched at most once per replica.
    assert!(layer_gets <= 4.0, "{layer_gets} upstream blob fetches");
    assert_eq!(blob_rows(&c.metadata_url, &Digest::sha256_of(&img.layers[0])).await, 1);
    // The image is recorded once, complete, and pulls from either replica without the upstream.
    up.stop().await;
    for base in &bases {
        pull_all(&client, base, "up/lib/app", "v1", &img).await.unwrap();
    }
    for (mut child, _) in replicas {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let out =
        std::process::Command::new(BERTH).args(["fsck", "--json", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "fsck: {}", String::from_utf8_lossy(&out.stdout));
}

backend_test!(a_manifest_alone_is_completed_sharing_what_the_cache_holds, |reg| {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    // Two images over one shared base layer, in two repositories.
    let base = random_bytes(7900, 300_000);
    let mut images = Vec::new();
    for (i, repo) in ["lib/a", "lib/b"].into_iter().enumerate() {
        let config = serde_json::json!({"os": "linux", "n": i}).to_string().into_bytes();
        let own = random_bytes(7901 + i as u64, 50_000);
        let c = up.upload_blob(repo, &config).await;
        let b = up.upload_blob(repo, &base).await;
        let o = up.upload_blob(repo, &own).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": c.as_str(), "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": b.as_str(), "size": base.len()},
                       {"mediaType": OCI_LAYER, "digest": o.as_str(), "size": own.len()}],
        }))
        .unwrap();
        assert_eq!(up.put_manifest(repo, "v1", OCI_MANIFEST, &manifest).await.status(), 201);
        images.push(PushedImage {
            digest: Digest::sha256_of(&manifest),
            manifest,
            config,
            layers: vec![base.clone(), own],
        });
    }
    let mut proxy = proxy_of(&up.url(""));
    proxy.fill_missing_after = Some(Duration::from_millis(200));
    let reg = with_proxy(reg, proxy).await;
    pull_all(&reg.client, &reg.url(""), "up/lib/a", "v1", &images[0]).await.unwrap();

    // Only b's manifest is asked for (a client that has every layer already): the cache
    // completes the image by itself, linking the base layer from up/lib/a, fetching the rest.
    body_of(manifest(&reg, "/v2/up/lib/b/manifests/v1").await).await;
    let recorded = "SELECT COUNT(*) FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                    WHERE r.name = 'up/lib/b' AND m.deleted_at IS NULL";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(&reg, recorded).await == 0 {
        assert!(std::time::Instant::now() < deadline, "the pending manifest was never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 0);
    let fetched =
        metric(&up, "berth_http_requests_total{route=\"blob\",method=\"GET\",status=\"200\"}").await;
    assert_eq!(fetched, 5.0, "a's three blobs and b's own two; the shared base layer once");
    // The completed image pulls without the upstream.
    up.stop().await;
    pull_all(&reg.client, &reg.url(""), "up/lib/b", "v1", &images[1]).await.unwrap();
    fsck_clean(&reg).await;
});

/// An upstream that redirects blob downloads to object storage (a scale-out Berth with
/// `storage.s3.redirect`): the cache follows the redirect, and stores the blob byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_an_upstream_redirect_to_object_storage() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut config) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    config.storage_s3.as_mut().unwrap().redirect = true;
    let up = TestRegistry::start_with(config, dir).await;
    let img = up.push_image("lib/app", "v1", 8000).await;
    let layer = Digest::sha256_of(&img.layers[0]);
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(up.url(&format!("/v2/lib/app/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT, "the upstream redirects");

    let reg = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;
    pull_all(&reg.client, &reg.url(""), "up/lib/app", "v1", &img).await.unwrap();
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM manifests WHERE deleted_at IS NULL").await, 1);
    fsck_clean(&reg).await;
}

// Exact races on PostgreSQL: a held row lock stops one side at the instant that matters while
// the other queues behind it (SQLite's single writer serializes these).

/// A cache of `up` on PostgreSQL, or `None` when PostgreSQL is not configured.
async fn postgres_cache_of(up: &TestRegistry) -> Option<TestRegistry> {
    let reg = TestRegistry::try_start(Backend::Postgres).await?;
    Some(with_proxy(reg, proxy_of(&up.url(""))).await)
}

async fn storage_key_of(reg: &TestRegistry, digest: &Digest) -> String {
    let (key,): (String,) = sqlx::query_as("SELECT storage_key FROM blobs WHERE digest = $1")
        .bind(digest.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    key
}

/// Pushes to `reg` an image of `blobs` (the first as its config) in `repo`.
async fn push_local(reg: &TestRegistry, repo: &str, blobs: &[&Vec<u8>]) {
    let mut descs = Vec::new();
    for blob in blobs {
        let d = reg.upload_blob(repo, blob).await;
        descs.push(serde_json::json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": blob.len()}));
    }
    let config = descs.remove(0);
    let local = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config["digest"], "size": config["size"]},
        "layers": descs,
    }))
    .unwrap();
    assert_eq!(reg.put_manifest(repo, "v1", OCI_MANIFEST, &local).await.status(), StatusCode::CREATED);
}

/// A fetched manifest recorded while the collector takes one of its blobs: the record waits for
/// the collector's locks, sees the blob gone, and keeps the manifest pending — never recorded
/// naming a blob that is not here. The blob's next pull stores it again and completes the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_manifest_recorded_behind_the_collector_sees_the_collection() {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = up.push_image("lib/app", "v1", 7600).await;
    let Some(reg) = postgres_cache_of(&up).await else { return };
    let path = format!("/v2/up/lib/app/manifests/{}", img.digest);
    assert_eq!(body_of(manifest(&reg, &path).await).await, img.manifest);
    for blob in img.layers.iter().chain([&img.config]) {
        body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(blob))).await).await;
    }
    let live = "SELECT COUNT(*) FROM manifests m JOIN repositories r ON r.id = m.repository_id \
                WHERE r.name = 'up/lib/app' AND m.deleted_at IS NULL";
    assert_eq!(count(&reg, live).await, 1);
    // A local image keeps the config and the second layer: the first is the cache's alone.
    push_local(&reg, "local/keep", &[&img.config, &img.layers[1]]).await;
    assert_eq!(reg.req(Method::DELETE, &path).send().await.unwrap().status(), StatusCode::ACCEPTED);
    reg.app.registry.clock().advance_ms(30 * 24 * 3600 * 1000);
    let layer = Digest::sha256_of(&img.layers[0]);
    let old_key = storage_key_of(&reg, &layer).await;

    // The collector takes the evicted manifest, then stops holding the layer's rows, on the
    // outbox row of its bytes ...
    let mut holder = LockHolder::lock_on(
        &reg,
        "INSERT INTO gc_outbox (storage_key, enqueued_at, next_attempt) VALUES ($1, 0, 0) RETURNING storage_key",
        &old_key,
    )
    .await;
    let registry = reg.app.registry.clone();
    let collect = tokio::spawn(async move { registry.collect(10_000).await });
    holder.wait_for_waiters(1).await;
    // ... and a pull of the image, fetched again, records it behind the collector.
    let (client, url) = (reg.client.clone(), reg.url(&path));
    let pull =
        tokio::spawn(async move { client.get(url).header("accept", OCI_MANIFEST).send().await.unwrap() });
    holder.wait_for_waiters(2).await;
    holder.roll_back().await;
    let collected = collect.await.unwrap().unwrap();
    assert_eq!((collected.manifests, collected.blobs), (1, 1), "{collected:?}");
    assert_eq!(body_of(pull.await.unwrap()).await, img.manifest);
    assert_eq!(count(&reg, live).await, 0, "recorded without its layer");
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 1);
    fsck_clean(&reg).await;

    // The layer's next pull stores it again (under a new key); the image's other blobs, which
    // the collector unlinked here too (the local image holds them elsewhere), complete it.
    let blob_path = format!("/v2/up/lib/app/blobs/{layer}");
    assert_eq!(body_of(reg.get(&blob_path).await).await, img.layers[0]);
    for blob in [&img.layers[1], &img.config] {
        assert_eq!(
            &body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(blob))).await).await,
            blob
        );
    }
    assert_eq!(count(&reg, live).await, 1);
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 0);
    reg.app.registry.drain_outbox().await.unwrap();
    assert_ne!(storage_key_of(&reg, &layer).await, old_key);
    assert_eq!(body_of(reg.get(&blob_path).await).await, img.layers[0]);
    fsck_clean(&reg).await;
}

/// A revalidation that moves a tag, and an eviction of the image the tag named, both queued on
/// the tag: the eviction goes first and removes the tag with its image; the move then writes the
/// tag again for the new image, which is recorded and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_moved_by_revalidation_outlives_the_eviction_of_its_old_image() {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let first = up.push_image("lib/app", "latest", 7610).await;
    let Some(reg) = postgres_cache_of(&up).await else { return };
    let tag_path = "/v2/up/lib/app/manifests/latest";
    assert_eq!(body_of(manifest(&reg, tag_path).await).await, first.manifest);
    for blob in first.layers.iter().chain([&first.config]) {
        body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(blob))).await).await;
    }
    // Upstream, `latest` moves to an image of the same blobs (so it is recorded at once here).
    let mut moved: Value = serde_json::from_slice(&first.manifest).unwrap();
    moved["annotations"] = serde_json::json!({"moved": "yes"});
    let moved = serde_json::to_vec(&moved).unwrap();
    assert_eq!(
        up.put_manifest("lib/app", "latest", OCI_MANIFEST, &moved).await.status(),
        StatusCode::CREATED
    );
    let moved_digest = Digest::sha256_of(&moved);
    reg.app.registry.clock().advance_ms(301_000);

    let mut holder =
        LockHolder::lock_on(&reg, "SELECT name FROM tags WHERE name = $1 FOR UPDATE", "latest").await;
    let (client, url) = (reg.client.clone(), reg.url(&format!("/v2/up/lib/app/manifests/{}", first.digest)));
    let evict = tokio::spawn(async move { client.delete(url).send().await.unwrap().status() });
    holder.wait_for_waiters(1).await;
    let (client, url) = (reg.client.clone(), reg.url(tag_path));
    let pull =
        tokio::spawn(async move { client.get(url).header("accept", OCI_MANIFEST).send().await.unwrap() });
    holder.wait_for_waiters(2).await;
    holder.release().await;
    assert_eq!(evict.await.unwrap(), StatusCode::ACCEPTED);
    let res = pull.await.unwrap();
    assert_eq!(header(&res, "docker-content-digest"), Some(moved_digest.as_str()));
    assert_eq!(body_of(res).await, moved);

    let (tagged,): (String,) = sqlx::query_as(
        "SELECT m.digest FROM tags t JOIN manifests m ON m.id = t.manifest_id WHERE t.name = 'latest'",
    )
    .fetch_one(&reg.sql().await)
    .await
    .unwrap();
    assert_eq!(tagged, moved_digest.as_str());
    let (why,): (Option<String>,) = sqlx::query_as("SELECT unrestorable FROM manifests WHERE digest = $1")
        .bind(first.digest.as_str())
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    assert_eq!(why.as_deref(), Some("evicted"));
    let res = manifest(&reg, tag_path).await;
    assert_eq!(header(&res, "docker-content-digest"), Some(moved_digest.as_str()));
    fsck_clean(&reg).await;
}

/// A blob stored here for a local image, purged while a cache fill of the same digest is about
/// to link it: the fill waits for the purge, finds the row gone and stores its own bytes as the
/// blob; the client's body is whole and the purged image stays purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_behind_a_purge_of_its_digest_stores_its_own_bytes() {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = up.push_image("lib/app", "v1", 7620).await;
    let Some(reg) = postgres_cache_of(&up).await else { return };
    push_local(&reg, "local/keep", &[&img.config, &img.layers[0]]).await;
    let layer = Digest::sha256_of(&img.layers[0]);
    let old_key = storage_key_of(&reg, &layer).await;

    let mut holder =
        LockHolder::lock(&reg, "SELECT id FROM blobs WHERE digest = $1 FOR UPDATE", &layer).await;
    let registry = reg.app.registry.clone();
    let purge_of = layer.clone();
    let purge = tokio::spawn(async move { registry.purge_blob(&purge_of, "a secret", Some("admin")).await });
    holder.wait_for_waiters(1).await;
    let (client, url) = (reg.client.clone(), reg.url(&format!("/v2/up/lib/app/blobs/{layer}")));
    let pull = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    holder.wait_for_waiters(2).await;
    holder.release().await;
    let purged = purge.await.unwrap().expect("the purge");
    assert_eq!(purged.purged.manifests.len(), 1, "{purged:?}");
    assert_eq!(body_of(pull.await.unwrap()).await, img.layers[0]);

    assert_eq!(reg.get("/v2/local/keep/manifests/v1").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(count(&reg, &format!("SELECT COUNT(*) FROM blobs WHERE digest = '{layer}'")).await, 1);
    assert_ne!(storage_key_of(&reg, &layer).await, old_key);
    reg.app.registry.drain_outbox().await.unwrap();
    assert_eq!(body_of(reg.get(&format!("/v2/up/lib/app/blobs/{layer}")).await).await, img.layers[0]);
    fsck_clean(&reg).await;
}

/// A tag deleted while the fill that completes its image is about to record it with that tag:
/// the fill checks the cache's resolution of the tag under a lock, after the delete forgot it,
/// and records the image untagged — a deleted tag is not written back by a fill that read it
/// earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_deleted_while_a_fill_records_its_image_stays_deleted() {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = up.push_image("lib/app", "v1", 7630).await;
    let Some(reg) = postgres_cache_of(&up).await else { return };
    assert_eq!(body_of(manifest(&reg, "/v2/up/lib/app/manifests/v1").await).await, img.manifest);
    for blob in [&img.config, &img.layers[1]] {
        body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(blob))).await).await;
    }
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_pending").await, 1);

    let mut holder =
        LockHolder::lock_on(&reg, "SELECT tag FROM proxy_tags WHERE tag = $1 FOR UPDATE", "v1").await;
    let (client, url) = (reg.client.clone(), reg.url("/v2/up/lib/app/manifests/v1"));
    let delete = tokio::spawn(async move { client.delete(url).send().await.unwrap().status() });
    holder.wait_for_waiters(1).await;
    // The last layer completes the image; its record reads the tag, then waits to check it.
    let last = Digest::sha256_of(&img.layers[0]);
    let (client, url) = (reg.client.clone(), reg.url(&format!("/v2/up/lib/app/blobs/{last}")));
    let pull = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    holder.wait_for_waiters(2).await;
    holder.roll_back().await;
    assert_eq!(delete.await.unwrap(), StatusCode::ACCEPTED);
    assert_eq!(body_of(pull.await.unwrap()).await, img.layers[0]);

    let live = "SELECT COUNT(*) FROM manifests WHERE deleted_at IS NULL";
    assert_eq!(count(&reg, live).await, 1, "the image is recorded");
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM tags").await, 0, "the deleted tag came back");
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_tags").await, 0);
    // Nor is it restored: a cached tag follows its upstream.
    let (name, tag) =
        (berth::oci::RepoName::parse("up/lib/app").unwrap(), berth::oci::Tag::parse("v1").unwrap());
    let refused = reg.app.registry.restore_tag(&name, &tag, false, Some("admin")).await;
    assert!(matches!(refused, Err(berth::registry::Error::ReadOnlyCache(_))), "{refused:?}");
    fsck_clean(&reg).await;
}

// A conditional delete of a cached tag whose image is still pending is judged by the cache's
// resolution, with or without a repository row yet; a refused one forgets nothing.
backend_test!(a_cached_tags_conditional_delete_is_judged_by_its_resolution, |reg| {
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let img = up.push_image("lib/app", "v1", 7640).await;
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;
    let other = Digest::sha256_of(b"another image");
    let delete = |if_match: &Digest| {
        reg.req(Method::DELETE, "/v2/up/lib/app/manifests/v1")
            .header("if-match", format!("\"{if_match}\""))
            .send()
    };
    for with_repository_row in [false, true] {
        assert_eq!(body_of(manifest(&reg, "/v2/up/lib/app/manifests/v1").await).await, img.manifest);
        if with_repository_row {
            // One blob linked: the repository row exists, the image is still pending.
            body_of(reg.get(&format!("/v2/up/lib/app/blobs/{}", Digest::sha256_of(&img.config))).await).await;
        }
        let rows = count(&reg, "SELECT COUNT(*) FROM repositories").await;
        assert_eq!(rows, i64::from(with_repository_row));
        assert_eq!(delete(&other).await.unwrap().status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_tags").await, 1, "a refused delete forgot");
        let res = delete(&img.digest).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(count(&reg, "SELECT COUNT(*) FROM proxy_tags").await, 0);
        assert_eq!(count(&reg, "SELECT COUNT(*) FROM tags").await, 0);
    }
    fsck_clean(&reg).await;
});

/// An upstream that answers every blob GET with an endless body of unannounced length (chunked):
/// a misbehaving server no real registry can play.
async fn endless_upstream() -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let Ok(n) = conn.read(&mut request).await else { return };
                if !String::from_utf8_lossy(&request[..n]).contains("/blobs/") {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
                    return;
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let chunk =
                    [format!("{:x}\r\n", 64 * 1024).into_bytes(), vec![b'x'; 64 * 1024], b"\r\n".to_vec()]
                        .concat();
                while conn.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    format!("http://{addr}")
}

backend_test!(an_upstream_body_of_unannounced_length_is_cut_at_the_caps_size, |reg| {
    let mut proxy = proxy_of(&endless_upstream().await);
    proxy.max_bytes = Some(4 << 20);
    let reg = with_proxy(reg, proxy).await;
    let digest = Digest::sha256_of(b"anything");
    // A body of unknown length is served from storage once stored: here, an error naming the cap.
    let res = reg.get(&format!("/v2/up/lib/app/blobs/{digest}")).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let err: Value = res.json().await.unwrap();
    assert!(err["errors"][0]["message"].as_str().unwrap().contains("max_bytes"), "{err}");
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM blobs").await, 0);
    for _ in 0..100 {
        if count(&reg, "SELECT COUNT(*) FROM uploads").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&reg, "SELECT COUNT(*) FROM uploads").await, 0, "the fill's session is cancelled");
    fsck_clean(&reg).await;
});
