//! Feature provisioning's storage: each exposure's modes (columns of `exposures`) and
//! its live lists with their approvals (`exposure_features`, migration 0020).

use mcpguard_core::features::{Item, Kind, Mode};
use serde::Serialize;

use super::{Db, Result, begin_write, now_ms};
use crate::timefmt;

/// The three modes of one exposure; `None` from [`modes`] when it does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Modes {
    pub tools: Mode,
    pub prompts: Mode,
    pub resources: Mode,
}

impl Modes {
    pub fn get(&self, kind: Kind) -> Mode {
        match kind {
            Kind::Tools => self.tools,
            Kind::Prompts => self.prompts,
            Kind::Resources => self.resources,
        }
    }

    /// From the stored names; one the code does not know (a newer replica's) reads as
    /// `block_all`: fail closed.
    pub fn from_columns(
        tools: Option<&str>,
        prompts: Option<&str>,
        resources: Option<&str>,
    ) -> Self {
        let mode = |m: Option<&str>| {
            m.map_or(Mode::AllowAll, |m| Mode::parse(m).unwrap_or(Mode::BlockAll))
        };
        Modes {
            tools: mode(tools),
            prompts: mode(prompts),
            resources: mode(resources),
        }
    }
}

fn mode_column(kind: Kind) -> &'static str {
    match kind {
        Kind::Tools => "tools_mode",
        Kind::Prompts => "prompts_mode",
        Kind::Resources => "resources_mode",
    }
}

/// An exposure as feature provisioning sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExposureRow {
    pub identity: String,
    pub credential_header: Option<String>,
    pub credential_sealed: Option<Vec<u8>>,
    pub tools_mode: String,
    pub prompts_mode: String,
    pub resources_mode: String,
    pub features_user_id: Option<i64>,
    pub features_refreshed_at: Option<i64>,
    pub features_error: Option<String>,
}

impl ExposureRow {
    pub fn modes(&self) -> Modes {
        Modes::from_columns(
            Some(&self.tools_mode),
            Some(&self.prompts_mode),
            Some(&self.resources_mode),
        )
    }
}

pub async fn exposure(db: &Db, gateway_id: i64, server_id: i64) -> Result<Option<ExposureRow>> {
    Ok(sqlx::query_as(
        "SELECT identity, credential_header, credential_sealed, tools_mode, prompts_mode,
                resources_mode, features_user_id, features_refreshed_at, features_error
         FROM exposures WHERE gateway_id = $1 AND server_id = $2",
    )
    .bind(gateway_id)
    .bind(server_id)
    .fetch_optional(db)
    .await?)
}

pub async fn set_mode(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    mode: Mode,
) -> Result<()> {
    // The column name comes from a fixed list, never from input.
    let sql = format!(
        "UPDATE exposures SET {} = $1 WHERE gateway_id = $2 AND server_id = $3",
        mode_column(kind)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(mode.as_str())
        .bind(gateway_id)
        .bind(server_id)
        .execute(db)
        .await?;
    Ok(())
}

/// One item of a live list, as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Feature {
    #[serde(skip)]
    pub kind: String,
    pub name: String,
    #[serde(serialize_with = "json_text")]
    pub definition: String,
    pub definition_hash: String,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub first_seen: i64,
    #[serde(serialize_with = "timefmt::rfc3339")]
    pub last_seen: i64,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub changed_at: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub removed_at: Option<i64>,
    pub approved_hash: Option<String>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    pub approved_at: Option<i64>,
    pub approved_by: Option<i64>,
}

fn json_text<S: serde::Serializer>(v: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(v) {
        Ok(value) => value.serialize(s),
        Err(_) => s.serialize_str(v),
    }
}

