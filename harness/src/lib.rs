//! The one process harness of the end-to-end tests (`tests/src/procs.rs`), the benchmark
//! (`bench/`) and `make run` (the `mcpguard-run` binary): a child process with its log
//! file ([`proc`]), readiness polling with the log's end on failure ([`ready`]), free
//! loopback ports ([`free_port`]), the Envoy config renderer ([`envoy`]) and a minimal
//! loopback HTTP client ([`http`]), and signals as exit codes for the binaries
//! ([`signals`]).
//!
//! No tokio runtime is started or blocked on here, and no signal handler is installed unasked:
//! the tests run inside `#[tokio::test]` runtimes, and only the binaries (mcpguard-run,
//! mcpguard-bench) decide what a signal does.

pub mod envoy;
pub mod http;
pub mod proc;
pub mod ready;
pub mod signals;

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::OnceLock;

pub use proc::{Group, Proc};
pub use ready::{NotReady, wait_ready, wait_ready_async};

/// The repository's root (this crate lives in `harness/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A loopback port for a process to listen on (see [`mcpguard_loopback`]).
pub fn free_port() -> io::Result<u16> {
    mcpguard_loopback::free_port()
}

/// The check secret that the policy services and Envoys one process starts share (as
/// replicas behind one Envoy do): 32 random bytes from the OS, hex, made once.
pub fn check_secret() -> io::Result<&'static str> {
    static SECRET: OnceLock<Result<String, String>> = OnceLock::new();
    let made = SECRET.get_or_init(|| {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| format!("reading /dev/urandom for the check secret: {e}"))?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    });
    made.as_deref().map_err(|e| io::Error::other(e.clone()))
}
