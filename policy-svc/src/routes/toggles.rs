//! Break-glass: `POST /api/v1/{kind}/{id}/disable|enable`, each kind behind its own
//! capability.

use axum::extract::State;
use serde::Serialize;
use serde_json::json;

use super::{Endpoint, Verb, audit_admin, endpoint};
use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::toggles::{self, Layer};

pub fn endpoints() -> Vec<Endpoint> {
    let mut all = Vec::new();
    for (layer, cap) in [
        (Layer::Hosts, Capability::HostsToggle),
        (Layer::Connections, Capability::ConnectionsToggle),
        (Layer::Servers, Capability::ServersToggle),
        (Layer::Gateways, Capability::GatewaysToggle),
        (Layer::Users, Capability::UsersManage),
        (Layer::Identities, Capability::IdentitiesToggle),
    ] {
        for enabled in [false, true] {
            let handler = move |state: State<AppState>, admin: Admin, Path(id): Path<i64>| {
                set(state, admin, layer, id, enabled)
            };
            all.push(endpoint(
                Verb::Post,
                layer.toggle_path(enabled),
                Some(cap),
                handler,
            ));
        }
    }
    all
}

#[derive(Serialize)]
struct Toggled {
    kind: &'static str,
    id: i64,
    enabled: bool,
    was_enabled: bool,
}

async fn set(
    State(state): State<AppState>,
    admin: Admin,
    layer: Layer,
    id: i64,
    enabled: bool,
) -> Result<Json<Toggled>, ApiError> {
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
    let action = format!(
        "{}.{}",
        layer.noun(),
        if enabled { "enable" } else { "disable" }
    );
    let target = format!("{}/{id}", layer.as_str());
    audit_admin(
        &state,
        &admin,
        &action,
        target,
        Some(json!({"enabled": was_enabled})),
        Some(json!({"enabled": enabled})),
    )
    .await?;
    Ok(Json(Toggled {
        kind: layer.as_str(),
        id,
        enabled,
        was_enabled,
    }))
}
