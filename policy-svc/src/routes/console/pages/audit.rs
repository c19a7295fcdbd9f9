//! Audit: the log with filters (time, kind, decision, gateway, host, user) and paging,
//! and its export as JSON Lines (the API's own export, passed through) and CSV.

use axum::extract::{Query, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use serde_json::Value;

use super::super::Console;
use super::super::layout::{self, text, when};
use super::super::session::Signed;

const PAGE: usize = 50;
/// The most entries one CSV export holds (newest first); narrow the filters for more.
const CSV_MAX: usize = 100_000;

/// The filters as the page's form sends them (times from `datetime-local`, UTC).
#[derive(Deserialize, Default)]
pub struct Filters {
    since: Option<String>,
    until: Option<String>,
    kind: Option<String>,
    decision: Option<String>,
    gateway: Option<String>,
    host_id: Option<String>,
    user_id: Option<String>,
    cursor: Option<String>,
}

/// A `datetime-local` value (`2026-12-02T10:00`) as RFC 3339 in UTC; others as they are.
fn rfc3339(v: &str) -> String {
    if v.len() == 16 {
        format!("{v}:00Z")
    } else {
        v.to_owned()
    }
}

impl Filters {
    fn pairs(&self, with_cursor: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put = |k: &'static str, v: &Option<String>, time: bool| {
            if let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                out.push((k, if time { rfc3339(v) } else { v.to_owned() }));
            }
        };
        put("since", &self.since, true);
        put("until", &self.until, true);
        put("kind", &self.kind, false);
        put("decision", &self.decision, false);
        put("gateway", &self.gateway, false);
        put("host_id", &self.host_id, false);
        put("user_id", &self.user_id, false);
        if with_cursor {
            put("cursor", &self.cursor, false);
        }
        out
    }

    fn query(&self, with_cursor: bool) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.pairs(with_cursor))
            .finish()
    }
}

fn value(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("")
}

pub async fn list(State(_): State<Console>, signed: Signed, Query(f): Query<Filters>) -> Response {
    let api = &signed.api;
    let answer = api
        .get(&format!("/api/v1/audit?limit={PAGE}&{}", f.query(true)))
        .await;
    let (entries, next, error) = match answer {
        Ok(page) => (
            page["entries"].as_array().cloned().unwrap_or_default(),
            page["next_cursor"].as_str().map(str::to_owned),
            None,
        ),
        Err(a) => (Vec::new(), None, Some(a)),
    };
    if let Some(a) = error.as_ref().filter(|a| a.status == StatusCode::FORBIDDEN) {
        return layout::page_with_status(
            StatusCode::FORBIDDEN,
            &signed,
            "/console/audit",
            "Audit",
            None,
            html! { p.error { (a.message()) } },
        );
    }
    // Names for the ids entries hold, where this user may read them (else `#id`).
    let hosts = api.items("/api/v1/hosts").await;
    let users = api.items("/api/v1/users").await;
    let (host_names, user_names) = (super::by_id(&hosts), super::by_id(&users));
    let filters = f.query(false);
    let option = |current: &Option<String>, v: &str| current.as_deref() == Some(v);
    let body = html! {
        form.filters method="get" action="/console/audit" {
            div { label for="f-since" { "Since (UTC)" } input id="f-since" name="since" type="datetime-local" value=(value(&f.since)); }
            div { label for="f-until" { "Until (UTC)" } input id="f-until" name="until" type="datetime-local" value=(value(&f.until)); }
            div { label for="f-kind" { "Kind" } select id="f-kind" name="kind" {
                option value="" { "any" }
                option value="decision" selected[option(&f.kind, "decision")] { "decision" }
                option value="admin" selected[option(&f.kind, "admin")] { "admin" }
            } }
            div { label for="f-decision" { "Decision" } select id="f-decision" name="decision" {
                option value="" { "any" }
                option value="allow" selected[option(&f.decision, "allow")] { "allow" }
                option value="deny" selected[option(&f.decision, "deny")] { "deny" }
            } }
            div { label for="f-gateway" { "Gateway (slug)" } input id="f-gateway" name="gateway" value=(value(&f.gateway)); }
            div { label for="f-host" { "Host id" } input id="f-host" name="host_id" inputmode="numeric" value=(value(&f.host_id)); }
            div { label for="f-user" { "User id" } input id="f-user" name="user_id" inputmode="numeric" value=(value(&f.user_id)); }
            div { button type="submit" { "Filter" } }
        }
        p {
            a.button.secondary href={ "/console/audit/export.jsonl?" (filters) } download { "Export JSON Lines" }
            " "
            a.button.secondary href={ "/console/audit/export.csv?" (filters) } download { "Export CSV" }
            span.muted { " JSON Lines: every entry of the time range, oldest first. CSV: the filtered entries, newest first." }
        }
        @if let Some(a) = &error { p.error role="alert" { (a.message()) } }
        table.audit {
            thead { tr { th { "When" } th { "Kind" } th { "Action" } th { "Code" } th { "Who / host" } th { "Gateway / server" } th { "Tool or target" } } }
            tbody {
                @if entries.is_empty() { (layout::none_yet(7, "No entry matches.")) }
                @for e in &entries {
                    tr {
                        td { (when(&e["at"])) }
                        td { (text(&e["kind"])) }
                        td { @if e["action"] == "deny" { span.badge.off { "deny" } } @else if e["action"] == "allow" { span.badge.on { "allow" } } @else { code { (text(&e["action"])) } } }
                        td { @if let Some(c) = e["code"].as_str() { code { (c) } } @if let Some(n) = e["suppressed"].as_i64() { " +" (n) " suppressed" } }
                        td { @if e["kind"] == "admin" { (super::name_in(&user_names, &e["actor_user_id"])) } @else if e["host_id"].is_null() { span.muted { "—" } } @else { (super::name_in(&host_names, &e["host_id"])) " · " (super::name_in(&user_names, &e["user_id"])) } }
                        td { (text(&e["gateway"])) " / " (text(&e["server"])) }
                        td { @if e["kind"] == "admin" { (text(&e["target"])) } @else { (text(&e["tool"])) } }
                    }
                }
            }
        }
        @if let Some(cursor) = next {
            p { a.button.secondary rel="next" href={ "/console/audit?" (filters) (if filters.is_empty() { "" } else { "&" }) "cursor=" (cursor) } { "Older entries" } }
        }
    };
    layout::page(&signed, "/console/audit", "Audit", None, body)
}

