//! Identities by OAuth (issue 24): the OAuth-protected servers and our client at
//! their authorization server, the "Connect" flows in flight, and the tokens kept as
//! identities, with the refresh lease that lets one replica at a time refresh one.
//! Sealed values go in and out as bytes; nothing here opens them.

use serde::Serialize;

use super::{Db, DbBool, Result, now_ms};
use crate::timefmt;

/// An OAuth-protected server's authorization server and our client there.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ServerOauth {
    pub server_id: i64,
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub revocation_endpoint: Option<String>,
    pub resource: String,
    pub scope: Option<String>,
    pub client_id: String,
    /// Never returned; the API says whether there is one.
    #[serde(skip)]
    pub client_secret_sealed: Option<Vec<u8>>,
    /// Registered dynamically (RFC 7591), or entered by an admin.
    pub registered: DbBool,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
}

/// The columns of [`ServerOauth`]: a macro, so that each statement stays one `&'static str`.
macro_rules! server_oauth_columns {
    () => {
        "server_id, issuer, authorization_endpoint, token_endpoint, revocation_endpoint, resource, scope, client_id, client_secret_sealed, registered, created_at"
    };
}

pub async fn put_server_oauth(db: &Db, o: &ServerOauth) -> Result<ServerOauth> {
    Ok(sqlx::query_as(concat!(
        "INSERT INTO server_oauth (",
        server_oauth_columns!(),
        ")
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (server_id) DO UPDATE SET issuer = excluded.issuer,
           authorization_endpoint = excluded.authorization_endpoint,
           token_endpoint = excluded.token_endpoint,
           revocation_endpoint = excluded.revocation_endpoint, resource = excluded.resource,
           scope = excluded.scope, client_id = excluded.client_id,
           client_secret_sealed = excluded.client_secret_sealed, registered = excluded.registered
         RETURNING ",
        server_oauth_columns!()
    ))
    .bind(o.server_id)
    .bind(&o.issuer)
    .bind(&o.authorization_endpoint)
    .bind(&o.token_endpoint)
    .bind(&o.revocation_endpoint)
    .bind(&o.resource)
    .bind(&o.scope)
    .bind(&o.client_id)
    .bind(&o.client_secret_sealed)
    .bind(o.registered.0)
    .bind(o.created_at)
    .fetch_one(db)
    .await?)
}

pub async fn server_oauth(db: &Db, server_id: i64) -> Result<Option<ServerOauth>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        server_oauth_columns!(),
        " FROM server_oauth WHERE server_id = $1"
    ))
    .bind(server_id)
    .fetch_optional(db)
    .await?)
}

/// Unsets a server's OAuth protection; its identities keep their last tokens (they
/// are not refreshed any more). Whether there was any.
/// The OAuth-protected servers' ids, in order.
pub async fn oauth_server_ids(db: &Db) -> Result<Vec<i64>> {
    Ok(
        sqlx::query_scalar("SELECT server_id FROM server_oauth ORDER BY server_id")
            .fetch_all(db)
            .await?,
    )
}

pub async fn delete_server_oauth(db: &Db, server_id: i64) -> Result<bool> {
    Ok(sqlx::query("DELETE FROM server_oauth WHERE server_id = $1")
        .bind(server_id)
        .execute(db)
        .await?
        .rows_affected()
        > 0)
}

/// A "Connect" in flight.
#[derive(Debug, sqlx::FromRow)]
pub struct ConnectState {
    pub session_hash: String,
    pub user_id: i64,
    pub server_id: i64,
    pub verifier_sealed: Vec<u8>,
    pub return_to: String,
    pub expires_at: i64,
    /// An admin who started it for the user; `None`: the user themself.
    pub started_by: Option<i64>,
}

pub struct NewConnectState<'a> {
    pub state_hash: &'a str,
    pub session_hash: &'a str,
    pub user_id: i64,
    pub server_id: i64,
    pub verifier_sealed: &'a [u8],
    pub return_to: &'a str,
    pub ttl_ms: i64,
    pub started_by: Option<i64>,
}

pub async fn insert_connect_state(db: &Db, s: &NewConnectState<'_>) -> Result<()> {
    let now = now_ms();
    // Abandoned flows do not pile up: each new one clears the expired.
    sqlx::query("DELETE FROM oauth_connect_states WHERE expires_at < $1")
        .bind(now)
        .execute(db)
        .await?;
    sqlx::query(
        "INSERT INTO oauth_connect_states (state_hash, session_hash, user_id, server_id, verifier_sealed, return_to, created_at, expires_at, started_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(s.state_hash)
    .bind(s.session_hash)
    .bind(s.user_id)
    .bind(s.server_id)
    .bind(s.verifier_sealed)
    .bind(s.return_to)
    .bind(now)
    .bind(now + s.ttl_ms)
    .bind(s.started_by)
    .execute(db)
    .await?;
    Ok(())
}

/// Takes (deletes and returns) the flow a `state` names: a state works once, whatever
/// becomes of it.
pub async fn take_connect_state(db: &Db, state_hash: &str) -> Result<Option<ConnectState>> {
    Ok(sqlx::query_as(
        "DELETE FROM oauth_connect_states WHERE state_hash = $1
         RETURNING session_hash, user_id, server_id, verifier_sealed, return_to, expires_at, started_by",
    )
    .bind(state_hash)
    .fetch_optional(db)
    .await?)
}

/// Tokens to keep, sealed.
pub struct SealedTokens<'a> {
    /// The access token as its header value (`Bearer …`).
    pub access: &'a [u8],
    pub refresh: Option<&'a [u8]>,
    pub expires_at: i64,
    pub refresh_at: i64,
}

