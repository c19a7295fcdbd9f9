//! Record: every decision is logged and audited, on both wires alike.

use std::time::Instant;

use mcpguard_core::check::DenyCode;

use super::Wire;
use crate::AppState;
use crate::store::{self, audit::Event, check::CheckRow};

/// What the log line and the audit entry say of a request besides where it went and
/// what was decided. The names are the client's, so the wire adapter bounds them
/// (`bounded_name`, `bounded_request_id`) before they get here.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// When the request arrived: the entry's latency.
    pub started: Instant,
    pub mcp_method: Option<&'a str>,
    pub tool: Option<&'a str>,
    /// Envoy's `x-request-id`, so both sides' logs can be joined.
    pub request_id: Option<&'a str>,
}

/// What is known of a request when it is decided.
pub(super) struct Seen<'a> {
    pub wire: Wire,
    pub gateway: Option<&'a str>,
    pub server: Option<&'a str>,
    pub context: Context<'a>,
}

/// Logs and audits one decision (`code` is `None` for an allow), naming the
/// connection, host and user of `row` when the store had one. Never waits: the
/// audit trail queues it (and budgets anonymous refusals, [`crate::audit`]).
pub(super) fn record(
    state: &AppState,
    seen: &Seen<'_>,
    row: Option<&CheckRow>,
    code: Option<DenyCode>,
) {
    let action = if code.is_some() { "deny" } else { "allow" };
    let code = code.map(DenyCode::as_str);
    let connection_id = row.map(|r| r.connection_id);
    let context = &seen.context;
    // A request that named no gateway was decided on its token's.
    let gateway = seen
        .gateway
        .or_else(|| row.map(|r| r.gateway_slug.as_str()));
    tracing::debug!(
        gateway,
        server = seen.server,
        action,
        code,
        connection_id,
        request_id = context.request_id,
        "{}",
        seen.wire.name()
    );
    state.audit.decision(Event {
        at: store::now_ms(),
        kind: "decision".into(),
        action: action.into(),
        code: code.map(str::to_owned),
        host_id: row.map(|r| r.host_id),
        user_id: row.map(|r| r.user_id),
        connection_id,
        gateway: gateway.map(str::to_owned),
        server: seen.server.map(str::to_owned),
        mcp_method: context.mcp_method.map(str::to_owned),
        tool: context.tool.map(str::to_owned),
        latency_us: i64::try_from(context.started.elapsed().as_micros()).ok(),
        request_id: context.request_id.map(str::to_owned),
        ..Event::default()
    });
}
