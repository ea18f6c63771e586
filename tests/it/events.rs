//! Events: every acknowledged change yields its event, delivered to webhooks (a sink server in
//! the test) at least once, in order per repository; refused and rolled-back changes yield none;
//! failing and dead endpoints; replays; both wire formats; collection's freed bytes.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth::config::{Config, Overrides};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::*;

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub content_type: String,
    pub authorization: Option<String>,
    /// The replica that sent it (`Berth-Replica`).
    pub replica: Option<String>,
    pub body: Value,
    /// Whether the sink accepted it (answered 2xx).
    pub accepted: bool,
}

/// A webhook receiver on 127.0.0.1:<ephemeral>: records every request, answers with the status
/// the test sets (200 unless told otherwise).
pub struct Sink {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    _task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> Sink {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let (r, s) = (received.clone(), status.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (r, s) = (r.clone(), s.clone());
                async move {
                    let code = s.load(Ordering::SeqCst);
                    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                    r.lock().unwrap().push(Received {
                        content_type: header("content-type").unwrap_or_default(),
                        authorization: header("authorization"),
                        replica: header("berth-replica"),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        accepted: (200..300).contains(&code),
                    });
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink { url, received, status, _task: task }
    }

    /// The replicas that sent accepted requests, in order.
    pub fn replicas(&self) -> Vec<String> {
        self.requests().into_iter().filter(|r| r.accepted).filter_map(|r| r.replica).collect()
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The events of every accepted request, in the order received (CloudEvents: one event or
    /// a batch; distribution: the envelope's list).
    pub fn events(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r.accepted).flat_map(|r| events_in(&r.body)).collect()
    }

    /// Waits (up to 30 s) until the accepted events satisfy `done`; returns them.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let events = self.events();
            if done(&events) {
                return events;
            }
            if Instant::now() >= deadline {
                let brief: Vec<String> = events
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {} {} seq {}",
                            e["id"], e["type"], e["data"]["repository"], e["data"]["sequence"]
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}; received {brief:#?}; requests {:?}",
                    self.requests().len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn events_in(body: &Value) -> Vec<Value> {
    match body {
        Value::Array(list) => list.clone(),
        Value::Object(o) if o.contains_key("events") => {
            body["events"].as_array().cloned().unwrap_or_default()
        }
        Value::Object(_) => vec![body.clone()],
        _ => Vec::new(),
    }
}

/// A CloudEvent's Berth kind (`type` without the `berth.` prefix).
fn kind(e: &Value) -> &str {
    e["type"].as_str().unwrap_or_default().strip_prefix("berth.").unwrap_or_default()
}

/// The fields of a CloudEvent a test compares: kind, tag, digest, old digest.
fn summary(e: &Value) -> (String, Option<String>, Option<String>, Option<String>) {
    let d = &e["data"];
    let s = |k: &str| d[k].as_str().map(str::to_string);
    (kind(e).to_string(), s("tag"), s("digest"), s("oldDigest"))
}

/// The accepted events of repository `repo`, de-duplicated by id and in sequence order.
fn of_repo(events: &[Value], repo: &str) -> Vec<Value> {
    let mut by_seq = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e["data"]["repository"] == repo) {
        by_seq.insert(e["data"]["sequence"].as_i64().unwrap(), e.clone());
    }
    by_seq.into_values().collect()
}

/// A registry on `backend` configured by `toml` (an `[events]` section and whatever else), as
/// `berth serve` parses it; the deployment's own settings come from the harness.
pub(crate) async fn with_config(backend: Backend, toml: &str) -> Option<TestRegistry> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("berth.toml");
    std::fs::write(&file, toml).unwrap();
    let parsed = Config::load(Some(&file), &Overrides::default()).expect("the configuration parses");
    let mut config = match backend {
        Backend::Sqlite => {
            let mut c = Config::embedded(dir.path());
            c.storage_fsync = false;
            c
        }
        Backend::Postgres => scale_out_config(dir.path()).await?,
    };
    config.gc.enabled = false;
    config.events = parsed.events;
    config.retention = parsed.retention;
    config.quotas = parsed.quotas;
    Some(TestRegistry::start_with(config, dir).await)
}

/// An endpoint section delivering to `url`, retrying fast.
fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[events.endpoints]]\nname = {name:?}\nurl = {url:?}\nbackoff = \"20ms\"\nmax_backoff = \"100ms\"\n{extra}\n"
    )
}

