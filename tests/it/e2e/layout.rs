//! Writes deterministic OCI image layouts (real gzip'd tar layers, configs with matching
//! `diff_ids`), the input real clients push from.

use std::path::Path;

use berth::oci::Digest;
use serde_json::{Value, json};

use crate::harness::{OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, random_bytes};

/// A manifest written into a layout.
#[derive(Debug, Clone)]
pub struct Written {
    pub digest: Digest,
    pub bytes: Vec<u8>,
    pub blobs: Vec<Digest>,
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::sha256_of(bytes);
    let path = dir.join("blobs/sha256").join(d.hex());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    d
}

fn layer(seed: u64, size: usize) -> (Vec<u8>, Digest) {
    let content = random_bytes(seed, size);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, format!("file-{seed}.bin"), content.as_slice()).unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = Digest::sha256_of(&tar);
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Writes one image (config + two layers) for `arch` into the layout at `dir`.
pub fn image(dir: &Path, seed: u64, arch: &str) -> Written {
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut blobs = Vec::new();
    for (i, size) in [20_000usize, 70_000].into_iter().enumerate() {
        let (gz, diff_id) = layer(seed * 10 + i as u64, size);
        let d = write_blob(dir, &gz);
        layer_descs.push(json!({"mediaType": OCI_LAYER, "digest": d.as_str(), "size": gz.len()}));
        diff_ids.push(diff_id.as_str().to_string());
        blobs.push(d);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "config": {"Labels": {"seed": seed.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = write_blob(dir, &config);
    blobs.insert(0, config_digest.clone());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    let digest = write_blob(dir, &manifest);
    Written { digest, bytes: manifest, blobs }
}

/// Writes an index over `children` (with their architectures) into the layout at `dir`.
pub fn index(dir: &Path, children: &[(&Written, &str)]) -> Written {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(w, arch)| {
            json!({"mediaType": OCI_MANIFEST, "digest": w.digest.as_str(), "size": w.bytes.len(),
                   "platform": {"architecture": arch, "os": "linux"}})
        })
        .collect();
    let bytes =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
            .unwrap();
    let digest = write_blob(dir, &bytes);
    Written { digest, bytes, blobs: Vec::new() }
}

/// Writes `oci-layout` and `index.json` naming each `(tag, manifest, media type)`.
pub fn finish(dir: &Path, tags: &[(&str, &Written, &str)]) {
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifests: Vec<Value> = tags
        .iter()
        .map(|(tag, w, mt)| {
            json!({"mediaType": mt, "digest": w.digest.as_str(), "size": w.bytes.len(),
                   "annotations": {"org.opencontainers.image.ref.name": tag}})
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}
