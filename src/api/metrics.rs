//! `/metrics`: the Prometheus text exposition. On the main listener it needs admin on every
//! repository when access control is on (the numbers concern the whole registry); on a separate
//! `metrics.listen` address it needs nothing.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::app::App;

/// `/metrics` on the main listener.
pub(super) async fn main_listener(State(app): State<App>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !app.config.metrics_enabled {
        return Err(
            ApiError::new(super::error::ErrorCode::Unsupported).status(axum::http::StatusCode::NOT_FOUND)
        );
    }
    let who = super::admin::authenticate(&app, &headers)?;
    super::admin::authorize(&app, &who, crate::auth::Operation::AdministerRegistry)?;
    exposition(&app).await
}

/// `/metrics` on the separate listener.
pub(super) async fn separate_listener(State(app): State<App>) -> Result<Response, ApiError> {
    exposition(&app).await
}

async fn exposition(app: &App) -> Result<Response, ApiError> {
    let text = app.registry.render_metrics().await?;
    let mut res = text.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(res)
}
