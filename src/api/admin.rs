//! The admin API under `/admin/v1/`: JSON over the same `registry` operations as the OCI API
//! and the CLI. Targets are written as the CLI writes them — `REPO`, `REPO:TAG`, `REPO@DIGEST` —
//! so no repository name can be mistaken for a route. Every route needs the `admin` permission
//! on the repositories it touches.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /admin/v1/repositories` | repositories with counts and sizes (`?last=&n=`) |
//! | `GET /admin/v1/repositories/REPO` | one repository |
//! | `DELETE /admin/v1/repositories/REPO` | delete a repository (restorable) |
//! | `GET /admin/v1/tombstones/REPO` | its tombstones |
//! | `GET /admin/v1/history/REPO[:TAG]` | tag history |
//! | `POST /admin/v1/restore/TARGET?take_tags=true` | restore a tombstone, tag or repository |
//! | `POST /admin/v1/revert/REPO:TAG` | the time machine (`{"to"}`, `{"at"}` or `{"previous"}`) |
//! | `GET /admin/v1/preview/TARGET` | what deleting TARGET would take and free |
//! | `POST /admin/v1/purge` | purge a blob everywhere (`{"digest", "reason"}`) |

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::Json;
use super::error::{ApiError, ErrorCode};
use crate::app::App;
use crate::auth::{Action, Denial, Identity};
use crate::meta::RevertTarget;
use crate::oci::{Digest, RepoName};
use crate::registry::DeleteTarget;

/// Largest admin request body (a purge reason, a revert target).
const MAX_BODY: usize = 64 * 1024;

/// `/admin/v1/…`.
pub(super) async fn handle(State(app): State<App>, req: Request) -> Response {
    match dispatch(&app, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_REQUEST).message(message)
}

fn target(text: &str) -> Result<DeleteTarget, ApiError> {
    DeleteTarget::parse(text).map_err(|m| ApiError::new(ErrorCode::NameInvalid).message(m))
}

fn repository(text: &str) -> Result<RepoName, ApiError> {
    RepoName::parse(text).map_err(|m| ApiError::new(ErrorCode::NameInvalid).message(m))
}

/// The caller, if it may administer every repository in `repos`.
fn authorize(app: &App, headers: &HeaderMap, repos: &[&str]) -> Result<Identity, ApiError> {
    let Some(auth) = &app.auth else { return Ok(Identity::Anonymous) };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = (app.registry.clock().now_ms() / 1000).max(0) as u64;
    let deny = |d: Denial| match d {
        Denial::Unauthenticated(m) => ApiError::new(ErrorCode::Unauthorized)
            .message(m)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"berth admin\""),
        Denial::Forbidden => ApiError::new(ErrorCode::Denied),
    };
    let who = auth.authenticate(authorization, now).map_err(deny)?;
    if repos.is_empty() {
        auth.authorize(&who, None, Action::Pull).map_err(deny)?;
    }
    for repo in repos {
        auth.authorize(&who, Some(repo), Action::Admin).map_err(deny)?;
    }
    Ok(who)
}

fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p == name || p == format!("{name}=true") || p == format!("{name}=1")))
}

fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

