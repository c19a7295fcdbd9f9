//! Gateways, the servers they expose, and their connections.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde::Deserialize;

use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::{StoreError, catalog, hosts};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/gateways", get(list).post(create))
        .route("/api/v1/gateways/{id}/servers", get(list_exposures))
        .route(
            "/api/v1/gateways/{id}/servers/{server_id}",
            put(expose).delete(hide),
        )
        .route("/api/v1/gateways/{id}/connections", get(connections))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGateway {
    name: String,
    slug: String,
}

async fn create(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewGateway>,
) -> Result<(StatusCode, Json<catalog::Gateway>), ApiError> {
    admin.require(Capability::GatewaysManage)?;
    let name = super::validate_name(&body.name)?;
    let slug = super::validate_slug(&body.slug)?;
    match catalog::create_gateway(&state.db, name, slug).await {
        Ok(g) => Ok((StatusCode::CREATED, Json(g))),
        Err(StoreError::Conflict(_)) => Err(ApiError::conflict(
            "slug_taken",
            format!("a gateway with slug {slug:?} exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn list(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<catalog::Gateway>>, ApiError> {
    Ok(Json(catalog::list_gateways(&state.db).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Exposure {
    identity: Identity,
    /// The shared service credential. Not accepted until credentials can be stored
    /// encrypted; see the README.
    #[serde(default)]
    credential: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Identity {
    Shared,
    PerUser,
}

async fn expose(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
    Json(body): Json<Exposure>,
) -> Result<Json<catalog::Exposure>, ApiError> {
    admin.require(Capability::GatewaysManage)?;
    if body.credential.is_some() {
        return Err(ApiError::unprocessable(
            "credential_unsupported",
            "storing a shared credential needs encrypted credential storage, which this version does not have yet; expose without `credential`",
        ));
    }
    require_gateway(&state, gateway_id).await?;
    if !catalog::server_exists(&state.db, server_id).await? {
        return Err(ApiError::NotFound("server"));
    }
    let identity = match body.identity {
        Identity::Shared => "shared",
        Identity::PerUser => "per_user",
    };
    Ok(Json(
        catalog::expose(&state.db, gateway_id, server_id, identity).await?,
    ))
}

async fn hide(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    admin.require(Capability::GatewaysManage)?;
    if catalog::hide(&state.db, gateway_id, server_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("exposure"))
    }
}

async fn list_exposures(
    State(state): State<AppState>,
    _admin: Admin,
    Path(gateway_id): Path<i64>,
) -> Result<Json<Vec<catalog::Exposure>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    Ok(Json(catalog::list_exposures(&state.db, gateway_id).await?))
}

async fn connections(
    State(state): State<AppState>,
    _admin: Admin,
    Path(gateway_id): Path<i64>,
) -> Result<Json<Vec<hosts::Connection>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    Ok(Json(hosts::list_connections(&state.db, gateway_id).await?))
}

async fn require_gateway(state: &AppState, id: i64) -> Result<(), ApiError> {
    if catalog::gateway_exists(&state.db, id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound("gateway"))
    }
}
