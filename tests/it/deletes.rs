//! The delete contract through the OCI API: tombstones invisible at once, tags removed and
//! recorded, refusals that name what holds an item, conditional tag writes, revival by push,
//! and the conformance suite's delete order.

use berth::oci::{Digest, RepoName, Tag};
use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_test;
use crate::harness::*;

impl TestRegistry {
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.req(Method::DELETE, path).send().await.unwrap()
    }

    pub async fn tags_of(&self, repo: &str) -> Value {
        self.get(&format!("/v2/{repo}/tags/list")).await.json::<Value>().await.unwrap()["tags"].clone()
    }
}

async fn read_all(blobs: &berth::blob::BlobStore, key: &str) -> Vec<u8> {
    use futures_util::StreamExt;
    let mut stream = blobs.read(key, None).await.unwrap();
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    out
}

fn blob_digests(img: &PushedImage) -> Vec<Digest> {
    std::iter::once(&img.config).chain(&img.layers).map(|b| Digest::sha256_of(b)).collect()
}

backend_test!(deleting_a_manifest_by_digest_tombstones_it_and_removes_its_tags, |reg| {
    let img = reg.push_image("del/app", "v1", 200).await;
    reg.put_manifest("del/app", "stable", OCI_MANIFEST, &img.manifest).await;
    let keep = reg.push_image("del/app", "other", 201).await;

    let res = reg.delete(&format!("/v2/del/app/manifests/{}", img.digest)).await;
    assert_eq!(res.status(), 202);
    assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
    for path in [
        format!("/v2/del/app/manifests/{}", img.digest),
        "/v2/del/app/manifests/v1".into(),
        "/v2/del/app/manifests/stable".into(),
    ] {
        assert_oci_error(reg.get(&path).await, 404, "MANIFEST_UNKNOWN").await;
        let head = reg.req(Method::HEAD, &path).send().await.unwrap();
        assert_eq!(head.status(), 404, "{path}");
    }
    assert_eq!(reg.tags_of("del/app").await, json!(["other"]));
    // The other image is untouched; the deleted one's blobs are still linked (blob deletes are
    // separate) and the history records both tag deletes.
    assert_eq!(reg.get(&format!("/v2/del/app/manifests/{}", keep.digest)).await.status(), 200);
    for d in blob_digests(&img) {
        assert_eq!(reg.get(&format!("/v2/del/app/blobs/{d}")).await.status(), 200);
    }
    let repo = RepoName::parse("del/app").unwrap();
    let history = reg.app.registry.meta().history(&repo, None).await.unwrap();
    let deletes: Vec<_> = history.iter().filter(|h| h.kind == "delete").collect();
    assert_eq!(deletes.len(), 2, "{history:?}");
    assert!(
        deletes
            .iter()
            .all(|h| h.old_digest.as_deref() == Some(img.digest.as_str()) && h.new_digest.is_none())
    );
    // Deleting it again: it is gone.
    assert_oci_error(
        reg.delete(&format!("/v2/del/app/manifests/{}", img.digest)).await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
});

backend_test!(deleting_a_tag_keeps_the_manifest, |reg| {
    let img = reg.push_image("del/tag", "v1", 210).await;
    reg.put_manifest("del/tag", "v2", OCI_MANIFEST, &img.manifest).await;
    let res = reg.delete("/v2/del/tag/manifests/v1").await;
    assert_eq!(res.status(), 202);
    assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
    assert_oci_error(reg.get("/v2/del/tag/manifests/v1").await, 404, "MANIFEST_UNKNOWN").await;
    assert_eq!(reg.get("/v2/del/tag/manifests/v2").await.status(), 200);
    assert_eq!(reg.get(&format!("/v2/del/tag/manifests/{}", img.digest)).await.status(), 200);
    assert_eq!(reg.tags_of("del/tag").await, json!(["v2"]));
    assert_oci_error(reg.delete("/v2/del/tag/manifests/v1").await, 404, "MANIFEST_UNKNOWN").await;
});

backend_test!(referrers_go_and_come_back_with_their_subject, |reg| {
    let img = reg.push_image("del/ref", "v1", 220).await;
    let config = reg.upload_blob("del/ref", b"{}").await;
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.as_str(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.manifest.len()},
    }))
    .unwrap();
    let sbom_digest = Digest::sha256_of(&sbom);
    assert_eq!(reg.put_manifest("del/ref", sbom_digest.as_str(), OCI_MANIFEST, &sbom).await.status(), 201);
    let path = format!("/v2/del/ref/referrers/{}", img.digest);
    let referrers = async |reg: &TestRegistry| {
        reg.get(&path).await.json::<Value>().await.unwrap()["manifests"].as_array().unwrap().len()
    };
    assert_eq!(referrers(&reg).await, 1);
    assert_eq!(reg.delete(&format!("/v2/del/ref/manifests/{}", img.digest)).await.status(), 202);
    assert_eq!(referrers(&reg).await, 0);
    assert_eq!(
        reg.get(&format!("/v2/del/ref/manifests/{sbom_digest}")).await.status(),
        404,
        "tombstoned with its subject"
    );
    let restored = reg
        .app
        .registry
        .restore_manifest(&RepoName::parse("del/ref").unwrap(), &img.digest, false, Some("admin"))
        .await
        .unwrap();
    assert_eq!(restored.len(), 2);
    assert_eq!(referrers(&reg).await, 1);
    assert_eq!(reg.get("/v2/del/ref/manifests/v1").await.bytes().await.unwrap(), img.manifest);
});

