//! Real processes on loopback ports, stopped on `Drop`: the e2e tests' face of the one
//! process harness (`mcpguard-harness`), which the benchmark and `make run` share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mcpguard_harness::envoy::{EnvoyConfig, FilterKind};

use crate::{Admin, free_port, workspace_root};

/// The admin token every test stack bootstraps with.
pub const ADMIN_TOKEN: &str = "mcpga_e2e-test-admin-token-000000000000000000";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The check secret every policy service and Envoy of this test process share (as
/// replicas behind one Envoy do): random per process, from the OS.
pub fn check_secret() -> &'static str {
    mcpguard_harness::check_secret().expect("a random check secret")
}

/// A child process whose output goes to a log file; killed on drop. When a test is
/// failing, the end of the log is printed so the cause is in the test output. Derefs
/// to [`mcpguard_harness::Proc`] (`log_tail`, `log_text`, `pid`, `kill`, ...).
pub struct Proc(mcpguard_harness::Proc);

impl Proc {
    pub(crate) fn spawn(name: &str, cmd: Command, log_dir: &Path) -> Proc {
        Proc(mcpguard_harness::Proc::spawn(name, cmd, log_dir).unwrap_or_else(|e| panic!("{e}")))
    }
}

impl std::ops::Deref for Proc {
    type Target = mcpguard_harness::Proc;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Polls `ready` until it holds, failing if the process dies or time runs out.
pub(crate) async fn wait_until<F, Fut>(proc: &mut Proc, what: &str, ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if let Err(e) = mcpguard_harness::wait_ready_async(proc, what, READY_TIMEOUT, ready).await {
        panic!("{e}");
    }
}

pub(crate) async fn http_ok(url: &str) -> bool {
    match reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Our binaries: `target/debug`, or `$MCPGUARD_BIN_DIR` (e.g. `target/release` for
/// benchmarks).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("MCPGUARD_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    present(dir.join(name))
}

/// A build output at `relative` to the workspace root.
fn built(relative: &str) -> PathBuf {
    present(workspace_root().join(relative))
}

fn present(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `make build` (or `make test`)",
        path.display()
    );
    if let Some(source) = newer_source(&path) {
        panic!(
            "{} is older than {}: it would run stale code; run `make build` \
             (`cargo test -p mcpguard-e2e` does not rebuild it)",
            path.display(),
            source.display()
        );
    }
    path
}

/// A source file changed after `output` was built, if there is one: cargo's own list
/// of what `output` is made from, its dep-info file beside it (`<output>.d`).
fn newer_source(output: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(output).ok()?.modified().ok()?;
    let info = std::fs::read_to_string(output.with_extension("d")).ok()?;
    // `<output>: <source> <source> ...`, a space inside a path escaped as `\ `.
    let (_, sources) = info.lines().next()?.split_once(": ")?;
    let sources = sources.replace("\\ ", "\0");
    sources
        .split_whitespace()
        .map(|s| PathBuf::from(s.replace('\0', " ")))
        .find(|source| {
            std::fs::metadata(source)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
        })
}

pub struct Policy {
    pub proc: Proc,
    pub public_port: u16,
    pub check_port: u16,
    pub data_dir: PathBuf,
    /// The `DATABASE_URL` it was given: a fresh PostgreSQL database when the suite runs
    /// with `MCPGUARD_TEST_DATABASE=postgres` (or one a test chose); `None` means the
    /// SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// The extra environment it was started with, kept for restarts.
    env: Vec<(String, String)>,
}

impl Policy {
    pub async fn start(data_dir: &Path, log_dir: &Path) -> Policy {
        Self::start_with(data_dir, log_dir, &[]).await
    }

    /// With extra environment variables (an empty value unsets one). A `DATABASE_URL`
    /// here wins over the harness's choice of database.
    pub async fn start_with(data_dir: &Path, log_dir: &Path, env: &[(&str, &str)]) -> Policy {
        Self::spawn(data_dir, log_dir, (free_port(), free_port()), env).await
    }

    /// Starts with no `MCPGUARD_BOOTSTRAP_ADMIN_TOKEN`, so the service generates one.
    pub async fn start_generating_admin_token(data_dir: &Path, log_dir: &Path) -> Policy {
        Self::spawn(
            data_dir,
            log_dir,
            (free_port(), free_port()),
            &[("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN", "")],
        )
        .await
    }

    /// Stops the service (if running) and starts it again on the same ports and data.
    pub async fn restart(&mut self, log_dir: &Path) {
        self.restart_with(log_dir, &[]).await;
    }

