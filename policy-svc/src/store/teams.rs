//! Teams, their members, and the gateways granted to them: who may connect where.

use serde::Serialize;

use super::{Db, DbBool, Result, begin_write, now_ms};
use crate::timefmt;

/// Whether the user in column `$user` belongs to a team (or `everyone`) granted the
/// gateway in column `$gateway`: the one rule, written once for the check's statement
/// and for the admin and consent paths. A macro, so that each statement using it
/// stays one `&'static str`.
macro_rules! granted_sql {
    ($user:literal, $gateway:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM gateway_grants gg JOIN teams tm ON tm.id = gg.team_id
                WHERE gg.gateway_id = ",
            $gateway,
            " AND (tm.everyone = TRUE OR EXISTS (SELECT 1 FROM team_members m
                     WHERE m.team_id = gg.team_id AND m.user_id = ",
            $user,
            ")))"
        )
    };
}
pub(crate) use granted_sql;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Team {
    pub id: i64,
    pub name: String,
    /// The built-in team of every user: it has no member rows and cannot be deleted.
    pub everyone: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    /// Member user ids (none listed for `everyone`, which holds every user).
    #[sqlx(skip)]
    pub members: Vec<i64>,
    /// Ids of the gateways granted to the team.
    #[sqlx(skip)]
    pub gateways: Vec<i64>,
}

const TEAM_COLUMNS: &str = "id, name, everyone, created_at";

pub async fn create(db: &Db, name: &str) -> Result<Team> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO teams (name, everyone, created_at) VALUES ($1, $2, $3) RETURNING {TEAM_COLUMNS}"
    )))
    .bind(name)
    .bind(false)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

/// Every team with its members and grants, by id.
pub async fn list(db: &Db) -> Result<Vec<Team>> {
    let mut teams: Vec<Team> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {TEAM_COLUMNS} FROM teams ORDER BY id"
    )))
    .fetch_all(db)
    .await?;
    let members: Vec<(i64, i64)> =
        sqlx::query_as("SELECT team_id, user_id FROM team_members ORDER BY team_id, user_id")
            .fetch_all(db)
            .await?;
    let grants: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT team_id, gateway_id FROM gateway_grants ORDER BY team_id, gateway_id",
    )
    .fetch_all(db)
    .await?;
    for team in &mut teams {
        team.members = of_team(&members, team.id);
        team.gateways = of_team(&grants, team.id);
    }
    Ok(teams)
}

fn of_team(pairs: &[(i64, i64)], team: i64) -> Vec<i64> {
    pairs
        .iter()
        .filter(|(t, _)| *t == team)
        .map(|(_, id)| *id)
        .collect()
}

pub async fn get(db: &Db, id: i64) -> Result<Option<Team>> {
    Ok(list(db).await?.into_iter().find(|t| t.id == id))
}

/// Deletes a team (not `everyone`), its memberships and its grants, in one
/// transaction; connections stay, and are refused where no other team grants them.
/// `false`: no such team.
pub async fn delete(db: &Db, id: i64) -> Result<bool> {
    let mut tx = begin_write(db).await?;
    for sql in [
        "DELETE FROM team_members WHERE team_id = $1",
        "DELETE FROM gateway_grants WHERE team_id = $1",
    ] {
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    }
    let done = sqlx::query("DELETE FROM teams WHERE id = $1 AND everyone = $2")
        .bind(id)
        .bind(false)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected() > 0)
}

