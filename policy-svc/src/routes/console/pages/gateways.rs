//! Gateways: each one's exposed servers with their identity scheme (expose, hide), and
//! its Connections tab (host, user, state, last used, enable/disable).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::super::layout::{
    self, Action, action, badge, copyable, none_yet, tag, text, toggle, when,
};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{by_id, flag, id, mcp_url, name_in};
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let gateways = api.items("/api/v1/gateways").await;
    let back = "/console/gateways";
    let body = html! {
        @if api.can(Verb::Post, "/api/v1/gateways") {
            section.card {
                h2 { "New gateway" }
                (action(&signed, &Action { method: "POST", path: "/api/v1/gateways".into(), label: "Create gateway", what: String::new(), back, danger: false }, html! {
                    label for="gw-name" { "Name" }
                    input id="gw-name" name="name" required placeholder="Engineering";
                    label for="gw-slug" { "Slug (in the URL)" }
                    input id="gw-slug" name="slug" required pattern="[a-z0-9]([a-z0-9-]*[a-z0-9])?" placeholder="eng";
                }))
            }
        }
        table {
            thead { tr { th { "Gateway" } th { "Slug" } th { "State" } th { "Created" } th { "Break-glass" } } }
            tbody {
                @if gateways.is_empty() { (none_yet(5, "No gateway yet.")) }
                @for g in &gateways {
                    @let name = text(&g["name"]);
                    tr {
                        td { a href={ "/console/gateways/" (id(g)) } { (name) } }
                        td { code { (text(&g["slug"])) } }
                        td { (badge(flag(g, "enabled"))) }
                        td { (when(&g["created_at"])) }
                        td { (toggle(&signed, "gateways", id(g), flag(g, "enabled"), &format!("the gateway {name}"), back)) }
                    }
                }
            }
        }
    };
    layout::page(
        &signed,
        "/console/gateways",
        "Gateways",
        done.notice(),
        body,
    )
}

