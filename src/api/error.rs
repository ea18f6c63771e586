//! The OCI error table and the one conversion from domain errors to HTTP answers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::registry;

/// Exactly the error codes of the OCI distribution spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    /// The status the spec pairs with the code.
    pub fn status(self) -> StatusCode {
        self.entry().1
    }

    /// The spec's short message.
    pub fn message(self) -> &'static str {
        self.entry().2
    }

    fn entry(self) -> (&'static str, StatusCode, &'static str) {
        use ErrorCode::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND, "blob unknown to registry"),
            BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST, "blob upload invalid"),
            BlobUploadUnknown => {
                ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND, "blob upload unknown to registry")
            }
            DigestInvalid => {
                ("DIGEST_INVALID", StatusCode::BAD_REQUEST, "provided digest did not match uploaded content")
            }
            ManifestBlobUnknown => (
                "MANIFEST_BLOB_UNKNOWN",
                StatusCode::BAD_REQUEST,
                "manifest references a manifest or blob unknown to registry",
            ),
            ManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST, "manifest invalid"),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND, "manifest unknown to registry"),
            NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST, "invalid repository name"),
            NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND, "repository name not known to registry"),
            SizeInvalid => {
                ("SIZE_INVALID", StatusCode::BAD_REQUEST, "provided length did not match content length")
            }
            Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED, "authentication required"),
            Denied => ("DENIED", StatusCode::FORBIDDEN, "requested access to the resource is denied"),
            Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED, "the operation is unsupported"),
            TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS, "too many requests"),
        }
    }
}

/// An error answer: `{"errors":[{"code","message","detail"}]}` plus the status and any headers
/// the spec asks for (the `Range` of an upload on 416, for instance).
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    status: StatusCode,
    message: String,
    detail: Option<Value>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// For 5xx: the error chain, logged once by the request log, never shown to the client.
    internal: Option<String>,
}

impl ApiError {
    /// An error with the code's own status and message.
    pub fn new(code: ErrorCode) -> Self {
        ApiError {
            code,
            status: code.status(),
            message: code.message().to_string(),
            detail: None,
            headers: Vec::new(),
            internal: None,
        }
    }

    /// Replaces the message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Adds a detail object.
    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Overrides the status (where the spec pairs a code with another status).
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: header::HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, v));
        }
        self
    }

    fn internal(source: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = source.to_string();
        let mut next = source.source();
        while let Some(e) = next {
            chain.push_str(": ");
            chain.push_str(&e.to_string());
            next = e.source();
        }
        // The spec has no code for server failures; UNSUPPORTED would mislead, so the body
        // says what happened in plain words with the closest neutral code.
        let mut err = ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .message("internal server error; the request changed nothing that was not recorded");
        err.internal = Some(chain);
        err
    }
}

/// The error chain of a 5xx answer, for the request log.
#[derive(Debug, Clone)]
pub struct InternalError(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut entry = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(detail) = self.detail {
            entry["detail"] = detail;
        }
        let body = json!({ "errors": [entry] }).to_string();
        let mut res = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        for (name, value) in self.headers {
            res.headers_mut().insert(name, value);
        }
        if let Some(chain) = self.internal {
            res.extensions_mut().insert(InternalError(chain));
        }
        res
    }
}

