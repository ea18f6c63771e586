//! The admin API under `/admin/v1/`: the HTTP face of [`crate::admin::AdminRequest`], whose
//! routes are documented in docs/admin-api.md. Every route needs the `admin` permission on the
//! repositories it touches; the repository list shows only those the caller administers.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Json;
use super::error::{ApiError, ErrorCode};
use crate::admin::{AdminRequest, ParseError};
use crate::app::App;
use crate::auth::{Action, Denial, Identity};

/// Largest admin request body (a purge reason, a revert target).
const MAX_BODY: usize = 64 * 1024;

/// `/admin/v1/…`.
pub(super) async fn handle(State(app): State<App>, req: Request) -> Response {
    match dispatch(&app, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(app: &App, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().strip_prefix("/admin/v1/").unwrap_or("");
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .message(format!("admin request bodies are at most {MAX_BODY} bytes: {e}"))
    })?;
    let body = (!body.is_empty()).then_some(&body[..]);
    let request = AdminRequest::from_http(parts.method.as_str(), path, parts.uri.query(), body).map_err(
        |e| match e {
            ParseError::NoRoute => ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::NOT_FOUND)
                .message(format!("no admin endpoint {} /admin/v1/{path}", parts.method)),
            ParseError::Name(m) => ApiError::new(ErrorCode::NameInvalid).message(m),
            ParseError::Digest(m) => ApiError::new(ErrorCode::DigestInvalid).message(m),
            ParseError::Invalid(m) => {
                ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_REQUEST).message(m)
            }
        },
    )?;
    let who = authenticate(app, &parts.headers)?;
    let repos = match request.repositories(&app.registry).await {
        // Only an administrator of a repository holding a blob learns whether it exists.
        Err(crate::registry::Error::BlobUnknown) if app.auth.is_some() => {
            return Err(
                ApiError::new(ErrorCode::Denied).message("no repository you administer holds this blob")
            );
        }
        // Without auth there is nobody to authorize: a blob no repository holds is explained too.
        Err(crate::registry::Error::BlobUnknown) if matches!(request, AdminRequest::Explain(_)) => Vec::new(),
        other => other?,
    };
    authorize(app, &who, &repos)?;
    if request.whole_registry() {
        authorize_whole_registry(app, &who)?;
    }
    let mut value = request.run(&app.registry, who.name()).await?;
    if let (Some(auth), AdminRequest::Repositories { .. }) = (&app.auth, &request)
        && let Some(list) = value["repositories"].as_array_mut()
    {
        list.retain(|r| r["name"].as_str().is_some_and(|name| auth.allowed(&who, name, Action::Admin)));
    }
    Ok(Json(value.to_string()).into_response())
}

fn deny(d: Denial) -> ApiError {
    match d {
        Denial::Unauthenticated(m) => ApiError::new(ErrorCode::Unauthorized)
            .message(m)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"berth admin\""),
        Denial::Forbidden => ApiError::new(ErrorCode::Denied),
    }
}

/// Who is calling (anonymous when access control is off; 401 for anonymous callers when on).
pub(super) fn authenticate(app: &App, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let Some(auth) = &app.auth else { return Ok(Identity::Anonymous) };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = (app.registry.clock().now_ms() / 1000).max(0) as u64;
    let who = auth.authenticate(authorization, now).map_err(deny)?;
    auth.authorize(&who, None, Action::Admin).map_err(deny)?;
    Ok(who)
}

/// Checks that `who` may administer the whole registry (a rule for `**`), for what concerns every
/// repository at once: the collector's status, the metrics.
pub(super) fn authorize_whole_registry(app: &App, who: &Identity) -> Result<(), ApiError> {
    match &app.auth {
        Some(auth) if !auth.allowed_everywhere(who, Action::Admin) => Err(match who {
            Identity::Anonymous => deny(Denial::Unauthenticated("authentication required".into())),
            _ => ApiError::new(ErrorCode::Denied)
                .message("this needs admin on every repository (a rule for **)"),
        }),
        _ => Ok(()),
    }
}

/// Checks that `who` may administer every repository in `repos`.
fn authorize(app: &App, who: &Identity, repos: &[String]) -> Result<(), ApiError> {
    let Some(auth) = &app.auth else { return Ok(()) };
    for repo in repos {
        auth.authorize(who, Some(repo), Action::Admin).map_err(deny)?;
    }
    Ok(())
}
