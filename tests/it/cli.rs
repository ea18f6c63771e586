//! The `berth` binary: serving, readiness, configuration errors, signals.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

fn wait_for_file(path: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("berth exited early: {status}");
        }
        assert!(Instant::now() < deadline, "berth did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `berth serve` on an ephemeral port with its data under `dir` and its log captured.
fn serve_with_log(dir: &Path) -> (Child, String) {
    serve_with_log_and_env(dir, &[])
}

/// Like [`serve_with_log`], with environment variables set.
fn serve_with_log_and_env(dir: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let ready = dir.join("ready");
    let mut child = Command::new(BERTH)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&ready, &mut child);
    (child, addr)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
    child.wait().unwrap()
}

#[tokio::test]
async fn serve_with_flags_answers_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve_with_log(dir.path());
    let res = reqwest::get(format!("http://{addr}/v2/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(reqwest::get(format!("http://{addr}/healthz")).await.unwrap().status(), 200);
    assert!(dir.path().join("data/metadata.db").exists());
    let status = terminate(&mut child);
    assert!(status.success(), "{status}");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("http.method=GET") && log.contains("http.path=/v2/") && log.contains("http.status=200"),
        "{log}"
    );
    assert!(log.contains("duration_ms="), "{log}");
}

/// Whether commands can run in a network namespace of their own (root, util-linux `unshare`):
/// there, 127.0.0.1:5000 is always free, whatever runs on this machine.
fn private_network() -> bool {
    Command::new("unshare").args(["--net", "true"]).status().is_ok_and(|s| s.success())
}

#[test]
fn bare_serve_uses_the_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // Nothing but `serve` (and a ready file to know when it listens) — in a network namespace of
    // its own, so a Berth a user left running on port 5000 cannot make this test pass without
    // checking. Without one, a taken port fails the test rather than skipping it.
    let mut command = if private_network() {
        let mut c = Command::new("unshare");
        c.args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\"", BERTH]);
        c
    } else {
        Command::new(BERTH)
    };
    let mut child = command
        .current_dir(dir.path())
        .args(["serve", "--ready-file"])
        .arg(&ready)
        .env_remove("BERTH_LISTEN")
        .env_remove("BERTH_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let err = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).to_string();
            panic!("berth exited: {status}: {err}");
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "127.0.0.1:5000");
    assert!(dir.path().join("berth-data/metadata.db").exists());
    assert!(terminate(&mut child).success());
}

// A bad log level stops Berth with a message naming where it came from, before anything starts.
#[test]
fn bad_log_levels_stop_berth_and_say_where() {
    let dir = tempfile::tempdir().unwrap();
    for (args, env, source) in [
        (vec!["--log-level", "verbose"], None, "--log-level"),
        (vec![], Some(("BERTH_LOG_LEVEL", "bogus")), "BERTH_LOG_LEVEL"),
        (vec!["--log-level", "xx=["], None, "--log-level"),
    ] {
        let mut c = Command::new(BERTH);
        c.args(["serve", "--listen", "127.0.0.1:0"])
            .args(&args)
            .current_dir(dir.path())
            .env_remove("RUST_LOG");
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(source) && err.contains("log level"), "{err}");
        assert!(!dir.path().join("berth-data").exists(), "nothing was created");
    }
}

// A port in use stops Berth before it opens or creates anything.
#[test]
fn a_port_in_use_stops_berth_before_it_opens_anything() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BERTH)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(!log.contains("deployment opened"), "{log}");
    assert!(!dir.path().join("data").exists(), "the data directory was not created");
}

