//! `mcpguard-demo-mcp --listen 127.0.0.1:9100 [--stateless] [--elicit] [--page-size N]`:
//! serves the demo MCP server at `/mcp` and prints `listening on ADDR` once bound.
//! `--elicit` adds the tools `ask`, which asks the client for a name (elicitation),
//! and `sample`, which asks it for a completion (sampling);
//! `--page-size N`: `tools/list` answers N tools a page, with a `nextCursor`.

use std::io::Write;
use std::net::SocketAddr;

use axum::serve::ListenerExt;

const USAGE: &str =
    "usage: mcpguard-demo-mcp [--listen 127.0.0.1:9100] [--stateless] [--elicit] [--page-size N]";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpguard-demo-mcp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = "127.0.0.1:9100".parse()?;
    let mut stateless = false;
    let mut elicit = false;
    let mut page_size = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or(USAGE)?.parse()?,
            "--stateless" => stateless = true,
            "--elicit" => elicit = true,
            "--page-size" => {
                let n: usize = args.next().ok_or(USAGE)?.parse()?;
                if n == 0 {
                    return Err(format!("--page-size must be positive; {USAGE}").into());
                }
                page_size = Some(n);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}; {USAGE}").into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Answers go out at once, not after the client's delayed ACK (Nagle).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let options = mcpguard_demo_mcp::Options {
        stateless,
        elicit,
        page_size,
    };
    axum::serve(listener, mcpguard_demo_mcp::router(options))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
