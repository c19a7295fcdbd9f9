//! The admin console's browser sessions and one-time sign-in links (migration 0022).
//! Both are looked up by the SHA-256 of their secret only.

use super::{Db, DbBool, Result, now_ms};
use crate::auth::Capability;

/// Who a live console session belongs to, and what that user may do now (read on
/// every request, so a role change or a disabled user counts from the next page).
pub struct SessionUser {
    pub session_id: i64,
    pub user_id: i64,
    pub name: String,
    pub capabilities: Vec<Capability>,
}

pub async fn open_session(db: &Db, token_hash: &str, user_id: i64, max_age_ms: i64) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO console_sessions (token_hash, user_id, created_at, last_seen_at, expires_at)
         VALUES ($1, $2, $3, $3, $4)",
    )
    .bind(token_hash)
    .bind(user_id)
    .bind(now)
    .bind(now + max_age_ms)
    .execute(db)
    .await?;
    Ok(())
}

/// The session with this hash if it was used within `idle_ms` and has not expired, for
/// an enabled user; marks it used now (the idle timeout counts from the last request).
pub async fn touch_session(db: &Db, token_hash: &str, idle_ms: i64) -> Result<Option<SessionUser>> {
    let now = now_ms();
    let row: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE console_sessions SET last_seen_at = $1
         WHERE token_hash = $2 AND last_seen_at > $3 AND expires_at > $1
         RETURNING id, user_id",
    )
    .bind(now)
    .bind(token_hash)
    .bind(now - idle_ms)
    .fetch_optional(db)
    .await?;
    let Some((session_id, user_id)) = row else {
        return Ok(None);
    };
    let user: Option<(String, DbBool, i64)> =
        sqlx::query_as("SELECT name, enabled, role_id FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    let Some((name, _, role_id)) = user.filter(|(_, enabled, _)| enabled.0) else {
        return Ok(None);
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT capability FROM role_capabilities WHERE role_id = $1")
            .bind(role_id)
            .fetch_all(db)
            .await?;
    let caps: Vec<Capability> = names.iter().filter_map(|n| Capability::parse(n)).collect();
    Ok(Some(SessionUser {
        session_id,
        user_id,
        name,
        capabilities: Capability::closure(&caps),
    }))
}

pub async fn close_session(db: &Db, token_hash: &str) -> Result<()> {
    sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
        .bind(token_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// Sessions idle past `idle_ms` or expired, and links past their expiry.
pub async fn purge(db: &Db, now: i64, idle_ms: i64) -> Result<u64> {
    let mut deleted =
        sqlx::query("DELETE FROM console_sessions WHERE expires_at < $1 OR last_seen_at < $2")
            .bind(now)
            .bind(now - idle_ms)
            .execute(db)
            .await?
            .rows_affected();
    deleted += sqlx::query("DELETE FROM console_links WHERE expires_at < $1")
        .bind(now)
        .execute(db)
        .await?
        .rows_affected();
    Ok(deleted)
}

/// The id of the user called `name`, if there is one.
pub async fn user_named(db: &Db, name: &str) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT id FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?)
}

pub async fn insert_link(db: &Db, code_hash: &str, user_id: i64, ttl_ms: i64) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO console_links (code_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(code_hash)
    .bind(user_id)
    .bind(now)
    .bind(now + ttl_ms)
    .execute(db)
    .await?;
    Ok(())
}

/// Whether a link with this hash is still usable (unused, not expired), without using it.
pub async fn link_usable(db: &Db, code_hash: &str) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM console_links WHERE code_hash = $1 AND used_at IS NULL AND expires_at > $2",
    )
    .bind(code_hash)
    .bind(now_ms())
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

/// Uses the link once: its user, if it was unused and not expired. A second use,
/// however close, finds it used (one UPDATE decides).
pub async fn use_link(db: &Db, code_hash: &str) -> Result<Option<i64>> {
    let now = now_ms();
    Ok(sqlx::query_scalar(
        "UPDATE console_links SET used_at = $1
         WHERE code_hash = $2 AND used_at IS NULL AND expires_at > $1
         RETURNING user_id",
    )
    .bind(now)
    .bind(code_hash)
    .fetch_optional(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db_with_owner() -> Db {
        let db = crate::store::open("sqlite::memory:", 1).await.unwrap();
        crate::store::users::bootstrap_owner(&db, &"0".repeat(64), "mcpga_x")
            .await
            .unwrap();
        db
    }

    #[tokio::test]
    async fn a_session_lives_while_used_and_ends_when_idle_or_closed() {
        let db = db_with_owner().await;
        open_session(&db, "h1", 1, 60_000).await.unwrap();
        let user = touch_session(&db, "h1", 60_000).await.unwrap().unwrap();
        assert_eq!((user.user_id, user.name.as_str()), (1, "owner"));
        assert_eq!(user.capabilities.len(), Capability::ALL.len());
        assert!(touch_session(&db, "other", 60_000).await.unwrap().is_none());
        // Idle for longer than the timeout (here: any time at all).
        assert!(touch_session(&db, "h1", -1).await.unwrap().is_none());
        close_session(&db, "h1").await.unwrap();
        assert!(touch_session(&db, "h1", 60_000).await.unwrap().is_none());
        // Past its absolute lifetime.
        open_session(&db, "h2", 1, -1).await.unwrap();
        assert!(touch_session(&db, "h2", 60_000).await.unwrap().is_none());
        assert_eq!(purge(&db, now_ms(), 60_000).await.unwrap(), 1);
        // A new password signs the user out of the console too.
        open_session(&db, "h3", 1, 60_000).await.unwrap();
        assert!(
            crate::store::signin::set_password(&db, 1, "$argon2id$x")
                .await
                .unwrap()
        );
        assert!(touch_session(&db, "h3", 60_000).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_link_works_once_and_not_after_expiry() {
        let db = db_with_owner().await;
        insert_link(&db, "c1", 1, 60_000).await.unwrap();
        assert!(link_usable(&db, "c1").await.unwrap());
        assert_eq!(use_link(&db, "c1").await.unwrap(), Some(1));
        assert!(!link_usable(&db, "c1").await.unwrap());
        assert_eq!(use_link(&db, "c1").await.unwrap(), None);
        insert_link(&db, "c2", 1, -1).await.unwrap();
        assert_eq!(use_link(&db, "c2").await.unwrap(), None);
        assert_eq!(use_link(&db, "nope").await.unwrap(), None);
    }
}
