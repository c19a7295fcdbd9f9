//! Users' passwords, and the sign-in throttle's state (`crate::signin` decides): one
//! throttle record per (user name, client) and one budget per user name, whether or not
//! such a user exists. Reserving an attempt reads and writes both in one transaction
//! that holds their rows, so that parallel attempts, on one replica or several on
//! PostgreSQL, are decided one after the other.

use super::{Db, DbBool, Result, begin_write, now_ms};
use crate::signin::{self, Reservation, SourceState};

/// Reserves an attempt under `name` from `client` at `now`: counted as a failure
/// before the password is verified. Nothing is written when it is throttled.
pub async fn reserve(db: &Db, name: &str, client: &str, now: i64) -> Result<Reservation> {
    let mut tx = begin_write(db).await?;
    // Each upsert locks its row on PostgreSQL (SQLite's BEGIN IMMEDIATE holds the whole
    // database) and returns the latest committed values. Always the name's row first,
    // then the client's, so two attempts never wait for each other in a circle.
    let account_tat: i64 = sqlx::query_scalar(
        "INSERT INTO signin_accounts (name, tat) VALUES ($1, 0)
         ON CONFLICT (name) DO UPDATE SET tat = signin_accounts.tat
         RETURNING tat",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    let (failures, next_at, last_at): (i64, i64, i64) = sqlx::query_as(
        "INSERT INTO signin_sources (name, client, failures, next_at, last_at)
         VALUES ($1, $2, 0, 0, 0)
         ON CONFLICT (name, client) DO UPDATE SET failures = signin_sources.failures
         RETURNING failures, next_at, last_at",
    )
    .bind(name)
    .bind(client)
    .fetch_one(&mut *tx)
    .await?;
    let source = SourceState {
        failures,
        next_at,
        last_at,
    };
    let decision = signin::reserve(now, source, account_tat);
    let Reservation::Allowed {
        source,
        account_tat,
    } = decision
    else {
        tx.rollback().await?;
        return Ok(decision);
    };
    sqlx::query("UPDATE signin_accounts SET tat = $1 WHERE name = $2")
        .bind(account_tat)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE signin_sources SET failures = $1, next_at = $2, last_at = $3
         WHERE name = $4 AND client = $5",
    )
    .bind(source.failures)
    .bind(source.next_at)
    .bind(source.last_at)
    .bind(name)
    .bind(client)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(decision)
}

/// A correct password from `client`: its failures under `name` are forgiven. The
/// name's budget is left as it is (it refills with time).
pub async fn succeeded(db: &Db, name: &str, client: &str) -> Result<()> {
    sqlx::query("DELETE FROM signin_sources WHERE name = $1 AND client = $2")
        .bind(name)
        .bind(client)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes records that no longer hold anything back: clients forgotten (a day after
/// their last attempt) and budgets full again. Returns the number of rows deleted.
pub async fn purge(db: &Db, now: i64) -> Result<u64> {
    let sources = sqlx::query("DELETE FROM signin_sources WHERE last_at < $1 AND next_at < $2")
        .bind(now - signin::SOURCE_MEMORY_MS)
        .bind(now)
        .execute(db)
        .await?
        .rows_affected();
    let accounts = sqlx::query("DELETE FROM signin_accounts WHERE tat < $1")
        .bind(now)
        .execute(db)
        .await?
        .rows_affected();
    Ok(sources + accounts)
}

/// An enabled user's id and password hash, by name.
pub async fn password_of(db: &Db, name: &str) -> Result<Option<(i64, Option<String>, DbBool)>> {
    Ok(
        sqlx::query_as("SELECT id, password_hash, enabled FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(db)
            .await?,
    )
}

/// Sets a user's password hash and ends everything the old password opened: the
/// user's sign-in sessions (OAuth pages and console), and their OAuth grants (refresh tokens at once, access
/// tokens on their next request, as the check reads the grant). Codes not yet
/// exchanged are spent, so none becomes a grant afterwards. False if there is no such
/// user (nothing changes).
pub async fn set_password(db: &Db, user_id: i64, hash: &str) -> Result<bool> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    for ended in [
        "DELETE FROM oauth_sessions WHERE user_id = $1",
        "DELETE FROM console_sessions WHERE user_id = $1",
    ] {
        sqlx::query(ended).bind(user_id).execute(&mut *tx).await?;
    }
    sqlx::query(
        "UPDATE oauth_grants SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signin::FREE_FAILURES;

    #[tokio::test]
    async fn parallel_attempts_are_reserved_one_after_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_sqlite_file(&dir.path().join("t.db")).await;
        let now = 1_000_000_000;
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..12 {
            let db = db.clone();
            attempts.spawn(async move { reserve(&db, "alice", "10.0.0.1", now).await });
        }
        let decided: Vec<Reservation> = attempts
            .join_all()
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let allowed = decided
            .iter()
            .filter(|d| matches!(d, Reservation::Allowed { .. }))
            .count();
        assert_eq!(allowed, usize::try_from(FREE_FAILURES).unwrap());
        // Another client under the same name is not held back, nor is the same client
        // under another name.
        for (name, client) in [("alice", "10.0.0.2"), ("bob", "10.0.0.1")] {
            assert!(matches!(
                reserve(&db, name, client, now).await.unwrap(),
                Reservation::Allowed { .. }
            ));
        }
        // A success forgives the client; a day on, the rest is purged.
        succeeded(&db, "alice", "10.0.0.1").await.unwrap();
        assert!(matches!(
            reserve(&db, "alice", "10.0.0.1", now).await.unwrap(),
            Reservation::Allowed { .. }
        ));
        assert_eq!(purge(&db, now).await.unwrap(), 0);
        assert_eq!(
            purge(&db, now + signin::SOURCE_MEMORY_MS + 60_000)
                .await
                .unwrap(),
            5
        );
    }
}
