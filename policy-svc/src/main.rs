use clap::Parser;
use mcpguard_policy::Config;
use mcpguard_policy::config::Command;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")),
    );
    // `console-link` prints only the link on stdout, for scripts (`make run`); its logs
    // (e.g. PostgreSQL notices while migrating) go to stderr.
    if matches!(config.command, Some(Command::ConsoleLink { .. })) {
        logs.with_writer(std::io::stderr).init();
    } else {
        logs.init();
    }
    let done = match &config.command {
        None => mcpguard_policy::run(config.clone()).await,
        Some(Command::NewSecretsKey { path }) => mcpguard_policy::secrets::create_key_file(path)
            .map(|()| {
                println!("wrote a new secrets key to {}", path.display());
            }),
        Some(Command::Reseal) => mcpguard_policy::reseal(&config).await.map(|r| {
            println!(
                "re-sealed {} identities, {} shared credentials and {} signing keys under the \
                 current key; {} already under it; {} replaced meanwhile; and {} OAuth \
                 refresh tokens and client secrets",
                r.identities,
                r.shared_credentials,
                r.signing_keys,
                r.already_current,
                r.changed_meanwhile,
                r.oauth_secrets
            );
        }),
        Some(Command::ConsoleLink { user }) => mcpguard_policy::console_link(&config, user)
            .await
            .map(|url| println!("{url}")),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
