//! Blob reads and upload sessions.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorCode, upload_range};
use super::headers::{RangeRequest, blob_range, content_range};
use super::{Params, hv};
use crate::oci::{Digest, RepoName};
use crate::registry::{Registry, UploadStatus};

pub(super) fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    Digest::parse(s).map_err(|e| {
        ApiError::new(ErrorCode::DigestInvalid)
            .message(e.to_string())
            .detail(serde_json::json!({ "digest": s }))
    })
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>`, with `Range`.
pub(super) async fn get(
    registry: &Registry,
    repo: &RepoName,
    digest: &str,
    headers: &HeaderMap,
    with_body: bool,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let blob = registry.blob(repo, &digest, !with_body).await?;
    if with_body && let Some(url) = registry.blob_redirect(&blob).await? {
        return Ok((
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, hv(url)),
                (header::HeaderName::from_static("docker-content-digest"), hv(digest.as_str())),
                (header::CONTENT_LENGTH, hv("0")),
            ],
        )
            .into_response());
    }
    let range = match blob_range(headers, blob.size) {
        RangeRequest::Whole => None,
        RangeRequest::Part(r) => Some(r),
        RangeRequest::Unsatisfiable => {
            return Err(crate::registry::Error::RangeNotSatisfiable { size: blob.size }.into());
        }
    };
    let (status, len) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.end - r.start + 1),
        None => (StatusCode::OK, blob.size),
    };
    let mut res = if with_body {
        let stream = registry.read_blob(&blob, range).await?;
        Response::new(Body::from_stream(stream))
    } else {
        Response::new(Body::empty())
    };
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, hv("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, hv(len.to_string()));
    h.insert("docker-content-digest", hv(digest.as_str()));
    h.insert(header::ETAG, hv(format!("\"{digest}\"")));
    h.insert(header::ACCEPT_RANGES, hv("bytes"));
    if let Some(r) = range {
        h.insert(header::CONTENT_RANGE, hv(format!("bytes {}-{}/{}", r.start, r.end, blob.size)));
    }
    Ok(res)
}

/// `DELETE /v2/<name>/blobs/<digest>`: unlinks the blob from the repository.
pub(super) async fn delete(
    registry: &Registry,
    repo: &RepoName,
    digest: &str,
    actor: Option<&str>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    registry.unlink_blob(repo, &digest, actor).await?;
    Ok((
        StatusCode::ACCEPTED,
        [
            (header::HeaderName::from_static("docker-content-digest"), hv(digest.as_str())),
            (header::CONTENT_LENGTH, hv("0")),
        ],
    )
        .into_response())
}

fn upload_location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// The answer that says where a session stands (202 for POST/PATCH, 204 for GET).
fn session_response(status: StatusCode, repo: &RepoName, session: &UploadStatus) -> Response {
    (
        status,
        [
            (header::LOCATION, hv(upload_location(repo, &session.id))),
            (header::RANGE, hv(upload_range(session.size))),
            (header::HeaderName::from_static("docker-upload-uuid"), hv(&session.id)),
            (header::CONTENT_LENGTH, hv("0")),
        ],
    )
        .into_response()
}

/// 201 for a blob now linked in `repo`.
fn created_blob(repo: &RepoName, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, hv(format!("/v2/{repo}/blobs/{digest}"))),
            (header::HeaderName::from_static("docker-content-digest"), hv(digest.as_str())),
            (header::CONTENT_LENGTH, hv("0")),
        ],
    )
        .into_response()
}

/// `POST /v2/<name>/blobs/uploads/`: a session, a monolithic upload (`?digest=`), or a
/// cross-repository mount (`?mount=&from=`).
pub(super) async fn start_upload(
    registry: &Registry,
    repo: &RepoName,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(mount) = &params.mount {
        let digest = parse_digest(mount)?;
        // A mount without a usable source falls back to a plain session, as the spec says.
        if let Some(from) = params.from.as_deref().and_then(|f| RepoName::parse(f).ok())
            && registry.mount_blob(repo, &from, &digest).await?
        {
            return Ok(created_blob(repo, &digest));
        }
        let session = registry.start_upload(repo).await?;
        return Ok(session_response(StatusCode::ACCEPTED, repo, &session));
    }
    if let Some(digest) = &params.digest {
        let digest = parse_digest(digest)?;
        let hint = super::content_length(headers);
        let digest = registry.upload_blob(repo, &digest, hint, body.into_data_stream()).await?;
        return Ok(created_blob(repo, &digest));
    }
    if super::content_length(headers).is_some_and(|n| n > 0) {
        return Err(ApiError::new(ErrorCode::BlobUploadInvalid)
            .message("a POST with a body needs ?digest= (monolithic upload)"));
    }
    let session = registry.start_upload(repo).await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, &session))
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: a streamed or (with `Content-Range`) chunked append.
pub(super) async fn patch_upload(
    registry: &Registry,
    repo: &RepoName,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let range = chunk_range(headers)?;
    let hint = super::content_length(headers);
    let session = registry.write_upload(repo, id, range, hint, body.into_data_stream()).await?;
    Ok(session_response(StatusCode::ACCEPTED, repo, &session))
}

/// The `Content-Range` of a chunk, checked against `Content-Length` when both are given.
fn chunk_range(headers: &HeaderMap) -> Result<Option<crate::registry::ChunkRange>, ApiError> {
    let range = content_range(headers).map_err(|m| ApiError::new(ErrorCode::BlobUploadInvalid).message(m))?;
    if let (Some(r), Some(len)) = (range, super::content_length(headers))
        && len != r.end - r.start + 1
    {
        return Err(ApiError::new(ErrorCode::SizeInvalid)
            .message(format!("Content-Length {len} does not match Content-Range {}-{}", r.start, r.end)));
    }
    Ok(range)
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=`: completes a session, with or without a final
/// chunk.
pub(super) async fn put_upload(
    registry: &Registry,
    repo: &RepoName,
    id: &str,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(digest) = &params.digest else {
        return Err(ApiError::new(ErrorCode::DigestInvalid).message("completing an upload needs ?digest="));
    };
    let digest = parse_digest(digest)?;
    let range = chunk_range(headers)?;
    let hint = super::content_length(headers);
    let digest = registry.complete_upload(repo, id, &digest, range, hint, body.into_data_stream()).await?;
    Ok(created_blob(repo, &digest))
}

/// `GET /v2/<name>/blobs/uploads/<id>`: where the session stands.
pub(super) async fn upload_status(
    registry: &Registry,
    repo: &RepoName,
    id: &str,
) -> Result<Response, ApiError> {
    let session = registry.upload_status(repo, id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, &session))
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`: cancels a session.
pub(super) async fn cancel_upload(
    registry: &Registry,
    repo: &RepoName,
    id: &str,
) -> Result<Response, ApiError> {
    registry.cancel_upload(repo, id).await?;
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, hv("0"))]).into_response())
}
