//! Command-line flags and environment variables. Every flag has an `MCPGUARD_*`
//! environment twin so the same binary runs from a shell, systemd or a container.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mcpguard-policy",
    version,
    about = "mcpguard policy service: admin API and the filter's check endpoint"
)]
pub struct Config {
    /// Admin API (and, later, OAuth pages). Keep it off the public internet unless
    /// fronted by TLS.
    #[arg(long, env = "MCPGUARD_PUBLIC_LISTEN", default_value = "127.0.0.1:8080")]
    pub public_listen: SocketAddr,

    /// Check endpoint, for the Envoy filter's callouts only.
    #[arg(long, env = "MCPGUARD_CHECK_LISTEN", default_value = "127.0.0.1:8081")]
    pub check_listen: SocketAddr,

    /// How the check port knows its caller is Envoy. `secret`: every call must carry
    /// the check secret (`--check-secret-file`) in `x-mcpguard-check-secret`, which
    /// Envoy adds from its environment (`MCPGUARD_CHECK_SECRET`). `mesh`: no secret;
    /// only for a mesh whose mTLS and AuthorizationPolicy admit nothing but the
    /// gateway's workload to the check port (see SECURITY.md).
    #[arg(long, env = "MCPGUARD_CHECK_AUTH", value_enum, default_value_t = CheckAuthMode::Secret)]
    pub check_auth: CheckAuthMode,

    /// The check secret (32+ visible characters). Default: `<data dir>/check-secret`,
    /// created on first start (64 random hex digits, mode 0600). Replicas behind one
    /// Envoy share one secret.
    #[arg(long, env = "MCPGUARD_CHECK_SECRET_FILE")]
    pub check_secret_file: Option<PathBuf>,

    /// Directory for the SQLite database and the bootstrap admin token; created if
    /// missing (mode 0700).
    #[arg(long, env = "MCPGUARD_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,

    /// Database URL. Default: `sqlite://<data dir>/mcpguard.db`.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Admin token for the owner created on first start with an empty database.
    /// Default: a generated one, printed once and written to
    /// `<data dir>/bootstrap-admin-token` (mode 0600).
    #[arg(long, env = "MCPGUARD_BOOTSTRAP_ADMIN_TOKEN", hide_env_values = true)]
    pub bootstrap_admin_token: Option<String>,

    /// Largest number of database connections (the pool size). The check reads on
    /// connections of its own besides, one per worker thread at most. With PostgreSQL
    /// both are per replica: replicas x (this + threads) must stay under the server's
    /// `max_connections`.
    #[arg(long, env = "MCPGUARD_DB_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,

    /// Longest a request waits for a database connection, connecting included, in
    /// milliseconds. Bounds every admin call and `/healthz` when the database is down.
    #[arg(long, env = "MCPGUARD_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub db_acquire_timeout_ms: u64,

    /// Longest one SQL statement may run, in milliseconds. PostgreSQL: the session's
    /// `statement_timeout`. SQLite: how long a statement waits for a lock (`busy_timeout`).
    #[arg(long, env = "MCPGUARD_DB_STATEMENT_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub db_statement_timeout_ms: u64,

    /// Deadline for the check's database read, in milliseconds. Past it the check
    /// answers 503 and the filter refuses the request (`policy_unavailable`). Keep it
    /// under the filter's `check_timeout_ms` (300 in the shipped Envoy configs) so the
    /// refusal is this service's quick answer, not a callout timing out.
    #[arg(long, env = "MCPGUARD_CHECK_DEADLINE_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub check_deadline_ms: u64,

    /// 32-byte key (64 hex characters) that seals identities at rest. Default:
    /// `<data dir>/secrets.key`, created on first start (mode 0600). Back it up: without
    /// it, stored identities cannot be opened.
    #[arg(long, env = "MCPGUARD_SECRETS_KEY_FILE", global = true)]
    pub secrets_key_file: Option<PathBuf>,

