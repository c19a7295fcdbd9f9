//! The audit log table: appended in batches, read with keyset pagination (newest first,
//! by id), trimmed only by retention.

use serde::Serialize;

use super::{Db, Result, begin_write, placeholders, pow2_chunks};
use crate::timefmt;

/// One audit entry, as written and as read back.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct Event {
    pub id: i64,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub at: i64,
    pub kind: String,
    pub action: String,
    pub code: Option<String>,
    pub actor_user_id: Option<i64>,
    pub target: Option<String>,
    #[serde(serialize_with = "json_text")]
    pub before_state: Option<String>,
    #[serde(serialize_with = "json_text")]
    pub after_state: Option<String>,
    pub host_id: Option<i64>,
    pub user_id: Option<i64>,
    pub connection_id: Option<i64>,
    pub gateway: Option<String>,
    pub server: Option<String>,
    pub mcp_method: Option<String>,
    pub tool: Option<String>,
    pub latency_us: Option<i64>,
    pub request_id: Option<String>,
    /// Summary rows only: how many anonymous refusals with this `code` in the second
    /// starting at `at` were counted instead of written one by one (the audit budget,
    /// `--audit-anonymous-refusals-per-sec`). `None` on every other row.
    pub suppressed: Option<i64>,
}

/// States are stored as JSON text and shown as JSON.
fn json_text<S: serde::Serializer>(
    v: &Option<String>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v.as_deref().map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(json)) => json.serialize(s),
        Some(Err(_)) | None => s.serialize_none(),
    }
}

pub(super) const COLUMNS: &str = "id, at, kind, action, code, actor_user_id, target, before_state, after_state, host_id, \
     user_id, connection_id, gateway, server, mcp_method, tool, latency_us, request_id, suppressed";

/// Most rows per INSERT: a batch of 512 takes 32 statements (worker-thread round
/// trips) instead of 512. Kept small since numbered parameters made SQLite's binding
/// cost grow with the square of the parameters (a quarter of the policy service's CPU
/// at 256 rows); on SQLite the rows are now bound through plain `?` ([`placeholders`]).
const ROWS_PER_INSERT: usize = 16;

/// Appends events in one transaction (`id` is assigned by the database), many rows per
/// statement: one round trip per batch instead of one per event.
pub async fn append(db: &Db, events: &[Event]) -> Result<()> {
    const COLUMNS_PER_ROW: usize = 18;
    let mut tx = begin_write(db).await?;
    for chunk in pow2_chunks(events, ROWS_PER_INSERT) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|r| {
                format!(
                    "({})",
                    placeholders(db, r * COLUMNS_PER_ROW + 1, COLUMNS_PER_ROW)
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO audit_events (at, kind, action, code, actor_user_id, target, before_state, after_state,
                 host_id, user_id, connection_id, gateway, server, mcp_method, tool, latency_us, request_id, suppressed)
             VALUES {}",
            rows.join(", ")
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for e in chunk {
            insert = insert
                .bind(e.at)
                .bind(&e.kind)
                .bind(&e.action)
                .bind(&e.code)
                .bind(e.actor_user_id)
                .bind(&e.target)
                .bind(&e.before_state)
                .bind(&e.after_state)
                .bind(e.host_id)
                .bind(e.user_id)
                .bind(e.connection_id)
                .bind(&e.gateway)
                .bind(&e.server)
                .bind(&e.mcp_method)
                .bind(&e.tool)
                .bind(e.latency_us)
                .bind(&e.request_id)
                .bind(e.suppressed);
        }
        insert.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[derive(Debug, Default)]
pub struct Filter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub kind: Option<String>,
    pub host_id: Option<i64>,
    pub user_id: Option<i64>,
    pub gateway: Option<String>,
    /// `allow` or `deny` (decisions only).
    pub decision: Option<String>,
    /// Only entries with an id below this (the previous page's `next_cursor`).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Newest first. Unset filters match everything (`$n IS NULL OR ...`), so the SQL is
/// one fixed statement.
pub async fn query(db: &Db, f: &Filter) -> Result<Vec<Event>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_events
         WHERE ($1 IS NULL OR at >= $1) AND ($2 IS NULL OR at < $2)
           AND ($3 IS NULL OR kind = $3) AND ($4 IS NULL OR host_id = $4)
           AND ($5 IS NULL OR user_id = $5) AND ($6 IS NULL OR gateway = $6)
           AND ($7 IS NULL OR (kind = 'decision' AND action = $7))
           AND ($8 IS NULL OR id < $8)
         ORDER BY id DESC LIMIT $9"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(f.since)
        .bind(f.until)
        .bind(&f.kind)
        .bind(f.host_id)
        .bind(f.user_id)
        .bind(&f.gateway)
        .bind(&f.decision)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(db)
        .await?)
}

/// Deletes entries older than `cutoff`; returns how many.
pub async fn trim(db: &Db, cutoff: i64) -> Result<u64> {
    let done = sqlx::query("DELETE FROM audit_events WHERE at < $1")
        .bind(cutoff)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_spanning_several_statements_reads_back_field_for_field() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open_sqlite_file(&dir.path().join("t.db")).await;
        // 16 + 16 + 4 + 1 rows: every statement shape binds its values in order.
        let events: Vec<Event> = (0..37_i64)
            .map(|i| Event {
                at: 1_000 + i,
                kind: "decision".into(),
                action: if i % 2 == 0 { "allow" } else { "deny" }.into(),
                code: (i % 2 == 1).then(|| format!("code-{i}")),
                actor_user_id: (i % 3 == 0).then_some(i),
                target: Some(format!("target-{i}")),
                before_state: Some(format!("{{\"before\":{i}}}")),
                after_state: Some(format!("{{\"after\":{i}}}")),
                host_id: Some(100 + i),
                user_id: Some(200 + i),
                connection_id: Some(300 + i),
                gateway: Some(format!("gw-{i}")),
                server: Some(format!("srv-{i}")),
                mcp_method: Some("tools/call".into()),
                tool: (i % 5 != 0).then(|| format!("tool-{i}")),
                latency_us: Some(400 + i),
                request_id: Some(format!("req-{i}")),
                suppressed: (i % 7 == 0).then_some(i * 1_000),
                ..Event::default()
            })
            .collect();
        append(&db, &events).await.unwrap();
        let filter = Filter {
            limit: 100,
            ..Filter::default()
        };
        let mut read = query(&db, &filter).await.unwrap();
        read.reverse();
        assert_eq!(read.len(), events.len());
        for (wrote, read) in events.iter().zip(&read) {
            let fields = |e: &Event| {
                let mut e = e.clone();
                e.id = 0;
                format!("{e:?}")
            };
            assert_eq!(fields(read), fields(wrote));
        }
    }
}
