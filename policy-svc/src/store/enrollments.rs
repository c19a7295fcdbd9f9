//! Enrollments: one end user of a token-based host signs in on the enrollment page,
//! brings identities, and the agent then claims that user's per-user token, once.

use serde::Serialize;

use super::{Db, Result, begin_write, hosts, now_ms};
use crate::timefmt;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Enrollment {
    pub id: i64,
    pub host_id: i64,
    pub gateway_id: i64,
    pub user_id: i64,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub expires_at: i64,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub completed_at: Option<i64>,
    /// The per-user token the agent claimed (its id; the secret is never stored).
    pub token_id: Option<i64>,
}

/// Where an enrollment stands, from the agent's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the user.
    Pending,
    /// The user is done; the agent may claim the token.
    Completed,
    /// The agent has its token.
    Claimed,
    /// Not completed in time.
    Expired,
}

impl Enrollment {
    pub fn status(&self, now: i64) -> Status {
        match (self.token_id, self.completed_at) {
            (Some(_), _) => Status::Claimed,
            (None, Some(_)) => Status::Completed,
            (None, None) if now >= self.expires_at => Status::Expired,
            (None, None) => Status::Pending,
        }
    }
}

const COLUMNS: &str =
    "id, host_id, gateway_id, user_id, created_at, expires_at, completed_at, token_id";

pub struct NewEnrollment<'a> {
    pub host_id: i64,
    pub gateway_id: i64,
    pub user_id: i64,
    pub code_hash: &'a str,
    pub created_by: i64,
    pub expires_at: i64,
}

pub async fn create(db: &Db, e: &NewEnrollment<'_>) -> Result<Enrollment> {
    let sql = format!(
        "INSERT INTO enrollments (host_id, gateway_id, user_id, code_hash, created_by, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(e.host_id)
        .bind(e.gateway_id)
        .bind(e.user_id)
        .bind(e.code_hash)
        .bind(e.created_by)
        .bind(now_ms())
        .bind(e.expires_at)
        .fetch_one(db)
        .await?)
}

pub async fn get(db: &Db, id: i64) -> Result<Option<Enrollment>> {
    let sql = format!("SELECT {COLUMNS} FROM enrollments WHERE id = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(db)
        .await?)
}

pub async fn list_for_host(db: &Db, host_id: i64) -> Result<Vec<Enrollment>> {
    let sql = format!("SELECT {COLUMNS} FROM enrollments WHERE host_id = $1 ORDER BY id");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(host_id)
        .fetch_all(db)
        .await?)
}

/// Whether the user consented to the host acting for them on the gateway: they
/// completed an enrollment for exactly that host and gateway (signed in on its page
/// themselves). Claimed or not, and however long ago: consent is withdrawn by
/// disabling the connection (or the user), not by time.
pub async fn consented(db: &Db, host_id: i64, gateway_id: i64, user_id: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM enrollments
         WHERE host_id = $1 AND gateway_id = $2 AND user_id = $3 AND completed_at IS NOT NULL",
    )
    .bind(host_id)
    .bind(gateway_id)
    .bind(user_id)
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

/// The enrollment a link's secret (its SHA-256) opens.
pub async fn by_code(db: &Db, code_hash: &str) -> Result<Option<Enrollment>> {
    let sql = format!("SELECT {COLUMNS} FROM enrollments WHERE code_hash = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(code_hash)
        .fetch_optional(db)
        .await?)
}

/// What the enrollment page shows: who is asked to let which host act for them where.
#[derive(Debug, sqlx::FromRow)]
pub struct Names {
    pub user: String,
    pub host: String,
    pub gateway: String,
}

pub async fn names(db: &Db, e: &Enrollment) -> Result<Names> {
    Ok(sqlx::query_as(
        "SELECT u.name AS user, h.name AS host, g.name AS gateway
         FROM users u, hosts h, gateways g WHERE u.id = $1 AND h.id = $2 AND g.id = $3",
    )
    .bind(e.user_id)
    .bind(e.host_id)
    .bind(e.gateway_id)
    .fetch_one(db)
    .await?)
}

/// Marks it completed; false if it was completed already or has expired.
pub async fn complete(db: &Db, id: i64) -> Result<bool> {
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE enrollments SET completed_at = $1
         WHERE id = $2 AND completed_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Mints the per-user token of a completed enrollment, in one transaction with the
/// connection it is bound to: `None` if the enrollment is not completed or its token was
/// claimed already (also by a concurrent claim). Returns the token's id.
pub async fn claim(
    db: &Db,
    e: &Enrollment,
    token_hash: &str,
    prefix: &str,
    claimed_by: i64,
) -> Result<Option<i64>> {
    let mut tx = begin_write(db).await?;
    let connection_id = hosts::connect(&mut *tx, e.host_id, e.gateway_id, e.user_id).await?;
    let token_id = hosts::insert_token_row(
        &mut *tx,
        &hosts::NewToken {
            connection_id,
            token_hash,
            prefix,
            created_by: claimed_by,
            expires_at: None,
        },
    )
    .await?;
    let claimed = sqlx::query(
        "UPDATE enrollments SET token_id = $1
         WHERE id = $2 AND completed_at IS NOT NULL AND token_id IS NULL",
    )
    .bind(token_id)
    .bind(e.id)
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() != 1 {
        // Dropping the transaction rolls back the token just inserted.
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(token_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment(completed_at: Option<i64>, token_id: Option<i64>) -> Enrollment {
        Enrollment {
            id: 1,
            host_id: 1,
            gateway_id: 1,
            user_id: 2,
            created_at: 0,
            expires_at: 1_000,
            completed_at,
            token_id,
        }
    }

    #[test]
    fn status_follows_completion_claim_and_expiry() {
        assert_eq!(enrollment(None, None).status(999), Status::Pending);
        assert_eq!(enrollment(None, None).status(1_000), Status::Expired);
        // A completed enrollment can be claimed after its link expired.
        assert_eq!(enrollment(Some(5), None).status(5_000), Status::Completed);
        assert_eq!(enrollment(Some(5), Some(9)).status(5_000), Status::Claimed);
    }
}
