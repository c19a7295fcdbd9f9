//! The check's storage: the one read of the authoritative store per request (the row,
//! its statements, and where it is read from). The decision on it is `crate::check`'s.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::pg_reads::PgReads;
use super::sqlite_reads::SqliteReads;
use super::{Db, DbBool, Result, StoreError};

/// Everything the decision needs, read in one query.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CheckRow {
    pub token_id: i64,
    pub token_hash: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub connection_id: i64,
    pub host_id: i64,
    pub user_id: i64,
    pub connection_enabled: DbBool,
    pub host_enabled: DbBool,
    pub user_enabled: DbBool,
    pub gateway_slug: String,
    pub gateway_enabled: DbBool,
    pub server_enabled: Option<DbBool>,
    pub upstream_scheme: Option<String>,
    pub upstream_authority: Option<String>,
    pub upstream_path: Option<String>,
    /// `shared` or `per_user`; `None` when the gateway does not expose the server.
    pub identity: Option<String>,
    pub server_id: Option<i64>,
    /// The connection user's identity for this server, if they have one.
    pub identity_id: Option<i64>,
    pub identity_enabled: Option<DbBool>,
    pub identity_header: Option<String>,
    pub identity_sealed: Option<Vec<u8>>,
    pub gateway_id: i64,
    /// The exposure's shared credential, if it has one.
    pub shared_header: Option<String>,
    pub shared_sealed: Option<Vec<u8>>,
    /// A headed host still waiting for an admin's approval.
    pub host_pending: DbBool,
    /// Whether one of the connection user's teams (or `everyone`) is granted the
    /// gateway: read on every request, so leaving a team or losing the grant refuses
    /// the next one.
    pub gateway_granted: DbBool,
    /// The exposure's feature provisioning modes (`allow_all`, ...), `None` when the
    /// gateway does not expose the server.
    pub tools_mode: Option<String>,
    pub prompts_mode: Option<String>,
    pub resources_mode: Option<String>,
    /// The identity's OAuth state (`connected`, `needs_reconnect`), `None` for a
    /// credential set by hand; when its access token expires and when to refresh it.
    pub identity_oauth_status: Option<String>,
    pub identity_oauth_expires_at: Option<i64>,
    pub identity_oauth_refresh_at: Option<i64>,
    /// A shared exposure that sends one user's identity for every caller (a service
    /// account): that user. The `identity_*` columns are then that user's identity.
    pub shared_user_id: Option<i64>,
}

impl CheckRow {
    /// Whose identity the server is reached with: the caller's on a per-user exposure,
    /// the service account's on a shared one that names one; `None` otherwise (a
    /// sealed header or nothing).
    pub fn identity_owner(&self) -> Option<i64> {
        match self.identity.as_deref()? {
            "per_user" => Some(self.user_id),
            _ => self.shared_user_id,
        }
    }
}

/// The check's one statement, for a credential read from `$credential`: every layer
/// behind the connection (host, user, gateway, server, exposure, identity) is joined the
/// same way for every kind of credential, so a layer added here applies to all of them.
/// A macro, so that each statement stays one `&'static str`.
macro_rules! check_select {
    ($credential_columns:literal, $credential:literal, $matches:literal) => {
        concat!(
            "SELECT ",
            $credential_columns,
            ",
                c.id AS connection_id, c.host_id, c.user_id, c.enabled AS connection_enabled,
                h.enabled AS host_enabled, u.enabled AS user_enabled,
                g.slug AS gateway_slug, g.enabled AS gateway_enabled,
                s.enabled AS server_enabled, s.upstream_scheme, s.upstream_authority,
                s.upstream_path, e.identity, s.id AS server_id,
                i.id AS identity_id, i.enabled AS identity_enabled,
                i.header_name AS identity_header, i.sealed AS identity_sealed,
                g.id AS gateway_id, e.credential_header AS shared_header, e.credential_sealed AS shared_sealed,
                h.pending AS host_pending,
                ",
            $crate::store::teams::granted_sql!("c.user_id", "g.id"),
            " AS gateway_granted,
                e.tools_mode, e.prompts_mode, e.resources_mode,
                i.oauth_status AS identity_oauth_status, i.oauth_expires_at AS identity_oauth_expires_at,
                i.oauth_refresh_at AS identity_oauth_refresh_at,
                e.credential_user_id AS shared_user_id
         FROM ",
            $credential,
            "
         JOIN hosts h ON h.id = c.host_id
         JOIN users u ON u.id = c.user_id
         JOIN gateways g ON g.id = c.gateway_id
         LEFT JOIN servers s ON s.slug = $2
         LEFT JOIN exposures e ON e.gateway_id = g.id AND e.server_id = s.id
         LEFT JOIN identities i ON i.user_id = COALESCE(e.credential_user_id, c.user_id)
                                AND i.server_id = s.id
         WHERE ",
            $matches
        )
    };
}