    /// Like [`Policy::restart`], with the environment it was started with changed by
    /// `extra` (as in [`Policy::start_with`]; later values win).
    pub async fn restart_with(&mut self, log_dir: &Path, extra: &[(&str, &str)]) {
        self.proc.kill();
        let (url, started_with) = (self.database_url.clone(), self.env.clone());
        let mut env: Vec<(&str, &str)> = url.iter().map(|u| ("DATABASE_URL", u.as_str())).collect();
        env.extend(started_with.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env.extend_from_slice(extra);
        *self = Self::spawn(
            &self.data_dir.clone(),
            log_dir,
            (self.public_port, self.check_port),
            &env,
        )
        .await;
    }

    /// Runs an operator command (`mcpguard-policy [flags] <args>`) on this service's data
    /// dir and database, with extra environment variables; returns when it exits.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(binary("mcpguard-policy"));
        cmd.arg("--data-dir").arg(&self.data_dir).args(args);
        if let Some(url) = &self.database_url {
            cmd.env("DATABASE_URL", url);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running mcpguard-policy")
    }

    /// Everything its database holds, as bytes to search: the SQLite files in the data
    /// dir (WAL included), or a data-only dump of its PostgreSQL database.
    pub fn stored_bytes(&self) -> Vec<u8> {
        if let Some(url) = &self.database_url {
            return crate::db::dump(url).into_bytes();
        }
        let mut raw = Vec::new();
        for entry in std::fs::read_dir(&self.data_dir).expect("reading the data dir") {
            raw.extend(std::fs::read(entry.expect("data dir entry").path()).unwrap_or_default());
        }
        raw
    }

    async fn spawn(
        data_dir: &Path,
        log_dir: &Path,
        (public_port, check_port): (u16, u16),
        env: &[(&str, &str)],
    ) -> Policy {
        // The database: one the caller named, else a fresh PostgreSQL database when the
        // suite runs on PostgreSQL, else (None) SQLite in the data dir.
        let database_url = match env.iter().find(|(k, _)| *k == "DATABASE_URL") {
            Some((_, "")) => None,
            Some((_, v)) => Some((*v).to_owned()),
            None => crate::db::test_database_url(),
        };
        let mut cmd = Command::new(binary("mcpguard-policy"));
        if let Some(url) = &database_url {
            cmd.env("DATABASE_URL", url);
        }
        if crate::db::postgres_requested() {
            let deadline = crate::db::POSTGRES_CHECK_DEADLINE_MS.to_string();
            cmd.env("MCPGUARD_CHECK_DEADLINE_MS", deadline);
        }
        cmd.arg("--public-listen")
            .arg(format!("127.0.0.1:{public_port}"))
            .arg("--check-listen")
            .arg(format!("127.0.0.1:{check_port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MCPGUARD_LOG", "info,mcpguard_policy=debug");
        let secret_file = log_dir.join("check-secret");
        std::fs::write(&secret_file, check_secret()).expect("writing the check secret");
        cmd.env("MCPGUARD_CHECK_SECRET_FILE", &secret_file);
        for (k, v) in env {
            // An empty value means "unset" (for variables the harness sets by default).
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut proc = Proc::spawn(
            &format!("policy-{public_port}-{}", crate::free_port()),
            cmd,
            log_dir,
        );
        let (public, check) = (
            format!("http://127.0.0.1:{public_port}/healthz"),
            format!("http://127.0.0.1:{check_port}/healthz"),
        );
        wait_until(&mut proc, "policy service", || {
            let (public, check) = (public.clone(), check.clone());
            async move { http_ok(&public).await && http_ok(&check).await }
        })
        .await;
        Policy {
            proc,
            public_port,
            check_port,
            data_dir: data_dir.to_path_buf(),
            database_url,
            env: env
                .iter()
                .filter(|(k, _)| *k != "DATABASE_URL")
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.public_url(), ADMIN_TOKEN)
    }

    /// The public port's URL: the admin API, and the OAuth issuer.
    pub fn public_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.public_port)
    }
}

pub struct Demo {
    pub proc: Proc,
    pub port: u16,
}

impl Demo {
    /// Stateful: sessions and SSE responses, like most servers in the wild.
    pub async fn start(log_dir: &Path) -> Demo {
        Self::spawn(log_dir, &[]).await
    }

    /// Stateful, with the `ask` tool, which asks the client for a name (elicitation).
    pub async fn start_eliciting(log_dir: &Path) -> Demo {
        Self::spawn(log_dir, &["--elicit"]).await
    }

    /// Stateful, its `tools/list` in pages of `page_size` tools.
    pub async fn start_paged(log_dir: &Path, page_size: usize) -> Demo {
        Self::spawn(log_dir, &["--page-size", &page_size.to_string()]).await
    }

    /// Stateless: each POST is answered on its own with JSON (for load runs).
    pub async fn start_stateless(log_dir: &Path) -> Demo {
        Self::spawn(log_dir, &["--stateless"]).await
    }