    /// The key being retired during a rotation: values sealed under it still open, new
    /// ones are sealed under `--secrets-key-file`. Drop it once `reseal` has run.
    #[arg(long, env = "MCPGUARD_PREVIOUS_SECRETS_KEY_FILE", global = true)]
    pub previous_secrets_key_file: Option<PathBuf>,
    /// This service's public URL: the OAuth issuer (the `iss` of access tokens and the
    /// base of the OAuth endpoints). Default: `http://<public listen address>`.
    #[arg(long, env = "MCPGUARD_ISSUER")]
    pub issuer: Option<String>,

    /// Public base URLs of the gateways' data planes (Envoy), comma-separated: OAuth
    /// tokens are issued only for resources `<base>/mcp/{gateway}/{server}` under one.
    #[arg(
        long,
        env = "MCPGUARD_RESOURCE_BASE_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:10000"
    )]
    pub resource_base_urls: Vec<String>,

    /// Lifetime of OAuth access tokens (JWTs), in seconds.
    #[arg(long, env = "MCPGUARD_ACCESS_TOKEN_TTL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub access_token_ttl_secs: u32,

    /// Lifetime of OAuth refresh tokens, in days.
    #[arg(long, env = "MCPGUARD_REFRESH_TOKEN_TTL_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=365))]
    pub refresh_token_ttl_days: u32,

    /// Password hashes (argon2id, 19 MiB each) that may run at once: sign-ins, enrollment
    /// sign-ins, password changes. Twice as many requests may wait; beyond that they get
    /// 503 with `Retry-After`. Default: the number of CPUs.
    #[arg(long, env = "MCPGUARD_PASSWORD_HASH_CONCURRENCY",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub password_hash_concurrency: Option<u32>,

    /// Reverse proxies in front of the public port (addresses or networks, comma-separated,
    /// e.g. `127.0.0.6` for an Istio sidecar): a sign-in whose peer is one of them is
    /// counted for the client they name in `X-Forwarded-For` (the rightmost address that
    /// is not a trusted proxy). Default: none; the peer address is the client.
    #[arg(long, env = "MCPGUARD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Most connections the public port holds open at once. Past it a new connection
    /// is closed at once, so a flood of this port never takes the file descriptors and
    /// tasks the check port needs.
    #[arg(long, env = "MCPGUARD_PUBLIC_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub public_max_connections: u32,

    /// Most connections the check port holds open at once (its own budget). Envoy holds
    /// one HTTP/2 connection per worker thread, and a few for health checks.
    #[arg(long, env = "MCPGUARD_CHECK_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub check_max_connections: u32,

    /// Largest request body on the public port, in bytes; larger ones get 413.
    #[arg(long, env = "MCPGUARD_PUBLIC_MAX_BODY_BYTES", default_value_t = 262_144,
          value_parser = clap::value_parser!(u32).range(1024..=67_108_864))]
    pub public_max_body_bytes: u32,

    /// Largest request body on the check port, in bytes; larger ones get 413. A check
    /// is a few hundred bytes.
    #[arg(long, env = "MCPGUARD_CHECK_MAX_BODY_BYTES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1024..=67_108_864))]
    pub check_max_body_bytes: u32,

    /// Longest wait, in milliseconds, for a request's headers (HTTP/1.1: from the moment
    /// the connection waits for a request, so it also ends idle keep-alive connections)
    /// and for a new connection's first request (either protocol). Both ports.
    #[arg(long, env = "MCPGUARD_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub header_read_timeout_ms: u64,

    /// A connection with no request in flight for this long, in milliseconds, is closed
    /// (HTTP/2 with GOAWAY, so nothing in flight is lost). Both ports.
    #[arg(long, env = "MCPGUARD_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub idle_timeout_ms: u64,

    /// Longest one request may take, body upload included, in milliseconds; past it the
    /// answer is 408 `request_timeout`. Both ports.
    #[arg(long, env = "MCPGUARD_REQUEST_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub request_timeout_ms: u64,

    /// Most requests in flight at once on one HTTP/2 connection (both ports); Envoy
    /// opens another connection when its callouts need more.
    #[arg(long, env = "MCPGUARD_H2_MAX_CONCURRENT_STREAMS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub h2_max_concurrent_streams: u32,

    /// On SIGTERM, longest wait for requests in flight, in milliseconds; connections
    /// still open then are closed.
    #[arg(long, env = "MCPGUARD_DRAIN_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub drain_timeout_ms: u64,

    /// Seconds between refreshes of every exposure's live tool, prompt and resource
    /// lists from its upstream (feature provisioning: new and changed items are
    /// recorded and audited); 0 refreshes only on demand. The first runs one period
    /// after start. Each replica refreshes on its own.
    #[arg(long, env = "MCPGUARD_FEATURES_REFRESH_S", default_value_t = 3600)]
    pub features_refresh_s: u64,

    /// Every gateway approves new headed hosts: an OAuth app that connects for the
    /// first time waits as `pending` (its requests refused `host_pending`) until an
    /// admin approves it, whatever the gateway's own `host-approval` setting.
    #[arg(long, env = "MCPGUARD_APPROVE_NEW_HOSTS")]
    pub approve_new_hosts: bool,

    /// PEM certificates trusted, besides the system's (`/etc/ssl/certs`), for the
    /// https the policy service calls itself: an upstream's live lists and the OTLP
    /// collector. A private CA's, say.
    #[arg(long, env = "MCPGUARD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Days to keep audit entries; 0 keeps them forever.
    #[arg(long, env = "MCPGUARD_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    pub audit_retention_days: u32,

    /// Refusals anyone can cause without a credential (`token_unknown`,
    /// `token_malformed`) written to the audit log one by one per second, on this
    /// replica. Beyond it they are counted, and each second's count is written as one
    /// entry per code with `suppressed` set (and shown in `/api/v1/audit/status`).
    /// 0 writes only the counts. Decisions that name a connection are always written.
    #[arg(long, env = "MCPGUARD_AUDIT_ANONYMOUS_REFUSALS_PER_SEC",
          default_value_t = crate::audit::DEFAULT_ANONYMOUS_REFUSALS_PER_SEC)]
    pub audit_anonymous_refusals_per_sec: u32,

    /// OTLP/HTTP logs endpoint of an OpenTelemetry collector, e.g.
    /// `http://127.0.0.1:4318/v1/logs`: every audit entry is exported to it, in id
    /// order, at least once (docs/observability.md). Plain `http://` (a collector on
    /// loopback or in the pod). Default: no export.
    #[arg(long, env = "MCPGUARD_AUDIT_OTLP_ENDPOINT")]
    pub audit_otlp_endpoint: Option<String>,

    /// The export's encoding: `protobuf` (OTLP/HTTP's default) or `json`.
    #[arg(long, env = "MCPGUARD_AUDIT_OTLP_ENCODING", value_enum,
          default_value_t = crate::audit_export::Encoding::Protobuf)]
    pub audit_otlp_encoding: crate::audit_export::Encoding,

    /// Most audit entries per export request.
    #[arg(long, env = "MCPGUARD_AUDIT_OTLP_BATCH", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub audit_otlp_batch: u32,

    /// How often the export looks for new entries, in milliseconds; also the first
    /// retry's wait after a failure.
    #[arg(long, env = "MCPGUARD_AUDIT_OTLP_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub audit_otlp_interval_ms: u64,

    /// The longest wait between export retries, in milliseconds (the wait doubles
    /// from the interval after each failure).
    #[arg(long, env = "MCPGUARD_AUDIT_OTLP_MAX_BACKOFF_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub audit_otlp_max_backoff_ms: u64,

    /// Envoy's admin address(es), comma-separated: never registered as an upstream
    /// (its admin API stops Envoy and shows its configuration). A `0.0.0.0` or `[::]`
    /// address means every local address on that port.
    #[arg(
        long,
        env = "MCPGUARD_ENVOY_ADMIN_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:9901"
    )]
    pub envoy_admin_addr: Vec<SocketAddr>,

    /// Networks upstream servers may not be at (CIDRs, comma-separated), on top of the
    /// ones always denied (this host's listeners, link-local and cloud metadata,
    /// multicast, reserved). Production: add the loopback and private ranges your
    /// upstreams do not use, e.g. `127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,
    /// 192.168.0.0/16,fc00::/7`.
    #[arg(long, env = "MCPGUARD_UPSTREAM_DENY_NETWORKS", value_delimiter = ',')]
    pub upstream_deny_networks: Vec<crate::upstream_policy::Network>,

    /// When set, the only networks upstream servers may be at (CIDRs, comma-separated);
    /// the deny rules still apply. Default: any address that is not denied.
    #[arg(long, env = "MCPGUARD_UPSTREAM_ALLOW_NETWORKS", value_delimiter = ',')]
    pub upstream_allow_networks: Vec<crate::upstream_policy::Network>,

    /// Log filter, in `tracing` EnvFilter syntax.
    #[arg(long, env = "MCPGUARD_LOG", default_value = "info")]
    pub log: String,

    /// Without a command: serve.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckAuthMode {
    Secret,
    Mesh,
}

