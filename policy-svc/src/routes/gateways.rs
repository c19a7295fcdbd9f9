//! Gateways, the servers they expose, and their connections.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::identities::ServerCredential;
use crate::store::{StoreError, catalog, hosts};
use crate::{AppState, secrets};

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::GatewaysManage);
    let read = Some(Capability::GatewaysRead);
    vec![
        endpoint(Verb::Post, "/api/v1/gateways", manage, create),
        endpoint(Verb::Get, "/api/v1/gateways", read, list),
        endpoint(
            Verb::Get,
            "/api/v1/gateways/{id}/servers",
            read,
            list_exposures,
        ),
        endpoint(
            Verb::Put,
            "/api/v1/gateways/{id}/servers/{server_id}",
            manage,
            expose,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/gateways/{id}/servers/{server_id}",
            manage,
            hide,
        ),
        endpoint(
            Verb::Get,
            "/api/v1/gateways/{id}/connections",
            Some(Capability::ConnectionsRead),
            connections,
        ),
    ]
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
    let name = super::validate_name(&body.name)?;
    let slug = super::validate_slug(&body.slug)?;
    match catalog::create_gateway(&state.db, name, slug).await {
        Ok(g) => {
            audit_admin(
                &state,
                &admin,
                "gateway.create",
                format!("gateways/{}", g.id),
                None,
                state_of(&g),
            )
            .await?;
            Ok((StatusCode::CREATED, Json(g)))
        }
        Err(StoreError::Conflict(_)) => Err(ApiError::conflict(
            "slug_taken",
            format!("a gateway with slug {slug:?} exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<catalog::Gateway>>, ApiError> {
    Ok(Json(catalog::list_gateways(&state.db).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Exposure {
    identity: Identity,
    /// The shared service credential sent to the upstream for every caller (`shared`
    /// only). Sealed at rest; never returned.
    #[serde(default)]
    credential: Option<ServerCredential>,
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
    let credential = match (body.credential, body.identity) {
        (None, _) => None,
        (Some(_), Identity::PerUser) => {
            return Err(ApiError::unprocessable(
                "invalid_credential",
                "a per-user exposure uses each user's identity; `credential` is for `shared` only",
            ));
        }
        (Some(c), Identity::Shared) => Some(c.into_header()?),
    };
    require_gateway(&state, gateway_id).await?;
    if !catalog::server_exists(&state.db, server_id).await? {
        return Err(ApiError::NotFound("server"));
    }
    let identity = match body.identity {
        Identity::Shared => "shared",
        Identity::PerUser => "per_user",
    };
    let before = find_exposure(&state, gateway_id, server_id).await?;
    let sealed = match &credential {
        None => None,
        Some((header, value)) => {
            let sealed = state
                .secrets
                .seal(value, &secrets::shared_binding(gateway_id, server_id))
                .map_err(|e| {
                    tracing::error!(error = %e, "could not seal a shared credential");
                    ApiError::Unavailable
                })?;
            Some((header.as_str(), sealed))
        }
    };
    let exposure = catalog::expose(
        &state.db,
        gateway_id,
        server_id,
        identity,
        sealed.as_ref().map(|(h, s)| (*h, s.as_slice())),
    )
    .await?;
    let target = format!("gateways/{gateway_id}/servers/{server_id}");
    audit_admin(
        &state,
        &admin,
        "gateway.expose",
        target,
        before.as_ref().and_then(state_of),
        state_of(&exposure),
    )
    .await?;
    Ok(Json(exposure))
}

async fn find_exposure(
    state: &AppState,
    gateway_id: i64,
    server_id: i64,
) -> Result<Option<catalog::Exposure>, ApiError> {
    let all = catalog::list_exposures(&state.db, gateway_id).await?;
    Ok(all.into_iter().find(|e| e.server_id == server_id))
}

async fn hide(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    let before = find_exposure(&state, gateway_id, server_id).await?;
    if catalog::hide(&state.db, gateway_id, server_id).await? {
        let target = format!("gateways/{gateway_id}/servers/{server_id}");
        audit_admin(
            &state,
            &admin,
            "gateway.hide",
            target,
            before.as_ref().and_then(state_of),
            None,
        )
        .await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("exposure"))
    }
}

async fn list_exposures(
    State(state): State<AppState>,
    Path(gateway_id): Path<i64>,
) -> Result<Json<Vec<catalog::Exposure>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    Ok(Json(catalog::list_exposures(&state.db, gateway_id).await?))
}

async fn connections(
    State(state): State<AppState>,
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
