//! Manifest reads and pushes.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorCode};
use super::headers::accepts;
use super::hv;
use crate::oci::manifest::MAX_MANIFEST_BYTES;
use crate::oci::{Reference, ReferenceError, RepoName};
use crate::registry::{Error, Registry};

/// Parses a reference on a read: a malformed tag can name no manifest (404), a malformed digest
/// is the client's error (400).
fn reference_for_read(s: &str) -> Result<Reference, ApiError> {
    Reference::parse(s).map_err(|e| match e {
        ReferenceError::Digest(d) => ApiError::new(ErrorCode::DigestInvalid).message(d.to_string()),
        ReferenceError::Tag(m) => ApiError::new(ErrorCode::ManifestUnknown).message(m),
    })
}

/// `GET`/`HEAD /v2/<name>/manifests/<reference>`.
pub(super) async fn get(
    registry: &Registry,
    repo: &RepoName,
    reference: &str,
    headers: &HeaderMap,
    with_body: bool,
) -> Result<Response, ApiError> {
    let reference = reference_for_read(reference)?;
    let (digest, media_type, size, payload) = if with_body {
        let m = registry.manifest(repo, &reference).await?;
        let size = m.payload.len() as u64;
        (m.digest, m.media_type, size, Some(m.payload))
    } else {
        let m = registry.manifest_head(repo, &reference).await?;
        (m.digest, m.media_type, m.size as u64, None)
    };
    if !accepts(headers, &media_type) {
        return Err(Error::ManifestNotAcceptable { media_type }.into());
    }
    let body = payload.map_or_else(Body::empty, Body::from);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, hv(&media_type)),
            (header::CONTENT_LENGTH, hv(size.to_string())),
            (header::HeaderName::from_static("docker-content-digest"), hv(&digest)),
            (header::ETAG, hv(format!("\"{digest}\""))),
        ],
        body,
    )
        .into_response())
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub(super) async fn put(
    registry: &Registry,
    repo: &RepoName,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
    actor: Option<&str>,
) -> Result<Response, ApiError> {
    let reference = Reference::parse(reference).map_err(|e| match e {
        ReferenceError::Digest(d) => ApiError::new(ErrorCode::DigestInvalid).message(d.to_string()),
        ReferenceError::Tag(m) => ApiError::new(ErrorCode::ManifestInvalid).message(m),
    })?;
    let bytes = read_manifest_body(body).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let pushed = registry.put_manifest(repo, &reference, content_type, &bytes, actor).await?;
    let mut res = (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{repo}/manifests/{}", pushed.digest))),
            (header::HeaderName::from_static("docker-content-digest"), hv(pushed.digest.as_str())),
            (header::CONTENT_LENGTH, hv("0")),
        ],
    )
        .into_response();
    if let Some(subject) = pushed.subject {
        res.headers_mut().insert("oci-subject", hv(subject.as_str()));
    }
    Ok(res)
}

/// How much of an oversized manifest body is read and discarded before answering 413, so that a
/// client still sending receives the error instead of a broken connection.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads a manifest body of at most [`MAX_MANIFEST_BYTES`].
async fn read_manifest_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(ErrorCode::ManifestInvalid).message(format!("could not read the manifest: {e}"))
        })?;
        seen += chunk.len();
        if seen <= MAX_MANIFEST_BYTES {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > MAX_MANIFEST_BYTES {
        return Err(Error::ManifestTooLarge { limit: MAX_MANIFEST_BYTES }.into());
    }
    Ok(buf.freeze())
}
