//! Feature provisioning: which of a server's tools, prompts and resources an exposure
//! offers. On the data plane ([`enforce`]) a call to an item not offered is refused
//! and a list request's allow carries what its reply may keep, both read uncached on
//! every request; [`refresh`] fetches the exposure's live lists from the upstream and
//! records what is new or changed (rug-pull safety), on demand and on a schedule
//! ([`spawn_schedule`]). Written over a gateway id and a server id only, so the
//! gateway URL's aggregator calls the same functions per server.

mod fetch;

use std::time::Duration;

use mcpguard_core::check::DenyCode;
use mcpguard_core::features::{Kind, ListFilter, Mode, definition_hash, item_of};
use serde::Serialize;

use crate::AppState;
use crate::secrets::{identity_binding, shared_binding};
use crate::store::features::{self as store, Change, Fetched, Modes};
use crate::store::{self as db, StoreError};

/// Why an allowed request does not go on as it is.
#[derive(Debug)]
pub enum Refusal {
    /// The item is not offered.
    Blocked(DenyCode),
    /// The store gave no answer in time.
    Unavailable(String),
}

/// What provisioning makes of a request the layers allowed: `Ok(None)` passes as it
/// is, `Ok(Some(filter))` passes with its list reply filtered. A use method naming no
/// item (Envoy's MCP filter did not parse one) is refused under any mode but
/// `allow_all`: fail closed.
pub async fn enforce(
    state: &AppState,
    (gateway_id, server_id): (i64, i64),
    modes: Modes,
    method: Option<&str>,
    item: Option<&str>,
    deadline: Duration,
) -> Result<Option<ListFilter>, Refusal> {
    let Some(method) = method else {
        return Ok(None);
    };
    if let Some(kind) = Kind::of_use_method(method) {
        let blocked = Err(Refusal::Blocked(kind.blocked()));
        return match (modes.get(kind), item) {
            (Mode::AllowAll, _) => Ok(None),
            (Mode::BlockAll, _) | (Mode::AllowSelected, None) => blocked,
            (Mode::AllowSelected, Some(name)) => {
                let offered = store::is_offered(&state.db, gateway_id, server_id, kind, name);
                if bounded(deadline, offered).await? {
                    Ok(None)
                } else {
                    blocked
                }
            }
        };
    }
    if let Some(kind) = Kind::of_list_method(method) {
        return match modes.get(kind) {
            Mode::AllowAll => Ok(None),
            Mode::BlockAll => Ok(Some(ListFilter {
                kind,
                allowed: vec![],
            })),
            Mode::AllowSelected => {
                let offered = store::offered(&state.db, gateway_id, server_id, kind);
                Ok(Some(ListFilter {
                    kind,
                    allowed: bounded(deadline, offered).await?,
                }))
            }
        };
    }
    Ok(None)
}

/// A store read within the check's deadline.
async fn bounded<T>(
    deadline: Duration,
    read: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, Refusal> {
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Refusal::Unavailable(e.to_string())),
        Err(_) => Err(Refusal::Unavailable("no answer in time".into())),
    }
}

