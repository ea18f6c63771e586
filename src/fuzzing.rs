//! Entry points for the fuzz targets in `fuzz/` (and for the corpus regression test): each feeds
//! arbitrary bytes to one family of parsers and checks the properties that must always hold.

use axum::http::{HeaderMap, HeaderValue, header};

use crate::api::headers::{RangeRequest, blob_range, content_range};
use crate::oci::{Digest, Reference, RepoName, Tag, manifest};

/// Manifest parsing under each content type the registry accepts.
pub fn manifest(data: &[u8]) {
    for content_type in [None, Some(manifest::OCI_MANIFEST), Some(manifest::OCI_INDEX), Some("text/plain")] {
        if let Ok(parsed) = manifest::parse(data, content_type) {
            // What parses is one of the kinds the registry stores.
            assert!(manifest::is_manifest_type(&parsed.media_type));
        }
    }
}

/// Names, tags, digests, references and `/v2/` paths.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(name) = RepoName::parse(text) {
        assert!(
            !name.as_str().contains("..") && !name.as_str().contains("//") && !name.as_str().contains('%')
        );
    }
    if let Ok(tag) = Tag::parse(text) {
        assert!(tag.as_str().len() <= 128);
    }
    if let Ok(digest) = Digest::parse(text) {
        assert_eq!(digest.as_str(), text);
    }
    let _ = Reference::parse(text);
    let _ = crate::api::route::parse(text);
}

/// `Range` and `Content-Range`: first two bytes pick the blob size, the rest is the header.
pub fn ranges(data: &[u8]) {
    let (size, text) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let Ok(value) = HeaderValue::from_bytes(text) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(header::RANGE, value.clone());
    headers.insert(header::CONTENT_RANGE, value);
    if let RangeRequest::Part(r) = blob_range(&headers, size) {
        assert!(r.start <= r.end && r.end < size, "{r:?} outside a blob of {size}");
    }
    if let Ok(Some(r)) = content_range(&headers) {
        assert!(r.start <= r.end);
    }
}

#[cfg(test)]
mod tests {
    /// Every file of the fuzz corpus (seeds and any crash found) runs through its target.
    #[test]
    fn corpus_regressions() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 3] =
            [("manifest", super::manifest), ("reference", super::reference), ("ranges", super::ranges)];
        for (name, target) in targets {
            let dir = root.join(name);
            let mut count = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                target(&std::fs::read(entry.unwrap().path()).unwrap());
                count += 1;
            }
            assert!(count > 0, "no corpus for {name}");
        }
    }
}
