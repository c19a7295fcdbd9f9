//! The benchmark's data set, written straight into a fresh store (SQLite, or a fresh
//! PostgreSQL database; opened and migrated by the policy service's own `store::open`):
//! 100 gateways, 1,000 servers, 10,000 token-based hosts, 100 users, 50,000
//! connections, 50,000 API tokens.
//!
//! Rows are inserted with literal values built here (numbers, slugs, hex hashes; nothing
//! from outside), 500 per statement, in one transaction: seconds instead of the minutes
//! 160,000 admin API calls would take. The shape follows the schemas in
//! `policy-svc/migrations/{sqlite,postgres}`; the only difference the rows see is how a
//! boolean is written ([`Backend::boolean`]). The sanity checks in `main` prove the
//! policy service reads the rows as it reads its own.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use mcpguard_core::token::{TokenHash, TokenKind, format_token};
use mcpguard_policy::store;

/// The database a store lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Backend {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The name of its runs of the check endpoint in the report and `results.json`.
    pub fn check_target(self) -> &'static str {
        match self {
            Backend::Sqlite => "check-sqlite",
            Backend::Postgres => "check-postgres",
        }
    }

    /// A boolean literal for an `enabled` column: INTEGER 0/1 in the SQLite schema,
    /// BOOLEAN in the PostgreSQL one (which refuses an integer there).
    pub fn boolean(self, value: bool) -> &'static str {
        match (self, value) {
            (Backend::Sqlite, true) => "1",
            (Backend::Sqlite, false) => "0",
            (Backend::Postgres, true) => "TRUE",
            (Backend::Postgres, false) => "FALSE",
        }
    }
}

/// Tables whose ids the seed sets explicitly. On PostgreSQL their identity sequences
/// are moved past the seeded ids afterwards, so rows the service adds later (none in
/// the benchmark; an admin call made by hand with `--hold`) do not collide.
const SEEDED_TABLES: [&str; 7] = [
    "roles",
    "users",
    "gateways",
    "servers",
    "hosts",
    "connections",
    "api_tokens",
];

pub const GATEWAYS: usize = 100;
pub const SERVERS: usize = 1_000;
pub const HOSTS: usize = 10_000;
pub const USERS: usize = 100;
/// Each host holds one connection (with one token) to this many gateways.
pub const CONNECTIONS_PER_HOST: usize = 5;
pub const TOKENS: usize = HOSTS * CONNECTIONS_PER_HOST;
/// Each gateway exposes this many servers.
pub const EXPOSED_PER_GATEWAY: usize = 20;
/// One token in this many is revoked (and never used by the workload).
const REVOKED_EVERY: usize = 100;

/// A live token, with a gateway it is valid on and a server that gateway exposes.
#[derive(Debug, Clone)]
pub struct SeededToken {
    pub token: String,
    pub hash: String,
    pub gateway: String,
    pub server: String,
}

/// The data set's tokens, generated once and seeded into each store.
pub struct DataSet {
    secrets: Vec<String>,
    hashes: Vec<String>,
    /// Every live token, in id order.
    pub live: Vec<SeededToken>,
    pub revoked: usize,
    /// A revoked token on a route its gateway exposes, to prove refusals.
    pub revoked_example: SeededToken,
}

pub fn gateway_slug(g: usize) -> String {
    format!("gw-{g}")
}

pub fn server_slug(s: usize) -> String {
    format!("srv-{s}")
}

/// Gateway `g` exposes servers `g*10 .. g*10+20` (mod 1000): each server is exposed by
/// two gateways.
fn exposed_server(g: usize, k: usize) -> usize {
    (g * 10 + k) % SERVERS
}

/// Token `t` belongs to connection `t`: host `t / 5`, gateway `t % 100`, user `host % 100`.
fn token_gateway(t: usize) -> usize {
    t % GATEWAYS
}

