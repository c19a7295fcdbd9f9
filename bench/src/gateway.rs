//! The gateway URL's benchmark (`--only gateway`, and part of the full run): through
//! the same mcpguard Envoy (setup c) and policy service,
//!
//! - `tools/call` (echo) on the gateway URL `/mcp/{gateway}` (Envoy, the aggregator,
//!   its per-server check, the upstream) against the same call on the per-server URL
//!   `/mcp/{gateway}/{server}`, interleaved per-server gateway per-server gateway at
//!   each concurrency, the same tokens on both (each with its own session on the
//!   gateway URL, opened before measuring); once with the aggregator at its default
//!   and once with `--worker-threads 1` ([`PASSES`]), each against its own
//!   interleaved per-server runs;
//! - `tools/list` on a gateway of [`FANOUT`] servers, each on its own demo MCP server:
//!   one list fans out to every upstream at once. Against each upstream's own
//!   `tools/list` (wrk straight at it), interleaved within each round; once with the
//!   demo servers as they are, once with each taking as long as a remote server
//!   ([`REMOTE`]), since against a 0.05 ms upstream the ratio measures only the
//!   gateway path's own fixed cost; and one upstream's list through its per-server
//!   URL, the floor of any path through Envoy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::procs::{self, Proc, http_ok, mcp_post};
use crate::seed::{self, SeededToken};
use crate::{Measured, Run, measure, wrk};

/// Servers (and upstreams) on the fan-out gateway.
pub const FANOUT: usize = 10;
/// Distinct tokens, each with its own gateway-URL session, in the `tools/call` runs.
const SESSIONS: usize = 200;
/// Sessions on the fan-out gateway (one token).
const FANOUT_SESSIONS: usize = 4;

/// How fast the fan-out gateway's upstreams answer `tools/list`, and the run names of
/// the fan-out and of each upstream's own list under it.
struct Upstreams {
    /// Said in the report.
    label: &'static str,
    /// The list delay of upstream `i` (`PUT /demo/list-delay`), ms.
    delay_ms: fn(usize) -> u64,
    list: &'static str,
    /// The last upstream's own `tools/list` through its per-server URL (Envoy and
    /// the filter's check, no aggregator): the floor of any list through Envoy.
    per_server: &'static str,
    upstreams: [&'static str; FANOUT],
}

/// The demo servers as they are: a list answered from memory in about 0.05 ms, so the
/// fan-out's ratio measures the gateway path's own fixed cost.
const LOCAL: Upstreams = Upstreams {
    label: "the demo servers as they are (a list in about 0.05 ms)",
    delay_ms: |_| 0,
    list: "fanout-list",
    per_server: "fanout-per-server-list",
    upstreams: [
        "upstream-0",
        "upstream-1",
        "upstream-2",
        "upstream-3",
        "upstream-4",
        "upstream-5",
        "upstream-6",
        "upstream-7",
        "upstream-8",
        "upstream-9",
    ],
};

/// Upstreams that take as long as remote ones: upstream `i` answers a list `i + 1` ms
/// later, so the slowest takes 10 ms and the fan-out waits on it.
const REMOTE: Upstreams = Upstreams {
    label: "upstreams as slow as remote ones (upstream i answers a list i + 1 ms later)",
    delay_ms: |i| i as u64 + 1,
    list: "fanout-list-remote",
    per_server: "fanout-per-server-list-remote",
    upstreams: [
        "upstream-0-remote",
        "upstream-1-remote",
        "upstream-2-remote",
        "upstream-3-remote",
        "upstream-4-remote",
        "upstream-5-remote",
        "upstream-6-remote",
        "upstream-7-remote",
        "upstream-8-remote",
        "upstream-9-remote",
    ],
};

/// One request of a wrk list: path, bearer token, body, session id (may be empty).
type Line = (String, String, String, String);

/// The aggregator (release, its defaults but a quieter log) on a free loopback port.
pub struct Aggregator {
    pub proc: Proc,
    pub port: u16,
    /// Its `--worker-threads`; `None`: the default.
    workers: Option<u16>,
    bin: PathBuf,
    out_dir: PathBuf,
    check_port: u16,
}

impl Aggregator {
    pub fn start(bin: &Path, out_dir: &Path, check_port: u16) -> Result<Aggregator> {
        let port = procs::free_port()?;
        let proc = Self::spawn(bin, out_dir, check_port, port, None)?;
        Ok(Aggregator {
            proc,
            port,
            workers: None,
            bin: bin.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            check_port,
        })
    }

