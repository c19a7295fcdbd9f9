//! `mcpguard-bench` (run by `make bench`): the same MCP workload through four Envoy
//! setups that differ only in their auth filter, interleaved a b c d a b c d; the
//! gateway URL against the per-server URL ([`gateway`]); then the policy service's
//! check endpoint on its own, on SQLite and on PostgreSQL, interleaved sqlite postgres
//! sqlite postgres. Loopback only, bounded duration; the report goes to
//! stdout and `target/bench/report.md`, raw runs to `results.json`.
//!
//! See [`USAGE`] for the options. `--hold` starts everything, prints the ports and
//! waits (for profiling by hand). Needs release builds of the policy service and the
//! demo MCP server (`target/release`, or `$MCPGUARD_BIN_DIR`), the filter's `.wasm`
//! and dynamic module, Envoy (`$MCPGUARD_ENVOY`, else `.venv/bin/envoy`), `wrk`, and
//! PostgreSQL's server binaries unless `--no-postgres` (see `pgcluster/`).

mod envoy;
mod fixed_reply;
mod gateway;
mod metrics_cost;
mod procs;
mod report;
mod seed;
mod wrk;

use mcpguard_pgcluster::Cluster;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mcpguard_core::check::{CHECK_PATH, CheckRequest, Credential};

use envoy::{Envoy, Setup};
use procs::{Proc, Usage, http, http_ok};
use seed::Backend;

const USAGE: &str = "\
usage: mcpguard-bench [options]
  --duration S               seconds per measured Envoy run (5)
  --rounds N                 rounds of a b c d per concurrency (3)
  --concurrency 1,8,32       wrk connections for the Envoy workload
  --setups a,b,c,d           which Envoy setups: a bare, b native ext_authz, c mcpguard
                             wasm, d mcpguard dynamic module, e mcpguard wasm with its
                             checks on one gRPC stream (experimental; not by default)
  --check-duration S         seconds per measured check-endpoint run (5)
  --check-rounds N           rounds of sqlite postgres per concurrency (2)
  --check-concurrency 1,8,32 wrk connections for the check endpoint
  --only envoy|gateway|check|metrics|stream
                             run one of the benchmarks (gateway: the gateway URL against
                             the per-server URL, and tools/list fan-out; metrics: only
                             the in-process cost of recording and scraping the metrics,
                             no servers; stream: the Envoy workload through a b c e, and
                             c and e against a fixed-reply server, for the policy CPU
                             per check on each transport)
  --no-postgres              check endpoint on SQLite only: no throwaway PostgreSQL
                             cluster (its server binaries are then not needed)
  --hold                     start everything, print pids and ports, wait for Ctrl-C
                             (Ctrl-C or SIGTERM stops every server the bench started,
                             at any point of a run)
  -h, --help                 this text";

/// Distinct MCP requests in the Envoy workload (each with its own token).
const MCP_REQUESTS: usize = 2_000;
/// Distinct check requests in the check-endpoint workload.
const CHECK_REQUESTS: usize = 10_000;
pub(crate) const WARMUP_SECONDS: u32 = 2;
/// The throwaway cluster keeps PostgreSQL's defaults (shared_buffers 128MB, fsync and
/// synchronous_commit on), except for a quieter log.
const POSTGRES_SETTINGS: &[(&str, &str)] = &[("log_min_messages", "warning")];

/// A policy service (release, default settings) on free loopback ports.
struct PolicyService {
    proc: Proc,
    check_port: u16,
}