fn token_secret(t: usize) -> Result<String> {
    // Deterministic entropy: 40 hex digits are 40 characters of the base62 alphabet.
    let entropy = TokenHash::of(&format!("mcpguard-bench-token-{t}")).to_hex();
    format_token(TokenKind::HostApi, &entropy[..40]).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Inserts `rows` (already rendered as `(..)` tuples) in statements of 500.
async fn insert(
    conn: &mut sqlx::AnyConnection,
    head: &str,
    rows: impl Iterator<Item = String>,
) -> Result<()> {
    let mut batch: Vec<String> = Vec::with_capacity(500);
    let flush = |batch: &mut Vec<String>| {
        let sql = format!("{head} VALUES {}", batch.join(","));
        batch.clear();
        sql
    };
    for row in rows {
        batch.push(row);
        if batch.len() == 500 {
            let sql = flush(&mut batch);
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .with_context(|| format!("seeding: {head}"))?;
        }
    }
    if !batch.is_empty() {
        let sql = flush(&mut batch);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("seeding: {head}"))?;
    }
    Ok(())
}

/// Generates the tokens (deterministic: the same on every run and for every backend).
pub fn generate() -> Result<DataSet> {
    let mut secrets = Vec::with_capacity(TOKENS);
    for t in 0..TOKENS {
        secrets.push(token_secret(t)?);
    }
    let hashes: Vec<String> = secrets.iter().map(|s| TokenHash::of(s).to_hex()).collect();
    let mut live = Vec::with_capacity(TOKENS);
    let mut revoked = Vec::new();
    for (t, (token, hash)) in secrets.iter().zip(&hashes).enumerate() {
        let g = token_gateway(t);
        // Spread requests over every server the gateway exposes.
        let k = (t / GATEWAYS) % EXPOSED_PER_GATEWAY;
        let credential = SeededToken {
            token: token.clone(),
            hash: hash.clone(),
            gateway: gateway_slug(g),
            server: server_slug(exposed_server(g, k)),
        };
        if t % REVOKED_EVERY == 0 {
            revoked.push(credential);
        } else {
            live.push(credential);
        }
    }
    let revoked_example = revoked.first().cloned().context("no revoked token")?;
    Ok(DataSet {
        secrets,
        hashes,
        live,
        revoked: revoked.len(),
        revoked_example,
    })
}

/// The SQLite store's URL in `data_dir`, as the policy service would open it.
pub fn sqlite_url(data_dir: &Path) -> Result<String> {
    std::fs::create_dir_all(data_dir)?;
    Ok(format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("mcpguard.db").display()
    ))
}

/// Creates the store at `url` (SQLite or an empty PostgreSQL database, migrated as the
/// policy service would) and fills it with `data`. Every server's upstream is the demo
/// MCP server at `upstream_authority`. Returns the seconds it took.
pub async fn seed(url: &str, data: &DataSet, upstream_authority: &str) -> Result<f64> {
    let start = Instant::now();
    let backend = Backend::of_url(url);
    let on = backend.boolean(true);
    let db = store::open(url, 1)
        .await
        .with_context(|| format!("opening the {} store to seed", backend.name()))?;
    let now = store::now_ms();
    let (secrets, hashes) = (&data.secrets, &data.hashes);

    let mut tx = db.begin().await?;
    let conn: &mut sqlx::AnyConnection = &mut tx;
    insert(
        conn,
        "INSERT INTO roles (id, name, created_at)",
        std::iter::once(format!("(1, 'bench', {now})")),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO users (id, name, role_id, enabled, created_at)",
        (0..USERS).map(|u| format!("({}, 'user-{u}', 1, {on}, {now})", u + 1)),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO gateways (id, name, slug, enabled, created_at)",
        (0..GATEWAYS).map(|g| {
            format!(
                "({}, 'Gateway {g}', '{}', {on}, {now})",
                g + 1,
                gateway_slug(g)
            )
        }),
    )
    .await?;
    grant_to_everyone(conn, on, now, None).await?;
    insert(
        conn,
        "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)",
        (0..SERVERS).map(|s| {
            format!(
                "({}, 'Server {s}', '{}', 'http', '{upstream_authority}', '/mcp', {on}, {now})",
                s + 1,
                server_slug(s)
            )
        }),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO exposures (gateway_id, server_id, identity, created_at)",
        (0..GATEWAYS).flat_map(|g| {
            (0..EXPOSED_PER_GATEWAY)
                .map(move |k| format!("({}, {}, 'shared', {now})", g + 1, exposed_server(g, k) + 1))
        }),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO hosts (id, name, kind, enabled, created_at)",
        (0..HOSTS).map(|h| format!("({}, 'Agent {h}', 'token', {on}, {now})", h + 1)),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at)",
        (0..TOKENS).map(|t| {
            let host = t / CONNECTIONS_PER_HOST;
            format!(
                "({}, {}, {}, {}, {on}, {now})",
                t + 1,
                host + 1,
                token_gateway(t) + 1,
                host % USERS + 1
            )
        }),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO api_tokens (id, connection_id, token_hash, prefix, created_by, created_at, revoked_at)",
        (0..TOKENS).map(|t| {
            let revoked = if t % REVOKED_EVERY == 0 {
                now.to_string()
            } else {
                "NULL".to_owned()
            };
            format!(
                "({id}, {id}, '{}', '{}', 1, {now}, {revoked})",
                hashes[t],
                mcpguard_core::token::display_prefix(&secrets[t]),
                id = t + 1
            )
        }),
    )
    .await?;
    if backend == Backend::Postgres {
        for table in SEEDED_TABLES {
            let sql = format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .with_context(|| format!("seeding: the id sequence of {table}"))?;
        }
    }
    tx.commit().await?;
    if backend == Backend::Postgres {
        // Statistics and visibility map as autovacuum would leave them on a settled
        // store, done now so that autovacuum does not wake up during the measured runs.
        sqlx::raw_sql("VACUUM ANALYZE").execute(&db).await?;
    }
    db.close().await;
    Ok(start.elapsed().as_secs_f64())
}

