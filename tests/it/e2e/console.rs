//! The web console in a real headless browser (Debian's Chromium through its ChromeDriver,
//! installed by the test script), on both deployments: sign in, browse to a tag, delete it
//! through the confirmation, find it in the trash, restore it, and pull it byte-exact with skopeo
//! afterwards; two deletes found in the trash filtered by actor and time and restored together
//! through the bulk restore's preview; a pull-only user sees no delete button and is refused
//! server-side anyway; actions
//! from another origin are refused. Screenshots of each main page are saved under
//! `target/ui-screenshots/<deployment>/`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::{have, run, skopeo_copy};
use crate::auth::{PASSWORD, with_auth};
use crate::backend_test;
use crate::harness::TestRegistry;

/// The W3C WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A Chromium session through ChromeDriver, spoken to over its W3C WebDriver HTTP API.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(std::time::Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }}}});
        let res: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session =
            res["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {res}")).to_string();
        Browser { http, session: format!("{base}/session/{session}"), driver }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res: Value = req.send().await.unwrap().json().await.unwrap();
        res["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    async fn elements(&self, css: &str) -> Vec<String> {
        let found = self
            .call(reqwest::Method::POST, "/elements", Some(json!({"using": "css selector", "value": css})))
            .await;
        found
            .as_array()
            .map(|a| a.iter().filter_map(|e| e[ELEMENT].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// The first element matching `css`; fails showing the page when there is none.
    async fn element(&self, css: &str) -> String {
        match self.elements(css).await.into_iter().next() {
            Some(id) => id,
            None => {
                let page = self.call(reqwest::Method::GET, "/source", None).await;
                panic!("no element `{css}` at {}: {}", self.url().await, page.as_str().unwrap_or_default());
            }
        }
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.text_of(&id).await
    }

    /// The text of the first element matching `css`, if there is one now (a page still loading
    /// may have none yet).
    async fn text_now(&self, css: &str) -> Option<String> {
        let id = self.elements(css).await.into_iter().next()?;
        Some(self.text_of(&id).await)
    }

    async fn text_of(&self, id: &str) -> String {
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the browser is at a URL containing `part` (a form's answer may still be on
    /// its way when the click returns); fails showing the page.
    async fn wait_for(&self, part: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.url().await.contains(part) {
            if std::time::Instant::now() > deadline {
                let page = self.call(reqwest::Method::GET, "/source", None).await;
                panic!("not at {part} but {}: {}", self.url().await, page.as_str().unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None).await.as_str().unwrap_or_default().to_string()
    }

    async fn screenshot(&self, dir: &std::path::Path, name: &str) {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// How the console shortens a digest.
fn short_hex(d: &berth::oci::Digest) -> String {
    d.hex()[..12].to_string()
}

/// A console `POST` as `user` from `origin`; its status.
async fn post_as(
    reg: &TestRegistry,
    user: &str,
    path: &str,
    form: &[(&str, &str)],
    origin: Option<&str>,
) -> u16 {
    let mut req = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(reg.url(path))
        .basic_auth(user, Some(PASSWORD))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form.iter()
                .map(|(k, v)| format!("{k}={}", berth::ui::urlencode(v)))
                .collect::<Vec<_>>()
                .join("&"),
        );
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    req.send().await.unwrap().status().as_u16()
}

backend_test!(console_delete_trash_restore_in_a_real_browser, |reg| {
    if !have("chromium") || !have("chromedriver") || !have("skopeo") {
        return;
    }
    let deployment = if reg.app.config.storage_s3.is_some() { "scale-out" } else { "embedded" };
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../ui-screenshots").join(deployment);
    let lay = tempfile::tempdir().unwrap();
    let img = crate::e2e::layout::image(lay.path(), 7101, "amd64");
    let arm = crate::e2e::layout::image(lay.path(), 7104, "arm64");
    let multi = crate::e2e::layout::index(lay.path(), &[(&img, "amd64"), (&arm, "arm64")]);
    crate::e2e::layout::finish(
        lay.path(),
        &[("v1", &img, crate::harness::OCI_MANIFEST), ("multi", &multi, crate::harness::OCI_INDEX)],
    );
    let lay_ref = |tag: &str| format!("oci:{}:{tag}", lay.path().display());
    skopeo_copy(&lay_ref("v1"), &format!("docker://{}/team/app:v1", reg.addr)).await;
    skopeo_copy(&lay_ref("multi"), &format!("docker://{}/team/app:multi", reg.addr)).await;
    // An SBOM referring to v1, pushed as the referrers API has it (untagged, with a subject).
    let empty = reg.upload_blob("team/app", b"{}").await;
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": crate::harness::OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2}],
        "subject": {"mediaType": crate::harness::OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.bytes.len()},
    }))
    .unwrap();
    let sbom_digest = berth::oci::Digest::sha256_of(&sbom);
    let res = reg.put_manifest("team/app", sbom_digest.as_str(), crate::harness::OCI_MANIFEST, &sbom).await;
    assert_eq!(res.status(), 201);
    reg.push_image("team/app", "v2", 7102).await;
    reg.push_image("team/old", "v1", 7105).await;
    reg.push_image("public/base", "latest", 7103).await;
    let reg = with_auth(reg, false).await;
    let host = reg.addr.to_string();
    let browser = Browser::start().await;

    // Sign in: "sign in" answers the browser with a challenge, and it sends the URL's credentials
    // (anonymous callers would see only what anonymous pull allows).
    browser.goto(&format!("http://alice:{PASSWORD}@{host}/ui/login")).await;
    assert!(browser.text("header .who").await.contains("alice"));
    assert!(browser.text("#repositories").await.contains("team/app"));
    browser.screenshot(&shots, "repositories").await;

    // Browse to the tag's manifest.
    browser.click("#repositories a[href='/ui/repo?name=team%2Fapp']").await;
    let tags = browser.text("#tags").await;
    assert!(tags.contains("v1") && tags.contains("index of 2: linux/amd64, linux/arm64"), "{tags}");
    assert!(browser.text("#untagged").await.contains(&short_hex(&img.digest)), "the SBOM refers to v1");
    browser.screenshot(&shots, "repository").await;
    let digest = img.digest.to_string();
    browser.click(&format!("#tags a[href*='{}']", digest.replace(':', "%3A"))).await;
    assert!(browser.text("h1").await.contains("team/app"));
    assert!(browser.text("#layers").await.contains(img.blobs[1].as_str()));
    assert!(browser.text("#explain").await.contains("tag"));
    assert!(browser.text("#referrers").await.contains("application/spdx+json"));
    browser.screenshot(&shots, "manifest").await;

    // A deleted repository is listed for its administrators, and restored from its trash.
    let status =
        post_as(&reg, "alice", "/ui/delete", &[("target", "team/old")], Some(&format!("http://{host}")))
            .await;
    assert_eq!(status, 303);
    browser.goto(&format!("http://{host}/ui/")).await;
    assert!(browser.text("#deleted-repositories").await.contains("team/old"));
    browser.click("#deleted-repositories a").await;
    browser.click("#restore-repository").await;
    browser.wait_for("/ui/repo").await;
    assert!(browser.text("#tags").await.contains("v1"));

    // Hourly samples of where the space is (the replica running the sweep takes them) before the
    // delete, after it, and after the restore, for the storage chart.
    let hour = berth::registry::SPACE_SAMPLE_EVERY_MS;
    assert!(reg.app.registry.sample_space(hour).await.unwrap());
    assert!(!reg.app.registry.sample_space(hour).await.unwrap(), "one an hour");

    // Delete the tag through the confirmation, which shows the preview.
    browser.goto(&format!("http://{host}/ui/repo?name=team%2Fapp")).await;
    browser.click("#tags a.danger[href*='v1']").await;
    assert!(browser.text("#preview").await.contains("1 tag(s)"), "{}", browser.text("main").await);
    browser.screenshot(&shots, "delete").await;
    browser.click("#confirm").await;
    browser.wait_for("/ui/trash").await;
    assert!(browser.text("#deleted-tags").await.contains("v1"));
    browser.screenshot(&shots, "trash").await;
    reg.app.registry.clock().advance_ms(hour);
    assert!(reg.app.registry.sample_space(hour).await.unwrap());
    assert_eq!(
        reg.get("/v2/team/app/manifests/v1").await.status(),
        401,
        "auth on: even the 404 needs credentials"
    );
    let res = reg
        .req(reqwest::Method::GET, "/v2/team/app/manifests/v1")
        .basic_auth("alice", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "deleted");

    // Restore it from the trash.
    browser.click("#deleted-tags button").await;
    browser.wait_for("/ui/repo").await;
    assert!(browser.text("#tags").await.contains("v1"));
    reg.app.registry.clock().advance_ms(hour);
    assert!(reg.app.registry.sample_space(hour).await.unwrap());

    // History, space and retention pages.
    browser.goto(&format!("http://{host}/ui/history?repo=team%2Fapp&tag=v1")).await;
    let history = browser.text("#history").await;
    assert!(
        history.contains("restore") && history.contains("delete") && history.contains("alice"),
        "{history}"
    );
    browser.screenshot(&shots, "history").await;
    browser.goto(&format!("http://{host}/ui/space")).await;
    assert!(browser.text("#space").await.contains("Stored"));
    assert_eq!(browser.elements("#storage-chart polyline").await.len(), 5);
    browser.screenshot(&shots, "space").await;
    browser.goto(&format!("http://{host}/ui/retention?dry_run=true")).await;
    assert!(browser.text("main").await.contains("A run now would remove 0 tags"));
    browser.screenshot(&shots, "retention").await;

    // The restored tag pulls byte-exact with skopeo.
    let pulled = tempfile::tempdir().unwrap();
    let creds = format!("alice:{PASSWORD}");
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &format!("docker://{host}/team/app:v1"),
            &format!("oci:{}:v1", pulled.path().display()),
        ],
        &[],
    )
    .await;
    for blob in img.blobs.iter().chain([&img.digest]) {
        let pushed = std::fs::read(lay.path().join("blobs/sha256").join(blob.hex())).unwrap();
        assert_eq!(std::fs::read(pulled.path().join("blobs/sha256").join(blob.hex())).unwrap(), pushed);
    }

    // Two deletes by alice, found in the trash filtered by actor and time, and undone together
    // through the dry run's preview ("restore all shown").
    let since = reg.app.registry.clock().now_ms();
    let origin = format!("http://{host}");
    for target in ["team/app:v2", "team/app:multi"] {
        assert_eq!(post_as(&reg, "alice", "/ui/delete", &[("target", target)], Some(&origin)).await, 303);
    }
    browser.goto(&format!("http://{host}/ui/trash?repo=team%2Fapp&actor=alice&since={since}")).await;
    let shown = browser.text("#deletes").await;
    assert!(shown.contains("team/app:v2") && shown.contains("team/app:multi"), "{shown}");
    assert!(!shown.contains("team/app:v1"), "v1 was deleted before the window: {shown}");
    browser.screenshot(&shots, "trash-filtered").await;
    browser.click("#restore-all").await;
    browser.wait_for("/ui/bulk-restore").await;
    assert!(
        browser.text("#summary").await.contains("Would restore 2 delete(s)"),
        "{}",
        browser.text("main").await
    );
    browser.screenshot(&shots, "bulk-restore").await;
    browser.click("#confirm").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The confirmation's answer may still be loading: poll without requiring the heading.
    while !browser.text_now("h1").await.is_some_and(|h| h.contains("Bulk restore")) {
        assert!(std::time::Instant::now() < deadline, "{}", browser.text("main").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        browser.text("#summary").await.contains("Restored 2 delete(s)"),
        "{}",
        browser.text("main").await
    );
    for tag in ["v2", "multi"] {
        let res = reg
            .req(reqwest::Method::GET, &format!("/v2/team/app/manifests/{tag}"))
            .basic_auth("alice", Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{tag} restored");
    }
    // A pull-only user may filter the trash but is offered no bulk restore, and is refused one.
    let form = [("repositories", "team/app"), ("since", "0")];
    assert_eq!(post_as(&reg, "reader", "/ui/bulk-restore", &form, Some(&origin)).await, 403);
    drop(browser);

    // A pull-only user sees the repository but no delete button, and is refused anyway.
    let reader = Browser::start().await;
    reader.goto(&format!("http://reader:{PASSWORD}@{host}/ui/login")).await;
    reader.goto(&format!("http://{host}/ui/repo?name=team%2Fapp")).await;
    assert!(reader.text("#tags").await.contains("v1"));
    assert!(reader.elements("a.danger").await.is_empty(), "no delete buttons for a pull-only user");
    reader.screenshot(&shots, "repository-read-only").await;
    reader.goto(&format!("http://{host}/ui/space")).await;
    assert!(reader.text("#problem").await.contains("admin"));
    drop(reader);
    let origin = format!("http://{host}");
    let target = [("target", "team/app:v2")];
    assert_eq!(post_as(&reg, "reader", "/ui/delete", &target, Some(&origin)).await, 403);
    // Actions from elsewhere (no origin, another origin) are refused even for an administrator.
    assert_eq!(post_as(&reg, "alice", "/ui/delete", &target, None).await, 403);
    assert_eq!(post_as(&reg, "alice", "/ui/delete", &target, Some("http://evil.example")).await, 403);
    assert_eq!(post_as(&reg, "alice", "/ui/delete", &target, Some(&origin)).await, 303);

    // Anonymous callers see only what anonymous pull allows.
    let res = reg.get("/ui/").await;
    assert_eq!(res.status(), 200);
    let page = res.text().await.unwrap();
    assert!(page.contains("public/base") && !page.contains("team/app"), "{page}");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_switched_off_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    config.ui_enabled = false;
    let reg = TestRegistry::start_with(config, dir).await;
    assert_eq!(reg.get("/ui/").await.status(), 404);
    assert_eq!(reg.get("/v2/").await.status(), 200);
}
