//! Deleting with real clients: `skopeo delete` by digest and by tag, a raw `DELETE` by tag with
//! curl, and the ORAS Python SDK's `delete_tag`.

use berth::oci::Digest;
use serde_json::json;

use super::layout;
use super::{have, run, run_raw};
use crate::backend_test;
use crate::harness::{OCI_MANIFEST, header};

backend_test!(skopeo_and_curl_delete, |reg| {
    if !have("skopeo") || !have("curl") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let one = layout::image(&lay, 11, "amd64");
    let two = layout::image(&lay, 12, "arm64");
    layout::finish(&lay, &[("one", &one, OCI_MANIFEST), ("two", &two, OCI_MANIFEST)]);
    let r = reg.addr.to_string();
    for tag in ["one", "two"] {
        let src = format!("oci:{}:{tag}", lay.display());
        run(
            "skopeo",
            &["copy", "--quiet", "--dest-tls-verify=false", &src, &format!("docker://{r}/e2e/del:{tag}")],
            &[],
        )
        .await;
    }
    // A second tag on `one`, to be removed alone with curl.
    let manifest = reg.get("/v2/e2e/del/manifests/one").await.bytes().await.unwrap();
    assert_eq!(reg.put_manifest("e2e/del", "extra", OCI_MANIFEST, &manifest).await.status(), 201);
    let out = run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
            &format!("http://{r}/v2/e2e/del/manifests/extra"),
        ],
        &[],
    )
    .await;
    assert_eq!(out, "202");
    assert_eq!(reg.get("/v2/e2e/del/manifests/extra").await.status(), 404);
    assert_eq!(reg.get("/v2/e2e/del/manifests/one").await.status(), 200, "a tag delete keeps the manifest");

    // skopeo by digest.
    run("skopeo", &["delete", "--tls-verify=false", &format!("docker://{r}/e2e/del@{}", one.digest)], &[])
        .await;
    assert_eq!(reg.get(&format!("/v2/e2e/del/manifests/{}", one.digest)).await.status(), 404);
    assert_eq!(reg.get("/v2/e2e/del/manifests/one").await.status(), 404);
    // skopeo by tag (it resolves the tag and deletes the manifest it names).
    run("skopeo", &["delete", "--tls-verify=false", &format!("docker://{r}/e2e/del:two")], &[]).await;
    assert_eq!(reg.get(&format!("/v2/e2e/del/manifests/{}", two.digest)).await.status(), 404);
    let tags: serde_json::Value = reg.get("/v2/e2e/del/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], json!([]));
    // Deleting what is gone: skopeo reports the registry's 404.
    let out = run_raw(
        "skopeo",
        &["delete", "--tls-verify=false", &format!("docker://{r}/e2e/del@{}", one.digest)],
        &[],
    )
    .await;
    assert!(!out.status.success());
    // Pushed again at once, it pulls again.
    let src = format!("oci:{}:one", lay.display());
    run(
        "skopeo",
        &["copy", "--quiet", "--dest-tls-verify=false", &src, &format!("docker://{r}/e2e/del:one")],
        &[],
    )
    .await;
    let res = reg.get("/v2/e2e/del/manifests/one").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(one.digest.as_str()));
});

/// The Python of the virtual environment with the ORAS SDK that the test script prepares.
fn oras_python() -> Option<String> {
    match std::env::var("BERTH_TEST_ORAS_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "BERTH_TEST_ORAS_PYTHON must be set under CI (scripts/test.sh sets it)"
            );
            eprintln!("skipping: BERTH_TEST_ORAS_PYTHON is not set");
            None
        }
    }
}

backend_test!(oras_py_delete_tag, |reg| {
    let Some(python) = oras_python() else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/e2e/oras_py.py");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("notes.txt");
    std::fs::write(&file, b"an artifact pushed with oras-py").unwrap();
    let r = reg.addr.to_string();
    let target = format!("{r}/e2e/oras:v1");
    let file = file.to_str().unwrap();
    let digest = run(&python, &[script, "push", &target, file], &[]).await;
    let digest = Digest::parse(digest.trim()).unwrap();
    assert_eq!(reg.get("/v2/e2e/oras/manifests/v1").await.status(), 200);
    let tags = run(&python, &[script, "tags", &format!("{r}/e2e/oras")], &[]).await;
    assert_eq!(tags.trim(), "v1");
    run(&python, &[script, "delete-tag", &format!("{r}/e2e/oras"), "v1"], &[]).await;
    assert_eq!(reg.get("/v2/e2e/oras/manifests/v1").await.status(), 404);
    assert_eq!(
        reg.get(&format!("/v2/e2e/oras/manifests/{digest}")).await.status(),
        404,
        "the SDK deletes by digest"
    );
});
