//! The export's cursor and lease (one row, `audit_export`), and the entries after it.

use super::audit::{COLUMNS, Event};
use super::{Db, Result};

/// Takes the lease for `holder` until `until_ms`, or renews it: granted when nobody
/// holds it, the holder is `holder`, or the holder's lease ran out before `now_ms`.
pub async fn take_lease(db: &Db, holder: &str, now_ms: i64, until_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE audit_export SET holder = $1, lease_until = $2
         WHERE id = 1 AND (holder IS NULL OR holder = $1 OR lease_until < $3)",
    )
    .bind(holder)
    .bind(until_ms)
    .bind(now_ms)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The highest entry id the collector acknowledged.
pub async fn cursor(db: &Db) -> Result<i64> {
    let (cursor,): (i64,) = sqlx::query_as("SELECT cursor_id FROM audit_export WHERE id = 1")
        .fetch_one(db)
        .await?;
    Ok(cursor)
}

/// Moves the cursor forward to `to`, only while `holder` holds the lease: a replica
/// that lost it (paused past its lease) cannot move the new holder's cursor.
pub async fn advance(db: &Db, holder: &str, to: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE audit_export SET cursor_id = $1 WHERE id = 1 AND holder = $2 AND cursor_id < $1",
    )
    .bind(to)
    .bind(holder)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The highest entry id written (0 when the log is empty).
pub async fn last_id(db: &Db) -> Result<i64> {
    let (id,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM audit_events")
        .fetch_one(db)
        .await?;
    Ok(id.unwrap_or(0))
}

/// Entries with an id above `after`, oldest first, at most `limit`; `since` (inclusive)
/// and `until` (exclusive) bound their `at` when given.
pub async fn ascending(
    db: &Db,
    after: i64,
    since: Option<i64>,
    until: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_events
         WHERE id > $1 AND ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR at < $3)
         ORDER BY id ASC LIMIT $4"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(since)
        .bind(until)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_only_the_holder_moves_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_sqlite_file(&dir.path().join("t.db")).await;
        assert_eq!(cursor(&db).await.unwrap(), 0);
        assert!(take_lease(&db, "a", 1_000, 16_000).await.unwrap());
        // b is refused while a's lease runs, a renews it.
        assert!(!take_lease(&db, "b", 2_000, 17_000).await.unwrap());
        assert!(take_lease(&db, "a", 3_000, 18_000).await.unwrap());
        assert!(!advance(&db, "b", 5).await.unwrap());
        assert!(advance(&db, "a", 5).await.unwrap());
        // Never backwards.
        assert!(!advance(&db, "a", 3).await.unwrap());
        assert_eq!(cursor(&db).await.unwrap(), 5);
        // a stops renewing: once its lease ran out, b takes over, and a is fenced off.
        assert!(take_lease(&db, "b", 18_001, 33_000).await.unwrap());
        assert!(!advance(&db, "a", 9).await.unwrap());
        assert!(advance(&db, "b", 9).await.unwrap());
        assert_eq!(cursor(&db).await.unwrap(), 9);
    }
}
