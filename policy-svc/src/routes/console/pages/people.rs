//! People: users with their roles, roles with their capabilities, and per user their
//! identities (metadata only, with toggles), password and personal admin tokens.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::super::layout::{self, Action, action, badge, none_yet, tag, text, toggle, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{by_id, flag, id, name_in};
use crate::auth::Capability;
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let users = api.items("/api/v1/users").await;
    let roles = api.items("/api/v1/roles").await;
    let role_names = by_id(&roles);
    let back = "/console/people";
    let manage = api.can(Verb::Post, "/api/v1/users");
    let body = html! {
        section {
            h2 { "Users" }
            table {
                thead { tr { th { "User" } th { "Role" } th { "Password" } th { "State" } th { "Created" } th { "Break-glass" } } }
                tbody {
                    @if users.is_empty() { (none_yet(6, "No user.")) }
                    @for u in &users {
                        @let name = text(&u["name"]);
                        tr {
                            td { a href={ "/console/people/" (id(u)) } { (name) } }
                            td { (name_in(&role_names, &u["role_id"])) }
                            td { @if flag(u, "has_password") { "set" } @else { span.muted { "none" } } }
                            td { (badge(flag(u, "enabled"))) }
                            td { (when(&u["created_at"])) }
                            td { (toggle(&signed, "users", id(u), flag(u, "enabled"), &format!("the user {name}"), back)) }
                        }
                    }
                }
            }
            @if manage && !roles.is_empty() {
                (action(&signed, &Action { method: "POST", path: "/api/v1/users".into(), label: "Add user", what: String::new(), back, danger: false }, html! {
                    label for="user-name" { "Name" }
                    input id="user-name" name="name" required;
                    label for="user-role" { "Role" }
                    select id="user-role" name="role_id" { @for r in &roles { option value=(id(r)) { (text(&r["name"])) } } }
                }))
            }
        }
        section {
            h2 { "Roles and their capabilities" }
            p.muted { "Access depends on capabilities only. A capability brings the reads it cannot work without." }
            table {
                thead { tr { th { "Role" } th { "Capabilities" } } }
                tbody {
                    @for r in &roles {
                        tr {
                            td { (text(&r["name"])) }
                            td { @for c in r["capabilities"].as_array().into_iter().flatten() { (tag(c.as_str().unwrap_or(""))) " " } }
                        }
                    }
                }
            }
            @if api.can(Verb::Post, "/api/v1/roles") {
                (action(&signed, &Action { method: "POST", path: "/api/v1/roles".into(), label: "Create role", what: String::new(), back, danger: false }, html! {
                    label for="role-name" { "Name" }
                    input id="role-name" name="name" required;
                    input type="hidden" name="capabilities[]" value="";
                    fieldset.caps {
                        legend { "Capabilities" }
                        @for cap in Capability::ALL {
                            label.check { input type="checkbox" name="capabilities[]" value=(cap.as_str()); " " (cap.as_str()) }
                        }
                    }
                }))
            }
        }
    };
    layout::page(&signed, "/console/people", "People", done.notice(), body)
}

