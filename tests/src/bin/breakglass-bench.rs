//! The break-glass proof at length: at least 100 toggles across four layers under
//! concurrent load through real Envoy. Prints the counts (stale allows must be 0) and
//! latency percentiles; exits non-zero on any violation.
//!
//! `make bench-breakglass` (release binaries: MCPGUARD_BIN_DIR=target/release).

use std::time::Duration;

use mcpguard_e2e::Stack;
use mcpguard_e2e::toggles::{Plan, five_layers, prove};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cycles: usize = std::env::var("MCPGUARD_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let clients: usize = std::env::var("MCPGUARD_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let stack = Stack::start_stateless().await;
    let target = five_layers(&stack).await;
    let plan = Plan {
        clients,
        cycles,
        requests_per_phase: 20,
        time_limit: Duration::from_secs(180),
    };
    println!(
        "break-glass proof: {clients} concurrent clients, {cycles} cycles x {} layers, Envoy --concurrency 1",
        target.layers.len()
    );
    let report = prove(&target, &stack.admin(), &plan).await;
    println!("{report}");
    let expected = 2 * cycles * target.layers.len();
    if report.toggles < expected {
        eprintln!(
            "ended early: {} of {expected} toggles within the time limit",
            report.toggles
        );
        return std::process::ExitCode::FAILURE;
    }
    if report.is_clean() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
