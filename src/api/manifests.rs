//! Manifest reads and pushes.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorCode};
use super::headers::accepts;
use super::hv;
use crate::meta::TagCondition;
use crate::oci::manifest::MAX_MANIFEST_BYTES;
use crate::oci::{Digest, Reference, ReferenceError, RepoName, Tag};
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
    puller: Option<&str>,
) -> Result<Response, ApiError> {
    let reference = reference_for_read(reference)?;
    let accept = accept_list(headers);
    let accept = accept.as_deref();
    let (digest, media_type, size, payload) = if with_body {
        let m = registry.manifest(repo, &reference, accept, puller).await?;
        let size = m.payload.len() as u64;
        (m.digest, m.media_type, size, Some(m.payload))
    } else {
        let m = registry.manifest_head(repo, &reference, accept, puller).await?;
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

/// The request's `Accept` values joined in one list (a pull-through cache passes them on, so an
/// index stays an index).
fn accept_list(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The `?tag=` parameters of a manifest push (OCI 1.1), validated. Tags need no decoding: the
/// tag grammar has no character a query would encode, so an encoded one fails the grammar.
fn query_tags(query: Option<&str>) -> Result<Vec<Tag>, ApiError> {
    let Some(query) = query else { return Ok(Vec::new()) };
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("tag="))
        .map(|t| {
            Tag::parse(t)
                .map_err(|m| ApiError::new(ErrorCode::ManifestInvalid).message(format!("?tag={t}: {m}")))
        })
        .collect()
}

/// The tag condition of a request: `If-Match: "<digest>"` or `If-None-Match: *`.
fn tag_condition(headers: &HeaderMap) -> Result<Option<Digest>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    Digest::parse(text).map(Some).map_err(|e| {
        ApiError::new(ErrorCode::DigestInvalid).message(format!("If-Match must be a quoted digest: {e}"))
    })
}

fn if_none_match_any(headers: &HeaderMap) -> bool {
    headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "*")
}

/// `PUT /v2/<name>/manifests/<reference>` (with `?tag=`, `If-Match`, `If-None-Match: *`).
pub(super) async fn put(
    registry: &Registry,
    repo: &RepoName,
    reference: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    actor: Option<&str>,
) -> Result<Response, ApiError> {
    let reference = Reference::parse(reference).map_err(|e| match e {
        ReferenceError::Digest(d) => ApiError::new(ErrorCode::DigestInvalid).message(d.to_string()),
        ReferenceError::Tag(m) => ApiError::new(ErrorCode::ManifestInvalid).message(m),
    })?;
    let extra_tags = query_tags(query)?;
    let if_match = tag_condition(headers)?;
    let condition = match (&if_match, if_none_match_any(headers)) {
        (Some(d), _) => TagCondition::IfPointsAt(d),
        (None, true) => TagCondition::IfAbsent,
        (None, false) => TagCondition::Always,
    };
    let bytes = read_manifest_body(body).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let pushed =
        registry.put_manifest(repo, &reference, content_type, &bytes, &extra_tags, condition, actor).await?;
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
    for tag in &pushed.tags {
        res.headers_mut().append("oci-tag", hv(tag.as_str()));
    }
    Ok(res)
}

/// `DELETE /v2/<name>/manifests/<reference>`: by digest, the manifest becomes a tombstone with
/// its referrers and loses its tags; by tag, only the tag goes (`If-Match` makes it conditional).
pub(super) async fn delete(
    registry: &Registry,
    repo: &RepoName,
    reference: &str,
    headers: &HeaderMap,
    actor: Option<&str>,
) -> Result<Response, ApiError> {
    let digest = match reference_for_read(reference)? {
        Reference::Digest(d) => {
            registry.delete_manifest(repo, &d, false, actor).await?;
            d.to_string()
        }
        Reference::Tag(tag) => {
            let if_match = tag_condition(headers)?;
            let condition = if_match.as_ref().map_or(TagCondition::Always, TagCondition::IfPointsAt);
            registry.delete_tag(repo, &tag, condition, actor).await?
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        [
            (header::HeaderName::from_static("docker-content-digest"), hv(&digest)),
            (header::CONTENT_LENGTH, hv("0")),
        ],
    )
        .into_response())
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
