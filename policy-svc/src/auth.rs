//! Admin authentication and capabilities. Access depends on capabilities only, never
//! on a role's name.

use axum::extract::{FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use mcpguard_core::token::TokenHash;

use crate::AppState;
use crate::error::ApiError;
use crate::store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    TokensManage,
    HostsToggle,
    ConnectionsToggle,
    IdentitiesToggle,
    ServersToggle,
    GatewaysToggle,
    GatewaysManage,
    ServersManage,
    UsersManage,
    AuditRead,
    GatewaysRead,
    ServersRead,
    HostsRead,
    ConnectionsRead,
    UsersRead,
    TeamsManage,
    OauthConnect,
    FeaturesManage,
}

impl Capability {
    pub const ALL: [Capability; 18] = [
        Capability::TokensManage,
        Capability::HostsToggle,
        Capability::ConnectionsToggle,
        Capability::IdentitiesToggle,
        Capability::ServersToggle,
        Capability::GatewaysToggle,
        Capability::GatewaysManage,
        Capability::ServersManage,
        Capability::UsersManage,
        Capability::AuditRead,
        Capability::GatewaysRead,
        Capability::ServersRead,
        Capability::HostsRead,
        Capability::ConnectionsRead,
        Capability::UsersRead,
        Capability::TeamsManage,
        Capability::OauthConnect,
        Capability::FeaturesManage,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::TokensManage => "tokens.manage",
            Capability::HostsToggle => "hosts.toggle",
            Capability::ConnectionsToggle => "connections.toggle",
            Capability::IdentitiesToggle => "identities.toggle",
            Capability::ServersToggle => "servers.toggle",
            Capability::GatewaysToggle => "gateways.toggle",
            Capability::GatewaysManage => "gateways.manage",
            Capability::ServersManage => "servers.manage",
            Capability::UsersManage => "users.manage",
            Capability::AuditRead => "audit.read",
            Capability::GatewaysRead => "gateways.read",
            Capability::ServersRead => "servers.read",
            Capability::HostsRead => "hosts.read",
            Capability::ConnectionsRead => "connections.read",
            Capability::UsersRead => "users.read",
            Capability::TeamsManage => "teams.manage",
            // Not an admin API capability: whether a user may connect a headed app by
            // OAuth at all (checked at consent).
            Capability::OauthConnect => "oauth.connect",
            Capability::FeaturesManage => "features.manage",
        }
    }

    /// The reads a capability cannot be used without: you pick a gateway, server, host
    /// or user by its id from a listing. Kept closed under this rule wherever a role is
    /// written (and applied again when a caller is authenticated, so a role stored by
    /// an older replica reads the same); migration 0008 applied it to existing roles.
    /// `audit.read` implies nothing: the audit log is its own area.
    pub const fn implies(self) -> &'static [Capability] {
        use Capability::*;
        match self {
            // Exposing picks a server from the catalog.
            GatewaysManage => &[GatewaysRead, ServersRead],
            // Provisioning picks an exposure: a gateway and a server.
            FeaturesManage => &[GatewaysRead, ServersRead],
            GatewaysToggle => &[GatewaysRead],
            ServersManage | ServersToggle => &[ServersRead],
            HostsToggle => &[HostsRead],
            // Tokens and enrollments name a host and a gateway.
            TokensManage => &[HostsRead, GatewaysRead],
            // Connections are listed per gateway.
            ConnectionsToggle => &[ConnectionsRead, GatewaysRead],
            // Identities are listed per user (`GET /api/v1/users/{id}/identities`).
            IdentitiesToggle => &[UsersRead],
            // Identities name a server.
            UsersManage => &[UsersRead, ServersRead],
            // Members are picked from the users listing.
            TeamsManage => &[UsersRead],
            OauthConnect | AuditRead | GatewaysRead | ServersRead | HostsRead | ConnectionsRead
            | UsersRead => &[],
        }
    }

    /// `caps` with every capability they imply (one step is enough: reads imply
    /// nothing), sorted and without duplicates.
    pub fn closure(caps: &[Capability]) -> Vec<Capability> {
        let mut all: Vec<Capability> = caps
            .iter()
            .flat_map(|c| std::iter::once(*c).chain(c.implies().iter().copied()))
            .collect();
        all.sort_by_key(|c| c.as_str());
        all.dedup();
        all
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated admin API caller, put in the request by [`authorize`].
#[derive(Debug, Clone)]
pub struct Admin {
    pub user_id: i64,
    /// The admin token the call was made with.
    pub token_id: i64,
    /// The host a host-bound admin token (an agent's own) is confined to: it reaches
    /// only that host's tokens and enrollments (see `routes::Scope`).
    pub host_id: Option<i64>,
    pub capabilities: Vec<Capability>,
}

/// A user signed in to the admin console, calling the admin API in-process
/// (`routes::console`): the gate takes it in place of a bearer token and checks the
/// endpoint's capability exactly as for one. Request extensions never come from the
/// network, so nothing but the console can set it. Its `token_id` is 0 (no admin token).
#[derive(Debug, Clone)]
pub struct ConsoleCaller(pub Admin);

/// Whose data an endpoint reaches, for host-bound admin tokens (an agent's own
/// credential), which reach only their host's tokens and enrollments. Declared per
/// endpoint in the endpoint table, beside its capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every host's data, or none host's in particular: refused to host-bound tokens.
    Global,
    /// Only the caller's own record, or static facts (the endpoint table, the
    /// capability names): open to every admin token.
    Caller,
    /// One host's tokens or enrollments; the path's `{id}` leads to the host.
    Host(HostOf),
}

