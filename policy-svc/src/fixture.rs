//! Test fixtures: a seeded store, the service's state over it, and the check port over
//! both (for the unit tests of its two wires, `/v1/check` and `/v1/ext_authz`).

use axum::Router;
use mcpguard_core::oauth::AccessClaims;
use mcpguard_core::token::{TokenHash, TokenKind, format_token};

use crate::AppState;
use crate::store::{self, Db, check::Reads};

pub struct Fixture {
    pub app: Router,
    pub db: Db,
    pub token: String,
    pub token_id: i64,
    pub dir: tempfile::TempDir,
    pub secrets: std::sync::Arc<crate::secrets::SecretBox>,
    pub verifier: std::sync::Arc<crate::keys::Verifier>,
}

/// The grant of the fixture's OAuth client on connection 1.
pub const GRANT: i64 = 5;

impl Fixture {
    /// An access token signed with the store's active key, as the token endpoint
    /// signs one: for `/mcp/eng/demo` on `gw.local:10000`, grant [`GRANT`].
    pub async fn access_token(&self, edit: impl FnOnce(&mut AccessClaims)) -> String {
        let now = store::now_ms() / 1000;
        let mut claims = AccessClaims {
            iss: crate::routes::oauth::OauthConfig::for_tests().issuer,
            aud: "http://gw.local:10000/mcp/eng/demo".into(),
            sub: "1".into(),
            exp: now + 300,
            iat: now,
            jti: "j1".into(),
            client_id: "c".into(),
            gid: GRANT,
            cid: 1,
        };
        edit(&mut claims);
        crate::keys::Signer::default()
            .sign(&self.db, &self.secrets, &claims)
            .await
            .unwrap()
    }
}

/// A store with gateway `eng` exposing server `demo` (shared) and one token for it;
/// checks read it as they do when shipped (on SQLite, not through the pool).
pub async fn fixture() -> Fixture {
    fixture_reading(|db, url| Reads::for_store(db, url, std::time::Duration::from_secs(1))).await
}

pub async fn fixture_reading(reads: impl FnOnce(&Db, &str) -> Reads) -> Fixture {
    let Seeded { state, token, dir } = seeded(reads).await;
    Fixture {
        db: state.db.clone(),
        secrets: state.secrets.clone(),
        verifier: state.verifier.clone(),
        app: crate::routes::check(state),
        token,
        token_id: 7,
        dir,
    }
}

/// The seeded store of [`fixture`], and the service's state over it.
pub struct Seeded {
    pub state: AppState,
    /// The live API token (id 7) of connection 1.
    pub token: String,
    pub dir: tempfile::TempDir,
}

/// Gateway `eng` (id 1) exposing server `demo` (id 1, shared); user 1 `owner` with role
/// `owner`; token-based host 1 `Bot` with connection 1 and API token 7; OAuth client `c`
/// with grant [`GRANT`] on connection 1; the OAuth signing keys. The gateway is
/// granted to `everyone`.
pub async fn seeded(reads: impl FnOnce(&Db, &str) -> Reads) -> Seeded {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let db = store::open(&url, 2).await.unwrap();
    let now = store::now_ms();
    for sql in [
        "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', $1)",
        "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'owner', 1, 1, $1)",
        "INSERT INTO gateways (id, name, slug, enabled, created_at) VALUES (1, 'Eng', 'eng', 1, $1)",
        "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)
         VALUES (1, 'Demo', 'demo', 'http', '127.0.0.1:9100', '/mcp', 1, $1)",
        "INSERT INTO exposures (gateway_id, server_id, identity, created_at) VALUES (1, 1, 'shared', $1)",
        "INSERT INTO gateway_grants (gateway_id, team_id, created_at) SELECT 1, id, $1 FROM teams WHERE everyone = 1",
        "INSERT INTO hosts (id, name, kind, enabled, created_at) VALUES (1, 'Bot', 'token', 1, $1)",
        "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at) VALUES (1, 1, 1, 1, 1, $1)",
        "INSERT INTO oauth_clients (id, client_id, client_name, redirect_uris, host_id, created_at) VALUES (1, 'c', 'App', '[]', 1, $1)",
        "INSERT INTO oauth_grants (id, client_id, user_id, connection_id, resource, created_at) VALUES (5, 1, 1, 1, 'http://gw.local:10000/mcp/eng/demo', $1)",
    ] {
        sqlx::query(sql).bind(now).execute(&db).await.unwrap();
    }
    let token = format_token(TokenKind::HostApi, &"k".repeat(40)).unwrap();
    sqlx::query(
        "INSERT INTO api_tokens (id, connection_id, token_hash, prefix, created_by, created_at)
         VALUES (7, 1, $1, 'mcpgt_kkkkkkkk', 1, $2)",
    )
    .bind(TokenHash::of(&token).to_hex())
    .bind(now)
    .execute(&db)
    .await
    .unwrap();
    let secrets =
        crate::secrets::SecretBox::load_or_create(&dir.path().join("secrets.key")).unwrap();
    store::oauth::ensure_keys(&db, &mut || crate::keys::generate(&secrets))
        .await
        .unwrap();
    let check_reads = reads(&db, &url);
    Seeded {
        state: state(db, check_reads, secrets),
        token,
        dir,
    }
}

/// The service's state over `db` as `run()` builds it, with test settings: the one
/// place tests make an [`AppState`]. Its background writers (last used, audit) run
/// until every clone of the state is dropped.
pub fn state(db: Db, check_reads: Reads, secrets: crate::secrets::SecretBox) -> AppState {
    let (last_used, _) = crate::LastUsed::spawn(db.clone());
    let (audit, _) = crate::audit::Audit::spawn(db.clone(), 0);
    AppState {
        check_reads,
        db,
        last_used,
        audit,
        audit_retention_days: 0,
        secrets: std::sync::Arc::new(secrets),
        oauth: std::sync::Arc::new(crate::oauth_config::OauthConfig::for_tests()),
        signer: std::sync::Arc::default(),
        verifier: std::sync::Arc::default(),
        upstreams: std::sync::Arc::default(),
        passwords: std::sync::Arc::new(crate::signin::Passwords::new(1)),
        outbound: crate::outbound::Outbound::default(),
    }
}

/// The decision entries in the audit log, oldest first, as rows of `columns`: once
/// there are at least `n` (the writer flushes in batches), or what there is after 10 s.
pub async fn decisions<R>(db: &Db, columns: &str, n: usize) -> Vec<R>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
{
    let sql = format!("SELECT {columns} FROM audit_events WHERE kind = 'decision' ORDER BY id");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // `columns` is a literal of the calling test.
        let rows: Vec<R> = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
            .fetch_all(db)
            .await
            .unwrap();
        if rows.len() >= n || std::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
