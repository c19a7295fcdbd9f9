//! Apps & Agents: every host (headed and token-based) with its state; creating a
//! token-based host; per host, its tokens (generate for a gateway, shown once; revoke;
//! rotate = generate another, then revoke the old one) and enrollments.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;

use super::super::layout::{self, Action, action, badge, none_yet, tag, text, toggle, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{by_id, flag, id, name_in};
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let hosts = api.items("/api/v1/hosts").await;
    let back = "/console/hosts";
    let body = html! {
        @if api.can(Verb::Post, "/api/v1/hosts") {
            section.card {
                h2 { "New token-based host" }
                p.muted { "A headless agent that connects with API access tokens, named after the agent. Headed apps (OAuth) appear here by themselves when someone connects one." }
                (action(&signed, &Action { method: "POST", path: "/api/v1/hosts".into(), label: "Create host", what: String::new(), back, danger: false }, html! {
                    label for="host-name" { "Name" }
                    input id="host-name" name="name" required placeholder="Feedback bot" maxlength="200";
                }))
            }
        }
        section {
            h2 { "Hosts" }
            table {
                thead { tr { th { "Host" } th { "Kind" } th { "State" } th { "Created" } th { "Break-glass" } } }
                tbody {
                    @if hosts.is_empty() { (none_yet(5, "No host yet.")) }
                    @for h in &hosts {
                        @let name = text(&h["name"]);
                        tr {
                            td { a href={ "/console/hosts/" (id(h)) } { (name) } }
                            td { (tag(if h["kind"] == "oauth" { "headed (OAuth)" } else { "token-based" })) }
                            td { (badge(flag(h, "enabled"))) @if flag(h, "pending") { " " (pending(&signed, id(h), back)) } }
                            td { (when(&h["created_at"])) }
                            td { (toggle(&signed, "hosts", id(h), flag(h, "enabled"), &format!("the host {name}"), back)) }
                        }
                    }
                }
            }
        }
    };
    layout::page(
        &signed,
        "/console/hosts",
        "Apps & Agents",
        done.notice(),
        body,
    )
}

