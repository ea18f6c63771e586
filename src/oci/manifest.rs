//! Manifest parsing: which kind a pushed document is, and what it references.
//!
//! The bytes are never re-serialised: the registry stores what was pushed, and this module only
//! reads the fields that matter for validation, linking and the referrers API.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::digest::Digest;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 image manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Whether a manifest lists images (index, manifest list) or describes one image or artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest (OCI or Docker schema2), possibly an artifact.
    Image,
    /// An image index or Docker manifest list.
    Index,
}

/// A content descriptor as it appears in manifests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Foreign-layer locations; content with `urls` need not be in the registry.
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    /// The artifact type, on index entries.
    #[serde(default)]
    pub artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<Map<String, Value>>,
}

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    /// The media type the manifest is stored and served with.
    pub media_type: String,
    /// Image or index.
    pub kind: ManifestKind,
    /// `artifactType`, or for an image manifest without one, its config's media type: the value
    /// the referrers API reports.
    pub artifact_type: Option<String>,
    /// The manifest this one refers to, if any.
    pub subject: Option<Descriptor>,
    /// Blobs that must be present in the repository (config and layers, foreign layers excluded),
    /// without duplicates.
    pub blobs: Vec<Digest>,
    /// Manifests an index lists, without duplicates.
    pub children: Vec<Digest>,
    /// The manifest's annotations, reported by the referrers API.
    pub annotations: Option<Map<String, Value>>,
}

/// Parses a manifest pushed with `content_type` (the request's `Content-Type`, if any).
///
/// # Errors
/// A message for `MANIFEST_INVALID`: not JSON, an unknown or inconsistent media type, missing
/// required fields, or an invalid descriptor.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, String> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err("schemaVersion must be 2 (schema1 manifests are not supported)".into());
    }
    let content_type =
        content_type.map(|c| c.split(';').next().unwrap_or("").trim()).filter(|c| !c.is_empty());
    let media_type = match (&raw.media_type, content_type) {
        (Some(field), Some(header)) if is_manifest_type(header) && field != header => {
            return Err(format!("mediaType `{field}` does not match the Content-Type `{header}`"));
        }
        (Some(field), _) => field.clone(),
        (None, Some(header)) if is_manifest_type(header) => header.to_string(),
        // No usable type given: infer from the structure, as the image spec allows.
        (None, _) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, _) => OCI_MANIFEST.to_string(),
    };
    let kind = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
        OCI_INDEX | DOCKER_LIST => ManifestKind::Index,
        other => return Err(format!("unsupported manifest media type `{other}`")),
    };

    let mut blobs = Vec::new();
    let mut children = Vec::new();
    match kind {
        ManifestKind::Image => {
            if raw.manifests.is_some() {
                return Err("an image manifest must not have `manifests`".into());
            }
            let config = raw.config.as_ref().ok_or("an image manifest needs `config`")?;
            let layers = raw.layers.as_ref().ok_or("an image manifest needs `layers`")?;
            blobs.push(config.digest.clone());
            for layer in layers {
                if layer.urls.as_ref().is_none_or(|u| u.is_empty()) {
                    blobs.push(layer.digest.clone());
                }
            }
        }
        ManifestKind::Index => {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err("an index must not have `config` or `layers`".into());
            }
            let manifests = raw.manifests.as_ref().ok_or("an index needs `manifests`")?;
            children.extend(manifests.iter().map(|m| m.digest.clone()));
        }
    }
    dedup(&mut blobs);
    dedup(&mut children);

    let artifact_type =
        raw.artifact_type.clone().or_else(|| raw.config.as_ref().map(|c| c.media_type.clone()));
    Ok(ParsedManifest {
        media_type,
        kind,
        artifact_type,
        subject: raw.subject,
        blobs,
        children,
        annotations: raw.annotations,
    })
}

/// Whether `media_type` is one of the manifest types Berth stores.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(media_type, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)
}

fn dedup(v: &mut Vec<Digest>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|d| seen.insert(d.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_lists_config_and_layers_but_not_foreign_layers() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"x","digest":"{}","size":1}},
                      {{"mediaType":"x","digest":"{}","size":1,"urls":["http://x"]}},
                      {{"mediaType":"x","digest":"{}","size":1}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('b')
        );
        let p = parse(m.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.kind, ManifestKind::Image);
        assert_eq!(p.blobs.iter().map(|b| b.as_str()).collect::<Vec<_>>(), [d('a'), d('b')]);
        assert_eq!(p.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
    }

    #[test]
    fn index_children_and_subject() {
        let m = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3}}],
              "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":3}},"artifactType":"a/b"}}"#,
            d('a'),
            d('e')
        );
        let p = parse(m.as_bytes(), None).unwrap();
        assert_eq!(p.media_type, OCI_INDEX);
        assert_eq!(p.children.len(), 1);
        assert_eq!(p.subject.unwrap().digest.as_str(), d('e'));
        assert_eq!(p.artifact_type.as_deref(), Some("a/b"));
    }

    #[test]
    fn rejects_bad_documents() {
        for bad in [
            "not json",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"text/plain","config":{},"layers":[]}"#,
            r#"{"schemaVersion":2,"layers":[]}"#,
            r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]}"#,
            r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":-1},"layers":[]}"#,
        ] {
            assert!(parse(bad.as_bytes(), None).is_err(), "{bad}");
        }
        let m = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(parse(m.as_bytes(), Some(OCI_MANIFEST)).is_err());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(deep.as_bytes(), None).is_err());
    }
}