backend_test!(refusals_name_what_holds_the_item, |reg| {
    let amd = reg.push_image("del/multi", "amd", 230).await;
    let arm = reg.push_image("del/multi", "arm", 231).await;
    let (index, _) = reg.push_index("del/multi", "all", &[&amd, &arm]).await;
    let body =
        assert_oci_error(reg.delete(&format!("/v2/del/multi/manifests/{}", amd.digest)).await, 405, "DENIED")
            .await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains(index.as_str()), "{body}");
    assert_eq!(reg.get("/v2/del/multi/manifests/amd").await.status(), 200, "a refusal changes nothing");

    let layer = Digest::sha256_of(&amd.layers[0]);
    let body =
        assert_oci_error(reg.delete(&format!("/v2/del/multi/blobs/{layer}")).await, 405, "DENIED").await;
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains(amd.digest.as_str()) && message.contains("amd"), "{message}");
    assert_eq!(reg.get(&format!("/v2/del/multi/blobs/{layer}")).await.status(), 200);
});

// The 2026 conformance suite's order: all tags, then manifests in reverse push order (an index
// before its children, a referrer before its subject), then every blob; a blob deleted after a
// cross-repository mount is gone there at once and still there in the other repository; and a
// digest deleted a moment ago can be pushed again at once.
backend_test!(conformance_delete_order_all_succeeds, |reg| {
    let amd = reg.push_image("conf/a", "amd", 240).await;
    let arm = reg.push_image("conf/a", "arm", 241).await;
    let (index, index_bytes) = reg.push_index("conf/a", "all", &[&amd, &arm]).await;
    let layer = Digest::sha256_of(&amd.layers[0]);
    let res = reg
        .req(Method::POST, &format!("/v2/conf/b/blobs/uploads/?mount={layer}&from=conf/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    for tag in ["amd", "arm", "all"] {
        assert_eq!(reg.delete(&format!("/v2/conf/a/manifests/{tag}")).await.status(), 202, "{tag}");
    }
    for digest in [&index, &arm.digest, &amd.digest] {
        assert_eq!(reg.delete(&format!("/v2/conf/a/manifests/{digest}")).await.status(), 202, "{digest}");
    }
    for img in [&amd, &arm] {
        for d in blob_digests(img) {
            assert_eq!(reg.delete(&format!("/v2/conf/a/blobs/{d}")).await.status(), 202, "{d}");
            assert_oci_error(reg.get(&format!("/v2/conf/a/blobs/{d}")).await, 404, "BLOB_UNKNOWN").await;
        }
    }
    let mounted = reg.get(&format!("/v2/conf/b/blobs/{layer}")).await;
    assert_eq!(mounted.status(), 200);
    assert_eq!(mounted.bytes().await.unwrap(), amd.layers[0]);
    assert_eq!(reg.tags_of("conf/a").await, json!([]));
    let catalog: Value = reg.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], json!(["conf/b"]), "nothing visible is left in conf/a");

    // Pushed again at once: the blobs, the children, the index by tag.
    let again = reg.push_image("conf/a", "amd", 240).await;
    assert_eq!(again.digest, amd.digest);
    for d in blob_digests(&arm) {
        let blob = if d == Digest::sha256_of(&arm.config) {
            arm.config.clone()
        } else {
            arm.layers.iter().find(|l| Digest::sha256_of(l) == d).unwrap().clone()
        };
        reg.upload_blob("conf/a", &blob).await;
    }
    assert_eq!(reg.put_manifest("conf/a", "arm", OCI_MANIFEST, &arm.manifest).await.status(), 201);
    assert_eq!(reg.put_manifest("conf/a", "all", OCI_INDEX, &index_bytes).await.status(), 201);
    assert_eq!(reg.get("/v2/conf/a/manifests/all").await.bytes().await.unwrap(), index_bytes);
    assert_eq!(
        reg.get(&format!("/v2/conf/a/manifests/{}", amd.digest)).await.bytes().await.unwrap(),
        amd.manifest
    );
});

