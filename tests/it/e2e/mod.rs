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
mod quotas;
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

/// The reference registry (`docker-registry`) serving the filesystem root `root` on a free
/// loopback port, with deletes enabled. `storage` and `top` are extra YAML: lines of its
/// `storage:` section (indented two spaces) and top-level sections. Stopped when dropped.
pub struct DockerRegistry {
    child: std::process::Child,
    pub addr: String,
}

impl DockerRegistry {
    pub fn start(root: &std::path::Path, storage: &str, top: &str) -> DockerRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = root.with_extension("yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\n{storage}{top}http:\n  addr: {addr}\n",
                root.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        DockerRegistry { child, addr }
    }

    pub fn stop(self) {}
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
