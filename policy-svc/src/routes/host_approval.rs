//! Which apps may connect: on a gateway that approves hosts, a headed host that appears
//! on its first authorization there starts pending (refused `host_pending`, listed with
//! `pending: true` in `GET /api/v1/hosts`) until an admin approves it. Off by default:
//! a headed host is allowed on first connect, as before.

use axum::extract::State;
use serde::Deserialize;
use serde_json::json;

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::{catalog, hosts};

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(
            Verb::Put,
            "/api/v1/gateways/{id}/host-approval",
            Some(Capability::GatewaysManage),
            set_approval,
        ),
        // Approving lets a host in, as enabling one does: the same capability.
        endpoint(
            Verb::Post,
            "/api/v1/hosts/{id}/approve",
            Some(Capability::HostsToggle),
            approve,
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Approval {
    /// Whether headed hosts new to this gateway wait for an admin's approval.
    required: bool,
}

async fn set_approval(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
    Json(body): Json<Approval>,
) -> Result<Json<catalog::Gateway>, ApiError> {
    let before = catalog::approves_hosts(&state.db, id).await?;
    let gateway = catalog::set_approve_hosts(&state.db, id, body.required)
        .await?
        .ok_or(ApiError::NotFound("gateway"))?;
    audit_admin(
        &state,
        &admin,
        "gateway.host_approval",
        format!("gateways/{id}"),
        Some(json!({"approve_hosts": before})),
        Some(json!({"approve_hosts": body.required})),
    )
    .await?;
    Ok(Json(gateway))
}

/// Approves a pending host: its connections work from the next request. Approving a
/// host that is not pending changes nothing.
async fn approve(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<Json<hosts::Host>, ApiError> {
    let before = hosts::get_host(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    let host = hosts::approve(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    tracing::info!(
        host_id = id,
        was_pending = before.pending.0,
        actor = admin.user_id,
        "host approved"
    );
    audit_admin(
        &state,
        &admin,
        "host.approve",
        format!("hosts/{id}"),
        state_of(&before),
        state_of(&host),
    )
    .await?;
    Ok(Json(host))
}