// The request log tells the bytes that really moved: a chunked upload's body (no
// Content-Length), nothing out for HEAD, a streamed download's size; and a final line on stop.
#[tokio::test]
async fn the_request_log_counts_real_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = serve_with_log(dir.path());
    let client = reqwest::Client::new();
    let res = client.post(format!("http://{addr}/v2/log/blobs/uploads/")).send().await.unwrap();
    let loc = res.headers()["location"].to_str().unwrap().to_string();
    let data = vec![7u8; 200_000];
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(50_000).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let res = client.patch(format!("http://{addr}{loc}")).body(body).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let loc = res.headers()["location"].to_str().unwrap().to_string();
    let digest = berth::oci::Digest::sha256_of(&data);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let res = client.put(format!("http://{addr}{loc}{sep}digest={digest}")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let blob = format!("http://{addr}/v2/log/blobs/{digest}");
    assert_eq!(client.head(&blob).send().await.unwrap().status(), 200);
    assert_eq!(client.get(&blob).send().await.unwrap().bytes().await.unwrap().len(), 200_000);
    assert!(terminate(&mut child).success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    let line = |method: &str| {
        log.lines()
            .find(|l| l.contains(&format!("http.method={method}")) && l.contains("/blobs/"))
            .unwrap_or_else(|| panic!("no {method} line in {log}"))
            .to_string()
    };
    assert!(line("PATCH").contains("bytes.in=200000"), "{}", line("PATCH"));
    assert!(line("HEAD").contains("bytes.out=0"), "{}", line("HEAD"));
    assert!(line("GET").contains("bytes.out=200000"), "{}", line("GET"));
    assert!(log.lines().last().is_some_and(|l| l.contains("berth stopped")), "{log}");
}

#[test]
fn bad_configuration_is_reported_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n[storage]\nfsink = true\n").unwrap();
    let out = Command::new(BERTH).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("berth.toml") && err.contains("fsink"), "{err}");

    let out = Command::new(BERTH)
        .args(["serve", "--listen", "not-an-address"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn config_file_and_env_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    let data = dir.path().join("from-file");
    std::fs::write(&cfg, format!("listen = \"127.0.0.1:1\"\ndata_dir = {:?}\n", data.display().to_string()))
        .unwrap();
    let ready = dir.path().join("ready");
    let mut child = Command::new(BERTH)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--ready-file")
        .arg(&ready)
        .env("BERTH_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&ready, &mut child);
    assert!(!addr.ends_with(":1"), "env beats file: {addr}");
    assert!(data.join("metadata.db").exists());
    assert!(terminate(&mut child).success());
}

// `--help` is the map: every flag with an environment variable shows it, and the top-level help
// groups the commands with an example each.
#[test]
fn help_shows_the_environment_and_the_map() {
    let out = Command::new(BERTH).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["BERTH_CONFIG", "BERTH_DATA_DIR", "BERTH_LOG_LEVEL", "BERTH_LISTEN"] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
    let out = Command::new(BERTH).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for example in [
        "berth serve",
        "berth repos",
        "berth delete --dry-run",
        "berth restore",
        "berth tags revert",
        "berth purge",
    ] {
        assert!(help.contains(example), "{example} missing from:\n{help}");
    }
    let out = Command::new(BERTH).args(["restore", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["BERTH_URL", "BERTH_USER", "BERTH_PASSWORD", "BERTH_CONFIG", "BERTH_DATA_DIR"] {
        assert!(help.contains(var), "{var} missing from:\n{help}");
    }
}

// `log_format = "json"`: every line is a JSON object, and deletes and collections leave audit
// events (target `berth::audit`) naming who did what.
#[tokio::test]
async fn json_logs_carry_an_audit_trail() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("BERTH_LOG_FORMAT", "json"),
        ("BERTH_GC_RESTORE_WINDOW", "1ms"),
        // Long enough for the push to reference its blobs before the collector may take them.
        ("BERTH_GC_BLOB_GRACE", "2s"),
        // One process: no other clock to allow for.
        ("BERTH_GC_CLOCK_SKEW", "0ms"),
        ("BERTH_GC_UNTAGGED_GRACE", "1ms"),
        ("BERTH_GC_INTERVAL", "100ms"),
    ];
    let (mut child, addr) = serve_with_log_and_env(dir.path(), &env);
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let (config, layer) = (b"{}".to_vec(), b"audited layer".to_vec());
    for blob in [&config, &layer] {
        let d = berth::oci::Digest::sha256_of(blob);
        let res = client
            .post(format!("{base}/v2/audit/app/blobs/uploads/?digest={d}"))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": berth::oci::Digest::sha256_of(&config).as_str(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": berth::oci::Digest::sha256_of(&layer).as_str(), "size": layer.len()}],
    }))
    .unwrap();
    let digest = berth::oci::Digest::sha256_of(&manifest);
    let res = client
        .put(format!("{base}/v2/audit/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let res = client.delete(format!("{base}/v2/audit/app/manifests/{digest}")).send().await.unwrap();
    assert_eq!(res.status(), 202);
    // The collector in serve takes it all: the manifest at once, its blobs once their grace ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let blobs = [&config, &layer].map(|b| berth::oci::Digest::sha256_of(b).to_string());
    for item in std::iter::once(format!("audit/app@{digest}")).chain(blobs) {
        let url = format!("{base}/admin/v1/explain/{item}");
        while client.get(&url).send().await.unwrap().json::<Value>().await.unwrap()["state"] != "gone" {
            assert!(Instant::now() < deadline, "{item} not collected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    terminate(&mut child);
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "berth is serving"), "{out}");
    let audit: Vec<&Value> = lines.iter().filter(|l| l["target"] == "berth::audit").collect();
    let find = |action: &str| audit.iter().find(|l| l["action"] == action).copied();
    let deleted = find("delete-manifest").unwrap_or_else(|| panic!("no delete in {audit:?}"));
    assert_eq!(deleted["actor"], "anonymous");
    assert_eq!(deleted["subject"], format!("audit/app@{digest}"));
    assert_eq!(deleted["tags"], "audit/app:v1");
    let collected = find("collect-manifest").unwrap_or_else(|| panic!("no collection in {audit:?}"));
    assert_eq!(
        (collected["actor"].as_str(), collected["subject"].as_str()),
        (Some("collector"), Some(format!("audit/app@{digest}").as_str()))
    );
    assert_eq!(audit.iter().filter(|l| l["action"] == "collect-blob").count(), 2, "{audit:?}");
}