#[macro_export]
macro_rules! events_test {
    ($name:ident, |$backend:ident| $body:block) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $backend = Backend::Sqlite;
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                // Both assert they are set under CI: no silent skip there.
                if postgres_url().is_none() || s3_config().is_none() {
                    eprintln!("skipping: the scale-out deployment is not configured");
                    return;
                }
                let $backend = Backend::Postgres;
                $body
            }
        }
    };
}

impl TestRegistry {
    /// Every event written, as the admin API lists them.
    async fn event_log(&self) -> Vec<Value> {
        let (status, v) = self.admin(Method::GET, "events?n=10000", None).await;
        assert_eq!(status, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    async fn events_status(&self) -> Value {
        let (status, v) = self.admin(Method::GET, "events/status", None).await;
        assert_eq!(status, 200, "{v}");
        v["endpoints"][0].clone()
    }

    /// Waits (up to 20 s) until the first endpoint's status satisfies `done`; returns it. (A
    /// sink sees a batch before the registry records that it was accepted.)
    async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.events_status().await;
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {status}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

events_test!(every_acknowledged_change_yields_its_event_and_no_refused_one_does, |backend| {
    let sink = Sink::start().await;
    let reg = with_config(backend, &endpoint("hook", &sink.url, "")).await.unwrap();
    let repo = "ev/app";
    let one = reg.push_image(repo, "v1", 1).await;
    // Pushed again, unchanged: acknowledged, so an event; the tag did not move, so no tag event.
    assert_eq!(reg.put_manifest(repo, "v1", OCI_MANIFEST, &one.manifest).await.status(), 201);
    let two = reg.push_image(repo, "v1", 2).await;

    // Refused: a conditional write whose condition fails (412), a manifest naming a missing blob,
    // a delete of a manifest a live index lists (405).
    let res = reg
        .req(Method::PUT, &format!("/v2/{repo}/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .header("if-match", format!("\"{}\"", one.digest))
        .body(one.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);
    let missing = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": format!("sha256:{}", "0".repeat(64)), "size": 1},
        "layers": [],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest(repo, "broken", OCI_MANIFEST, &missing).await.status(), 400);
    let (index, _) = reg.push_index(repo, "idx", &[&two]).await;
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", two.digest)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);

    for path in [format!("/v2/{repo}/manifests/idx"), format!("/v2/{repo}/manifests/{index}")] {
        assert_eq!(reg.req(Method::DELETE, &path).send().await.unwrap().status(), 202, "{path}");
    }
    let res = reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", two.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let (status, v) = reg.admin(Method::POST, &format!("restore/{repo}@{}", two.digest), None).await;
    assert_eq!(status, 200, "{v}");

    let (a, b, i) = (one.digest.to_string(), two.digest.to_string(), index.to_string());
    let expected = vec![
        ("manifest.pushed".to_string(), s("v1"), s(&a), None),
        ("tag.set".to_string(), s("v1"), s(&a), None),
        ("manifest.pushed".to_string(), s("v1"), s(&a), None),
        ("manifest.pushed".to_string(), s("v1"), s(&b), None),
        ("tag.set".to_string(), s("v1"), s(&b), s(&a)),
        ("manifest.pushed".to_string(), s("idx"), s(&i), None),
        ("tag.set".to_string(), s("idx"), s(&i), None),
        ("tag.deleted".to_string(), s("idx"), None, s(&i)),
        ("manifest.deleted".to_string(), None, s(&i), None),
        ("tag.deleted".to_string(), s("v1"), None, s(&b)),
        ("manifest.deleted".to_string(), None, s(&b), None),
        ("manifest.restored".to_string(), None, s(&b), None),
        ("tag.restored".to_string(), s("v1"), s(&b), None),
    ];
    let events = sink.wait_for("every change's event", |e| of_repo(e, repo).len() >= expected.len()).await;
    let got: Vec<_> = of_repo(&events, repo).iter().map(summary).collect();
    assert_eq!(got, expected);
    // Numbered 1, 2, … in the repository's stream, each with an id; the sink got exactly the
    // events the registry wrote.
    let ours = of_repo(&events, repo);
    let seqs: Vec<i64> = ours.iter().map(|e| e["data"]["sequence"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=expected.len() as i64).collect::<Vec<_>>());
    let log = reg.event_log().await;
    let logged: std::collections::BTreeSet<String> = log.iter().map(|e| e["id"].to_string()).collect();
    let delivered: std::collections::BTreeSet<String> =
        events.iter().map(|e| e["id"].as_str().unwrap().to_string()).map(|id| id.to_string()).collect();
    assert_eq!(logged, delivered);
    // CloudEvents attributes, the actor and the request that made the change.
    let first = &ours[0];
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["subject"], format!("{repo}:v1"));
    assert_eq!(first["data"]["mediaType"], OCI_MANIFEST);
    assert_eq!(first["data"]["size"], one.manifest.len());
    assert_eq!(first["data"]["actor"], Value::Null, "anonymous: no actor");
    assert_eq!(first["data"]["request"]["method"], "PUT");
    assert!(first["data"]["request"]["id"].as_str().is_some_and(|id| !id.is_empty()));
    let restored = &ours[11];
    assert!(restored["data"]["detail"]["deleteId"].is_i64(), "{restored}");

    // A repository delete and restore: every tag and manifest with it.
    let (status, v) = reg.admin(Method::DELETE, &format!("repositories/{repo}"), None).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = reg.admin(Method::POST, &format!("restore/{repo}"), None).await;
    assert_eq!(status, 200, "{v}");
    let events = sink
        .wait_for("the repository's delete and restore", |e| {
            of_repo(e, repo).iter().any(|e| kind(e) == "repository.restored")
        })
        .await;
    let tail: Vec<_> = of_repo(&events, repo)[expected.len()..].iter().map(summary).collect();
    let mut deleted: Vec<_> = tail.iter().take_while(|e| e.0 != "repository.deleted").cloned().collect();
    deleted.sort();
    let mut want = vec![
        ("manifest.deleted".to_string(), None, s(&a), None),
        ("manifest.deleted".to_string(), None, s(&b), None),
        ("tag.deleted".to_string(), s("v1"), None, s(&b)),
    ];
    want.sort();
    assert_eq!(deleted, want);
    let kinds: Vec<&str> = tail.iter().map(|e| e.0.as_str()).collect();
    assert!(
        kinds.contains(&"repository.deleted") && kinds.last() == Some(&"repository.restored"),
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "manifest.restored").count(), 2, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "tag.restored").count(), 1, "{kinds:?}");
    let status = reg.wait_status("nothing pending", |s| s["pending"] == 0).await;
    assert_eq!(status["dead_letters"], 0, "{status}");
});

