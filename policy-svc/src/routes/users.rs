//! Users, roles (named sets of capabilities) and personal admin tokens.

use axum::extract::State;
use axum::http::StatusCode;
use mcpguard_core::token::{TokenHash, TokenKind, display_prefix};
use serde::{Deserialize, Serialize};

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::auth::{Admin, Capability, Scope};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::identities::{ServerCredential, save_identity};
use crate::store::{StoreError, catalog, identities, users as store};
use crate::{AppState, secrets};

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::UsersManage);
    let read = Some(Capability::UsersRead);
    vec![
        endpoint(Verb::Get, "/api/v1/me", None, me).scope(Scope::Caller),
        endpoint(Verb::Get, "/api/v1/capabilities", None, capabilities).scope(Scope::Caller),
        endpoint(Verb::Post, "/api/v1/roles", manage, create_role),
        endpoint(Verb::Get, "/api/v1/roles", read, list_roles),
        endpoint(Verb::Put, "/api/v1/roles/{id}", manage, update_role),
        endpoint(Verb::Post, "/api/v1/users", manage, create_user),
        endpoint(Verb::Get, "/api/v1/users", read, list_users),
        endpoint(
            Verb::Post,
            "/api/v1/users/{id}/admin-tokens",
            manage,
            create_admin_token,
        ),
        endpoint(
            Verb::Get,
            "/api/v1/users/{id}/admin-tokens",
            manage,
            list_admin_tokens,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/admin-tokens/{id}",
            manage,
            revoke_admin_token,
        ),
        endpoint(
            Verb::Put,
            "/api/v1/users/{id}/identities/{server_id}",
            manage,
            put_identity,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/users/{id}/identities/{server_id}",
            manage,
            delete_identity,
        ),
        endpoint(
            Verb::Put,
            "/api/v1/users/{id}/password",
            manage,
            set_password,
        ),
        // Metadata only (never a credential); `identities.toggle` needs the ids.
        endpoint(
            Verb::Get,
            "/api/v1/users/{id}/identities",
            read,
            list_identities,
        ),
    ]
}

/// The caller as the admin API sees it: who, with which role and capabilities (the
/// reads they imply included), and the host its token is bound to. The one call a
/// token with no capability can make that returns data, and that data is its own.
#[derive(Serialize)]
struct Me {
    user: store::User,
    role: MeRole,
    capabilities: Vec<&'static str>,
    admin_token: store::AdminToken,
}

#[derive(Serialize)]
struct MeRole {
    id: i64,
    name: String,
}

