//! The check's store read on SQLite, through `rusqlite` on the request's own thread.
//!
//! Through sqlx, a SQLite statement is a round trip to its connection's worker thread,
//! and the pool pings each connection it takes back: two thread wake-ups per check, the
//! largest cost of a check in `make bench`. The check is one indexed read of a database
//! that lives in the page cache, so it runs right where the request is served, on
//! connections of its own, and costs about 40% less CPU (BENCHMARKS.md). The statement
//! is the one sqlx runs on PostgreSQL.
//!
//! A read can hold its thread only so long: SQLite's busy handler gives up on a locked
//! database at the check's deadline, and a progress handler interrupts a statement that
//! runs past it. Either way the check is refused with 503, as a slow pool read is.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, ToSql};

use super::DbBool;
use super::check::{
    API_TOKEN_SELECT, CheckRow, Lookup, OAUTH_SELECT, ReadError, check_row_by_index,
};

/// SQLite calls the progress handler every this many virtual-machine steps: a check
/// runs a few hundred, so a statement past its deadline is cut within microseconds.
const PROGRESS_STEPS: i32 = 100;

/// Connections to one SQLite file, each used by one read at a time. A read holds its
/// connection only while it runs on a thread, so there are never more of them than
/// threads that serve checks; none is opened until a check needs it.
pub struct SqliteReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReads")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Locked by another connection, or still running, at the deadline: the busy handler
/// and the progress handler end a read with these codes.
fn read_error(e: rusqlite::Error, deadline: Duration) -> ReadError {
    match e.sqlite_error_code() {
        Some(ErrorCode::OperationInterrupted | ErrorCode::DatabaseBusy) => {
            ReadError::Deadline(deadline)
        }
        _ => ReadError::Sqlite(e),
    }
}

impl SqliteReads {
    /// Reads from the SQLite file at `path`.
    pub fn new(path: PathBuf) -> Self {
        SqliteReads {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The check's row for `credential` and `server`; `None` when the credential is
    /// unknown. Gives up once `deadline` has passed.
    pub fn load(
        &self,
        credential: Lookup<'_>,
        server: &str,
        deadline: Duration,
    ) -> Result<Option<CheckRow>, ReadError> {
        self.try_load(credential, server, deadline)
            .map_err(|e| read_error(e, deadline))
    }

    fn try_load(
        &self,
        credential: Lookup<'_>,
        server: &str,
        deadline: Duration,
    ) -> rusqlite::Result<Option<CheckRow>> {
        let conn = match self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let started = Instant::now();
        conn.busy_timeout(deadline)?;
        conn.progress_handler(PROGRESS_STEPS, Some(move || started.elapsed() > deadline))?;
        let row = read(&conn, credential, server)?;
        // Only a connection that served its read goes back: one that failed is dropped,
        // and the next read opens a new one.
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        Ok(row)
    }

    fn connect(&self) -> rusqlite::Result<Connection> {
        // Opened read-write as the pool's connections are (a read-only connection to a
        // WAL database opens only under extra conditions), but `query_only`: it never
        // writes.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }
}

fn read(
    conn: &Connection,
    credential: Lookup<'_>,
    server: &str,
) -> rusqlite::Result<Option<CheckRow>> {
    let (statement, key): (&str, &dyn ToSql) = match &credential {
        Lookup::ApiToken(hash) => (API_TOKEN_SELECT, hash),
        Lookup::Grant(grant) => (OAUTH_SELECT, grant),
    };
    // SQLite numbers parameters in order of first use, and `$2` comes first in the
    // statement: bind by name.
    conn.prepare_cached(statement)?
        .query_row(&[("$1", key), ("$2", &server)], check_row)
        .optional()
}

/// The check's row, column by column.
fn check_row(r: &Row<'_>) -> rusqlite::Result<CheckRow> {
    let flag = |i: usize| r.get::<_, i64>(i).map(|v| DbBool(v != 0));
    let maybe_flag = |i: usize| {
        r.get::<_, Option<i64>>(i)
            .map(|v| v.map(|v| DbBool(v != 0)))
    };
    Ok(check_row_by_index!(r.get, flag, maybe_flag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::check::Reads;
    use crate::store::check::fixture::{
        SECOND, assert_refused_at_deadline, reads_like_the_pool, seed,
    };
    use crate::store::{self, Db};

    async fn store() -> (tempfile::TempDir, PathBuf, Db) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = store::open_sqlite_file(&path).await;
        seed(&db).await;
        (dir, path, db)
    }

    #[tokio::test]
    async fn reads_the_same_rows_as_the_pool() {
        let (_dir, path, db) = store().await;
        let reads = Reads::Sqlite(std::sync::Arc::new(SqliteReads::new(path)));
        reads_like_the_pool(&reads, db).await;
    }

    #[tokio::test]
    async fn a_change_is_seen_by_the_next_read() {
        let (_dir, path, db) = store().await;
        let reads = SqliteReads::new(path);
        let enabled = |reads: &SqliteReads| {
            let row = reads.load(Lookup::ApiToken("aa"), "demo", SECOND).unwrap();
            row.unwrap().host_enabled.0
        };
        assert!(!enabled(&reads));
        sqlx::query("UPDATE hosts SET enabled = 1")
            .execute(&db)
            .await
            .unwrap();
        assert!(enabled(&reads), "the connection kept an old snapshot");
    }

    #[tokio::test]
    async fn a_locked_database_is_given_up_at_the_deadline_and_read_again_after() {
        let (_dir, path, db) = store().await;
        // A connection in exclusive locking mode that has written keeps every other
        // connection out, readers included, until it closes. It can only take that
        // lock while no other connection has the file open.
        db.close().await;
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE; BEGIN; UPDATE hosts SET enabled = 1; COMMIT;",
            )
            .unwrap();
        let reads = SqliteReads::new(path);
        let started = Instant::now();
        let refused = reads.load(Lookup::ApiToken("aa"), "demo", Duration::from_millis(100));
        let took = started.elapsed();
        assert_refused_at_deadline(&refused, took);
        drop(holder);
        let row = reads.load(Lookup::ApiToken("aa"), "demo", SECOND).unwrap();
        assert!(row.unwrap().host_enabled.0, "the holder's write is seen");
    }

    #[tokio::test]
    async fn a_statement_past_its_deadline_is_interrupted() {
        let (_dir, path, _db) = store().await;
        let reads = SqliteReads::new(path);
        assert!(reads.load(Lookup::ApiToken("aa"), "demo", SECOND).is_ok());
        let interrupted = reads.load(Lookup::ApiToken("aa"), "demo", Duration::ZERO);
        assert!(
            matches!(interrupted, Err(ReadError::Deadline(_))),
            "{interrupted:?}"
        );
    }
}
