//! A throwaway PostgreSQL for tests: `initdb` into a temp dir, listening on one free
//! loopback port only (no Unix socket), trust authentication, no fsync. Run as the
//! `postgres` OS user through `runuser` when the tests run as root (PostgreSQL refuses
//! to run as root). Stopped and deleted on `Drop` — and also when the test process
//! dies without dropping it: a small watchdog shell waits on a pipe that only this
//! process holds, and stops the cluster when the pipe closes.
//!
//! With `MCPGUARD_TEST_DATABASE=postgres`, every policy service the harness starts gets
//! a fresh database (see [`test_database_url`]) on one cluster shared by the whole
//! test process ([`Postgres::shared`]).
//!
//! Server binaries: `$MCPGUARD_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package, which `make test` installs), else `PATH`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::free_port;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

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

pub struct Postgres {
    port: u16,
    /// The temp dir: `data/` (the cluster) and `postgres.log`.
    dir: PathBuf,
    bin: PathBuf,
    /// Whether server commands run as the `postgres` user (we are root).
    as_postgres: bool,
    /// Stops the cluster and deletes `dir` once its stdin closes.
    watchdog: Mutex<Option<Child>>,
    databases: AtomicU32,
}

impl Postgres {
    /// Creates and starts a cluster of its own (for tests that stop the database).
    pub fn start() -> Postgres {
        let bin = server_bin();
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("mcpguard-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL")
            .keep();
        if as_postgres {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("giving the temp dir to the postgres user");
        }
        let mut pg = Postgres {
            port: 0,
            dir,
            bin,
            as_postgres,
            watchdog: Mutex::new(None),
            databases: AtomicU32::new(0),
        };
        // Armed before anything runs, so a failure below still cleans up.
        pg.arm_watchdog();
        pg.run(
            "initdb",
            &[
                "-D",
                "data",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        );
        // A port that was free a moment ago may be taken by the time the server binds.
        for attempt in 0.. {
            pg.port = free_port();
            pg.configure();
            if pg.try_start() {
                break;
            }
            assert!(
                attempt < 3,
                "PostgreSQL did not start; log:\n{}",
                pg.log_tail()
            );
        }
        pg
    }

    /// The cluster shared by every test in this process; stopped when the process exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("mcpguard_{n}");
        self.sql(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL as the superuser on the `postgres` database; returns psql's output.
    pub fn sql(&self, sql: &str) -> String {
        self.psql("postgres", sql)
    }

    /// Runs SQL on one database (unaligned, tuples only); returns psql's output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-c", sql])
            .current_dir(&self.dir)
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", "data", "-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data.
    pub fn restart(&self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not start again; log:\n{}",
            self.log_tail()
        );
    }

    /// Whether the server accepts connections (`pg_isready`).
    pub fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-t", "2"])
            .current_dir(&self.dir)
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Loopback only, this port, no Unix socket; durability off (a throwaway cluster).
    fn configure(&self) {
        let conf = format!(
            "\n# mcpguard tests\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = ''\nmax_connections = 300\nshared_buffers = 32MB\n\
             fsync = off\nfull_page_writes = off\n\
             log_min_messages = warning\n",
            self.port
        );
        // postgresql.auto.conf is read last and holds only what we write here.
        std::fs::write(self.dir.join("data/postgresql.auto.conf"), conf)
            .expect("writing postgresql.auto.conf");
    }

    /// `pg_ctl start`, then polls `pg_isready` until it answers.
    fn try_start(&self) -> bool {
        let ok = self
            .command(
                "pg_ctl",
                &[
                    "-D",
                    "data",
                    "-l",
                    "postgres.log",
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return false;
        }
        let started = Instant::now();
        while !self.is_ready() {
            if started.elapsed() > READY_TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// A server program, as the postgres user when we are root, in the temp dir.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// The watchdog: `read` returns when our end of its stdin closes — on `Drop`, or
    /// when this process exits in any way — and then the cluster is stopped and the
    /// temp dir removed. It ignores the terminal's signals so that Ctrl-C on the test
    /// run kills the tests, closes the pipe and lets it clean up.
    fn arm_watchdog(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!(
                "runuser -u postgres -- {} -D data -m immediate -w stop",
                sh_quote(&pg_ctl)
            )
        } else {
            format!("{} -D data -m immediate -w stop", sh_quote(&pg_ctl))
        };
        let script = format!(
            "trap '' INT TERM HUP QUIT; read -r _ignored; \
             if [ -f data/postmaster.pid ]; then {stop} >/dev/null 2>&1; fi; \
             cd / && rm -rf {}",
            sh_quote(&self.dir)
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the PostgreSQL watchdog");
        *self.watchdog.lock().expect("watchdog lock") = Some(child);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of postgres ({}) ---\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        let watchdog = self.watchdog.get_mut().map(Option::take).ok().flatten();
        if let Some(mut child) = watchdog {
            // Closing stdin (after a newline, for good measure) sets it off.
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"\n");
            }
            let _ = child.wait();
        }
    }
}

/// Everything a PostgreSQL database holds, as SQL text (`pg_dump --data-only`).
pub fn dump(database_url: &str) -> String {
    let out = Command::new(server_bin().join("pg_dump"))
        .args(["--data-only", "--no-owner", "-d", database_url])
        .output()
        .expect("running pg_dump");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("running id");
        assert!(
            out.status.success(),
            "running as root needs the `postgres` OS user (Debian's postgresql package creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

fn server_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("MCPGUARD_PG_BIN") {
        return PathBuf::from(dir);
    }
    // Debian: /usr/lib/postgresql/<major>/bin, not on PATH; the newest major wins.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    on_path.unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: run `make test` \
             (it installs Debian's postgresql), or set MCPGUARD_PG_BIN"
        )
    })
}