pub async fn list(db: &Db, gateway_id: i64, server_id: i64) -> Result<Vec<Feature>> {
    Ok(sqlx::query_as(
        "SELECT kind, name, definition, definition_hash, first_seen, last_seen, changed_at,
                removed_at, approved_hash, approved_at, approved_by
         FROM exposure_features WHERE gateway_id = $1 AND server_id = $2 ORDER BY kind, name",
    )
    .bind(gateway_id)
    .bind(server_id)
    .fetch_all(db)
    .await?)
}

/// The items of `kind` offered under `allow_selected`: approved at the definition last
/// fetched, and still there.
pub async fn offered(db: &Db, gateway_id: i64, server_id: i64, kind: Kind) -> Result<Vec<Item>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, definition_hash FROM exposure_features
         WHERE gateway_id = $1 AND server_id = $2 AND kind = $3
           AND removed_at IS NULL AND approved_hash = definition_hash",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(kind.as_str())
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, hash)| Item { name, hash })
        .collect())
}

/// Whether one item is offered under `allow_selected` (as [`offered`]).
pub async fn is_offered(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    name: &str,
) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM exposure_features
         WHERE gateway_id = $1 AND server_id = $2 AND kind = $3 AND name = $4
           AND removed_at IS NULL AND approved_hash = definition_hash",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(kind.as_str())
    .bind(name)
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

/// What a fetch changed in a live list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Not seen before: offered under `allow_selected` only once approved.
    New { kind: Kind, name: String },
    /// Its definition is not the one seen before; `was_approved`: it had been allowed,
    /// and is blocked again until approved again (a rug-pull, if unannounced).
    Changed {
        kind: Kind,
        name: String,
        was_approved: bool,
    },
    /// No longer in the upstream's list.
    Removed { kind: Kind, name: String },
}

/// One fetched item: its name, its definition (JSON) and the definition's hash.
pub struct Fetched {
    pub name: String,
    pub definition: String,
    pub hash: String,
}

