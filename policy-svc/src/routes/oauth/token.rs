//! The token endpoint: the authorization code grant (PKCE S256) and the refresh grant
//! (rotation, and reuse detection that revokes the whole grant), answering with an
//! access token signed for the granted resource (RFC 8707) and a new refresh token.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mcpguard_core::oauth::{self as core_oauth, AccessClaims};
use mcpguard_core::token::{TokenHash, TokenKind, parse_token};

use super::error::OauthError;
use super::{Params, form_params};
use crate::AppState;
use crate::pages::no_store;
use crate::secrets::{self, ct_eq, random_id};
use crate::store::{now_ms, oauth as db};

pub(super) async fn token(
    State(state): State<AppState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, OauthError> {
    let p = form_params(form).ok_or_else(|| {
        OauthError::invalid_request("send application/x-www-form-urlencoded parameters")
    })?;
    match p
        .required("grant_type")
        .map_err(OauthError::invalid_request)?
    {
        "authorization_code" => exchange(&state, &p).await,
        "refresh_token" => refresh(&state, &p).await,
        _ => Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )),
    }
}

async fn exchange(state: &AppState, p: &Params) -> Result<Response, OauthError> {
    let req = |n| p.required(n).map_err(OauthError::invalid_request);
    let (code, client_id, redirect_uri, verifier) = (
        req("code")?,
        req("client_id")?,
        req("redirect_uri")?,
        req("code_verifier")?,
    );
    let resource = p.get("resource").map_err(OauthError::invalid_request)?;
    let presented = TokenHash::of(code);
    let row = db::get_code(&state.db, &presented.to_hex())
        .await?
        .filter(|c| TokenHash::from_hex(&c.code_hash).is_some_and(|h| h.ct_eq(&presented)))
        .ok_or_else(|| OauthError::invalid_grant("unknown authorization code"))?;
    if !ct_eq(&row.client_id, client_id) {
        return Err(OauthError::invalid_grant(
            "the code was issued to another client",
        ));
    }
    if row.used_at.is_some() {
        return Err(replayed_code(state, &row).await);
    }
    if row.expires_at <= now_ms() {
        return Err(OauthError::invalid_grant(
            "the authorization code has expired",
        ));
    }
    if row.redirect_uri != redirect_uri {
        return Err(OauthError::invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    if resource.is_some_and(|r| r != row.resource) {
        return Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "resource differs from the authorization request",
        ));
    }
    if !core_oauth::pkce_matches(verifier, &row.code_challenge) {
        return Err(OauthError::invalid_grant(
            "code_verifier does not match the code_challenge",
        ));
    }
    let refresh_token = secrets::mint(TokenKind::Refresh).map_err(OauthError::server_error)?;
    let issued = db::exchange_code(
        &state.db,
        &row,
        &TokenHash::of(&refresh_token).to_hex(),
        state.oauth.refresh_token_ttl_ms,
    )
    .await?;
    let Some(issued) = issued else {
        // Used between our read and our write: the same replay, raced.
        let row = db::get_code(&state.db, &presented.to_hex())
            .await?
            .unwrap_or(row);
        return Err(replayed_code(state, &row).await);
    };
    tracing::info!(
        grant_id = issued.grant_id,
        client_id,
        "oauth code exchanged"
    );
    crate::metrics::get().oauth(crate::metrics::OauthEvent::CodeExchange);
    let claims = Claims {
        client_id,
        user_id: row.user_id,
        connection_id: row.connection_id,
        grant_id: issued.grant_id,
        resource: &row.resource,
    };
    token_response(state, &claims, &refresh_token, row.scope.as_deref()).await
}

/// A code presented twice may have been stolen: revoke what it produced.
async fn replayed_code(state: &AppState, row: &db::Code) -> OauthError {
    if let Some(grant) = row.grant_id {
        tracing::warn!(
            grant_id = grant,
            "oauth: authorization code reused; grant revoked"
        );
        crate::metrics::get().oauth(crate::metrics::OauthEvent::ReuseDetected);
        if let Err(e) = db::revoke_grant(&state.db, grant).await {
            return OauthError::from(e);
        }
    }
    OauthError::invalid_grant("the authorization code was already used")
}

