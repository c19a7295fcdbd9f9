//! Gateways, the servers they expose, and their connections.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::identities::ServerCredential;
use crate::store::catalog::SharedCredential;
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
    /// only): a header (sealed at rest, never returned), or `identity_of` a user.
    #[serde(default)]
    credential: Option<serde_json::Value>,
}

/// A shared credential as the API takes it.
enum Shared {
    Header(String, String),
    IdentityOf(i64),
}

/// `{"type": "identity_of", "user_id": N}`: the user's identity for the server, sent
/// for every caller (a service account connected once, by OAuth or by hand).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityOf {
    #[serde(rename = "type")]
    _type: String,
    user_id: i64,
}

fn shared_credential(v: serde_json::Value) -> Result<Shared, ApiError> {
    let invalid =
        |e: serde_json::Error| ApiError::unprocessable("invalid_credential", e.to_string());
    if v.get("type").and_then(serde_json::Value::as_str) == Some("identity_of") {
        let of: IdentityOf = serde_json::from_value(v).map_err(invalid)?;
        return Ok(Shared::IdentityOf(of.user_id));
    }
    let c: ServerCredential = serde_json::from_value(v).map_err(invalid)?;
    let (header, value) = c.into_header()?;
    Ok(Shared::Header(header, value))
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
        (Some(c), Identity::Shared) => Some(shared_credential(c)?),
    };
    require_gateway(&state, gateway_id).await?;
    if !catalog::server_exists(&state.db, server_id).await? {
        return Err(ApiError::NotFound("server"));
    }
    let identity = match body.identity {
        Identity::Shared => "shared",
        Identity::PerUser => "per_user",
    };
    if let Some(Shared::IdentityOf(user_id)) = credential
        && !crate::store::users::user_exists(&state.db, user_id).await?
    {
        return Err(ApiError::NotFound("user"));
    }
    let before = find_exposure(&state, gateway_id, server_id).await?;
    let sealed = match &credential {
        Some(Shared::Header(header, value)) => {
            let sealed = state
                .secrets
                .seal(value, &secrets::shared_binding(gateway_id, server_id))
                .map_err(|e| {
                    tracing::error!(error = %e, "could not seal a shared credential");
                    ApiError::Unavailable
                })?;
            Some((header.as_str(), sealed))
        }
        _ => None,
    };
    let stored = match (&credential, &sealed) {
        (Some(Shared::IdentityOf(user_id)), _) => Some(SharedCredential::IdentityOf(*user_id)),
        (_, Some((header, sealed))) => Some(SharedCredential::Sealed(header, sealed)),
        _ => None,
    };
    let exposure = catalog::expose(&state.db, gateway_id, server_id, identity, stored).await?;
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
