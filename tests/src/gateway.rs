//! The gateway URL's stack: the policy service, several demo MCP servers, one or more
//! aggregators and Envoy (a shipped config, its `mcpguard_aggregator` cluster pointed
//! at these aggregators).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use mcpguard_harness::envoy::EnvoyConfig;

use crate::procs::{Proc, binary, check_secret, http_ok, wait_until};
use crate::{Admin, Demo, Envoy, EnvoyOptions, Policy, free_port};

/// How often the tests' aggregators re-check what each GET stream's caller may use.
pub const STREAM_CHECK_MS: u64 = 250;

pub struct Aggregator {
    pub proc: Proc,
    pub port: u16,
}

impl Aggregator {
    pub async fn start(check_port: u16, log_dir: &Path) -> Aggregator {
        Self::start_on(free_port(), check_port, log_dir).await
    }

    /// On a chosen port (a restart keeps Envoy's cluster valid).
    pub async fn start_on(port: u16, check_port: u16, log_dir: &Path) -> Aggregator {
        Self::start_with(port, check_port, log_dir, &[]).await
    }

    /// [`Aggregator::start_on`] with more flags (`--trusted-ca-file`, ...).
    pub async fn start_with(
        port: u16,
        check_port: u16,
        log_dir: &Path,
        flags: &[&OsStr],
    ) -> Aggregator {
        let secret_file = log_dir.join("aggregator-check-secret");
        std::fs::write(&secret_file, check_secret()).expect("writing the check secret");
        let mut cmd = Command::new(binary("mcpguard-aggregator"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--policy-check-url")
            .arg(format!("http://127.0.0.1:{check_port}"))
            .arg("--check-secret-file")
            .arg(&secret_file)
            .arg("--upstream-timeout-ms")
            .arg("3000")
            // A GET stream notices an admin's toggle within this (the default is 5 s).
            .arg("--stream-check-ms")
            .arg(STREAM_CHECK_MS.to_string())
            .env("MCPGUARD_LOG", "info,mcpguard_aggregator=debug")
            // Plain fields (`workers=1`) in the log the tests read.
            .env("NO_COLOR", "1");
        cmd.args(flags);
        let mut proc = Proc::spawn(&format!("aggregator-{port}"), cmd, log_dir);
        let health = format!("http://127.0.0.1:{port}/healthz");
        wait_until(&mut proc, "aggregator", || {
            let health = health.clone();
            async move { http_ok(&health).await }
        })
        .await;
        Aggregator { proc, port }
    }
}

pub struct GatewayStack {
    pub envoy: Envoy,
    /// In the order of the `mcpguard_aggregator` cluster's endpoints.
    pub aggregators: Vec<Aggregator>,
    pub demos: Vec<Demo>,
    pub policy: Policy,
    pub dir: tempfile::TempDir,
}

impl GatewayStack {
    /// With `servers` stateful demo MCP servers and one aggregator
    /// (`envoy/mcpguard.yaml`).
    pub async fn start(servers: usize) -> GatewayStack {
        Self::start_with("envoy/mcpguard.yaml", servers, 1).await
    }

    /// With the shipped Envoy `config` (its policy cluster pointed at the one policy
    /// service) in front of `aggregators` aggregators.
    pub async fn start_with(
        config: &'static str,
        servers: usize,
        aggregators: usize,
    ) -> GatewayStack {
        Self::start_paging(config, servers, aggregators, None).await
    }

    /// [`GatewayStack::start_with`], each demo server's `tools/list` in pages of
    /// `page_size` tools when given.
    pub async fn start_paging(
        config: &'static str,
        servers: usize,
        aggregators: usize,
        page_size: Option<usize>,
    ) -> GatewayStack {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, admin_port) = (free_port(), free_port());
        let resource_base = format!("http://127.0.0.1:{port}");
        let envoy_admin = format!("127.0.0.1:{admin_port}");
        let env = [
            ("MCPGUARD_ENVOY_ADMIN_ADDR", envoy_admin.as_str()),
            ("MCPGUARD_RESOURCE_BASE_URLS", resource_base.as_str()),
        ];
        let policy = Policy::start_with(&dir.path().join("data"), dir.path(), &env).await;
        let mut demos = Vec::new();
        for _ in 0..servers {
            demos.push(match page_size {
                Some(n) => Demo::start_paged(dir.path(), n).await,
                None => Demo::start(dir.path()).await,
            });
        }
        let mut started = Vec::new();
        for _ in 0..aggregators {
            started.push(Aggregator::start(policy.check_port, dir.path()).await);
        }
        let ports: Vec<u16> = started.iter().map(|a| a.port).collect();
        let opts = EnvoyOptions {
            config,
            check_port: policy.check_port,
            check_timeout_ms: crate::db::postgres_requested()
                .then_some(crate::db::POSTGRES_CHECK_TIMEOUT_MS),
            trusted_ca: None,
            issuer: Some(policy.public_url()),
            jwks_refresh_s: None,
        };
        let rendered = Envoy::render(&opts, port, admin_port);
        let mut cfg = EnvoyConfig::parse("rendered", &rendered).unwrap_or_else(|e| panic!("{e}"));
        cfg.cluster_ports("mcpguard_aggregator", &ports)
            .unwrap_or_else(|e| panic!("{e}"));
        let envoy = Envoy::start_config(&cfg.to_json(), port, admin_port, dir.path()).await;
        GatewayStack {
            envoy,
            aggregators: started,
            demos,
            policy,
            dir,
        }
    }

    pub fn admin(&self) -> Admin {
        self.policy.admin()
    }

    /// `http://…/mcp/{gateway}`.
    pub fn gateway_url(&self, gateway: &str) -> String {
        format!("{}/mcp/{gateway}", self.envoy.base_url())
    }
}