async fn refresh(state: &AppState, p: &Params) -> Result<Response, OauthError> {
    let req = |n| p.required(n).map_err(OauthError::invalid_request);
    let (token, client_id) = (req("refresh_token")?, req("client_id")?);
    let resource = p.get("resource").map_err(OauthError::invalid_request)?;
    if parse_token(token) != Ok(TokenKind::Refresh) {
        return Err(OauthError::invalid_grant("not a refresh token"));
    }
    let presented = TokenHash::of(token);
    let row = db::get_refresh(&state.db, &presented.to_hex())
        .await?
        .filter(|r| TokenHash::from_hex(&r.token_hash).is_some_and(|h| h.ct_eq(&presented)))
        .ok_or_else(|| OauthError::invalid_grant("unknown refresh token"))?;
    if !ct_eq(&row.client_id, client_id) {
        return Err(OauthError::invalid_grant(
            "the refresh token was issued to another client",
        ));
    }
    if row.grant_revoked_at.is_some() {
        return Err(OauthError::invalid_grant("the grant was revoked"));
    }
    if row.used_at.is_some() {
        return Err(reused_refresh(state, row.grant_id).await);
    }
    if row.expires_at <= now_ms() {
        return Err(OauthError::invalid_grant("the refresh token has expired"));
    }
    if resource.is_some_and(|r| r != row.resource) {
        return Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "a refresh token only serves the resource it was granted for",
        ));
    }
    let next = secrets::mint(TokenKind::Refresh).map_err(OauthError::server_error)?;
    let rotated = db::rotate_refresh(
        &state.db,
        &row,
        &TokenHash::of(&next).to_hex(),
        state.oauth.refresh_token_ttl_ms,
    )
    .await?;
    if rotated.is_none() {
        return Err(reused_refresh(state, row.grant_id).await);
    }
    crate::metrics::get().oauth(crate::metrics::OauthEvent::Refresh);
    let claims = Claims {
        client_id,
        user_id: row.user_id,
        connection_id: row.connection_id,
        grant_id: row.grant_id,
        resource: &row.resource,
    };
    token_response(state, &claims, &next, row.scope.as_deref()).await
}

/// A rotated refresh token presented again: someone holds a copy. Revoke the family.
async fn reused_refresh(state: &AppState, grant_id: i64) -> OauthError {
    tracing::warn!(
        grant_id,
        "oauth: refresh token reused; the whole grant is revoked"
    );
    crate::metrics::get().oauth(crate::metrics::OauthEvent::ReuseDetected);
    if let Err(e) = db::revoke_grant(&state.db, grant_id).await {
        return OauthError::from(e);
    }
    OauthError::invalid_grant("the refresh token was already used; the grant is revoked")
}

struct Claims<'a> {
    client_id: &'a str,
    user_id: i64,
    connection_id: i64,
    grant_id: i64,
    resource: &'a str,
}

async fn token_response(
    state: &AppState,
    c: &Claims<'_>,
    refresh_token: &str,
    scope: Option<&str>,
) -> Result<Response, OauthError> {
    let now = now_ms() / 1000;
    let claims = AccessClaims {
        iss: state.oauth.issuer.clone(),
        aud: c.resource.to_owned(),
        sub: c.user_id.to_string(),
        exp: now + state.oauth.access_token_ttl_secs,
        iat: now,
        jti: random_id().map_err(OauthError::server_error)?,
        client_id: c.client_id.to_owned(),
        gid: c.grant_id,
        cid: c.connection_id,
    };
    let access_token = state
        .signer
        .sign(&state.db, &state.secrets, &claims)
        .await
        .map_err(OauthError::server_error)?;
    let mut body = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.oauth.access_token_ttl_secs,
        "refresh_token": refresh_token,
    });
    if let Some(scope) = scope {
        body["scope"] = scope.into();
    }
    Ok(no_store(axum::Json(body).into_response()))
}
