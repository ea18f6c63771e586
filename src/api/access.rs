//! Access control at the HTTP edge: which permission each route needs, the 401/403 answers with
//! their challenges, and the token endpoint of the Docker token-auth flow.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorCode};
use super::route::V2Route;
use super::{Json, Params};
use crate::app::App;
use crate::auth::{Auth, Denial, Identity, Operation};

/// What a request does, in the one table's terms ([`Operation`]).
fn operation<'a>(route: &'a V2Route, method: &Method) -> Operation<'a> {
    use V2Route as R;
    let read = matches!(*method, Method::GET | Method::HEAD);
    match route {
        R::Base => Operation::SignIn,
        R::Catalog => Operation::List,
        R::Tags(repo) | R::Referrers(repo, _) | R::Blob(repo, _) | R::Manifest(repo, _) if read => {
            Operation::Pull(repo.as_str())
        }
        R::Manifest(repo, _) | R::Blob(repo, _) if *method == Method::DELETE => {
            Operation::Delete(repo.as_str())
        }
        R::Tags(repo) | R::Referrers(repo, _) | R::Manifest(repo, _) | R::Blob(repo, _) => {
            Operation::Push(repo.as_str())
        }
        R::UploadStart(repo) | R::Upload(repo, _) => Operation::Push(repo.as_str()),
    }
}

/// The scope a token needs for `op`, for the challenge.
fn scope(op: Operation<'_>) -> Option<String> {
    match op {
        Operation::Pull(r) => Some(format!("repository:{r}:pull")),
        Operation::Push(r) => Some(format!("repository:{r}:pull,push")),
        Operation::Delete(r) => Some(format!("repository:{r}:delete")),
        _ => None,
    }
}

fn now_secs(app: &App) -> u64 {
    (app.registry.clock().now_ms() / 1000).max(0) as u64
}

/// Authenticates the caller and checks the route's permission. A mount whose source the caller
/// may not pull is turned into a plain upload (the spec's fallback), so it reveals nothing.
///
/// # Errors
/// 401 `UNAUTHORIZED` with a `WWW-Authenticate` challenge, or 403 `DENIED`.
pub(super) fn check(
    app: &App,
    route: &V2Route,
    method: &Method,
    headers: &HeaderMap,
    params: &mut Params,
) -> Result<Identity, ApiError> {
    let Some(auth) = &app.auth else { return Ok(Identity::Anonymous) };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let op = operation(route, method);
    let scope = scope(op);
    let deny = |denial: Denial| denial_response(auth, headers, scope.as_deref(), denial);
    let who = auth.authenticate(authorization, now_secs(app)).map_err(deny)?;
    auth.decide(&who, op).map_err(deny)?;
    if let V2Route::UploadStart(_) = route
        && let Some(from) = params.from.as_deref()
        && auth.decide(&who, Operation::Pull(from)).is_err()
    {
        params.from = None;
    }
    Ok(who)
}

fn denial_response(auth: &Auth, headers: &HeaderMap, scope: Option<&str>, denial: Denial) -> ApiError {
    match denial {
        Denial::Unauthenticated(message) => ApiError::new(ErrorCode::Unauthorized)
            .message(message)
            .header(header::WWW_AUTHENTICATE, auth.challenge(&default_realm(headers), scope)),
        Denial::Forbidden => ApiError::new(ErrorCode::Denied),
    }
}

/// `<scheme>://<Host>/auth/token`, the built-in token endpoint as the client reached us.
fn default_realm(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    let scheme = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
    format!("{scheme}://{host}/auth/token")
}

/// `GET /auth/token?service=&scope=…`: a bearer token for the caller (basic credentials, or none
/// for anonymous access), granting the requested scopes as far as the rules allow.
pub(super) async fn token(
    State(app): State<App>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let Some(auth) = app.auth.as_ref().filter(|a| a.issues_tokens()) else {
        return ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::NOT_FOUND)
            .message("this registry does not issue tokens")
            .into_response();
    };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = now_secs(&app);
    let issued = auth.authenticate(authorization, now).and_then(|who| {
        let service = query.iter().find(|(k, _)| k == "service").map(|(_, v)| v.as_str());
        let scopes: Vec<String> =
            query.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
        auth.issue_token(&who, service, &scopes, now)
    });
    match issued {
        Ok(t) => {
            let body = serde_json::json!({
                "token": t.token, "access_token": t.token, "expires_in": t.expires_in,
            });
            (StatusCode::OK, Json(body.to_string())).into_response()
        }
        Err(Denial::Unauthenticated(m)) => ApiError::new(ErrorCode::Unauthorized)
            .message(m)
            .header(header::WWW_AUTHENTICATE, auth.basic_challenge())
            .into_response(),
        Err(Denial::Forbidden) => ApiError::new(ErrorCode::Denied).into_response(),
    }
}
