//! Who may connect: teams, their members, and the gateways granted to them. A user
//! connects (OAuth consent, an enrollment, a token made for them) only to a gateway
//! one of their teams is granted, and the check refuses every other request with
//! `gateway_not_granted`. Nothing here deletes a connection: granting again restores it.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::{StoreError, catalog, teams, users};

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::TeamsManage);
    let grants = Some(Capability::GatewaysManage);
    vec![
        endpoint(Verb::Post, "/api/v1/teams", manage, create),
        // Teams are people: listed to whoever may read the users.
        endpoint(
            Verb::Get,
            "/api/v1/teams",
            Some(Capability::UsersRead),
            list,
        ),
        endpoint(Verb::Delete, "/api/v1/teams/{id}", manage, delete),
        endpoint(
            Verb::Put,
            "/api/v1/teams/{id}/members/{user_id}",
            manage,
            add_member,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/teams/{id}/members/{user_id}",
            manage,
            remove_member,
        ),
        endpoint(
            Verb::Get,
            "/api/v1/gateways/{id}/teams",
            Some(Capability::GatewaysRead),
            gateway_teams,
        ),
        endpoint(
            Verb::Put,
            "/api/v1/gateways/{id}/teams/{team_id}",
            grants,
            grant,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/gateways/{id}/teams/{team_id}",
            grants,
            revoke,
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTeam {
    name: String,
}

async fn create(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewTeam>,
) -> Result<(StatusCode, Json<teams::Team>), ApiError> {
    let name = super::validate_name(&body.name)?;
    let team = match teams::create(&state.db, name).await {
        Ok(team) => team,
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::conflict(
                "team_name_taken",
                format!("a team named {name:?} exists"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    audit_admin(
        &state,
        &admin,
        "team.create",
        format!("teams/{}", team.id),
        None,
        state_of(&team),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(team)))
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<teams::Team>>, ApiError> {
    Ok(Json(teams::list(&state.db).await?))
}

async fn delete(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let team = editable_team(&state, id).await?;
    if !teams::delete(&state.db, id).await? {
        return Err(ApiError::NotFound("team"));
    }
    audit_admin(
        &state,
        &admin,
        "team.delete",
        format!("teams/{id}"),
        state_of(&team),
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The team `id`, refused when it is `everyone`, whose members are every user and
/// which always exists.
async fn editable_team(state: &AppState, id: i64) -> Result<teams::Team, ApiError> {
    let team = teams::get(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("team"))?;
    if team.everyone.0 {
        return Err(ApiError::conflict(
            "everyone_team",
            "the everyone team holds every user and cannot be changed or deleted; take its \
             grant from a gateway to restrict that gateway instead",
        ));
    }
    Ok(team)
}

async fn add_member(
    State(state): State<AppState>,
    admin: Admin,
    Path((id, user_id)): Path<(i64, i64)>,
) -> Result<Json<teams::Team>, ApiError> {
    let before = editable_team(&state, id).await?;
    if !users::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    teams::add_member(&state.db, id, user_id).await?;
    changed_team(&state, &admin, before, "team.member_add").await
}

async fn remove_member(
    State(state): State<AppState>,
    admin: Admin,
    Path((id, user_id)): Path<(i64, i64)>,
) -> Result<Json<teams::Team>, ApiError> {
    let before = editable_team(&state, id).await?;
    if !teams::remove_member(&state.db, id, user_id).await? {
        return Err(ApiError::NotFound("member"));
    }
    tracing::info!(
        team_id = id,
        user_id,
        actor = admin.user_id,
        "user left a team"
    );
    changed_team(&state, &admin, before, "team.member_remove").await
}

/// Audits a change to a team (its members or grants) and answers the team after it.
async fn changed_team(
    state: &AppState,
    admin: &Admin,
    before: teams::Team,
    action: &str,
) -> Result<Json<teams::Team>, ApiError> {
    let after = teams::get(&state.db, before.id)
        .await?
        .ok_or(ApiError::NotFound("team"))?;
    audit_admin(
        state,
        admin,
        action,
        format!("teams/{}", before.id),
        state_of(&before),
        state_of(&after),
    )
    .await?;
    Ok(Json(after))
}

async fn gateway_teams(
    State(state): State<AppState>,
    Path(gateway_id): Path<i64>,
) -> Result<Json<Vec<teams::Team>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    Ok(Json(teams::of_gateway(&state.db, gateway_id).await?))
}

async fn grant(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, team_id)): Path<(i64, i64)>,
) -> Result<Json<Vec<teams::Team>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    if teams::get(&state.db, team_id).await?.is_none() {
        return Err(ApiError::NotFound("team"));
    }
    let before = teams::of_gateway(&state.db, gateway_id).await?;
    teams::grant(&state.db, gateway_id, team_id).await?;
    granted(&state, &admin, gateway_id, before, "gateway.grant").await
}

async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, team_id)): Path<(i64, i64)>,
) -> Result<Json<Vec<teams::Team>>, ApiError> {
    require_gateway(&state, gateway_id).await?;
    let before = teams::of_gateway(&state.db, gateway_id).await?;
    if !teams::revoke(&state.db, gateway_id, team_id).await? {
        return Err(ApiError::NotFound("grant"));
    }
    tracing::info!(
        gateway_id,
        team_id,
        actor = admin.user_id,
        "gateway grant taken from a team"
    );
    granted(&state, &admin, gateway_id, before, "gateway.revoke").await
}

/// Audits a change to a gateway's grants and answers the teams granted it after.
async fn granted(
    state: &AppState,
    admin: &Admin,
    gateway_id: i64,
    before: Vec<teams::Team>,
    action: &str,
) -> Result<Json<Vec<teams::Team>>, ApiError> {
    let after = teams::of_gateway(&state.db, gateway_id).await?;
    let ids =
        |teams: &[teams::Team]| json!({"teams": teams.iter().map(|t| t.id).collect::<Vec<_>>()});
    audit_admin(
        state,
        admin,
        action,
        format!("gateways/{gateway_id}/teams"),
        Some(ids(&before)),
        Some(ids(&after)),
    )
    .await?;
    Ok(Json(after))
}

async fn require_gateway(state: &AppState, id: i64) -> Result<(), ApiError> {
    if catalog::gateway_exists(&state.db, id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound("gateway"))
    }
}
