//! Users' own credentials for servers, sealed. Reads for the API return metadata only.

use serde::Serialize;

use super::{Db, DbBool, Result, now_ms};
use crate::timefmt;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Identity {
    pub id: i64,
    pub user_id: i64,
    pub server_id: i64,
    /// The header the credential is sent in; the value is never returned.
    pub header_name: String,
    pub enabled: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
}

/// Saves (or replaces) a user's identity for a server. Replacing keeps its enabled
/// state: a disabled identity stays disabled until someone enables it.
pub async fn put(
    db: &Db,
    user_id: i64,
    server_id: i64,
    header_name: &str,
    sealed: &[u8],
) -> Result<Identity> {
    Ok(sqlx::query_as(
        "INSERT INTO identities (user_id, server_id, header_name, sealed, enabled, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (user_id, server_id) DO UPDATE SET header_name = excluded.header_name, sealed = excluded.sealed
         RETURNING id, user_id, server_id, header_name, enabled, created_at",
    )
    .bind(user_id)
    .bind(server_id)
    .bind(header_name)
    .bind(sealed)
    .bind(true)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

pub async fn list_for_user(db: &Db, user_id: i64) -> Result<Vec<Identity>> {
    Ok(sqlx::query_as(
        "SELECT id, user_id, server_id, header_name, enabled, created_at FROM identities WHERE user_id = $1 ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// A per-user server a user has no identity for, on one gateway.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Missing {
    pub server_id: i64,
    pub slug: String,
    pub name: String,
}

/// The servers the gateway exposes per-user for which the user has no identity: what a
/// new connection must still be given before those servers answer it.
pub async fn missing_on_gateway(db: &Db, gateway_id: i64, user_id: i64) -> Result<Vec<Missing>> {
    Ok(sqlx::query_as(
        "SELECT s.id AS server_id, s.slug, s.name
         FROM exposures e JOIN servers s ON s.id = e.server_id
         WHERE e.gateway_id = $1 AND e.identity = 'per_user'
           AND NOT EXISTS (SELECT 1 FROM identities i WHERE i.user_id = $2 AND i.server_id = s.id)
         ORDER BY s.id",
    )
    .bind(gateway_id)
    .bind(user_id)
    .fetch_all(db)
    .await?)
}
