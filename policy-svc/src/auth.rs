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

/// An authenticated admin API caller, put in the request by [`authorize`].
#[derive(Debug, Clone)]
pub struct Admin {
    pub user_id: i64,
    pub capabilities: Vec<Capability>,
}

/// The admin API's gate, in front of every admin endpoint: authenticates the bearer
/// token and checks the endpoint's capability before the handler reads or changes
/// anything. `None` means any authenticated admin.
pub async fn authorize(
    state: AppState,
    required: Option<Capability>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let admin = authenticate(&state, req.headers()).await?;
    if let Some(cap) = required.filter(|cap| !admin.capabilities.contains(cap)) {
        tracing::warn!(user_id = admin.user_id, capability = cap.as_str(), path = %req.uri().path(), "admin call refused: missing capability");
        return Err(ApiError::MissingCapability(cap));
    }
    req.extensions_mut().insert(admin);
    Ok(next.run(req).await)
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Admin, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(mcpguard_core::bearer_token)
        .ok_or(ApiError::Unauthenticated)?;
    let presented = TokenHash::of(token);
    match store::admin::authenticate(&state.db, &presented.to_hex()).await? {
        Some(id) if TokenHash::from_hex(&id.token_hash).is_some_and(|h| h.ct_eq(&presented)) => {
            Ok(Admin {
                user_id: id.user_id,
                capabilities: id.capabilities,
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