/// What the `{id}` in a host-scoped path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostOf {
    Host,
    Token,
    Enrollment,
}

impl Scope {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Caller => "caller",
            Scope::Host(_) => "host",
        }
    }
}

/// The admin API's gate, in front of every admin endpoint: authenticates the bearer
/// token, checks the endpoint's capability (`None`: any authenticated admin) and, for
/// a host-bound token, that the call stays on its host, before the handler reads or
/// changes anything.
pub async fn authorize(
    state: AppState,
    (required, scope): (Option<Capability>, Scope),
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let admin = match req.extensions().get::<ConsoleCaller>() {
        Some(ConsoleCaller(admin)) => admin.clone(),
        None => authenticate(&state, req.headers()).await?,
    };
    if let Some(cap) = required.filter(|cap| !admin.capabilities.contains(cap)) {
        tracing::warn!(user_id = admin.user_id, capability = cap.as_str(), path = %req.uri().path(), "admin call refused: missing capability");
        return Err(ApiError::MissingCapability(cap));
    }
    let mut req = match admin.host_id {
        Some(bound) => confine(&state, &admin, bound, scope, req).await?,
        None => req,
    };
    req.extensions_mut().insert(admin);
    Ok(next.run(req).await)
}

/// A host-bound token's call goes through only on its own host: elsewhere a
/// host-scoped endpoint answers 404 as if the thing did not exist (so the token learns
/// nothing about other hosts), and every other endpoint 403 `host_bound_token`.
async fn confine(
    state: &AppState,
    admin: &Admin,
    bound: i64,
    scope: Scope,
    req: Request,
) -> Result<Request, ApiError> {
    let of = match scope {
        Scope::Caller => return Ok(req),
        Scope::Global => {
            tracing::warn!(user_id = admin.user_id, token_id = admin.token_id, host_id = bound, path = %req.uri().path(), "admin call refused: host-bound token");
            return Err(ApiError::forbidden(
                "host_bound_token",
                format!(
                    "this admin token is bound to host {bound}: it reaches only that host's \
                     tokens and enrollments"
                ),
            ));
        }
        Scope::Host(of) => of,
    };
    let (mut parts, body) = req.into_parts();
    let id = axum::extract::RawPathParams::from_request_parts(&mut parts, state)
        .await
        .ok()
        .and_then(|params| {
            params
                .iter()
                .find(|(name, _)| *name == "id")
                .and_then(|(_, v)| v.parse::<i64>().ok())
        })
        .ok_or_else(|| ApiError::bad_request("invalid_path", "the path's id is not a number"))?;
    let (host, noun) = match of {
        HostOf::Host => (Some(id), "host"),
        HostOf::Token => (
            store::hosts::get_token(&state.db, id)
                .await?
                .map(|t| t.host_id),
            "token",
        ),
        HostOf::Enrollment => (
            store::enrollments::get(&state.db, id)
                .await?
                .map(|e| e.host_id),
            "enrollment",
        ),
    };
    if host != Some(bound) {
        tracing::warn!(user_id = admin.user_id, token_id = admin.token_id, host_id = bound, path = %parts.uri.path(), "admin call refused: another host's");
        return Err(ApiError::NotFound(noun));
    }
    Ok(Request::from_parts(parts, body))
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Admin, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(mcpguard_core::bearer_token)
        .ok_or(ApiError::Unauthenticated)?;
    let presented = TokenHash::of(token);
    match store::users::authenticate(&state.db, &presented.to_hex()).await? {
        Some(id) if TokenHash::from_hex(&id.token_hash).is_some_and(|h| h.ct_eq(&presented)) => {
            Ok(Admin {
                user_id: id.user_id,
                token_id: id.token_id,
                host_id: id.host_id,
                capabilities: Capability::closure(&id.capabilities),
            })
        }
        _ => Err(ApiError::Unauthenticated),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // Only present behind `authorize`; a handler outside the admin table gets none.
        parts
            .extensions
            .get::<Admin>()
            .cloned()
            .ok_or(ApiError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::Capability;

    #[test]
    fn capabilities_imply_only_reads_and_the_closure_is_stable() {
        for cap in Capability::ALL {
            for implied in cap.implies() {
                assert!(
                    implied.as_str().ends_with(".read"),
                    "{cap} implies {implied}"
                );
                assert!(implied.implies().is_empty(), "{implied} implies more");
            }
            let once = Capability::closure(&[cap]);
            assert!(once.contains(&cap));
            assert_eq!(Capability::closure(&once), once, "{cap}");
        }
        assert_eq!(Capability::closure(&[]), vec![]);
        assert_eq!(
            Capability::closure(&Capability::ALL).len(),
            Capability::ALL.len()
        );
        // Every read is implied by something an admin had before the reads existed, so
        // the owner role keeps everything through the migration.
        for read in Capability::ALL
            .iter()
            .filter(|c| c.as_str().ends_with(".read"))
        {
            if *read != Capability::AuditRead {
                assert!(
                    Capability::ALL[..10]
                        .iter()
                        .any(|c| c.implies().contains(read)),
                    "{read}"
                );
            }
        }
    }
}