    /// Stops it and starts it again on the same port (Envoy's cluster stays valid)
    /// with `workers`; its sessions are gone.
    fn restart(&mut self, workers: Option<u16>) -> Result<()> {
        self.proc.stop();
        self.proc = Self::spawn(
            &self.bin,
            &self.out_dir,
            self.check_port,
            self.port,
            workers,
        )?;
        self.workers = workers;
        Ok(())
    }

    fn spawn(
        bin: &Path,
        out_dir: &Path,
        check_port: u16,
        port: u16,
        workers: Option<u16>,
    ) -> Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy-check-url",
            &format!("http://127.0.0.1:{check_port}"),
            "--log",
            "warn",
        ])
        // Written by the policy service's start (`PolicyService::start`).
        .arg("--check-secret-file")
        .arg(out_dir.join("check-secret"));
        if let Some(n) = workers {
            cmd.arg("--worker-threads").arg(n.to_string());
        }
        let name = match workers {
            Some(n) => format!("aggregator-{n}-worker"),
            None => "aggregator".to_string(),
        };
        let mut proc = Proc::spawn(&name, cmd, out_dir)?;
        proc.wait_ready("aggregator", || http_ok(port, "/healthz"))?;
        Ok(proc)
    }
}

/// One pass of the `tools/call` comparison: the aggregator's worker threads, and the
/// names of its runs.
struct Pass {
    workers: Option<u16>,
    /// Said in the report.
    label: &'static str,
    per_server: &'static str,
    gateway: &'static str,
}

/// The aggregator as it starts by default (a worker per CPU), then on one worker
/// thread: beside Envoy and the policy service on 2 cores, one thread measured faster
/// at 1 connection (docs/benchmark-history.md).
const PASSES: [Pass; 2] = [
    Pass {
        workers: None,
        label: "the aggregator at its default (a worker thread per CPU)",
        per_server: "per-server",
        gateway: "gateway-url",
    },
    Pass {
        workers: Some(1),
        label: "the aggregator with `--worker-threads 1`",
        per_server: "per-server-b",
        gateway: "gateway-url-1-worker",
    },
];

/// A session on the gateway URL for `token`, initialized: its id.
fn open_session(envoy_port: u16, gateway: &str, token: &str) -> Result<String> {
    let path = format!("/mcp/{gateway}");
    let (status, headers, body) =
        mcp_post(envoy_port, &path, token, None, &crate::initialize_body(0))?;
    let Some((_, id)) = headers.iter().find(|(k, _)| k == "mcp-session-id") else {
        bail!("initialize on {path} answered {status} without a session: {body}");
    };
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    mcp_post(envoy_port, &path, token, Some(id), note)?;
    Ok(id.clone())
}

fn call_body(i: usize, name: &str) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
        "params": {"name": name, "arguments": {"text": format!("bench request {i}")}}})
    .to_string()
}

fn list_body(i: usize) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "tools/list"}).to_string()
}

