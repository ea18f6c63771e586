//! Real clients through a pull-through cache: skopeo pulls a multi-arch index with `--all` and a
//! referrer byte-exact, and podman pulls through a `registries.conf` mirror with a prefix — the
//! last with the upstream stopped, so only the cache can have answered.

use berth::oci::Digest;
use serde_json::{Value, json};

use super::{have, layout, run};
use crate::backend_test;
use crate::harness::*;
use crate::proxy::{proxy_of, with_proxy};

backend_test!(skopeo_and_podman_pull_through_the_cache, |reg| {
    if !have("skopeo") || !have("podman") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("lay");
    let amd = layout::image(&lay, 31, "amd64");
    let arm = layout::image(&lay, 32, "arm64");
    let idx = layout::index(&lay, &[(&amd, "amd64"), (&arm, "arm64")]);
    layout::finish(&lay, &[("v1", &amd, OCI_MANIFEST), ("multi", &idx, OCI_INDEX)]);

    // The upstream: a Berth with token authentication, anonymous pulls of public/**.
    let up = TestRegistry::try_start(Backend::Sqlite).await.unwrap();
    let u = up.addr.to_string();
    for tag in ["v1", "multi"] {
        run(
            "skopeo",
            &[
                "copy",
                "--quiet",
                "--all",
                "--dest-tls-verify=false",
                &format!("oci:{}:{tag}", lay.display()),
                &format!("docker://{u}/public/app:{tag}"),
            ],
            &[],
        )
        .await;
    }
    // A referrer of the amd64 image (an artifact with a subject).
    let empty = up.upload_blob("public/app", b"{}").await;
    let note = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.note",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": amd.digest.as_str(), "size": amd.bytes.len()},
    }))
    .unwrap();
    let note_digest = Digest::sha256_of(&note);
    assert_eq!(up.put_manifest("public/app", note_digest.as_str(), OCI_MANIFEST, &note).await.status(), 201);
    let up = crate::auth::with_auth(up, true).await;
    let reg = with_proxy(reg, proxy_of(&up.url(""))).await;
    let r = reg.addr.to_string();

    // skopeo: the whole index with every platform, byte-exact, through the cache.
    let pulled = work.path().join("pulled");
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            &format!("docker://{r}/up/public/app:multi"),
            &format!("oci:{}:multi", pulled.display()),
        ],
        &[],
    )
    .await;
    for blob in amd.blobs.iter().chain(&arm.blobs).chain([&amd.digest, &arm.digest, &idx.digest]) {
        let got = std::fs::read(pulled.join("blobs/sha256").join(blob.hex())).unwrap();
        assert_eq!(got, std::fs::read(lay.join("blobs/sha256").join(blob.hex())).unwrap(), "{blob}");
    }
    // The index and both children are recorded now, complete.
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM manifests WHERE deleted_at IS NULL")
        .fetch_one(&reg.sql().await)
        .await
        .unwrap();
    assert_eq!(n, 3);

    // Referrers through the cache, and the referrer itself byte-exact.
    let refs: Value =
        reg.get(&format!("/v2/up/public/app/referrers/{}", amd.digest)).await.json().await.unwrap();
    assert_eq!(refs["manifests"][0]["digest"], note_digest.as_str());
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &format!("docker://{r}/up/public/app@{note_digest}")],
        &[],
    )
    .await;
    assert_eq!(raw.as_bytes(), note.as_slice());

    // The single image by tag, so the cache knows the tag; then the upstream goes away.
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{r}/up/public/app:v1"),
            &format!("oci:{}:v1", pulled.display()),
        ],
        &[],
    )
    .await;
    up.stop().await;

    // podman, told that the upstream's public/ has a mirror at the cache's up/public.
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n[[registry]]\nlocation = \"{u}/public\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{r}/up/public\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    let (root, runroot) = (work.path().join("root"), work.path().join("runroot"));
    let podman = |args: &[&str]| {
        let mut all = vec!["--root", root.to_str().unwrap(), "--runroot", runroot.to_str().unwrap()];
        all.extend_from_slice(&["--storage-driver", "vfs"]);
        all.extend_from_slice(args);
        all.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let pull = podman(&["pull", "--quiet", &format!("{u}/public/app:v1")]);
    let pull: Vec<&str> = pull.iter().map(String::as_str).collect();
    let id = run("podman", &pull, &[("CONTAINERS_REGISTRIES_CONF", conf.to_str().unwrap())]).await;
    assert!(!id.trim().is_empty());
    let inspect = podman(&["image", "inspect", "--format", "{{.Digest}}", id.trim()]);
    let inspect: Vec<&str> = inspect.iter().map(String::as_str).collect();
    let inspect = run("podman", &inspect, &[]).await;
    assert_eq!(inspect.trim(), amd.digest.as_str());
});