    async fn spawn(log_dir: &Path, args: &[&str]) -> Demo {
        let port = free_port();
        let mut cmd = Command::new(binary("mcpguard-demo-mcp"));
        cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        cmd.args(args);
        let mut proc = Proc::spawn(&format!("demo-mcp-{port}"), cmd, log_dir);
        wait_until(&mut proc, "demo MCP server", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Demo { proc, port }
    }

    pub fn upstream_url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// What a test may change in the shipped Envoy config.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub config: &'static str,
    pub check_port: u16,
    pub check_timeout_ms: Option<u64>,
    /// Replaces the system CA bundle the https upstream cluster trusts.
    pub trusted_ca: Option<PathBuf>,
    /// Replaces the filter's OAuth `issuer` (the policy service's public URL).
    pub issuer: Option<String>,
    /// Replaces the filter's `jwks_refresh_s`.
    pub jwks_refresh_s: Option<u64>,
}

/// A shipped Envoy config (a path under the workspace), with its admin and first
/// listener's ports set: the start of every renderer.
pub(crate) fn shipped_config(config: &str, port: u16, admin_port: u16) -> EnvoyConfig {
    let mut cfg = EnvoyConfig::load(&workspace_root(), config).unwrap_or_else(|e| panic!("{e}"));
    cfg.ports(port, admin_port);
    cfg
}

pub struct Envoy {
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
}

impl Envoy {
    pub fn executable() -> PathBuf {
        mcpguard_harness::envoy::executable(&workspace_root())
            .unwrap_or_else(|e| panic!("{e} (or `make test`)"))
    }

    pub fn wasm() -> PathBuf {
        built("target/wasm32-wasip1/release/mcpguard_filter.wasm")
    }

    /// The filter as an Envoy dynamic module (debug build; `make build` makes it).
    pub fn dynamic_module() -> PathBuf {
        built("target/debug/libmcpguard_dynamic_module.so")
    }

    /// The shipped config with this test's ports and absolute paths, as JSON.
    pub fn render(opts: &EnvoyOptions, port: u16, admin_port: u16) -> String {
        Self::render_with_checks(opts, &[opts.check_port], port, admin_port)
    }

