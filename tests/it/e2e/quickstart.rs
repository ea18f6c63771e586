//! The README's quick start, run exactly as written by `scripts/quickstart.sh`.

use super::{have, run_raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_works_as_written() {
    if !["buildah", "skopeo", "curl", "unshare"].iter().all(|t| have(t)) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/quickstart.sh");
    let out = run_raw("bash", &[script, env!("CARGO_BIN_EXE_berth")], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "quick start failed:\n{stdout}\n{stderr}");
    // What the steps print: the tag list, the 202 of the tag delete, the tombstone and the
    // restored digest, the history with its delete and restore.
    assert!(stdout.contains("\"v1\"") && stdout.contains("202"), "{stdout}");
    assert!(stdout.contains("restorable until") && stdout.contains("restored"), "{stdout}");
    assert!(stdout.contains("delete") && stdout.contains("restore"), "{stdout}");
}
