//! The end-to-end harness: starts the real parts (policy service, demo MCP server,
//! Envoy with the built `.wasm`) on free loopback ports, waits for each to be ready by
//! polling, and stops them on `Drop`. Everything a test needs to talk to them is here.
//!
//! Binaries come from `target/debug` (build them with `make build`); Envoy from
//! `$MCPGUARD_ENVOY`, else `.venv/bin/envoy`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod browser;
pub mod db;
pub mod gateway;
pub mod istio;
pub mod mcp;
pub mod oauth;
pub mod observe;
pub mod procs;
pub mod raw;
pub mod sidecar;
pub mod tls;
pub mod toggles;

pub use admin::Admin;
pub use procs::{Demo, Envoy, EnvoyOptions, Policy, Stack};

use std::path::PathBuf;
use std::time::Duration;

/// An HTTP client for talking to the services across a test: it drops a pooled
/// connection idle for 5 s, before the services close it (their HTTP/1.1 keep-alive
/// ends after `--header-read-timeout-ms`, 10 s by default). Reusing a connection at
/// the moment the service closes it fails the request (`IncompleteMessage`), which a
/// loaded machine made a flaky failure.
pub fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(5))
}

/// [`http_client`] as it is.
pub fn http() -> reqwest::Client {
    http_client().build().expect("an HTTP client")
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A loopback port for a process to listen on (see [`mcpguard_loopback`]).
pub fn free_port() -> u16 {
    mcpguard_loopback::free_port().expect("a free loopback port")
}