/// The statement for an API token, by its hash (`$1`), and the server's slug (`$2`).
pub(crate) const API_TOKEN_SELECT: &str = check_select!(
    "t.id AS token_id, t.token_hash, t.expires_at, t.revoked_at",
    "api_tokens t JOIN connections c ON c.id = t.connection_id",
    "t.token_hash = $1"
);

/// The same row for an OAuth access token, read through its grant (`$1`): `token_id` is
/// the grant's id, `revoked_at` the grant's (revoking the family stops its access
/// tokens), `token_hash` empty and `expires_at` none (the filter checked the JWT's expiry).
pub(crate) const OAUTH_SELECT: &str = check_select!(
    "gr.id AS token_id, '' AS token_hash, CAST(NULL AS BIGINT) AS expires_at, gr.revoked_at",
    "oauth_grants gr JOIN connections c ON c.id = gr.connection_id",
    "gr.id = $1"
);

/// The [`CheckRow`] of a row read by index, in the statements' column order (the order
/// of [`CheckRow`]'s fields): `$row.$get(i)` reads a column, `$flag(i)` and
/// `$maybe_flag(i)` a flag and a nullable flag, each a `Result`. For the read paths
/// whose rows are not sqlx's (sqlx maps by name, through `FromRow`).
macro_rules! check_row_by_index {
    ($row:ident . $get:ident, $flag:ident, $maybe_flag:ident) => {
        CheckRow {
            token_id: $row.$get(0)?,
            token_hash: $row.$get(1)?,
            expires_at: $row.$get(2)?,
            revoked_at: $row.$get(3)?,
            connection_id: $row.$get(4)?,
            host_id: $row.$get(5)?,
            user_id: $row.$get(6)?,
            connection_enabled: $flag(7)?,
            host_enabled: $flag(8)?,
            user_enabled: $flag(9)?,
            gateway_slug: $row.$get(10)?,
            gateway_enabled: $flag(11)?,
            server_enabled: $maybe_flag(12)?,
            upstream_scheme: $row.$get(13)?,
            upstream_authority: $row.$get(14)?,
            upstream_path: $row.$get(15)?,
            identity: $row.$get(16)?,
            server_id: $row.$get(17)?,
            identity_id: $row.$get(18)?,
            identity_enabled: $maybe_flag(19)?,
            identity_header: $row.$get(20)?,
            identity_sealed: $row.$get(21)?,
            gateway_id: $row.$get(22)?,
            shared_header: $row.$get(23)?,
            shared_sealed: $row.$get(24)?,
            host_pending: $flag(25)?,
            gateway_granted: $flag(26)?,
            tools_mode: $row.$get(27)?,
            prompts_mode: $row.$get(28)?,
            resources_mode: $row.$get(29)?,
            identity_oauth_status: $row.$get(30)?,
            identity_oauth_expires_at: $row.$get(31)?,
            identity_oauth_refresh_at: $row.$get(32)?,
            shared_user_id: $row.$get(33)?,
        }
    };
}
pub(crate) use check_row_by_index;

/// What the check's row is looked up by: the credential the request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// An API token's hash, in hex.
    ApiToken(&'a str),
    /// An OAuth access token's grant.
    Grant(i64),
}

/// Why a check has no row to decide on: it is refused with `policy_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no answer from the store within {} ms", .0.as_millis())]
    Deadline(Duration),
    #[error(transparent)]
    Store(StoreError),
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(tokio_postgres::Error),
}

/// Where checks read their row: [`SqliteReads`] on a SQLite file, [`PgReads`] on
/// PostgreSQL, else the pool.
#[derive(Debug, Clone)]
pub enum Reads {
    Pool(Db),
    Sqlite(Arc<SqliteReads>),
    Postgres(Arc<PgReads>),
}

