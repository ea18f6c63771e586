//! End-to-end tests with real registry clients (skopeo, buildah, podman, curl, the ORAS Python
//! SDK) against a live Berth.
//! A missing client skips the test locally; under `CI` it fails, because the test script must
//! install every client it uses.

mod auth_clients;
mod buildah;
mod console;
mod deletes;
mod import;
pub mod layout;
mod oci_client;
mod proxy;
mod quickstart;
mod retention;
mod skopeo;

use std::process::Output;

/// Whether `tool` can run here; panics under CI when it cannot.
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{tool} is not installed; the test script must install it");
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Runs a command, asserting success; returns stdout.
pub async fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = run_raw(program, args, envs).await;
    assert!(
        out.status.success(),
        "{program} {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs a command and returns its output whatever the exit status.
pub async fn run_raw(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// `skopeo copy --all` between two references, over plain HTTP.
pub async fn skopeo_copy(from: &str, to: &str) {
    run(
        "skopeo",
        &["copy", "--quiet", "--all", "--src-tls-verify=false", "--dest-tls-verify=false", from, to],
        &[],
    )
    .await;
}
