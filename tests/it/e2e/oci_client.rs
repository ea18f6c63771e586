//! The `oci-client` crate (a real Rust registry client): push, pull and verify, tags, an index,
//! a referrer found through the referrers API, an explicit cross-repository mount, the catalog,
//! and its POST-then-PUT ("monolithic") upload flow.

use berth::oci::Digest;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{ImageIndexEntry, OciImageIndex};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use crate::backend_test;
use crate::harness::{OCI_INDEX, OCI_MANIFEST, random_bytes};

fn client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..Default::default()
    })
}

backend_test!(oci_client_push_pull_index_referrers_mount, |reg| {
    let r = reg.addr.to_string();
    let auth = RegistryAuth::Anonymous;
    let image: Reference = format!("{r}/e2e/rust:v1").parse().unwrap();
    let layers = vec![
        ImageLayer::oci_v1(random_bytes(50, 40_000), None),
        ImageLayer::oci_v1(random_bytes(51, 9_000), None),
    ];
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    let c = client(false);
    c.push(&image, &layers, config.clone(), &auth, None).await.unwrap();

    // Pull and verify every layer (the client checks digests; compare by digest, not order).
    let pulled = c.pull(&image, &auth, vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE]).await.unwrap();
    let mut want: Vec<String> = layers.iter().map(|l| l.sha256_digest()).collect();
    let mut got: Vec<String> = pulled.layers.iter().map(|l| l.sha256_digest()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);

    let digest = c.fetch_manifest_digest(&image, &auth).await.unwrap();
    let by_digest: Reference = format!("{r}/e2e/rust@{digest}").parse().unwrap();
    let (raw, raw_digest) = c.pull_manifest_raw(&by_digest, &auth, &[OCI_MANIFEST]).await.unwrap();
    assert_eq!(raw_digest, digest);
    assert_eq!(Digest::sha256_of(&raw).as_str(), digest);

    let tags = c.list_tags(&image, &auth, None, None).await.unwrap();
    assert_eq!(tags.tags, vec!["v1".to_string()]);

    // An index over the image.
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_string()),
        manifests: vec![ImageIndexEntry {
            media_type: OCI_MANIFEST.to_string(),
            digest: digest.clone(),
            size: raw.len() as i64,
            platform: None,
            annotations: None,
            artifact_type: None,
        }],
        artifact_type: None,
        annotations: None,
    };
    let index_ref: Reference = format!("{r}/e2e/rust:index").parse().unwrap();
    c.push_manifest_list(&index_ref, &auth, index).await.unwrap();
    let (_, index_digest) = c.pull_manifest_raw(&index_ref, &auth, &[OCI_INDEX]).await.unwrap();
    assert!(index_digest.starts_with("sha256:"));

    // A referrer, pushed with the POST-then-PUT upload flow, found through the referrers API.
    let mono = client(true);
    let sig = b"a signature".to_vec();
    let sig_digest = Digest::sha256_of(&sig);
    let empty = b"{}".to_vec();
    let empty_digest = Digest::sha256_of(&empty);
    let target: Reference = format!("{r}/e2e/rust@{digest}").parse().unwrap();
    mono.push_blob(&target, sig.clone(), sig_digest.as_str()).await.unwrap();
    mono.push_blob(&target, empty.clone(), empty_digest.as_str()).await.unwrap();
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest.as_str(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig_digest.as_str(), "size": sig.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": raw.len()},
    }))
    .unwrap();
    let referrer_digest = Digest::sha256_of(&referrer);
    let referrer_ref: Reference = format!("{r}/e2e/rust@{referrer_digest}").parse().unwrap();
    mono.push_manifest_raw(&referrer_ref, referrer, OCI_MANIFEST.parse().unwrap()).await.unwrap();
    let found = c.pull_referrers(&target, Some("application/vnd.example.sig")).await.unwrap();
    assert_eq!(found.manifests.len(), 1);
    assert_eq!(found.manifests[0].digest, referrer_digest.as_str());
    assert_eq!(found.manifests[0].artifact_type.as_deref(), Some("application/vnd.example.sig"));
    let none = c.pull_referrers(&target, Some("application/vnd.example.other")).await.unwrap();
    assert!(none.manifests.is_empty());

    // Explicit cross-repository mount.
    let copy: Reference = format!("{r}/e2e/rust-copy:v1").parse().unwrap();
    c.mount_blob(&copy, &image, &want[0]).await.unwrap();
    let res = reg.get(&format!("/v2/e2e/rust-copy/blobs/{}", want[0])).await;
    assert_eq!(res.status(), 200);

    let catalog = c.catalog(&image, &auth, None, None).await.unwrap();
    assert_eq!(catalog.repositories, vec!["e2e/rust".to_string(), "e2e/rust-copy".to_string()]);
});
