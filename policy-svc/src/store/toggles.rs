//! Break-glass: the `enabled` flag of each layer on the request path.

use super::{Db, DbBool, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Hosts,
    Connections,
    Servers,
    Gateways,
    Users,
    Identities,
}

impl Layer {
    /// The break-glass endpoint for this layer (paths must be `'static` for the router).
    pub const fn toggle_path(self, enabled: bool) -> &'static str {
        match (self, enabled) {
            (Layer::Hosts, false) => "/api/v1/hosts/{id}/disable",
            (Layer::Hosts, true) => "/api/v1/hosts/{id}/enable",
            (Layer::Connections, false) => "/api/v1/connections/{id}/disable",
            (Layer::Connections, true) => "/api/v1/connections/{id}/enable",
            (Layer::Servers, false) => "/api/v1/servers/{id}/disable",
            (Layer::Servers, true) => "/api/v1/servers/{id}/enable",
            (Layer::Gateways, false) => "/api/v1/gateways/{id}/disable",
            (Layer::Gateways, true) => "/api/v1/gateways/{id}/enable",
            (Layer::Users, false) => "/api/v1/users/{id}/disable",
            (Layer::Users, true) => "/api/v1/users/{id}/enable",
            (Layer::Identities, false) => "/api/v1/identities/{id}/disable",
            (Layer::Identities, true) => "/api/v1/identities/{id}/enable",
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Layer::Hosts => "hosts",
            Layer::Connections => "connections",
            Layer::Servers => "servers",
            Layer::Gateways => "gateways",
            Layer::Users => "users",
            Layer::Identities => "identities",
        }
    }

    /// The singular, for error codes such as `host_not_found`.
    pub const fn noun(self) -> &'static str {
        match self {
            Layer::Hosts => "host",
            Layer::Connections => "connection",
            Layer::Servers => "server",
            Layer::Gateways => "gateway",
            Layer::Users => "user",
            Layer::Identities => "identity",
        }
    }
}

/// Sets a layer's flag. Returns the previous state, or `None` if there is no such row.
/// The write is committed before this returns, and the check reads the flag on every
/// request with no cache, so the next request sees it.
pub async fn set_enabled(db: &Db, layer: Layer, id: i64, enabled: bool) -> Result<Option<bool>> {
    let (select, update) = match layer {
        Layer::Hosts => (
            "SELECT enabled FROM hosts WHERE id = $1",
            "UPDATE hosts SET enabled = $1 WHERE id = $2",
        ),
        Layer::Connections => (
            "SELECT enabled FROM connections WHERE id = $1",
            "UPDATE connections SET enabled = $1 WHERE id = $2",
        ),
        Layer::Servers => (
            "SELECT enabled FROM servers WHERE id = $1",
            "UPDATE servers SET enabled = $1 WHERE id = $2",
        ),
        Layer::Gateways => (
            "SELECT enabled FROM gateways WHERE id = $1",
            "UPDATE gateways SET enabled = $1 WHERE id = $2",
        ),
        Layer::Users => (
            "SELECT enabled FROM users WHERE id = $1",
            "UPDATE users SET enabled = $1 WHERE id = $2",
        ),
        Layer::Identities => (
            "SELECT enabled FROM identities WHERE id = $1",
            "UPDATE identities SET enabled = $1 WHERE id = $2",
        ),
    };
    let mut tx = super::begin_write(db).await?;
    let before: Option<DbBool> = sqlx::query_scalar(select)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(before) = before else {
        return Ok(None);
    };
    sqlx::query(update)
        .bind(enabled)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(before.0))
}