fn write_lines(path: &Path, lines: &[Line]) -> Result<()> {
    let mut text = String::new();
    for (p, t, b, s) in lines {
        let _ = writeln!(text, "{p}\t{t}\t{b}\t{s}");
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Every line answered 200 with a JSON-RPC `result` that contains `expect`.
fn sanity_check(port: u16, lines: &[Line], expect: &str) -> Result<()> {
    for (path, token, body, session) in lines.iter().take(10) {
        let session = (!session.is_empty()).then_some(session.as_str());
        let (status, _, answer) = mcp_post(port, path, token, session, body)?;
        if status != 200 || !answer.contains("\"result\"") || !answer.contains(expect) {
            bail!("POST {path} answered {status}: {answer}");
        }
    }
    Ok(())
}

/// What the gateway benchmark needs running.
pub struct Setup<'a> {
    pub envoy_port: u16,
    pub envoy_pid: u32,
    pub policy_pid: u32,
    /// The demo MCP server every seeded server is on.
    pub demo_pid: u32,
    /// The fan-out gateway's upstreams: (port, pid).
    pub fanout: &'a [(u16, u32)],
    pub fanout_token: &'a SeededToken,
    pub live: &'a [SeededToken],
    pub script: &'a Path,
    pub out_dir: &'a Path,
    pub ticks: f64,
}

pub struct Options {
    pub duration: u32,
    pub rounds: u32,
    pub concurrency: Vec<u32>,
}

/// Each pass of the `tools/call` comparison, the fan-out after the first; the runs in
/// the order made.
pub fn run(s: &Setup, aggregator: &mut Aggregator, opts: &Options) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for (i, pass) in PASSES.iter().enumerate() {
        if aggregator.workers != pass.workers {
            eprintln!("gateway URL: restarting {}...", pass.label);
            aggregator.restart(pass.workers)?;
        }
        runs.extend(calls(s, aggregator.proc.pid(), pass, opts)?);
        if i == 0 {
            runs.extend(fan_outs(s, aggregator.proc.pid(), opts)?);
        }
    }
    Ok(runs)
}