fn attachment(mut response: Response, content_type: &'static str, file: &'static str) -> Response {
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The API's export of the time range, streamed through.
pub async fn export_jsonl(
    State(_): State<Console>,
    signed: Signed,
    Query(f): Query<Filters>,
) -> Response {
    let range = Filters {
        since: f.since,
        until: f.until,
        ..Filters::default()
    };
    let response = signed
        .api
        .send(
            Method::GET,
            &format!("/api/v1/audit/export?{}", range.query(false)),
            None,
        )
        .await;
    if !response.status().is_success() {
        return response;
    }
    attachment(response, "application/jsonl", "audit.jsonl")
}

const CSV_COLUMNS: [&str; 17] = [
    "id",
    "at",
    "kind",
    "action",
    "code",
    "suppressed",
    "actor_user_id",
    "target",
    "host_id",
    "user_id",
    "connection_id",
    "gateway",
    "server",
    "mcp_method",
    "tool",
    "latency_us",
    "request_id",
];

/// One CSV field (RFC 4180 quoting). A text that a spreadsheet would run as a formula
/// (`=`, `+`, `-`, `@` first) gets a leading `'`: entries hold what clients sent.
pub fn csv_field(v: &Value) -> String {
    let s = match v {
        Value::Null => return String::new(),
        Value::String(s) => {
            if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{s}")
            } else {
                s.clone()
            }
        }
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The filtered entries as CSV, newest first, read page by page from the API.
pub async fn export_csv(
    State(_): State<Console>,
    signed: Signed,
    Query(mut f): Query<Filters>,
) -> Response {
    let mut out = CSV_COLUMNS.join(",");
    out.push_str("\r\n");
    let mut written = 0;
    f.cursor = None;
    loop {
        let page = match signed
            .api
            .get(&format!("/api/v1/audit?limit=1000&{}", f.query(true)))
            .await
        {
            Ok(page) => page,
            Err(a) => return (a.status, axum::Json(a.body)).into_response(),
        };
        for e in page["entries"].as_array().into_iter().flatten() {
            let row: Vec<String> = CSV_COLUMNS.iter().map(|c| csv_field(&e[*c])).collect();
            out.push_str(&row.join(","));
            out.push_str("\r\n");
            written += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) if written < CSV_MAX => f.cursor = Some(c.to_owned()),
            _ => break,
        }
    }
    attachment(out.into_response(), "text/csv; charset=utf-8", "audit.csv")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field(&json!("plain")), "plain");
        assert_eq!(csv_field(&json!("a,b")), "\"a,b\"");
        assert_eq!(csv_field(&json!("say \"hi\"\n")), "\"say \"\"hi\"\"\n\"");
        assert_eq!(csv_field(&json!("=HYPERLINK(1)")), "'=HYPERLINK(1)");
        assert_eq!(csv_field(&json!(42)), "42");
        assert_eq!(csv_field(&Value::Null), "");
    }

    #[test]
    fn filters_become_the_apis_query() {
        let f = Filters {
            since: Some("2026-12-02T10:00".into()),
            kind: Some("decision".into()),
            gateway: Some(" ".into()),
            cursor: Some("77".into()),
            ..Filters::default()
        };
        assert_eq!(
            f.query(false),
            "since=2026-12-02T10%3A00%3A00Z&kind=decision"
        );
        assert_eq!(
            f.query(true),
            "since=2026-12-02T10%3A00%3A00Z&kind=decision&cursor=77"
        );
    }
}
