//! Waiting for a started process to be ready: poll a probe until it holds, failing as
//! soon as the process exits, or when time runs out, with the end of its log.
//!
//! Two forms of one loop: [`wait_ready`] sleeps the thread (the benchmark, mcpguard-run),
//! [`wait_ready_async`] awaits on the caller's tokio runtime (the `#[tokio::test]`s).
//! Neither starts nor blocks on a runtime, so each is safe where it is meant to be used.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::proc::Proc;

/// How often a probe is tried.
pub const POLL: Duration = Duration::from_millis(50);

/// Why a process did not become ready.
#[derive(Debug)]
pub struct NotReady {
    pub what: String,
    pub reason: Reason,
    pub log: PathBuf,
    /// The end of its log.
    pub tail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Exited(ExitStatus),
    TimedOut(Duration),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Exited(status) => write!(f, "{} exited during start-up ({status})", self.what)?,
            Reason::TimedOut(after) => write!(f, "{} was not ready after {after:?}", self.what)?,
        }
        write!(f, "; the end of {}:\n{}", self.log.display(), self.tail)
    }
}

impl std::error::Error for NotReady {}

/// One wait: what is waited for, since when, for how long.
struct Wait {
    what: String,
    start: Instant,
    timeout: Duration,
}

impl Wait {
    fn new(what: &str, timeout: Duration) -> Wait {
        Wait {
            what: what.to_owned(),
            start: Instant::now(),
            timeout,
        }
    }

    /// Before each probe: the process must still run.
    fn still_running(&self, proc: &mut Proc) -> Result<(), NotReady> {
        match proc.exited() {
            Some(status) => Err(self.failure(proc, Reason::Exited(status))),
            None => Ok(()),
        }
    }

    /// After a failed probe: time must be left.
    fn time_left(&self, proc: &Proc) -> Result<(), NotReady> {
        if self.start.elapsed() < self.timeout {
            Ok(())
        } else {
            Err(self.failure(proc, Reason::TimedOut(self.timeout)))
        }
    }

    fn failure(&self, proc: &Proc, reason: Reason) -> NotReady {
        NotReady {
            what: self.what.clone(),
            reason,
            log: proc.log_path().to_path_buf(),
            tail: proc.log_tail(),
        }
    }
}

/// Polls `ready` every [`POLL`] on this thread until it returns true.
pub fn wait_ready(
    proc: &mut Proc,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), NotReady> {
    let wait = Wait::new(what, timeout);
    loop {
        wait.still_running(proc)?;
        if ready() {
            return Ok(());
        }
        wait.time_left(proc)?;
        std::thread::sleep(POLL);
    }
}

/// Like [`wait_ready`], awaiting `ready()` and the pauses on the caller's runtime.
pub async fn wait_ready_async<F, Fut>(
    proc: &mut Proc,
    what: &str,
    timeout: Duration,
    mut ready: F,
) -> Result<(), NotReady>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let wait = Wait::new(what, timeout);
    loop {
        wait.still_running(proc)?;
        if ready().await {
            return Ok(());
        }
        wait.time_left(proc)?;
        tokio::time::sleep(POLL).await;
    }
}

/// Whether something accepts TCP connections on the loopback `port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::process::Command;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn a_process_that_exits_fails_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn("early", sh("echo bad config; exit 3"), dir.path()).unwrap();
        let e = wait_ready(&mut p, "the server", Duration::from_secs(10), || false).unwrap_err();
        assert!(
            matches!(e.reason, Reason::Exited(s) if s.code() == Some(3)),
            "{e}"
        );
        assert!(e.to_string().contains("bad config"), "{e}");
    }

    #[test]
    fn a_probe_that_never_holds_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn("slow", sh("exec sleep 30"), dir.path()).unwrap();
        let timeout = Duration::from_millis(200);
        let e = wait_ready(&mut p, "the server", timeout, || false).unwrap_err();
        assert_eq!(e.reason, Reason::TimedOut(timeout));
        assert!(p.alive(), "a timeout does not stop the process");
    }

    #[test]
    fn readiness_is_polled_until_the_probe_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn("ok", sh("exec sleep 30"), dir.path()).unwrap();
        let mut tries = 0;
        wait_ready(&mut p, "the server", Duration::from_secs(10), || {
            tries += 1;
            tries == 3
        })
        .unwrap();
        assert_eq!(tries, 3);
    }

    #[tokio::test]
    async fn the_async_wait_runs_inside_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut p = Proc::spawn("ok", sh("exec sleep 30"), dir.path()).unwrap();
        wait_ready_async(
            &mut p,
            "the listener",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await
        .unwrap();
        let e = wait_ready_async(&mut p, "nothing", Duration::from_millis(100), || async {
            false
        })
        .await
        .unwrap_err();
        assert_eq!(e.reason, Reason::TimedOut(Duration::from_millis(100)));
    }
}