impl PolicyService {
    /// On SQLite its store is `target/bench/data`; on PostgreSQL, `database_url`
    /// (its data dir, `target/bench/data-postgres`, then holds only its keys).
    fn start(
        bin: &Path,
        out_dir: &Path,
        backend: Backend,
        database_url: Option<&str>,
    ) -> Result<PolicyService> {
        let (public_port, check_port) = (procs::free_port()?, procs::free_port()?);
        let (name, data_dir) = match backend {
            Backend::Sqlite => ("policy", out_dir.join("data")),
            Backend::Postgres => ("policy-postgres", out_dir.join("data-postgres")),
        };
        let mut cmd = Command::new(bin);
        cmd.args([
            "--public-listen",
            &format!("127.0.0.1:{public_port}"),
            "--check-listen",
            &format!("127.0.0.1:{check_port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .env_remove("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN")
        .env_remove("DATABASE_URL");
        let secret_file = out_dir.join("check-secret");
        std::fs::write(&secret_file, procs::check_secret()?)?;
        cmd.env("MCPGUARD_CHECK_SECRET_FILE", &secret_file);
        if let Some(url) = database_url {
            cmd.env("DATABASE_URL", url);
        }
        let mut proc = Proc::spawn(name, cmd, out_dir)?;
        proc.wait_ready(&format!("policy service ({})", backend.name()), || {
            http_ok(check_port, "/healthz") && http_ok(public_port, "/healthz")
        })?;
        Ok(PolicyService { proc, check_port })
    }
}

/// What the report says of the PostgreSQL server, from `postgres --version`.
fn postgres_description(version: &str) -> String {
    let short = version
        .strip_prefix("postgres (PostgreSQL) ")
        .unwrap_or(version);
    format!(
        "PostgreSQL {short}, a throwaway cluster on loopback TCP with default settings \
         (shared_buffers 128MB, fsync on); the policy service's defaults: checks read over \
         one pipelined connection per worker thread, the writers use its pool of 8"
    )
}

#[derive(Debug, Clone)]
struct Options {
    duration: u32,
    rounds: u32,
    concurrency: Vec<u32>,
    check_duration: u32,
    check_rounds: u32,
    check_concurrency: Vec<u32>,
    envoy: bool,
    /// The gateway URL's benchmark ([`gateway`]).
    gateway: bool,
    check: bool,
    setups: Vec<Setup>,
    /// Also run the check endpoint on PostgreSQL.
    postgres: bool,
    hold: bool,
    /// Only the metrics' cost (`--only metrics`): no servers.
    metrics_only: bool,
    /// (c) and (e) also against the fixed-reply server (`--only stream`).
    fixed_reply: bool,
}

fn parse_list(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| x.trim().parse::<u32>().context(USAGE))
        .collect()
}

fn options(args: impl IntoIterator<Item = String>) -> Result<Options> {
    let mut o = Options {
        duration: 5,
        rounds: 3,
        concurrency: vec![1, 8, 32],
        check_duration: 5,
        check_rounds: 2,
        check_concurrency: vec![1, 8, 32],
        envoy: true,
        gateway: true,
        check: true,
        setups: Setup::DEFAULT.to_vec(),
        postgres: true,
        hold: false,
        metrics_only: false,
        fixed_reply: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().context(USAGE);
        match arg.as_str() {
            "--duration" => o.duration = value()?.parse().context(USAGE)?,
            "--rounds" => o.rounds = value()?.parse().context(USAGE)?,
            "--concurrency" => o.concurrency = parse_list(&value()?)?,
            "--check-duration" => o.check_duration = value()?.parse().context(USAGE)?,
            "--check-rounds" => o.check_rounds = value()?.parse().context(USAGE)?,
            "--check-concurrency" => o.check_concurrency = parse_list(&value()?)?,
            "--only" => match value()?.as_str() {
                "envoy" => (o.gateway, o.check) = (false, false),
                "gateway" => (o.envoy, o.check) = (false, false),
                "check" => (o.envoy, o.gateway) = (false, false),
                "metrics" => o.metrics_only = true,
                "stream" => {
                    (o.gateway, o.check, o.fixed_reply) = (false, false, true);
                    o.setups =
                        [Setup::Bare, Setup::ExtAuthz, Setup::Mcpguard, Setup::Stream].to_vec();
                }
                _ => bail!(USAGE),
            },
            "--setups" => {
                let v = value()?;
                o.setups = Setup::ALL
                    .into_iter()
                    .filter(|s| v.split(',').any(|x| x.trim() == s.letter()))
                    .collect();
            }
            "--no-postgres" => o.postgres = false,
            "--hold" => o.hold = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if [o.duration, o.rounds, o.check_duration, o.check_rounds].contains(&0)
        || o.concurrency.contains(&0)
        || o.check_concurrency.contains(&0)
    {
        bail!("durations, rounds and concurrencies must be positive\n{USAGE}");
    }
    Ok(o)
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// A release binary from `target/release`, or from `$MCPGUARD_BIN_DIR` when set (for
/// profiling builds kept elsewhere).
fn release_binary(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("MCPGUARD_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release"));
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --release -p mcpguard-policy -p mcpguard-demo-mcp -p mcpguard-aggregator -p mcpguard-bench (make bench does this)",
            path.display()
        );
    }
    Ok(path)
}

/// One measured wrk run and what the processes spent during it.
#[derive(Debug, Clone)]
pub struct Run {
    /// `a`, `b`, `c`, or the check endpoint on a backend: `check-sqlite`,
    /// `check-postgres`.
    pub target: &'static str,
    pub connections: u32,
    pub round: u32,
    pub outcome: wrk::Outcome,
    pub envoy: Option<Usage>,
    pub policy: Option<Usage>,
    pub upstream: Option<Usage>,
    /// CPU seconds of the PostgreSQL server (postmaster and backends), when it served.
    pub database_cpu_s: Option<f64>,
    /// Share of all CPUs busy during the run (from /proc/stat), 0..1.
    pub machine_busy: f64,
}

/// The processes whose CPU time and peak RSS a run records.
pub(crate) struct Measured {
    envoy: Option<u32>,
    policy: Option<u32>,
    upstream: Option<u32>,
    /// The postmaster, whose process tree's CPU is counted.
    database: Option<u32>,
    ticks: f64,
}

fn machine_cpu() -> (u64, u64) {
    // First line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = nums.iter().take(8).sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total, idle)
}

pub(crate) fn measure(
    m: &Measured,
    target: &'static str,
    connections: u32,
    round: u32,
    go: impl FnOnce() -> Result<wrk::Outcome>,
) -> Result<Run> {
    let pids = [m.envoy, m.policy, m.upstream];
    let mut before = [None; 3];
    for (slot, pid) in before.iter_mut().zip(pids) {
        if let Some(pid) = pid {
            procs::reset_peak_rss(pid);
            *slot = Some(procs::usage(pid, m.ticks)?);
        }
    }
    let db_before = m.database.map(|pid| procs::tree_cpu(pid, m.ticks));
    let (total0, idle0) = machine_cpu();
    let outcome = go()?;
    let (total1, idle1) = machine_cpu();
    let database_cpu_s = m
        .database
        .zip(db_before)
        .map(|(pid, before)| procs::tree_cpu(pid, m.ticks) - before);
    let mut after = [None; 3];
    for ((slot, pid), b) in after.iter_mut().zip(pids).zip(before) {
        if let (Some(pid), Some(b)) = (pid, b) {
            let a = procs::usage(pid, m.ticks)?;
            *slot = Some(Usage {
                cpu_s: a.cpu_s - b.cpu_s,
                peak_rss_mib: a.peak_rss_mib,
            });
        }
    }
    let total = total1.saturating_sub(total0).max(1) as f64;
    let idle = idle1.saturating_sub(idle0) as f64;
    Ok(Run {
        target,
        connections,
        round,
        outcome,
        envoy: after[0],
        policy: after[1],
        upstream: after[2],
        database_cpu_s,
        machine_busy: 1.0 - idle / total,
    })
}

pub(crate) fn initialize_body(id: usize) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "mcpguard-bench", "version": "0"}}})
    .to_string()
}

