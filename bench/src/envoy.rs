//! The Envoy setups, rendered from the YAML files in the repository with this run's
//! ports (and, for the wasm and the dynamic module, an absolute path). Nothing else is
//! changed.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use mcpguard_harness::envoy::{EnvoyConfig, FilterKind};

use crate::procs::{Proc, free_port, http_ok};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// (a) no auth filter.
    Bare,
    /// (b) Envoy's native ext_authz filter calling the policy service.
    ExtAuthz,
    /// (c) the mcpguard wasm filter.
    Mcpguard,
    /// (d) the same filter as an Envoy dynamic module (an experiment).
    DynamicModule,
    /// (e) the wasm filter with its checks on one gRPC stream per worker
    /// (`"check_transport": "stream"`, an experiment: issue 27). Not in the default
    /// run; `--only stream` or `--setups ...,e`.
    Stream,
}

impl Setup {
    pub const ALL: [Setup; 5] = [
        Setup::Bare,
        Setup::ExtAuthz,
        Setup::Mcpguard,
        Setup::DynamicModule,
        Setup::Stream,
    ];

    /// `make bench`'s setups.
    pub const DEFAULT: [Setup; 4] = [
        Setup::Bare,
        Setup::ExtAuthz,
        Setup::Mcpguard,
        Setup::DynamicModule,
    ];

    pub const fn letter(self) -> &'static str {
        match self {
            Setup::Bare => "a",
            Setup::ExtAuthz => "b",
            Setup::Mcpguard => "c",
            Setup::DynamicModule => "d",
            Setup::Stream => "e",
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            Setup::Bare => "(a) bare Envoy",
            Setup::ExtAuthz => "(b) native ext_authz",
            Setup::Mcpguard => "(c) mcpguard wasm",
            Setup::DynamicModule => "(d) mcpguard dynamic module",
            Setup::Stream => "(e) mcpguard wasm, check stream",
        }
    }

    /// Relative to the workspace root.
    pub const fn config(self) -> &'static str {
        match self {
            Setup::Bare => "bench/envoy/noauth.yaml",
            Setup::ExtAuthz => "bench/envoy/ext-authz.yaml",
            Setup::Mcpguard | Setup::Stream => "envoy/mcpguard.yaml",
            Setup::DynamicModule => "bench/envoy/dynamic-module.yaml",
        }
    }
}

pub struct Ports {
    pub listen: u16,
    pub admin: u16,
    pub check: u16,
    pub demo: u16,
    /// The gateway URL's aggregator, when one runs (`mcpguard_aggregator`).
    pub aggregator: Option<u16>,
}

/// The config as JSON, with this run's ports, upstream host and wasm path (the one
/// renderer, `mcpguard_harness::envoy`).
pub fn render(root: &Path, setup: Setup, ports: &Ports) -> Result<String> {
    let mut cfg = EnvoyConfig::load(root, setup.config())?;
    cfg.ports(ports.listen, ports.admin)
        .host_rewrite(&format!("127.0.0.1:{}", ports.demo))
        .ext_authz_uri(&format!("http://127.0.0.1:{}", ports.check));
    match cfg.filter_kind() {
        Some(FilterKind::Wasm) => cfg.wasm(&wasm_path(root)?),
        Some(FilterKind::DynamicModule) => cfg.dynamic_module(&dynamic_module_path(root)?),
        None => 0,
    };
    if setup == Setup::Stream {
        cfg.plugin(|p| p["check_transport"] = "stream".into())?;
    }
    for cluster in ["mcpguard_policy", "mcpguard_policy_metadata"] {
        if cfg.cluster_names().iter().any(|c| c == cluster) {
            cfg.cluster_ports(cluster, &[ports.check])?;
        }
    }
    if let Some(port) = ports.aggregator
        && cfg
            .cluster_names()
            .iter()
            .any(|c| c == "mcpguard_aggregator")
    {
        cfg.cluster_ports("mcpguard_aggregator", &[port])?;
    }
    Ok(cfg.to_json())
}

pub fn wasm_path(root: &Path) -> Result<PathBuf> {
    let path = root.join("target/wasm32-wasip1/release/mcpguard_filter.wasm");
    if !path.exists() {
        bail!("{} is missing: run `make build`", path.display());
    }
    Ok(path)
}

pub fn dynamic_module_path(root: &Path) -> Result<PathBuf> {
    let path = root.join("target/release/libmcpguard_dynamic_module.so");
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --release -p mcpguard-dynamic-module",
            path.display()
        );
    }
    Ok(path)
}

pub fn executable(root: &Path) -> Result<PathBuf> {
    mcpguard_harness::envoy::executable(root).map_err(anyhow::Error::msg)
}

pub struct Envoy {
    pub setup: Setup,
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
}

impl Envoy {
    /// Starts one setup with `--concurrency 1` (one worker thread, as for every setup);
    /// its gateway URL goes to the aggregator on `aggregator_port` when given.
    pub fn start(
        root: &Path,
        setup: Setup,
        check_port: u16,
        demo_port: u16,
        aggregator_port: Option<u16>,
        dir: &Path,
    ) -> Result<Envoy> {
        let ports = Ports {
            listen: free_port()?,
            admin: free_port()?,
            check: check_port,
            demo: demo_port,
            aggregator: aggregator_port,
        };
        let config = dir.join(format!("envoy-{}.json", setup.letter()));
        std::fs::write(&config, render(root, setup, &ports)?)?;
        let cmd = mcpguard_harness::envoy::command(
            &executable(root)?,
            &config,
            "warn",
            crate::procs::check_secret()?,
            root,
        );
        let mut proc = Proc::spawn(&format!("envoy-{}", setup.letter()), cmd, dir)?;
        let admin = ports.admin;
        proc.wait_ready(&format!("envoy {}", setup.label()), || {
            http_ok(admin, "/ready")
        })?;
        Ok(Envoy {
            setup,
            proc,
            port: ports.listen,
            admin_port: ports.admin,
        })
    }
}
