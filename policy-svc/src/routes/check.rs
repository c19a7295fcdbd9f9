//! The filter's per-request check. One read of the store, no cache.

use std::time::Instant;

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use mcpguard_core::check::{
    CHECK_PATH, CheckRequest, CheckResponse, Credential, DenyCode, bounded_name, bounded_request_id,
};
use mcpguard_core::jwt;
use mcpguard_core::oauth::resource_url;
use mcpguard_core::token::TokenHash;

use super::ext_authz::{Presented, Unpresentable};
use crate::upstream_policy::Refused;

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
    // No answer from the database in time, or an error: 503, which the filter turns
    // into a refusal (`policy_unavailable`). Fail closed, and fast.
    let deadline = deadline.map(|Extension(d)| d).unwrap_or_default().0;
    let request_id = req.request_id.as_deref().map(bounded_request_id);
    let presented = match present(&state, &req, deadline).await? {
        Ok(presented) => presented,
        Err(code) => {
            let decision = CheckResponse::Deny { code };
            record(&state, &req, request_id, &decision, None, started);
            return Ok(Json(decision));
        }
    };
    let hex;
    let lookup = match &presented {
        Presented::ApiToken(hash) => {
            hex = hash.to_hex();
            check::Lookup::ApiToken(&hex)
        }
        Presented::Oauth { grant, .. } => check::Lookup::Grant(*grant),
    };
    let row = match state.check_reads.load(lookup, &req.server, deadline).await {
        Ok(row) => row,
        Err(e) => {
            tracing::warn!(error = %e, request_id = ?request_id, "check: no answer from the store; refusing");
            return Err(ApiError::Unavailable);
        }
    };
    let now = store::now_ms();
    let decision = match &presented {
        Presented::Oauth { connection, .. } => check::decide_oauth(
            row.as_ref(),
            *connection,
            &req.gateway,
            state.secrets.opener(),
        ),
        Presented::ApiToken(hash) => check::decide(
            row.as_ref(),
            hash,
            &req.gateway,
            now,
            state.secrets.opener(),
        ),
    };
    let decision = match decision {
        CheckResponse::Allow {
            mut upstream,
            inject,
        } => match pin(&state, &upstream.authority, deadline).await {
            Ok(address) => {
                upstream.address = Some(address.to_string());
                CheckResponse::Allow { upstream, inject }
            }
            Err(code) => CheckResponse::Deny { code },
        },
        deny => deny,
    };
    if let (CheckResponse::Allow { .. }, Some(row)) = (&decision, &row) {
        // An OAuth row's id is its grant's, not an API token's.
        let token = matches!(presented, Presented::ApiToken(_)).then_some(row.token_id);
        state.usage.record(token, row.connection_id);
    }
    record(&state, &req, request_id, &decision, row.as_ref(), started);
    Ok(Json(decision))
}

/// What the request's credential proves, before the store is asked: an API token's
/// hash, or an access token verified here as well (signature, issuer, expiry, and an
/// audience that is this request's MCP URL under one of `--resource-base-urls`).
/// `Ok(Err(code))` is a refusal to answer; `Err` a request that is not a check at all
/// (bad hash: 400) or a store that cannot give the keys (503).
async fn present(
    state: &AppState,
    req: &CheckRequest,
    deadline: std::time::Duration,
) -> Result<Result<Presented, DenyCode>, ApiError> {
    match &req.credential {
        Credential::ApiToken { hash } => {
            let hash = TokenHash::from_hex(hash).ok_or_else(|| {
                ApiError::bad_request("invalid_hash", "credential.hash must be 64 hex digits")
            })?;
            Ok(Ok(Presented::ApiToken(hash)))
        }
        Credential::Oauth { token, resource } => {
            let ours = state
                .oauth
                .resource_base_urls
                .iter()
                .any(|base| resource_url(base, &req.gateway, &req.server) == *resource);
            if !ours {
                return Ok(Err(DenyCode::TokenWrongGateway));
            }
            if !jwt::looks_like_jwt(token) {
                return Ok(Err(DenyCode::TokenMalformed));
            }
            match super::ext_authz::present(state, token, || resource.clone(), deadline).await {
                Ok(presented) => Ok(Ok(presented)),
                Err(Unpresentable::Refused(code)) => Ok(Err(code)),
                Err(Unpresentable::NoKeys(e)) => {
                    tracing::warn!(error = %e, request_id = ?req.request_id.as_deref().map(bounded_request_id), "check: no verification keys from the store; refusing");
                    Err(ApiError::Unavailable)
                }
            }
        }
    }
}

/// The address Envoy is to connect to for an upstream `host:port`: resolved now (an
/// address literal is not looked up) and judged by the upstream network policy, so
/// that what Envoy connects to is exactly what was judged, whatever the name resolves
/// to a moment later (DNS rebinding). IPv4 first, as Envoy's resolver would.
async fn pin(
    state: &AppState,
    authority: &str,
    deadline: std::time::Duration,
) -> Result<std::net::SocketAddr, DenyCode> {
    let resolved = tokio::time::timeout(deadline, state.upstreams.resolve_authority(authority));
    match resolved.await {
        Ok(Ok(addrs)) => addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or(DenyCode::UpstreamUnresolved),
        Ok(Err(Refused::Denied(denied))) => {
            tracing::warn!(authority, %denied, "check: the upstream resolves into a denied network; refusing");
            Err(DenyCode::UpstreamDenied)
        }
        Ok(Err(refused @ Refused::Unresolvable { .. })) => {
            tracing::warn!(authority, %refused, "check: the upstream does not resolve; refusing");
            Err(DenyCode::UpstreamUnresolved)
        }
        Err(_) => {
            tracing::warn!(
                authority,
                "check: the upstream did not resolve within the check deadline; refusing"
            );
            Err(DenyCode::UpstreamUnresolved)
        }
    }
}

/// Logs and audits one decision.
fn record(
    state: &AppState,
    req: &CheckRequest,
    request_id: Option<&str>,
    decision: &CheckResponse,
    row: Option<&check::CheckRow>,
    started: Instant,
) {
    let now = store::now_ms();
    let (action, code) = match decision {
        CheckResponse::Allow { .. } => ("allow", None),
        CheckResponse::Deny { code } => ("deny", Some(code.as_str())),
    };
    tracing::debug!(gateway = %req.gateway, server = %req.server, action, code, connection_id = ?row.map(|r| r.connection_id), request_id = ?request_id, "check");
    state.audit.decision(Event {
        at: now,
        kind: "decision".into(),
        action: action.into(),
        code: code.map(str::to_owned),
        host_id: row.map(|r| r.host_id),
        user_id: row.map(|r| r.user_id),
        connection_id: row.map(|r| r.connection_id),
        gateway: Some(req.gateway.clone()),
        server: Some(req.server.clone()),
        mcp_method: req
            .mcp_method
            .as_deref()
            .map(|n| bounded_name(n).to_owned()),
        tool: req.tool.as_deref().map(|n| bounded_name(n).to_owned()),
        latency_us: i64::try_from(started.elapsed().as_micros()).ok(),
        request_id: request_id.map(str::to_owned),
        ..Event::default()
    });
}
