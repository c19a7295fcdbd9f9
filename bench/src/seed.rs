//! The benchmark's data set, written straight into a fresh SQLite store (opened and
//! migrated by the policy service's own `store::open`): 100 gateways, 1,000 servers,
//! 10,000 token-based hosts, 100 users, 50,000 connections, 50,000 API tokens.
//!
//! Rows are inserted with literal values built here (numbers, slugs, hex hashes; nothing
//! from outside), 500 per statement, in one transaction: seconds instead of the minutes
//! 160,000 admin API calls would take. The shape follows the schema in
//! `policy-svc/migrations/sqlite`; the sanity checks in `main` prove the policy service
//! reads it as it reads its own rows.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use mcpguard_core::token::{TokenHash, TokenKind, format_token};
use mcpguard_policy::store;

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
pub struct Credential {
    pub token: String,
    pub hash: String,
    pub gateway: String,
    pub server: String,
}

pub struct Seeded {
    pub seconds: f64,
    /// Every live token, in id order.
    pub live: Vec<Credential>,
    pub revoked: usize,
    /// A revoked token on a route its gateway exposes, to prove refusals.
    pub revoked_example: Credential,
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

/// Creates the store in `data_dir` (as the policy service would) and fills it. Every
/// server's upstream is the demo MCP server at `upstream_authority`.
pub async fn seed(data_dir: &Path, upstream_authority: &str) -> Result<Seeded> {
    let start = Instant::now();
    std::fs::create_dir_all(data_dir)?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("mcpguard.db").display()
    );
    let db = store::open(&url, 1)
        .await
        .context("opening the store to seed")?;
    let now = store::now_ms();
    let mut secrets = Vec::with_capacity(TOKENS);
    for t in 0..TOKENS {
        secrets.push(token_secret(t)?);
    }
    let hashes: Vec<String> = secrets.iter().map(|s| TokenHash::of(s).to_hex()).collect();

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
        (0..USERS).map(|u| format!("({}, 'user-{u}', 1, 1, {now})", u + 1)),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO gateways (id, name, slug, enabled, created_at)",
        (0..GATEWAYS).map(|g| {
            format!(
                "({}, 'Gateway {g}', '{}', 1, {now})",
                g + 1,
                gateway_slug(g)
            )
        }),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)",
        (0..SERVERS).map(|s| {
            format!(
                "({}, 'Server {s}', '{}', 'http', '{upstream_authority}', '/mcp', 1, {now})",
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
        (0..HOSTS).map(|h| format!("({}, 'Agent {h}', 'token', 1, {now})", h + 1)),
    )
    .await?;
    insert(
        conn,
        "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at)",
        (0..TOKENS).map(|t| {
            let host = t / CONNECTIONS_PER_HOST;
            format!(
                "({}, {}, {}, {}, 1, {now})",
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
    tx.commit().await?;
    db.close().await;

    let mut live = Vec::with_capacity(TOKENS);
    let mut revoked = Vec::new();
    for (t, (token, hash)) in secrets.into_iter().zip(hashes).enumerate() {
        let g = token_gateway(t);
        // Spread requests over every server the gateway exposes.
        let k = (t / GATEWAYS) % EXPOSED_PER_GATEWAY;
        let credential = Credential {
            token,
            hash,
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
    Ok(Seeded {
        seconds: start.elapsed().as_secs_f64(),
        live,
        revoked: revoked.len(),
        revoked_example,
    })
}

/// `count` credentials taken at an even stride across all of `live`, so a workload
/// touches the whole data set rather than its first rows.
pub fn spread(live: &[Credential], count: usize) -> Vec<&Credential> {
    let count = count.min(live.len()).max(1);
    let stride = live.len() / count;
    (0..count)
        .filter_map(|i| live.get(i * stride.max(1)))
        .collect()
}

/// A short description of the data set for the report.
pub fn describe(seeded: &Seeded) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{GATEWAYS} gateways, {SERVERS} servers ({EXPOSED_PER_GATEWAY} exposed per gateway), \
         {HOSTS} token-based hosts, {USERS} users, {TOKENS} connections, {TOKENS} API tokens \
         ({} revoked); seeded by SQL in {:.1} s",
        seeded.revoked, seeded.seconds
    );
    s
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
    fn spread_takes_an_even_stride_over_the_whole_list() {
        let live: Vec<Credential> = (0..100)
            .map(|i| Credential {
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