/// Opens the sessions, checks both URLs answer, then measures them interleaved.
fn calls(s: &Setup, aggregator_pid: u32, pass: &Pass, opts: &Options) -> Result<Vec<Run>> {
    eprintln!("gateway URL: opening {SESSIONS} sessions...");
    let mut per_server = Vec::new();
    let mut gateway = Vec::new();
    for (i, c) in seed::spread(s.live, SESSIONS).into_iter().enumerate() {
        let session = open_session(s.envoy_port, &c.gateway, &c.token)?;
        per_server.push((
            format!("/mcp/{}/{}", c.gateway, c.server),
            c.token.clone(),
            call_body(i, "echo"),
            String::new(),
        ));
        gateway.push((
            format!("/mcp/{}", c.gateway),
            c.token.clone(),
            call_body(i, &format!("{}__echo", c.server)),
            session,
        ));
    }
    sanity_check(s.envoy_port, &per_server, "bench request")?;
    sanity_check(s.envoy_port, &gateway, "bench request")?;
    let list = |name: &str| s.out_dir.join(name);
    write_lines(&list("gateway-per-server.tsv"), &per_server)?;
    write_lines(&list("gateway-url.tsv"), &gateway)?;
    let measured = |upstream: u32| Measured {
        envoy: Some(s.envoy_pid),
        policy: Some(s.policy_pid),
        upstream: Some(upstream),
        database: None,
        ticks: s.ticks,
    };
    for name in ["gateway-per-server.tsv", "gateway-url.tsv"] {
        wrk::run(
            s.script,
            &list(name),
            s.envoy_port,
            8,
            crate::WARMUP_SECONDS,
            None,
        )?;
    }
    let mut runs = Vec::new();
    for &c in &opts.concurrency {
        for round in 1..=opts.rounds {
            for (target, name, upstream) in [
                (pass.per_server, "gateway-per-server.tsv", s.demo_pid),
                (pass.gateway, "gateway-url.tsv", aggregator_pid),
            ] {
                let run = measure(&measured(upstream), target, c, round, || {
                    wrk::run(s.script, &list(name), s.envoy_port, c, opts.duration, None)
                })?;
                eprintln!("{}", crate::report::progress(&run));
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

/// Opens the fan-out gateway's sessions, checks every upstream answers, then measures
/// the fan-out against [`LOCAL`] and [`REMOTE`] upstreams.
fn fan_outs(s: &Setup, aggregator_pid: u32, opts: &Options) -> Result<Vec<Run>> {
    let mut fanout = Vec::new();
    for i in 0..FANOUT_SESSIONS {
        let t = s.fanout_token;
        let session = open_session(s.envoy_port, &t.gateway, &t.token)?;
        fanout.push((
            format!("/mcp/{}", t.gateway),
            t.token.clone(),
            list_body(i),
            session,
        ));
    }
    let direct: Vec<Line> = vec![("/mcp".into(), String::new(), list_body(0), String::new())];
    let last = format!("{}__echo", seed::fanout_slug(FANOUT - 1));
    sanity_check(s.envoy_port, &fanout, &last)?;
    for (port, _) in s.fanout {
        sanity_check(*port, &direct, "echo")?;
    }
    let t = s.fanout_token;
    let per_server: Vec<Line> = vec![(
        format!("/mcp/{}/{}", t.gateway, seed::fanout_slug(FANOUT - 1)),
        t.token.clone(),
        list_body(0),
        String::new(),
    )];
    sanity_check(s.envoy_port, &per_server, "echo")?;
    write_lines(&s.out_dir.join("gateway-fanout.tsv"), &fanout)?;
    write_lines(&s.out_dir.join("gateway-per-server-list.tsv"), &per_server)?;
    write_lines(&s.out_dir.join("gateway-upstream.tsv"), &direct)?;
    // One connection, so each list's latency is its own.
    wrk::run(
        s.script,
        &s.out_dir.join("gateway-fanout.tsv"),
        s.envoy_port,
        1,
        crate::WARMUP_SECONDS,
        None,
    )?;
    let mut runs = Vec::new();
    for upstreams in [&LOCAL, &REMOTE] {
        set_list_delays(s.fanout, upstreams)?;
        runs.extend(fan_out(s, aggregator_pid, opts, upstreams)?);
    }
    set_list_delays(s.fanout, &LOCAL)?;
    Ok(runs)
}

/// Sets each fan-out upstream's list delay, and sees it take effect: a list straight
/// at the upstream takes at least that long.
fn set_list_delays(fanout: &[(u16, u32)], upstreams: &Upstreams) -> Result<()> {
    for (i, (port, _)) in fanout.iter().enumerate() {
        let ms = (upstreams.delay_ms)(i);
        let (status, answer) = procs::http(*port, "PUT", "/demo/list-delay", &[], &ms.to_string())?;
        if status != 204 {
            bail!("PUT /demo/list-delay {ms} on upstream {i} answered {status}: {answer}");
        }
        let started = std::time::Instant::now();
        let (status, _, answer) = mcp_post(*port, "/mcp", "", None, &list_body(0))?;
        let took = started.elapsed();
        if status != 200 || took < std::time::Duration::from_millis(ms) {
            bail!("upstream {i} with a {ms} ms list delay answered {status} in {took:?}: {answer}");
        }
    }
    Ok(())
}

/// The rounds of one fan-out measurement: each upstream's own list straight at it,
/// the last one's through its per-server URL, then the gateway's list that fans out
/// to all of them.
fn fan_out(
    s: &Setup,
    aggregator_pid: u32,
    opts: &Options,
    upstreams: &Upstreams,
) -> Result<Vec<Run>> {
    let list = |name: &str| s.out_dir.join(name);
    let direct_seconds = opts.duration.div_ceil(2);
    let mut runs = Vec::new();
    for round in 1..=opts.rounds {
        for (i, (port, pid)) in s.fanout.iter().enumerate() {
            let m = Measured {
                envoy: None,
                policy: None,
                upstream: Some(*pid),
                database: None,
                ticks: s.ticks,
            };
            let run = measure(&m, upstreams.upstreams[i], 1, round, || {
                wrk::run(
                    s.script,
                    &list("gateway-upstream.tsv"),
                    *port,
                    1,
                    direct_seconds,
                    None,
                )
            })?;
            runs.push(run);
        }
        let (_, last_pid) = s.fanout[FANOUT - 1];
        let m = Measured {
            envoy: Some(s.envoy_pid),
            policy: Some(s.policy_pid),
            upstream: Some(last_pid),
            database: None,
            ticks: s.ticks,
        };
        let run = measure(&m, upstreams.per_server, 1, round, || {
            wrk::run(
                s.script,
                &list("gateway-per-server-list.tsv"),
                s.envoy_port,
                1,
                direct_seconds,
                None,
            )
        })?;
        runs.push(run);
        let m = Measured {
            envoy: Some(s.envoy_pid),
            policy: Some(s.policy_pid),
            upstream: Some(aggregator_pid),
            database: None,
            ticks: s.ticks,
        };
        let run = measure(&m, upstreams.list, 1, round, || {
            wrk::run(
                s.script,
                &list("gateway-fanout.tsv"),
                s.envoy_port,
                1,
                opts.duration,
                None,
            )
        })?;
        eprintln!("{}", crate::report::progress(&run));
        runs.push(run);
    }
    Ok(runs)
}

/// Met when every round meets the target, missed when none does, else unsettled.
fn verdict(per_round: &[bool]) -> &'static str {
    if per_round.is_empty() {
        "no runs"
    } else if per_round.iter().all(|&m| m) {
        "met"
    } else if per_round.iter().any(|&m| m) {
        "unsettled"
    } else {
        "missed"
    }
}

fn find<'a>(runs: &'a [Run], target: &str, c: u32, round: u32) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.target == target && r.connections == c && r.round == round)
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The report's section on the gateway URL.
pub fn markdown(runs: &[Run], opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### The gateway URL against the per-server URL\n");
    let _ = writeln!(
        s,
        "Both through the mcpguard Envoy (setup c) and the same policy service; \
         `tools/call` (echo), {SESSIONS} tokens, each with its own gateway-URL session; \
         interleaved per-server gateway, {} rounds of {} s per concurrency, once per \
         aggregator setting below. Targets (issue 21): gateway-URL throughput >= 0.7x \
         per-server; p50 +<= 1 ms at 1 connection.\n",
        opts.rounds, opts.duration
    );
    for pass in &PASSES {
        s.push_str(&calls_markdown(runs, opts, pass));
    }
    for upstreams in [&LOCAL, &REMOTE] {
        s.push_str(&fan_out_markdown(runs, opts, upstreams));
    }
    let _ = writeln!(
        s,
        "({} measured runs in the gateway URL's tables, also in `target/bench/results.json`.)\n",
        runs.len()
    );
    s
}

/// The report's table of one pass of the `tools/call` comparison.
fn calls_markdown(runs: &[Run], opts: &Options, pass: &Pass) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "With {}:\n", pass.label);
    let _ = writeln!(
        s,
        "| connections | per-server req/s | gateway URL req/s | ratio (range) | p50 per-server / gateway ms | p99 per-server / gateway ms | errors | target |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for &c in &opts.concurrency {
        let pairs: Vec<(&Run, &Run)> = (1..=opts.rounds)
            .filter_map(|r| {
                Some((
                    find(runs, pass.per_server, c, r)?,
                    find(runs, pass.gateway, c, r)?,
                ))
            })
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = pairs
            .iter()
            .map(|(a, b)| b.outcome.rps() / a.outcome.rps().max(1e-9))
            .collect();
        let (lo, hi) = range(&ratios);
        let med = |f: &dyn Fn(&Run) -> f64, pick: usize| {
            median(
                pairs
                    .iter()
                    .map(|p| f(if pick == 0 { p.0 } else { p.1 }))
                    .collect(),
            )
        };
        let rps = |r: &Run| r.outcome.rps();
        let p50 = |r: &Run| r.outcome.p50_ms;
        let p99 = |r: &Run| r.outcome.p99_ms;
        let errors: u64 = pairs
            .iter()
            .map(|(a, b)| a.outcome.errors + b.outcome.errors)
            .sum();
        let mut target = format!(
            ">= 0.7x: {}",
            verdict(&ratios.iter().map(|&r| r >= 0.7).collect::<Vec<_>>())
        );
        if c == 1 {
            let added: Vec<f64> = pairs
                .iter()
                .map(|(a, b)| b.outcome.p50_ms - a.outcome.p50_ms)
                .collect();
            let (alo, ahi) = range(&added);
            let _ = write!(
                target,
                "; p50 +{alo:.2}..{ahi:.2} ms, +<= 1 ms: {}",
                verdict(&added.iter().map(|&a| a <= 1.0).collect::<Vec<_>>())
            );
        }
        let _ = writeln!(
            s,
            "| {c} | {:.0} | {:.0} | {:.2} ({lo:.2}..{hi:.2}) | {:.2} / {:.2} | {:.2} / {:.2} | {errors} | {target} |",
            med(&rps, 0),
            med(&rps, 1),
            median(ratios.clone()),
            med(&p50, 0),
            med(&p50, 1),
            med(&p99, 0),
            med(&p99, 1),
        );
    }
    s.push('\n');
    s
}

