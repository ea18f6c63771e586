//! skopeo: push from an OCI layout, pull back byte-exact, list tags, inspect by digest, copy a
//! multi-arch index with `--all`, copy between repositories, and Docker schema2 conversion.

use berth::oci::Digest;
use serde_json::Value;

use super::layout;
use super::{have, run};
use crate::backend_test;
use crate::harness::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, header};

backend_test!(skopeo_round_trip, |reg| {
    if !have("skopeo") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let amd = layout::image(&lay, 1, "amd64");
    let arm = layout::image(&lay, 2, "arm64");
    let idx = layout::index(&lay, &[(&amd, "amd64"), (&arm, "arm64")]);
    layout::finish(&lay, &[("v1", &amd, OCI_MANIFEST), ("multi", &idx, OCI_INDEX)]);
    let r = reg.addr.to_string();
    let lay_ref = |tag: &str| format!("oci:{}:{tag}", lay.display());
    let nv = "--dest-tls-verify=false";

    // Push by tag; the digest is preserved.
    run("skopeo", &["copy", "--quiet", nv, &lay_ref("v1"), &format!("docker://{r}/e2e/skopeo:v1")], &[])
        .await;
    let res = reg.get("/v2/e2e/skopeo/manifests/v1").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(amd.digest.as_str()));

    // Inspect by digest: the exact bytes.
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &format!("docker://{r}/e2e/skopeo@{}", amd.digest)],
        &[],
    )
    .await;
    assert_eq!(raw.as_bytes(), amd.bytes.as_slice());
    let config = run(
        "skopeo",
        &["inspect", "--config", "--tls-verify=false", &format!("docker://{r}/e2e/skopeo:v1")],
        &[],
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&config).unwrap()["architecture"], "amd64");

    // List tags.
    let tags: Value = serde_json::from_str(
        &run("skopeo", &["list-tags", "--tls-verify=false", &format!("docker://{r}/e2e/skopeo")], &[]).await,
    )
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["v1"]));

    // Pull back into a new layout: every blob byte-exact.
    let pulled = work.path().join("pulled");
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{r}/e2e/skopeo:v1"),
            &format!("oci:{}:v1", pulled.display()),
        ],
        &[],
    )
    .await;
    for blob in amd.blobs.iter().chain([&amd.digest]) {
        let got = std::fs::read(pulled.join("blobs/sha256").join(blob.hex())).unwrap();
        assert_eq!(Digest::sha256_of(&got), *blob);
        assert_eq!(got, std::fs::read(lay.join("blobs/sha256").join(blob.hex())).unwrap());
    }

    // A multi-arch index with all its children; platform resolution works on it.
    run(
        "skopeo",
        &["copy", "--quiet", "--all", nv, &lay_ref("multi"), &format!("docker://{r}/e2e/skopeo:multi")],
        &[],
    )
    .await;
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &format!("docker://{r}/e2e/skopeo:multi")],
        &[],
    )
    .await;
    assert_eq!(raw.as_bytes(), idx.bytes.as_slice());
    let arm_inspect: Value = serde_json::from_str(
        &run(
            "skopeo",
            &[
                "inspect",
                "--tls-verify=false",
                "--override-arch",
                "arm64",
                &format!("docker://{r}/e2e/skopeo:multi"),
            ],
            &[],
        )
        .await,
    )
    .unwrap();
    // skopeo reports the index's digest, and the resolved child's platform and labels.
    assert_eq!(arm_inspect["Digest"], idx.digest.as_str());
    assert_eq!(arm_inspect["Architecture"], "arm64");
    assert_eq!(arm_inspect["Labels"]["seed"], "2");

    // Registry to registry, into another repository, index and all.
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--all",
            "--src-tls-verify=false",
            nv,
            &format!("docker://{r}/e2e/skopeo:multi"),
            &format!("docker://{r}/e2e/copy:multi"),
        ],
        &[],
    )
    .await;
    let res = reg.get("/v2/e2e/copy/manifests/multi").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(idx.digest.as_str()));
    for child in [&amd, &arm] {
        assert_eq!(reg.get(&format!("/v2/e2e/copy/manifests/{}", child.digest)).await.status(), 200);
        for blob in &child.blobs {
            assert_eq!(reg.get(&format!("/v2/e2e/copy/blobs/{blob}")).await.status(), 200);
        }
    }

    // Conversion to a Docker schema2 manifest on push.
    run(
        "skopeo",
        &["copy", "--quiet", "--format", "v2s2", nv, &lay_ref("v1"), &format!("docker://{r}/e2e/v2s2:v1")],
        &[],
    )
    .await;
    let res = reg.get("/v2/e2e/v2s2/manifests/v1").await;
    assert_eq!(header(&res, "content-type"), Some(DOCKER_MANIFEST));

    // The catalog shows what was pushed.
    let catalog: Value = reg.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["e2e/copy", "e2e/skopeo", "e2e/v2s2"]));
});