/// Grants the seeded gateways (or only `gateway`) to the built-in team `everyone`, as
/// the policy service does for a new gateway: without a grant every check is refused
/// `gateway_not_granted`.
async fn grant_to_everyone(
    conn: &mut sqlx::AnyConnection,
    on: &str,
    now: i64,
    gateway: Option<usize>,
) -> Result<()> {
    let only = gateway.map_or(String::new(), |g| format!(" AND g.id = {g}"));
    let sql = format!(
        "INSERT INTO gateway_grants (gateway_id, team_id, created_at) \
         SELECT g.id, t.id, {now} FROM gateways g, teams t WHERE t.everyone = {on}{only}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .context("seeding: gateway grants")?;
    Ok(())
}

/// `count` credentials taken at an even stride across all of `live`, so a workload
/// touches the whole data set rather than its first rows.
pub fn spread(live: &[SeededToken], count: usize) -> Vec<&SeededToken> {
    let count = count.min(live.len()).max(1);
    let stride = live.len() / count;
    (0..count)
        .filter_map(|i| live.get(i * stride.max(1)))
        .collect()
}

/// A short description of the data set for the report; `seeded` lists how long each
/// store took to seed.
pub fn describe(data: &DataSet, seeded: &[(Backend, f64)]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{GATEWAYS} gateways, {SERVERS} servers ({EXPOSED_PER_GATEWAY} exposed per gateway), \
         {HOSTS} token-based hosts, {USERS} users, {TOKENS} connections, {TOKENS} API tokens \
         ({} revoked); seeded by SQL in",
        data.revoked
    );
    for (i, (backend, seconds)) in seeded.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(s, "{sep} {seconds:.1} s ({})", backend.name());
    }
    s
}

/// The fan-out gateway's slug (`--only gateway`): it exposes [`fanout_slug`] servers,
/// each on an upstream of its own.
pub const FANOUT_GATEWAY: &str = "fanout";

pub fn fanout_slug(i: usize) -> String {
    format!("fan-{i}")
}

