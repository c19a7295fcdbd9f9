//! Roles, users and admin tokens.

use super::{Db, DbBool, Result, begin_write, now_ms};
use crate::auth::Capability;

/// Who an admin token belongs to, and what that user may do.
pub struct AdminIdentity {
    pub user_id: i64,
    pub token_id: i64,
    pub token_hash: String,
    /// Set for a host-bound token.
    pub host_id: Option<i64>,
    pub capabilities: Vec<Capability>,
}

/// Finds the live admin token with this hash, for an enabled user.
pub async fn authenticate(db: &Db, token_hash: &str) -> Result<Option<AdminIdentity>> {
    let row: Option<(i64, i64, String, Option<i64>, DbBool, i64)> = sqlx::query_as(
        "SELECT u.id, t.id, t.token_hash, t.host_id, u.enabled, u.role_id
         FROM admin_tokens t JOIN users u ON u.id = t.user_id
         WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?;
    let Some((user_id, token_id, token_hash, host_id, enabled, role_id)) = row else {
        return Ok(None);
    };
    if !enabled.0 {
        return Ok(None);
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT capability FROM role_capabilities WHERE role_id = $1")
            .bind(role_id)
            .fetch_all(db)
            .await?;
    let capabilities = names.iter().filter_map(|n| Capability::parse(n)).collect();
    Ok(Some(AdminIdentity {
        user_id,
        token_id,
        token_hash,
        host_id,
        capabilities,
    }))
}

pub async fn has_users(db: &Db) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}

/// Creates the owner role (every capability), the owner user and their admin token,
/// in one transaction, so a crash cannot leave an owner without a token.
pub async fn bootstrap_owner(db: &Db, token_hash: &str, prefix: &str) -> Result<i64> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let role_id: i64 = sqlx::query_scalar(
        "INSERT INTO roles (name, created_at) VALUES ('owner', $1) RETURNING id",
    )
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    for cap in Capability::ALL {
        sqlx::query("INSERT INTO role_capabilities (role_id, capability) VALUES ($1, $2)")
            .bind(role_id)
            .bind(cap.as_str())
            .execute(&mut *tx)
            .await?;
    }
    let user_id: i64 = sqlx::query_scalar(
        "INSERT INTO users (name, role_id, enabled, created_at) VALUES ('owner', $1, $2, $3) RETURNING id",
    )
    .bind(role_id)
    .bind(true)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO admin_tokens (user_id, token_hash, prefix, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(user_id)
    .bind(token_hash)
    .bind(prefix)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(user_id)
}

pub async fn user_exists(db: &Db, user_id: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}

#[derive(Debug, serde::Serialize)]
pub struct Role {
    pub id: i64,
    pub name: String,
    pub capabilities: Vec<String>,
    #[serde(serialize_with = "crate::timefmt::rfc3339")]
    pub created_at: i64,
}

/// Creates a role holding `caps` and the reads they imply ([`Capability::closure`]).
pub async fn create_role(db: &Db, name: &str, caps: &[Capability]) -> Result<Role> {
    let caps = &Capability::closure(caps)[..];
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let id: i64 =
        sqlx::query_scalar("INSERT INTO roles (name, created_at) VALUES ($1, $2) RETURNING id")
            .bind(name)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
    for cap in caps {
        sqlx::query("INSERT INTO role_capabilities (role_id, capability) VALUES ($1, $2)")
            .bind(id)
            .bind(cap.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Role {
        id,
        name: name.to_owned(),
        capabilities: names(caps),
        created_at: now,
    })
}

fn names(caps: &[Capability]) -> Vec<String> {
    let mut names: Vec<String> = caps.iter().map(|c| c.as_str().to_owned()).collect();
    names.sort();
    names.dedup();
    names
}

/// Replaces a role's capabilities with `caps` and the reads they imply; `None` if there
/// is no such role.
pub async fn set_role_capabilities(db: &Db, id: i64, caps: &[Capability]) -> Result<Option<Role>> {
    let caps = &Capability::closure(caps)[..];
    let mut tx = begin_write(db).await?;
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT name, created_at FROM roles WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((name, created_at)) = row else {
        return Ok(None);
    };
    sqlx::query("DELETE FROM role_capabilities WHERE role_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    for cap in names(caps) {
        sqlx::query("INSERT INTO role_capabilities (role_id, capability) VALUES ($1, $2)")
            .bind(id)
            .bind(cap)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(Role {
        id,
        name,
        capabilities: names(caps),
        created_at,
    }))
}

pub async fn get_role(db: &Db, id: i64) -> Result<Option<Role>> {
    Ok(list_roles(db).await?.into_iter().find(|r| r.id == id))
}

pub async fn list_roles(db: &Db) -> Result<Vec<Role>> {
    let roles: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT id, name, created_at FROM roles ORDER BY id")
            .fetch_all(db)
            .await?;
    let caps: Vec<(i64, String)> = sqlx::query_as(
        "SELECT role_id, capability FROM role_capabilities ORDER BY role_id, capability",
    )
    .fetch_all(db)
    .await?;
    Ok(roles
        .into_iter()
        .map(|(id, name, created_at)| Role {
            id,
            name,
            capabilities: caps
                .iter()
                .filter(|(r, _)| *r == id)
                .map(|(_, c)| c.clone())
                .collect(),
            created_at,
        })
        .collect())
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub role_id: i64,
    pub enabled: DbBool,
    #[serde(serialize_with = "crate::timefmt::rfc3339")]
    pub created_at: i64,
    /// Whether the user can sign in on the OAuth pages; the hash is never shown.
    pub has_password: DbBool,
}

pub async fn create_user(db: &Db, name: &str, role_id: i64) -> Result<User> {
    Ok(sqlx::query_as(
        "INSERT INTO users (name, role_id, enabled, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id, name, role_id, enabled, created_at, password_hash IS NOT NULL AS has_password",
    )
    .bind(name)
    .bind(role_id)
    .bind(true)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

pub async fn get_user(db: &Db, id: i64) -> Result<Option<User>> {
    Ok(sqlx::query_as(
        "SELECT id, name, role_id, enabled, created_at, password_hash IS NOT NULL AS has_password
             FROM users WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

pub async fn list_users(db: &Db) -> Result<Vec<User>> {
    Ok(sqlx::query_as(
        "SELECT id, name, role_id, enabled, created_at, password_hash IS NOT NULL AS has_password
             FROM users ORDER BY id",
    )
    .fetch_all(db)
    .await?)
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct AdminToken {
    pub id: i64,
    pub user_id: i64,
    pub prefix: String,
    /// The host a host-bound token is confined to; `null`: not bound.
    pub host_id: Option<i64>,
    #[serde(serialize_with = "crate::timefmt::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "crate::timefmt::rfc3339_opt")]
    pub revoked_at: Option<i64>,
}

pub async fn insert_admin_token(
    db: &Db,
    user_id: i64,
    token_hash: &str,
    prefix: &str,
    host_id: Option<i64>,
) -> Result<AdminToken> {
    Ok(sqlx::query_as(
        "INSERT INTO admin_tokens (user_id, token_hash, prefix, created_at, host_id)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, user_id, prefix, host_id, created_at, revoked_at",
    )
    .bind(user_id)
    .bind(token_hash)
    .bind(prefix)
    .bind(now_ms())
    .bind(host_id)
    .fetch_one(db)
    .await?)
}

pub async fn get_admin_token(db: &Db, id: i64) -> Result<Option<AdminToken>> {
    Ok(sqlx::query_as(
        "SELECT id, user_id, prefix, host_id, created_at, revoked_at FROM admin_tokens WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

pub async fn list_admin_tokens(db: &Db, user_id: i64) -> Result<Vec<AdminToken>> {
    Ok(sqlx::query_as(
        "SELECT id, user_id, prefix, host_id, created_at, revoked_at FROM admin_tokens WHERE user_id = $1 ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// Revokes an admin token; false if there is no such token.
pub async fn revoke_admin_token(db: &Db, id: i64) -> Result<bool> {
    let done =
        sqlx::query("UPDATE admin_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(db)
            .await?;
    Ok(done.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use sqlx::{AnyConnection, Connection};

    use crate::auth::Capability;

    /// Migration 0008 gives each existing role the reads its capabilities imply: the
    /// same rule as `Capability::implies`, written out in SQL. Checked for a role of each
    /// capability alone, the owner (all of them) and a role with none, on a store
    /// migrated to 0007 with these roles in it.
    async fn migration_0008_follows_implies(url: &str, migrator: &sqlx::migrate::Migrator) {
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect(url).await.unwrap();
        for m in migrator.iter().filter(|m| m.version < 8) {
            sqlx::raw_sql(m.sql.clone())
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let old = &Capability::ALL[..10];
        let mut roles: Vec<(String, Vec<Capability>)> = old
            .iter()
            .map(|c| (c.as_str().to_owned(), vec![*c]))
            .collect();
        roles.push(("owner".into(), old.to_vec()));
        roles.push(("member".into(), vec![]));
        for (id, (name, caps)) in roles.iter().enumerate() {
            sqlx::query("INSERT INTO roles (id, name, created_at) VALUES ($1, $2, 0)")
                .bind(id as i64)
                .bind(name)
                .execute(&mut conn)
                .await
                .unwrap();
            for cap in caps {
                sqlx::query("INSERT INTO role_capabilities (role_id, capability) VALUES ($1, $2)")
                    .bind(id as i64)
                    .bind(cap.as_str())
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
        let m0008 = migrator.iter().find(|m| m.version == 8).unwrap();
        sqlx::raw_sql(m0008.sql.clone())
            .execute(&mut conn)
            .await
            .unwrap();
        for (id, (name, caps)) in roles.iter().enumerate() {
            let mut got: Vec<String> =
                sqlx::query_scalar("SELECT capability FROM role_capabilities WHERE role_id = $1")
                    .bind(id as i64)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            got.sort();
            let want: Vec<String> = Capability::closure(caps)
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect();
            assert_eq!(got, want, "role {name}");
        }
        let owner = roles.iter().position(|(n, _)| n == "owner").unwrap();
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM role_capabilities WHERE role_id = $1")
                .bind(owner as i64)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        // Every capability there was at 0008 (the first 15; migration 0021 adds the
        // later ones to existing roles).
        assert_eq!(n as usize, 15, "the owner reads everything");
    }

    #[tokio::test]
    async fn migration_0008_adds_the_reads_capability_implies_to_existing_roles_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        migration_0008_follows_implies(&url, &super::super::SQLITE_MIGRATIONS).await;
    }

    #[tokio::test]
    async fn migration_0008_adds_the_reads_capability_implies_to_existing_roles_postgres() {
        let cluster = mcpguard_pgcluster::Cluster::start(&[("fsync", "off")]).unwrap();
        let url = cluster.create_database("m").unwrap();
        migration_0008_follows_implies(&url, &super::super::POSTGRES_MIGRATIONS).await;
    }
}
