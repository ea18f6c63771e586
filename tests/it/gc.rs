//! The online collector (`gc.enabled` is off by default; these tests run passes directly and
//! move the application clock instead of waiting): tombstones go when their restore window has
//! passed, untagged manifests when their grace has, blobs when nothing references them and their
//! grace (refreshed by HEAD) has passed — and the bytes leave storage.

use berth::oci::{Digest, RepoName};
use reqwest::Method;
use serde_json::json;

use crate::backend_test;
use crate::harness::*;

const HOUR: i64 = 3600 * 1000;
const DAY: i64 = 24 * HOUR;

impl TestRegistry {
    async fn collect(&self) -> berth::registry::GcReport {
        self.app.registry.collect(100_000).await.unwrap()
    }

    fn advance(&self, ms: i64) {
        self.app.registry.clock().advance_ms(ms);
    }
}

fn blob_digests(img: &PushedImage) -> Vec<Digest> {
    std::iter::once(&img.config).chain(&img.layers).map(|b| Digest::sha256_of(b)).collect()
}

backend_test!(deleted_images_are_reclaimed_after_their_window, |reg| {
    let gone = reg.push_image("gc/app", "v1", 1200).await;
    let kept = reg.push_image("gc/app", "v2", 1201).await;
    let mut gone_keys = Vec::new();
    for d in blob_digests(&gone) {
        gone_keys.push(reg.storage_key(&d).await);
    }
    assert_eq!(
        reg.req(Method::DELETE, &format!("/v2/gc/app/manifests/{}", gone.digest))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );

    // Within the restore window nothing goes, and the tombstone can still be restored.
    reg.advance(6 * DAY);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs), (0, 0), "{report:?}");

    reg.advance(DAY + HOUR);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs, report.objects_deleted), (1, 3, 3), "{report:?}");
    let repo = RepoName::parse("gc/app").unwrap();
    assert!(reg.app.registry.restore_manifest(&repo, &gone.digest, false, None).await.is_err());
    for d in blob_digests(&gone) {
        assert_eq!(reg.get(&format!("/v2/gc/app/blobs/{d}")).await.status(), 404);
    }
    // The bytes are gone from storage; what is kept pulls completely.
    let stored = reg.app.registry.blobs().list("").await.unwrap();
    for key in &gone_keys {
        assert!(!stored.contains(key), "{key} still stored");
    }
    assert_eq!(reg.get("/v2/gc/app/manifests/v2").await.bytes().await.unwrap(), kept.manifest);
    for (d, bytes) in blob_digests(&kept).iter().zip(std::iter::once(&kept.config).chain(&kept.layers)) {
        assert_eq!(reg.get(&format!("/v2/gc/app/blobs/{d}")).await.bytes().await.unwrap(), *bytes);
    }
    let fsck = reg.app.registry.fsck(true, &|_, _| {}).await.unwrap();
    assert!(fsck.clean() && fsck.orphans.is_empty(), "{fsck:?}");
    // Nothing more is due.
    reg.advance(30 * DAY);
    assert_eq!(reg.collect().await.manifests + reg.collect().await.blobs, 0);
});

backend_test!(blob_grace_is_refreshed_by_head_and_references_hold, |reg| {
    let data = random_bytes(1210, 2000);
    let digest = reg.upload_blob("gc/grace", &data).await;
    let path = format!("/v2/gc/grace/blobs/{digest}");
    reg.advance(23 * HOUR);
    reg.collect().await;
    assert_eq!(reg.get(&path).await.status(), 200, "within blob_grace");
    // A HEAD that answered 200 starts the grace again (a client may skip the upload now).
    assert_eq!(reg.req(Method::HEAD, &path).send().await.unwrap().status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    reg.advance(2 * HOUR);
    reg.collect().await;
    assert_eq!(reg.get(&path).await.status(), 200, "the HEAD refreshed the grace");
    reg.advance(23 * HOUR);
    assert_eq!(reg.collect().await.blobs, 1);
    assert_eq!(reg.get(&path).await.status(), 404);

    // A tagged image's blobs are never collected, however old.
    let img = reg.push_image("gc/grace", "v1", 1211).await;
    reg.advance(60 * DAY);
    reg.collect().await;
    assert_eq!(reg.get("/v2/gc/grace/manifests/v1").await.bytes().await.unwrap(), img.manifest);
    for d in blob_digests(&img) {
        assert_eq!(reg.get(&format!("/v2/gc/grace/blobs/{d}")).await.status(), 200);
    }
});

backend_test!(untagged_manifests_go_after_their_grace_unless_held, |reg| {
    // An index holds its untagged children; once it goes, they go.
    let amd = reg.push_image("gc/idx", "amd", 1220).await;
    let arm = reg.push_image("gc/idx", "arm", 1221).await;
    let (index, _) = reg.push_index("gc/idx", "all", &[&amd, &arm]).await;
    for tag in ["amd", "arm"] {
        assert_eq!(
            reg.req(Method::DELETE, &format!("/v2/gc/idx/manifests/{tag}")).send().await.unwrap().status(),
            202
        );
    }
    reg.advance(8 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "the index holds its children");
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{}", amd.digest)).await.status(), 200);
    assert_eq!(reg.req(Method::DELETE, "/v2/gc/idx/manifests/all").send().await.unwrap().status(), 202);
    reg.advance(6 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "untagged grace");
    reg.advance(2 * DAY);
    let report = reg.collect().await;
    assert_eq!((report.manifests, report.blobs), (3, 6), "{report:?}");
    for d in [&index, &amd.digest, &arm.digest] {
        assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{d}")).await.status(), 404);
    }

    // A pull extends an untagged manifest's grace; a referrer lives as long as its subject.
    let pulled = reg.push_image("gc/idx", "p", 1222).await;
    let config = reg.upload_blob("gc/idx", b"{}").await;
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": pulled.digest.as_str(), "size": pulled.manifest.len()},
    }))
    .unwrap();
    let sbom_digest = Digest::sha256_of(&sbom);
    assert_eq!(reg.put_manifest("gc/idx", sbom_digest.as_str(), OCI_MANIFEST, &sbom).await.status(), 201);
    assert_eq!(reg.req(Method::DELETE, "/v2/gc/idx/manifests/p").send().await.unwrap().status(), 202);
    reg.advance(6 * DAY);
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{}", pulled.digest)).await.status(), 200);
    reg.app.registry.flush_access().await.unwrap();
    reg.advance(2 * DAY);
    assert_eq!(reg.collect().await.manifests, 0, "pulled a day and a half ago: still in grace");
    assert_eq!(
        reg.get(&format!("/v2/gc/idx/manifests/{sbom_digest}")).await.status(),
        200,
        "its subject lives"
    );
    reg.advance(6 * DAY);
    let report = reg.collect().await;
    assert_eq!(report.manifests, 2, "the image, then its referrer: {report:?}");
    assert_eq!(reg.get(&format!("/v2/gc/idx/manifests/{sbom_digest}")).await.status(), 404);
});
