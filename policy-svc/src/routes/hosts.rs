//! Token-based hosts and their API access tokens.

use axum::extract::State;
use axum::http::StatusCode;
use mcpguard_core::token::{TokenHash, TokenKind, display_prefix};
use serde::{Deserialize, Serialize};

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::AppState;
use crate::auth::{Admin, Capability, HostOf, Scope};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::{catalog, enrollments, hosts, identities, now_ms, teams, users};
use crate::{secrets, timefmt};

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::TokensManage);
    let own_host = Scope::Host(HostOf::Host);
    vec![
        endpoint(Verb::Post, "/api/v1/hosts", manage, create),
        endpoint(
            Verb::Get,
            "/api/v1/hosts",
            Some(Capability::HostsRead),
            list,
        ),
        endpoint(
            Verb::Post,
            "/api/v1/hosts/{id}/tokens",
            manage,
            create_token,
        )
        .scope(own_host),
        endpoint(Verb::Get, "/api/v1/hosts/{id}/tokens", manage, list_tokens).scope(own_host),
        endpoint(Verb::Delete, "/api/v1/tokens/{id}", manage, revoke_token)
            .scope(Scope::Host(HostOf::Token)),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHost {
    name: String,
}

async fn create(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewHost>,
) -> Result<(StatusCode, Json<hosts::Host>), ApiError> {
    let name = super::validate_name(&body.name)?;
    let host = hosts::create_token_host(&state.db, name).await?;
    audit_admin(
        &state,
        &admin,
        "host.create",
        format!("hosts/{}", host.id),
        None,
        state_of(&host),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(host)))
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<hosts::Host>>, ApiError> {
    Ok(Json(hosts::list_hosts(&state.db).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    gateway_id: i64,
    /// Whose connection the token is for; the caller by default.
    #[serde(default)]
    user_id: Option<i64>,
    /// RFC 3339; no expiry by default.
    #[serde(default)]
    expires_at: Option<String>,
}

/// The one response that ever holds the secret.
#[derive(Serialize)]
pub(super) struct IssuedToken {
    #[serde(flatten)]
    meta: hosts::ApiToken,
    token: String,
    /// Per-user servers on this gateway the token's user has no identity for yet: each
    /// refuses the token (`identity_missing`) until one is saved.
    missing_identities: Vec<identities::Missing>,
}

/// Refuses a (host, gateway, user) that cannot have a token-based connection: no such
/// host (404), a headed host (409), no such gateway or user (422), a user no team of
/// whom is granted the gateway (403 `gateway_not_granted`).
pub(super) async fn connection_target(
    state: &AppState,
    host_id: i64,
    gateway_id: i64,
    user_id: i64,
) -> Result<(), ApiError> {
    let host = hosts::get_host(&state.db, host_id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    if host.kind != "token" {
        return Err(ApiError::conflict(
            "host_not_token_based",
            "API tokens are for token-based hosts; headed hosts connect with OAuth",
        ));
    }
    if !catalog::gateway_exists(&state.db, gateway_id).await? {
        return Err(ApiError::unprocessable(
            "unknown_gateway",
            "gateway_id names no gateway",
        ));
    }
    if !users::user_exists(&state.db, user_id).await? {
        return Err(ApiError::unprocessable(
            "unknown_user",
            "user_id names no user",
        ));
    }
    // Who may connect: only to a gateway one of the user's teams is granted. The
    // check asks again on every request, so this refusal only spares making a token
    // or an enrollment that could not be used.
    if !teams::user_granted(&state.db, user_id, gateway_id).await? {
        return Err(ApiError::forbidden(
            "gateway_not_granted",
            format!(
                "none of user {user_id}'s teams is granted gateway {gateway_id}: grant it to \
                 one of their teams first"
            ),
        ));
    }
    Ok(())
}

/// A token acts as its user: on shared servers and in the audit log always, and with
/// the user's own identity on per-user servers. So only the user may make one for
/// themselves (the caller), or the user consented by completing an enrollment for this
/// host and gateway; `tokens.manage` alone is not consent. Required for every other
/// user, whether or not the gateway has per-user servers today (one exposed tomorrow
/// would inject that user's identity through a token made without them).
async fn require_consent(
    state: &AppState,
    admin: &Admin,
    host_id: i64,
    gateway_id: i64,
    user_id: i64,
) -> Result<(), ApiError> {
    if user_id == admin.user_id
        || enrollments::consented(&state.db, host_id, gateway_id, user_id).await?
    {
        return Ok(());
    }
    tracing::warn!(
        actor = admin.user_id,
        user_id,
        host_id,
        gateway_id,
        "token for another user refused: no consent"
    );
    Err(ApiError::forbidden(
        "consent_required",
        format!(
            "user {user_id} has not consented to host {host_id} acting for them on gateway \
             {gateway_id}: create an enrollment (POST /api/v1/hosts/{host_id}/enrollments) \
             and have the user complete it, then claim its token; or leave out user_id to \
             make a token for yourself"
        ),
    ))
}

async fn create_token(
    State(state): State<AppState>,
    admin: Admin,
    Path(host_id): Path<i64>,
    Json(body): Json<NewToken>,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    let user_id = body.user_id.unwrap_or(admin.user_id);
    connection_target(&state, host_id, body.gateway_id, user_id).await?;
    require_consent(&state, &admin, host_id, body.gateway_id, user_id).await?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(s) => {
            let t = timefmt::parse_rfc3339(s).ok_or_else(|| {
                ApiError::unprocessable("invalid_expires_at", "expires_at must be RFC 3339")
            })?;
            if t <= now_ms() {
                return Err(ApiError::unprocessable(
                    "invalid_expires_at",
                    "expires_at is in the past",
                ));
            }
            Some(t)
        }
    };
    let token = secrets::mint(TokenKind::HostApi).map_err(ApiError::no_randomness)?;
    let connection_id = hosts::connect(&state.db, host_id, body.gateway_id, user_id).await?;
    let hash = TokenHash::of(&token).to_hex();
    let meta = hosts::insert_token(
        &state.db,
        &hosts::NewToken {
            connection_id,
            token_hash: &hash,
            prefix: display_prefix(&token),
            created_by: admin.user_id,
            expires_at,
        },
    )
    .await?;
    issued(&state, &admin, meta, token).await
}

/// Audits a token just issued and answers with it: the one response that ever holds
/// the secret, which is written nowhere else (the audit entry holds the metadata).
pub(super) async fn issued(
    state: &AppState,
    admin: &Admin,
    meta: hosts::ApiToken,
    token: String,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    tracing::info!(token_id = meta.id, host_id = meta.host_id, connection_id = meta.connection_id, prefix = %meta.prefix, "API token issued");
    audit_admin(
        state,
        admin,
        "token.create",
        format!("tokens/{}", meta.id),
        None,
        state_of(&meta),
    )
    .await?;
    let missing_identities =
        identities::missing_on_gateway(&state.db, meta.gateway_id, meta.user_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedToken {
            meta,
            token,
            missing_identities,
        }),
    ))
}

async fn list_tokens(
    State(state): State<AppState>,
    Path(host_id): Path<i64>,
) -> Result<Json<Vec<hosts::ApiToken>>, ApiError> {
    hosts::get_host(&state.db, host_id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    Ok(Json(hosts::list_tokens(&state.db, host_id).await?))
}

async fn revoke_token(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let before = hosts::get_token(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("token"))?;
    if hosts::revoke_token(&state.db, id).await? {
        tracing::info!(token_id = id, "API token revoked");
        let after = hosts::get_token(&state.db, id).await?;
        audit_admin(
            &state,
            &admin,
            "token.revoke",
            format!("tokens/{id}"),
            state_of(&before),
            after.as_ref().and_then(state_of),
        )
        .await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("token"))
    }
}
