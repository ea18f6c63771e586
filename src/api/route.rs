//! Parsing `/v2/…` paths into typed routes.
//!
//! Repository names contain slashes, so the path is read from the right: the last segments say
//! which endpoint it is, everything before them is the name. The raw (still percent-encoded)
//! path is parsed, so `%2f` or `%2e` can never turn into a separator or a dot: they fail the
//! name grammar instead.

use super::error::{ApiError, ErrorCode};
use crate::oci::RepoName;

/// An endpoint under `/v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>` (the reference is validated by the handler, which
    /// knows whether a bad one means "unknown" or "invalid").
    Manifest(RepoName, String),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, String),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepoName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, String),
}

impl V2Route {
    /// The methods the endpoint answers, for the `Allow` header of a 405.
    pub fn allowed_methods(&self) -> &'static str {
        match self {
            V2Route::Base => "GET, HEAD",
            V2Route::Catalog | V2Route::Tags(_) | V2Route::Referrers(..) => "GET",
            V2Route::Manifest(..) => "GET, HEAD, PUT, DELETE",
            V2Route::Blob(..) => "GET, HEAD, DELETE",
            V2Route::UploadStart(_) => "POST",
            V2Route::Upload(..) => "GET, PATCH, PUT, DELETE",
        }
    }
}

/// Parses the path after `/v2/`.
///
/// # Errors
/// `NAME_INVALID` for a bad repository name; a 404 for a path that is no endpoint.
pub fn parse(rest: &str) -> Result<V2Route, ApiError> {
    if rest.is_empty() {
        return Ok(V2Route::Base);
    }
    if rest == "_catalog" {
        return Ok(V2Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let tail = |k: usize| if n >= k { &segs[n - k..] } else { &[][..] };
    let name = |k: usize| -> Result<RepoName, ApiError> {
        let name = segs[..n - k].join("/");
        RepoName::parse(&name).map_err(|m| {
            ApiError::new(ErrorCode::NameInvalid).message(m).detail(serde_json::json!({ "name": name }))
        })
    };
    let route = match (tail(3), tail(2)) {
        (_, ["tags", "list"]) if n > 2 => V2Route::Tags(name(2)?),
        (_, ["blobs", "uploads"]) if n > 2 => V2Route::UploadStart(name(2)?),
        (["blobs", "uploads", ""], _) if n > 3 => V2Route::UploadStart(name(3)?),
        (["blobs", "uploads", id], _) if n > 3 => V2Route::Upload(name(3)?, id.to_string()),
        (_, ["manifests", r]) if n > 2 => V2Route::Manifest(name(2)?, r.to_string()),
        (_, ["blobs", d]) if n > 2 => V2Route::Blob(name(2)?, d.to_string()),
        (_, ["referrers", d]) if n > 2 => V2Route::Referrers(name(2)?, d.to_string()),
        _ => return Err(not_found()),
    };
    Ok(route)
}

/// The answer for a path that is no endpoint.
pub fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NameUnknown)
        .status(axum::http::StatusCode::NOT_FOUND)
        .message("no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn parses_from_the_right() {
        assert_eq!(parse("").unwrap(), V2Route::Base);
        assert_eq!(parse("_catalog").unwrap(), V2Route::Catalog);
        assert_eq!(parse("a/b/tags/list").unwrap(), V2Route::Tags(repo("a/b")));
        assert_eq!(parse("a/manifests/manifests").unwrap(), V2Route::Manifest(repo("a"), "manifests".into()));
        assert_eq!(parse("a/blobs/uploads/").unwrap(), V2Route::UploadStart(repo("a")));
        assert_eq!(parse("a/blobs/uploads").unwrap(), V2Route::UploadStart(repo("a")));
        assert_eq!(parse("a/blobs/uploads/x1").unwrap(), V2Route::Upload(repo("a"), "x1".into()));
        assert_eq!(parse("blobs/blobs/sha256:x").unwrap(), V2Route::Blob(repo("blobs"), "sha256:x".into()));
        assert_eq!(parse("a/referrers/sha256:x").unwrap(), V2Route::Referrers(repo("a"), "sha256:x".into()));
    }

    #[test]
    fn rejects_tricks_and_non_endpoints() {
        for bad in
            ["a%2fb/tags/list", "a/../b/tags/list", "%2e%2e/tags/list", "a//b/tags/list", "A/tags/list"]
        {
            let e = parse(bad).unwrap_err().into_response_status();
            assert_eq!(e, 400, "{bad}");
        }
        for missing in ["tags/list", "a", "a/b", "a/unknown/x", "manifests/x"] {
            assert_eq!(parse(missing).unwrap_err().into_response_status(), 404, "{missing}");
        }
    }

    trait Status {
        fn into_response_status(self) -> u16;
    }
    impl Status for ApiError {
        fn into_response_status(self) -> u16 {
            axum::response::IntoResponse::into_response(self).status().as_u16()
        }
    }
}
