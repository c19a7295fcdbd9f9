//! The Markdown report (what `BENCHMARKS.md` quotes) and the raw runs as JSON.

use std::fmt::Write as _;

use crate::Run;
use crate::envoy::Setup;
use crate::procs::Usage;
use crate::seed::Backend;

pub struct Environment {
    pub date: String,
    pub commit: String,
    pub envoy: String,
    pub wrk: String,
    pub data_set: String,
    /// The PostgreSQL server of the check benchmark; empty when it did not run.
    pub postgres: String,
    pub command: String,
    pub duration: u32,
    pub rounds: u32,
    pub check_duration: u32,
    pub check_rounds: u32,
    pub denied_in_policy_log: usize,
    /// Per setup, what Envoy answered (by status class) while the workload ran.
    pub envoy_answers: String,
    pub total_seconds: f64,
    /// `/proc/loadavg` when the run started and when it ended.
    pub load_before: String,
    pub load_after: String,
}

/// One line per run, for the terminal while the benchmark runs.
pub fn progress(run: &Run) -> String {
    let o = &run.outcome;
    format!(
        "{:>14} c={:<3} round {}: {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}  envoy {:.2} cpu-s  policy {:.2} cpu-s  postgres {:.2} cpu-s  machine {:.0}% busy",
        run.target,
        run.connections,
        run.round,
        o.rps(),
        o.p50_ms,
        o.p99_ms,
        o.errors,
        run.envoy.map_or(0.0, |u| u.cpu_s),
        run.policy.map_or(0.0, |u| u.cpu_s),
        run.database_cpu_s.unwrap_or(0.0),
        run.machine_busy * 100.0
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The runs of one target at one concurrency, summarised: medians of the rounds for
/// rates, latencies and CPU; the sum of errors; the largest peak RSS.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    envoy: Option<Usage>,
    policy: Option<Usage>,
    database_cpu_s: Option<f64>,
    cpu_us_per_req: f64,
    busy: f64,
}

fn cell(runs: &[Run], target: &str, connections: u32) -> Option<Cell> {
    let rs: Vec<&Run> = runs
        .iter()
        .filter(|r| r.target == target && r.connections == connections)
        .collect();
    if rs.is_empty() {
        return None;
    }
    let med = |f: &dyn Fn(&Run) -> f64| median(rs.iter().map(|r| f(r)).collect());
    let usage = |pick: &dyn Fn(&Run) -> Option<Usage>| -> Option<Usage> {
        let all: Vec<Usage> = rs.iter().filter_map(|r| pick(r)).collect();
        (!all.is_empty()).then(|| Usage {
            cpu_s: median(all.iter().map(|u| u.cpu_s).collect()),
            peak_rss_mib: all.iter().map(|u| u.peak_rss_mib).fold(0.0, f64::max),
        })
    };
    Some(Cell {
        rps: med(&|r| r.outcome.rps()),
        p50: med(&|r| r.outcome.p50_ms),
        p99: med(&|r| r.outcome.p99_ms),
        errors: rs.iter().map(|r| r.outcome.errors).sum(),
        envoy: usage(&|r| r.envoy),
        policy: usage(&|r| r.policy),
        database_cpu_s: rs
            .iter()
            .any(|r| r.database_cpu_s.is_some())
            .then(|| med(&|r| r.database_cpu_s.unwrap_or(0.0))),
        cpu_us_per_req: med(&|r| {
            let cpu = r.envoy.map_or(0.0, |u| u.cpu_s)
                + r.policy.map_or(0.0, |u| u.cpu_s)
                + r.database_cpu_s.unwrap_or(0.0);
            if r.outcome.requests > 0 {
                cpu * 1e6 / r.outcome.requests as f64
            } else {
                0.0
            }
        }),
        busy: med(&|r| r.machine_busy),
    })
}

/// The check endpoint's target: at least 30,000 checks/s with p99 under 2 ms and no
/// errors.
fn check_target_met(x: &Cell) -> bool {
    x.rps >= 30_000.0 && x.p99 < 2.0 && x.errors == 0
}

/// Per round, `f` of the `(x, y)` targets' runs at `connections`, as `x / y`: each
/// round runs its targets one after the other, so these are side by side.
fn round_ratios(
    runs: &[Run],
    (x, y): (&str, &str),
    connections: u32,
    f: impl Fn(&Run) -> f64,
) -> Vec<f64> {
    let of = |target: &str, round: u32| {
        runs.iter()
            .find(|r| r.target == target && r.connections == connections && r.round == round)
            .map(&f)
    };
    let mut rounds: Vec<u32> = runs.iter().map(|r| r.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    rounds
        .into_iter()
        .filter_map(|round| match (of(x, round), of(y, round)) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        })
        .collect()
}

/// ` (low–high)` over the rounds, or nothing for fewer than two.
fn spread(per_round: &[f64]) -> String {
    let low = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let high = per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if per_round.len() < 2 {
        String::new()
    } else {
        format!(" ({low:.2}–{high:.2})")
    }
}

/// Met or missed only when every round agrees: one round's noise must not decide it.
fn verdict(per_round: &[f64], met: impl Fn(f64) -> bool) -> String {
    let n = per_round.len();
    match per_round.iter().filter(|&&r| met(r)).count() {
        _ if n == 0 => "-".to_owned(),
        k if k == n => "met".to_owned(),
        0 => "**missed**".to_owned(),
        k => format!("**unsettled** ({k} of {n} rounds met it)"),
    }
}

/// `x / y` to two decimals, `-` when `y` is zero.
fn ratio(x: f64, y: f64) -> String {
    if y > 0.0 {
        format!("{:.2}", x / y)
    } else {
        "-".to_owned()
    }
}

fn concurrencies(runs: &[Run], target: &str) -> Vec<u32> {
    let mut cs: Vec<u32> = runs
        .iter()
        .filter(|r| r.target == target)
        .map(|r| r.connections)
        .collect();
    cs.sort_unstable();
    cs.dedup();
    cs
}

/// The targets' table for setup `x` ((c), or the experiment (d)): its ratios to bare
/// Envoy and to native ext_authz, judged round by round; for (d) also its ratio to (c).
fn targets(s: &mut String, runs: &[Run], cs: &std::collections::BTreeSet<u32>, x: Setup) {
    let l = x.letter();
    let vs_c = x != Setup::Mcpguard;
    let _ = writeln!(
        s,
        "| conns | {l}/a req/s | {l}/b req/s | {l}/b p99 | ({l}) >= (b) req/s | ({l}) p99 <= (b) p99 | {l}/a >= 0.45 (at 8) |{}",
        if vs_c {
            format!(" {l}/c req/s |")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---|---|---|{}",
        if vs_c { "---:|" } else { "" }
    );
    for &c in cs {
        let (a, b, cc, xx) = (
            cell(runs, "a", c),
            cell(runs, "b", c),
            cell(runs, "c", c),
            cell(runs, l, c),
        );
        let with_rounds = |x: Option<Cell>,
                           y: Option<Cell>,
                           f: fn(&Cell) -> f64,
                           per_round: &[f64]| match x.zip(y) {
            Some((x, y)) => format!("{}{}", ratio(f(&x), f(&y)), spread(per_round)),
            None => "-".to_owned(),
        };
        let rps = |r: &Run| r.outcome.rps();
        let p99 = |r: &Run| r.outcome.p99_ms;
        let over_a = round_ratios(runs, (l, "a"), c, rps);
        let over_b = round_ratios(runs, (l, "b"), c, rps);
        let over_b_p99 = round_ratios(runs, (l, "b"), c, p99);
        let _ = writeln!(
            s,
            "| {c} | {} | {} | {} | {} | {} | {} |{}",
            with_rounds(xx, a, |x| x.rps, &over_a),
            with_rounds(xx, b, |x| x.rps, &over_b),
            with_rounds(xx, b, |x| x.p99, &over_b_p99),
            verdict(&over_b, |r| r >= 1.0),
            verdict(&over_b_p99, |r| r <= 1.0),
            if c == 8 {
                verdict(&over_a, |r| r >= 0.45)
            } else {
                "-".to_owned()
            },
            if vs_c {
                format!(
                    " {} |",
                    with_rounds(xx, cc, |x| x.rps, &round_ratios(runs, (l, "c"), c, rps))
                )
            } else {
                String::new()
            }
        );
    }
}

/// The policy service's CPU per check against the fixed-reply server's on the same
/// transport (HTTP callout: (c); check stream: (e)), in the same rounds.
fn fixed_reply(s: &mut String, runs: &[Run], cs: &std::collections::BTreeSet<u32>) {
    let pairs = [
        ("c", FIXED_C, "HTTP callout"),
        ("e", FIXED_E, "check stream"),
    ];
    if pairs
        .iter()
        .all(|(_, fixed, _)| concurrencies(runs, fixed).is_empty())
    {
        return;
    }
    let per_check = |r: &Run| {
        let cpu = r.policy.map_or(0.0, |u| u.cpu_s);
        if r.outcome.requests > 0 {
            cpu * 1e6 / r.outcome.requests as f64
        } else {
            0.0
        }
    };
    let _ = writeln!(
        s,
        "\nPolicy CPU per check against a fixed-reply server on the same transport (same HTTP stack, answers one allow, no store): \
         µs of the answering process's CPU per request, medians; the ratio per round in brackets. Target: at most 2x.\n"
    );
    let _ = writeln!(
        s,
        "| transport | conns | policy µs/check | fixed-reply µs/check | ratio | <= 2x | req/s policy | req/s fixed-reply |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|---:|---:|");
    for &c in cs {
        for (real, fixed, name) in pairs {
            let (Some(x), Some(y)) = (cell(runs, real, c), cell(runs, fixed, c)) else {
                continue;
            };
            let of = |t: &str| {
                median(
                    runs.iter()
                        .filter(|r| r.target == t && r.connections == c)
                        .map(per_check)
                        .collect(),
                )
            };
            let (px, py) = (of(real), of(fixed));
            let per_round = round_ratios(runs, (real, fixed), c, per_check);
            let _ = writeln!(
                s,
                "| {name} | {c} | {px:.1} | {py:.1} | {}{} | {} | {:.0} | {:.0} |",
                ratio(px, py),
                spread(&per_round),
                verdict(&per_round, |r| r <= 2.0),
                x.rps,
                y.rps
            );
        }
    }
}

/// The targets of the runs through the fixed-reply server.
pub const FIXED_C: &str = "c-fixed";
pub const FIXED_E: &str = "e-fixed";

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn memory_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

/// `envoy --version` (`... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`) in short.
fn envoy_version(text: &str) -> String {
    let v = text.rsplit("version: ").next().unwrap_or_default().trim();
    let mut parts = v.split('/');
    let sha = parts.next().unwrap_or_default();
    let version = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    format!(
        "{version} ({}, build {})",
        rest.join("/"),
        sha.get(..8).unwrap_or(sha)
    )
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn fmt_usage(u: Option<Usage>) -> (String, String) {
    match u {
        Some(u) => (format!("{:.2}", u.cpu_s), format!("{:.0}", u.peak_rss_mib)),
        None => ("-".to_owned(), "-".to_owned()),
    }
}

pub fn markdown(env: &Environment, runs: &[Run]) -> String {
    let mut s = String::new();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(s, "## Latest results\n");
    let _ = writeln!(s, "- Date: {} (commit `{}`)", env.date, env.commit);
    let _ = writeln!(
        s,
        "- Machine: {nproc} CPUs (`nproc`), {}, {:.1} GiB RAM, Linux {}; shared, nothing pinned; \
         load average {} at start, {} at end (the benchmark itself adds about 2)",
        cpu_model(),
        memory_gib(),
        kernel(),
        env.load_before,
        env.load_after
    );
    let _ = writeln!(
        s,
        "- Envoy {}, `--concurrency 1` in every setup; load generator: {} on the same machine",
        envoy_version(&env.envoy),
        env.wrk
    );
    let _ = writeln!(s, "- Command: `make bench` (runs `{}`)", env.command);
    let _ = writeln!(s, "- Data set: {}", env.data_set);
    let _ = writeln!(
        s,
        "- Each row: median of its runs (rounds interleaved), errors summed, peak RSS the largest; whole run {:.0} s",
        env.total_seconds
    );
    let _ = writeln!(
        s,
        "- Refusals logged by the policy service during the measured runs: {} (every workload request carries a live token)",
        env.denied_in_policy_log
    );
    if !env.envoy_answers.is_empty() {
        let _ = writeln!(
            s,
            "- Envoy's own counts over warm-up and measured runs: {}",
            env.envoy_answers
        );
    }
    let _ = writeln!(s);

    let envoy_cs = concurrencies(runs, "a")
        .into_iter()
        .chain(concurrencies(runs, "b"))
        .chain(concurrencies(runs, "c"))
        .chain(concurrencies(runs, "d"))
        .chain(concurrencies(runs, "e"))
        .collect::<std::collections::BTreeSet<_>>();
    if !envoy_cs.is_empty() {
        let _ = writeln!(
            s,
            "### MCP workload through Envoy (80% tools/call, 10% initialize, 10% tools/list)\n"
        );
        let _ = writeln!(
            s,
            "Each row: median of {} runs of {} s, rounds interleaved {}.\n",
            env.rounds,
            env.duration,
            Setup::ALL
                .iter()
                .map(|x| x.letter())
                .filter(|l| !concurrencies(runs, l).is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(
            s,
            "| setup | conns | req/s | p50 ms | p99 ms | errors | Envoy CPU s | Envoy peak RSS MiB | policy CPU s | policy peak RSS MiB | Envoy+policy CPU µs/req | machine busy |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for &c in &envoy_cs {
            for setup in Setup::ALL {
                let Some(x) = cell(runs, setup.letter(), c) else {
                    continue;
                };
                let (ecpu, erss) = fmt_usage(x.envoy);
                let (pcpu, prss) = fmt_usage(x.policy);
                let _ = writeln!(
                    s,
                    "| {} | {c} | {:.0} | {:.2} | {:.2} | {} | {ecpu} | {erss} | {pcpu} | {prss} | {:.0} | {:.0}% |",
                    setup.label(),
                    x.rps,
                    x.p50,
                    x.p99,
                    x.errors,
                    x.cpu_us_per_req,
                    x.busy * 100.0
                );
            }
        }
        let _ = writeln!(s, "\n### Ratios and targets\n");
        let _ = writeln!(
            s,
            "Each ratio: of the medians above, then in brackets its range over the rounds (a round's runs are side by side). \
             A target is met or missed when every round agrees; otherwise it is unsettled, and the count says how many rounds met it.\n"
        );
        targets(&mut s, runs, &envoy_cs, Setup::Mcpguard);
        if !concurrencies(runs, Setup::DynamicModule.letter()).is_empty() {
            let _ = writeln!(
                s,
                "\n(d), the same filter as an Envoy dynamic module instead of wasm (an experiment), against the same targets:\n"
            );
            targets(&mut s, runs, &envoy_cs, Setup::DynamicModule);
        }
        if !concurrencies(runs, Setup::Stream.letter()).is_empty() {
            let _ = writeln!(
                s,
                "\n(e), the wasm filter with its checks on one gRPC stream per worker (an experiment, issue 27), against the same targets:\n"
            );
            targets(&mut s, runs, &envoy_cs, Setup::Stream);
        }
        fixed_reply(&mut s, runs, &envoy_cs);
        let _ = writeln!(s);
    }

    let sqlite = Backend::Sqlite.check_target();
    let postgres = Backend::Postgres.check_target();
    let check_cs: std::collections::BTreeSet<u32> = concurrencies(runs, sqlite)
        .into_iter()
        .chain(concurrencies(runs, postgres))
        .collect();
    if !check_cs.is_empty() {
        let _ = writeln!(
            s,
            "### Policy service check endpoint alone (`POST /v1/check`, no Envoy)\n"
        );
        let _ = writeln!(
            s,
            "Each cell: median of {} runs of {} s (rounds interleaved sqlite postgres); requests rotate over 10,000 live tokens spread across the data set. \
             The target (>= 30,000 checks/s, p99 < 2 ms) is set for SQLite.{}\n",
            env.check_rounds,
            env.check_duration,
            if env.postgres.is_empty() {
                String::new()
            } else {
                format!(" PostgreSQL: {}.", env.postgres)
            }
        );
        let _ = writeln!(
            s,
            "| store | conns | checks/s | p50 ms | p99 ms | errors | policy CPU s | policy peak RSS MiB | PostgreSQL CPU s | CPU µs/check | machine busy | >= 30k/s, p99 < 2 ms |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for &c in &check_cs {
            for backend in [Backend::Sqlite, Backend::Postgres] {
                let Some(x) = cell(runs, backend.check_target(), c) else {
                    continue;
                };
                let (pcpu, prss) = fmt_usage(x.policy);
                let verdict = match backend {
                    Backend::Sqlite if check_target_met(&x) => "met",
                    Backend::Sqlite => "**missed**",
                    Backend::Postgres => "-",
                };
                let _ = writeln!(
                    s,
                    "| {} | {c} | {:.0} | {:.2} | {:.2} | {} | {pcpu} | {prss} | {} | {:.0} | {:.0}% | {verdict} |",
                    backend.name(),
                    x.rps,
                    x.p50,
                    x.p99,
                    x.errors,
                    x.database_cpu_s
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                    x.cpu_us_per_req,
                    x.busy * 100.0,
                );
            }
        }
        let pairs: Vec<(u32, Cell, Cell)> = check_cs
            .iter()
            .filter_map(|&c| Some((c, cell(runs, sqlite, c)?, cell(runs, postgres, c)?)))
            .collect();
        if !pairs.is_empty() {
            let _ = writeln!(
                s,
                "\n| conns | postgres/sqlite checks/s | postgres/sqlite p99 | postgres/sqlite CPU µs/check |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|");
            for (c, sq, pg) in pairs {
                let _ = writeln!(
                    s,
                    "| {c} | {} | {} | {} |",
                    ratio(pg.rps, sq.rps),
                    ratio(pg.p99, sq.p99),
                    ratio(pg.cpu_us_per_req, sq.cpu_us_per_req)
                );
            }
        }
        let _ = writeln!(s);
    }
    if !runs.is_empty() {
        let _ = writeln!(
            s,
            "({} measured runs in the tables above; raw figures in `target/bench/results.json`.)",
            runs.len()
        );
    }
    s
}

pub fn json(runs: &[Run]) -> serde_json::Value {
    let usage = |u: Option<Usage>| {
        u.map(|u| serde_json::json!({"cpu_s": u.cpu_s, "peak_rss_mib": u.peak_rss_mib}))
    };
    serde_json::Value::Array(
        runs.iter()
            .map(|r| {
                serde_json::json!({
                    "target": r.target,
                    "connections": r.connections,
                    "round": r.round,
                    "requests": r.outcome.requests,
                    "seconds": r.outcome.seconds,
                    "rps": r.outcome.rps(),
                    "errors": r.outcome.errors,
                    "p50_ms": r.outcome.p50_ms,
                    "p90_ms": r.outcome.p90_ms,
                    "p99_ms": r.outcome.p99_ms,
                    "max_ms": r.outcome.max_ms,
                    "envoy": usage(r.envoy),
                    "policy": usage(r.policy),
                    "upstream": usage(r.upstream),
                    "postgres_cpu_s": r.database_cpu_s,
                    "machine_busy": r.machine_busy,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_no_runs() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    fn run(target: &'static str, round: u32, requests: u64, p99_ms: f64) -> Run {
        Run {
            target,
            connections: 8,
            round,
            outcome: crate::wrk::Outcome {
                requests,
                seconds: 1.0,
                p99_ms,
                ..Default::default()
            },
            envoy: None,
            policy: None,
            upstream: None,
            database_cpu_s: None,
            machine_busy: 0.0,
        }
    }

    #[test]
    fn targets_are_judged_round_by_round() {
        // (c) ahead of (b) in round 1 only; behind (a) by more than half in both.
        let runs = [
            run("a", 1, 1000, 1.0),
            run("b", 1, 400, 2.0),
            run("c", 1, 440, 1.8),
            run("a", 2, 1000, 1.0),
            run("b", 2, 460, 2.0),
            run("c", 2, 420, 2.5),
        ];
        let rps = |r: &Run| r.outcome.rps();
        let c_over_b = round_ratios(&runs, ("c", "b"), 8, rps);
        assert_eq!(c_over_b.len(), 2);
        assert!((c_over_b[0] - 1.1).abs() < 1e-9);
        assert_eq!(
            verdict(&c_over_b, |r| r >= 1.0),
            "**unsettled** (1 of 2 rounds met it)"
        );
        let c_over_a = round_ratios(&runs, ("c", "a"), 8, rps);
        assert_eq!(verdict(&c_over_a, |r| r >= 0.45), "**missed**");
        assert_eq!(verdict(&c_over_a, |r| r >= 0.4), "met");
        assert_eq!(spread(&c_over_a), " (0.42–0.44)");
        assert_eq!(spread(&c_over_a[..1]), "");
        // No runs at that concurrency: no verdict.
        assert_eq!(
            verdict(&round_ratios(&runs, ("c", "b"), 32, rps), |r| r >= 1.0),
            "-"
        );
    }

    #[test]
    fn envoy_version_is_shortened() {
        let text = "/x/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL";
        assert_eq!(
            envoy_version(text),
            "1.40.0 (Clean/RELEASE/BoringSSL, build 9e558093)"
        );
    }
}