/// Adds the fan-out gateway to the store at `url` (after [`seed`]): one server per
/// authority in `upstreams`, all exposed, and one live token on it, returned. Ids
/// start past the data set's.
pub async fn seed_fanout(url: &str, upstreams: &[String]) -> Result<SeededToken> {
    let backend = Backend::of_url(url);
    let on = backend.boolean(true);
    let db = store::open(url, 1).await?;
    let now = store::now_ms();
    let (gateway, host, id) = (GATEWAYS + 1, HOSTS + 1, TOKENS + 1);
    let token = token_secret(TOKENS)?;
    let hash = TokenHash::of(&token).to_hex();
    let mut tx = db.begin().await?;
    let conn: &mut sqlx::AnyConnection = &mut tx;
    insert(
        conn,
        "INSERT INTO gateways (id, name, slug, enabled, created_at)",
        std::iter::once(format!(
            "({gateway}, 'Fan-out', '{FANOUT_GATEWAY}', {on}, {now})"
        )),
    )
    .await?;
    grant_to_everyone(conn, on, now, Some(gateway)).await?;
    insert(
        conn,
        "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)",
        upstreams.iter().enumerate().map(|(i, authority)| {
            format!(
                "({}, 'Fan-out {i}', '{}', 'http', '{authority}', '/mcp', {on}, {now})",
                SERVERS + 1 + i,
                fanout_slug(i)
            )
        }),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO exposures (gateway_id, server_id, identity, created_at)",
        (0..upstreams.len()).map(|i| format!("({gateway}, {}, 'shared', {now})", SERVERS + 1 + i)),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO hosts (id, name, kind, enabled, created_at)",
        std::iter::once(format!("({host}, 'Fan-out agent', 'token', {on}, {now})")),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at)",
        std::iter::once(format!("({id}, {host}, {gateway}, 1, {on}, {now})")),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO api_tokens (id, connection_id, token_hash, prefix, created_by, created_at, revoked_at)",
        std::iter::once(format!(
            "({id}, {id}, '{hash}', '{}', 1, {now}, NULL)",
            mcpguard_core::token::display_prefix(&token)
        )),
    )
    .await?;
    tx.commit().await?;
    db.close().await;
    Ok(SeededToken {
        token,
        hash,
        gateway: FANOUT_GATEWAY.to_owned(),
        server: fanout_slug(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_well_formed_and_distinct() {
        let a = token_secret(1).unwrap();
        assert_eq!(
            mcpguard_core::token::parse_token(&a),
            Ok(TokenKind::HostApi)
        );
        assert_ne!(a, token_secret(2).unwrap());
    }

    #[test]
    fn every_token_reaches_a_server_its_gateway_exposes() {
        for t in [0, 1, 99, 100, 4_321, TOKENS - 1] {
            let g = token_gateway(t);
            let k = (t / GATEWAYS) % EXPOSED_PER_GATEWAY;
            let s = exposed_server(g, k);
            assert!((0..EXPOSED_PER_GATEWAY).any(|j| exposed_server(g, j) == s));
        }
    }

    #[test]
    fn booleans_are_written_as_each_schema_wants_them() {
        assert_eq!(
            Backend::of_url("sqlite:///tmp/x.db?mode=rwc"),
            Backend::Sqlite
        );
        assert_eq!(
            Backend::of_url("postgres://u@127.0.0.1:5/db"),
            Backend::Postgres
        );
        assert_eq!(Backend::of_url("postgresql://u@h/db"), Backend::Postgres);
        assert_eq!(Backend::Sqlite.boolean(true), "1");
        assert_eq!(Backend::Sqlite.boolean(false), "0");
        assert_eq!(Backend::Postgres.boolean(true), "TRUE");
        assert_eq!(Backend::Postgres.boolean(false), "FALSE");
    }

    #[test]
    fn the_data_set_is_the_same_on_every_run() {
        let a = generate().unwrap();
        assert_eq!(a.live.len() + a.revoked, TOKENS);
        assert_eq!(a.revoked, TOKENS / REVOKED_EVERY);
        let b = generate().unwrap();
        assert_eq!(a.live[1234].token, b.live[1234].token);
        assert_eq!(a.revoked_example.hash, b.revoked_example.hash);
        let described = describe(&a, &[(Backend::Sqlite, 1.34), (Backend::Postgres, 3.0)]);
        assert!(described.ends_with("seeded by SQL in 1.3 s (sqlite), 3.0 s (postgres)"));
    }

    #[test]
    fn spread_takes_an_even_stride_over_the_whole_list() {
        let live: Vec<SeededToken> = (0..100)
            .map(|i| SeededToken {
                token: i.to_string(),
                hash: String::new(),
                gateway: String::new(),
                server: String::new(),
            })
            .collect();
        let picked: Vec<&str> = spread(&live, 4).iter().map(|c| c.token.as_str()).collect();
        assert_eq!(picked, ["0", "25", "50", "75"]);
        assert_eq!(spread(&live, 1_000).len(), 100);
    }
}
