//! The OAuth authorization server's state: signing keys, registered clients, browser
//! sessions, authorization codes, grants (refresh-token families) and refresh tokens.
//! Codes, refresh tokens and session tokens are looked up by their SHA-256 only.

use serde::Serialize;

use super::{Db, Result, begin_write, now_ms};
use crate::timefmt;

// ---- signing keys ----

/// A freshly generated key, ready to store.
pub struct NewKey {
    pub kid: String,
    pub public_x: String,
    pub sealed_private: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub kid: String,
    #[serde(skip)]
    pub public_x: String,
    /// `next` (published, not signing yet), `active` (signing) or `retired`.
    pub state: String,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub activated_at: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub retired_at: Option<i64>,
}

async fn insert_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key: &NewKey,
    state: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO oauth_signing_keys (kid, public_x, sealed_private, state, created_at, activated_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&key.kid)
    .bind(&key.public_x)
    .bind(&key.sealed_private)
    .bind(state)
    .bind(now)
    .bind((state == "active").then_some(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Makes sure there is an active and a next key (first start, or a database from
/// before OAuth). Replicas starting together serialise on the write transaction.
pub async fn ensure_keys(db: &Db, generate: &mut impl FnMut() -> Result<NewKey>) -> Result<()> {
    let mut tx = begin_write(db).await?;
    lock_keys(&mut tx).await?;
    for state in ["active", "next"] {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM oauth_signing_keys WHERE state = $1")
            .bind(state)
            .fetch_one(&mut *tx)
            .await?;
        if n == 0 {
            insert_key(&mut tx, &generate()?, state, now_ms()).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// PostgreSQL: serialise key changes between replicas (SQLite's `BEGIN IMMEDIATE`
/// already does). The lock lasts until the transaction ends.
async fn lock_keys(tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> Result<()> {
    if tx.backend_name() == "PostgreSQL" {
        sqlx::query("LOCK TABLE oauth_signing_keys IN EXCLUSIVE MODE")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Rotation: the active key retires, the next one (published since the last rotation)
/// starts signing, and a new next key is published.
pub async fn rotate_keys(db: &Db, new_next: NewKey) -> Result<()> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    lock_keys(&mut tx).await?;
    sqlx::query(
        "UPDATE oauth_signing_keys SET state = 'retired', retired_at = $1 WHERE state = 'active'",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE oauth_signing_keys SET state = 'active', activated_at = $1 WHERE state = 'next'",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    insert_key(&mut tx, &new_next, "next", now).await?;
    tx.commit().await?;
    Ok(())
}

/// The key that signs now: kid and sealed private half.
pub async fn active_key(db: &Db) -> Result<Option<(String, Vec<u8>)>> {
    Ok(sqlx::query_as(
        "SELECT kid, sealed_private FROM oauth_signing_keys WHERE state = 'active' ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(db)
    .await?)
}

/// Every key a verifier must know: next, active, and retired ones that may still have
/// live tokens (retired less than `max_token_age_ms` ago).
pub async fn published_keys(db: &Db, max_token_age_ms: i64) -> Result<Vec<KeyInfo>> {
    Ok(sqlx::query_as(
        "SELECT kid, public_x, state, created_at, activated_at, retired_at FROM oauth_signing_keys
         WHERE state <> 'retired' OR retired_at > $1 ORDER BY id",
    )
    .bind(now_ms() - max_token_age_ms)
    .fetch_all(db)
    .await?)
}

pub async fn list_keys(db: &Db) -> Result<Vec<KeyInfo>> {
    Ok(sqlx::query_as(
        "SELECT kid, public_x, state, created_at, activated_at, retired_at FROM oauth_signing_keys ORDER BY id",
    )
    .fetch_all(db)
    .await?)
}

// ---- clients ----

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Client {
    pub id: i64,
    pub client_id: String,
    pub client_name: String,
    /// JSON array of strings.
    pub redirect_uris: String,
    pub host_id: Option<i64>,
    pub created_at: i64,
}

impl Client {
    pub fn redirect_uris(&self) -> Vec<String> {
        serde_json::from_str(&self.redirect_uris).unwrap_or_default()
    }
}

pub async fn insert_client(
    db: &Db,
    client_id: &str,
    client_name: &str,
    redirect_uris: &[String],
) -> Result<Client> {
    let uris = serde_json::to_string(redirect_uris).unwrap_or_else(|_| "[]".into());
    Ok(sqlx::query_as(
        "INSERT INTO oauth_clients (client_id, client_name, redirect_uris, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id, client_id, client_name, redirect_uris, host_id, created_at",
    )
    .bind(client_id)
    .bind(client_name)
    .bind(uris)
    .bind(now_ms())
    .fetch_one(db)
    .await?)
}

pub async fn get_client(db: &Db, client_id: &str) -> Result<Option<Client>> {
    Ok(sqlx::query_as(
        "SELECT id, client_id, client_name, redirect_uris, host_id, created_at FROM oauth_clients WHERE client_id = $1",
    )
    .bind(client_id)
    .fetch_optional(db)
    .await?)
}

/// The client's headed host, settled on its first authorization (by `user_id`). A
/// headed host is an app as its users run it: when this user already reaches a headed
/// host of the same name (the same app registered again, which dynamic registration
/// makes a new client), the client joins that host, so what an admin disabled (the
/// host, or the user's connection through it) stays disabled; a disabled one is chosen
/// first. Otherwise a new host, named after the client. Concurrent first
/// authorizations end with one host.
///
/// A new host starts `pending` (waiting for an admin's approval) when
/// `pending_if_new`: the gateway of this first authorization approves hosts.
pub async fn host_for_client(
    db: &Db,
    client: &Client,
    user_id: i64,
    pending_if_new: bool,
) -> Result<i64> {
    if let Some(id) = client.host_id {
        return Ok(id);
    }
    let mut tx = begin_write(db).await?;
    // No-op writes take the row locks on PostgreSQL (SQLite holds the database lock):
    // a concurrent first authorization of this client, or of another client of this
    // user, waits here and then sees our host.
    sqlx::query("UPDATE oauth_clients SET host_id = host_id WHERE id = $1")
        .bind(client.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE users SET id = id WHERE id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    let current: Option<i64> =
        sqlx::query_scalar("SELECT host_id FROM oauth_clients WHERE id = $1")
            .bind(client.id)
            .fetch_one(&mut *tx)
            .await?;
    if let Some(id) = current {
        return Ok(id);
    }
    let known: Option<i64> = sqlx::query_scalar(
        "SELECT h.id FROM hosts h
         WHERE h.kind = 'oauth' AND h.name = $1
           AND EXISTS (SELECT 1 FROM connections c WHERE c.host_id = h.id AND c.user_id = $2)
         ORDER BY h.enabled, h.id DESC LIMIT 1",
    )
    .bind(&client.client_name)
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let host_id = match known {
        Some(id) => id,
        None => {
            sqlx::query_scalar(
                "INSERT INTO hosts (name, kind, enabled, created_at, pending) VALUES ($1, 'oauth', $2, $3, $4) RETURNING id",
            )
            .bind(&client.client_name)
            .bind(true)
            .bind(now_ms())
            .bind(pending_if_new)
            .fetch_one(&mut *tx)
            .await?
        }
    };
    sqlx::query("UPDATE oauth_clients SET host_id = $1 WHERE id = $2")
        .bind(host_id)
        .bind(client.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(host_id)
}

// ---- sign-in sessions ----

pub async fn insert_session(db: &Db, token_hash: &str, user_id: i64, ttl_ms: i64) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO oauth_sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(token_hash)
    .bind(user_id)
    .bind(now)
    .bind(now + ttl_ms)
    .execute(db)
    .await?;
    Ok(())
}

/// The user of a live session, if that user is still enabled.
pub async fn session_user(db: &Db, token_hash: &str) -> Result<Option<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.name FROM oauth_sessions s JOIN users u ON u.id = s.user_id
         WHERE s.token_hash = $1 AND s.expires_at > $2 AND u.enabled = $3",
    )
    .bind(token_hash)
    .bind(now_ms())
    .bind(true)
    .fetch_optional(db)
    .await?)
}

// ---- codes, grants, refresh tokens ----

pub struct NewCode<'a> {
    pub code_hash: &'a str,
    pub client_id: i64,
    pub user_id: i64,
    pub connection_id: i64,
    pub redirect_uri: &'a str,
    pub code_challenge: &'a str,
    pub resource: &'a str,
    pub scope: Option<&'a str>,
    pub ttl_ms: i64,
}

pub async fn insert_code(db: &Db, c: &NewCode<'_>) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, client_id, user_id, connection_id, redirect_uri,
            code_challenge, resource, scope, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(c.code_hash)
    .bind(c.client_id)
    .bind(c.user_id)
    .bind(c.connection_id)
    .bind(c.redirect_uri)
    .bind(c.code_challenge)
    .bind(c.resource)
    .bind(c.scope)
    .bind(now)
    .bind(now + c.ttl_ms)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Code {
    pub id: i64,
    pub code_hash: String,
    pub client_id: String,
    pub user_id: i64,
    pub connection_id: i64,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub resource: String,
    pub scope: Option<String>,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub grant_id: Option<i64>,
}

pub async fn get_code(db: &Db, code_hash: &str) -> Result<Option<Code>> {
    Ok(sqlx::query_as(
        "SELECT k.id, k.code_hash, c.client_id, k.user_id, k.connection_id, k.redirect_uri,
                k.code_challenge, k.resource, k.scope, k.expires_at, k.used_at, k.grant_id
         FROM oauth_codes k JOIN oauth_clients c ON c.id = k.client_id WHERE k.code_hash = $1",
    )
    .bind(code_hash)
    .fetch_optional(db)
    .await?)
}

/// What a successful exchange or refresh created.
pub struct Issued {
    pub grant_id: i64,
    pub refresh_token_id: i64,
}

/// Exchanges a code: marks it used, creates its grant and first refresh token, in one
/// transaction. `None` if the code was used in the meantime (the caller treats that as
/// reuse).
pub async fn exchange_code(
    db: &Db,
    code: &Code,
    refresh_hash: &str,
    refresh_ttl_ms: i64,
) -> Result<Option<Issued>> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let used = sqlx::query("UPDATE oauth_codes SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
        .bind(now)
        .bind(code.id)
        .execute(&mut *tx)
        .await?;
    if used.rows_affected() != 1 {
        return Ok(None);
    }
    let grant_id: i64 = sqlx::query_scalar(
        "INSERT INTO oauth_grants (client_id, user_id, connection_id, resource, scope, created_at)
         SELECT client_id, user_id, connection_id, resource, scope, $1 FROM oauth_codes WHERE id = $2
         RETURNING id",
    )
    .bind(now)
    .bind(code.id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE oauth_codes SET grant_id = $1 WHERE id = $2")
        .bind(grant_id)
        .bind(code.id)
        .execute(&mut *tx)
        .await?;
    let refresh_token_id =
        insert_refresh(&mut tx, grant_id, refresh_hash, now, refresh_ttl_ms).await?;
    tx.commit().await?;
    Ok(Some(Issued {
        grant_id,
        refresh_token_id,
    }))
}

async fn insert_refresh(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    grant_id: i64,
    hash: &str,
    now: i64,
    ttl_ms: i64,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO oauth_refresh_tokens (grant_id, token_hash, created_at, expires_at)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(grant_id)
    .bind(hash)
    .bind(now)
    .bind(now + ttl_ms)
    .fetch_one(&mut **tx)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Refresh {
    pub id: i64,
    pub token_hash: String,
    pub grant_id: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub client_id: String,
    pub user_id: i64,
    pub connection_id: i64,
    pub resource: String,
    pub scope: Option<String>,
    pub grant_revoked_at: Option<i64>,
}

pub async fn get_refresh(db: &Db, token_hash: &str) -> Result<Option<Refresh>> {
    Ok(sqlx::query_as(
        "SELECT r.id, r.token_hash, r.grant_id, r.expires_at, r.used_at, c.client_id, g.user_id,
                g.connection_id, g.resource, g.scope, g.revoked_at AS grant_revoked_at
         FROM oauth_refresh_tokens r
         JOIN oauth_grants g ON g.id = r.grant_id
         JOIN oauth_clients c ON c.id = g.client_id
         WHERE r.token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?)
}

/// Rotates a refresh token: marks it used and issues its successor in the same family.
/// `None` if it was used in the meantime (reuse: the caller revokes the family).
pub async fn rotate_refresh(
    db: &Db,
    old: &Refresh,
    new_hash: &str,
    ttl_ms: i64,
) -> Result<Option<Issued>> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let used = sqlx::query(
        "UPDATE oauth_refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL",
    )
    .bind(now)
    .bind(old.id)
    .execute(&mut *tx)
    .await?;
    if used.rows_affected() != 1 {
        return Ok(None);
    }
    let refresh_token_id = insert_refresh(&mut tx, old.grant_id, new_hash, now, ttl_ms).await?;
    tx.commit().await?;
    Ok(Some(Issued {
        grant_id: old.grant_id,
        refresh_token_id,
    }))
}

/// Revokes a grant: its refresh tokens stop at once, its access tokens at the next
/// request (the check reads `revoked_at`). Revoking twice keeps the first time.
pub async fn revoke_grant(db: &Db, grant_id: i64) -> Result<()> {
    sqlx::query("UPDATE oauth_grants SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
        .bind(now_ms())
        .bind(grant_id)
        .execute(db)
        .await?;
    Ok(())
}

/// The client that holds a grant (for revocation requests, which name their client).
pub async fn grant_client(db: &Db, grant_id: i64) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT c.client_id FROM oauth_grants g JOIN oauth_clients c ON c.id = g.client_id WHERE g.id = $1",
    )
    .bind(grant_id)
    .fetch_optional(db)
    .await?)
}

/// A resource's gateway, if the gateway exists and exposes the server: (gateway id,
/// gateway name).
pub async fn resource_target(
    db: &Db,
    gateway_slug: &str,
    server_slug: &str,
) -> Result<Option<(i64, String)>> {
    // The gateway URL (no server): the gateway itself.
    if server_slug.is_empty() {
        return Ok(
            sqlx::query_as("SELECT g.id, g.name FROM gateways g WHERE g.slug = $1")
                .bind(gateway_slug)
                .fetch_optional(db)
                .await?,
        );
    }
    Ok(sqlx::query_as(
        "SELECT g.id, g.name FROM gateways g
         JOIN exposures e ON e.gateway_id = g.id
         JOIN servers s ON s.id = e.server_id
         WHERE g.slug = $1 AND s.slug = $2",
    )
    .bind(gateway_slug)
    .bind(server_slug)
    .fetch_optional(db)
    .await?)
}

/// Deletes what can no longer be used: expired sessions and refresh tokens, codes a
/// day past their expiry (kept that long so a late replay still revokes its grant), and
/// sign-in throttle records that no longer hold anything back. Grants stay, for the record. Returns the number of rows deleted.
pub async fn purge_expired(db: &Db, now: i64) -> Result<u64> {
    let mut deleted = 0;
    for (sql, cutoff) in [
        ("DELETE FROM oauth_sessions WHERE expires_at < $1", now),
        (
            "DELETE FROM oauth_refresh_tokens WHERE expires_at < $1",
            now,
        ),
        (
            "DELETE FROM oauth_codes WHERE expires_at < $1",
            now - 86_400_000,
        ),
    ] {
        deleted += sqlx::query(sql)
            .bind(cutoff)
            .execute(db)
            .await?
            .rows_affected();
    }
    deleted += super::signin::purge(db, now).await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DbBool;

    async fn db() -> (Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (
            super::super::open_sqlite_file(&dir.path().join("t.db")).await,
            dir,
        )
    }

    fn key(kid: &str) -> Result<NewKey> {
        Ok(NewKey {
            kid: kid.into(),
            public_x: format!("x-{kid}"),
            sealed_private: vec![1, 2, 3],
        })
    }

    fn states(keys: &[KeyInfo]) -> Vec<(&str, &str)> {
        keys.iter()
            .map(|k| (k.kid.as_str(), k.state.as_str()))
            .collect()
    }

    #[tokio::test]
    async fn keys_rotate_next_to_active_and_retired_ones_stay_published_for_a_while() {
        let (db, _dir) = db().await;
        let mut n = 0;
        let mut generate = || {
            n += 1;
            key(&format!("k{n}"))
        };
        ensure_keys(&db, &mut generate).await.unwrap();
        ensure_keys(&db, &mut generate).await.unwrap();
        assert_eq!(
            states(&list_keys(&db).await.unwrap()),
            [("k1", "active"), ("k2", "next")]
        );
        assert_eq!(active_key(&db).await.unwrap().unwrap().0, "k1");
        rotate_keys(&db, key("k3").unwrap()).await.unwrap();
        assert_eq!(
            states(&list_keys(&db).await.unwrap()),
            [("k1", "retired"), ("k2", "active"), ("k3", "next")]
        );
        assert_eq!(active_key(&db).await.unwrap().unwrap().0, "k2");
        assert_eq!(published_keys(&db, 60_000).await.unwrap().len(), 3);
        // Once its tokens can no longer be alive, a retired key is no longer published.
        assert_eq!(
            states(&published_keys(&db, -1).await.unwrap()),
            [("k2", "active"), ("k3", "next")]
        );
    }

    /// Two users (1, 2), a gateway (1), a headed host (1, "App") that user 1 reaches.
    async fn people_and_a_headed_host(db: &Db) {
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'r', 0)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'u', 1, 1, 0)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (2, 'v', 1, 1, 0)",
            "INSERT INTO gateways (id, name, slug, enabled, created_at) VALUES (1, 'g', 'g', 1, 0)",
            "INSERT INTO hosts (id, name, kind, enabled, created_at) VALUES (1, 'App', 'oauth', 1, 0)",
            "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at)
             VALUES (1, 1, 1, 1, 1, 0)",
        ] {
            sqlx::query(sql).execute(db).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_password_change_ends_the_users_sessions_grants_and_pending_codes() {
        let (db, _dir) = db().await;
        people_and_a_headed_host(&db).await;
        let client = insert_client(&db, "c1", "App", &["http://127.0.0.1/cb".into()])
            .await
            .unwrap();
        for user in [1, 2] {
            insert_session(&db, &format!("s{user}"), user, 60_000)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO oauth_grants (client_id, user_id, connection_id, resource, created_at)
                 VALUES ($1, $2, 1, 'r', 0)",
            )
            .bind(client.id)
            .bind(user)
            .execute(&db)
            .await
            .unwrap();
        }
        insert_code(
            &db,
            &NewCode {
                code_hash: "k1",
                client_id: client.id,
                user_id: 1,
                connection_id: 1,
                redirect_uri: "http://127.0.0.1/cb",
                code_challenge: "x",
                resource: "r",
                scope: None,
                ttl_ms: 60_000,
            },
        )
        .await
        .unwrap();
        assert!(
            crate::store::signin::set_password(&db, 1, "$argon2id$new")
                .await
                .unwrap()
        );
        assert!(session_user(&db, "s1").await.unwrap().is_none());
        assert!(
            session_user(&db, "s2").await.unwrap().is_some(),
            "others keep theirs"
        );
        let revoked: Vec<(i64, Option<i64>)> =
            sqlx::query_as("SELECT user_id, revoked_at FROM oauth_grants ORDER BY user_id")
                .fetch_all(&db)
                .await
                .unwrap();
        assert!(
            revoked[0].1.is_some() && revoked[1].1.is_none(),
            "{revoked:?}"
        );
        assert!(
            get_code(&db, "k1")
                .await
                .unwrap()
                .unwrap()
                .used_at
                .is_some()
        );
        assert!(
            !crate::store::signin::set_password(&db, 99, "$argon2id$new")
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn a_new_client_of_an_app_the_user_already_runs_joins_its_host() {
        let (db, _dir) = db().await;
        people_and_a_headed_host(&db).await;
        sqlx::query("UPDATE hosts SET enabled = 0 WHERE id = 1")
            .execute(&db)
            .await
            .unwrap();
        let uris = ["http://127.0.0.1/cb".to_owned()];
        let again = insert_client(&db, "c2", "App", &uris).await.unwrap();
        assert_eq!(host_for_client(&db, &again, 1, false).await.unwrap(), 1);
        // Settled: the client keeps its host, whoever authorizes it next.
        let again = get_client(&db, "c2").await.unwrap().unwrap();
        assert_eq!(host_for_client(&db, &again, 2, false).await.unwrap(), 1);
        // Another name, or another user's first client of the same name: a new host.
        let other = insert_client(&db, "c3", "Other app", &uris).await.unwrap();
        assert_ne!(host_for_client(&db, &other, 1, false).await.unwrap(), 1);
        let theirs = insert_client(&db, "c4", "App", &uris).await.unwrap();
        let new_host = host_for_client(&db, &theirs, 2, false).await.unwrap();
        assert_ne!(new_host, 1);
        let enabled: DbBool = sqlx::query_scalar("SELECT enabled FROM hosts WHERE id = $1")
            .bind(new_host)
            .fetch_one(&db)
            .await
            .unwrap();
        assert!(enabled.0);
    }

    #[tokio::test]
    async fn expired_sessions_and_refresh_tokens_are_purged() {
        let (db, _dir) = db().await;
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'r', 0)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'u', 1, 1, 0)",
        ] {
            sqlx::query(sql).execute(&db).await.unwrap();
        }
        insert_session(&db, "live", 1, 60_000).await.unwrap();
        insert_session(&db, "dead", 1, -1).await.unwrap();
        assert_eq!(purge_expired(&db, now_ms()).await.unwrap(), 1);
        assert!(session_user(&db, "live").await.unwrap().is_some());
        assert!(session_user(&db, "dead").await.unwrap().is_none());
    }
}