events_test!(a_failing_endpoint_gets_everything_in_order_per_repository_once_it_recovers, |backend| {
    let sink = Sink::start().await;
    sink.set_status(500);
    let reg =
        with_config(backend, &endpoint("hook", &sink.url, "max_attempts = 1000\nbatch = 7")).await.unwrap();
    let repos = ["order/a", "order/b", "order/c"];
    let mut pushes = 0;
    for round in 0..4u64 {
        for (i, repo) in repos.iter().enumerate() {
            reg.push_image(repo, &format!("t{}", round % 2), round * 10 + i as u64).await;
            pushes += 1;
        }
    }
    // Failing meanwhile: retried, counted, nothing accepted, nothing lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reg.events_status().await["failures"].as_i64().unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "no failures counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = reg.events_status().await;
    assert!(status["pending"].as_i64().unwrap() > 0, "{status}");
    assert!(status["last_error"].as_str().unwrap().contains("500"), "{status}");
    assert!(sink.events().is_empty());
    sink.set_status(200);
    let log = reg.event_log().await;
    let events = sink
        .wait_for("everything after the recovery", |e| {
            let ids: std::collections::BTreeSet<&str> = e.iter().filter_map(|e| e["id"].as_str()).collect();
            ids.len() >= log.len()
        })
        .await;
    assert!(pushes > 0);
    for repo in repos {
        // In order per repository: each repository's events arrive with rising sequence numbers.
        let seqs: Vec<i64> = events
            .iter()
            .filter(|e| e["data"]["repository"] == repo)
            .map(|e| e["data"]["sequence"].as_i64().unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(seqs, sorted, "{repo}: delivered out of order or twice after an accepted send");
        assert_eq!(seqs.len(), 4 + 4, "{repo}: 4 pushes, 2 tags created and moved once each: {seqs:?}");
    }
    // A batch of several is CloudEvents' batched mode.
    assert!(sink.requests().iter().any(|r| r.content_type == "application/cloudevents-batch+json"));
    let status = reg.wait_status("nothing pending", |s| s["pending"] == 0).await;
    assert_eq!(status["failures"], 0, "{status}");
    assert!(status["delivered"].as_i64().unwrap() >= log.len() as i64, "{status}");
    let metrics = reg.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("berth_events_pending{endpoint=\"hook\"} 0"), "{metrics}");
    assert!(metrics.contains("berth_events_failed_total{endpoint=\"hook\"}"), "{metrics}");
});