async fn me(State(state): State<AppState>, admin: Admin) -> Result<Json<Me>, ApiError> {
    // Gone since the gate authenticated it: answer as the gate would now.
    let user = store::get_user(&state.db, admin.user_id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    let role = store::get_role(&state.db, user.role_id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    let admin_token = store::get_admin_token(&state.db, admin.token_id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    Ok(Json(Me {
        role: MeRole {
            id: role.id,
            name: role.name,
        },
        user,
        capabilities: admin.capabilities.iter().map(|c| c.as_str()).collect(),
        admin_token,
    }))
}

async fn capabilities() -> Json<Vec<&'static str>> {
    Json(Capability::ALL.iter().map(|c| c.as_str()).collect())
}

fn parse_capabilities(names: &[String]) -> Result<Vec<Capability>, ApiError> {
    names
        .iter()
        .map(|n| {
            Capability::parse(n).ok_or_else(|| {
                ApiError::unprocessable(
                    "unknown_capability",
                    format!("{n:?} is not a capability; see GET /api/v1/capabilities"),
                )
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRole {
    name: String,
    capabilities: Vec<String>,
}

async fn create_role(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewRole>,
) -> Result<(StatusCode, Json<store::Role>), ApiError> {
    let name = super::validate_name(&body.name)?;
    let caps = parse_capabilities(&body.capabilities)?;
    let role = match store::create_role(&state.db, name, &caps).await {
        Ok(role) => role,
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::conflict(
                "name_taken",
                format!("a role named {name:?} exists"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    audit_admin(
        &state,
        &admin,
        "role.create",
        format!("roles/{}", role.id),
        None,
        state_of(&role),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(role)))
}

async fn list_roles(State(state): State<AppState>) -> Result<Json<Vec<store::Role>>, ApiError> {
    Ok(Json(store::list_roles(&state.db).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleUpdate {
    capabilities: Vec<String>,
}

async fn update_role(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
    Json(body): Json<RoleUpdate>,
) -> Result<Json<store::Role>, ApiError> {
    let caps = parse_capabilities(&body.capabilities)?;
    let before = store::get_role(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("role"))?;
    let role = store::set_role_capabilities(&state.db, id, &caps)
        .await?
        .ok_or(ApiError::NotFound("role"))?;
    audit_admin(
        &state,
        &admin,
        "role.update",
        format!("roles/{id}"),
        state_of(&before),
        state_of(&role),
    )
    .await?;
    Ok(Json(role))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    role_id: i64,
}

async fn create_user(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewUser>,
) -> Result<(StatusCode, Json<store::User>), ApiError> {
    let name = super::validate_name(&body.name)?;
    if store::get_role(&state.db, body.role_id).await?.is_none() {
        return Err(ApiError::unprocessable(
            "unknown_role",
            "role_id names no role",
        ));
    }
    let user = match store::create_user(&state.db, name, body.role_id).await {
        Ok(user) => user,
        Err(StoreError::Conflict(_)) => {
            return Err(ApiError::conflict(
                "name_taken",
                format!("a user named {name:?} exists"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    audit_admin(
        &state,
        &admin,
        "user.create",
        format!("users/{}", user.id),
        None,
        state_of(&user),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn list_users(State(state): State<AppState>) -> Result<Json<Vec<store::User>>, ApiError> {
    Ok(Json(store::list_users(&state.db).await?))
}

/// The one response that ever holds an admin token's secret.
#[derive(Serialize)]
struct IssuedAdminToken {
    #[serde(flatten)]
    meta: store::AdminToken,
    token: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewAdminToken {
    /// Binds the token to one token-based host (an agent's own credential): it then
    /// reaches only that host's tokens and enrollments.
    #[serde(default)]
    host_id: Option<i64>,
}

/// The body of `POST …/admin-tokens`: none, `{}` or `{"host_id": …}`.
fn new_admin_token(body: &[u8]) -> Result<NewAdminToken, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(NewAdminToken::default());
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable("invalid_body", e.to_string()),
        _ => ApiError::bad_request("invalid_json", e.to_string()),
    })
}

async fn create_admin_token(
    State(state): State<AppState>,
    admin: Admin,
    Path(user_id): Path<i64>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<IssuedAdminToken>), ApiError> {
    let body = new_admin_token(&body)?;
    if !store::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    if let Some(host_id) = body.host_id {
        match crate::store::hosts::get_host(&state.db, host_id).await? {
            None => {
                return Err(ApiError::unprocessable(
                    "unknown_host",
                    "host_id names no host",
                ));
            }
            Some(host) if host.kind != "token" => {
                return Err(ApiError::conflict(
                    "host_not_token_based",
                    "only a token-based host has tokens and enrollments to bind an admin token to",
                ));
            }
            Some(_) => {}
        }
    }
    let token = secrets::mint(TokenKind::Admin).map_err(ApiError::no_randomness)?;
    let meta = store::insert_admin_token(
        &state.db,
        user_id,
        &TokenHash::of(&token).to_hex(),
        display_prefix(&token),
        body.host_id,
    )
    .await?;
    audit_admin(
        &state,
        &admin,
        "admin_token.create",
        format!("admin-tokens/{}", meta.id),
        None,
        state_of(&meta),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(IssuedAdminToken { meta, token })))
}

async fn list_admin_tokens(
    State(state): State<AppState>,
    Path(user_id): Path<i64>,
) -> Result<Json<Vec<store::AdminToken>>, ApiError> {
    if !store::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    Ok(Json(store::list_admin_tokens(&state.db, user_id).await?))
}

async fn revoke_admin_token(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    if !store::revoke_admin_token(&state.db, id).await? {
        return Err(ApiError::NotFound("admin_token"));
    }
    audit_admin(
        &state,
        &admin,
        "admin_token.revoke",
        format!("admin-tokens/{id}"),
        None,
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityBody {
    credential: ServerCredential,
}

async fn put_identity(
    State(state): State<AppState>,
    admin: Admin,
    Path((user_id, server_id)): Path<(i64, i64)>,
    Json(body): Json<IdentityBody>,
) -> Result<Json<identities::Identity>, ApiError> {
    let (header, value) = body.credential.into_header()?;
    if !store::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    if !catalog::server_exists(&state.db, server_id).await? {
        return Err(ApiError::NotFound("server"));
    }
    let identity =
        save_identity(&state, admin.user_id, user_id, server_id, (header, value)).await?;
    Ok(Json(identity))
}

/// Deletes a user's identity for a server: one connected by OAuth is first revoked at
/// its authorization server (RFC 7009, where it offers revocation; best effort).
async fn delete_identity(
    State(state): State<AppState>,
    admin: Admin,
    Path((user_id, server_id)): Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    let identity = identities::list_for_user(&state.db, user_id)
        .await?
        .into_iter()
        .find(|i| i.server_id == server_id)
        .ok_or(ApiError::NotFound("identity"))?;
    crate::oauth_identity::revoke(&state, identity.id).await;
    if identities::delete(&state.db, identity.id).await? {
        audit_admin(
            &state,
            &admin,
            "identity.delete",
            format!("identities/{}", identity.id),
            state_of(&identity),
            None,
        )
        .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_identities(
    State(state): State<AppState>,
    Path(user_id): Path<i64>,
) -> Result<Json<Vec<identities::Identity>>, ApiError> {
    if !store::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    Ok(Json(identities::list_for_user(&state.db, user_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

/// Sets the password a user signs in with on the OAuth pages, and signs the user out
/// everywhere: their sign-in sessions end and their OAuth grants are revoked. The
/// password is never returned, logged or audited; only its argon2id hash is stored.
async fn set_password(
    State(state): State<AppState>,
    admin: Admin,
    Path(user_id): Path<i64>,
    Json(body): Json<PasswordBody>,
) -> Result<StatusCode, ApiError> {
    if !crate::signin::is_settable_password(&body.password) {
        return Err(ApiError::unprocessable(
            "invalid_password",
            "a password is 12 to 1024 printable characters",
        ));
    }
    if !store::user_exists(&state.db, user_id).await? {
        return Err(ApiError::NotFound("user"));
    }
    // The same bound on concurrent hashes as sign-in: 503 `busy` beyond it.
    let admitted = state.passwords.admit().map_err(|_| ApiError::Busy)?;
    let hash = admitted
        .hash(body.password)
        .await
        .map_err(|_| ApiError::Busy)?
        .map_err(|e| {
            tracing::error!(error = %e, "could not hash a password");
            ApiError::Unavailable
        })?;
    // Sessions and OAuth grants opened with the old password end with it.
    if !crate::store::signin::set_password(&state.db, user_id, &hash).await? {
        return Err(ApiError::NotFound("user"));
    }
    audit_admin(
        &state,
        &admin,
        "user.set_password",
        format!("users/{user_id}"),
        None,
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
