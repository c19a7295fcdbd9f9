//! Runs `wrk` with the workload script and reads its `BENCH_JSON` line.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The wrk script, embedded so the binary needs no path to it; written next to the
/// request lists at start.
pub const SCRIPT: &str = include_str!("../lua/workload.lua");

#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub requests: u64,
    pub seconds: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

pub fn available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
}

pub fn version() -> String {
    Command::new("wrk")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .next()
                .unwrap_or_default()
                .split(" Copyright")
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// One closed-loop run: `connections` connections over `min(connections, 2)` threads
/// (the machine has 2 cores), for `seconds`, cycling through the request list. With
/// `check_secret`, every request carries it as Envoy's callouts do (runs against the
/// check port; never through Envoy, which would pass it on upstream).
pub fn run(
    script: &Path,
    list: &Path,
    port: u16,
    connections: u32,
    seconds: u32,
    check_secret: Option<&str>,
) -> Result<Outcome> {
    let threads = connections.clamp(1, 2);
    let mut cmd = Command::new("wrk");
    if let Some(secret) = check_secret {
        cmd.env("BENCH_CHECK_SECRET", secret);
    }
    let out = cmd
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "2s", "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--")
        .arg(list)
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(json) = stdout.lines().find_map(|l| l.strip_prefix("BENCH_JSON ")) else {
        bail!(
            "wrk gave no result ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: serde_json::Value = serde_json::from_str(json).context("wrk result")?;
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| n(k) as u64)
        .sum();
    Ok(Outcome {
        requests: n("requests") as u64,
        seconds: n("duration_us") / 1e6,
        errors,
        p50_ms: n("p50_us") / 1e3,
        p90_ms: n("p90_us") / 1e3,
        p99_ms: n("p99_us") / 1e3,
        max_ms: n("max_us") / 1e3,
    })
}
