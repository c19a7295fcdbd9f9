//! mcpguard policy service: the admin API on the public port and the filter's check
//! endpoint on the check port, over one store.

pub mod audit;
pub mod audit_export;
pub mod auth;
mod check;
pub mod check_auth;
pub mod config;
pub mod error;
mod extract;
mod features;
#[cfg(test)]
mod fixture;
#[cfg(test)]
mod fuzz;
pub mod identities;
pub mod keys;
mod last_used;
pub mod metrics;
pub mod oauth_client;
pub mod oauth_config;
pub mod oauth_identity;
pub mod outbound;
pub mod pages;
mod queue;
pub mod routes;
pub mod secrets;
pub mod serve;
pub mod signin;
pub mod store;
mod timefmt;
pub mod upstream_policy;

use std::path::Path;

use anyhow::Context;
use mcpguard_core::token::{TokenHash, TokenKind, display_prefix};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use last_used::LastUsed;
use store::Db;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Where the check reads its row (on SQLite and PostgreSQL, not through `db`).
    pub check_reads: store::check::Reads,
    pub last_used: LastUsed,
    pub audit: audit::Audit,
    pub audit_retention_days: u32,
    pub secrets: std::sync::Arc<secrets::SecretBox>,
    pub oauth: std::sync::Arc<oauth_config::OauthConfig>,
    pub signer: std::sync::Arc<keys::Signer>,
    /// Verifies access tokens presented to the ext_authz endpoint.
    pub verifier: std::sync::Arc<keys::Verifier>,
    /// Which addresses upstream servers may have: checked when a server is registered,
    /// and callable per request (`permits`, `resolve`).
    pub upstreams: std::sync::Arc<upstream_policy::UpstreamPolicy>,
    /// The bound on concurrent password hashes (sign-in, enrollment, password set).
    pub passwords: std::sync::Arc<signin::Passwords>,
    /// How the service's own http(s) calls (an upstream's live lists) trust servers.
    pub outbound: outbound::Outbound,
}

/// `mcpguard-policy reseal`: moves every stored sealed value to the current key.
pub async fn reseal(config: &Config) -> anyhow::Result<store::reseal::Resealed> {
    let path = config.secrets_key_file();
    // A typo must not mint a fresh key and seal everything under it.
    anyhow::ensure!(
        path.exists(),
        "the secrets key {} does not exist",
        path.display()
    );
    let secrets = config.secret_box()?;
    let db = store::open_with(&config.database_url(), &config.db_options())
        .await
        .context("opening the database")?;
    store::reseal::reseal_all(&db, &secrets).await
}

/// `mcpguard-policy console-link`: a one-time console sign-in link for `user`.
pub async fn console_link(config: &Config, user: &str) -> anyhow::Result<String> {
    let issuer = config.oauth()?.issuer;
    let db = store::open_with(&config.database_url(), &config.db_options())
        .await
        .context("opening the database")?;
    routes::console::new_link(&db, &issuer, user).await
}

/// Opens the store, creates the owner on first start, and serves both ports until
/// SIGINT or SIGTERM; then drains requests and writes the queued audit entries and
/// last-used times.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let oauth = std::sync::Arc::new(config.oauth()?);
    let outbound = config.outbound()?;
    let audit_export = config.audit_export(&outbound)?;
    create_data_dir(&config.data_dir)?;
    let db = store::open_with(&config.database_url(), &config.db_options())
        .await
        .context("opening the database")?;
    bootstrap(&db, &config).await?;
    let secrets = std::sync::Arc::new(config.secret_box()?);
    let check_auth = config.check_auth()?;
    if let check_auth::CheckAuth::Mesh = check_auth {
        tracing::warn!(
            "--check-auth mesh: the check port admits any caller that reaches it; only the \
             mesh (mTLS and an AuthorizationPolicy) keeps other workloads off it"
        );
    }
    if config.previous_secrets_key_file.is_some() {
        tracing::warn!(
            "secrets key rotation in progress: values sealed under the previous key still \
             open; run `mcpguard-policy reseal`, then drop --previous-secrets-key-file"
        );
    }
    store::oauth::ensure_keys(&db, &mut || keys::generate(&secrets))
        .await
        .context("creating the OAuth signing keys")?;

    let public = TcpListener::bind(config.public_listen)
        .await
        .with_context(|| format!("binding the public port {}", config.public_listen))?;
    let check = TcpListener::bind(config.check_listen)
        .await
        .with_context(|| format!("binding the check port {}", config.check_listen))?;
    tracing::info!(public = %config.public_listen, check = %config.check_listen, "mcpguard policy service listening");

    let (last_used, last_used_writer) = LastUsed::spawn(db.clone());
    let (audit, audit_writer) = audit::Audit::spawn_with_budget(
        db.clone(),
        config.audit_retention_days,
        config.audit_anonymous_refusals_per_sec,
    );
    if let Some(export) = audit_export {
        audit.export_to(export);
    }
    tokio::spawn(oauth_housekeeping(db.clone()));
    let check_reads =
        store::check::Reads::for_store(&db, &config.database_url(), config.check_deadline().0);
    let state = AppState {
        check_reads,
        db,
        last_used,
        audit,
        audit_retention_days: config.audit_retention_days,
        secrets,
        oauth,
        signer: std::sync::Arc::default(),
        verifier: std::sync::Arc::default(),
        upstreams: std::sync::Arc::new(config.upstream_policy()),
        passwords: std::sync::Arc::new(config.passwords()),
        outbound,
    };
    if config.features_refresh_s > 0 {
        features::spawn_schedule(
            state.clone(),
            std::time::Duration::from_secs(config.features_refresh_s),
        );
    }
    tokio::spawn(routes::warn_about_registered(
        state.db.clone(),
        state.upstreams.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (public_limits, check_limits) = budgeted(&config);
    let public_app =
        serve::limit_bodies(routes::public(state.clone()), public_limits.max_body_bytes);
    let check_app = serve::limit_bodies(
        routes::check(state)
            .layer(axum::Extension(config.check_deadline()))
            .layer(axum::middleware::from_fn_with_state(
                check_auth,
                check_auth::require,
            )),
        check_limits.max_body_bytes,
    );
    let signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    };
    tokio::join!(
        serve::serve("public", public, public_app, public_limits, stop_rx.clone()),
        serve::serve("check", check, check_app, check_limits, stop_rx),
        signal
    );
    // Both routers (and so every handle) are gone: the writers flush and end.
    let _ = last_used_writer.await;
    let _ = audit_writer.await;
    Ok(())
}

