//! The filter's per-request check. One read of the store, no cache.

use std::time::Instant;

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use mcpguard_core::check::{CHECK_PATH, CheckRequest, CheckResponse, Credential};
use mcpguard_core::token::TokenHash;

use crate::AppState;
use crate::config::CheckDeadline;
use crate::error::ApiError;
use crate::extract::Json;
use crate::store::{self, audit::Event, check};

pub fn routes() -> Router<AppState> {
    Router::new().route(CHECK_PATH, post(run))
}

async fn run(
    State(state): State<AppState>,
    deadline: Option<Extension<CheckDeadline>>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<CheckResponse>, ApiError> {
    let started = Instant::now();
    let presented = match &req.credential {
        Credential::ApiToken { hash } => Some(TokenHash::from_hex(hash).ok_or_else(|| {
            ApiError::bad_request("invalid_hash", "credential.hash must be 64 hex digits")
        })?),
        Credential::Oauth { .. } => None,
    };
    // No answer from the database in time, or an error: 503, which the filter turns
    // into a refusal (`policy_unavailable`). Fail closed, and fast.
    let deadline = deadline.map(|Extension(d)| d).unwrap_or_default().0;
    let credential = match &req.credential {
        Credential::ApiToken { hash } => check::Lookup::ApiToken(hash),
        Credential::Oauth { grant, .. } => check::Lookup::Grant(*grant),
    };
    let row = match state
        .check_reads
        .load(credential, &req.server, deadline)
        .await
    {
        Ok(row) => row,
        Err(e) => {
            tracing::warn!(error = %e, request_id = ?req.request_id, "check: no answer from the store; refusing");
            return Err(ApiError::Unavailable);
        }
    };
    let now = store::now_ms();
    let decision = match (&req.credential, &presented) {
        (Credential::Oauth { connection, .. }, _) => check::decide_oauth(
            row.as_ref(),
            *connection,
            &req.gateway,
            state.secrets.opener(),
        ),
        (_, Some(presented)) => check::decide(
            row.as_ref(),
            presented,
            &req.gateway,
            now,
            state.secrets.opener(),
        ),
        (_, None) => CheckResponse::Deny {
            code: mcpguard_core::check::DenyCode::TokenUnknown,
        },
    };
    let (action, code) = match &decision {
        CheckResponse::Allow { .. } => ("allow", None),
        CheckResponse::Deny { code } => ("deny", Some(code.as_str())),
    };
    if let (CheckResponse::Allow { .. }, Some(row)) = (&decision, &row) {
        // An OAuth row's id is its grant's, not an API token's.
        let token = presented.is_some().then_some(row.token_id);
        state.usage.record(token, row.connection_id);
    }
    tracing::debug!(gateway = %req.gateway, server = %req.server, action, code, connection_id = ?row.as_ref().map(|r| r.connection_id), request_id = ?req.request_id, "check");
    state.audit.decision(Event {
        at: now,
        kind: "decision".into(),
        action: action.into(),
        code: code.map(str::to_owned),
        host_id: row.as_ref().map(|r| r.host_id),
        user_id: row.as_ref().map(|r| r.user_id),
        connection_id: row.as_ref().map(|r| r.connection_id),
        gateway: Some(req.gateway),
        server: Some(req.server),
        mcp_method: req.mcp_method,
        tool: req.tool,
        latency_us: i64::try_from(started.elapsed().as_micros()).ok(),
        request_id: req.request_id,
        ..Event::default()
    });
    Ok(Json(decision))
}
