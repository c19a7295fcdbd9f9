//! The check's store read on PostgreSQL, through `tokio-postgres` on connections of its
//! own.
//!
//! Through sqlx's pool a check is two round trips: the query, then a ping that the pool
//! sends on every connection it takes back (sqlx 0.9, "a band-aid" for queries cut off
//! mid-way), and the connection serves nothing else until both are over. A
//! `tokio-postgres` client needs no such ping: a query whose caller gave up still has its
//! answer read and dropped by the connection's own task, so the connection stays in step
//! and queries from many checks are pipelined on it. The statement is the one sqlx runs.
//!
//! A connection that has died (a restarted or failed-over server, a backend ended by an
//! operator) is replaced on the next check, which is read once more on the new one
//! within the same deadline, so a restart between checks costs no check.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::error::Severity;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::DbBool;
use super::check::{
    API_TOKEN_SELECT, CheckRow, Lookup, OAUTH_SELECT, ReadError, check_row_by_index, within,
};

/// A connection with the check's two statements prepared on it.
struct Session {
    client: Client,
    api_token: Statement,
    grant: Statement,
}

/// A few connections to one PostgreSQL database, opened when a check first needs them;
/// checks take them in turn, and many checks share one at a time.
pub struct PgReads {
    config: Config,
    statement_timeout: Duration,
    // A slot is locked only to take its session, or while opening one: checks arriving
    // meanwhile wait for that connection instead of each opening their own.
    slots: Vec<Mutex<Option<Arc<Session>>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PgReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the config: it holds the password.
        f.debug_struct("PgReads")
            .field("connections", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl PgReads {
    /// Reads from the database `config` names over at most `connections` connections
    /// (at least one), each with `statement_timeout` as its session's
    /// `statement_timeout`, so that a read nobody waits for any more does not hold up
    /// the ones queued behind it.
    pub fn new(mut config: Config, connections: usize, statement_timeout: Duration) -> Self {
        if config.get_application_name().is_none() {
            // What an operator looking at `pg_stat_activity` sees them as.
            config.application_name("mcpguard-check");
        }
        PgReads {
            config,
            statement_timeout,
            slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The check's row for `credential` and `server`; `None` when the credential is
    /// unknown. Gives up once `deadline` has passed.
    pub async fn load(
        &self,
        credential: Lookup<'_>,
        server: &str,
        deadline: Duration,
    ) -> Result<Option<CheckRow>, ReadError> {
        within(
            deadline,
            self.try_load(credential, server),
            ReadError::Postgres,
        )
        .await
    }

    async fn try_load(
        &self,
        credential: Lookup<'_>,
        server: &str,
    ) -> Result<Option<CheckRow>, tokio_postgres::Error> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let (session, fresh) = self.session(slot, None).await?;
        match read(&session, credential, server).await {
            // A connection that was already dead when the check took it (the server
            // restarted or ended it since its last use): one more read on a new one.
            Err(e) if !fresh && connection_lost(&session, &e) => {
                let (session, _) = self.session(slot, Some(&session)).await?;
                read(&session, credential, server).await
            }
            answer => answer,
        }
    }

    /// The slot's session, opened first if it has none, its connection has closed, or
    /// it is `lost`; `true` when opened by this call.
    async fn session(
        &self,
        slot: &Mutex<Option<Arc<Session>>>,
        lost: Option<&Arc<Session>>,
    ) -> Result<(Arc<Session>, bool), tokio_postgres::Error> {
        let mut held = slot.lock().await;
        // Another check may have replaced the lost session already: that one is used.
        let usable =
            |s: &&Arc<Session>| !s.client.is_closed() && !lost.is_some_and(|l| Arc::ptr_eq(l, s));
        if let Some(session) = held.as_ref().filter(usable) {
            return Ok((Arc::clone(session), false));
        }
        *held = None;
        let session = Arc::new(self.connect().await?);
        *held = Some(Arc::clone(&session));
        Ok((session, true))
    }

    async fn connect(&self) -> Result<Session, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        // The connection's task ends when the client is dropped or the server goes away;
        // the client then reports itself closed and the slot opens a new one.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "check read connection to PostgreSQL ended");
            }
        });
        let timeout_ms = self.statement_timeout.as_millis().max(1);
        client
            .batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
            .await?;
        Ok(Session {
            api_token: client.prepare(API_TOKEN_SELECT).await?,
            grant: client.prepare(OAUTH_SELECT).await?,
            client,
        })
    }
}

/// Whether `error` means `session`'s connection is gone rather than that the read failed.
fn connection_lost(session: &Session, error: &tokio_postgres::Error) -> bool {
    // The server's last word on a connection it ends (FATAL, e.g. 57P01 after
    // `pg_terminate_backend` or a fast shutdown) is handed to the first query queued
    // on it, which can be before the client has seen the socket close.
    let fatal = error.as_db_error().is_some_and(|db| {
        matches!(
            db.parsed_severity(),
            Some(Severity::Fatal | Severity::Panic)
        )
    });
    fatal || error.is_closed() || session.client.is_closed()
}

