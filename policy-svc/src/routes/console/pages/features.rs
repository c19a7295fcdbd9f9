//! Feature provisioning of one exposure (a server on a gateway): per kind (tools,
//! prompts, resources) its mode (`allow_all`, `allow_selected`, `block_all`), the live
//! items with when they were first and last seen, the allowlist, and allowing a changed
//! item again. All of it through the features endpoints of the admin API.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;

use super::super::layout::{self, Action, action, none_yet, tag, text, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{by_id, id, name_in};
use crate::routes::Verb;

const KINDS: [(&str, &str); 3] = [
    ("tools", "Tools"),
    ("prompts", "Prompts"),
    ("resources", "Resources"),
];

const MODES: [(&str, &str); 3] = [
    ("allow_all", "allow all (new items too)"),
    (
        "allow_selected",
        "allow selected (new or changed items blocked until allowed)",
    ),
    ("block_all", "block all"),
];

/// An item's status as a badge: offered is good news, the rest say why not.
fn status_badge(status: &str) -> Markup {
    match status {
        "offered" => html! { span.badge.on { "offered" } },
        "changed" => html! { span.badge.off { "changed: blocked" } },
        "blocked" => html! { span.badge.off { "blocked" } },
        "not_selected" => tag("not selected"),
        "removed" => tag("removed upstream"),
        other => tag(other),
    }
}

/// What an item says about itself: its description, else its URI (resources).
fn about(item: &Value) -> String {
    let d = &item["definition"];
    d["description"]
        .as_str()
        .or_else(|| d["uri"].as_str())
        .unwrap_or("")
        .to_owned()
}

pub async fn page(
    State(_): State<Console>,
    signed: Signed,
    Path((gateway_id, server_id)): Path<(i64, i64)>,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let base = format!("/api/v1/gateways/{gateway_id}/servers/{server_id}/features");
    let p = match api.get(&base).await {
        Ok(p) => p,
        Err(a) => {
            return layout::page_with_status(
                if a.status == StatusCode::FORBIDDEN {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::NOT_FOUND
                },
                &signed,
                "/console/gateways",
                "Feature provisioning",
                None,
                html! { p.error { (a.message()) } p { a href={ "/console/gateways/" (gateway_id) } { "Back to the gateway" } } },
            );
        }
    };
    let gateways = api.items("/api/v1/gateways").await;
    let servers = api.items("/api/v1/servers").await;
    let users = api.items("/api/v1/users").await;
    let (gateway_names, server_names) = (by_id(&gateways), by_id(&servers));
    let gname = name_in(&gateway_names, &Value::from(gateway_id));
    let sname = name_in(&server_names, &Value::from(server_id));
    let manage = api.can(
        Verb::Put,
        "/api/v1/gateways/{id}/servers/{server_id}/features/{kind}",
    );
    let back = format!("/console/gateways/{gateway_id}/servers/{server_id}");
    let per_user = p["identity"] == "per_user";
    let body = html! {
        p { a href={ "/console/gateways/" (gateway_id) } { "← " (gname) } }
        p.muted { "What this gateway offers callers of " (sname) ". A mode or allowlist change holds from the next request. Under allow selected, an item new upstream, or whose definition changed since it was allowed, is blocked until someone allows it (again)." }
        section.card {
            h2 { "Live lists" }
            p {
                "Last fetched from the upstream: " (when(&p["refreshed_at"]))
                @if let Some(e) = p["refresh_error"].as_str() { " " span.badge.off { "failed" } " " span.muted { (e) } }
            }
            @if manage {
                (action(&signed, &Action { method: "POST", path: format!("{base}/refresh"), label: "Refresh now", what: String::new(), back: &back, danger: false }, html! {
                    @if per_user {
                        label for="refresh-user" { "With the identity of" }
                        select id="refresh-user" name="user_id" {
                            @for u in &users { option value=(id(u)) selected[p["refresh_user_id"] == u["id"]] { (text(&u["name"])) } }
                        }
                    }
                }))
            }
        }
        @for (kind, title) in KINDS {
            @let mode = p["modes"][kind].as_str().unwrap_or("allow_all");
            @let items = p[kind].as_array().cloned().unwrap_or_default();
            @let selecting = manage && mode == "allow_selected";
            @let list_form = format!("allow-{kind}");
            section id=(kind) {
                h2 { (title) " " (tag(mode)) }
                @if manage {
                    (action(&signed, &Action { method: "PUT", path: format!("{base}/{kind}"), label: "Set mode", what: String::new(), back: &back, danger: false }, html! {
                        label for={ "mode-" (kind) } { "Mode of " (kind) }
                        select id={ "mode-" (kind) } name="mode" {
                            @for (m, label) in MODES { option value=(m) selected[m == mode] { (label) } }
                        }
                    }))
                }
                table.features {
                    thead { tr {
                        @if selecting { th { "Allowed" } }
                        th { "Name" } th { "About" } th { "Status" } th { "Seen first / last" } th { "Changed / allowed" } th {}
                    } }
                    tbody {
                        @if items.is_empty() { (none_yet(if selecting { 7 } else { 6 }, "None seen yet: refresh the live lists.")) }
                        @for item in &items {
                            @let name = item["name"].as_str().unwrap_or("");
                            @let status = item["status"].as_str().unwrap_or("");
                            tr data-name=(name) {
                                @if selecting {
                                    td { input type="checkbox" form=(list_form) name="allowed[]" value=(name) aria-label={ "Allow " (name) } checked[!item["approved_hash"].is_null()] disabled[status == "removed"]; }
                                }
                                td { code { (name) } }
                                td { (about(item)) }
                                td { (status_badge(status)) }
                                td.seen { (when(&item["first_seen"])) br; (when(&item["last_seen"])) }
                                td.seen { (when(&item["changed_at"])) br; (when(&item["approved_at"])) }
                                td {
                                    @if manage && (status == "changed" || status == "not_selected") {
                                        (action(&signed, &Action { method: "POST", path: format!("{base}/{kind}/approve"), label: if status == "changed" { "Allow again" } else { "Allow" }, what: String::new(), back: &back, danger: false }, html! {
                                            input type="hidden" name="names[]" value=(name);
                                        }))
                                    }
                                }
                            }
                        }
                    }
                }
                @if selecting && !items.is_empty() {
                    form.inline id=(list_form) method="post" action="/console/act" {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input type="hidden" name="_method" value="PUT";
                        input type="hidden" name="_path" value={ (base) "/" (kind) };
                        input type="hidden" name="_back" value=(back);
                        input type="hidden" name="mode" value="allow_selected";
                        input type="hidden" name="allowed[]" value="";
                        button type="submit" { "Save the allowlist of " (kind) }
                    }
                }
            }
        }
    };
    layout::page(
        &signed,
        "/console/gateways",
        &format!("{sname} on {gname}: features"),
        done.notice(),
        body,
    )
}