/// Saves a user's connected account as their identity for the server (or replaces
/// the one they had, keeping its enabled state as [`super::identities::put`] does).
/// Returns the identity's id.
pub async fn put_connected(
    db: &Db,
    user_id: i64,
    server_id: i64,
    t: &SealedTokens<'_>,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO identities (user_id, server_id, header_name, sealed, enabled, created_at,
            oauth_status, oauth_refresh_sealed, oauth_expires_at, oauth_refresh_at)
         VALUES ($1, $2, 'authorization', $3, $4, $5, 'connected', $6, $7, $8)
         ON CONFLICT (user_id, server_id) DO UPDATE SET header_name = excluded.header_name,
           sealed = excluded.sealed, oauth_status = excluded.oauth_status,
           oauth_refresh_sealed = excluded.oauth_refresh_sealed,
           oauth_expires_at = excluded.oauth_expires_at, oauth_refresh_at = excluded.oauth_refresh_at,
           refresh_lease_until = NULL
         RETURNING id",
    )
    .bind(user_id)
    .bind(server_id)
    .bind(t.access)
    .bind(true)
    .bind(now_ms())
    .bind(t.refresh)
    .bind(t.expires_at)
    .bind(t.refresh_at)
    .fetch_one(db)
    .await?)
}

/// What a refresh needs of an identity: whose it is, its sealed refresh token, and
/// the server's client.
#[derive(Debug, sqlx::FromRow)]
pub struct Refreshable {
    pub user_id: i64,
    pub server_id: i64,
    pub refresh_sealed: Option<Vec<u8>>,
    pub token_endpoint: String,
    pub resource: String,
    pub client_id: String,
    pub client_secret_sealed: Option<Vec<u8>>,
}

/// Takes the identity's refresh lease until `until`, if its refresh is still due
/// (`refresh_at` as the caller read it) and no other replica holds a live lease: a
/// conditional UPDATE, atomic on SQLite and PostgreSQL alike. Whether it was taken.
pub async fn take_lease(
    db: &Db,
    identity_id: i64,
    seen_refresh_at: i64,
    now: i64,
    until: i64,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE identities SET refresh_lease_until = $1
         WHERE id = $2 AND oauth_status = 'connected' AND oauth_refresh_at = $3
           AND (refresh_lease_until IS NULL OR refresh_lease_until < $4)",
    )
    .bind(until)
    .bind(identity_id)
    .bind(seen_refresh_at)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

pub async fn refreshable(db: &Db, identity_id: i64) -> Result<Option<Refreshable>> {
    Ok(sqlx::query_as(
        "SELECT i.user_id, i.server_id, i.oauth_refresh_sealed AS refresh_sealed, o.token_endpoint,
                o.resource, o.client_id, o.client_secret_sealed
         FROM identities i JOIN server_oauth o ON o.server_id = i.server_id
         WHERE i.id = $1",
    )
    .bind(identity_id)
    .fetch_optional(db)
    .await?)
}

/// Stores refreshed tokens, if the lease taken until `lease` is still ours (a lease
/// that ran out and was taken by another replica loses: its tokens win). A refresh
/// token the server did not rotate is kept. Whether they were stored.
pub async fn finish_refresh(
    db: &Db,
    identity_id: i64,
    lease: i64,
    t: &SealedTokens<'_>,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE identities SET sealed = $1, oauth_refresh_sealed = COALESCE($2, oauth_refresh_sealed),
           oauth_expires_at = $3, oauth_refresh_at = $4, oauth_refreshed_at = $5,
           oauth_refreshes = oauth_refreshes + 1, refresh_lease_until = NULL
         WHERE id = $6 AND refresh_lease_until = $7",
    )
    .bind(t.access)
    .bind(t.refresh)
    .bind(t.expires_at)
    .bind(t.refresh_at)
    .bind(now_ms())
    .bind(identity_id)
    .bind(lease)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The authorization server refused the refresh: the identity needs the user to
/// connect again. Its tokens are dropped (the refresh token is dead; the access token
/// must not be sent on).
pub async fn mark_needs_reconnect(db: &Db, identity_id: i64, lease: i64) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE identities SET oauth_status = 'needs_reconnect', oauth_refresh_sealed = NULL,
           refresh_lease_until = NULL
         WHERE id = $1 AND refresh_lease_until = $2",
    )
    .bind(identity_id)
    .bind(lease)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Gives the lease back after a refresh that got no answer: the next request tries
/// again.
pub async fn release_lease(db: &Db, identity_id: i64, lease: i64) -> Result<()> {
    sqlx::query(
        "UPDATE identities SET refresh_lease_until = NULL WHERE id = $1 AND refresh_lease_until = $2",
    )
    .bind(identity_id)
    .bind(lease)
    .execute(db)
    .await?;
    Ok(())
}