/// Operator commands; they use the database and key flags above, then exit.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Write a new random secrets key (64 hex characters, mode 0600) to PATH; never
    /// replaces an existing file. Step 1 of a key rotation (see the README).
    NewSecretsKey { path: PathBuf },
    /// Re-seal every stored identity, shared credential and OAuth signing key that opens
    /// only under `--previous-secrets-key-file` under `--secrets-key-file`. Changes
    /// nothing if a value opens under neither. Safe while replicas serve; safe to run
    /// twice.
    Reseal,
    /// Print a one-time link that signs USER (default `owner`) in to the admin console,
    /// valid for 15 minutes; only its hash is stored. For a first sign-in, or a user
    /// without a password.
    ConsoleLink {
        #[arg(long, default_value = "owner")]
        user: String,
    },
}

impl Config {
    pub fn db_options(&self) -> crate::store::DbOptions {
        crate::store::DbOptions {
            max_connections: self.db_max_connections,
            acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        }
    }

    /// The limits of the public port and of the check port.
    pub fn port_limits(&self) -> (crate::serve::PortLimits, crate::serve::PortLimits) {
        let common = crate::serve::PortLimits {
            max_connections: self.public_max_connections,
            max_body_bytes: self.public_max_body_bytes as usize,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
        };
        let check = crate::serve::PortLimits {
            max_connections: self.check_max_connections,
            max_body_bytes: self.check_max_body_bytes as usize,
            ..common
        };
        (common, check)
    }