pub async fn one(
    State(_): State<Console>,
    signed: Signed,
    Path(host_id): Path<i64>,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let hosts = api.items("/api/v1/hosts").await;
    let Some(host) = hosts.iter().find(|h| id(h) == host_id) else {
        return layout::page_with_status(
            StatusCode::NOT_FOUND,
            &signed,
            "/console/hosts",
            "No such host",
            None,
            html! { p { a href="/console/hosts" { "All hosts" } } },
        );
    };
    let gateways = api.items("/api/v1/gateways").await;
    let users = api.items("/api/v1/users").await;
    let (gateway_names, user_names) = (by_id(&gateways), by_id(&users));
    let manage = api.can(Verb::Post, "/api/v1/hosts/{id}/tokens");
    let tokens = if manage {
        api.items(&format!("/api/v1/hosts/{host_id}/tokens")).await
    } else {
        Vec::new()
    };
    let enrollments = if manage {
        api.items(&format!("/api/v1/hosts/{host_id}/enrollments"))
            .await
    } else {
        Vec::new()
    };
    let name = text(&host["name"]);
    let back = format!("/console/hosts/{host_id}");
    let token_based = host["kind"] == "token";
    let body = html! {
        div.state {
            (tag(if token_based { "token-based" } else { "headed (OAuth)" })) " " (badge(flag(host, "enabled"))) " "
            @if flag(host, "pending") { (pending(&signed, host_id, &back)) " " }
            (toggle(&signed, "hosts", host_id, flag(host, "enabled"), &format!("the host {name}"), &back))
        }
        @if manage && token_based {
            section.card {
                h2 { "Generate a token" }
                p.muted { "The token reaches only the servers the chosen gateway exposes, as you. Next: confirm the gateway and bring an identity for each per-user server it exposes; then the token is shown once. To rotate: generate a new one, update the agent, then revoke the old one; both work in between." }
                form.inline method="get" action={ "/console/hosts/" (host_id) "/connect" } {
                    label for="token-gateway" { "Gateway" }
                    (gateway_select("token-gateway", &gateways))
                    button type="submit" { "Continue" }
                }
            }
        }
        @if manage {
            section {
                h2 { "Tokens" }
                table {
                    thead { tr { th { "Prefix" } th { "Gateway" } th { "User" } th { "Created" } th { "Last used" } th { "Expires" } th { "State" } th {} } }
                    tbody {
                        @if tokens.is_empty() { (none_yet(8, "No token yet.")) }
                        @for t in &tokens {
                            @let prefix = text(&t["prefix"]);
                            tr {
                                td { code { (prefix) } }
                                td { (name_in(&gateway_names, &t["gateway_id"])) }
                                td { (name_in(&user_names, &t["user_id"])) }
                                td { (when(&t["created_at"])) }
                                td { (when(&t["last_used_at"])) }
                                td { (when(&t["expires_at"])) }
                                td { @if t["revoked_at"].is_null() { span.badge.on { "live" } } @else { span.badge.off { "revoked" } } }
                                td {
                                    @if t["revoked_at"].is_null() {
                                        // Rotation: a new token for the same connection; this one stays until revoked.
                                        (action(&signed, &Action { method: "POST", path: format!("/api/v1/hosts/{host_id}/tokens"), label: "Rotate", what: String::new(), back: &back, danger: false }, html! {
                                            input type="hidden" name="gateway_id" value=(text(&t["gateway_id"]));
                                            input type="hidden" name="user_id" value=(text(&t["user_id"]));
                                        }))
                                        " "
                                        (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/tokens/{}", id(t)), label: "Revoke", what: format!("the token {prefix}"), back: &back, danger: true }, html! {}))
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if token_based { (enrollments_section(&signed, host_id, &enrollments, &gateways, &users, &back)) }
        }
    };
    layout::page(&signed, "/console/hosts", &name, done.notice(), body)
}

/// A headed host waiting for approval (on a gateway that requires it): its badge, and
/// Approve for those who may let it in.
fn pending(signed: &Signed, host_id: i64, back: &str) -> Markup {
    html! {
        span.badge.off { "pending approval" }
        @if signed.api.can(Verb::Post, "/api/v1/hosts/{id}/approve") {
            " "
            (action(signed, &Action { method: "POST", path: format!("/api/v1/hosts/{host_id}/approve"), label: "Approve", what: String::new(), back, danger: false }, html! {}))
        }
    }
}

pub fn gateway_select(id_attr: &str, gateways: &[Value]) -> Markup {
    html! {
        select id=(id_attr) name="gateway_id" required {
            @for g in gateways { option value=(id(g)) { (text(&g["name"])) " (" (text(&g["slug"])) ")" } }
        }
    }
}

fn enrollments_section(
    signed: &Signed,
    host_id: i64,
    enrollments: &[Value],
    gateways: &[Value],
    users: &[Value],
    back: &str,
) -> Markup {
    let (gateway_names, user_names) = (by_id(gateways), by_id(users));
    html! {
        section {
            h2 { "Enrollments and per-user tokens" }
            p.muted { "For an agent that acts for many users: each user opens their enrollment link once, signs in and brings their identities; then claim that user's per-user token here (shown once)." }
            table {
                thead { tr { th { "User" } th { "Gateway" } th { "Status" } th { "Expires" } th {} } }
                tbody {
                    @if enrollments.is_empty() { (none_yet(5, "No enrollment yet.")) }
                    @for e in enrollments {
                        tr {
                            td { (name_in(&user_names, &e["user_id"])) }
                            td { (name_in(&gateway_names, &e["gateway_id"])) }
                            td { (tag(e["status"].as_str().unwrap_or(""))) }
                            td { (when(&e["expires_at"])) }
                            td {
                                @if e["status"] == "completed" {
                                    (action(signed, &Action { method: "POST", path: format!("/api/v1/enrollments/{}/token", id(e)), label: "Claim per-user token", what: String::new(), back, danger: false }, html! {}))
                                }
                            }
                        }
                    }
                }
            }
            @if !users.is_empty() {
                (action(signed, &Action { method: "POST", path: format!("/api/v1/hosts/{host_id}/enrollments"), label: "Create enrollment link", what: String::new(), back, danger: false }, html! {
                    label for="enroll-user" { "User" }
                    select id="enroll-user" name="user_id" required { @for u in users { option value=(id(u)) { (text(&u["name"])) } } }
                    label for="enroll-gateway" { "Gateway" }
                    (gateway_select("enroll-gateway", gateways))
                }))
            }
        }
    }
}
