//! Break-glass: the `enabled` flag of each layer on the request path.

use super::{Db, DbBool, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Hosts,
    Connections,
    Servers,
    Gateways,
}

impl Layer {
    pub fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "hosts" => Layer::Hosts,
            "connections" => Layer::Connections,
            "servers" => Layer::Servers,
            "gateways" => Layer::Gateways,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Layer::Hosts => "hosts",
            Layer::Connections => "connections",
            Layer::Servers => "servers",
            Layer::Gateways => "gateways",
        }
    }

    /// The singular, for error codes such as `host_not_found`.
    pub const fn noun(self) -> &'static str {
        match self {
            Layer::Hosts => "host",
            Layer::Connections => "connection",
            Layer::Servers => "server",
            Layer::Gateways => "gateway",
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
    };
    let mut tx = db.begin().await?;
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