async fn read(
    session: &Session,
    credential: Lookup<'_>,
    server: &str,
) -> Result<Option<CheckRow>, tokio_postgres::Error> {
    let (statement, key): (&Statement, &(dyn ToSql + Sync)) = match &credential {
        Lookup::ApiToken(hash) => (&session.api_token, hash),
        Lookup::Grant(grant) => (&session.grant, grant),
    };
    let row = session.client.query_opt(statement, &[key, &server]).await?;
    row.as_ref().map(check_row).transpose()
}

/// The check's row, column by column.
fn check_row(r: &Row) -> Result<CheckRow, tokio_postgres::Error> {
    let flag = |i: usize| r.try_get::<_, bool>(i).map(DbBool);
    let maybe_flag = |i: usize| r.try_get::<_, Option<bool>>(i).map(|v| v.map(DbBool));
    Ok(check_row_by_index!(r.try_get, flag, maybe_flag))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Instant;

    use mcpguard_pgcluster::Cluster;

    use super::*;
    use crate::store::check::Reads;
    use crate::store::check::fixture::{
        SECOND, assert_refused_at_deadline, reads_like_the_pool, seed,
    };
    use crate::store::{self, Db};

    /// A throwaway cluster with the [`seed`]ed store, and reads over `connections`.
    async fn store(connections: usize, statement_timeout: Duration) -> (Cluster, Db, PgReads) {
        let cluster = Cluster::start(&[("fsync", "off")]).unwrap();
        let url = cluster.create_database("t").unwrap();
        let db = store::open(&url, 2).await.unwrap();
        seed(&db).await;
        let config = Config::from_str(&url).unwrap();
        let reads = PgReads::new(config, connections, statement_timeout);
        (cluster, db, reads)
    }

    fn host_enabled(row: Result<Option<CheckRow>, ReadError>) -> bool {
        row.unwrap().unwrap().host_enabled.0
    }

    #[tokio::test]
    async fn reads_the_same_rows_as_the_pool_and_sees_each_change() {
        let (_cluster, db, reads) = store(2, SECOND).await;
        let reads = Reads::Postgres(Arc::new(reads));
        reads_like_the_pool(&reads, db.clone()).await;
        // Both connections, the statements prepared on them, see the next commit.
        sqlx::query("UPDATE hosts SET enabled = TRUE")
            .execute(&db)
            .await
            .unwrap();
        for _ in 0..2 {
            let row = reads.load(Lookup::ApiToken("aa"), "demo", SECOND).await;
            assert!(host_enabled(row), "a connection kept an old snapshot");
        }
    }

    #[tokio::test]
    async fn the_first_check_after_a_database_restart_is_answered() {
        let (cluster, _db, reads) = store(1, SECOND).await;
        let read = || reads.load(Lookup::ApiToken("aa"), "demo", SECOND);
        assert!(!host_enabled(read().await));
        cluster.stop().unwrap();
        let refused = read().await;
        assert!(
            matches!(refused, Err(ReadError::Postgres(_))),
            "{refused:?}"
        );
        cluster.restart().unwrap();
        assert!(!host_enabled(read().await));
        // A connection the server ended while idle is replaced within the check that
        // finds it dead, whether the client has seen the socket close by then or only
        // the server's FATAL goodbye, handed to the check's query. That is a race, so it
        // is run many times: without the FATAL case, 40 rounds lost it in each of 3 runs.
        for _ in 0..40 {
            cluster
                .psql(
                    "t",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'mcpguard-check'",
                )
                .unwrap();
            assert!(!host_enabled(read().await));
        }
    }

    #[tokio::test]
    async fn a_read_stuck_on_a_lock_is_given_up_at_the_deadline_and_the_connection_serves_on() {
        let deadline = Duration::from_millis(100);
        let (_cluster, db, reads) = store(1, deadline).await;
        let mut holder = db.begin().await.unwrap();
        sqlx::query("LOCK TABLE hosts IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let started = Instant::now();
        let refused = reads.load(Lookup::ApiToken("aa"), "demo", deadline).await;
        let took = started.elapsed();
        assert_refused_at_deadline(&refused, took);
        sqlx::query("UPDATE hosts SET enabled = TRUE")
            .execute(&mut *holder)
            .await
            .unwrap();
        holder.commit().await.unwrap();
        // The same connection (there is one): the abandoned read's answer did not
        // become this one's.
        let row = reads.load(Lookup::ApiToken("aa"), "demo", SECOND).await;
        assert!(host_enabled(row), "the holder's write is seen");
    }
}
