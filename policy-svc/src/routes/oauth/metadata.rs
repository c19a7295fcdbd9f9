//! The authorization server metadata (RFC 8414) and the JWKS of the published keys.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use mcpguard_core::oauth as core_oauth;

use super::error::OauthError;
use crate::store::oauth as db;
use crate::{AppState, keys};

pub(super) async fn metadata(State(state): State<AppState>) -> Response {
    axum::Json(core_oauth::authorization_server_metadata(
        &state.oauth.issuer,
    ))
    .into_response()
}

pub(super) async fn jwks(State(state): State<AppState>) -> Result<Response, OauthError> {
    let keys = db::published_keys(&state.db, state.oauth.max_token_age_ms()).await?;
    Ok(axum::Json(keys::jwks(&keys)).into_response())
}
