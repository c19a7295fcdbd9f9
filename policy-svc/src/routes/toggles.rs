//! Break-glass: `POST /api/v1/{kind}/{id}/disable|enable`.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde::Serialize;

use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::toggles::{self, Layer};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/{kind}/{id}/disable", post(disable))
        .route("/api/v1/{kind}/{id}/enable", post(enable))
}

#[derive(Serialize)]
struct Toggled {
    kind: &'static str,
    id: i64,
    enabled: bool,
    was_enabled: bool,
}

async fn disable(
    state: State<AppState>,
    admin: Admin,
    path: Path<(String, i64)>,
) -> Result<Json<Toggled>, ApiError> {
    set(state, admin, path, false).await
}

async fn enable(
    state: State<AppState>,
    admin: Admin,
    path: Path<(String, i64)>,
) -> Result<Json<Toggled>, ApiError> {
    set(state, admin, path, true).await
}

async fn set(
    State(state): State<AppState>,
    admin: Admin,
    Path((kind, id)): Path<(String, i64)>,
    enabled: bool,
) -> Result<Json<Toggled>, ApiError> {
    let layer = Layer::parse(&kind).ok_or(ApiError::NotFound("route"))?;
    admin.require(match layer {
        Layer::Hosts => Capability::HostsToggle,
        Layer::Connections => Capability::ConnectionsToggle,
        Layer::Servers => Capability::ServersToggle,
        Layer::Gateways => Capability::GatewaysToggle,
    })?;
    let was_enabled = toggles::set_enabled(&state.db, layer, id, enabled)
        .await?
        .ok_or(ApiError::NotFound(layer.noun()))?;
    tracing::info!(
        kind = layer.as_str(),
        id,
        enabled,
        was_enabled,
        actor = admin.user_id,
        "break-glass toggle"
    );
    Ok(Json(Toggled {
        kind: layer.as_str(),
        id,
        enabled,
        was_enabled,
    }))
}
