//! A throwaway PostgreSQL cluster, for the end-to-end tests (`tests/src/db.rs`) and the
//! check benchmark: `initdb` into a temp dir (`$TMPDIR/mcpguard-pg-*`, which
//! `scripts/postgres.sh` also sweeps), one free loopback port, no Unix socket, trust
//! authentication. As root, the server programs run as the `postgres` OS user through
//! `runuser` (PostgreSQL refuses to run as root).
//!
//! It is stopped and deleted on `Drop`, and also when the process dies without dropping
//! it (an error path that exits, Ctrl-C, a kill): a small watchdog shell ignores the
//! terminal's signals and waits on a pipe only this process holds; when the pipe closes
//! it stops the cluster (`pg_ctl -m immediate`) and removes the temp dir.
//!
//! Server binaries: `$MCPGUARD_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package), else `PATH`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Cluster {
    port: u16,
    /// The temp dir: `data/` (the cluster) and `postgres.log`.
    dir: PathBuf,
    bin: PathBuf,
    /// Whether server programs run as the `postgres` user (we are root).
    as_postgres: bool,
    /// Stops the cluster and deletes `dir` once its stdin closes.
    watchdog: Mutex<Option<Child>>,
}

impl Cluster {
    /// Creates and starts a cluster; `settings` go to `postgresql.auto.conf` as they are.
    pub fn start(settings: &[(&str, &str)]) -> Result<Cluster> {
        let bin = server_bin()?;
        let as_postgres = running_as_root();
        let dir = std::env::temp_dir().join(format!(
            "mcpguard-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut pg = Cluster {
            port: 0,
            dir,
            bin,
            as_postgres,
            watchdog: Mutex::new(None),
        };
        // Armed before anything else, so a failure below still removes the dir.
        pg.arm_watchdog()?;
        if as_postgres {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid))
                .context("giving the temp dir to the postgres user")?;
        }
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
        )?;
        // Another process may take the port before the server binds it.
        for attempt in 0.. {
            pg.port = mcpguard_loopback::free_port().context("choosing a port")?;
            std::fs::write(
                pg.dir.join("data/postgresql.auto.conf"),
                auto_conf(pg.port, settings),
            )
            .context("writing postgresql.auto.conf")?;
            if pg.try_start() {
                break;
            }
            if attempt >= 2 {
                bail!("PostgreSQL did not start; log:\n{}", pg.log_tail());
            }
        }
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database; returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// Runs SQL on one database as the superuser (unaligned, tuples only); returns
    /// psql's output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
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
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&self) -> Result<()> {
        self.run("pg_ctl", &["-D", "data", "-m", "fast", "-w", "stop"])
    }

    /// Starts the server again after [`Cluster::stop`], on the same port and data.
    pub fn restart(&self) -> Result<()> {
        if !self.try_start() {
            bail!("PostgreSQL did not start again; log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// `postgres --version`, e.g. `postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)`.
    pub fn version(&self) -> String {
        Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// The postmaster's pid (first line of `data/postmaster.pid`), to measure its CPU.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the server accepts connections (`pg_isready`).
    pub fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-t", "2"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
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

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = self
            .command(program, args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn arm_watchdog(&mut self) -> Result<()> {
        let pg_ctl = sh_quote(&self.bin.join("pg_ctl"));
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- {pg_ctl} -D data -m immediate -w stop")
        } else {
            format!("{pg_ctl} -D data -m immediate -w stop")
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
            .context("starting the PostgreSQL watchdog")?;
        if let Ok(mut watchdog) = self.watchdog.lock() {
            *watchdog = Some(child);
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
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

/// `postgresql.auto.conf` (read last): loopback only on `port`, no Unix socket, then
/// `settings`.
fn auto_conf(port: u16, settings: &[(&str, &str)]) -> String {
    let mut conf = format!(
        "# mcpguard\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
         unix_socket_directories = ''\n"
    );
    for (k, v) in settings {
        conf.push_str(&format!("{k} = {v}\n"));
    }
    conf
}

/// Everything a database holds, as SQL text (`pg_dump --data-only`).
pub fn dump(database_url: &str) -> Result<String> {
    let out = Command::new(server_bin()?.join("pg_dump"))
        .args(["--data-only", "--no-owner", "-d", database_url])
        .stdin(Stdio::null())
        .output()
        .context("running pg_dump")?;
    if !out.status.success() {
        bail!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

fn postgres_user() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!(
                "running as root needs the `postgres` OS user (Debian's postgresql package \
                 creates it)"
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// Where `initdb` and `pg_ctl` are, or an error naming the way out.
pub fn server_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MCPGUARD_PG_BIN") {
        return Ok(PathBuf::from(dir));
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
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .context(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y \
             postgresql (`make test` does), or set MCPGUARD_PG_BIN",
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_listens_on_loopback_only() {
        let conf = auto_conf(54321, &[("fsync", "on"), ("shared_buffers", "'128MB'")]);
        assert!(conf.contains("listen_addresses = '127.0.0.1'\n"));
        assert!(conf.contains("port = 54321\n"));
        assert!(conf.contains("unix_socket_directories = ''\n"));
        assert!(conf.ends_with("fsync = on\nshared_buffers = '128MB'\n"));
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(sh_quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(sh_quote(Path::new("/tmp/it's")), "'/tmp/it'\\''s'");
    }
}