backend_test!(pushing_a_tombstone_revives_it, |reg| {
    let img = reg.push_image("del/revive", "v1", 250).await;
    assert_eq!(reg.delete(&format!("/v2/del/revive/manifests/{}", img.digest)).await.status(), 202);
    assert_eq!(reg.put_manifest("del/revive", "v1", OCI_MANIFEST, &img.manifest).await.status(), 201);
    assert_eq!(reg.get("/v2/del/revive/manifests/v1").await.bytes().await.unwrap(), img.manifest);
    assert_eq!(reg.delete(&format!("/v2/del/revive/manifests/{}", img.digest)).await.status(), 202);
    assert_eq!(
        reg.put_manifest("del/revive", img.digest.as_str(), OCI_MANIFEST, &img.manifest).await.status(),
        201
    );
    assert_eq!(reg.get(&format!("/v2/del/revive/manifests/{}", img.digest)).await.status(), 200);
});

backend_test!(conditional_tag_writes_and_deletes, |reg| {
    let one = reg.push_image("cond", "v1", 260).await;
    let two = reg.push_image("cond", "other", 261).await;
    let put = |tag: &'static str, bytes: Vec<u8>, header: (&'static str, String)| {
        reg.req(Method::PUT, &format!("/v2/cond/manifests/{tag}"))
            .header("content-type", OCI_MANIFEST)
            .header(header.0, header.1)
            .body(bytes)
            .send()
    };
    // If-Match with the wrong digest: 412, nothing changes.
    let res = put("v1", two.manifest.clone(), ("if-match", format!("\"{}\"", two.digest))).await.unwrap();
    assert_oci_error(res, 412, "DENIED").await;
    assert_eq!(
        header(&reg.get("/v2/cond/manifests/v1").await, "docker-content-digest"),
        Some(one.digest.as_str())
    );
    // With the right one: moved.
    let res = put("v1", two.manifest.clone(), ("if-match", format!("\"{}\"", one.digest))).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        header(&reg.get("/v2/cond/manifests/v1").await, "docker-content-digest"),
        Some(two.digest.as_str())
    );
    // If-None-Match: * only creates.
    let res = put("v1", one.manifest.clone(), ("if-none-match", "*".into())).await.unwrap();
    assert_oci_error(res, 412, "DENIED").await;
    let res = put("fresh", one.manifest.clone(), ("if-none-match", "*".into())).await.unwrap();
    assert_eq!(res.status(), 201);
    // Conditional delete.
    let del = |m: &Digest| {
        reg.req(Method::DELETE, "/v2/cond/manifests/v1").header("if-match", format!("\"{m}\"")).send()
    };
    assert_oci_error(del(&one.digest).await.unwrap(), 412, "DENIED").await;
    assert_eq!(reg.get("/v2/cond/manifests/v1").await.status(), 200);
    assert_eq!(del(&two.digest).await.unwrap().status(), 202);
    assert_eq!(reg.get("/v2/cond/manifests/v1").await.status(), 404);
});

