//! The Envoy setups, rendered from the YAML files in the repository with this run's
//! ports (and, for the wasm and the dynamic module, an absolute path). Nothing else is
//! changed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_yaml::Value;

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
}

impl Setup {
    pub const ALL: [Setup; 4] = [
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
        }
    }

    pub const fn label(self) -> &'static str {
        match self {
            Setup::Bare => "(a) bare Envoy",
            Setup::ExtAuthz => "(b) native ext_authz",
            Setup::Mcpguard => "(c) mcpguard wasm",
            Setup::DynamicModule => "(d) mcpguard dynamic module",
        }
    }

    /// Relative to the workspace root.
    pub const fn config(self) -> &'static str {
        match self {
            Setup::Bare => "bench/envoy/noauth.yaml",
            Setup::ExtAuthz => "bench/envoy/ext-authz.yaml",
            Setup::Mcpguard => "envoy/mcpguard.yaml",
            Setup::DynamicModule => "bench/envoy/dynamic-module.yaml",
        }
    }
}

pub struct Ports {
    pub listen: u16,
    pub admin: u16,
    pub check: u16,
    pub demo: u16,
}

/// The config as JSON, with this run's ports, upstream host and wasm path.
pub fn render(root: &Path, setup: Setup, ports: &Ports) -> Result<String> {
    let path = root.join(setup.config());
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: Value = serde_yaml::from_str(&text)?;
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.admin.into();
    let resources = &mut cfg["static_resources"];
    let listener = &mut resources["listeners"][0];
    listener["address"]["socket_address"]["port_value"] = ports.listen.into();
    let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
    let upstream = format!("127.0.0.1:{}", ports.demo);
    for vhost in seq(&mut hcm["route_config"]["virtual_hosts"]) {
        for route in seq(&mut vhost["routes"]) {
            // `get_mut`, not indexing: indexing a missing key would insert it.
            let literal = route
                .get_mut("typed_per_filter_config")
                .and_then(|p| p.get_mut("envoy.filters.http.dynamic_forward_proxy"))
                .and_then(|dfp| dfp.get_mut("host_rewrite_literal"));
            if let Some(literal) = literal {
                *literal = upstream.clone().into();
            }
        }
    }
    for filter in seq(&mut hcm["http_filters"]) {
        if filter["name"] == "envoy.filters.http.wasm" {
            let wasm = wasm_path(root)?;
            filter["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
                wasm.display().to_string().into();
        }
        if filter["name"] == "envoy.filters.http.dynamic_modules" {
            let module = dynamic_module_path(root)?;
            filter["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"] =
                module.display().to_string().into();
        }
        if filter["name"] == "envoy.filters.http.ext_authz" {
            filter["typed_config"]["http_service"]["server_uri"]["uri"] =
                format!("http://127.0.0.1:{}", ports.check).into();
        }
    }
    for cluster in seq(&mut resources["clusters"]) {
        if cluster["name"] == "mcpguard_policy" || cluster["name"] == "mcpguard_policy_metadata" {
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"] = ports.check.into();
        }
    }
    Ok(serde_json::to_string_pretty(&cfg)?)
}

fn seq(v: &mut Value) -> impl Iterator<Item = &mut Value> {
    v.as_sequence_mut().into_iter().flatten()
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
    let path = std::env::var_os("MCPGUARD_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/envoy"));
    if !path.exists() {
        bail!("{} is missing: run `make envoy`", path.display());
    }
    Ok(path)
}

pub struct Envoy {
    pub setup: Setup,
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
}

impl Envoy {
    /// Starts one setup with `--concurrency 1` (one worker thread, as for every setup).
    pub fn start(
        root: &Path,
        setup: Setup,
        check_port: u16,
        demo_port: u16,
        dir: &Path,
    ) -> Result<Envoy> {
        let ports = Ports {
            listen: free_port()?,
            admin: free_port()?,
            check: check_port,
            demo: demo_port,
        };
        let config = dir.join(format!("envoy-{}.json", setup.letter()));
        std::fs::write(&config, render(root, setup, &ports)?)?;
        let mut cmd = Command::new(executable(root)?);
        cmd.env("MCPGUARD_CHECK_SECRET", crate::procs::check_secret())
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .current_dir(root);
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