impl From<registry::Error> for ApiError {
    fn from(e: registry::Error) -> Self {
        use registry::Error as E;
        match e {
            E::BlobUnknown => ApiError::new(ErrorCode::BlobUnknown),
            E::BlobUploadUnknown => ApiError::new(ErrorCode::BlobUploadUnknown),
            E::BlobUploadInvalid(m) => ApiError::new(ErrorCode::BlobUploadInvalid).message(m),
            E::RangeInvalid { size, upload_id } => ApiError::new(ErrorCode::BlobUploadInvalid)
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .message(format!("chunk must start at offset {size}"))
                .header(header::RANGE, upload_range(size))
                .header(header::HeaderName::from_static("docker-upload-uuid"), &upload_id),
            E::RangeNotSatisfiable { size } => ApiError::new(ErrorCode::BlobUnknown)
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .message(format!("range not satisfiable for a blob of {size} bytes"))
                .header(header::CONTENT_RANGE, format!("bytes */{size}")),
            E::DigestInvalid(m) => ApiError::new(ErrorCode::DigestInvalid).message(m),
            E::SizeInvalid(m) => ApiError::new(ErrorCode::SizeInvalid).message(m),
            E::ManifestInvalid(m) => ApiError::new(ErrorCode::ManifestInvalid).message(m),
            E::ManifestTooLarge { limit } => ApiError::new(ErrorCode::ManifestInvalid)
                .status(StatusCode::PAYLOAD_TOO_LARGE)
                .message(format!("manifest is larger than {limit} bytes")),
            E::ManifestBlobUnknown(digests) => {
                let list: Vec<&str> = digests.iter().map(|d| d.as_str()).collect();
                ApiError::new(ErrorCode::ManifestBlobUnknown)
                    .message(format!(
                        "manifest references content not in the repository: {}",
                        list.join(", ")
                    ))
                    .detail(json!({ "digests": list }))
            }
            E::ManifestUnknown => ApiError::new(ErrorCode::ManifestUnknown),
            e @ E::ManifestNotAcceptable { .. } => {
                ApiError::new(ErrorCode::ManifestUnknown).message(e.to_string())
            }
            E::NameUnknown => ApiError::new(ErrorCode::NameUnknown),
            E::DeleteRefused(m) => {
                ApiError::new(ErrorCode::Denied).status(StatusCode::METHOD_NOT_ALLOWED).message(m)
            }
            E::PreconditionFailed(m) => {
                ApiError::new(ErrorCode::Denied).status(StatusCode::PRECONDITION_FAILED).message(m)
            }
            E::Conflict(m) => ApiError::new(ErrorCode::Denied).status(StatusCode::CONFLICT).message(m),
            E::Immutable(m) | E::QuotaExceeded(m) => {
                ApiError::new(ErrorCode::Denied).status(StatusCode::FORBIDDEN).message(m)
            }
            E::TagUnknown(m) => ApiError::new(ErrorCode::ManifestUnknown).message(m),
            E::Unsupported(m) => ApiError::new(ErrorCode::Unsupported).message(m),
            E::Invalid(m) => ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_REQUEST).message(m),
            E::NotFound(m) => ApiError::new(ErrorCode::Unsupported).status(StatusCode::NOT_FOUND).message(m),
            // The spec has no code for an overloaded server; TOOMANYREQUESTS is what clients
            // already back off on, and Retry-After says when.
            E::Unavailable(m) => ApiError::new(ErrorCode::TooManyRequests)
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .message(m)
                .header(header::RETRY_AFTER, "1"),
            // The spec has no code for a failed upstream: the closest neutral one, with a status
            // that says it was not this registry's own failure and a message naming the upstream.
            E::Upstream { rate_limited: true, message } => {
                ApiError::new(ErrorCode::TooManyRequests).message(message).header(header::RETRY_AFTER, "10")
            }
            E::Upstream { rate_limited: false, message } => {
                ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_GATEWAY).message(message)
            }
            E::ReadOnlyCache(m) => {
                ApiError::new(ErrorCode::Denied).status(StatusCode::METHOD_NOT_ALLOWED).message(m)
            }
            E::Internal(source) => ApiError::internal(source.as_ref()),
        }
    }
}

/// The `Range` header value of an upload holding `size` bytes (`0-<last byte>`; `0-0` when
/// empty, as clients expect).
pub fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_spec_status() {
        assert_eq!(ErrorCode::ManifestBlobUnknown.status(), StatusCode::BAD_REQUEST);
        assert_eq!(ErrorCode::NameUnknown.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorCode::Unsupported.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(ErrorCode::TooManyRequests.as_str(), "TOOMANYREQUESTS");
    }
}
