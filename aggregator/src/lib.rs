//! `mcpguard-aggregator`: the gateway URL `/mcp/{gateway}`, every server the gateway
//! exposes behind one MCP endpoint (streamable HTTP). It sits behind Envoy, which
//! sends it only requests the mcpguard filter allowed at the gateway's level, with the
//! caller's credential in `x-mcpguard-caller`. For every server a request touches it
//! asks the policy service's check port itself, uncached, on that very request, and
//! talks to the upstream as the allow says. Messages are raw JSON, so definitions
//! pass unchanged but for the name ([`names`]). See docs/gateway.md.

mod asks;
pub mod cursor;
pub mod gateway;
pub mod policy;
pub mod session;
pub mod stream;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

/// The aggregator's flags; each also read from its environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "mcpguard-aggregator", version, about)]
pub struct Config {
    /// Where to listen: loopback, since only Envoy may reach it.
    #[arg(
        long,
        env = "MCPGUARD_AGGREGATOR_LISTEN",
        default_value = "127.0.0.1:8082"
    )]
    pub listen: SocketAddr,
    /// The policy service's check port, which every per-server check goes to.
    #[arg(
        long,
        env = "MCPGUARD_POLICY_CHECK_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub policy_check_url: String,
    /// The check secret (the policy service's `data/check-secret`). Leave it out only
    /// where the policy service runs `--check-auth mesh` (docs/istio.md).
    #[arg(long, env = "MCPGUARD_CHECK_SECRET_FILE")]
    pub check_secret_file: Option<PathBuf>,
    /// How long a check may take before the server it is for counts as refused.
    #[arg(
        long,
        env = "MCPGUARD_AGGREGATOR_CHECK_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub check_timeout_ms: u64,
    /// How long an upstream may take to answer (a list, or a call's first byte)
    /// before it is left out (lists) or its call fails.
    #[arg(
        long,
        env = "MCPGUARD_AGGREGATOR_UPSTREAM_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub upstream_timeout_ms: u64,
    /// How often each open GET stream asks which servers its caller may use now (one
    /// exchange with the policy service, deciding the gateway and each server, each
    /// audited), to send `list_changed` when that changed and relay only usable
    /// servers.
    #[arg(
        long,
        env = "MCPGUARD_AGGREGATOR_STREAM_CHECK_MS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub stream_check_ms: u64,
    /// PEM certificates trusted besides the system's roots for https upstreams.
    #[arg(long, env = "MCPGUARD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Threads that serve requests (tokio's workers). Absent: one per CPU the process
    /// may use, counting a cgroup's CPU limit. Beside Envoy and the policy service on
    /// 2 cores, 1 measured faster at 1 connection (docs/gateway.md#threads).
    #[arg(
        long,
        env = "MCPGUARD_AGGREGATOR_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: Option<u16>,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "MCPGUARD_LOG", default_value = "info")]
    pub log: String,
}

/// The runtime [`run`] runs on: `--worker-threads` workers, or tokio's default.
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(usize::from(n));
    }
    builder.enable_all().build()
}

/// What every request shares.
pub struct App {
    pub policy: policy::Policy,
    pub upstreams: upstream::Client,
    pub key: session::SessionKey,
    pub sessions: session::Sessions,
    /// `--stream-check-ms`.
    pub stream_check: Duration,
}

/// Sessions idle this long are dropped (the client initializes again).
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);

impl App {
    pub fn new(config: &Config) -> anyhow::Result<App> {
        let secret = match &config.check_secret_file {
            Some(file) => Some(read_secret(file)?),
            None => {
                tracing::warn!(
                    "no --check-secret-file: the policy service's check port must be \
                     authenticated by the mesh (--check-auth mesh)"
                );
                None
            }
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            // Upstreams are connected by the address the policy service judged: a
            // redirect would go somewhere nobody judged.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(App {
            policy: policy::Policy::new(
                http.clone(),
                &config.policy_check_url,
                secret,
                Duration::from_millis(config.check_timeout_ms),
            ),
            upstreams: upstream::Client::new(
                http,
                trusted_roots(config.trusted_ca_file.as_deref())?,
                Duration::from_millis(config.upstream_timeout_ms),
            ),
            key: session::SessionKey::random()?,
            sessions: session::Sessions::default(),
            stream_check: Duration::from_millis(config.stream_check_ms),
        })
    }
}

/// The certificates of `--trusted-ca-file`. A file that cannot be read, or holds no
/// certificate, stops the start: a typo must not leave https failing later.
fn trusted_roots(file: Option<&std::path::Path>) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let Some(path) = file else {
        return Ok(Vec::new());
    };
    let pem =
        std::fs::read(path).with_context(|| format!("--trusted-ca-file {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("--trusted-ca-file {}", path.display()))?;
    anyhow::ensure!(
        !roots.is_empty(),
        "--trusted-ca-file {}: no PEM certificate in it",
        path.display()
    );
    Ok(roots)
}

fn read_secret(file: &std::path::Path) -> anyhow::Result<String> {
    let secret = std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(!secret.is_empty(), "{} is empty", file.display());
    Ok(secret)
}

/// Serves until Ctrl-C or SIGTERM. Prints `listening on ADDR` once bound.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let app = Arc::new(App::new(&config)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, workers, "mcpguard-aggregator listening");
    println!("listening on {addr}");
    let sweeper = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let dropped = app.sessions.sweep(SESSION_IDLE);
                if dropped > 0 {
                    tracing::info!(dropped, "dropped idle sessions");
                }
            }
        })
    };
    // Answers go out at once, not after the client's delayed ACK (Nagle): without it
    // a call through the aggregator took 45 ms (envoy-notes.md).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stopping = app.clone();
    let served = axum::serve(listener, gateway::router(app))
        .with_graceful_shutdown(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            // Open GET streams end, so the shutdown does not wait on them forever.
            stopping.sessions.end_all();
        })
        .await;
    sweeper.abort();
    Ok(served?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["mcpguard-aggregator"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn the_check_secret_may_be_left_to_the_mesh_but_a_named_file_must_hold_one() {
        let plain = config(&[]);
        assert!(plain.check_secret_file.is_none());
        assert!(App::new(&plain).is_ok(), "--check-auth mesh deployments");

        let dir = std::env::temp_dir().join(format!("mcpguard-aggregator-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let empty = empty.display().to_string();
        for flag in ["--check-secret-file", "--trusted-ca-file"] {
            let err = App::new(&config(&[flag, &empty])).err();
            assert!(err.is_some(), "{flag} with an empty file started");
        }
        let missing = dir.join("missing").display().to_string();
        assert!(App::new(&config(&["--trusted-ca-file", &missing])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_threads_are_as_asked_or_tokios_default() {
        let one = runtime(&config(&["--worker-threads", "1"])).unwrap();
        assert_eq!(one.metrics().num_workers(), 1);
        let three = runtime(&config(&["--worker-threads", "3"])).unwrap();
        assert_eq!(three.metrics().num_workers(), 3);
        // tokio's own variable would set the default.
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            let default = runtime(&config(&[])).unwrap();
            let cpus = std::thread::available_parallelism().unwrap().get();
            assert_eq!(default.metrics().num_workers(), cpus);
        }
        for bad in ["0", "-1", "many", "1025"] {
            let argv = ["mcpguard-aggregator", "--worker-threads", bad];
            assert!(
                Config::try_parse_from(argv).is_err(),
                "--worker-threads {bad} was taken"
            );
        }
    }
}