/// Adds a member; adding one twice is a no-op.
pub async fn add_member(db: &Db, team_id: i64, user_id: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO team_members (team_id, user_id, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (team_id, user_id) DO NOTHING",
    )
    .bind(team_id)
    .bind(user_id)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

/// `false`: the user was not a member.
pub async fn remove_member(db: &Db, team_id: i64, user_id: i64) -> Result<bool> {
    let done = sqlx::query("DELETE FROM team_members WHERE team_id = $1 AND user_id = $2")
        .bind(team_id)
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Grants a gateway to a team; granting twice is a no-op.
pub async fn grant<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    gateway_id: i64,
    team_id: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO gateway_grants (gateway_id, team_id, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (gateway_id, team_id) DO NOTHING",
    )
    .bind(gateway_id)
    .bind(team_id)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

/// `false`: the team was not granted the gateway.
pub async fn revoke(db: &Db, gateway_id: i64, team_id: i64) -> Result<bool> {
    let done = sqlx::query("DELETE FROM gateway_grants WHERE gateway_id = $1 AND team_id = $2")
        .bind(gateway_id)
        .bind(team_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The teams granted one gateway.
pub async fn of_gateway(db: &Db, gateway_id: i64) -> Result<Vec<Team>> {
    let granted: Vec<i64> =
        sqlx::query_scalar("SELECT team_id FROM gateway_grants WHERE gateway_id = $1")
            .bind(gateway_id)
            .fetch_all(db)
            .await?;
    Ok(list(db)
        .await?
        .into_iter()
        .filter(|t| granted.contains(&t.id))
        .collect())
}

/// The id of the built-in `everyone` team (migration 0021 made it).
pub async fn everyone<'e>(db: impl sqlx::Executor<'e, Database = sqlx::Any>) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT id FROM teams WHERE everyone = $1 ORDER BY id LIMIT 1")
            .bind(true)
            .fetch_one(db)
            .await?,
    )
}

/// Whether a team of `user_id` is granted `gateway_id`, with the check's rule.
pub async fn user_granted(db: &Db, user_id: i64, gateway_id: i64) -> Result<bool> {
    let granted: DbBool = sqlx::query_scalar(concat!("SELECT ", granted_sql!("$1", "$2")))
        .bind(user_id)
        .bind(gateway_id)
        .fetch_one(db)
        .await?;
    Ok(granted.0)
}

/// Whether the user's role holds `oauth.connect`: may they connect headed apps at all.
pub async fn may_connect_by_oauth(db: &Db, user_id: i64) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM users u JOIN role_capabilities rc ON rc.role_id = u.role_id
         WHERE u.id = $1 AND rc.capability = $2",
    )
    .bind(user_id)
    .bind(crate::auth::Capability::OauthConnect.as_str())
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use sqlx::{AnyConnection, Connection};

    use crate::auth::Capability;

    /// Migration 0021 on a store that holds data from before teams existed: two roles
    /// (one with no capability), three users, two gateways, a token-based and a headed
    /// host with connections. Afterwards every user is granted every gateway (through
    /// `everyone`), every role may connect by OAuth, the one managing users manages
    /// teams, and no host waits for approval.
    async fn migration_0021_keeps_existing_data_working(
        url: &str,
        migrator: &sqlx::migrate::Migrator,
    ) {
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect(url).await.unwrap();
        for m in migrator.iter().filter(|m| m.version < 21) {
            sqlx::raw_sql(m.sql.clone())
                .execute(&mut conn)
                .await
                .unwrap();
        }
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', 0), (2, 'member', 0)",
            "INSERT INTO role_capabilities (role_id, capability) VALUES (1, 'users.manage')",
            "INSERT INTO users (id, name, role_id, created_at) VALUES (1, 'owner', 1, 0), (2, 'ada', 2, 0), (3, 'bo', 2, 0)",
            "INSERT INTO gateways (id, name, slug, created_at) VALUES (1, 'Eng', 'eng', 0), (2, 'Ops', 'ops', 0)",
            "INSERT INTO hosts (id, name, kind, created_at) VALUES (1, 'Bot', 'token', 0), (2, 'App', 'oauth', 0)",
            "INSERT INTO connections (id, host_id, gateway_id, user_id, created_at) VALUES (1, 1, 1, 2, 0), (2, 2, 2, 3, 0)",
        ] {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        let m0021 = migrator.iter().find(|m| m.version == 21).unwrap();
        sqlx::raw_sql(m0021.sql.clone())
            .execute(&mut conn)
            .await
            .unwrap();

        let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
        let everyone =
            count("SELECT COUNT(*) FROM teams WHERE everyone = TRUE AND name = 'everyone'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(everyone, 1);
        for user in 1..=3_i64 {
            for gateway in 1..=2_i64 {
                let granted: crate::store::DbBool =
                    sqlx::query_scalar(concat!("SELECT ", granted_sql!("$1", "$2")))
                        .bind(user)
                        .bind(gateway)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                assert!(granted.0, "user {user} on gateway {gateway}");
            }
        }
        let connecting =
            count("SELECT COUNT(*) FROM role_capabilities WHERE capability = 'oauth.connect'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(connecting, 2, "both roles may still connect by OAuth");
        let kept = count("SELECT COUNT(*) FROM role_capabilities WHERE role_id = 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            kept, 3,
            "the owner's users.manage brings teams.manage; nothing else changed"
        );
        let members = count("SELECT COUNT(*) FROM role_capabilities WHERE role_id = 2")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            members, 1,
            "a role with no capability gets oauth.connect alone"
        );
        let waiting = count(
            "SELECT (SELECT COUNT(*) FROM hosts WHERE pending = TRUE)
                  + (SELECT COUNT(*) FROM gateways WHERE approve_hosts = TRUE)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(waiting, 0, "no host waits, no gateway approves hosts");
        assert!(Capability::parse("oauth.connect").is_some());
    }

    #[tokio::test]
    async fn migration_0021_keeps_existing_data_working_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        migration_0021_keeps_existing_data_working(&url, &super::super::SQLITE_MIGRATIONS).await;
    }

    #[tokio::test]
    async fn migration_0021_keeps_existing_data_working_postgres() {
        let cluster = mcpguard_pgcluster::Cluster::start(&[("fsync", "off")]).unwrap();
        let url = cluster.create_database("m").unwrap();
        migration_0021_keeps_existing_data_working(&url, &super::super::POSTGRES_MIGRATIONS).await;
    }
}
