//! Reading the audit log.

use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::{Endpoint, Verb, endpoint};
use crate::AppState;
use crate::audit::Status;
use crate::auth::Capability;
use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::store::audit::{self, Event, Filter};
use crate::timefmt;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

pub fn endpoints() -> Vec<Endpoint> {
    let read = Some(Capability::AuditRead);
    vec![
        endpoint(Verb::Get, "/api/v1/audit", read, list),
        endpoint(Verb::Get, "/api/v1/audit/status", read, status),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// RFC 3339, inclusive.
    since: Option<String>,
    /// RFC 3339, exclusive.
    until: Option<String>,
    /// `decision` or `admin`.
    kind: Option<String>,
    host_id: Option<i64>,
    user_id: Option<i64>,
    /// Gateway slug.
    gateway: Option<String>,
    /// `allow` or `deny`.
    decision: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct Page {
    entries: Vec<Event>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    next_cursor: Option<String>,
}

fn time_param(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            timefmt::parse_rfc3339(v).ok_or_else(|| {
                ApiError::bad_request("invalid_query", format!("{name} must be RFC 3339"))
            })
        })
        .transpose()
}

async fn list(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<Page>, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    if p.kind
        .as_deref()
        .is_some_and(|k| k != "decision" && k != "admin")
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "kind is `decision` or `admin`",
        ));
    }
    if p.decision
        .as_deref()
        .is_some_and(|d| d != "allow" && d != "deny")
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "decision is `allow` or `deny`",
        ));
    }
    let before_id = p
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_query", "cursor is not one we issued"))
        })
        .transpose()?;
    let filter = Filter {
        since: time_param("since", p.since.as_deref())?,
        until: time_param("until", p.until.as_deref())?,
        kind: p.kind,
        host_id: p.host_id,
        user_id: p.user_id,
        gateway: p.gateway,
        decision: p.decision,
        before_id,
        limit,
    };
    let entries = audit::query(&state.db, &filter).await?;
    let next_cursor = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(Json(Page {
        entries,
        next_cursor,
    }))
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(state.audit.status(state.audit_retention_days))
}
