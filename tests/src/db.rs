//! PostgreSQL for tests: throwaway clusters (`mcpguard-pgcluster`: `initdb` in a temp
//! dir, one loopback port, no Unix socket, stopped and deleted on `Drop` or when the
//! test process dies), tuned for speed over durability.
//!
//! With `MCPGUARD_TEST_DATABASE=postgres`, every policy service the harness starts gets
//! a fresh database (see [`test_database_url`]) on one cluster shared by the whole
//! test process ([`Postgres::shared`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use mcpguard_pgcluster::Cluster;

/// A throwaway cluster: nothing here needs to survive a crash.
const SETTINGS: &[(&str, &str)] = &[
    ("max_connections", "300"),
    ("shared_buffers", "'32MB'"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("log_min_messages", "warning"),
];

/// Which database the harness gives policy services: `MCPGUARD_TEST_DATABASE`.
pub fn postgres_requested() -> bool {
    match std::env::var("MCPGUARD_TEST_DATABASE") {
        Ok(v) => match v.as_str() {
            "postgres" | "postgresql" => true,
            "" | "sqlite" => false,
            other => panic!("MCPGUARD_TEST_DATABASE={other:?}: use `postgres` or `sqlite`"),
        },
        Err(_) => false,
    }
}

/// A fresh, empty database for one policy service when the suite runs on PostgreSQL;
/// `None` on SQLite (the service then uses its data dir).
pub fn test_database_url() -> Option<String> {
    postgres_requested().then(|| Postgres::shared().create_database())
}

/// On PostgreSQL the harness's stacks get more time per check than the shipped 300 ms
/// callout timeout (and the policy service's 200 ms database deadline): every check is
/// a network round trip to a database server that shares two cores with debug builds
/// of everything else, and bursts of concurrent checks (40 at once in the identities
/// test) pass 300 ms on a loaded machine. The pass is there to prove that every query
/// and feature works on PostgreSQL; the deadlines themselves are tested with explicit
/// values (tests/e2e/failure.rs, tests/e2e/scaleout.rs).
pub const POSTGRES_CHECK_TIMEOUT_MS: u64 = 1000;
/// See [`POSTGRES_CHECK_TIMEOUT_MS`].
pub const POSTGRES_CHECK_DEADLINE_MS: u64 = 800;

/// A cluster for tests; its methods are [`Cluster`]'s.
pub struct Postgres {
    cluster: Cluster,
    databases: AtomicU32,
}

impl std::ops::Deref for Postgres {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Postgres {
    /// Creates and starts a cluster of its own (for tests that stop the database).
    pub fn start() -> Postgres {
        let cluster = Cluster::start(SETTINGS)
            .unwrap_or_else(|e| panic!("starting a PostgreSQL cluster: {e:#}"));
        Postgres {
            cluster,
            databases: AtomicU32::new(0),
        }
    }

    /// The cluster shared by every test in this process; stopped when the process exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// A new empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "mcpguard_{}",
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        self.cluster
            .create_database(&name)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last lines of postgres ---\n{}", self.log_tail());
        }
    }
}

/// Everything a PostgreSQL database holds, as SQL text (`pg_dump --data-only`).
pub fn dump(database_url: &str) -> String {
    mcpguard_pgcluster::dump(database_url).unwrap_or_else(|e| panic!("{e:#}"))
}
