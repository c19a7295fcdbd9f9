//! HTTP routes, one module per resource, merged here.

mod check;
mod gateways;
mod hosts;
mod servers;
mod toggles;

use axum::Router;
use axum::routing::get;

use crate::AppState;
use crate::error::ApiError;

/// The public port: admin API (and, later, OAuth pages).
pub fn public(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .merge(gateways::routes())
        .merge(servers::routes())
        .merge(hosts::routes())
        .merge(toggles::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The check port: only the filter's callouts.
pub fn check(state: AppState) -> Router {
    check::routes()
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    crate::store::ping(&state.db).await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Names and slugs arrive in request bodies; check them the same way everywhere.
pub(crate) fn validate_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 200 printable characters",
        ));
    }
    Ok(name)
}

pub(crate) fn validate_slug(slug: &str) -> Result<&str, ApiError> {
    if mcpguard_core::route::is_valid_slug(slug) {
        Ok(slug)
    } else {
        Err(ApiError::unprocessable(
            "invalid_slug",
            "slug must be 1 to 63 lowercase letters, digits or inner hyphens",
        ))
    }
}