/// Stores what a fetch of `kind` found, in one transaction, and says what changed.
pub async fn apply_fetch(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    fetched: &[Fetched],
) -> Result<Vec<Change>> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let known: Vec<(String, String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT name, definition_hash, approved_hash, removed_at FROM exposure_features
         WHERE gateway_id = $1 AND server_id = $2 AND kind = $3",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(kind.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let mut changes = Vec::new();
    for item in fetched {
        let name = item.name.clone();
        match known.iter().find(|(n, ..)| *n == item.name) {
            None => {
                sqlx::query(
                    "INSERT INTO exposure_features (gateway_id, server_id, kind, name, definition,
                         definition_hash, first_seen, last_seen)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                )
                .bind(gateway_id)
                .bind(server_id)
                .bind(kind.as_str())
                .bind(&item.name)
                .bind(&item.definition)
                .bind(&item.hash)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                changes.push(Change::New { kind, name });
            }
            Some((_, hash, approved, _)) if *hash != item.hash => {
                sqlx::query(
                    "UPDATE exposure_features SET definition = $1, definition_hash = $2,
                         last_seen = $3, changed_at = $3, removed_at = NULL
                     WHERE gateway_id = $4 AND server_id = $5 AND kind = $6 AND name = $7",
                )
                .bind(&item.definition)
                .bind(&item.hash)
                .bind(now)
                .bind(gateway_id)
                .bind(server_id)
                .bind(kind.as_str())
                .bind(&item.name)
                .execute(&mut *tx)
                .await?;
                changes.push(Change::Changed {
                    kind,
                    name,
                    was_approved: approved.is_some(),
                });
            }
            Some(_) => {
                sqlx::query(
                    "UPDATE exposure_features SET last_seen = $1, removed_at = NULL
                     WHERE gateway_id = $2 AND server_id = $3 AND kind = $4 AND name = $5",
                )
                .bind(now)
                .bind(gateway_id)
                .bind(server_id)
                .bind(kind.as_str())
                .bind(&item.name)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    for (name, _, _, removed_at) in &known {
        if removed_at.is_none() && !fetched.iter().any(|f| f.name == *name) {
            sqlx::query(
                "UPDATE exposure_features SET removed_at = $1
                 WHERE gateway_id = $2 AND server_id = $3 AND kind = $4 AND name = $5",
            )
            .bind(now)
            .bind(gateway_id)
            .bind(server_id)
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?;
            changes.push(Change::Removed {
                kind,
                name: name.clone(),
            });
        }
    }
    tx.commit().await?;
    Ok(changes)
}

/// Notes how a refresh ended (`error`: why it failed) and whose identity it used.
pub async fn refreshed(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    user_id: Option<i64>,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE exposures SET features_refreshed_at = $1, features_error = $2,
             features_user_id = COALESCE($3, features_user_id)
         WHERE gateway_id = $4 AND server_id = $5",
    )
    .bind(now_ms())
    .bind(error)
    .bind(user_id)
    .bind(gateway_id)
    .bind(server_id)
    .execute(db)
    .await?;
    Ok(())
}

/// The names of `names` that are not in the live list of `kind` (an admin can allow
/// only what the upstream offers).
pub async fn unknown_names(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    names: &[String],
) -> Result<Vec<String>> {
    let known: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM exposure_features
         WHERE gateway_id = $1 AND server_id = $2 AND kind = $3 AND removed_at IS NULL",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(kind.as_str())
    .fetch_all(db)
    .await?;
    Ok(names
        .iter()
        .filter(|n| !known.contains(n))
        .cloned()
        .collect())
}

/// Makes `names` the allowlist of `kind`: names that leave it lose their approval,
/// names that join it are approved at their current definition, names that stay keep
/// the approval they had (a changed definition stays blocked until [`approve`]).
pub async fn set_allowlist(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    names: &[String],
    admin: i64,
) -> Result<()> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    let current: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT name, approved_hash FROM exposure_features
         WHERE gateway_id = $1 AND server_id = $2 AND kind = $3",
    )
    .bind(gateway_id)
    .bind(server_id)
    .bind(kind.as_str())
    .fetch_all(&mut *tx)
    .await?;
    for (name, approved) in current {
        let listed = names.contains(&name);
        let sql = match (listed, approved.is_some()) {
            (false, true) => {
                "UPDATE exposure_features SET approved_hash = NULL, approved_at = NULL, approved_by = NULL
                 WHERE gateway_id = $1 AND server_id = $2 AND kind = $3 AND name = $4"
            }
            (true, false) => {
                "UPDATE exposure_features SET approved_hash = definition_hash, approved_at = $5, approved_by = $6
                 WHERE gateway_id = $1 AND server_id = $2 AND kind = $3 AND name = $4"
            }
            _ => continue,
        };
        sqlx::query(sql)
            .bind(gateway_id)
            .bind(server_id)
            .bind(kind.as_str())
            .bind(&name)
            .bind(now)
            .bind(admin)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Approves `names` at their current definitions (adds them to the allowlist, or
/// allows a changed one again).
pub async fn approve(
    db: &Db,
    gateway_id: i64,
    server_id: i64,
    kind: Kind,
    names: &[String],
    admin: i64,
) -> Result<()> {
    let now = now_ms();
    let mut tx = begin_write(db).await?;
    for name in names {
        sqlx::query(
            "UPDATE exposure_features SET approved_hash = definition_hash, approved_at = $5, approved_by = $6
             WHERE gateway_id = $1 AND server_id = $2 AND kind = $3 AND name = $4",
        )
        .bind(gateway_id)
        .bind(server_id)
        .bind(kind.as_str())
        .bind(name)
        .bind(now)
        .bind(admin)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Every exposure, for the scheduled refresh.
pub async fn all_exposures(db: &Db) -> Result<Vec<(i64, i64)>> {
    Ok(
        sqlx::query_as(
            "SELECT gateway_id, server_id FROM exposures ORDER BY gateway_id, server_id",
        )
        .fetch_all(db)
        .await?,
    )
}
