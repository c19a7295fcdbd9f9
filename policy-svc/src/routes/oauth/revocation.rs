//! Token revocation (RFC 7009): a client revokes the grant behind one of its refresh
//! or access tokens; every other token gets the same answer and changes nothing.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mcpguard_core::jwt::{self, Keys};
use mcpguard_core::token::{TokenHash, TokenKind, parse_token};

use super::error::OauthError;
use super::form_params;
use crate::AppState;
use crate::pages::no_store;
use crate::secrets::ct_eq;
use crate::store::{now_ms, oauth as db};

pub(super) async fn revoke(
    State(state): State<AppState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, OauthError> {
    let p = form_params(form).ok_or_else(|| {
        OauthError::invalid_request("send application/x-www-form-urlencoded parameters")
    })?;
    let token = p.required("token").map_err(OauthError::invalid_request)?;
    let client_id = p
        .required("client_id")
        .map_err(OauthError::invalid_request)?;
    let grant = if parse_token(token) == Ok(TokenKind::Refresh) {
        let presented = TokenHash::of(token);
        db::get_refresh(&state.db, &presented.to_hex())
            .await?
            .filter(|r| TokenHash::from_hex(&r.token_hash).is_some_and(|h| h.ct_eq(&presented)))
            .filter(|r| ct_eq(&r.client_id, client_id))
            .map(|r| r.grant_id)
    } else {
        verified_access_token_grant(&state, token).await?
    };
    if let Some(grant) = grant {
        // A client may only revoke its own tokens (RFC 7009 §2.1).
        if db::grant_client(&state.db, grant)
            .await?
            .is_some_and(|c| ct_eq(&c, client_id))
        {
            db::revoke_grant(&state.db, grant).await?;
            tracing::info!(grant_id = grant, "oauth grant revoked by its client");
        }
    }
    // Unknown and foreign tokens get the same answer (RFC 7009 §2.2).
    Ok(no_store(StatusCode::OK.into_response()))
}

/// The grant of an access token this service signed (any published key), if it is
/// valid: verified by `mcpguard_core::jwt`, as the filter and ext_authz verify it, for
/// whatever resource it was granted.
async fn verified_access_token_grant(
    state: &AppState,
    token: &str,
) -> Result<Option<i64>, OauthError> {
    if !jwt::looks_like_jwt(token) {
        return Ok(None);
    }
    let published = db::published_keys(&state.db, state.oauth.max_token_age_ms()).await?;
    let Ok(keys) = Keys::from_value(&crate::keys::jwks(&published)) else {
        return Ok(None);
    };
    let now_s = now_ms() / 1000;
    Ok(
        jwt::verify_any_audience(token, &keys, &state.oauth.issuer, now_s)
            .ok()
            .map(|claims| claims.gid),
    )
}
