//! Pin (`/v1/check` only): the allowed upstream's address, resolved and judged now.

use std::net::SocketAddr;
use std::time::Duration;

use mcpguard_core::check::DenyCode;

use crate::AppState;
use crate::upstream_policy::Refused;

/// The address Envoy is to connect to for an upstream `host:port`: resolved now (an
/// address literal is not looked up) and judged by the upstream network policy, so
/// that what Envoy connects to is exactly what was judged, whatever the name resolves
/// to a moment later (DNS rebinding). IPv4 first, as Envoy's resolver would.
pub(super) async fn pin(
    state: &AppState,
    authority: &str,
    deadline: Duration,
) -> Result<SocketAddr, DenyCode> {
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