// Two cleanup jobs race to move the same tag from the same starting point: exactly one wins.
backend_test!(conditional_moves_racing_exactly_one_wins, |reg| {
    let base = reg.push_image("condrace", "t", 270).await;
    let a = reg.push_image("condrace", "a", 271).await;
    let b = reg.push_image("condrace", "b", 272).await;
    for round in 0..6 {
        reg.put_manifest("condrace", "t", OCI_MANIFEST, &base.manifest).await;
        let put = |img: &PushedImage| {
            reg.req(Method::PUT, "/v2/condrace/manifests/t")
                .header("content-type", OCI_MANIFEST)
                .header("if-match", format!("\"{}\"", base.digest))
                .body(img.manifest.clone())
                .send()
        };
        let (ra, rb) = tokio::join!(put(&a), put(&b));
        let mut statuses = [ra.unwrap().status().as_u16(), rb.unwrap().status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 412], "round {round}");
        // Two conditional deletes of the tag where it now points: one deletes, one is refused.
        let now = reg.get("/v2/condrace/manifests/t").await;
        let now = header(&now, "docker-content-digest").unwrap().to_string();
        let del = || {
            reg.req(Method::DELETE, "/v2/condrace/manifests/t")
                .header("if-match", format!("\"{now}\""))
                .send()
        };
        let (da, db) = tokio::join!(del(), del());
        let mut statuses = [da.unwrap().status().as_u16(), db.unwrap().status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [202, 412], "round {round}");
    }
});

