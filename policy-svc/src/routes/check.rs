//! The filter's per-request check. One read of the store, no cache.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use mcpguard_core::check::{CHECK_PATH, CheckRequest, CheckResponse, Credential};
use mcpguard_core::token::TokenHash;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::Json;
use crate::store::{self, check};

pub fn routes() -> Router<AppState> {
    Router::new().route(CHECK_PATH, post(run))
}

async fn run(
    State(state): State<AppState>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<CheckResponse>, ApiError> {
    let Credential::ApiToken { hash } = &req.credential;
    let presented = TokenHash::from_hex(hash).ok_or_else(|| {
        ApiError::bad_request("invalid_hash", "credential.hash must be 64 hex digits")
    })?;
    // A database error becomes a 500, which the filter turns into 503: fail closed.
    let row = check::load(&state.db, hash, &req.server).await?;
    let decision = check::decide(row.as_ref(), &presented, &req.gateway, store::now_ms());
    match (&decision, &row) {
        (CheckResponse::Allow { .. }, Some(row)) => {
            state.usage.record(row.token_id, row.connection_id);
            tracing::debug!(gateway = %req.gateway, server = %req.server, connection_id = row.connection_id, request_id = ?req.request_id, "allow");
        }
        (CheckResponse::Deny { code }, _) => {
            tracing::info!(gateway = %req.gateway, server = %req.server, code = code.as_str(), connection_id = ?row.as_ref().map(|r| r.connection_id), request_id = ?req.request_id, "deny");
        }
        (CheckResponse::Allow { .. }, None) => {}
    }
    Ok(Json(decision))
}