impl Reads {
    /// For the store at `url`, which `db` is the pool of. On PostgreSQL, `deadline` (the
    /// check's) is also the read connections' `statement_timeout`.
    pub fn for_store(db: &Db, url: &str, deadline: Duration) -> Reads {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            match tokio_postgres::Config::from_str(url) {
                Ok(config) => {
                    return Reads::Postgres(Arc::new(PgReads::new(
                        config,
                        pg_read_connections(),
                        deadline,
                    )));
                }
                // sqlx accepts a few URL options of its own; the check still works
                // through the pool, with its extra round trip per check (BENCHMARKS.md).
                Err(e) => tracing::warn!(
                    error = %e,
                    "the database URL is not one tokio-postgres reads: checks read through the pool"
                ),
            }
        }
        let file = url
            .starts_with("sqlite:")
            .then(|| sqlx::sqlite::SqliteConnectOptions::from_str(url).ok())
            .flatten()
            .map(|o| o.get_filename().to_path_buf())
            // An in-memory database has a made-up name and lives only in its connections.
            .filter(|path| path.is_file());
        match file {
            Some(path) => Reads::Sqlite(Arc::new(SqliteReads::new(path))),
            None => Reads::Pool(db.clone()),
        }
    }

    /// The row for `credential` and `server`, or `None` when the credential is unknown;
    /// an error when the store gave no answer within `deadline`.
    ///
    /// A forged token with a valid format (prefix, length, checksum) costs one indexed
    /// read here, deliberately: unknown credentials are not cached, since a negative
    /// cache would go on refusing a token issued a moment ago (on any replica), and a
    /// cache of check results is one more place a revocation must reach in time. What
    /// bounds that cost is the operator's rate limit in Envoy
    /// (`envoy/examples/ratelimit.yaml`); the audit budget bounds the rows it writes.
    pub async fn load(
        &self,
        credential: Lookup<'_>,
        server: &str,
        deadline: Duration,
    ) -> Result<Option<CheckRow>, ReadError> {
        match self {
            Reads::Pool(db) => {
                within(deadline, load(db, credential, server), ReadError::Store).await
            }
            Reads::Sqlite(reads) => reads.load(credential, server, deadline),
            Reads::Postgres(reads) => reads.load(credential, server, deadline).await,
        }
    }
}

/// `read`'s answer, its error through `error`, or [`ReadError::Deadline`] once
/// `deadline` has passed (`read` is then dropped).
pub(crate) async fn within<T, E>(
    deadline: Duration,
    read: impl Future<Output = std::result::Result<T, E>>,
    error: impl FnOnce(E) -> ReadError,
) -> Result<T, ReadError> {
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ReadError::Deadline(deadline))?
        .map_err(error)
}

/// One pipelined connection per runtime worker thread: enough to keep as many
/// PostgreSQL backends busy as there are threads sending them checks.
fn pg_read_connections() -> usize {
    tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers())
}

async fn load(db: &Db, credential: Lookup<'_>, server: &str) -> Result<Option<CheckRow>> {
    let query = match credential {
        Lookup::ApiToken(hash) => sqlx::query_as(API_TOKEN_SELECT).bind(hash),
        Lookup::Grant(grant) => sqlx::query_as(OAUTH_SELECT).bind(grant),
    };
    Ok(query.bind(server).fetch_optional(db).await?)
}

/// The store the read paths are tested on, SQLite and PostgreSQL alike.
#[cfg(test)]
pub(crate) mod fixture {
    use std::time::Duration;

    use super::{CheckRow, Lookup, ReadError, Reads};
    use crate::store::{Db, DbBool};

    pub const SECOND: Duration = Duration::from_secs(1);