backend_test!(oci_1_1_push_with_tag_parameters, |reg| {
    let img = reg.push_image("qtags", "first", 280).await;
    let res = reg
        .req(Method::PUT, &format!("/v2/qtags/manifests/{}?tag=a&tag=b", img.digest))
        .header("content-type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let tags: Vec<&str> = res.headers().get_all("oci-tag").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(tags, ["a", "b"]);
    assert_eq!(reg.tags_of("qtags").await, json!(["a", "b", "first"]));
    let res = reg
        .req(Method::PUT, &format!("/v2/qtags/manifests/{}?tag=bad%20tag", img.digest))
        .header("content-type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .await
        .unwrap();
    assert_oci_error(res, 400, "MANIFEST_INVALID").await;
});

backend_test!(purge_removes_a_blob_everywhere_at_once, |reg| {
    let img = reg.push_image("purge/a", "v1", 290).await;
    let secret = Digest::sha256_of(&img.layers[1]);
    for d in blob_digests(&img) {
        let res = reg
            .req(Method::POST, &format!("/v2/purge/b/blobs/uploads/?mount={d}&from=purge/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    assert_eq!(reg.put_manifest("purge/b", "copy", OCI_MANIFEST, &img.manifest).await.status(), 201);
    let bystander = reg.push_image("purge/a", "other", 291).await;
    let report = reg.app.registry.purge_blob(&secret, "someone pushed a key", Some("admin")).await.unwrap();
    assert!(report.bytes_deleted);
    assert_eq!(report.purged.manifests.len(), 2);
    for (repo, tag) in [("purge/a", "v1"), ("purge/b", "copy")] {
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{tag}")).await.status(), 404);
        assert_eq!(reg.get(&format!("/v2/{repo}/manifests/{}", img.digest)).await.status(), 404);
        assert_eq!(reg.get(&format!("/v2/{repo}/blobs/{secret}")).await.status(), 404);
    }
    // Gone from storage, not just from metadata.
    // Gone from storage, not just from metadata; other blobs stay.
    assert_eq!(reg.get("/v2/purge/a/manifests/other").await.status(), 200);
    let layer = Digest::sha256_of(&bystander.layers[0]);
    assert_eq!(
        reg.get(&format!("/v2/purge/a/blobs/{layer}")).await.bytes().await.unwrap(),
        bystander.layers[0]
    );
    let sql = reg.sql().await;
    let (stored,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM blobs WHERE digest = $1")
        .bind(secret.as_str())
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    let keys = reg.app.registry.blobs().list("").await.unwrap();
    let mut reads = 0;
    for key in &keys {
        if key.ends_with(".multipart") {
            continue;
        }
        let bytes = read_all(reg.app.registry.blobs(), key).await;
        assert_ne!(Digest::sha256_of(&bytes), secret, "purged bytes still stored under {key}");
        reads += 1;
    }
    assert!(reads > 0);
    // Restore says why not.
    let err = reg
        .app
        .registry
        .restore_manifest(&RepoName::parse("purge/a").unwrap(), &img.digest, false, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("someone pushed a key"), "{err}");
});

backend_test!(restore_round_trip_and_blob_unlink_makes_a_tombstone_unrestorable, |reg| {
    let img = reg.push_image("rest/a", "v1", 300).await;
    let repo = RepoName::parse("rest/a").unwrap();
    reg.delete(&format!("/v2/rest/a/manifests/{}", img.digest)).await;
    let restored = reg.app.registry.restore_manifest(&repo, &img.digest, false, Some("admin")).await.unwrap();
    assert_eq!(restored[0].tags, ["v1"]);
    assert_eq!(reg.get("/v2/rest/a/manifests/v1").await.bytes().await.unwrap(), img.manifest);
    for d in blob_digests(&img) {
        assert_eq!(reg.get(&format!("/v2/rest/a/blobs/{d}")).await.status(), 200);
    }
    // A tag pushed again since the delete blocks the restore unless taken.
    reg.delete(&format!("/v2/rest/a/manifests/{}", img.digest)).await;
    let other = reg.push_image("rest/a", "v1", 301).await;
    let err = reg.app.registry.restore_manifest(&repo, &img.digest, false, None).await.unwrap_err();
    assert!(err.to_string().contains("v1"), "{err}");
    assert_eq!(
        header(&reg.get("/v2/rest/a/manifests/v1").await, "docker-content-digest"),
        Some(other.digest.as_str())
    );
    reg.app.registry.restore_manifest(&repo, &img.digest, true, None).await.unwrap();
    assert_eq!(
        header(&reg.get("/v2/rest/a/manifests/v1").await, "docker-content-digest"),
        Some(img.digest.as_str())
    );
    // Unlinking a blob only tombstones hold makes them unrestorable.
    reg.delete(&format!("/v2/rest/a/manifests/{}", img.digest)).await;
    let config = Digest::sha256_of(&img.config);
    assert_eq!(reg.delete(&format!("/v2/rest/a/blobs/{config}")).await.status(), 202);
    let err = reg.app.registry.restore_manifest(&repo, &img.digest, false, None).await.unwrap_err();
    assert!(err.to_string().contains("unlinked"), "{err}");
    // A deleted tag comes back where it pointed.
    let v1 = Tag::parse("v1").unwrap();
    assert_eq!(reg.put_manifest("rest/a", "v1", OCI_MANIFEST, &other.manifest).await.status(), 201);
    assert_eq!(reg.delete("/v2/rest/a/manifests/v1").await.status(), 202);
    assert_eq!(reg.get("/v2/rest/a/manifests/v1").await.status(), 404);
    reg.app.registry.restore_tag(&repo, &v1, false, None).await.unwrap();
    assert_eq!(
        header(&reg.get("/v2/rest/a/manifests/v1").await, "docker-content-digest"),
        Some(other.digest.as_str())
    );
    // The time machine: one step back, and back to where it pointed at a moment.
    let third = reg.push_image("rest/a", "v1", 302).await;
    // The revert is a later moment than the push, even within one millisecond of it.
    reg.app.registry.clock().advance_ms(1);
    let moved =
        reg.app.registry.revert_tag(&repo, &v1, berth::meta::RevertTarget::Previous, None).await.unwrap();
    assert_eq!(moved, other.digest.as_str());
    let history = reg.app.registry.meta().tag_history(&repo, &v1).await.unwrap();
    let when_third =
        history.iter().rev().find(|h| h.new_digest.as_deref() == Some(third.digest.as_str())).unwrap().at;
    let moved = reg
        .app
        .registry
        .revert_tag(&repo, &v1, berth::meta::RevertTarget::At(when_third), None)
        .await
        .unwrap();
    assert_eq!(moved, third.digest.as_str());
    assert_eq!(
        header(&reg.get("/v2/rest/a/manifests/v1").await, "docker-content-digest"),
        Some(third.digest.as_str())
    );
    assert_eq!(history.last().unwrap().kind, "revert");
});

backend_test!(repository_delete_and_restore, |reg| {
    let img = reg.push_image("whole/repo", "v1", 310).await;
    let two = reg.push_image("whole/repo", "v2", 311).await;
    let repo = RepoName::parse("whole/repo").unwrap();
    let gone = reg.app.registry.delete_repository(&repo, false, Some("admin")).await.unwrap();
    assert_eq!(gone.len(), 2);
    assert_oci_error(reg.get("/v2/whole/repo/tags/list").await, 404, "NAME_UNKNOWN").await;
    assert_eq!(reg.get("/v2/whole/repo/manifests/v1").await.status(), 404);
    let layer = Digest::sha256_of(&img.layers[0]);
    assert_eq!(reg.get(&format!("/v2/whole/repo/blobs/{layer}")).await.status(), 404);
    let catalog: Value = reg.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], json!([]));
    // A push into the deleted repository during the window makes the name live again, as an
    // empty repository; a restore then brings back the rest without overwriting the new tag.
    let fresh = reg.push_image("whole/repo", "v2", 312).await;
    assert_eq!(reg.tags_of("whole/repo").await, json!(["v2"]));
    let err = reg.app.registry.restore_repository(&repo, false, None).await.unwrap_err();
    assert!(err.to_string().contains("v2"), "{err}");
    assert_eq!(
        header(&reg.get("/v2/whole/repo/manifests/v2").await, "docker-content-digest"),
        Some(fresh.digest.as_str())
    );
    reg.app.registry.restore_repository(&repo, true, None).await.unwrap();
    assert_eq!(reg.tags_of("whole/repo").await, json!(["v1", "v2"]));
    assert_eq!(
        header(&reg.get("/v2/whole/repo/manifests/v2").await, "docker-content-digest"),
        Some(two.digest.as_str())
    );
    assert_eq!(reg.get("/v2/whole/repo/manifests/v1").await.bytes().await.unwrap(), img.manifest);
});

// A push into a deleted repository makes the name live, not what the delete took: the old blob
// links stay hidden (a restore needs them) — no GET/HEAD, no mount from them, no manifest push
// that relies on them — until the blob is uploaded again, a restore brings back a manifest that
// references it, or the whole repository is restored (then its loose uploads show again too).
backend_test!(a_push_into_a_deleted_repository_does_not_bring_back_its_blobs, |reg| {
    let old = reg.push_image("hidden/repo", "v1", 330).await;
    let loose = reg.upload_blob("hidden/repo", &random_bytes(331, 600)).await;
    let repo = RepoName::parse("hidden/repo").unwrap();
    let blob = |d: &Digest| format!("/v2/hidden/repo/blobs/{d}");
    let [config, layer, other_layer] =
        [&old.config, &old.layers[0], &old.layers[1]].map(|b| Digest::sha256_of(b));
    // Deleted and restored whole: everything shows again, the loose upload too.
    reg.app.registry.delete_repository(&repo, false, Some("admin")).await.unwrap();
    assert_eq!(reg.get(&blob(&loose)).await.status(), 404);
    reg.app.registry.restore_repository(&repo, false, None).await.unwrap();
    for d in [&config, &layer, &other_layer, &loose] {
        assert_eq!(reg.get(&blob(d)).await.status(), 200, "{d} after the repository restore");
    }
    reg.app.registry.delete_repository(&repo, false, Some("admin")).await.unwrap();
    let fresh = reg.push_image("hidden/repo", "new", 332).await;
    for d in [&config, &layer, &other_layer, &loose] {
        assert_eq!(reg.get(&blob(d)).await.status(), 404, "{d} still shows after the repository delete");
        assert_eq!(reg.req(Method::HEAD, &blob(d)).send().await.unwrap().status(), 404);
    }
    assert_eq!(reg.get(&blob(&Digest::sha256_of(&fresh.layers[0]))).await.status(), 200);
    let mount = reg
        .req(Method::POST, &format!("/v2/hidden/other/blobs/uploads/?mount={layer}&from=hidden/repo"))
        .send()
        .await
        .unwrap();
    assert_eq!(mount.status(), 202, "a hidden link must not be a mount source");
    let (status, explained) = reg.admin(Method::GET, &format!("explain/{layer}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(explained["links"][0]["hidden"], true, "{explained}");
    // A manifest over the old blobs, pushed without uploading them: refused, as the HEADs said.
    let res = reg.put_manifest("hidden/repo", "again", OCI_MANIFEST, &old.manifest).await;
    assert_oci_error(res, 400, "MANIFEST_BLOB_UNKNOWN").await;
    // Uploading one again shows it (and only it).
    reg.upload_blob("hidden/repo", &old.layers[1]).await;
    assert_eq!(reg.get(&blob(&other_layer)).await.status(), 200);
    assert_eq!(reg.get(&blob(&layer)).await.status(), 404);
    // A restore of the old image by digest shows its blobs; the loose upload stays hidden.
    reg.app.registry.restore_manifest(&repo, &old.digest, false, None).await.unwrap();
    for d in [&config, &layer, &other_layer] {
        assert_eq!(reg.get(&blob(d)).await.status(), 200, "{d} after the restore");
    }
    assert_eq!(reg.get(&blob(&loose)).await.status(), 404);
    // Deleted again and restored whole: as that delete left it — the loose upload, hidden by the
    // earlier delete, stays hidden.
    reg.app.registry.delete_repository(&repo, false, Some("admin")).await.unwrap();
    assert_eq!(reg.get(&blob(&layer)).await.status(), 404);
    reg.app.registry.restore_repository(&repo, false, None).await.unwrap();
    for d in [&config, &layer, &other_layer] {
        assert_eq!(reg.get(&blob(d)).await.status(), 200, "{d} after the repository restore");
    }
    assert_eq!(reg.get(&blob(&loose)).await.status(), 404);
    assert_eq!(reg.get("/v2/hidden/repo/manifests/v1").await.bytes().await.unwrap(), old.manifest);
    assert_eq!(reg.get("/v2/hidden/repo/manifests/new").await.bytes().await.unwrap(), fresh.manifest);
    let report = reg.app.registry.fsck(false, &|_, _| {}).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
});

// An error injected between the steps of a delete — the database refuses to make the
// tombstone after the tags were removed — leaves the state as it was.
backend_test!(a_delete_that_fails_midway_changes_nothing, |reg| {
    let img = reg.push_image("atomic/app", "v1", 320).await;
    reg.put_manifest("atomic/app", "v2", OCI_MANIFEST, &img.manifest).await;
    let repo = RepoName::parse("atomic/app").unwrap();
    let before = reg.app.registry.meta().history(&repo, None).await.unwrap();
    let sql = reg.sql().await;
    if reg.on_postgres() {
        sqlx::query(
            "CREATE FUNCTION refuse_tombstones() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
        )
        .execute(&sql)
        .await
        .unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE UPDATE OF deleted_at ON manifests \
             FOR EACH ROW EXECUTE FUNCTION refuse_tombstones()",
        )
        .execute(&sql)
        .await
        .unwrap();
    } else {
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE UPDATE OF deleted_at ON manifests \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        .execute(&sql)
        .await
        .unwrap();
    }
    let res = reg.delete(&format!("/v2/atomic/app/manifests/{}", img.digest)).await;
    assert_eq!(res.status(), 500);
    let res = reg.app.registry.delete_repository(&repo, false, None).await;
    assert!(res.is_err());
    assert_eq!(reg.tags_of("atomic/app").await, json!(["v1", "v2"]));
    assert_eq!(reg.get("/v2/atomic/app/manifests/v1").await.bytes().await.unwrap(), img.manifest);
    assert_eq!(reg.app.registry.meta().history(&repo, None).await.unwrap(), before);
    let (tombstones,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM deletes").fetch_one(&sql).await.unwrap();
    assert_eq!(tombstones, 0, "no delete was recorded");
    sqlx::query("DROP TRIGGER refuse ON manifests").execute(&sql).await.ok();
    sqlx::query("DROP TRIGGER refuse").execute(&sql).await.ok();
    assert_eq!(reg.delete(&format!("/v2/atomic/app/manifests/{}", img.digest)).await.status(), 202);
});

// Sparse indexes: refused by default, accepted where configured (a mirror that copies one
// platform); only present children are referenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_indexes_only_where_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = berth::config::Config::embedded(dir.path());
    config.storage_fsync = false;
    config.sparse_index_repositories = vec![berth::auth::Pattern::parse("mirror/**").unwrap()];
    let reg = TestRegistry::start_with(config, dir).await;
    for repo in ["mirror/alpine", "own/alpine"] {
        let amd = reg.push_image(repo, "amd64", 330).await;
        let absent = Digest::sha256_of(b"the arm64 image, not mirrored");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": amd.digest.as_str(), "size": amd.manifest.len()},
                {"mediaType": OCI_MANIFEST, "digest": absent.as_str(), "size": 100},
            ],
        }))
        .unwrap();
        let res = reg.put_manifest(repo, "latest", OCI_INDEX, &index).await;
        if repo.starts_with("mirror/") {
            assert_eq!(res.status(), 201);
            // The present child is held by the index like any other.
            let res = reg.delete(&format!("/v2/{repo}/manifests/{}", amd.digest)).await;
            assert_oci_error(res, 405, "DENIED").await;
        } else {
            assert_oci_error(res, 400, "MANIFEST_BLOB_UNKNOWN").await;
        }
    }
}

// No delete can leave a manifest pointing at missing data, even racing the push that adds the
// reference: a blob unlink racing a manifest push, and a manifest delete racing an index push,
// end with exactly one of them winning — never a live manifest whose blob or child is gone.
// (Both outcomes occur: in one run of 15 rounds × 2 deployments, 19 pushes won and 41 deletes.)
backend_test!(deletes_racing_pushes_never_leave_dangling_references, |reg| {
    let config = reg.upload_blob("race/refs", b"{}").await;
    for round in 0..15u64 {
        let layer = random_bytes(700 + round, 3000);
        let layer_digest = reg.upload_blob("race/refs", &layer).await;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 2},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest.as_str(), "size": layer.len()}],
        }))
        .unwrap();
        let tag = format!("r{round}");
        let blob_path = format!("/v2/race/refs/blobs/{layer_digest}");
        let (push, unlink) = tokio::join!(
            reg.put_manifest("race/refs", &tag, OCI_MANIFEST, &manifest),
            reg.delete(&blob_path)
        );
        let outcome = (push.status().as_u16(), unlink.status().as_u16());
        assert!(matches!(outcome, (201, 405) | (400, 202)), "round {round}: {outcome:?}");
        if outcome.0 == 201 {
            let res = reg.get(&blob_path).await;
            assert_eq!(res.status(), 200, "round {round}: the pushed manifest's blob is there");
        } else {
            assert_eq!(reg.get(&format!("/v2/race/refs/manifests/{tag}")).await.status(), 404);
        }

        // An index push racing the delete of its child.
        let child = reg.push_image("race/refs", &format!("c{round}"), 800 + round).await;
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child.digest.as_str(), "size": child.manifest.len()}],
        }))
        .unwrap();
        let (index_tag, child_path) =
            (format!("i{round}"), format!("/v2/race/refs/manifests/{}", child.digest));
        let (push, delete) = tokio::join!(
            reg.put_manifest("race/refs", &index_tag, OCI_INDEX, &index),
            reg.delete(&child_path)
        );
        let outcome = (push.status().as_u16(), delete.status().as_u16());
        assert!(matches!(outcome, (201, 405) | (400, 202)), "round {round}: {outcome:?}");
        if outcome.0 == 201 {
            assert_eq!(reg.get(&child_path).await.status(), 200, "round {round}: the index's child is there");
        }
    }
});