/// The MCP workload: 80% `tools/call` (echo), 10% `initialize`, 10% `tools/list`, each
/// request with its own token on its own gateway and server.
fn mcp_lines(live: &[seed::SeededToken]) -> Vec<(String, String, String)> {
    seed::spread(live, MCP_REQUESTS)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let body = match i % 10 {
                0 => initialize_body(i),
                1 => serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"})
                    .to_string(),
                _ => serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": format!("bench request {i}")}}})
                .to_string(),
            };
            (
                format!("/mcp/{}/{}", c.gateway, c.server),
                c.token.clone(),
                body,
            )
        })
        .collect()
}

/// What the filter sends for each of those requests (with an `x-request-id`-sized id).
fn check_lines(live: &[seed::SeededToken]) -> Result<Vec<(String, String, String)>> {
    seed::spread(live, CHECK_REQUESTS)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let req = CheckRequest {
                credential: Credential::ApiToken {
                    hash: c.hash.clone(),
                },
                gateway: Some(c.gateway.clone()),
                server: c.server.clone(),
                mcp_method: None,
                tool: None,
                request_id: Some(format!("6f1c2a9e-0000-4000-8000-{i:012}")),
                item: None,
                each_server: None,
            };
            Ok((
                CHECK_PATH.to_owned(),
                String::new(),
                serde_json::to_string(&req)?,
            ))
        })
        .collect()
}

