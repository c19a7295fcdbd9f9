//! `mcpguard-aggregator`: see the crate docs (src/lib.rs) and docs/gateway.md.

use clap::Parser;
use mcpguard_aggregator::Config;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let runtime = match mcpguard_aggregator::runtime(&config) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mcpguard-aggregator: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mcpguard_aggregator::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpguard-aggregator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
