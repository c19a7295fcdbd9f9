//! Feature provisioning of an exposure: its modes, its live lists (with what is new
//! or changed since an admin allowed it), the allowlists, and refreshing the lists
//! from the upstream. The data plane's side is `crate::features`.

use axum::extract::State;
use mcpguard_core::features::{Kind, Mode};
use serde::{Deserialize, Serialize};

use super::{Endpoint, Verb, audit_admin, endpoint};
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::features::{self, RefreshError};
use crate::store::features::{self as store, Change, Feature, Modes};
use crate::{AppState, timefmt};

const BASE: &str = "/api/v1/gateways/{id}/servers/{server_id}/features";

/// Most names one call may allow.
const MAX_NAMES: usize = 1000;

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::FeaturesManage);
    vec![
        endpoint(Verb::Get, BASE, Some(Capability::GatewaysRead), show),
        endpoint(
            Verb::Put,
            "/api/v1/gateways/{id}/servers/{server_id}/features/{kind}",
            manage,
            set,
        ),
        endpoint(
            Verb::Post,
            "/api/v1/gateways/{id}/servers/{server_id}/features/{kind}/approve",
            manage,
            approve,
        ),
        endpoint(
            Verb::Post,
            "/api/v1/gateways/{id}/servers/{server_id}/features/refresh",
            manage,
            refresh,
        ),
    ]
}

/// Where an item stands under its kind's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    /// Offered to callers now.
    Offered,
    /// Under `allow_selected`, not on the allowlist (a new item starts here).
    NotSelected,
    /// On the allowlist, but its definition changed since it was approved: blocked
    /// until approved again.
    Changed,
    /// Under `block_all`.
    Blocked,
    /// No longer listed by the upstream.
    Removed,
}

fn status(mode: Mode, f: &Feature) -> Status {
    if f.removed_at.is_some() {
        return Status::Removed;
    }
    match (mode, f.approved_hash.as_deref()) {
        (Mode::AllowAll, _) => Status::Offered,
        (Mode::BlockAll, _) => Status::Blocked,
        (Mode::AllowSelected, None) => Status::NotSelected,
        (Mode::AllowSelected, Some(h)) if h == f.definition_hash => Status::Offered,
        (Mode::AllowSelected, Some(_)) => Status::Changed,
    }
}

#[derive(Serialize)]
struct Item {
    #[serde(flatten)]
    feature: Feature,
    status: Status,
}

#[derive(Serialize)]
struct Provisioning {
    gateway_id: i64,
    server_id: i64,
    identity: String,
    modes: Modes,
    /// The user whose identity a per-user exposure's lists are fetched with.
    refresh_user_id: Option<i64>,
    #[serde(serialize_with = "timefmt::rfc3339_opt")]
    refreshed_at: Option<i64>,
    refresh_error: Option<String>,
    tools: Vec<Item>,
    prompts: Vec<Item>,
    resources: Vec<Item>,
}

async fn provisioning(
    state: &AppState,
    gateway_id: i64,
    server_id: i64,
) -> Result<Provisioning, ApiError> {
    let exposure = store::exposure(&state.db, gateway_id, server_id)
        .await?
        .ok_or(ApiError::NotFound("exposure"))?;
    let modes = exposure.modes();
    let mut out = Provisioning {
        gateway_id,
        server_id,
        identity: exposure.identity,
        modes,
        refresh_user_id: exposure.features_user_id,
        refreshed_at: exposure.features_refreshed_at,
        refresh_error: exposure.features_error,
        tools: vec![],
        prompts: vec![],
        resources: vec![],
    };
    for feature in store::list(&state.db, gateway_id, server_id).await? {
        let Some(kind) = Kind::parse(&feature.kind) else {
            continue;
        };
        let item = Item {
            status: status(modes.get(kind), &feature),
            feature,
        };
        match kind {
            Kind::Tools => out.tools.push(item),
            Kind::Prompts => out.prompts.push(item),
            Kind::Resources => out.resources.push(item),
        }
    }
    Ok(out)
}

async fn show(
    State(state): State<AppState>,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = provisioning(&state, gateway_id, server_id).await?;
    Ok(Json(serde_json::to_value(&p).unwrap_or_default()))
}

fn parse_kind(kind: &str) -> Result<Kind, ApiError> {
    Kind::parse(kind).ok_or(ApiError::NotFound("feature_kind"))
}

fn check_names(names: &[String]) -> Result<(), ApiError> {
    if names.len() > MAX_NAMES {
        return Err(ApiError::unprocessable(
            "too_many_names",
            format!("at most {MAX_NAMES} names per call"),
        ));
    }
    Ok(())
}

