//! Content discovery: tag lists, referrers and the catalog.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::blobs::parse_digest;
use super::error::{ApiError, ErrorCode};
use super::{Json, Params, hv};
use crate::app::App;
use crate::auth::{Identity, Operation};
use crate::oci::RepoName;
use crate::registry::Registry;

/// The largest page served, whatever `n` asks for (a `Link` header offers the rest).
const MAX_PAGE: i64 = 100_000;

/// `n` and `last` of a paginated list.
fn page(params: &Params) -> Result<(i64, Option<&str>), ApiError> {
    let n = match params.n.as_deref() {
        None => MAX_PAGE,
        Some(n) => n.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::BAD_REQUEST)
                .message(format!("n must be a non-negative integer, got `{n}`"))
        })?,
    };
    Ok((n.min(MAX_PAGE), params.last.as_deref()))
}

/// Fetches one more than the page to know whether a `Link` to the next page is due.
fn paginate(mut items: Vec<String>, n: i64) -> (Vec<String>, Option<String>) {
    if items.len() as i64 > n {
        items.truncate(n as usize);
        let last = items.last().cloned();
        (items, last)
    } else {
        (items, None)
    }
}

fn with_link(body: String, next: Option<String>) -> Response {
    let mut res = Json(body).into_response();
    if let Some(next) = next {
        res.headers_mut().insert(header::LINK, hv(format!("<{next}>; rel=\"next\"")));
    }
    res
}

fn query_escape(s: &str) -> String {
    // Names and tags are from a grammar without reserved characters except `/`.
    s.replace('/', "%2F")
}

/// `GET /v2/<name>/tags/list?n=&last=`.
pub(super) async fn tags(
    registry: &Registry,
    repo: &RepoName,
    params: &Params,
) -> Result<Response, ApiError> {
    let (n, last) = page(params)?;
    // A pull-through cache lists what its upstream has (what a pull would find).
    let query = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(n) = params.n.as_deref() {
            query.append_pair("n", n);
        }
        if let Some(l) = last {
            query.append_pair("last", l);
        }
        query.finish()
    };
    let path = if query.is_empty() { "tags/list".to_string() } else { format!("tags/list?{query}") };
    if let Some((_, body, link)) = registry.cached_read(repo, &path).await? {
        #[derive(serde::Deserialize)]
        struct Upstream {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let listed: Upstream =
            serde_json::from_slice(&body).map_err(|e| crate::registry::Error::Upstream {
                rate_limited: false,
                message: format!("the upstream's tag list is unreadable: {e}"),
            })?;
        let body = json!({ "name": repo.as_str(), "tags": listed.tags.unwrap_or_default() }).to_string();
        let mut res = Json(body).into_response();
        if let Some(link) = link {
            res.headers_mut().insert(header::LINK, hv(link));
        }
        return Ok(res);
    }
    let tags = registry.tags(repo, last, n + 1).await?;
    let (tags, next_last) = paginate(tags, n);
    let next = next_last.map(|l| format!("/v2/{repo}/tags/list?n={n}&last={}", query_escape(&l)));
    #[derive(serde::Serialize)]
    struct TagList<'a> {
        name: &'a str,
        tags: &'a [String],
    }
    let body = serde_json::to_string(&TagList { name: repo.as_str(), tags: &tags }).unwrap_or_default();
    Ok(with_link(body, next))
}

/// `GET /v2/_catalog?n=&last=`: only the repositories the caller may pull.
pub(super) async fn catalog(app: &App, who: &Identity, params: &Params) -> Result<Response, ApiError> {
    let (n, last) = page(params)?;
    let visible = |name: &str| app.auth.as_ref().is_none_or(|a| a.decide(who, Operation::Pull(name)).is_ok());
    let mut repos = Vec::new();
    let mut cursor = last.map(str::to_string);
    loop {
        let batch = app.registry.catalog(cursor.as_deref(), n + 1).await?;
        let exhausted = (batch.len() as i64) <= n;
        cursor = batch.last().cloned();
        repos.extend(batch.into_iter().filter(|r| visible(r)));
        if repos.len() as i64 > n || exhausted {
            break;
        }
    }
    let (repos, next_last) = paginate(repos, n);
    let next = next_last.map(|l| format!("/v2/_catalog?n={n}&last={}", query_escape(&l)));
    Ok(with_link(json!({ "repositories": repos }).to_string(), next))
}

/// `GET /v2/<name>/referrers/<digest>?artifactType=`: an image index of the referrers (empty
/// when there are none or the subject is unknown).
pub(super) async fn referrers(
    registry: &Registry,
    repo: &RepoName,
    digest: &str,
    params: &Params,
) -> Result<Response, ApiError> {
    let subject = parse_digest(digest)?;
    let filter = params.artifact_type.as_deref().filter(|t| !t.is_empty());
    let path = match filter {
        Some(t) => {
            let query =
                form_urlencoded::Serializer::new(String::new()).append_pair("artifactType", t).finish();
            format!("referrers/{subject}?{query}")
        }
        None => format!("referrers/{subject}"),
    };
    // A pull-through cache answers with its upstream's referrers (the cache holds what was pulled).
    if let Some((content_type, body, _)) = registry.cached_read(repo, &path).await? {
        return Ok(([(header::CONTENT_TYPE, hv(content_type))], body).into_response());
    }
    let manifests = registry.referrers(repo, &subject, filter).await?;
    let body = json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::manifest::OCI_INDEX,
        "manifests": manifests,
    });
    let mut res =
        ([(header::CONTENT_TYPE, hv(crate::oci::manifest::OCI_INDEX))], body.to_string()).into_response();
    if filter.is_some() {
        res.headers_mut().insert("oci-filters-applied", hv("artifactType"));
    }
    Ok(res)
}
