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
use crate::store::audit_export as export_db;
use crate::timefmt;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

pub fn endpoints() -> Vec<Endpoint> {
    let read = Some(Capability::AuditRead);
    vec![
        endpoint(Verb::Get, "/api/v1/audit", read, list),
        endpoint(Verb::Get, "/api/v1/audit/status", read, status),
        endpoint(Verb::Get, "/api/v1/audit/export", read, export),
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

/// Entries read per query while streaming an export.
const EXPORT_PAGE: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    /// RFC 3339, inclusive.
    since: Option<String>,
    /// RFC 3339, exclusive.
    until: Option<String>,
}

/// `GET /api/v1/audit/export`: every entry with `since <= at < until`, oldest id first,
/// one JSON object a line (JSON Lines), read page by page as the client takes them, so
/// a long range costs one page of memory. A database error midway ends the body
/// early (the client sees a truncated transfer, never a partial line as complete).
async fn export(
    State(state): State<AppState>,
    Query(p): Query<ExportParams>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let since = time_param("since", p.since.as_deref())?;
    let until = time_param("until", p.until.as_deref())?;
    // The first page before the answer starts: a store that is down gets a clean 503.
    let first = export_db::ascending(&state.db, 0, since, until, EXPORT_PAGE).await?;
    let db = state.db.clone();
    // The state: the page to send next, a failed read to report, or the end (None).
    let pages = futures_util::stream::unfold(Some(Ok(first)), move |next| {
        let db = db.clone();
        async move {
            let page = match next? {
                Ok(page) => page,
                Err(()) => {
                    return Some((Err(std::io::Error::other("the store failed midway")), None));
                }
            };
            let mut lines = Vec::with_capacity(page.len() * 256);
            for e in &page {
                // An entry always serializes (plain fields and stored JSON text).
                if serde_json::to_writer(&mut lines, e).is_ok() {
                    lines.push(b'\n');
                }
            }
            let after = page
                .last()
                .map(|e| e.id)
                .filter(|_| page.len() as i64 == EXPORT_PAGE);
            let next = match after {
                Some(after) => Some(
                    export_db::ascending(&db, after, since, until, EXPORT_PAGE)
                        .await
                        .map_err(|e| {
                            tracing::warn!(error = %e, "audit export: reading the next page failed; ending the body");
                        }),
                ),
                None => None,
            };
            Some((Ok::<_, std::io::Error>(lines), next))
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/jsonl")],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}
