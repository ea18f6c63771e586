//! Tag lists, referrers and the catalog.

use berth::oci::Digest;
use serde_json::{Value, json};

use crate::backend_test;
use crate::harness::*;

backend_test!(tags_are_sorted_and_paginated_with_link, |reg| {
    let img = reg.push_image("lib/t", "seed", 30).await;
    for tag in ["b", "a", "C", "_x", "a.1", "z"] {
        let res = reg.put_manifest("lib/t", tag, OCI_MANIFEST, &img.manifest).await;
        assert_eq!(res.status(), 201);
    }
    let res = reg.get("/v2/lib/t/tags/list").await;
    assert_eq!(res.status(), 200);
    assert!(header(&res, "link").is_none());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"name": "lib/t", "tags": ["C", "_x", "a", "a.1", "b", "seed", "z"]}));

    let res = reg.get("/v2/lib/t/tags/list?n=3").await;
    assert_eq!(header(&res, "link"), Some("</v2/lib/t/tags/list?n=3&last=a>; rel=\"next\""));
    assert_eq!(res.json::<Value>().await.unwrap()["tags"], json!(["C", "_x", "a"]));
    let res = reg.get("/v2/lib/t/tags/list?n=3&last=a").await;
    assert_eq!(res.json::<Value>().await.unwrap()["tags"], json!(["a.1", "b", "seed"]));
    let res = reg.get("/v2/lib/t/tags/list?n=3&last=seed").await;
    assert!(header(&res, "link").is_none());
    assert_eq!(res.json::<Value>().await.unwrap()["tags"], json!(["z"]));
    let res = reg.get("/v2/lib/t/tags/list?n=0").await;
    assert_eq!(res.json::<Value>().await.unwrap()["tags"], json!([]));
    let res = reg.get("/v2/lib/t/tags/list?last=z").await;
    assert_eq!(res.json::<Value>().await.unwrap()["tags"], json!([]));
    assert_oci_error(reg.get("/v2/lib/t/tags/list?n=-1").await, 400, "UNSUPPORTED").await;
    assert_oci_error(reg.get("/v2/lib/t/tags/list?n=ten").await, 400, "UNSUPPORTED").await;
    assert_oci_error(reg.get("/v2/nothing/here/tags/list").await, 404, "NAME_UNKNOWN").await;
});

backend_test!(repository_with_blobs_but_no_tags_lists_empty, |reg| {
    reg.upload_blob("only/blobs", b"x").await;
    let res = reg.get("/v2/only/blobs/tags/list").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"name": "only/blobs", "tags": []}));
});

backend_test!(referrers_with_artifact_type_filter, |reg| {
    let img = reg.push_image("r", "v1", 31).await;
    let empty = reg.upload_blob("r", b"{}").await;
    let mut pushed = Vec::new();
    for (i, at) in
        ["application/vnd.example.sbom", "application/vnd.example.sig", "application/vnd.example.sig"]
            .iter()
            .enumerate()
    {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.manifest.len()},
            "annotations": {"n": i.to_string()},
        }))
        .unwrap();
        let d = Digest::sha256_of(&m);
        assert_eq!(reg.put_manifest("r", d.as_str(), OCI_MANIFEST, &m).await.status(), 201);
        pushed.push((d, m.len(), at.to_string()));
    }
    // An image (not artifact) referrer reports its config media type as artifactType.
    let config = reg.upload_blob("r", b"{\"k\":1}").await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config+json", "digest": config.as_str(), "size": 7},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": img.digest.as_str(), "size": img.manifest.len()},
    }))
    .unwrap();
    assert_eq!(reg.put_manifest("r", "cfg-referrer", OCI_MANIFEST, &m).await.status(), 201);

    let res = reg.get(&format!("/v2/r/referrers/{}", img.digest)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), Some(OCI_INDEX));
    assert!(header(&res, "oci-filters-applied").is_none());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["schemaVersion"], 2);
    assert_eq!(body["mediaType"], OCI_INDEX);
    let list = body["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 4);
    let sbom = list.iter().find(|e| e["digest"] == pushed[0].0.as_str()).unwrap();
    assert_eq!(sbom["mediaType"], OCI_MANIFEST);
    assert_eq!(sbom["size"], pushed[0].1);
    assert_eq!(sbom["artifactType"], "application/vnd.example.sbom");
    assert_eq!(sbom["annotations"], json!({"n": "0"}));
    assert!(list.iter().any(|e| e["artifactType"] == "application/vnd.example.config+json"));

    let res =
        reg.get(&format!("/v2/r/referrers/{}?artifactType=application/vnd.example.sig", img.digest)).await;
    assert_eq!(header(&res, "oci-filters-applied"), Some("artifactType"));
    let body: Value = res.json().await.unwrap();
    let list = body["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|e| e["artifactType"] == "application/vnd.example.sig"));

    // Unknown subject, or unknown repository: an empty index.
    for path in [
        format!("/v2/r/referrers/{}", Digest::sha256_of(b"none")),
        format!("/v2/norepo/referrers/{}", img.digest),
    ] {
        let res = reg.get(&path).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["manifests"], json!([]));
    }
    assert_oci_error(reg.get("/v2/r/referrers/sha256:bad").await, 400, "DIGEST_INVALID").await;
});

backend_test!(catalog_is_sorted_and_paginated, |reg| {
    for repo in ["b/x", "a", "c-d", "a/b"] {
        reg.upload_blob(repo, repo.as_bytes()).await;
    }
    let res = reg.get("/v2/_catalog").await;
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"repositories": ["a", "a/b", "b/x", "c-d"]}));
    let res = reg.get("/v2/_catalog?n=2").await;
    assert_eq!(header(&res, "link"), Some("</v2/_catalog?n=2&last=a%2Fb>; rel=\"next\""));
    assert_eq!(res.json::<Value>().await.unwrap()["repositories"], json!(["a", "a/b"]));
    let res = reg.get("/v2/_catalog?n=2&last=a%2Fb").await;
    assert!(header(&res, "link").is_none());
    assert_eq!(res.json::<Value>().await.unwrap()["repositories"], json!(["b/x", "c-d"]));
});