/// Why a refresh did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("not exposed")]
    NotExposed,
    /// A per-user exposure needs a user whose identity to fetch with.
    #[error("{0}")]
    NoIdentity(&'static str),
    /// The upstream could not be reached, judged or read.
    #[error("{0}")]
    Upstream(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a refresh found.
#[derive(Debug, Serialize)]
pub struct Refreshed {
    /// How many items of each kind the upstream listed.
    pub counts: Vec<(Kind, usize)>,
    pub changes: Vec<Change>,
}

/// Fetches the exposure's live lists now, with its shared credential, or for a
/// per-user exposure with `user_id`'s identity (else the user chosen last time);
/// stores them and audits every change (`actor`: the admin who asked, `None` for the
/// schedule). A failure is noted on the exposure too.
pub async fn refresh(
    state: &AppState,
    gateway_id: i64,
    server_id: i64,
    user_id: Option<i64>,
    actor: Option<i64>,
) -> Result<Refreshed, RefreshError> {
    let result = fetch_and_store(state, gateway_id, server_id, user_id, actor).await;
    let error = match &result {
        Ok(_) | Err(RefreshError::NotExposed) => None,
        Err(e) => Some(e.to_string()),
    };
    if !matches!(result, Err(RefreshError::NotExposed)) {
        store::refreshed(&state.db, gateway_id, server_id, user_id, error.as_deref()).await?;
    }
    result
}

async fn fetch_and_store(
    state: &AppState,
    gateway_id: i64,
    server_id: i64,
    user_id: Option<i64>,
    actor: Option<i64>,
) -> Result<Refreshed, RefreshError> {
    let exposure = store::exposure(&state.db, gateway_id, server_id)
        .await?
        .ok_or(RefreshError::NotExposed)?;
    let (scheme, authority, path): (String, String, String) = sqlx::query_as(
        "SELECT upstream_scheme, upstream_authority, upstream_path FROM servers WHERE id = $1",
    )
    .bind(server_id)
    .fetch_one(&state.db)
    .await
    .map_err(StoreError::from)?;
    let credential = if exposure.identity == "per_user" {
        let user = user_id
            .or(exposure.features_user_id)
            .ok_or(RefreshError::NoIdentity(
                "a per-user exposure's lists are fetched with a user's identity: name user_id",
            ))?;
        let identity: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT header_name, sealed FROM identities WHERE user_id = $1 AND server_id = $2",
        )
        .bind(user)
        .bind(server_id)
        .fetch_optional(&state.db)
        .await
        .map_err(StoreError::from)?;
        let (header, sealed) = identity.ok_or(RefreshError::NoIdentity(
            "that user has no identity for this server",
        ))?;
        let value = state
            .secrets
            .open(&sealed, &identity_binding(user, server_id))
            .ok_or(RefreshError::Upstream(
                "the identity cannot be opened".into(),
            ))?;
        Some((header, value))
    } else {
        match (&exposure.credential_header, &exposure.credential_sealed) {
            (Some(header), Some(sealed)) => {
                let value = state
                    .secrets
                    .open(sealed, &shared_binding(gateway_id, server_id))
                    .ok_or(RefreshError::Upstream(
                        "the shared credential cannot be opened".into(),
                    ))?;
                Some((header.clone(), value))
            }
            _ => None,
        }
    };
    // The same judgement as the data plane's: only an address the upstream network
    // policy allows is connected to.
    let addrs = state
        .upstreams
        .resolve_authority(&authority)
        .await
        .map_err(|e| RefreshError::Upstream(e.to_string()))?;
    let address = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| RefreshError::Upstream("the upstream does not resolve".into()))?;
    let target = fetch::Target {
        scheme,
        authority,
        path,
        address,
        credential,
    };
    let lists = fetch::fetch(&state.outbound, &target)
        .await
        .map_err(RefreshError::Upstream)?;
    let mut refreshed = Refreshed {
        counts: vec![],
        changes: vec![],
    };
    for (kind, items) in lists.0 {
        let fetched: Vec<Fetched> = items
            .iter()
            .filter_map(|item| {
                let it = item_of(kind, item)?;
                Some(Fetched {
                    name: it.name,
                    definition: item.to_string(),
                    hash: definition_hash(kind, item),
                })
            })
            .collect();
        refreshed.counts.push((kind, fetched.len()));
        let changes = store::apply_fetch(&state.db, gateway_id, server_id, kind, &fetched).await?;
        refreshed.changes.extend(changes);
    }
    audit_changes(state, gateway_id, server_id, actor, &refreshed.changes).await?;
    Ok(refreshed)
}

/// Every change goes to the audit log: a changed definition of an allowed item (a
/// possible rug-pull) is the one an admin must see.
async fn audit_changes(
    state: &AppState,
    gateway_id: i64,
    server_id: i64,
    actor: Option<i64>,
    changes: &[Change],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let at = db::now_ms();
    let events: Vec<db::audit::Event> = changes
        .iter()
        .map(|change| {
            let (action, kind) = match change {
                Change::New { kind, .. } => ("feature.new", kind),
                Change::Changed { kind, .. } => ("feature.changed", kind),
                Change::Removed { kind, .. } => ("feature.removed", kind),
            };
            db::audit::Event {
                at,
                kind: "admin".into(),
                action: action.into(),
                actor_user_id: actor,
                target: Some(format!(
                    "gateways/{gateway_id}/servers/{server_id}/features/{}",
                    kind.as_str()
                )),
                after_state: serde_json::to_string(change).ok(),
                ..db::audit::Event::default()
            }
        })
        .collect();
    db::audit::append(&state.db, &events).await
}

/// Refreshes every exposure's lists every `every`, one after another (an upstream
/// that is down costs only its own refresh, noted on its exposure).
pub fn spawn_schedule(state: AppState, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: start one period after startup instead.
        tick.tick().await;
        loop {
            tick.tick().await;
            let exposures = match store::all_exposures(&state.db).await {
                Ok(all) => all,
                Err(e) => {
                    tracing::warn!(error = %e, "feature refresh: cannot list exposures");
                    continue;
                }
            };
            for (gateway_id, server_id) in exposures {
                match refresh(&state, gateway_id, server_id, None, None).await {
                    Ok(r) if !r.changes.is_empty() => tracing::info!(
                        gateway_id,
                        server_id,
                        changes = r.changes.len(),
                        "feature refresh: lists changed"
                    ),
                    Ok(_) | Err(RefreshError::NotExposed) => {}
                    Err(e) => {
                        tracing::warn!(gateway_id, server_id, error = %e, "feature refresh failed");
                    }
                }
            }
        }
    })
}