async fn known_names(
    state: &AppState,
    (gateway_id, server_id): (i64, i64),
    kind: Kind,
    names: &[String],
) -> Result<(), ApiError> {
    let unknown = store::unknown_names(&state.db, gateway_id, server_id, kind, names).await?;
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "unknown_feature",
            format!(
                "not in the server's live {} list (refresh it first?): {unknown:?}",
                kind.as_str()
            ),
        ))
    }
}

/// The audit state of one kind: its mode and the names on its allowlist.
fn kind_state(p: &Provisioning, kind: Kind) -> serde_json::Value {
    let items = match kind {
        Kind::Tools => &p.tools,
        Kind::Prompts => &p.prompts,
        Kind::Resources => &p.resources,
    };
    let allowed: Vec<(&str, &str)> = items
        .iter()
        .filter_map(|i| Some((i.feature.name.as_str(), i.feature.approved_hash.as_deref()?)))
        .collect();
    serde_json::json!({"mode": p.modes.get(kind), "approved": allowed})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMode {
    mode: Mode,
    /// `allow_selected` only: the allowlist, replacing the one there was. Names new to
    /// it are approved at their current definition; names already on it keep their
    /// approval (a changed one stays blocked until `approve`).
    #[serde(default)]
    allowed: Option<Vec<String>>,
}

async fn set(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id, kind)): Path<(i64, i64, String)>,
    Json(body): Json<SetMode>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = parse_kind(&kind)?;
    let before = provisioning(&state, gateway_id, server_id).await?;
    if let Some(names) = &body.allowed {
        if body.mode != Mode::AllowSelected {
            return Err(ApiError::unprocessable(
                "allowed_needs_allow_selected",
                "`allowed` is the allowlist of mode allow_selected",
            ));
        }
        check_names(names)?;
        known_names(&state, (gateway_id, server_id), kind, names).await?;
    }
    if let Some(names) = &body.allowed {
        store::set_allowlist(&state.db, gateway_id, server_id, kind, names, admin.user_id).await?;
    }
    store::set_mode(&state.db, gateway_id, server_id, kind, body.mode).await?;
    let after = provisioning(&state, gateway_id, server_id).await?;
    audit_admin(
        &state,
        &admin,
        "features.set",
        format!(
            "gateways/{gateway_id}/servers/{server_id}/features/{}",
            kind.as_str()
        ),
        Some(kind_state(&before, kind)),
        Some(kind_state(&after, kind)),
    )
    .await?;
    Ok(Json(serde_json::to_value(&after).unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Approve {
    names: Vec<String>,
}

async fn approve(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id, kind)): Path<(i64, i64, String)>,
    Json(body): Json<Approve>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = parse_kind(&kind)?;
    let before = provisioning(&state, gateway_id, server_id).await?;
    check_names(&body.names)?;
    known_names(&state, (gateway_id, server_id), kind, &body.names).await?;
    store::approve(
        &state.db,
        gateway_id,
        server_id,
        kind,
        &body.names,
        admin.user_id,
    )
    .await?;
    let after = provisioning(&state, gateway_id, server_id).await?;
    audit_admin(
        &state,
        &admin,
        "features.approve",
        format!(
            "gateways/{gateway_id}/servers/{server_id}/features/{}",
            kind.as_str()
        ),
        Some(kind_state(&before, kind)),
        Some(kind_state(&after, kind)),
    )
    .await?;
    Ok(Json(serde_json::to_value(&after).unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refresh {
    /// For a per-user exposure: whose identity to fetch the lists with (kept for the
    /// scheduled refreshes).
    #[serde(default)]
    user_id: Option<i64>,
}

#[derive(Serialize)]
struct Refreshed {
    counts: std::collections::BTreeMap<&'static str, usize>,
    changes: Vec<Change>,
}

async fn refresh(
    State(state): State<AppState>,
    admin: Admin,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
    Json(body): Json<Refresh>,
) -> Result<Json<Refreshed>, ApiError> {
    match features::refresh(
        &state,
        gateway_id,
        server_id,
        body.user_id,
        Some(admin.user_id),
    )
    .await
    {
        Ok(r) => Ok(Json(Refreshed {
            counts: r.counts.into_iter().map(|(k, n)| (k.as_str(), n)).collect(),
            changes: r.changes,
        })),
        Err(RefreshError::NotExposed) => Err(ApiError::NotFound("exposure")),
        Err(RefreshError::NoIdentity(why)) => {
            Err(ApiError::unprocessable("identity_required", why))
        }
        Err(RefreshError::Upstream(why)) => Err(ApiError::BadGateway {
            code: "upstream_failed",
            message: format!("fetching the lists failed: {why}"),
        }),
        Err(RefreshError::Store(e)) => Err(e.into()),
    }
}
