//! `mcpguard-aggregator`: see the crate docs (src/lib.rs) and docs/gateway.md.

use clap::Parser;
use mcpguard_aggregator::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match mcpguard_aggregator::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpguard-aggregator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
