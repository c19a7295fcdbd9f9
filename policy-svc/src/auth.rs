//! Admin authentication and capabilities. Access depends on capabilities only, never
//! on a role's name.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
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
}

impl Capability {
    pub const ALL: [Capability; 10] = [
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
        }
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

/// An authenticated admin API caller.
#[derive(Debug)]
pub struct Admin {
    pub user_id: i64,
    capabilities: Vec<Capability>,
}

impl Admin {
    /// Refuses with 403 `missing_capability` unless the caller holds `cap`. Call it
    /// before reading or changing anything.
    pub fn require(&self, cap: Capability) -> Result<(), ApiError> {
        if self.capabilities.contains(&cap) {
            Ok(())
        } else {
            Err(ApiError::MissingCapability(cap))
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(mcpguard_core::bearer_token)
            .ok_or(ApiError::Unauthenticated)?;
        let presented = TokenHash::of(token);
        let found = store::admin::authenticate(&state.db, &presented.to_hex()).await?;
        match found {
            Some(id)
                if TokenHash::from_hex(&id.token_hash).is_some_and(|h| h.ct_eq(&presented)) =>
            {
                Ok(Admin {
                    user_id: id.user_id,
                    capabilities: id.capabilities,
                })
            }
            _ => Err(ApiError::Unauthenticated),
        }
    }
}