/// The ports' limits, with the connection budgets cut to what the open-file limit
/// (raised to its hard limit first) can hold besides the database connections.
fn budgeted(config: &Config) -> (serve::PortLimits, serve::PortLimits) {
    let (mut public, mut check) = config.port_limits();
    let Some(open_files) = serve::raise_open_file_limit() else {
        return (public, check);
    };
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get() as u64);
    // The pool, the check's own reads (one per worker thread), listeners, the database
    // files, logs and the runtime's own descriptors.
    let reserve = 64 + u64::from(config.db_max_connections) + threads;
    let (public_fits, check_fits) = serve::fit_budgets(
        open_files,
        reserve,
        public.max_connections,
        check.max_connections,
    );
    if (public_fits, check_fits) != (public.max_connections, check.max_connections) {
        tracing::warn!(
            open_files,
            public_max_connections = public_fits,
            check_max_connections = check_fits,
            "the open-file limit cannot hold the configured connection limits; lowered \
             (raise the hard limit, e.g. LimitNOFILE= in systemd, to keep them)"
        );
    }
    public.max_connections = public_fits;
    check.max_connections = check_fits;
    (public, check)
}

/// Hourly: deletes OAuth sessions, codes and refresh tokens that can no longer be used.
async fn oauth_housekeeping(db: store::Db) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match store::oauth::purge_expired(&db, store::now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                "expired OAuth sessions, codes and refresh tokens deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "OAuth housekeeping failed"),
        }
        let idle = routes::console::SESSION_IDLE_MS;
        match store::console::purge(&db, store::now_ms(), idle).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                "ended console sessions and expired sign-in links deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "console housekeeping failed"),
        }
    }
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    }
    Ok(())
}

/// On first start with an empty database: an owner holding every capability, with an
/// admin token from `MCPGUARD_BOOTSTRAP_ADMIN_TOKEN` or a generated one.
async fn bootstrap(db: &Db, config: &Config) -> anyhow::Result<()> {
    if store::users::has_users(db).await? {
        return Ok(());
    }
    let (token, generated) = match &config.bootstrap_admin_token {
        Some(t) if t.len() >= 32 && !t.contains(char::is_whitespace) => (t.clone(), false),
        Some(_) => anyhow::bail!(
            "MCPGUARD_BOOTSTRAP_ADMIN_TOKEN must be at least 32 characters without spaces"
        ),
        None => (
            secrets::mint(TokenKind::Admin).context("generating the admin token")?,
            true,
        ),
    };
    let created =
        store::users::bootstrap_owner(db, &TokenHash::of(&token).to_hex(), display_prefix(&token))
            .await;
    if let Err(store::StoreError::Conflict(_)) = created {
        // Another replica on the same database created the owner first.
        tracing::info!("the owner user was created by another replica");
        return Ok(());
    }
    created?;
    if generated {
        let path = config.data_dir.join("bootstrap-admin-token");
        write_secret_file(&path, &token)?;
        // Printed once, on stdout and not through the logger, as the contract says.
        println!("mcpguard: created the owner user; admin token (shown once): {token}");
        println!(
            "mcpguard: the admin token is also in {} (mode 0600)",
            path.display()
        );
    } else {
        tracing::info!(
            "created the owner user with the admin token from MCPGUARD_BOOTSTRAP_ADMIN_TOKEN"
        );
    }
    Ok(())
}

/// Writes `secret` to `path`, readable by its owner only. The mode is applied to an
/// existing file too (`mode` at open only applies to a file it creates), before the
/// secret is written into it.
pub(crate) fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} readable by its owner only", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
