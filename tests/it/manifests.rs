//! Manifest pushes and reads.

use berth::oci::Digest;
use reqwest::Method;
use serde_json::json;

use crate::backend_test;
use crate::harness::*;

backend_test!(push_by_tag_and_pull_by_tag_and_digest_byte_exact, |reg| {
    let img = reg.push_image("lib/app", "v1", 10).await;
    for reference in ["v1".to_string(), img.digest.to_string()] {
        let res = reg.get(&format!("/v2/lib/app/manifests/{reference}")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "content-type"), Some(OCI_MANIFEST));
        assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
        assert_eq!(header(&res, "content-length"), Some(img.manifest.len().to_string().as_str()));
        assert_eq!(header(&res, "etag"), Some(format!("\"{}\"", img.digest).as_str()));
        assert_eq!(res.bytes().await.unwrap(), img.manifest, "stored byte-for-byte");

        let res = reg.req(Method::HEAD, &format!("/v2/lib/app/manifests/{reference}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "content-length"), Some(img.manifest.len().to_string().as_str()));
        assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
    }
    // Every referenced blob pulls.
    for layer in &img.layers {
        let d = Digest::sha256_of(layer);
        assert_eq!(reg.get(&format!("/v2/lib/app/blobs/{d}")).await.bytes().await.unwrap(), *layer);
    }
});

backend_test!(put_answers_location_and_digest_and_by_digest_must_match, |reg| {
    let img = reg.push_image("a", "t", 11).await;
    let res = reg.put_manifest("a", img.digest.as_str(), OCI_MANIFEST, &img.manifest).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "location"), Some(format!("/v2/a/manifests/{}", img.digest).as_str()));
    assert_eq!(header(&res, "docker-content-digest"), Some(img.digest.as_str()));
    let wrong = Digest::sha256_of(b"x");
    let res = reg.put_manifest("a", wrong.as_str(), OCI_MANIFEST, &img.manifest).await;
    assert_oci_error(res, 400, "DIGEST_INVALID").await;
    assert_oci_error(reg.get(&format!("/v2/a/manifests/{wrong}")).await, 404, "MANIFEST_UNKNOWN").await;
});

backend_test!(moving_a_tag, |reg| {
    let one = reg.push_image("a", "latest", 12).await;
    let two = reg.push_image("a", "latest", 13).await;
    let res = reg.get("/v2/a/manifests/latest").await;
    assert_eq!(header(&res, "docker-content-digest"), Some(two.digest.as_str()));
    // The old manifest is still there by digest.
    assert_eq!(reg.get(&format!("/v2/a/manifests/{}", one.digest)).await.status(), 200);
});

backend_test!(references_must_be_in_the_repository, |reg| {
    let config = reg.upload_blob("a", b"{}").await;
    let other_repo_layer = reg.upload_blob("b", b"layer elsewhere").await;
    let missing = Digest::sha256_of(b"missing");
    let manifest = |layer: &Digest| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 2},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer.as_str(), "size": 15}],
        }))
        .unwrap()
    };
    for layer in [&missing, &other_repo_layer] {
        let res = reg.put_manifest("a", "t", OCI_MANIFEST, &manifest(layer)).await;
        let body = assert_oci_error(res, 400, "MANIFEST_BLOB_UNKNOWN").await;
        assert_eq!(body["errors"][0]["detail"]["digests"][0], layer.as_str());
    }
    assert_oci_error(reg.get("/v2/a/manifests/t").await, 404, "MANIFEST_UNKNOWN").await;
    // Foreign layers (with urls) are exempt.
    let foreign = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.as_str(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "digest": missing.as_str(), "size": 7, "urls": ["https://example.com/layer"]}],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("a", "foreign", OCI_MANIFEST, &foreign).await.status(), 201);
});

backend_test!(index_needs_its_children, |reg| {
    let amd = reg.push_image("multi", "amd64", 20).await;
    let arm = reg.push_image("multi", "arm64", 21).await;
    let index = |children: &[&Digest]| {
        let manifests: Vec<_> = children
            .iter()
            .map(|d| {
                json!({"mediaType": OCI_MANIFEST, "digest": d.as_str(), "size": 500,
                            "platform": {"architecture": "amd64", "os": "linux"}})
            })
            .collect();
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
            .unwrap()
    };
    let missing = Digest::sha256_of(b"not a manifest here");
    let res = reg.put_manifest("multi", "all", OCI_INDEX, &index(&[&amd.digest, &missing])).await;
    assert_oci_error(res, 400, "MANIFEST_BLOB_UNKNOWN").await;
    let good = index(&[&amd.digest, &arm.digest]);
    let res = reg.put_manifest("multi", "all", OCI_INDEX, &good).await;
    assert_eq!(res.status(), 201);
    let res = reg.get("/v2/multi/manifests/all").await;
    assert_eq!(header(&res, "content-type"), Some(OCI_INDEX));
    assert_eq!(res.bytes().await.unwrap(), good);
});

