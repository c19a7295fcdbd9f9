//! Hosts, their connections to gateways, and API access tokens.

use serde::Serialize;

use super::{Db, DbBool, Result, begin_write, now_ms, placeholders, pow2_chunks};
use crate::timefmt;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Host {
    pub id: i64,
    pub name: String,
    /// `token` (token-based, created by an admin) or `oauth` (headed, appears on connect).
    pub kind: String,
    pub enabled: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    /// A headed host waiting for an admin's approval (`POST /api/v1/hosts/{id}/approve`).
    pub pending: DbBool,
}

pub async fn create_token_host(db: &Db, name: &str) -> Result<Host> {
    Ok(sqlx::query_as(
        "INSERT INTO hosts (name, kind, enabled, created_at) VALUES ($1, 'token', $2, $3)
         RETURNING id, name, kind, enabled, created_at, pending",
    )
    .bind(name)
    .bind(true)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

pub async fn list_hosts(db: &Db) -> Result<Vec<Host>> {
    Ok(
        sqlx::query_as(
            "SELECT id, name, kind, enabled, created_at, pending FROM hosts ORDER BY id",
        )
        .fetch_all(db)
        .await?,
    )
}

pub async fn get_host(db: &Db, id: i64) -> Result<Option<Host>> {
    Ok(sqlx::query_as(
        "SELECT id, name, kind, enabled, created_at, pending FROM hosts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Approves a pending host; `None`: no such host.
pub async fn approve(db: &Db, id: i64) -> Result<Option<Host>> {
    Ok(sqlx::query_as(
        "UPDATE hosts SET pending = $1 WHERE id = $2
         RETURNING id, name, kind, enabled, created_at, pending",
    )
    .bind(false)
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// The connection for (host, gateway, user), created on first use. One statement (the
/// no-op update makes `RETURNING` answer for an existing row too), so it also runs
/// inside a caller's transaction.
pub async fn connect<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    host_id: i64,
    gateway_id: i64,
    user_id: i64,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO connections (host_id, gateway_id, user_id, enabled, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (host_id, gateway_id, user_id) DO UPDATE SET host_id = excluded.host_id
         RETURNING id",
    )
    .bind(host_id)
    .bind(gateway_id)
    .bind(user_id)
    .bind(true)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

/// An API access token as listed: everything but the secret, which is never stored.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ApiToken {
    pub id: i64,
    pub prefix: String,
    pub host_id: i64,
    pub connection_id: i64,
    pub gateway_id: i64,
    pub user_id: i64,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub expires_at: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub last_used_at: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub revoked_at: Option<i64>,
}

const TOKEN_COLUMNS: &str = "t.id, t.prefix, c.host_id, t.connection_id, c.gateway_id, c.user_id,
     t.created_at, t.expires_at, t.last_used_at, t.revoked_at";

pub struct NewToken<'a> {
    pub connection_id: i64,
    pub token_hash: &'a str,
    pub prefix: &'a str,
    pub created_by: i64,
    pub expires_at: Option<i64>,
}

pub async fn insert_token(db: &Db, t: &NewToken<'_>) -> Result<ApiToken> {
    let id = insert_token_row(db, t).await?;
    get_token(db, id)
        .await?
        .ok_or(super::StoreError::Db(sqlx::Error::RowNotFound))
}

/// The insert alone (returns the id), for use inside a caller's transaction.
pub async fn insert_token_row<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    t: &NewToken<'_>,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO api_tokens (connection_id, token_hash, prefix, created_by, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(t.connection_id)
    .bind(t.token_hash)
    .bind(t.prefix)
    .bind(t.created_by)
    .bind(now_ms())
    .bind(t.expires_at)
    .fetch_one(db)
    .await?)
}

pub async fn list_tokens(db: &Db, host_id: i64) -> Result<Vec<ApiToken>> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN connections c ON c.id = t.connection_id
         WHERE c.host_id = $1 ORDER BY t.id"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(host_id)
        .fetch_all(db)
        .await?)
}

/// Revokes a token; false if no such token. Revoking twice keeps the first time.
pub async fn revoke_token(db: &Db, id: i64) -> Result<bool> {
    let done =
        sqlx::query("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(db)
            .await?;
    Ok(done.rows_affected() > 0)
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Connection {
    pub id: i64,
    pub host_id: i64,
    pub host_name: String,
    pub host_kind: String,
    pub user_id: i64,
    pub user_name: String,
    pub gateway_id: i64,
    pub enabled: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub last_used_at: Option<i64>,
    /// Tokens neither revoked nor expired.
    pub live_tokens: i64,
}

pub async fn list_connections(db: &Db, gateway_id: i64) -> Result<Vec<Connection>> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.host_id, h.name AS host_name, h.kind AS host_kind, c.user_id,
                u.name AS user_name, c.gateway_id, c.enabled, c.created_at, c.last_used_at,
                (SELECT COUNT(*) FROM api_tokens t
                 WHERE t.connection_id = c.id AND t.revoked_at IS NULL
                   AND (t.expires_at IS NULL OR t.expires_at > $2)) AS live_tokens
         FROM connections c
         JOIN hosts h ON h.id = c.host_id
         JOIN users u ON u.id = c.user_id
         WHERE c.gateway_id = $1
         ORDER BY c.id",
    )
    .bind(gateway_id)
    .bind(now_ms())
    .fetch_all(db)
    .await?)
}

/// Records when tokens (and so their connections) were last used, in one transaction,
/// one statement per table and chunk of ids. A use by an OAuth access token has no
/// token row (`None`): only its connection is updated. Rows are updated in one order
/// (tokens, then connections, each by id), so that two replicas flushing at once on
/// PostgreSQL wait for each other instead of deadlocking; a time never moves backwards
/// (another replica may have written a later one).
pub async fn record_last_used(db: &Db, uses: &[(Option<i64>, i64)], at: i64) -> Result<()> {
    // Ids per statement: bounded, so the statements come in a few small shapes
    // (`pow2_chunks`).
    const IDS_PER_UPDATE: usize = 64;
    let mut tokens: Vec<i64> = uses.iter().filter_map(|&(token, _)| token).collect();
    let mut connections: Vec<i64> = uses.iter().map(|&(_, connection)| connection).collect();
    for ids in [&mut tokens, &mut connections] {
        ids.sort_unstable();
        ids.dedup();
    }
    let mut tx = begin_write(db).await?;
    for (table, ids) in [("api_tokens", tokens), ("connections", connections)] {
        for chunk in pow2_chunks(&ids, IDS_PER_UPDATE) {
            let sql = format!(
                "UPDATE {table} SET last_used_at = {}
                 WHERE (last_used_at IS NULL OR last_used_at < {}) AND id IN ({})",
                placeholders(db, 1, 1),
                placeholders(db, 2, 1),
                placeholders(db, 3, chunk.len())
            );
            let mut update = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at).bind(at);
            for id in chunk {
                update = update.bind(*id);
            }
            update.execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

pub async fn get_token(db: &Db, id: i64) -> Result<Option<ApiToken>> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN connections c ON c.id = t.connection_id WHERE t.id = $1"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?)
}