/// What revocation on delete needs: the sealed refresh token and where to revoke it.
#[derive(Debug, sqlx::FromRow)]
pub struct Revocable {
    pub user_id: i64,
    pub server_id: i64,
    pub refresh_sealed: Vec<u8>,
    pub revocation_endpoint: String,
    pub client_id: String,
}

pub async fn revocable(db: &Db, identity_id: i64) -> Result<Option<Revocable>> {
    Ok(sqlx::query_as(
        "SELECT i.user_id, i.server_id, i.oauth_refresh_sealed AS refresh_sealed,
                o.revocation_endpoint, o.client_id
         FROM identities i JOIN server_oauth o ON o.server_id = i.server_id
         WHERE i.id = $1 AND i.oauth_refresh_sealed IS NOT NULL AND o.revocation_endpoint IS NOT NULL",
    )
    .bind(identity_id)
    .fetch_optional(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lease and the flows, on one store: a user, a server, its OAuth client, and
    /// the user's connected identity.
    async fn leases_and_flows(url: &str) {
        let db = crate::store::open(url, 2).await.unwrap();
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', 1)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'ada', 1, TRUE, 1)",
            "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)
             VALUES (2, 'Tracker', 'tracker', 'http', '127.0.0.1:9', '/mcp', TRUE, 1)",
        ] {
            sqlx::query(sql).execute(&db).await.unwrap();
        }
        let o = ServerOauth {
            server_id: 2,
            issuer: "http://as".into(),
            authorization_endpoint: "http://as/a".into(),
            token_endpoint: "http://as/t".into(),
            revocation_endpoint: None,
            resource: "http://127.0.0.1:9/mcp".into(),
            scope: None,
            client_id: "c".into(),
            client_secret_sealed: Some(vec![7]),
            registered: DbBool(true),
            created_at: 1,
        };
        assert_eq!(put_server_oauth(&db, &o).await.unwrap().client_id, "c");
        let tokens = |access: &'static [u8], at| SealedTokens {
            access,
            refresh: Some(b"r1"),
            expires_at: at + 100,
            refresh_at: at,
        };
        let id = put_connected(&db, 1, 2, &tokens(b"a1", 1_000))
            .await
            .unwrap();

        // One holder at a time; a stale reading of the refresh time takes nothing.
        assert!(take_lease(&db, id, 1_000, 1_000, 5_000).await.unwrap());
        assert!(!take_lease(&db, id, 1_000, 1_001, 5_001).await.unwrap());
        assert!(!take_lease(&db, id, 999, 1_001, 5_001).await.unwrap());
        // Only the holder's lease stores its tokens.
        assert!(
            !finish_refresh(&db, id, 4_999, &tokens(b"x", 2_000))
                .await
                .unwrap()
        );
        assert!(
            finish_refresh(&db, id, 5_000, &tokens(b"a2", 2_000))
                .await
                .unwrap()
        );
        let (refreshes, refresh_at): (i64, i64) = sqlx::query_as(
            "SELECT oauth_refreshes, oauth_refresh_at FROM identities WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!((refreshes, refresh_at), (1, 2_000));
        // A lease that ran out (its holder died) is taken over.
        assert!(take_lease(&db, id, 2_000, 2_000, 3_000).await.unwrap());
        assert!(take_lease(&db, id, 2_000, 3_001, 9_000).await.unwrap());
        assert!(
            !mark_needs_reconnect(&db, id, 3_000).await.unwrap(),
            "not ours"
        );
        assert!(mark_needs_reconnect(&db, id, 9_000).await.unwrap());
        assert!(
            !take_lease(&db, id, 2_000, 9_001, 10_000).await.unwrap(),
            "nothing to refresh"
        );
        let r = refreshable(&db, id).await.unwrap().unwrap();
        assert_eq!((r.refresh_sealed, r.client_id.as_str()), (None, "c"));

        // A flow's state works once.
        let flow = NewConnectState {
            state_hash: "h",
            session_hash: "s",
            user_id: 1,
            server_id: 2,
            verifier_sealed: b"v",
            return_to: "/oauth/authorize?x",
            ttl_ms: 60_000,
            started_by: None,
        };
        insert_connect_state(&db, &flow).await.unwrap();
        let taken = take_connect_state(&db, "h").await.unwrap().unwrap();
        assert_eq!((taken.user_id, taken.session_hash.as_str()), (1, "s"));
        assert!(take_connect_state(&db, "h").await.unwrap().is_none());
        assert!(delete_server_oauth(&db, 2).await.unwrap());
        assert!(server_oauth(&db, 2).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn one_lease_holder_and_single_use_flows_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
        leases_and_flows(&url).await;
    }

    #[tokio::test]
    async fn one_lease_holder_and_single_use_flows_postgres() {
        let cluster = mcpguard_pgcluster::Cluster::start(&[("fsync", "off")]).unwrap();
        let url = cluster.create_database("o").unwrap();
        leases_and_flows(&url).await;
    }
}