/// The report's table of one fan-out measurement.
fn fan_out_markdown(runs: &[Run], opts: &Options, upstreams: &Upstreams) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n`tools/list` on a gateway of {FANOUT} servers, each on its own demo MCP server \
         (stateless), {}; one connection; each upstream's own `tools/list` straight at it, \
         {} s each, then the last upstream's through its per-server URL (Envoy and \
         the filter's check, no aggregator; {} s), then the fan-out ({} s), in each of {} \
         rounds. Target: fan-out p99 within 2x the slowest upstream's p99. The \
         per-server column is the floor: what the path through Envoy alone costs one \
         upstream, against that upstream's own p99.\n",
        upstreams.label,
        opts.duration.div_ceil(2),
        opts.duration.div_ceil(2),
        opts.duration,
        opts.rounds
    );
    let _ = writeln!(
        s,
        "| round | slowest upstream p99 ms (which) | upstreams' p50 ms (range) | per-server URL p99 ms (x its upstream's) | fan-out p50 / p99 ms | fan-out req/s | ratio p99 | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let mut met = Vec::new();
    for round in 1..=opts.rounds {
        let Some(list) = find(runs, upstreams.list, 1, round) else {
            continue;
        };
        let ups: Vec<&Run> = upstreams
            .upstreams
            .iter()
            .filter_map(|t| find(runs, t, 1, round))
            .collect();
        let Some(slowest) = ups
            .iter()
            .max_by(|a, b| a.outcome.p99_ms.total_cmp(&b.outcome.p99_ms))
        else {
            continue;
        };
        let (plo, phi) = range(&ups.iter().map(|r| r.outcome.p50_ms).collect::<Vec<_>>());
        let floor = match (find(runs, upstreams.per_server, 1, round), ups.last()) {
            (Some(p), Some(own)) => format!(
                "{:.2} ({:.1}x)",
                p.outcome.p99_ms,
                p.outcome.p99_ms / own.outcome.p99_ms.max(1e-9)
            ),
            _ => "-".to_owned(),
        };
        let ratio = list.outcome.p99_ms / slowest.outcome.p99_ms.max(1e-9);
        met.push(ratio <= 2.0);
        let errors: u64 = list.outcome.errors
            + ups.iter().map(|r| r.outcome.errors).sum::<u64>()
            + find(runs, upstreams.per_server, 1, round).map_or(0, |r| r.outcome.errors);
        let _ = writeln!(
            s,
            "| {round} | {:.2} ({}) | {plo:.2}..{phi:.2} | {floor} | {:.2} / {:.2} | {:.0} | {ratio:.2} | {errors} |",
            slowest.outcome.p99_ms,
            slowest.target,
            list.outcome.p50_ms,
            list.outcome.p99_ms,
            list.outcome.rps(),
        );
    }
    let _ = writeln!(
        s,
        "\nFan-out p99 within 2x, {}: {}.\n",
        upstreams.label,
        verdict(&met)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_settled_only_when_every_round_agrees() {
        assert_eq!(verdict(&[true, true]), "met");
        assert_eq!(verdict(&[true, false]), "unsettled");
        assert_eq!(verdict(&[false, false]), "missed");
        assert_eq!(verdict(&[]), "no runs");
    }
}
