//! The admin API under `/admin/v1/`: the HTTP face of [`crate::admin::AdminRequest`], whose
//! routes are documented in docs/admin-api.md. The caller is authenticated first, then each
//! request is authorized by [`AdminRequest::authorize`] — the check the console runs too — and
//! only then run; the repository list shows only what the caller may read.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Json;
use super::error::{ApiError, ErrorCode};
use crate::admin::{AdminRequest, ParseError, Refused};
use crate::app::App;
use crate::auth::{Denial, Identity, Operation};

/// Largest admin request body (a purge reason, a revert target).
const MAX_BODY: usize = 64 * 1024;
/// Largest in-use report (`PUT in-use/SOURCE`): 50,000 references of a few hundred bytes.
const MAX_REPORT_BODY: usize = 16 * 1024 * 1024;

/// `/admin/v1/…`.
pub(super) async fn handle(State(app): State<App>, req: Request) -> Response {
    match dispatch(&app, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(app: &App, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // Who is calling comes first: wrong credentials, or an anonymous caller asking for anything
    // it may not have, are challenged before the request is read.
    let who = authenticate(app, &parts.headers)?;
    let path = parts.uri.path().strip_prefix("/admin/v1/").unwrap_or("");
    let anonymous = app.auth.is_some() && who == Identity::Anonymous;
    // An anonymous caller may at most read (no admin request of theirs carries a body); only an
    // in-use report may be large.
    let limit = match (anonymous, parts.method.as_str(), path.starts_with("in-use/")) {
        (true, ..) => 0,
        (false, "PUT", true) => MAX_REPORT_BODY,
        _ => MAX_BODY,
    };
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(body) => body,
        Err(_) if anonymous => return Err(challenge(app)),
        Err(e) => {
            return Err(ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::PAYLOAD_TOO_LARGE)
                .message(format!("this admin request's body may be at most {limit} bytes: {e}")));
        }
    };
    let body = (!body.is_empty()).then_some(&body[..]);
    let request = match AdminRequest::from_http(parts.method.as_str(), path, parts.uri.query(), body) {
        Ok(request) => request,
        // Nothing an anonymous caller sends is read further than this.
        Err(_) if anonymous => return Err(challenge(app)),
        Err(ParseError::NoRoute) => {
            return Err(ApiError::new(ErrorCode::Unsupported)
                .status(StatusCode::NOT_FOUND)
                .message(format!("no admin endpoint {} /admin/v1/{path}", parts.method)));
        }
        Err(ParseError::Name(m)) => return Err(ApiError::new(ErrorCode::NameInvalid).message(m)),
        Err(ParseError::Digest(m)) => return Err(ApiError::new(ErrorCode::DigestInvalid).message(m)),
        Err(ParseError::Invalid(m)) => {
            return Err(ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_REQUEST).message(m));
        }
    };
    let authorized =
        request.authorize(app.auth.as_deref(), &who, &app.registry).await.map_err(|r| refused(app, r))?;
    let mut value = authorized.run(&app.registry, who.name()).await?;
    if let AdminRequest::Repositories { .. } = &request
        && let Some(list) = value["repositories"].as_array_mut()
    {
        list.retain(|r| {
            r["name"].as_str().is_some_and(|name| crate::admin::lists(app.auth.as_deref(), &who, name))
        });
    }
    Ok(Json(value.to_string()).into_response())
}

/// The 401 of the admin API, `/metrics` and the rest of what is not the OCI API: a Basic
/// challenge in the configured realm.
fn challenge(app: &App) -> ApiError {
    deny(app, Denial::Unauthenticated("authentication required".into()), None)
}

fn deny(app: &App, d: Denial, needs: Option<String>) -> ApiError {
    match d {
        Denial::Unauthenticated(m) => {
            let challenge = app.auth.as_ref().map(|a| a.basic_challenge()).unwrap_or_default();
            ApiError::new(ErrorCode::Unauthorized).message(m).header(header::WWW_AUTHENTICATE, challenge)
        }
        Denial::Forbidden => {
            let e = ApiError::new(ErrorCode::Denied);
            match needs {
                Some(needs) => e.message(needs),
                None => e,
            }
        }
    }
}

fn refused(app: &App, r: Refused) -> ApiError {
    match r {
        Refused::Denied(d, needs) => deny(app, d, Some(needs)),
        Refused::Failed(e) => e.into(),
    }
}

/// Who is calling: anonymous without credentials (or with access control off); 401 for
/// credentials that are wrong.
pub(super) fn authenticate(app: &App, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let Some(auth) = &app.auth else { return Ok(Identity::Anonymous) };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = (app.registry.clock().now_ms() / 1000).max(0) as u64;
    auth.authenticate(authorization, now).map_err(|d| deny(app, d, None))
}

/// Decides `op` for `who` by the one table ([`crate::auth::Auth::decide`]): for the routes
/// beside the admin API that show the same facts (`/metrics`).
pub(super) fn authorize(app: &App, who: &Identity, op: Operation<'_>) -> Result<(), ApiError> {
    match &app.auth {
        Some(auth) => auth.decide(who, op).map_err(|d| deny(app, d, Some(op.needs()))),
        None => Ok(()),
    }
}