pub async fn one(
    State(console): State<Console>,
    signed: Signed,
    Path(user_id): Path<i64>,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let users = api.items("/api/v1/users").await;
    let Some(user) = users.iter().find(|u| id(u) == user_id) else {
        return layout::page_with_status(
            StatusCode::NOT_FOUND,
            &signed,
            "/console/people",
            "No such user",
            None,
            html! { p { a href="/console/people" { "All people" } } },
        );
    };
    let servers = api.items("/api/v1/servers").await;
    let server_names = by_id(&servers);
    let identities = api
        .items(&format!("/api/v1/users/{user_id}/identities"))
        .await;
    let manage = api.can(Verb::Get, "/api/v1/users/{id}/admin-tokens");
    let admin_tokens = if manage {
        api.items(&format!("/api/v1/users/{user_id}/admin-tokens"))
            .await
    } else {
        Vec::new()
    };
    let can_bring = api.can(Verb::Put, "/api/v1/users/{id}/identities/{server_id}");
    // OAuth-protected servers are connected at their own sign-in, not typed in.
    let oauth: Vec<i64> = if can_bring {
        crate::store::oauth_identities::oauth_server_ids(&console.app.db)
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let name = text(&user["name"]);
    let back = format!("/console/people/{user_id}");
    let body = html! {
        div.state { (badge(flag(user, "enabled"))) " " (toggle(&signed, "users", user_id, flag(user, "enabled"), &format!("the user {name}"), &back)) }
        section {
            h2 { "Identities" }
            p.muted { "The user's own credentials for per-user servers. Stored sealed; never shown again after saving." }
            table {
                thead { tr { th { "Server" } th { "Header" } th { "State" } th { "OAuth" } th { "Created" } th { "Break-glass" } } }
                tbody {
                    @if identities.is_empty() { (none_yet(6, "No identity.")) }
                    @for i in &identities {
                        @let server = name_in(&server_names, &i["server_id"]);
                        tr {
                            td { (server) }
                            td { code { (text(&i["header_name"])) } }
                            td { (badge(flag(i, "enabled"))) }
                            td { @match i["oauth_status"].as_str() {
                                Some("connected") => span.badge.on { "connected" },
                                Some(_) => span.badge.off { "needs reconnecting" },
                                None => "—",
                            } }
                            td { (when(&i["created_at"])) }
                            td { (toggle(&signed, "identities", id(i), flag(i, "enabled"), &format!("{name}'s identity for {server}"), &back)) }
                        }
                    }
                }
            }
            @if api.can(Verb::Put, "/api/v1/users/{id}/identities/{server_id}") && !servers.is_empty() {
                form.inline method="post" action="/console/act" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="_method" value="PUT";
                    input type="hidden" name="_back" value=(back);
                    label for="identity-server" { "Server" }
                    select id="identity-server" name="_path" {
                        @for s in &servers { option value={ "/api/v1/users/" (user_id) "/identities/" (id(s)) } { (text(&s["name"])) } }
                    }
                    input type="hidden" name="credential.type" value="bearer";
                    label for="identity-token" { "Bearer token" }
                    input id="identity-token" name="credential.token" type="password" autocomplete="off" required;
                    button type="submit" { "Save identity" }
                }
            }
            @if !oauth.is_empty() {
                form.inline method="post" action="/console/connect" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="user_id" value=(user_id);
                    input type="hidden" name="_back" value=(back);
                    label for="connect-server" { "OAuth-protected server" }
                    select id="connect-server" name="server_id" {
                        @for sid in &oauth { option value=(sid) { (name_in(&server_names, &serde_json::Value::from(*sid))) } }
                    }
                    button type="submit" { "Connect an account for " (name) }
                }
                p.muted { "You sign in at the server as the account to keep for this user: for a service account that a shared exposure sends for every caller (Gateways), sign in as the service account." }
            }
        }
        @if api.can(Verb::Put, "/api/v1/users/{id}/password") {
            section {
                h2 { "Password" }
                p.muted { "Setting it signs the user out everywhere." }
                (action(&signed, &Action { method: "PUT", path: format!("/api/v1/users/{user_id}/password"), label: "Set password", what: String::new(), back: &back, danger: false }, html! {
                    label for="new-password" { "New password (12 characters or more)" }
                    input id="new-password" name="password" type="password" autocomplete="new-password" minlength="12" required;
                }))
            }
        }
        @if manage {
            section {
                h2 { "Personal admin tokens" }
                table {
                    thead { tr { th { "Prefix" } th { "Bound to host" } th { "Created" } th { "State" } th {} } }
                    tbody {
                        @if admin_tokens.is_empty() { (none_yet(5, "No admin token.")) }
                        @for t in &admin_tokens {
                            @let prefix = text(&t["prefix"]);
                            tr {
                                td { code { (prefix) } }
                                td { (text(&t["host_id"])) }
                                td { (when(&t["created_at"])) }
                                td { @if t["revoked_at"].is_null() { span.badge.on { "live" } } @else { span.badge.off { "revoked" } } }
                                td { @if t["revoked_at"].is_null() {
                                    (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/admin-tokens/{}", id(t)), label: "Revoke", what: format!("the admin token {prefix}"), back: &back, danger: true }, html! {}))
                                } }
                            }
                        }
                    }
                }
                (action(&signed, &Action { method: "POST", path: format!("/api/v1/users/{user_id}/admin-tokens"), label: "Create admin token", what: String::new(), back: &back, danger: false }, html! {}))
            }
        }
    };
    layout::page(&signed, "/console/people", &name, done.notice(), body)
}
