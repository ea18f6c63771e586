//! Everything that knows about HTTP: the router, request parsing, the OCI error table, and the
//! request log. Handlers are thin: they parse and validate, call one [`crate::registry::Registry`] operation,
//! and shape the answer.

mod access;
mod admin;
mod blobs;
mod discovery;
pub mod error;
pub mod headers;
mod limits;
mod manifests;
mod metrics;
mod request_log;
pub mod route;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;

use self::error::{ApiError, ErrorCode};
use self::route::V2Route;
use crate::app::App;

/// The router of a separate metrics listener (`metrics.listen`): `/metrics` alone, without
/// authentication — the address is the protection.
pub fn metrics_router(app: App) -> Router {
    Router::new().route("/metrics", get(metrics::separate_listener)).with_state(app)
}

/// The HTTP application over `app`.
pub fn router(app: App) -> Router {
    let limiter = limits::RateLimiter::new(&app.config.limits).map(std::sync::Arc::new);
    let console = if app.config.ui_enabled { crate::ui::router() } else { Router::new() };
    Router::new()
        .merge(console)
        .route("/v2", any(v2))
        .route("/v2/", any(v2))
        .route("/v2/{*rest}", any(v2))
        .route("/auth/token", get(access::token))
        .route("/admin/v1/{*rest}", any(admin::handle))
        .layer(middleware::from_fn_with_state(limiter, limits::rate_limit))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::main_listener))
        .layer(middleware::from_fn_with_state(app.config.limits.max_header_bytes, limits::limit_head))
        .with_state(app.clone())
        .layer(middleware::from_fn_with_state(app.registry.clone(), request_log::log_request))
}

/// Query parameters any `/v2/` endpoint may take.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Params {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    n: Option<String>,
    last: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
    /// containerd's mirror parameter: the registry the client meant (`docker.io`).
    ns: Option<String>,
}

async fn v2(State(app): State<App>, req: Request) -> Response {
    match dispatch(&app, req).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(app: &App, req: Request) -> Result<Response, ApiError> {
    let registry = &app.registry;
    let (parts, body) = req.into_parts();
    // Only the methods that carry content read a body; the others (the hot read path) need no
    // timer.
    let body = if matches!(parts.method, Method::PUT | Method::PATCH | Method::POST) {
        limits::idle_limited(body, std::time::Duration::from_secs(app.config.limits.body_idle_timeout_secs))
    } else {
        body
    };
    let rest = parts.uri.path().strip_prefix("/v2").unwrap_or("");
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let route = route::parse(rest)?;
    let mut params: Params = match parts.uri.query() {
        None => Params::default(),
        Some(q) => serde_urlencoded_params(q)?,
    };
    let method = parts.method;
    let route = mirrored(registry, route, &method, params.ns.as_deref()).await?;
    let h = &parts.headers;
    let who = access::check(app, &route, &method, h, &mut params)?;
    let actor = who.name();
    let allow = route.allowed_methods();
    use V2Route as R;
    match (route, method) {
        (R::Base, Method::GET | Method::HEAD) => Ok((StatusCode::OK, Json("{}")).into_response()),
        (R::Catalog, Method::GET) => discovery::catalog(app, &who, &params).await,
        (R::Tags(repo), Method::GET) => discovery::tags(registry, &repo, &params).await,
        (R::Referrers(repo, d), Method::GET) => discovery::referrers(registry, &repo, &d, &params).await,
        (R::Manifest(repo, r), Method::GET) => manifests::get(registry, &repo, &r, h, true, actor).await,
        (R::Manifest(repo, r), Method::HEAD) => manifests::get(registry, &repo, &r, h, false, actor).await,
        (R::Manifest(repo, r), Method::PUT) => {
            manifests::put(registry, &repo, &r, parts.uri.query(), h, body, actor).await
        }
        (R::Manifest(repo, r), Method::DELETE) => manifests::delete(registry, &repo, &r, h, actor).await,
        (R::Blob(repo, d), Method::DELETE) => blobs::delete(registry, &repo, &d, actor).await,
        (R::Blob(repo, d), Method::GET) => blobs::get(registry, &repo, &d, h, true).await,
        (R::Blob(repo, d), Method::HEAD) => blobs::get(registry, &repo, &d, h, false).await,
        (R::UploadStart(repo), Method::POST) => blobs::start_upload(registry, &repo, &params, h, body).await,
        (R::Upload(repo, id), Method::PATCH) => blobs::patch_upload(registry, &repo, &id, h, body).await,
        (R::Upload(repo, id), Method::PUT) => blobs::put_upload(registry, &repo, &id, &params, h, body).await,
        (R::Upload(repo, id), Method::GET) => blobs::upload_status(registry, &repo, &id).await,
        (R::Upload(repo, id), Method::DELETE) => blobs::cancel_upload(registry, &repo, &id).await,
        (_, method) => Err(ApiError::new(ErrorCode::Unsupported)
            .message(format!("{method} is not supported on this endpoint"))
            .header(header::ALLOW, allow)),
    }
}

/// A read through a mirror (a default cache, containerd's `?ns=`) is served under the cache's
/// own name for the repository, which is also the name authorization decides on.
async fn mirrored(
    registry: &crate::registry::Registry,
    mut route: V2Route,
    method: &Method,
    ns: Option<&str>,
) -> Result<V2Route, ApiError> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Ok(route);
    }
    // A blob HEAD is how a push asks whether to upload: always the name itself.
    if matches!(route, V2Route::Blob(..)) && *method == Method::HEAD {
        return Ok(route);
    }
    if let V2Route::Tags(repo)
    | V2Route::Manifest(repo, _)
    | V2Route::Blob(repo, _)
    | V2Route::Referrers(repo, _) = &mut route
        && let Some(name) = registry.mirror_name(repo, ns).await?
    {
        *repo = name;
    }
    Ok(route)
}

fn serde_urlencoded_params(query: &str) -> Result<Params, ApiError> {
    let uri: axum::http::Uri = format!("/?{query}")
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::Unsupported).status(StatusCode::BAD_REQUEST))?;
    axum::extract::Query::<Params>::try_from_uri(&uri).map(|q| q.0).map_err(|e| {
        ApiError::new(ErrorCode::Unsupported)
            .status(StatusCode::BAD_REQUEST)
            .message(format!("invalid query string: {e}"))
    })
}

/// A JSON body given as ready text.
struct Json<T>(T);

impl<T: Into<Body>> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.into()).into_response()
    }
}

/// A header value from text known to be valid (digests, numbers, paths of validated names).
fn hv(text: impl AsRef<str>) -> HeaderValue {
    HeaderValue::from_str(text.as_ref()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn healthz(State(app): State<App>) -> Response {
    match app.registry.health().await {
        Ok(()) => (StatusCode::OK, Json(r#"{"status":"ok"}"#)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            let body = serde_json::json!({ "status": "unavailable", "error": e.to_string() });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body.to_string())).into_response()
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