async fn json_body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| bad_request(format!("could not read the request body: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("request body: {e}")))
}

fn ok(value: serde_json::Value) -> Response {
    Json(value.to_string()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    digest: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertRequest {
    to: Option<String>,
    at: Option<i64>,
    #[serde(default)]
    previous: bool,
}

async fn dispatch(app: &App, req: Request) -> Result<Response, ApiError> {
    let registry = &app.registry;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().strip_prefix("/admin/v1/").unwrap_or("");
    let query = parts.uri.query();
    let h = &parts.headers;
    let (route, rest) = path.split_once('/').unwrap_or((path, ""));
    let method = parts.method;
    match (route, method, rest) {
        ("repositories", Method::GET, "") => {
            let who = authorize(app, h, &[])?;
            let n = query_value(query, "n").and_then(|n| n.parse().ok()).unwrap_or(1000i64).clamp(0, 100_000);
            let last = query_value(query, "last");
            let mut repos = registry.repositories(last, n).await?;
            if let Some(auth) = &app.auth {
                repos.retain(|r| auth.allowed(&who, &r.name, Action::Admin));
            }
            Ok(ok(json!({ "repositories": repos })))
        }
        ("repositories", Method::GET, name) => {
            let repo = repository(name)?;
            authorize(app, h, &[repo.as_str()])?;
            Ok(ok(serde_json::to_value(registry.repository(&repo).await?).unwrap_or_default()))
        }
        ("repositories", Method::DELETE, name) => {
            let repo = repository(name)?;
            let who = authorize(app, h, &[repo.as_str()])?;
            let deleted = registry.delete_repository(&repo, who.name()).await?;
            Ok(ok(json!({ "repository": repo.as_str(), "deleted": deleted })))
        }
        ("tombstones", Method::GET, name) => {
            let repo = repository(name)?;
            authorize(app, h, &[repo.as_str()])?;
            let tombstones = registry.tombstones(&repo).await?;
            Ok(ok(json!({ "repository": repo.as_str(), "tombstones": tombstones })))
        }
        ("history", Method::GET, text) => {
            let (repo, tag) = match target(text)? {
                DeleteTarget::Repository(r) => (r, None),
                DeleteTarget::Tag(r, t) => (r, Some(t)),
                DeleteTarget::Manifest(..) => return Err(bad_request("history is kept per tag: REPO or REPO:TAG")),
            };
            authorize(app, h, &[repo.as_str()])?;
            let history = registry.history(&repo, tag.as_ref()).await?;
            Ok(ok(json!({ "repository": repo.as_str(), "history": history })))
        }
        ("restore", Method::POST, text) => {
            let target = target(text)?;
            let who = authorize(app, h, &[target.repository().as_str()])?;
            let restored = registry.restore(&target, query_flag(query, "take_tags"), who.name()).await?;
            Ok(ok(json!({ "target": target.to_string(), "restored": restored })))
        }
        ("revert", Method::POST, text) => {
            let DeleteTarget::Tag(repo, tag) = target(text)? else {
                return Err(bad_request("revert takes REPO:TAG"));
            };
            let who = authorize(app, h, &[repo.as_str()])?;
            let request: RevertRequest = json_body(body).await?;
            let digest;
            let to = match (&request.to, request.at, request.previous) {
                (Some(d), None, false) => {
                    digest = Digest::parse(d).map_err(|e| ApiError::new(ErrorCode::DigestInvalid).message(e.to_string()))?;
                    RevertTarget::Digest(&digest)
                }
                (None, Some(at), false) => RevertTarget::At(at),
                (None, None, true) => RevertTarget::Previous,
                _ => return Err(bad_request("give exactly one of \"to\" (a digest), \"at\" (Unix ms) or \"previous\": true")),
            };
            let now_at = registry.revert_tag(&repo, &tag, to, who.name()).await?;
            Ok(ok(json!({ "repository": repo.as_str(), "tag": tag.as_str(), "digest": now_at })))
        }
        ("preview", Method::GET, text) => {
            let target = target(text)?;
            authorize(app, h, &[target.repository().as_str()])?;
            let preview = registry.delete_preview(&target).await?;
            let mut value = serde_json::to_value(preview).unwrap_or_default();
            value["target"] = json!(target.to_string());
            Ok(ok(value))
        }
        ("purge", Method::POST, "") => {
            let request: PurgeRequest = json_body(body).await?;
            let digest = Digest::parse(&request.digest)
                .map_err(|e| ApiError::new(ErrorCode::DigestInvalid).message(e.to_string()))?;
            if request.reason.trim().is_empty() {
                return Err(bad_request("a purge needs a reason"));
            }
            let holders = registry.repositories_holding(&digest).await?;
            if holders.is_empty() {
                // Nobody's content: the collector removes it; a purge needs a repository's admin.
                return Err(crate::registry::Error::BlobUnknown.into());
            }
            let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
            let who = authorize(app, h, &holders)?;
            let report = registry.purge_blob(&digest, request.reason.trim(), who.name()).await?;
            Ok(ok(serde_json::to_value(report).unwrap_or_default()))
        }
        (_, method, _) => Err(ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::NOT_FOUND)
            .message(format!("no admin endpoint {method} /admin/v1/{path}"))),
    }
}
