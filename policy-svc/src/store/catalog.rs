//! Gateways, servers, and which server each gateway exposes.

use serde::Serialize;

use super::{Db, DbBool, Result, begin_write, now_ms};
use crate::timefmt;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Gateway {
    pub id: i64,
    pub name: String,
    pub slug: String,
    pub enabled: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    /// Whether a headed host appearing on its first authorization here starts pending.
    pub approve_hosts: DbBool,
}

/// Creates a gateway granted to the `everyone` team, as gateways were open to every
/// user before teams existed; an admin restricts it by taking that grant away.
pub async fn create_gateway(db: &Db, name: &str, slug: &str) -> Result<Gateway> {
    let mut tx = begin_write(db).await?;
    let gateway: Gateway = sqlx::query_as(
        "INSERT INTO gateways (name, slug, enabled, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id, name, slug, enabled, created_at, approve_hosts",
    )
    .bind(name)
    .bind(slug)
    .bind(true)
    .bind(now_ms())
    .fetch_one(&mut *tx)
    .await?;
    let everyone = super::teams::everyone(&mut *tx).await?;
    super::teams::grant(&mut *tx, gateway.id, everyone).await?;
    tx.commit().await?;
    Ok(gateway)
}

pub async fn list_gateways(db: &Db) -> Result<Vec<Gateway>> {
    Ok(sqlx::query_as(
        "SELECT id, name, slug, enabled, created_at, approve_hosts FROM gateways ORDER BY id",
    )
    .fetch_all(db)
    .await?)
}

/// Sets whether new headed hosts wait for approval on this gateway; `None`: no such
/// gateway.
pub async fn set_approve_hosts(db: &Db, id: i64, required: bool) -> Result<Option<Gateway>> {
    Ok(sqlx::query_as(
        "UPDATE gateways SET approve_hosts = $1 WHERE id = $2
         RETURNING id, name, slug, enabled, created_at, approve_hosts",
    )
    .bind(required)
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Whether the gateway approves new headed hosts (`false` for no such gateway).
pub async fn approves_hosts(db: &Db, id: i64) -> Result<bool> {
    let flag: Option<DbBool> =
        sqlx::query_scalar("SELECT approve_hosts FROM gateways WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(flag.is_some_and(|f| f.0))
}

pub async fn gateway_exists(db: &Db, id: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gateways WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}

/// A server's upstream, split as the filter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamParts {
    pub scheme: String,
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Server {
    pub id: i64,
    pub name: String,
    pub slug: String,
    #[serde(skip)]
    pub upstream_scheme: String,
    #[serde(skip)]
    pub upstream_authority: String,
    #[serde(skip)]
    pub upstream_path: String,
    pub enabled: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
}

impl Server {
    pub fn upstream_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.upstream_scheme, self.upstream_authority, self.upstream_path
        )
    }
}

pub async fn create_server(db: &Db, name: &str, slug: &str, up: &UpstreamParts) -> Result<Server> {
    Ok(sqlx::query_as(
        "INSERT INTO servers (name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at",
    )
    .bind(name)
    .bind(slug)
    .bind(&up.scheme)
    .bind(&up.authority)
    .bind(&up.path)
    .bind(true)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

pub async fn list_servers(db: &Db) -> Result<Vec<Server>> {
    Ok(sqlx::query_as(
        "SELECT id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at
         FROM servers ORDER BY id",
    )
    .fetch_all(db)
    .await?)
}

pub async fn server_exists(db: &Db, id: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM servers WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Exposure {
    pub gateway_id: i64,
    pub server_id: i64,
    pub identity: String,
    /// The header a shared credential is sent in, if there is one (never its value).
    pub credential_header: Option<String>,
    /// A shared exposure that sends one user's identity (a service account): that user.
    pub credential_user_id: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
}

/// A shared exposure's service credential, as stored.
#[derive(Debug, Clone, Copy)]
pub enum SharedCredential<'a> {
    /// A header name and its sealed value.
    Sealed(&'a str, &'a [u8]),
    /// One user's identity for the server.
    IdentityOf(i64),
}

/// Exposes a server on a gateway, or replaces the scheme (and shared credential) of an
/// existing exposure.
pub async fn expose(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    identity: &str,
    credential: Option<SharedCredential<'_>>,
) -> Result<Exposure> {
    let (header, sealed, user_id) = match credential {
        None => (None, None, None),
        Some(SharedCredential::Sealed(header, sealed)) => (Some(header), Some(sealed), None),
        Some(SharedCredential::IdentityOf(user_id)) => (None, None, Some(user_id)),
    };
    Ok(sqlx::query_as(
        "INSERT INTO exposures (gateway_id, server_id, identity, created_at, credential_header,
             credential_sealed, credential_user_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (gateway_id, server_id) DO UPDATE SET identity = excluded.identity,
             credential_header = excluded.credential_header, credential_sealed = excluded.credential_sealed,
             credential_user_id = excluded.credential_user_id
         RETURNING gateway_id, server_id, identity, credential_header, credential_user_id, created_at",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(identity)
    .bind(now_ms())
    .bind(header)
    .bind(sealed)
    .bind(user_id)
    .fetch_one(db)
    .await?)
}

/// Hides a server on a gateway; false if it was not exposed there.
pub async fn hide(db: &Db, gateway_id: i64, server_id: i64) -> Result<bool> {
    let done = sqlx::query("DELETE FROM exposures WHERE gateway_id = $1 AND server_id = $2")
        .bind(gateway_id)
        .bind(server_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The slugs of the servers a gateway exposes, in slug order: what the gateway URL's
/// aggregator merges (each still checked on its own, so a disabled one is left out
/// there, not here).
pub async fn exposed_slugs(db: &Db, gateway_id: i64) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT s.slug FROM exposures e JOIN servers s ON s.id = e.server_id
         WHERE e.gateway_id = $1 ORDER BY s.slug",
    )
    .bind(gateway_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(slug,)| slug).collect())
}

pub async fn list_exposures(db: &Db, gateway_id: i64) -> Result<Vec<Exposure>> {
    Ok(sqlx::query_as(
        "SELECT gateway_id, server_id, identity, credential_header, credential_user_id, created_at
         FROM exposures
         WHERE gateway_id = $1 ORDER BY server_id",
    )
    .bind(gateway_id)
    .fetch_all(db)
    .await?)
}
