//! The authoritative store, through sqlx's `Any` driver: SQLite by default, PostgreSQL
//! for scale-out, one set of queries for both (`$N` placeholders, or [`placeholders`]
//! where the number of values varies; BIGINT unix-ms times; flags read through
//! [`DbBool`]). Handlers never see sqlx types.

pub mod audit;
pub mod audit_export;
pub mod catalog;
pub mod check;
pub mod console;
pub mod enrollments;
pub mod features;
pub mod hosts;
pub mod identities;
pub mod oauth;
pub mod oauth_identities;
pub mod pg_reads;
pub mod reseal;
pub mod signin;
pub mod sqlite_reads;
pub mod teams;
pub mod toggles;
pub mod users;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyTypeInfo, AnyTypeInfoKind, AnyValueRef};
use sqlx::{AnyConnection, AnyPool, Connection};

pub type Db = AnyPool;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key already holds this value.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Key material could not be made (no randomness from the OS, or a key the crypto
    /// library refuses): nothing was stored.
    #[error("key material: {0}")]
    Keys(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // Every store call's error passes here: the one place to count pool timeouts.
        if let sqlx::Error::PoolTimedOut = e {
            crate::metrics::get().pool_acquire_timeout();
        }
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_owned()),
            _ => StoreError::Db(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How the pool talks to the database (`--db-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbOptions {
    /// Largest number of connections.
    pub max_connections: u32,
    /// Longest wait for a connection, connecting included.
    pub acquire_timeout: std::time::Duration,
    /// PostgreSQL: the session's `statement_timeout`; SQLite: `busy_timeout`.
    pub statement_timeout: std::time::Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 8,
            acquire_timeout: std::time::Duration::from_secs(1),
            statement_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// Opens the pool and brings the schema up to date: default options, this pool size.
pub async fn open(url: &str, max_connections: u32) -> Result<Db> {
    open_with(
        url,
        &DbOptions {
            max_connections,
            ..DbOptions::default()
        },
    )
    .await
}

/// A store in a new SQLite file at `path`, for unit tests.
#[cfg(test)]
pub async fn open_sqlite_file(path: &std::path::Path) -> Db {
    let url = format!("sqlite://{}?mode=rwc", path.display());
    open(&url, 2).await.unwrap()
}

/// Opens the pool and brings the schema up to date. Several replicas may do this at
/// once on one PostgreSQL database: sqlx's migrator holds an advisory lock.
pub async fn open_with(url: &str, options: &DbOptions) -> Result<Db> {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    if sqlite {
        // WAL lives in the file; switching to it needs an exclusive lock, so do it once
        // before the pool opens rather than racing in every new connection.
        let mut conn = AnyConnection::connect(url).await?;
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
    }
    // Whole milliseconds: the statements below are built from a number only.
    let statement_ms = options.statement_timeout.as_millis().max(1);
    let pool = AnyPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        // sqlx pings each connection before handing it out (its default): a connection
        // that died with a restarted server is replaced, not used. The check does not
        // pay for this ping: on a SQLite file and on PostgreSQL it reads on connections
        // of its own (check::Reads).
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if conn.backend_name() == "PostgreSQL" {
                    let limit = format!("SET statement_timeout = {statement_ms}");
                    sqlx::query(sqlx::AssertSqlSafe(limit))
                        .execute(&mut *conn)
                        .await?;
                }
                if conn.backend_name() == "SQLite" {
                    let busy = format!("PRAGMA busy_timeout = {statement_ms}");
                    sqlx::query(sqlx::AssertSqlSafe(busy))
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let migrations = if sqlite {
        &SQLITE_MIGRATIONS
    } else {
        &POSTGRES_MIGRATIONS
    };
    migrations.run(&pool).await?;
    Ok(pool)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A flag column: INTEGER 0/1 on SQLite, BOOLEAN on PostgreSQL. Bind plain `bool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbBool(pub bool);

impl sqlx::Type<sqlx::Any> for DbBool {
    fn type_info() -> AnyTypeInfo {
        <bool as sqlx::Type<sqlx::Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        matches!(ty.kind(), AnyTypeInfoKind::Bool) || ty.kind().is_integer()
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Any> for DbBool {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        use sqlx::ValueRef;
        if value.type_info().kind() == AnyTypeInfoKind::Bool {
            Ok(DbBool(<bool as sqlx::Decode<sqlx::Any>>::decode(value)?))
        } else {
            Ok(DbBool(
                <i64 as sqlx::Decode<sqlx::Any>>::decode(value)? != 0,
            ))
        }
    }
}

impl serde::Serialize for DbBool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(self.0)
    }
}

pub async fn ping(db: &Db) -> Result<()> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// `count` placeholders for values bound in order, the first of them the statement's
/// `first`th value: `$first, $first+1, …` on PostgreSQL, `?, ?, …` on SQLite. SQLite
/// finds each numbered parameter by a linear scan of the statement's parameter names
/// when it is bound (`sqlite3_bind_parameter_name`), so binding n of them costs n²;
/// a plain `?` has no name to look up. On SQLite a statement built with these must
/// not also use `$N`: sqlx numbers the `?`s apart from them. Statements with a variable
/// number of values are built with these, not sqlx's `QueryBuilder`, which writes `?`
/// through `Any` and PostgreSQL does not accept that.
pub(crate) fn placeholders(db: &Db, first: usize, count: usize) -> String {
    let sqlite = is_sqlite(db);
    (first..first + count)
        .map(|n| {
            if sqlite {
                "?".to_owned()
            } else {
                format!("${n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_sqlite(db: &Db) -> bool {
    db.connect_options().database_url.scheme() == "sqlite"
}

/// Splits `items` into chunks whose lengths are powers of two, at most `max` (itself a
/// power of two), largest first. Statements built per chunk then come in a few shapes
/// only (5 up to 16), which the per-connection statement cache holds; one shape per
/// batch size would fill it with large statements that are never reused (the policy
/// service grew to 240 MiB in `make bench`).
pub(crate) fn pow2_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    debug_assert!(max.is_power_of_two());
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = if rest.len() >= max {
            max
        } else {
            1 << rest.len().ilog2()
        };
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// A transaction that reads and then writes. On SQLite it takes the write lock up front
/// (`BEGIN IMMEDIATE`): a deferred transaction that tries to upgrade from reading to
/// writing while another connection has committed fails at once with "database is
/// locked", without waiting out the busy timeout.
pub async fn begin_write(db: &Db) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
    if is_sqlite(db) {
        Ok(db.begin_with("BEGIN IMMEDIATE").await?)
    } else {
        Ok(db.begin().await?)
    }
}

#[cfg(test)]
mod placeholder_tests {
    #[test]
    fn chunks_are_powers_of_two_that_cover_everything_in_order() {
        let items: Vec<u32> = (0..1_000).collect();
        let sizes: Vec<usize> = super::pow2_chunks(&items, 256).map(<[u32]>::len).collect();
        assert_eq!(sizes, [256, 256, 256, 128, 64, 32, 8]);
        let joined: Vec<u32> = super::pow2_chunks(&items, 256).flatten().copied().collect();
        assert_eq!(joined, items);
        assert_eq!(super::pow2_chunks(&items[..5], 256).count(), 2);
        assert_eq!(super::pow2_chunks::<u32>(&[], 256).count(), 0);
    }

    #[tokio::test]
    async fn placeholders_are_numbered_on_postgres_and_plain_on_sqlite() {
        sqlx::any::install_default_drivers();
        // Lazy pools: nothing connects, only the URL's scheme is read.
        let pool = |url| sqlx::any::AnyPoolOptions::new().connect_lazy(url).unwrap();
        let postgres = pool("postgres://mcpguard@127.0.0.1:1/none");
        assert_eq!(super::placeholders(&postgres, 3, 2), "$3, $4");
        assert_eq!(super::placeholders(&postgres, 1, 0), "");
        let sqlite = pool("sqlite::memory:");
        assert_eq!(super::placeholders(&sqlite, 3, 2), "?, ?");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::time::Duration;

    // The failure CI hit: a feature refresh read, another connection committed a write
    // (a token's last use), and the refresh's write then failed "database is locked" at
    // once, past any busy timeout. Under `begin_write` the other writer waits instead.
    #[tokio::test]
    async fn a_write_transaction_holds_the_lock_from_its_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sqlite_file(&dir.path().join("t.db")).await;
        sqlx::query("CREATE TABLE t (v INTEGER)")
            .execute(&db)
            .await
            .unwrap();
        let mut tx = begin_write(&db).await.unwrap();
        let _: (i64,) = sqlx::query_as("SELECT count(*) FROM t")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let other = {
            let db = db.clone();
            tokio::spawn(async move {
                sqlx::query("INSERT INTO t VALUES (1)")
                    .execute(&db)
                    .await
                    .map(|_| ())
            })
        };
        // Had the transaction begun deferred, this write would commit at once.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), async {
                while !other.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err(),
            "another connection wrote inside a write transaction's read"
        );
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        other.await.unwrap().unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM t")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    // Every transaction of the store writes: each must begin with `begin_write`.
    #[test]
    fn no_store_transaction_begins_deferred() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let source = std::fs::read_to_string(&path).unwrap();
            let code = source.split("#[cfg(test)]").next().unwrap_or("");
            let deferred = code
                .lines()
                .filter(|l| l.contains("db.begin()") && !l.contains("Ok(db.begin()"))
                .count();
            assert_eq!(deferred, 0, "{}: use begin_write", path.display());
        }
    }
}