pub async fn one(
    State(console): State<Console>,
    signed: Signed,
    Path(gateway_id): Path<i64>,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let gateways = api.items("/api/v1/gateways").await;
    let Some(g) = gateways.iter().find(|g| id(g) == gateway_id) else {
        return layout::page_with_status(
            StatusCode::NOT_FOUND,
            &signed,
            "/console/gateways",
            "No such gateway",
            None,
            html! { p { a href="/console/gateways" { "All gateways" } } },
        );
    };
    let servers = api.items("/api/v1/servers").await;
    let server_names = by_id(&servers);
    // Service accounts are picked from the users listing (users.read), where readable.
    let users = if api.can(Verb::Get, "/api/v1/users") {
        api.items("/api/v1/users").await
    } else {
        Vec::new()
    };
    let user_names = by_id(&users);
    let exposed = api
        .items(&format!("/api/v1/gateways/{gateway_id}/servers"))
        .await;
    let teams = api
        .items(&format!("/api/v1/gateways/{gateway_id}/teams"))
        .await;
    let connections = if api.can(Verb::Get, "/api/v1/gateways/{id}/connections") {
        Some(
            api.items(&format!("/api/v1/gateways/{gateway_id}/connections"))
                .await,
        )
    } else {
        None
    };
    let base = console
        .app
        .oauth
        .resource_base_urls
        .first()
        .cloned()
        .unwrap_or_default();
    let name = text(&g["name"]);
    let slug = g["slug"].as_str().unwrap_or("");
    let back = format!("/console/gateways/{gateway_id}");
    let manage = api.can(Verb::Put, "/api/v1/gateways/{id}/servers/{server_id}");
    let body = html! {
        div.state { code { (slug) } " " (badge(flag(g, "enabled"))) " " (toggle(&signed, "gateways", gateway_id, flag(g, "enabled"), &format!("the gateway {name}"), &back)) }
        section {
            h2 { "Exposed servers" }
            table {
                thead { tr { th { "Server" } th { "Identity" } th { "URL" } th { "Features" } th {} } }
                tbody {
                    @if exposed.is_empty() { (none_yet(5, "This gateway exposes no server yet.")) }
                    @for e in &exposed {
                        @let sid = e["server_id"].as_i64().unwrap_or(0);
                        @let server = server_names.get(&sid);
                        @let sname = name_in(&server_names, &e["server_id"]);
                        tr {
                            td { (sname) }
                            td { (tag(if e["identity"] == "per_user" { "per-user" } else { "shared" })) @if let Some(h) = e["credential_header"].as_str() { " " span.muted { "sends " (h) } } @if !e["credential_user_id"].is_null() { " " span.muted { "sends the identity of " (name_in(&user_names, &e["credential_user_id"])) } } }
                            td { @if let Some(s) = server.and_then(|s| s["slug"].as_str()) { (copyable(&format!("url-{sid}"), &mcp_url(&base, slug, s))) } }
                            td { a href={ "/console/gateways/" (gateway_id) "/servers/" (sid) } aria-label={ "Features of " (sname) } { "Tools, prompts, resources" } }
                            td {
                                @if manage {
                                    (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/gateways/{gateway_id}/servers/{sid}"), label: "Hide", what: format!("{sname} from {name}"), back: &back, danger: true }, html! {}))
                                }
                            }
                        }
                    }
                }
            }
            @if manage && !servers.is_empty() {
                section.card {
                    h3 { "Expose a server, or change how it is exposed" }
                    form.grid method="post" action="/console/act" {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input type="hidden" name="_method" value="PUT";
                        input type="hidden" name="_back" value=(back);
                        label for="expose-server" { "Server" }
                        select id="expose-server" name="_path" required {
                            @for s in &servers { option value={ "/api/v1/gateways/" (gateway_id) "/servers/" (id(s)) } { (text(&s["name"])) } }
                        }
                        label for="expose-identity" { "Identity" }
                        select id="expose-identity" name="identity" {
                            option value="shared" { "shared (one service credential for every caller)" }
                            option value="per_user" { "per-user (each user brings their own)" }
                        }
                        fieldset.credential {
                            legend { "Shared credential (optional; shared only). Sent upstream for every caller, sealed at rest, never shown again." }
                            label for="expose-cred-type" { "Kind" }
                            select id="expose-cred-type" name="credential.type" {
                                option value="" { "none" }
                                option value="bearer" { "bearer token (Authorization: Bearer …)" }
                                option value="header" { "a header of its own" }
                                @if !users.is_empty() { option value="identity_of" { "a user's identity (a service account, typed in or connected by OAuth on People)" } }
                            }
                            label for="expose-cred-token" { "Bearer token" }
                            input id="expose-cred-token" name="credential.token" type="password" autocomplete="off";
                            label for="expose-cred-name" { "Header name" }
                            input id="expose-cred-name" name="credential.name" autocomplete="off" placeholder="X-Api-Key";
                            label for="expose-cred-value" { "Header value" }
                            input id="expose-cred-value" name="credential.value" type="password" autocomplete="off";
                            @if !users.is_empty() {
                                label for="expose-cred-user" { "Service account" }
                                select id="expose-cred-user" name="credential.user_id" {
                                    option value="" { "—" }
                                    @for u in &users { option value=(id(u)) { (text(&u["name"])) } }
                                }
                            }
                        }
                        button type="submit" { "Expose" }
                    }
                }
            }
        }
        section {
            h2 { "Who may connect" }
            p {
                "Granted to the teams: "
                @if teams.is_empty() { span.muted { "none, so nobody may connect" } }
                @for t in &teams { (tag(&text(&t["name"]))) " " }
                "· " a href="/console/teams" { "Manage grants on Teams" }
            }
            p {
                @if flag(g, "approve_hosts") {
                    "A headed app new to this gateway waits for an admin's approval (Apps & Agents) before its first request goes through. "
                } @else {
                    "A headed app new to this gateway is let in at once. "
                }
                @if api.can(Verb::Put, "/api/v1/gateways/{id}/host-approval") {
                    (action(&signed, &Action { method: "PUT", path: format!("/api/v1/gateways/{gateway_id}/host-approval"), label: if flag(g, "approve_hosts") { "Stop requiring approval" } else { "Require approval of new apps" }, what: String::new(), back: &back, danger: false }, html! {
                        input type="hidden" name="required" value=(if flag(g, "approve_hosts") { "false" } else { "true" });
                    }))
                }
            }
        }
        @if let Some(connections) = &connections {
            section {
                h2 id="connections" { "Connections" }
                p.muted { "One per host × user on this gateway. Disabling one cuts that link only." }
                table {
                    thead { tr { th { "Host" } th { "User" } th { "State" } th { "Created" } th { "Last used" } th.num { "Live tokens" } th { "Break-glass" } } }
                    tbody {
                        @if connections.is_empty() { (none_yet(7, "No connection yet.")) }
                        @for c in connections {
                            @let what = format!("the connection of {} for {}", text(&c["host_name"]), text(&c["user_name"]));
                            tr {
                                td { a href={ "/console/hosts/" (text(&c["host_id"])) } { (text(&c["host_name"])) } }
                                td { (text(&c["user_name"])) }
                                td { (badge(flag(c, "enabled"))) }
                                td { (when(&c["created_at"])) }
                                td { (when(&c["last_used_at"])) }
                                td.num { (text(&c["live_tokens"])) }
                                td { (toggle(&signed, "connections", id(c), flag(c, "enabled"), &what, &back)) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::page(&signed, "/console/gateways", &name, done.notice(), body)
}
