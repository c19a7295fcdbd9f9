//! Roles, users and admin tokens.

use super::{Db, DbBool, Result, now_ms};
use crate::auth::Capability;

/// Who an admin token belongs to, and what that user may do.
pub struct AdminIdentity {
    pub user_id: i64,
    pub token_hash: String,
    pub capabilities: Vec<Capability>,
}

/// Finds the live admin token with this hash, for an enabled user.
pub async fn authenticate(db: &Db, token_hash: &str) -> Result<Option<AdminIdentity>> {
    let row: Option<(i64, String, DbBool, i64)> = sqlx::query_as(
        "SELECT u.id, t.token_hash, u.enabled, u.role_id
         FROM admin_tokens t JOIN users u ON u.id = t.user_id
         WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?;
    let Some((user_id, token_hash, enabled, role_id)) = row else {
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
        token_hash,
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
    let mut tx = db.begin().await?;
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