backend_test!(docker_schema2_manifest_and_list, |reg| {
    let config = reg.upload_blob("d", b"{\"os\":\"linux\"}").await;
    let layer = reg.upload_blob("d", b"docker layer").await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config.as_str(), "size": 14},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer.as_str(), "size": 12}],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("d", "v1", DOCKER_MANIFEST, &manifest).await.status(), 201);
    let d = Digest::sha256_of(&manifest);
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": d.as_str(), "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("d", "list", DOCKER_LIST, &list).await.status(), 201);
    let res = reg.get("/v2/d/manifests/list").await;
    assert_eq!(header(&res, "content-type"), Some(DOCKER_LIST));
    assert_eq!(res.bytes().await.unwrap(), list);
});

backend_test!(accept_negotiation, |reg| {
    let img = reg.push_image("a", "v1", 14).await;
    let get =
        |accept: &'static str| reg.req(Method::GET, "/v2/a/manifests/v1").header("accept", accept).send();
    assert_eq!(get(OCI_MANIFEST).await.unwrap().status(), 200);
    assert_eq!(
        get("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(get("*/*").await.unwrap().status(), 200);
    let res = get(DOCKER_MANIFEST).await.unwrap();
    let body = assert_oci_error(res, 404, "MANIFEST_UNKNOWN").await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains(OCI_MANIFEST));
    let _ = img;
});

backend_test!(invalid_manifests_are_rejected_and_change_nothing, |reg| {
    let bad: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"{}".to_vec(),
        br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec(),
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec(),
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:short","size":1},"layers":[]}"#.to_vec(),
        format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
    ];
    for body in bad {
        let res = reg.put_manifest("a", "bad", OCI_MANIFEST, &body).await;
        assert_oci_error(res, 400, "MANIFEST_INVALID").await;
    }
    // mediaType field and Content-Type disagree.
    let img_config = reg.upload_blob("a", b"{}").await;
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": img_config.as_str(), "size": 2}, "layers": []}))
    .unwrap();
    assert_oci_error(reg.put_manifest("a", "bad", OCI_INDEX, &m).await, 400, "MANIFEST_INVALID").await;
    // Invalid tag on push.
    assert_oci_error(reg.put_manifest("a", "-bad", OCI_MANIFEST, &m).await, 400, "MANIFEST_INVALID").await;
    // Over 4 MiB.
    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let res = reg.put_manifest("a", "huge", OCI_MANIFEST, &huge).await;
    assert_oci_error(res, 413, "MANIFEST_INVALID").await;
    let tags: serde_json::Value = reg.get("/v2/a/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], json!([]), "no rejected push left a tag");
});

backend_test!(unknown_manifests_and_bad_references, |reg| {
    reg.push_image("a", "v1", 15).await;
    assert_oci_error(reg.get("/v2/a/manifests/nope").await, 404, "MANIFEST_UNKNOWN").await;
    assert_oci_error(reg.get("/v2/zzz/manifests/v1").await, 404, "MANIFEST_UNKNOWN").await;
    assert_oci_error(reg.get("/v2/a/manifests/sha256:abc").await, 400, "DIGEST_INVALID").await;
    assert_oci_error(reg.get("/v2/a/manifests/md5:abc").await, 400, "DIGEST_INVALID").await;
    let res = reg.req(Method::HEAD, "/v2/a/manifests/nope").send().await.unwrap();
    assert_eq!(res.status(), 404);
    // A blob digest is not a manifest.
    let config = reg.upload_blob("a", b"{\"cfg\":1}").await;
    assert_oci_error(reg.get(&format!("/v2/a/manifests/{config}")).await, 404, "MANIFEST_UNKNOWN").await;
});

backend_test!(subject_is_reported_and_pushing_works_without_the_subject_present, |reg| {
    let img = reg.push_image("a", "v1", 16).await;
    let empty = reg.upload_blob("a", b"{}").await;
    let sig = reg.upload_blob("a", b"signature").await;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig.as_str(), "size": 9}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.manifest.len()},
    }))
    .unwrap();
    let d = Digest::sha256_of(&referrer);
    let res = reg.put_manifest("a", d.as_str(), OCI_MANIFEST, &referrer).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "oci-subject"), Some(img.digest.as_str()));
    // A subject that is not (yet) in the repository is allowed.
    let ghost = Digest::sha256_of(b"ghost");
    let orphan = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": ghost.as_str(), "size": 1},
    }))
    .unwrap();
    let res = reg.put_manifest("a", "orphan", OCI_MANIFEST, &orphan).await;
    assert_eq!(res.status(), 201);
    assert_eq!(header(&res, "oci-subject"), Some(ghost.as_str()));
});

// A tombstone whose references were taken away (as purging or collecting it does) and that is
// then pushed again must reference its blobs again, or its blobs look unreferenced to the
// collector while the manifest is live.
backend_test!(a_revived_manifest_references_its_blobs_again, |reg| {
    let img = reg.push_image("revive", "v1", 30).await;
    let sql = reg.sql().await;
    let (id,): (i64,) = sqlx::query_as("SELECT id FROM manifests WHERE digest = $1")
        .bind(img.digest.as_str())
        .fetch_one(&sql)
        .await
        .unwrap();
    let reference_count = async || -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM manifest_blobs WHERE manifest_id = $1")
            .bind(id)
            .fetch_one(&sql)
            .await
            .unwrap();
        n
    };
    assert_eq!(reference_count().await, 3, "config and two layers");
    // What a purge or the collector leaves of a tombstone: the row, without tags or references.
    sqlx::query("DELETE FROM tags WHERE manifest_id = $1").bind(id).execute(&sql).await.unwrap();
    sqlx::query("DELETE FROM manifest_blobs WHERE manifest_id = $1").bind(id).execute(&sql).await.unwrap();
    sqlx::query("UPDATE manifests SET deleted_at = 1 WHERE id = $1").bind(id).execute(&sql).await.unwrap();
    assert_oci_error(reg.get("/v2/revive/manifests/v1").await, 404, "MANIFEST_UNKNOWN").await;

    let res = reg.put_manifest("revive", img.digest.as_str(), OCI_MANIFEST, &img.manifest).await;
    assert_eq!(res.status(), 201);
    assert_eq!(reference_count().await, 3, "the revived manifest references its blobs again");
    let res = reg.get(&format!("/v2/revive/manifests/{}", img.digest)).await;
    assert_eq!(res.bytes().await.unwrap(), img.manifest);
});

// Pull and HEAD times are noted off the request path and written in batches, durable within
// the flush interval (a second by default) and at shutdown: manifest GET and HEAD set
// `pulled_at`; a blob HEAD (not a GET) sets `seen_at`.
backend_test!(pull_and_head_times_are_recorded_in_batches, |reg| {
    let img = reg.push_image("access/app", "v1", 950).await;
    let (config, layer) = (Digest::sha256_of(&img.config), Digest::sha256_of(&img.layers[0]));
    let sql = reg.sql().await;
    let times = async || -> (Option<i64>, Option<i64>, Option<i64>) {
        let (m,): (Option<i64>,) = sqlx::query_as("SELECT pulled_at FROM manifests WHERE digest = $1")
            .bind(img.digest.as_str())
            .fetch_one(&sql)
            .await
            .unwrap();
        let seen = async |d: &Digest| -> Option<i64> {
            let (s,): (Option<i64>,) = sqlx::query_as("SELECT seen_at FROM blobs WHERE digest = $1")
                .bind(d.as_str())
                .fetch_one(&sql)
                .await
                .unwrap();
            s
        };
        (m, seen(&config).await, seen(&layer).await)
    };
    assert_eq!(times().await, (None, None, None));
    assert_eq!(reg.get("/v2/access/app/manifests/v1").await.status(), 200);
    assert_eq!(
        reg.req(Method::HEAD, &format!("/v2/access/app/blobs/{config}")).send().await.unwrap().status(),
        200
    );
    assert_eq!(reg.get(&format!("/v2/access/app/blobs/{layer}")).await.status(), 200);
    // Written within the flush interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (m, c, l) = times().await;
        if m.is_some() && c.is_some() {
            assert!(l.is_none(), "a blob GET does not count as a HEAD");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not recorded within seconds");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A HEAD just before shutdown is written by the last flush.
    assert_eq!(
        reg.req(Method::HEAD, &format!("/v2/access/app/blobs/{layer}")).send().await.unwrap().status(),
        200
    );
    let _dir = reg.stop().await;
    assert!(times().await.2.is_some(), "flushed at shutdown");
});
