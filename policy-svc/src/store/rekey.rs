//! Moves every stored sealed value (identities, exposures' shared credentials) to the
//! current secrets key: the middle step of a key rotation (`mcpguard-policy reseal`).

use anyhow::{Result, anyhow};

use super::{Db, begin_write};
use crate::secrets::{Opened, SecretBox, identity_binding, shared_binding};

/// What a re-seal did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// Values that opened only under the previous key, now sealed under the current one.
    pub identities: usize,
    pub shared_credentials: usize,
    /// Values already under the current key, left as they were.
    pub already_current: usize,
    /// Values replaced by an admin while this ran (so sealed under the current key).
    pub changed_meanwhile: usize,
}

/// One stored value: its table, its row and what it is bound to.
struct Stored {
    identity: bool,
    /// `identities.id`, or the exposure's `(gateway_id, server_id)`.
    key: (i64, i64),
    bound_to: String,
    sealed: Vec<u8>,
}

/// Re-seals every value that opens only under the previous key. All values are opened
/// first: if any opens under neither key, nothing is written and the error names it.
/// Each row is replaced only if it still holds the value read (compare and set), so a
/// credential an admin saves meanwhile is never overwritten with the old one.
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
    let stored = identities
        .into_iter()
        .map(|(id, user, server, sealed)| Stored {
            identity: true,
            key: (id, 0),
            bound_to: identity_binding(user, server),
            sealed,
        })
        .chain(shared.into_iter().map(|(gateway, server, sealed)| Stored {
            identity: false,
            key: (gateway, server),
            bound_to: shared_binding(gateway, server),
            sealed,
        }));

    let mut done = Resealed::default();
    let mut to_write = Vec::new();
    for s in stored {
        match secrets.open_which(&s.sealed, &s.bound_to) {
            Some(Opened::Current(_)) => done.already_current += 1,
            Some(Opened::Previous(plain)) => {
                let resealed = secrets
                    .seal(&plain, &s.bound_to)
                    .map_err(|e| anyhow!("sealing: {e}"))?;
                to_write.push((s, resealed));
            }
            None => {
                return Err(anyhow!(
                    "{} opens under neither the current nor the previous key; nothing was \
                     changed (is --previous-secrets-key-file the key these were sealed with?)",
                    if s.identity {
                        format!("identity {}", s.key.0)
                    } else {
                        format!(
                            "the shared credential of gateway {} server {}",
                            s.key.0, s.key.1
                        )
                    }
                ));
            }
        }
    }

    let mut tx = begin_write(db).await?;
    for (s, resealed) in to_write {
        let written = if s.identity {
            sqlx::query("UPDATE identities SET sealed = $1 WHERE id = $2 AND sealed = $3")
                .bind(resealed)
                .bind(s.key.0)
                .bind(s.sealed)
                .execute(&mut *tx)
                .await?
        } else {
            sqlx::query(
                "UPDATE exposures SET credential_sealed = $1
                 WHERE gateway_id = $2 AND server_id = $3 AND credential_sealed = $4",
            )
            .bind(resealed)
            .bind(s.key.0)
            .bind(s.key.1)
            .bind(s.sealed)
            .execute(&mut *tx)
            .await?
        };
        match (written.rows_affected(), s.identity) {
            (0, _) => done.changed_meanwhile += 1,
            (_, true) => done.identities += 1,
            (_, false) => done.shared_credentials += 1,
        }
    }
    tx.commit().await?;
    Ok(done)
}