    /// Like [`Envoy::render`], with the policy cluster listing one endpoint per check
    /// port (policy-svc replicas); `opts.check_port` is not used.
    pub fn render_with_checks(
        opts: &EnvoyOptions,
        check_ports: &[u16],
        port: u16,
        admin_port: u16,
    ) -> String {
        assert!(!check_ports.is_empty(), "at least one check port");
        let mut cfg = shipped_config(opts.config, port, admin_port);
        // The mcpguard filter: the wasm one, or the same as a dynamic module.
        match cfg.filter_kind() {
            Some(FilterKind::Wasm) => cfg.wasm(&Envoy::wasm()),
            Some(FilterKind::DynamicModule) => cfg.dynamic_module(&Envoy::dynamic_module()),
            None => panic!("the mcpguard filter is configured in {}", opts.config),
        };
        cfg.plugin(|plugin| {
            if let Some(ms) = opts.check_timeout_ms {
                plugin["check_timeout_ms"] = ms.into();
            }
            if let Some(issuer) = &opts.issuer {
                plugin["issuer"] = issuer.as_str().into();
            }
            if let Some(seconds) = opts.jwks_refresh_s {
                plugin["jwks_refresh_s"] = seconds.into();
            }
        })
        .and_then(|cfg| cfg.cluster_ports("mcpguard_policy", check_ports))
        .unwrap_or_else(|e| panic!("{e}"));
        if let Some(ca) = &opts.trusted_ca {
            cfg.trusted_ca("mcpguard_upstream_https", ca)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        cfg.to_json()
    }

    pub async fn start(opts: &EnvoyOptions, log_dir: &Path) -> Envoy {
        Self::start_with_checks(opts, &[opts.check_port], log_dir).await
    }

    /// With one policy cluster endpoint per check port (see [`Envoy::render_with_checks`]).
    pub async fn start_with_checks(
        opts: &EnvoyOptions,
        check_ports: &[u16],
        log_dir: &Path,
    ) -> Envoy {
        let (port, admin_port) = (free_port(), free_port());
        Self::start_config(
            &Self::render_with_checks(opts, check_ports, port, admin_port),
            port,
            admin_port,
            log_dir,
        )
        .await
    }

    /// Any Envoy config (JSON or YAML text) that listens on `port`, admin on `admin_port`.
    pub async fn start_config(config: &str, port: u16, admin_port: u16, log_dir: &Path) -> Envoy {
        Self::start_config_with_workers(config, port, admin_port, log_dir, 1).await
    }

    /// Like [`Envoy::start_config`], with `workers` worker threads (`--concurrency`).
    pub async fn start_config_with_workers(
        config: &str,
        port: u16,
        admin_port: u16,
        log_dir: &Path,
        workers: u32,
    ) -> Envoy {
        let config_path = log_dir.join(format!("envoy-{port}.json"));
        std::fs::write(&config_path, config).expect("writing envoy config");
        let cmd = mcpguard_harness::envoy::command_with_workers(
            &Self::executable(),
            &config_path,
            "info",
            check_secret(),
            &workspace_root(),
            workers,
        );
        let mut proc = Proc::spawn(&format!("envoy-{port}"), cmd, log_dir);
        let ready = format!("http://127.0.0.1:{admin_port}/ready");
        wait_until(&mut proc, "envoy", || {
            let ready = ready.clone();
            async move { http_ok(&ready).await }
        })
        .await;
        Envoy {
            proc,
            port,
            admin_port,
        }
    }

    pub fn mcp_url(&self, gateway: &str, server: &str) -> String {
        format!("http://127.0.0.1:{}/mcp/{gateway}/{server}", self.port)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One per-host value of a cluster from `/clusters`, e.g. `rq_total` (requests
    /// sent to that host; health checks are not counted) or `health_flags`; empty when
    /// absent.
    pub async fn host_stat(&self, cluster: &str, port: u16, name: &str) -> String {
        let url = format!("http://127.0.0.1:{}/clusters", self.admin_port);
        let text = reqwest::get(&url)
            .await
            .expect("envoy admin")
            .text()
            .await
            .expect("clusters body");
        let key = format!("{cluster}::127.0.0.1:{port}::{name}::");
        text.lines()
            .find_map(|l| l.strip_prefix(&key).map(str::to_owned))
            .unwrap_or_default()
    }

    /// One counter from Envoy's `/stats` (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let url = format!(
            "http://127.0.0.1:{}/stats?filter=^{}$",
            self.admin_port,
            name.replace('.', "\\.")
        );
        let text = reqwest::get(&url)
            .await
            .expect("envoy admin")
            .text()
            .await
            .expect("stats body");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The whole local gateway: policy service, one demo MCP server and Envoy.
pub struct Stack {
    pub envoy: Envoy,
    pub demo: Demo,
    pub policy: Policy,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_opts(false).await
    }

    /// With a stateless demo server, for load runs.
    pub async fn start_stateless() -> Stack {
        Self::start_opts(true).await
    }

    async fn start_opts(stateless: bool) -> Stack {
        Self::start_with(stateless, &[], None).await
    }

    /// With Envoy's config `config` (relative to the workspace root) instead of
    /// `envoy/mcpguard.yaml`: e.g. the filter as a dynamic module.
    pub async fn start_config(config: &'static str) -> Stack {
        Self::start_full(config, false, &[], None).await
    }

    /// With extra environment for the policy service (see [`Policy::start_with`]) and,
    /// optionally, the filter's `jwks_refresh_s`. Envoy's ports are chosen first, so
    /// the policy service knows the data plane's URL (the base of OAuth resources) and
    /// Envoy the policy service's (the issuer).
    pub async fn start_with(
        stateless: bool,
        env: &[(&str, &str)],
        jwks_refresh_s: Option<u64>,
    ) -> Stack {
        Self::start_full("envoy/mcpguard.yaml", stateless, env, jwks_refresh_s).await
    }

    async fn start_full(
        config: &'static str,
        stateless: bool,
        env: &[(&str, &str)],
        jwks_refresh_s: Option<u64>,
    ) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, admin_port) = (free_port(), free_port());
        let resource_base = format!("http://127.0.0.1:{port}");
        // Envoy's admin is never an upstream: the policy service must know where it is.
        let envoy_admin = format!("127.0.0.1:{admin_port}");
        let mut env = env.to_vec();
        env.push(("MCPGUARD_RESOURCE_BASE_URLS", &resource_base));
        // Before the caller's, so that a test's own value wins (later values do).
        env.insert(0, ("MCPGUARD_ENVOY_ADMIN_ADDR", &envoy_admin));
        let policy = Policy::start_with(&dir.path().join("data"), dir.path(), &env).await;
        let demo = Demo::spawn(dir.path(), if stateless { &["--stateless"] } else { &[] }).await;
        let opts = EnvoyOptions {
            config,
            check_port: policy.check_port,
            check_timeout_ms: crate::db::postgres_requested()
                .then_some(crate::db::POSTGRES_CHECK_TIMEOUT_MS),
            trusted_ca: None,
            issuer: Some(policy.public_url()),
            jwks_refresh_s,
        };
        let envoy = Envoy::start_config(
            &Envoy::render(&opts, port, admin_port),
            port,
            admin_port,
            dir.path(),
        )
        .await;
        Stack {
            envoy,
            demo,
            policy,
            dir,
        }
    }

    pub fn admin(&self) -> Admin {
        self.policy.admin()
    }
}
