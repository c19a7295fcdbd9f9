//! Moves every stored sealed value (identities, exposures' shared credentials, OAuth
//! signing keys) to the current secrets key: the middle step of a key rotation
//! (`mcpguard-policy reseal`).

use anyhow::{Result, anyhow};

use super::{Db, begin_write};
use crate::oauth_identity::{client_secret_binding, refresh_binding};
use crate::secrets::{Opened, SecretBox, identity_binding, shared_binding, signing_key_binding};

/// What a re-seal did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Values that opened only under the previous key, now sealed under the current one.
    pub identities: usize,
    pub shared_credentials: usize,
    pub signing_keys: usize,
    /// OAuth identities' refresh tokens and OAuth clients' secrets (issue 24).
    pub oauth_secrets: usize,
    /// Values already under the current key, left as they were.
    pub already_current: usize,
    /// Values replaced meanwhile (so sealed under the current key).
    pub changed_meanwhile: usize,
}

/// Where a sealed value lives.
#[derive(Debug, Clone, Copy)]
enum Row {
    Identity { id: i64 },
    Shared { gateway: i64, server: i64 },
    SigningKey { id: i64 },
    IdentityRefresh { id: i64 },
    ClientSecret { server: i64 },
}

impl Row {
    fn describe(self) -> String {
        match self {
            Row::Identity { id } => format!("identity {id}"),
            Row::Shared { gateway, server } => {
                format!("the shared credential of gateway {gateway} server {server}")
            }
            Row::SigningKey { id } => format!("OAuth signing key {id}"),
            Row::IdentityRefresh { id } => format!("the refresh token of identity {id}"),
            Row::ClientSecret { server } => {
                format!("the OAuth client secret of server {server}")
            }
        }
    }
}

/// Re-seals every value that opens only under the previous key. All values are opened
/// first: if any opens under neither key, nothing is written and the error names it.
/// Each row is replaced only if it still holds the value read (compare and set), so a
/// value written meanwhile (sealed under the current key) is never overwritten.
pub async fn reseal_all(db: &Db, secrets: &SecretBox) -> Result<Resealed> {
    let identities: Vec<(i64, i64, i64, Vec<u8>)> =
        sqlx::query_as("SELECT id, user_id, server_id, sealed FROM identities ORDER BY id")
            .fetch_all(db)
            .await?;
    let shared: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT gateway_id, server_id, credential_sealed FROM exposures
         WHERE credential_sealed IS NOT NULL ORDER BY gateway_id, server_id",
    )
    .fetch_all(db)
    .await?;
    let keys: Vec<(i64, String, Vec<u8>)> =
        sqlx::query_as("SELECT id, kid, sealed_private FROM oauth_signing_keys ORDER BY id")
            .fetch_all(db)
            .await?;
    let refresh: Vec<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT id, user_id, server_id, oauth_refresh_sealed FROM identities
         WHERE oauth_refresh_sealed IS NOT NULL ORDER BY id",
    )
    .fetch_all(db)
    .await?;
    let client_secrets: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT server_id, client_secret_sealed FROM server_oauth
         WHERE client_secret_sealed IS NOT NULL ORDER BY server_id",
    )
    .fetch_all(db)
    .await?;
    let stored =
        identities
            .into_iter()
            .map(|(id, user, server, sealed)| {
                (Row::Identity { id }, identity_binding(user, server), sealed)
            })
            .chain(shared.into_iter().map(|(gateway, server, sealed)| {
                let bound_to = shared_binding(gateway, server);
                (Row::Shared { gateway, server }, bound_to, sealed)
            }))
            .chain(keys.into_iter().map(|(id, kid, sealed)| {
                (Row::SigningKey { id }, signing_key_binding(&kid), sealed)
            }))
            .chain(refresh.into_iter().map(|(id, user, server, sealed)| {
                (
                    Row::IdentityRefresh { id },
                    refresh_binding(user, server),
                    sealed,
                )
            }))
            .chain(client_secrets.into_iter().map(|(server, sealed)| {
                (
                    Row::ClientSecret { server },
                    client_secret_binding(server),
                    sealed,
                )
            }));

    let mut done = Resealed::default();
    let mut to_write = Vec::new();
    for (row, bound_to, sealed) in stored {
        match secrets.open_which(&sealed, &bound_to) {
            Some(Opened::Current(_)) => done.already_current += 1,
            Some(Opened::Previous(plain)) => {
                let resealed = secrets
                    .seal(&plain, &bound_to)
                    .map_err(|e| anyhow!("sealing: {e}"))?;
                to_write.push((row, sealed, resealed));
            }
            None => {
                return Err(anyhow!(
                    "{} opens under neither the current nor the previous key; nothing was \
                     changed (is --previous-secrets-key-file the key these were sealed with?)",
                    row.describe()
                ));
            }
        }
    }

    let mut tx = begin_write(db).await?;
    for (row, old, resealed) in to_write {
        let query = match row {
            Row::Identity { id } => {
                sqlx::query("UPDATE identities SET sealed = $1 WHERE id = $2 AND sealed = $3")
                    .bind(resealed)
                    .bind(id)
                    .bind(old)
            }
            Row::Shared { gateway, server } => sqlx::query(
                "UPDATE exposures SET credential_sealed = $1
                 WHERE gateway_id = $2 AND server_id = $3 AND credential_sealed = $4",
            )
            .bind(resealed)
            .bind(gateway)
            .bind(server)
            .bind(old),
            Row::SigningKey { id } => sqlx::query(
                "UPDATE oauth_signing_keys SET sealed_private = $1
                 WHERE id = $2 AND sealed_private = $3",
            )
            .bind(resealed)
            .bind(id)
            .bind(old),
            Row::IdentityRefresh { id } => sqlx::query(
                "UPDATE identities SET oauth_refresh_sealed = $1
                 WHERE id = $2 AND oauth_refresh_sealed = $3",
            )
            .bind(resealed)
            .bind(id)
            .bind(old),
            Row::ClientSecret { server } => sqlx::query(
                "UPDATE server_oauth SET client_secret_sealed = $1
                 WHERE server_id = $2 AND client_secret_sealed = $3",
            )
            .bind(resealed)
            .bind(server)
            .bind(old),
        };
        let written = query.execute(&mut *tx).await?;
        match (written.rows_affected(), row) {
            (0, _) => done.changed_meanwhile += 1,
            (_, Row::Identity { .. }) => done.identities += 1,
            (_, Row::Shared { .. }) => done.shared_credentials += 1,
            (_, Row::SigningKey { .. }) => done.signing_keys += 1,
            (_, Row::IdentityRefresh { .. } | Row::ClientSecret { .. }) => {
                done.oauth_secrets += 1;
            }
        }
    }
    tx.commit().await?;
    Ok(done)
}
