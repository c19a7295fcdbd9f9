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
    /// For an identity connected by OAuth: `connected`, or `needs_reconnect` once the
    /// authorization server refused a refresh; `null` for a credential set by hand.
    pub oauth_status: Option<String>,
    /// When its current access token expires, and when it was last refreshed (how
    /// often, in `oauth_refreshes`). Never the tokens.
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub oauth_expires_at: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub oauth_refreshed_at: Option<i64>,
    pub oauth_refreshes: i64,
}

/// The columns of [`Identity`].
macro_rules! identity_columns {
    () => {
        "id, user_id, server_id, header_name, enabled, created_at, oauth_status, oauth_expires_at, oauth_refreshed_at, oauth_refreshes"
    };
}

/// Saves (or replaces) a user's identity for a server. Replacing keeps its enabled
/// state: a disabled identity stays disabled until someone enables it. A credential
/// set by hand replaces an OAuth connection whole (its tokens go).
pub async fn put(
    db: &Db,
    user_id: i64,
    server_id: i64,
    header_name: &str,
    sealed: &[u8],
) -> Result<Identity> {
    Ok(sqlx::query_as(concat!(
        "INSERT INTO identities (user_id, server_id, header_name, sealed, enabled, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (user_id, server_id) DO UPDATE SET header_name = excluded.header_name, sealed = excluded.sealed,
           oauth_status = NULL, oauth_refresh_sealed = NULL, oauth_expires_at = NULL,
           oauth_refresh_at = NULL, refresh_lease_until = NULL
         RETURNING ",
        identity_columns!()
    ))
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
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        identity_columns!(),
        " FROM identities WHERE user_id = $1 ORDER BY id"
    ))
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// Deletes an identity; whether there was one.
pub async fn delete(db: &Db, id: i64) -> Result<bool> {
    Ok(sqlx::query("DELETE FROM identities WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?
        .rows_affected()
        > 0)
}

/// A per-user server a user has no identity for, on one gateway.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Missing {
    pub server_id: i64,
    pub slug: String,
    pub name: String,
    /// OAuth-protected: the user connects their account ("Connect") rather than typing
    /// a token.
    #[serde(skip)]
    pub oauth: DbBool,
}

/// The servers the gateway exposes per-user for which the user has no identity (or an
/// OAuth one that needs reconnecting): what a new connection must still be given
/// before those servers answer it.
pub async fn missing_on_gateway(db: &Db, gateway_id: i64, user_id: i64) -> Result<Vec<Missing>> {
    Ok(sqlx::query_as(
        "SELECT s.id AS server_id, s.slug, s.name,
                EXISTS (SELECT 1 FROM server_oauth o WHERE o.server_id = s.id) AS oauth
         FROM exposures e JOIN servers s ON s.id = e.server_id
         WHERE e.gateway_id = $1 AND e.identity = 'per_user'
           AND NOT EXISTS (SELECT 1 FROM identities i WHERE i.user_id = $2 AND i.server_id = s.id
                             AND (i.oauth_status IS NULL OR i.oauth_status <> 'needs_reconnect'))
         ORDER BY s.id",
    )
    .bind(gateway_id)
    .bind(user_id)
    .fetch_all(db)
    .await?)
}