    /// Gateway `eng` exposing `demo` (shared, with a service credential) and `pu`
    /// (per-user; the user has an identity there), and `off` exposed nowhere; one
    /// connection with API token `aa…` (expiring) and OAuth grant 5 (revoked); the
    /// user's team granted the gateway.
    pub async fn seed(db: &Db) {
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', 1)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'owner', 1, TRUE, 1)",
            "INSERT INTO gateways (id, name, slug, enabled, created_at) VALUES (3, 'Eng', 'eng', TRUE, 1)",
            "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at) VALUES
             (1, 'Demo', 'demo', 'http', '127.0.0.1:9100', '/mcp', TRUE, 1),
             (2, 'Per user', 'pu', 'https', 'pu.example:443', '/', FALSE, 1),
             (4, 'Off', 'off', 'http', 'off.example:80', '/x', TRUE, 1)",
            "INSERT INTO hosts (id, name, kind, enabled, created_at) VALUES (1, 'Bot', 'token', FALSE, 1)",
            "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at) VALUES (6, 1, 3, 1, TRUE, 1)",
            "INSERT INTO api_tokens (id, connection_id, token_hash, prefix, created_by, created_at, expires_at) VALUES (7, 6, 'aa', 'mcpgt_aa', 1, 1, 99)",
            "INSERT INTO oauth_clients (id, client_id, client_name, redirect_uris, host_id, created_at) VALUES (1, 'c', 'C', '[]', 1, 1)",
            "INSERT INTO oauth_grants (id, client_id, user_id, connection_id, resource, created_at, revoked_at) VALUES (5, 1, 1, 6, 'r', 1, 42)",
            // The user's team (not `everyone`) is granted the gateway.
            "INSERT INTO teams (id, name, everyone, created_at) VALUES (7, 'Eng team', FALSE, 1)",
            "INSERT INTO team_members (team_id, user_id, created_at) VALUES (7, 1, 1)",
            "INSERT INTO gateway_grants (gateway_id, team_id, created_at) VALUES (3, 7, 1)",
        ] {
            sqlx::query(sql).execute(db).await.unwrap();
        }
        // Blobs are bound: SQLite and PostgreSQL write their literals differently.
        sqlx::query(
            "INSERT INTO exposures (gateway_id, server_id, identity, created_at, credential_header, credential_sealed) VALUES
             (3, 1, 'shared', 1, 'x-api-key', $1), (3, 2, 'per_user', 1, NULL, NULL)",
        )
        .bind(vec![1u8, 2])
        .execute(db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO identities (id, user_id, server_id, header_name, sealed, enabled, created_at) VALUES (9, 1, 2, 'authorization', $1, FALSE, 1)",
        )
        .bind(vec![0xffu8, 0])
        .execute(db)
        .await
        .unwrap();
    }

    /// A read of a store kept locked past its 100 ms deadline was refused at the deadline.
    pub fn assert_refused_at_deadline(
        refused: &Result<Option<CheckRow>, ReadError>,
        took: Duration,
    ) {
        assert!(
            matches!(refused, Err(ReadError::Deadline(_))),
            "{refused:?}"
        );
        assert!(
            took >= Duration::from_millis(90) && took < Duration::from_millis(900),
            "took {took:?}"
        );
    }

    /// `reads` finds what the pool finds in the [`seed`]ed store `db`, field for field.
    pub async fn reads_like_the_pool(reads: &Reads, db: Db) {
        let pool = Reads::Pool(db);
        let mut found = 0;
        for credential in [
            Lookup::ApiToken("aa"),
            Lookup::ApiToken("bb"),
            Lookup::Grant(5),
            Lookup::Grant(6),
        ] {
            for server in ["demo", "pu", "off", "none"] {
                let expected = pool.load(credential, server, SECOND).await.unwrap();
                let row = reads.load(credential, server, SECOND).await.unwrap();
                assert_eq!(row, expected, "{credential:?} {server}");
                found += usize::from(row.is_some());
            }
        }
        // A row for each known credential and server name (a server unknown or not
        // exposed is the decision's to refuse); none for the unknown credentials.
        assert_eq!(found, 8);
        let load = |credential, server| async move {
            reads
                .load(credential, server, SECOND)
                .await
                .unwrap()
                .unwrap()
        };
        let row = load(Lookup::ApiToken("aa"), "pu").await;
        assert_eq!(
            (row.identity_id, row.identity_enabled, row.server_enabled),
            (Some(9), Some(DbBool(false)), Some(DbBool(false)))
        );
        assert_eq!(row.identity_sealed, Some(vec![0xff, 0]));
        assert_eq!(row.expires_at, Some(99));
        assert!(!row.host_enabled.0 && row.user_enabled.0);
        assert!(row.gateway_granted.0 && !row.host_pending.0);
        let row = load(Lookup::Grant(5), "demo").await;
        assert_eq!(
            (row.revoked_at, row.shared_sealed),
            (Some(42), Some(vec![1, 2]))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_is_read_over_its_own_connections_unless_the_url_is_sqlx_only() {
        sqlx::any::install_default_drivers();
        let kind = |url: &str| {
            // A lazy pool: nothing connects, and neither do the reads before a check.
            let db = sqlx::any::AnyPoolOptions::new().connect_lazy(url).unwrap();
            match Reads::for_store(&db, url, Duration::from_millis(200)) {
                Reads::Pool(_) => "pool",
                Reads::Sqlite(_) => "sqlite",
                Reads::Postgres(_) => "postgres",
            }
        };
        assert_eq!(kind("postgres://mcpguard:pw@127.0.0.1:1/db"), "postgres");
        assert_eq!(
            kind("postgresql://127.0.0.1:1/db?sslmode=disable"),
            "postgres"
        );
        assert_eq!(
            kind("postgres://127.0.0.1:1/db?statement-cache-capacity=10"),
            "pool"
        );
        // An in-memory SQLite database lives only in the pool's connections.
        assert_eq!(kind("sqlite::memory:"), "pool");
    }
}