events_test!(given_up_events_are_dead_letters_and_replay_delivers_them, |backend| {
    let sink = Sink::start().await;
    sink.set_status(503);
    let reg = with_config(backend, &endpoint("hook", &sink.url, "max_attempts = 2")).await.unwrap();
    let img = reg.push_image("dead/app", "v1", 5).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = reg.events_status().await;
        if status["dead_letters"].as_i64() == Some(2) && status["pending"] == 0 {
            break status;
        }
        assert!(Instant::now() < deadline, "not given up: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["failed"], 2, "{status}");
    let (code, dead) = reg.admin(Method::GET, "events/dead/hook", None).await;
    assert_eq!(code, 200, "{dead}");
    let letters = dead["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert!(letters.iter().all(|l| l["attempts"] == 2 && l["last_error"].as_str().unwrap().contains("503")));
    assert!(letters.iter().all(|l| l["event"]["digest"] == img.digest.as_str()));
    // The endpoint comes back; what was given up on stays given up until replayed.
    sink.set_status(200);
    reg.push_image("dead/app", "v2", 6).await;
    sink.wait_for("the events after the dead letters", |e| e.iter().any(|e| e["data"]["tag"] == "v2")).await;
    assert!(!sink.events().iter().any(|e| e["data"]["digest"] == img.digest.as_str()));
    let (code, v) = reg.admin(Method::POST, "events/replay/hook", Some(json!({"dead": true}))).await;
    assert_eq!((code, v["queued"].as_i64()), (200, Some(2)), "{v}");
    let events = sink
        .wait_for("the replayed dead letters", |e| {
            e.iter().filter(|e| e["data"]["digest"] == img.digest.as_str()).count() == 2
        })
        .await;
    assert!(events.iter().any(|e| kind(e) == "tag.set" && e["data"]["tag"] == "v1"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reg.events_status().await["dead_letters"] != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A replay by time sends everything since again (consumers de-duplicate by id).
    let (code, v) = reg.admin(Method::POST, "events/replay/hook", Some(json!({"since": "1h"}))).await;
    assert_eq!((code, v["queued"].as_i64()), (200, Some(4)), "{v}");
    sink.wait_for("the replay since an hour ago", |e| e.len() >= 2 + 2 + 4).await;
    // A replay to an endpoint that is not configured, or of nothing sensible, is refused.
    let (code, _) = reg.admin(Method::POST, "events/replay/nope", Some(json!({"dead": true}))).await;
    assert_eq!(code, 404);
    let (code, _) = reg.admin(Method::POST, "events/replay/hook", Some(json!({"id": 1, "dead": true}))).await;
    assert_eq!(code, 400);
});

events_test!(a_dead_endpoint_does_not_delay_a_live_one, |backend| {
    let sink = Sink::start().await;
    // Nothing listens there: every attempt fails at once, and it keeps failing.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let toml =
        format!("{}{}", endpoint("dead", &dead_url, "max_attempts = 1000"), endpoint("live", &sink.url, ""));
    let reg = with_config(backend, &toml).await.unwrap();
    for i in 0..5u64 {
        reg.push_image("two/app", &format!("v{i}"), 40 + i).await;
    }
    let started = Instant::now();
    sink.wait_for("the live endpoint's events", |e| e.len() == 10).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let (code, v) = reg.admin(Method::GET, "events/status", None).await;
    assert_eq!(code, 200);
    let dead = v["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "dead").unwrap().clone();
    assert!(dead["pending"].as_i64().unwrap() > 0 && dead["failures"].as_i64().unwrap() > 0, "{dead}");
    // The console's space page shows both, the dead one with its error.
    let page = reg.get("/ui/space").await.text().await.unwrap();
    assert!(
        page.contains("Event endpoints") && page.contains(&dead_url) && page.contains(&sink.url),
        "{page}"
    );
    assert!(
        page.contains("error sending request")
            || page.contains("Connection refused")
            || page.contains("connect"),
        "{page}"
    );
});

events_test!(the_distribution_format_is_the_reference_registrys_envelope, |backend| {
    let sink = Sink::start().await;
    let toml = format!(
        "[events]\nregistry_url = \"https://registry.example.com\"\n{}",
        endpoint(
            "legacy",
            &sink.url,
            "format = \"distribution\"\nheaders = { Authorization = \"Bearer in-file\" }"
        )
    );
    let reg = with_config(backend, &toml).await.unwrap();
    let img = reg.push_image("dist/app", "latest", 9).await;
    let res = reg.req(Method::DELETE, "/v2/dist/app/manifests/latest").send().await.unwrap();
    assert_eq!(res.status(), 202);
    let events = sink.wait_for("push and delete", |e| e.len() == 2).await;
    let request = &sink.requests()[0];
    assert_eq!(request.content_type, "application/vnd.docker.distribution.events.v1+json");
    assert_eq!(request.authorization.as_deref(), Some("Bearer in-file"));
    // The fields the reference registry documents, read as a consumer written against it does.
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Envelope {
        events: Vec<Event>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Event {
        id: String,
        timestamp: String,
        action: String,
        target: Target,
        request: serde_json::Map<String, Value>,
        actor: serde_json::Map<String, Value>,
        source: serde_json::Map<String, Value>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    #[serde(rename_all = "camelCase")]
    struct Target {
        media_type: Option<String>,
        size: Option<i64>,
        digest: Option<String>,
        length: Option<i64>,
        repository: String,
        url: Option<String>,
        tag: Option<String>,
    }
    for r in sink.requests() {
        let envelope: Envelope = serde_json::from_value(r.body.clone()).expect("the documented envelope");
        assert!(!envelope.events.is_empty());
    }
    let push = &events[0];
    assert_eq!(push["action"], "push");
    assert_eq!(push["target"]["repository"], "dist/app");
    assert_eq!(push["target"]["tag"], "latest");
    assert_eq!(push["target"]["digest"], img.digest.as_str());
    assert_eq!(push["target"]["mediaType"], OCI_MANIFEST);
    assert_eq!(push["target"]["length"], img.manifest.len());
    assert_eq!(
        push["target"]["url"],
        format!("https://registry.example.com/v2/dist/app/manifests/{}", img.digest)
    );
    assert_eq!(push["request"]["method"], "PUT");
    assert!(push["timestamp"].as_str().unwrap().ends_with('Z'));
    // A tag delete is the reference registry's delete with a tag; tag.set is not among the
    // format's default kinds (the push carries the tag).
    assert_eq!(events[1]["action"], "delete");
    assert_eq!(events[1]["target"]["tag"], "latest");
    assert_eq!(events[1]["request"]["method"], "DELETE");
});

events_test!(collected_events_name_the_bytes_that_left_storage, |backend| {
    let sink = Sink::start().await;
    let reg =
        with_config(backend, &endpoint("hook", &sink.url, "kinds = [\"blob.*\", \"manifest.collected\"]"))
            .await
            .unwrap();
    let img = reg.push_image("gc/app", "v1", 77).await;
    let res = reg.req(Method::DELETE, &format!("/v2/gc/app/manifests/{}", img.digest)).send().await.unwrap();
    assert_eq!(res.status(), 202);
    // Past every window.
    reg.app.registry.clock().advance_ms(30 * 24 * 3600 * 1000);
    let report = reg.app.registry.collect(100_000).await.unwrap();
    assert_eq!((report.manifests, report.blobs), (1, 3), "{report:?}");
    let events = sink.wait_for("the collection's events", |e| e.len() == 4).await;
    let freed: i64 = events
        .iter()
        .filter(|e| kind(e) == "blob.collected")
        .map(|e| e["data"]["size"].as_i64().unwrap())
        .sum();
    let stored = (img.config.len() + img.layers.iter().map(Vec::len).sum::<usize>()) as i64;
    assert_eq!(freed, stored);
    assert_eq!(freed as u64, report.bytes);
    let manifest = events.iter().find(|e| kind(e) == "manifest.collected").unwrap();
    assert_eq!(manifest["data"]["digest"], img.digest.as_str());
    assert_eq!(manifest["data"]["actor"], "collector");
    assert_eq!(manifest["data"]["size"], img.manifest.len());
    // The filter left the push and delete out.
    assert!(events.iter().all(|e| kind(e).starts_with("blob.") || kind(e) == "manifest.collected"));
});

events_test!(a_retention_run_is_delivered_in_batches_with_its_rule_as_actor, |backend| {
    let sink = Sink::start().await;
    let toml = format!(
        "[[retention.rules]]\nname = \"keep-two\"\nrepositories = \"ret/**\"\ntags = \"v.*\"\nkeep_last = 2\n\n{}",
        endpoint("hook", &sink.url, "kinds = [\"tag.deleted\"]\nbatch = 50")
    );
    let reg = with_config(backend, &toml).await.unwrap();
    for i in 0..6u64 {
        reg.push_image("ret/app", &format!("v{i}"), 60 + i).await;
        reg.app.registry.clock().advance_ms(1000);
    }
    let (code, v) = reg.admin(Method::POST, "retention/run", None).await;
    assert_eq!(code, 200, "{v}");
    let events = sink.wait_for("the run's removals", |e| e.len() == 4).await;
    assert!(events.iter().all(|e| kind(e) == "tag.deleted" && e["data"]["actor"] == "retention:keep-two"));
    assert!(events.iter().all(|e| e["data"]["detail"]["retentionRun"].is_i64()));
    let mut tags: Vec<&str> = events.iter().map(|e| e["data"]["tag"].as_str().unwrap()).collect();
    tags.sort_unstable();
    assert_eq!(tags, ["v0", "v1", "v2", "v3"]);
    assert!(sink.requests().len() <= 2, "one run, a batch or two: {} requests", sink.requests().len());
});

events_test!(pulls_are_events_only_when_asked_for, |backend| {
    let sink = Sink::start().await;
    let toml =
        format!("[events]\npulls = true\n{}", endpoint("hook", &sink.url, "kinds = [\"manifest.pulled\"]"));
    let reg = with_config(backend, &toml).await.unwrap();
    let img = reg.push_image("pull/app", "v1", 88).await;
    for _ in 0..3 {
        assert_eq!(reg.get("/v2/pull/app/manifests/v1").await.status(), 200);
    }
    reg.app.registry.flush_access().await.unwrap();
    let events = sink.wait_for("the pull", |e| !e.is_empty()).await;
    assert_eq!(events.len(), 1, "one event per manifest and flush: {events:#?}");
    assert_eq!(events[0]["data"]["digest"], img.digest.as_str());

    let quiet = Sink::start().await;
    let reg =
        with_config(backend, &endpoint("hook", &quiet.url, "kinds = [\"manifest.pulled\"]")).await.unwrap();
    reg.push_image("pull/app", "v1", 88).await;
    assert_eq!(reg.get("/v2/pull/app/manifests/v1").await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    let log = reg.event_log().await;
    assert!(log.iter().all(|e| e["kind"] != "manifest.pulled"), "{log:#?}");
});

/// A `berth serve` process delivering to `sink`, on `deployment` (the `[metadata]`/`[storage]`
/// sections, or a `data_dir`).
fn serve_with_events(
    dir: &std::path::Path,
    name: &str,
    deployment: &str,
    sink: &Sink,
) -> (std::process::Child, String) {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("{deployment}\n[gc]\nenabled = false\n\n{}", endpoint("hook", &sink.url, "batch = 20")),
    )
    .unwrap();
    serve_process(&[std::ffi::OsStr::new("--config"), config.as_os_str()], &dir.join(format!("{name}.ready")))
}

/// Pushes (and sometimes deletes a tag of) `n` images through `bases` in turn; returns the
/// acknowledged pushes (tag, digest). Stops early when a replica goes away.
async fn burst(bases: &[String], first: u64, n: u64) -> Vec<(String, String)> {
    let client = reqwest::Client::new();
    let mut acknowledged = Vec::new();
    for seed in first..first + n {
        let base = &bases[seed as usize % bases.len()];
        let tag = format!("t{}", seed % 7);
        let Some(digest) = crate::crash::push(&client, base, &tag, seed).await else {
            return acknowledged;
        };
        acknowledged.push((tag.clone(), digest.to_string()));
        if seed % 5 == 0
            && client.delete(format!("{base}/v2/crash/app/manifests/{tag}")).send().await.is_err()
        {
            return acknowledged;
        }
    }
    acknowledged
}

/// Waits until `base`'s endpoint has nothing pending.
async fn drained(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value =
            client.get(format!("{base}/admin/v1/events/status")).send().await.unwrap().json().await.unwrap();
        if v["endpoints"][0]["pending"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "not drained: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After crashes: the sink's de-duplicated events are exactly the changes the store committed —
/// every tag-history row is a tag event and every tag event a row; every acknowledged push is a
/// `manifest.pushed` event.
async fn assert_events_match_the_store(metadata_url: &str, sink: &Sink, acknowledged: &[(String, String)]) {
    sqlx::any::install_default_drivers();
    let db = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(metadata_url).await.unwrap();
    let mut delivered = std::collections::BTreeMap::new();
    for e in sink.events() {
        delivered.insert(e["id"].as_str().unwrap().to_string(), e);
    }
    let (written,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events").fetch_one(&db).await.unwrap();
    assert_eq!(delivered.len() as i64, written, "every event written was delivered, none invented");
    let history: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT tag, old_digest, new_digest FROM tag_history ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    let mut from_store: Vec<_> = history.into_iter().collect();
    let mut from_events: Vec<(String, Option<String>, Option<String>)> = delivered
        .values()
        .filter(|e| kind(e).starts_with("tag."))
        .map(|e| {
            let d = &e["data"];
            let s = |k: &str| d[k].as_str().map(str::to_string);
            (s("tag").unwrap(), s("oldDigest"), s("digest"))
        })
        .collect();
    from_store.sort();
    from_events.sort();
    assert_eq!(from_events, from_store, "tag events and the tag history differ");
    let pushed: std::collections::BTreeSet<(String, String)> = delivered
        .values()
        .filter(|e| kind(e) == "manifest.pushed")
        .map(|e| {
            (
                e["data"]["tag"].as_str().unwrap().to_string(),
                e["data"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for ack in acknowledged {
        assert!(pushed.contains(ack), "acknowledged push {ack:?} has no event");
    }
    // Per stream, the sequence numbers the sink saw are 1..=n without a gap.
    let mut seqs: Vec<i64> = delivered.values().map(|e| e["data"]["sequence"].as_i64().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    db.close().await;
}

async fn kill_9_during_a_burst(deployment: String, metadata_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let mut acknowledged = Vec::new();
    for round in 0..3u64 {
        let (mut child, addr) = serve_with_events(dir.path(), "berth", &deployment, &sink);
        let base = format!("http://{addr}");
        let work = tokio::spawn({
            let base = base.clone();
            async move { burst(&[base], round * 1000, 1000).await }
        });
        tokio::time::sleep(Duration::from_millis(400 + 200 * round)).await;
        child.kill().unwrap(); // SIGKILL, mid-burst
        child.wait().unwrap();
        acknowledged.extend(work.await.unwrap());
    }
    let (mut child, addr) = serve_with_events(dir.path(), "berth", &deployment, &sink);
    drained(&format!("http://{addr}")).await;
    assert!(acknowledged.len() > 3, "the bursts did something");
    assert_events_match_the_store(&metadata_url, &sink, &acknowledged).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_event_and_invents_none_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let deployment = format!("data_dir = {:?}\n[storage]\nfsync = false\n", data.display().to_string());
    let url = format!("sqlite:{}", data.join("metadata.db").display());
    kill_9_during_a_burst(deployment, url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_event_and_invents_none_scale_out() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    kill_9_during_a_burst(scale_out_toml(&c), c.metadata_url.clone()).await;
}

/// Two replicas, one endpoint: one delivers at a time (its lease); when it is killed the other
/// takes over and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_through_one_and_lose_nothing_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let Some(c) = scale_out_config(dir.path()).await else {
        eprintln!("skipping: the scale-out deployment is not configured");
        return;
    };
    let sink = Sink::start().await;
    let deployment = scale_out_toml(&c);
    let mut replicas: Vec<_> =
        (0..2).map(|i| serve_with_events(dir.path(), &format!("r{i}"), &deployment, &sink)).collect();
    let bases: Vec<String> = replicas.iter().map(|(_, a)| format!("http://{a}")).collect();
    let mut acknowledged = burst(&bases, 0, 30).await;
    drained(&bases[0]).await;
    let deliverers: std::collections::BTreeSet<String> = sink.replicas().into_iter().collect();
    assert_eq!(deliverers.len(), 1, "one delivery stream per endpoint: {deliverers:?}");
    // Kill the one delivering; push on through the other.
    let holder = deliverers.into_iter().next().unwrap();
    let pid = holder.rsplit('-').nth(1).unwrap().parse::<u32>().unwrap();
    let victim = replicas.iter().position(|(child, _)| child.id() == pid).expect("the holder is one of ours");
    let (mut child, _) = replicas.remove(victim);
    child.kill().unwrap();
    child.wait().unwrap();
    let survivor = format!("http://{}", replicas[0].1);
    acknowledged.extend(burst(std::slice::from_ref(&survivor), 100, 30).await);
    drained(&survivor).await;
    assert_events_match_the_store(&c.metadata_url, &sink, &acknowledged).await;
    let after: std::collections::BTreeSet<String> = sink.replicas().into_iter().collect();
    assert_eq!(after.len(), 2, "the survivor took over: {after:?}");
    for (mut child, _) in replicas {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

events_test!(a_bulk_restore_announces_what_came_back_and_nothing_it_rolled_back, |backend| {
    let sink = Sink::start().await;
    let reg = with_config(backend, &endpoint("hook", &sink.url, "")).await.unwrap();
    let kept = reg.push_image("bulk/kept", "v1", 101).await;
    let clash = reg.push_image("bulk/clash", "v1", 102).await;
    for (repo, img) in [("bulk/kept", &kept), ("bulk/clash", &clash)] {
        let res =
            reg.req(Method::DELETE, &format!("/v2/{repo}/manifests/{}", img.digest)).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    // The tag was pushed again since: without take_tags, that delete's restore is a conflict,
    // rolled back to its savepoint after the manifest itself was revived.
    reg.push_image("bulk/clash", "v1", 103).await;
    let (status, v) = reg.admin(Method::POST, "restore?since=1h", None).await;
    assert_eq!(status, 200, "{v}");
    let log = reg.event_log().await;
    let restored: Vec<(String, String)> = log
        .iter()
        .filter(|e| e["kind"].as_str().unwrap().ends_with(".restored"))
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["repository"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        restored,
        [
            ("manifest.restored".to_string(), "bulk/kept".to_string()),
            ("tag.restored".to_string(), "bulk/kept".to_string())
        ],
        "{v}"
    );
    let clash_row = reg.get(&format!("/v2/bulk/clash/manifests/{}", clash.digest)).await;
    assert_eq!(clash_row.status(), 404, "the conflicting tombstone stayed deleted");
    let n = log.len();
    sink.wait_for("every event", |e| e.len() == n).await;
});

events_test!(events_are_pruned_after_retain_only_once_every_endpoint_is_done_with_them, |backend| {
    let sink = Sink::start().await;
    sink.set_status(500);
    let toml = format!("[events]\nretain = \"1d\"\n{}", endpoint("hook", &sink.url, "max_attempts = 1000"));
    let reg = with_config(backend, &toml).await.unwrap();
    reg.push_image("prune/app", "v1", 7).await;
    reg.wait_status("a failure", |s| s["failures"].as_i64().unwrap_or(0) > 0).await;
    // Two days on: past retain, and past max_age, so the failing batch becomes dead letters.
    reg.app.registry.clock().advance_ms(2 * 24 * 3600 * 1000);
    reg.wait_status("dead letters", |s| s["dead_letters"] == 2).await;
    assert_eq!(reg.app.registry.prune_events().await.unwrap(), 0, "dead letters hold their events");
    assert_eq!(reg.event_log().await.len(), 2);
    sink.set_status(200);
    let (code, v) = reg.admin(Method::POST, "events/replay/hook", Some(json!({"dead": true}))).await;
    assert_eq!((code, v["queued"].as_i64()), (200, Some(2)), "{v}");
    sink.wait_for("the replay", |e| e.len() == 2).await;
    reg.wait_status("no letters", |s| s["dead_letters"] == 0 && s["replays"] == 0).await;
    // A new event, delivered but younger than retain, stays; the two old ones go.
    reg.push_image("prune/app", "v2", 8).await;
    sink.wait_for("the new push", |e| e.len() == 4).await;
    reg.wait_status("nothing pending", |s| s["pending"] == 0).await;
    assert_eq!(reg.app.registry.prune_events().await.unwrap(), 2);
    let log = reg.event_log().await;
    assert_eq!(log.len(), 2, "{log:#?}");
    assert!(log.iter().all(|e| e["tag"] == "v2"), "{log:#?}");
});