fn write_list(path: &Path, lines: &[(String, String, String)]) -> Result<()> {
    let mut text = String::new();
    for (p, t, b) in lines {
        text.push_str(&format!("{p}\t{t}\t{b}\n"));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Before measuring: the workload's requests really are allowed end to end, and a
/// revoked token really is refused, in every setup.
fn sanity_check_envoy(
    envoy: &Envoy,
    lines: &[(String, String, String)],
    revoked: &seed::SeededToken,
) -> Result<()> {
    for (path, token, body) in lines.iter().take(10) {
        let (status, _, answer) = procs::mcp_post(envoy.port, path, token, None, body)?;
        if status != 200 || !answer.contains("\"result\"") {
            bail!(
                "{}: POST {path} answered {status}: {answer}",
                envoy.setup.label()
            );
        }
    }
    if envoy.setup != Setup::Bare {
        let path = format!("/mcp/{}/{}", revoked.gateway, revoked.server);
        let (status, _, answer) =
            procs::mcp_post(envoy.port, &path, &revoked.token, None, &initialize_body(0))?;
        if status != 401 || !answer.contains("token_revoked") {
            bail!(
                "{}: a revoked token answered {status}: {answer}",
                envoy.setup.label()
            );
        }
    }
    Ok(())
}

fn sanity_check_policy(check_port: u16, lines: &[(String, String, String)]) -> Result<()> {
    for (path, _, body) in lines.iter().step_by(50) {
        let (status, answer) = http(
            check_port,
            "POST",
            path,
            &[
                ("content-type", "application/json"),
                ("x-mcpguard-check-secret", procs::check_secret()?),
            ],
            body,
        )?;
        if status != 200 || !answer.contains("\"decision\":\"allow\"") {
            bail!("check {body} answered {status}: {answer}");
        }
    }
    Ok(())
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            s.trim().to_owned()
        })
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpguard-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [sub, port, upstream] = &args[..]
        && sub == "fixed-reply"
    {
        return fixed_reply::main(port, upstream);
    }
    let opts = options(args)?;
    if opts.metrics_only {
        println!("{}", metrics_cost::markdown(&metrics_cost::measure()));
        return Ok(());
    }
    procs::stop_all_on_signal()?;
    let root = workspace_root();
    if !wrk::available() {
        bail!("wrk is missing: apt-get install -y wrk (make bench does this)");
    }
    let policy_bin = release_binary(&root, "mcpguard-policy")?;
    let demo_bin = release_binary(&root, "mcpguard-demo-mcp")?;
    envoy::wasm_path(&root)?;
    let envoy_bin = envoy::executable(&root)?;

    let out_dir = root.join("target/bench");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let script = out_dir.join("workload.lua");
    std::fs::write(&script, wrk::SCRIPT)?;
    let ticks = procs::clock_ticks_per_second();
    let started = Instant::now();
    let load_before = report::load_average();

    // The upstream: the demo MCP server, stateless, so every POST stands alone.
    let demo_port = procs::free_port()?;
    let mut cmd = Command::new(&demo_bin);
    cmd.args(["--listen", &format!("127.0.0.1:{demo_port}"), "--stateless"]);
    let mut demo = Proc::spawn("demo-mcp", cmd, &out_dir)?;
    demo.wait_ready("demo MCP server", || {
        std::net::TcpStream::connect(("127.0.0.1", demo_port)).is_ok()
    })?;

    // The fan-out gateway's upstreams, one demo MCP server each (gateway benchmark).
    let mut fanout_demos = Vec::new();
    if opts.gateway {
        for i in 0..gateway::FANOUT {
            let port = procs::free_port()?;
            let mut cmd = Command::new(&demo_bin);
            cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--stateless"]);
            let mut proc = Proc::spawn(&format!("demo-mcp-fanout-{i}"), cmd, &out_dir)?;
            proc.wait_ready("fan-out demo MCP server", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })?;
            fanout_demos.push((port, proc));
        }
    }

    let data = seed::generate()?;
    let upstream = format!("127.0.0.1:{demo_port}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!("seeding the data set (sqlite)...");
    let sqlite_url = seed::sqlite_url(&out_dir.join("data"))?;
    let mut seeded = vec![(
        Backend::Sqlite,
        runtime.block_on(seed::seed(&sqlite_url, &data, &upstream))?,
    )];
    let fanout_token = if opts.gateway {
        let upstreams: Vec<String> = fanout_demos
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        Some(runtime.block_on(seed::seed_fanout(&sqlite_url, &upstreams))?)
    } else {
        None
    };
    let mut policy = PolicyService::start(&policy_bin, &out_dir, Backend::Sqlite, None)?;
    let check_port = policy.check_port;
    let mut aggregator = if opts.gateway {
        let bin = release_binary(&root, "mcpguard-aggregator")?;
        Some(gateway::Aggregator::start(&bin, &out_dir, check_port)?)
    } else {
        None
    };

    let mcp_list = out_dir.join("mcp-requests.tsv");
    let mcp = mcp_lines(&data.live);
    write_list(&mcp_list, &mcp)?;
    let check_list = out_dir.join("check-requests.tsv");
    let checks = check_lines(&data.live)?;
    write_list(&check_list, &checks)?;
    sanity_check_policy(check_port, &checks)?;

    // The PostgreSQL side of the check benchmark, set up (and sanity-checked) before
    // any measuring so a problem shows at once. It idles during the Envoy runs: the
    // seed ends with VACUUM ANALYZE, so autovacuum has nothing left to do then.
    // Declared in this order so the service stops before its cluster.
    let mut postgres: Option<(Cluster, PolicyService)> = None;
    if opts.postgres && (opts.check || opts.hold) {
        eprintln!("starting a throwaway PostgreSQL cluster...");
        let cluster = Cluster::start(POSTGRES_SETTINGS)
            .context("starting PostgreSQL for the check benchmark (--no-postgres skips it)")?;
        let url = cluster.create_database("mcpguard_bench")?;
        eprintln!("seeding the data set (postgres)...");
        let seconds = runtime
            .block_on(seed::seed(&url, &data, &upstream))
            .with_context(|| format!("PostgreSQL log:\n{}", cluster.log_tail()))?;
        seeded.push((Backend::Postgres, seconds));
        let service = PolicyService::start(&policy_bin, &out_dir, Backend::Postgres, Some(&url))?;
        sanity_check_policy(service.check_port, &checks)?;
        postgres = Some((cluster, service));
    }
    drop(runtime);
    eprintln!("{}", seed::describe(&data, &seeded));

    let mut envoys = Vec::new();
    // The gateway benchmark runs through setup c; alone, it starts only that one.
    let setups = if opts.envoy || opts.hold {
        opts.setups.clone()
    } else if opts.gateway {
        vec![Setup::Mcpguard]
    } else {
        Vec::new()
    };
    {
        for setup in &setups {
            let aggregator_port = aggregator.as_ref().map(|a| a.port);
            let e = Envoy::start(
                &root,
                *setup,
                check_port,
                demo_port,
                aggregator_port,
                &out_dir,
            )?;
            sanity_check_envoy(&e, &mcp, &data.revoked_example)?;
            eprintln!(
                "{} on 127.0.0.1:{} (admin {}), pid {} ({})",
                setup.label(),
                e.port,
                e.admin_port,
                e.proc.pid(),
                procs::exe(e.proc.pid())
            );
            envoys.push(e);
        }
    }
    // (c) and (e) once more, against the fixed-reply server: what the policy service's
    // CPU per check compares with on each transport.
    let mut fixed_envoys: Vec<(&'static str, Envoy)> = Vec::new();
    let mut fixed_server = None;
    if opts.fixed_reply {
        let port = procs::free_port()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["fixed-reply", &port.to_string(), &upstream]);
        let mut proc = Proc::spawn("fixed-reply", cmd, &out_dir)?;
        proc.wait_ready("fixed-reply server", || http_ok(port, "/healthz"))?;
        let dir = out_dir.join("fixed-reply");
        std::fs::create_dir_all(&dir)?;
        for (target, setup) in [
            (report::FIXED_C, Setup::Mcpguard),
            (report::FIXED_E, Setup::Stream),
        ] {
            let e = Envoy::start(&root, setup, port, demo_port, None, &dir)?;
            let (path, token, body) = &mcp[2];
            let (status, _, answer) = procs::mcp_post(e.port, path, token, None, body)?;
            if status != 200 || !answer.contains("\"result\"") {
                bail!("{target}: POST {path} answered {status}: {answer}");
            }
            fixed_envoys.push((target, e));
        }
        fixed_server = Some(proc);
    }
    if opts.hold {
        eprintln!(
            "holding: policy (sqlite) pid {} check port {check_port}, demo pid {} port {demo_port}; \
             workload lists in {}; Ctrl-C to stop",
            policy.proc.pid(),
            demo.pid(),
            out_dir.display()
        );
        if let Some((cluster, service)) = &postgres {
            eprintln!(
                "          policy (postgres) pid {} check port {}; PostgreSQL at {}",
                service.proc.pid(),
                service.check_port,
                cluster.url("mcpguard_bench")
            );
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let pg_alive = postgres.as_mut().is_none_or(|(_, p)| p.proc.alive());
            if !policy.proc.alive() || !demo.alive() || !pg_alive {
                bail!("a process exited");
            }
        }
    }

    // Refusals logged from here on count against the workload (the sanity checks above
    // were refused on purpose).
    let log_offset = std::fs::metadata(policy.proc.log()).map_or(0, |m| m.len() as usize);
    let mut runs: Vec<Run> = Vec::new();
    let answers = |e: &Envoy| {
        ["2xx", "4xx", "5xx"].map(|class| {
            procs::envoy_stat(e.admin_port, &format!("http.mcp.downstream_rq_{class}"))
        })
    };
    let answers_before: Vec<[u64; 3]> = envoys.iter().map(answers).collect();
    if opts.envoy {
        for e in envoys.iter().chain(fixed_envoys.iter().map(|(_, e)| e)) {
            wrk::run(&script, &mcp_list, e.port, 8, WARMUP_SECONDS, None)?;
        }
        for &c in &opts.concurrency {
            for round in 1..=opts.rounds {
                for e in &envoys {
                    let m = Measured {
                        envoy: Some(e.proc.pid()),
                        policy: Some(policy.proc.pid()),
                        upstream: Some(demo.pid()),
                        database: None,
                        ticks,
                    };
                    let run = measure(&m, e.setup.letter(), c, round, || {
                        wrk::run(&script, &mcp_list, e.port, c, opts.duration, None)
                    })?;
                    eprintln!("{}", report::progress(&run));
                    runs.push(run);
                }
                for (target, e) in &fixed_envoys {
                    let m = Measured {
                        envoy: Some(e.proc.pid()),
                        policy: fixed_server.as_ref().map(Proc::pid),
                        upstream: Some(demo.pid()),
                        database: None,
                        ticks,
                    };
                    let run = measure(&m, target, c, round, || {
                        wrk::run(&script, &mcp_list, e.port, c, opts.duration, None)
                    })?;
                    eprintln!("{}", report::progress(&run));
                    runs.push(run);
                }
            }
        }
    }
    // What each Envoy answered during warm-up and measurement, by status class.
    let envoy_answers: Vec<String> = envoys
        .iter()
        .zip(&answers_before)
        .map(|(e, before)| {
            let after = answers(e);
            format!(
                "{} {} 2xx / {} 4xx / {} 5xx",
                e.setup.label(),
                after[0].saturating_sub(before[0]),
                after[1].saturating_sub(before[1]),
                after[2].saturating_sub(before[2])
            )
        })
        .collect();
    let mut gateway_runs = Vec::new();
    let gateway_opts = gateway::Options {
        duration: opts.duration,
        rounds: opts.rounds,
        concurrency: opts.concurrency.clone(),
    };
    if let (Some(aggregator), Some(fanout_token)) = (&mut aggregator, &fanout_token) {
        let Some(e) = envoys.iter().find(|e| e.setup == Setup::Mcpguard) else {
            bail!("the gateway benchmark runs through setup c: --setups must include c");
        };
        let fanout: Vec<(u16, u32)> = fanout_demos.iter().map(|(p, d)| (*p, d.pid())).collect();
        let setup = gateway::Setup {
            envoy_port: e.port,
            envoy_pid: e.proc.pid(),
            policy_pid: policy.proc.pid(),
            demo_pid: demo.pid(),
            fanout: &fanout,
            fanout_token,
            live: &data.live,
            script: &script,
            out_dir: &out_dir,
            ticks,
        };
        gateway_runs = gateway::run(&setup, aggregator, &gateway_opts)?;
    }
    // The Envoys sit idle from here; stop them so the check benchmark has the machine.
    drop(envoys);
    drop(aggregator);
    drop(fanout_demos);

    if opts.check {
        // Interleaved per concurrency: sqlite postgres sqlite postgres.
        let mut targets: Vec<(&'static str, &mut PolicyService, Option<u32>)> =
            vec![(Backend::Sqlite.check_target(), &mut policy, None)];
        if let Some((cluster, service)) = postgres.as_mut() {
            let pid = cluster.postmaster_pid();
            targets.push((Backend::Postgres.check_target(), service, pid));
        }
        for (_, service, _) in &targets {
            wrk::run(
                &script,
                &check_list,
                service.check_port,
                8,
                WARMUP_SECONDS,
                Some(procs::check_secret()?),
            )?;
        }
        for &c in &opts.check_concurrency {
            for round in 1..=opts.check_rounds {
                for (target, service, database) in &targets {
                    let m = Measured {
                        envoy: None,
                        policy: Some(service.proc.pid()),
                        upstream: None,
                        database: *database,
                        ticks,
                    };
                    let run = measure(&m, target, c, round, || {
                        wrk::run(
                            &script,
                            &check_list,
                            service.check_port,
                            c,
                            opts.check_duration,
                            Some(procs::check_secret()?),
                        )
                    })?;
                    eprintln!("{}", report::progress(&run));
                    runs.push(run);
                }
            }
        }
    }
    if !policy.proc.alive() {
        bail!("the policy service died:\n{}", policy.proc.log_tail());
    }
    if let Some((cluster, service)) = postgres.as_mut()
        && !service.proc.alive()
    {
        bail!(
            "the policy service on PostgreSQL died:\n{}\nPostgreSQL log:\n{}",
            service.proc.log_tail(),
            cluster.log_tail()
        );
    }
    let denied_in = |log: &Path, offset: usize| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .get(offset..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("deny"))
            .count()
    };
    // The PostgreSQL service saw only allowed sanity checks before measuring.
    let denied = denied_in(policy.proc.log(), log_offset)
        + postgres
            .as_ref()
            .map_or(0, |(_, service)| denied_in(service.proc.log(), 0));

    let env = report::Environment {
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: command_line(
            "git",
            &[
                "-C",
                &root.display().to_string(),
                "describe",
                "--always",
                "--dirty",
            ],
        ),
        envoy: command_line(&envoy_bin.display().to_string(), &["--version"]),
        wrk: wrk::version(),
        data_set: seed::describe(&data, &seeded),
        postgres: postgres
            .as_ref()
            .map(|(cluster, _)| postgres_description(&cluster.version()))
            .unwrap_or_default(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        duration: opts.duration,
        rounds: opts.rounds,
        check_duration: opts.check_duration,
        check_rounds: opts.check_rounds,
        denied_in_policy_log: denied,
        envoy_answers: envoy_answers.join("; "),
        total_seconds: started.elapsed().as_secs_f64(),
        load_before,
        load_after: report::load_average(),
    };
    let mut text = report::markdown(&env, &runs);
    if opts.gateway {
        text.push_str(&gateway::markdown(&gateway_runs, &gateway_opts));
    }
    text.push_str(&metrics_cost::markdown(&metrics_cost::measure()));
    std::fs::write(out_dir.join("report.md"), &text)?;
    runs.extend(gateway_runs);
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&report::json(&runs))?,
    )?;
    println!("{text}");
    eprintln!(
        "report: {} (raw runs: results.json, logs: *.log)",
        out_dir.join("report.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        options(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn postgres_runs_unless_told_not_to() {
        assert!(parse(&[]).unwrap().postgres);
        let o = parse(&["--no-postgres", "--check-concurrency", "4,16"]).unwrap();
        assert!(!o.postgres);
        assert_eq!(o.check_concurrency, [4, 16]);
        assert!(o.envoy && o.check);
        assert!(USAGE.contains("--no-postgres"));
    }

    #[test]
    fn zero_durations_rounds_and_connections_are_refused() {
        assert!(parse(&["--check-rounds", "0"]).is_err());
        assert!(parse(&["--check-concurrency", "1,0"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--only", "both"]).is_err());
        assert!(!parse(&["--only", "check"]).unwrap().envoy);
        let g = parse(&["--only", "gateway"]).unwrap();
        assert!(g.gateway && !g.envoy && !g.check);
        let all = parse(&[]).unwrap();
        assert!(all.gateway && all.envoy && all.check);
        assert!(parse(&["--only", "metrics"]).unwrap().metrics_only);
    }
}