    pub fn check_deadline(&self) -> CheckDeadline {
        CheckDeadline(Duration::from_millis(self.check_deadline_ms))
    }

    /// How the check port authenticates its caller (the secret file is created on
    /// first start).
    pub fn check_auth(&self) -> anyhow::Result<crate::check_auth::CheckAuth> {
        match self.check_auth {
            CheckAuthMode::Mesh => Ok(crate::check_auth::CheckAuth::Mesh),
            CheckAuthMode::Secret => crate::check_auth::CheckAuth::from_file(
                &self
                    .check_secret_file
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("check-secret")),
            ),
        }
    }

    pub fn secrets_key_file(&self) -> PathBuf {
        self.secrets_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secrets.key"))
    }

    /// The secrets key (created on first start), and the previous one during a rotation.
    pub fn secret_box(&self) -> anyhow::Result<crate::secrets::SecretBox> {
        crate::secrets::SecretBox::load(
            &self.secrets_key_file(),
            self.previous_secrets_key_file.as_deref(),
        )
    }

    pub fn oauth(&self) -> anyhow::Result<crate::oauth_config::OauthConfig> {
        let issuer = self
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.public_listen));
        let valid_base = |u: &str| {
            (u.starts_with("http://") || u.starts_with("https://"))
                && !u.ends_with('/')
                && url::Url::parse(u).is_ok_and(|p| p.path() == "/" && p.query().is_none())
        };
        if !valid_base(&issuer) {
            anyhow::bail!(
                "--issuer must be an http(s) URL with no path or trailing slash, got {issuer:?}"
            );
        }
        for base in &self.resource_base_urls {
            if !valid_base(base) {
                anyhow::bail!(
                    "--resource-base-urls: {base:?} must be an http(s) URL with no path or trailing slash"
                );
            }
        }
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .filter(|n| !n.trim().is_empty())
            .map(|n| {
                n.parse()
                    .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(crate::oauth_config::OauthConfig {
            trusted_proxies,
            approve_new_hosts: self.approve_new_hosts,
            issuer,
            resource_base_urls: self.resource_base_urls.clone(),
            access_token_ttl_secs: i64::from(self.access_token_ttl_secs),
            refresh_token_ttl_ms: i64::from(self.refresh_token_ttl_days) * 86_400_000,
        })
    }

    /// The address policy for upstream servers: this service's listeners and Envoy's
    /// admin are never one, plus the operator's lists.
    pub fn upstream_policy(&self) -> crate::upstream_policy::UpstreamPolicy {
        use crate::upstream_policy::{Listener, UpstreamPolicy};
        let mut listeners = vec![
            Listener {
                what: "the policy service's public port",
                listen: self.public_listen,
            },
            Listener {
                what: "the policy service's check port",
                listen: self.check_listen,
            },
        ];
        listeners.extend(self.envoy_admin_addr.iter().map(|&listen| Listener {
            what: "Envoy's admin",
            listen,
        }));
        // Envoy's own data plane as an upstream would loop requests through the gateway
        // with the server's credential. Known here when a base URL names an address.
        listeners.extend(self.resource_base_urls.iter().filter_map(|base| {
            let url = url::Url::parse(base).ok()?;
            let ip = match url.host()? {
                url::Host::Ipv4(ip) => std::net::IpAddr::V4(ip),
                url::Host::Ipv6(ip) => std::net::IpAddr::V6(ip),
                url::Host::Domain(_) => return None,
            };
            Some(Listener {
                what: "Envoy's data plane (--resource-base-urls)",
                listen: SocketAddr::new(ip, url.port_or_known_default()?),
            })
        }));
        UpstreamPolicy::new(
            listeners,
            self.upstream_deny_networks.clone(),
            self.upstream_allow_networks.clone(),
        )
    }

    /// The bound on concurrent password hashes.
    pub fn passwords(&self) -> crate::signin::Passwords {
        match self.password_hash_concurrency {
            Some(n) => crate::signin::Passwords::new(usize::try_from(n).unwrap_or(1)),
            None => crate::signin::Passwords::per_cpu(),
        }
    }

    /// How the policy service's own http(s) calls trust servers (`--trusted-ca-file`).
    pub fn outbound(&self) -> anyhow::Result<crate::outbound::Outbound> {
        crate::outbound::Outbound::load(self.trusted_ca_file.as_deref())
    }

    /// The audit export's settings, `None` without `--audit-otlp-endpoint`.
    pub fn audit_export(
        &self,
        outbound: &crate::outbound::Outbound,
    ) -> anyhow::Result<Option<crate::audit_export::ExportConfig>> {
        let Some(endpoint) = &self.audit_otlp_endpoint else {
            return Ok(None);
        };
        let url = url::Url::parse(endpoint)
            .map_err(|e| anyhow::anyhow!("--audit-otlp-endpoint {endpoint:?}: {e}"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https") && url.host().is_some(),
            "--audit-otlp-endpoint must be an http:// or https:// URL, got {endpoint:?}"
        );
        Ok(Some(crate::audit_export::ExportConfig {
            endpoint: endpoint.clone(),
            encoding: self.audit_otlp_encoding,
            outbound: outbound.clone(),
            batch: self.audit_otlp_batch as usize,
            interval: Duration::from_millis(self.audit_otlp_interval_ms),
            max_backoff: Duration::from_millis(
                self.audit_otlp_max_backoff_ms
                    .max(self.audit_otlp_interval_ms),
            ),
        }))
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("mcpguard.db").display()
            )
        })
    }
}

/// The check's deadline for its database read (`--check-deadline-ms`), handed to the
/// check route as a request extension. Without one the route uses the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckDeadline(pub Duration);

impl Default for CheckDeadline {
    fn default() -> Self {
        CheckDeadline(Duration::from_millis(200))
    }
}
