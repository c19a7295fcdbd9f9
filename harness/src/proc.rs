//! A child process with its output in a log file: started, asked whether it still runs,
//! stopped (SIGTERM with a grace period, or SIGKILL), and killed on `Drop`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// Lines of the log shown when a process fails to start or a test fails.
pub const TAIL_LINES: usize = 40;

/// How often [`Proc::stop`] looks whether the process has exited.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How a process is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Group {
    /// In the starter's process group: a terminal's Ctrl-C reaches it too.
    #[default]
    Inherit,
    /// In a process group of its own (as `setsid` would): terminal signals do not reach
    /// it unasked, and stopping it signals the whole group (Envoy's PyPI wrapper and
    /// anything it starts).
    Own,
}

/// A started child process. Killed (SIGKILL) and reaped on drop; while the thread is
/// panicking (a failing test), the end of its log is printed first.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    group: Group,
    /// Set once the child has been reaped: its pid may then belong to another process,
    /// so nothing is signalled any more.
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr in `<log_dir>/<name>.log`
    /// (created afresh, readable by this user only: services print secrets on start-up,
    /// the bootstrap admin token among them).
    pub fn spawn(name: &str, cmd: Command, log_dir: &Path) -> io::Result<Proc> {
        Self::spawn_in(name, cmd, log_dir, Group::Inherit)
    }

    /// Like [`Proc::spawn`], choosing the process group.
    pub fn spawn_in(
        name: &str,
        mut cmd: Command,
        log_dir: &Path,
        group: Group,
    ) -> io::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = private_log(&log)?;
        let err = out.try_clone()?;
        if group == Group::Own {
            cmd.process_group(0);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name} ({cmd:?}): {e}")))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            group,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operating system's id of the process (for `/proc/<pid>/...`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last [`TAIL_LINES`] lines of the log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_text(), TAIL_LINES)
    }

    /// `Some(status)` once the process has exited (it is then reaped), `None` while it
    /// runs. A zombie counts as exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // An error here means there is no such child to wait for: as good as gone.
            self.status = match self.child.try_wait() {
                Ok(status) => status,
                Err(_) => self.child.wait().ok(),
            };
        }
        self.status
    }

    pub fn alive(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Sends SIGTERM (to its group, for [`Group::Own`]) unless it has exited already;
    /// does not wait.
    pub fn terminate(&mut self) {
        self.signal(Signal::TERM);
    }

    /// SIGKILL (to its group, for [`Group::Own`]), then reaps it.
    pub fn kill(&mut self) {
        self.signal(Signal::KILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL. Returns whether it
    /// exited on its own (false: it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> bool {
        self.terminate();
        let start = Instant::now();
        while self.alive() {
            if start.elapsed() >= grace {
                self.kill();
                return false;
            }
            std::thread::sleep(STOP_POLL);
        }
        true
    }

    fn signal(&mut self, signal: Signal) {
        if self.exited().is_some() {
            return;
        }
        let Some(pid) = i32::try_from(self.pid()).ok().and_then(Pid::from_raw) else {
            return;
        };
        // ESRCH (gone in the meantime) is what we wanted anyway.
        let _ = match self.group {
            Group::Own => kill_process_group(pid, signal).or_else(|_| kill_process(pid, signal)),
            Group::Inherit => kill_process(pid, signal),
        };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}) ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// SIGKILL to a process by pid, for a signal handler's thread that cannot reach the
/// [`Proc`] (the caller must know the pid has not been reaped yet).
pub fn kill_pid(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::KILL);
    }
}

/// Creates (or truncates) a log file readable by this user only, also when an older
/// file was left with looser modes (a creation mode applies only to new files).
fn private_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn output_goes_to_a_private_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn("echo", sh("echo out; echo err >&2"), dir.path()).unwrap();
        while p.alive() {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.exited().unwrap().success());
        let text = p.log_text();
        assert!(text.contains("out") && text.contains("err"), "{text}");
        let mode = std::fs::metadata(p.log_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn stop_ends_a_process_that_exits_on_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn("sleeper", sh("exec sleep 30"), dir.path()).unwrap();
        assert!(p.alive());
        assert!(p.stop(Duration::from_secs(10)), "sleep exits on SIGTERM");
        assert!(!p.alive());
    }

    #[test]
    fn stop_kills_a_process_that_ignores_sigterm_and_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = sh("trap '' TERM; sleep 30 & echo $! > child.pid; echo started; wait");
        cmd.current_dir(dir.path());
        // The shell ignores SIGTERM and so does its child (ignored signals are
        // inherited); the child writes its pid so we can see it die with the group.
        let mut p = Proc::spawn_in("stubborn", cmd, dir.path(), Group::Own).unwrap();
        let start = Instant::now();
        while !p.log_text().contains("started") {
            assert!(start.elapsed() < Duration::from_secs(10), "never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let child: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!p.stop(Duration::from_millis(300)), "needed SIGKILL");
        assert!(!p.alive());
        // The grandchild is not ours to reap: poll until it is gone or a zombie of init.
        let start = Instant::now();
        while running(child) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "group member survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_tail_is_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    /// Running and not a zombie (state from `/proc/<pid>/stat`).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }
}
