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

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
    child.wait().unwrap()
}

#[tokio::test]
async fn serve_with_flags_answers_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut child = Command::new(BERTH)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&ready, &mut child);
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

#[test]
fn bare_serve_uses_the_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // Nothing but `serve` (and a ready file to know when it listens).
    let mut child = Command::new(BERTH)
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
            if err.contains("127.0.0.1:5000") {
                eprintln!("port 5000 is taken on this machine; default address not checked: {err}");
                return;
            }
            panic!("berth exited: {status}: {err}");
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "127.0.0.1:5000");
    assert!(dir.path().join("berth-data/metadata.db").exists());
    assert!(terminate(&mut child).success());
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
