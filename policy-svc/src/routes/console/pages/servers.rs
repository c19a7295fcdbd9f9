//! Servers: the upstream MCP servers, registering one, and their break-glass toggle.

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::super::layout::{self, Action, action, badge, none_yet, text, toggle, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{flag, id};
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let servers = api.items("/api/v1/servers").await;
    let back = "/console/servers";
    let body = html! {
        @if api.can(Verb::Post, "/api/v1/servers") {
            section.card {
                h2 { "Register a server" }
                (action(&signed, &Action { method: "POST", path: "/api/v1/servers".into(), label: "Register server", what: String::new(), back, danger: false }, html! {
                    label for="srv-name" { "Name" }
                    input id="srv-name" name="name" required placeholder="Tickets";
                    label for="srv-slug" { "Slug (in the URL)" }
                    input id="srv-slug" name="slug" required placeholder="tickets";
                    label for="srv-url" { "Upstream URL (streamable HTTP)" }
                    input id="srv-url" name="upstream_url" type="url" required placeholder="https://mcp.example.com/mcp";
                }))
            }
        }
        table {
            thead { tr { th { "Server" } th { "Slug" } th { "Upstream" } th { "State" } th { "Created" } th { "Break-glass" } } }
            tbody {
                @if servers.is_empty() { (none_yet(6, "No server yet.")) }
                @for s in &servers {
                    @let name = text(&s["name"]);
                    tr {
                        td { (name) }
                        td { code { (text(&s["slug"])) } }
                        td { code { (text(&s["upstream_url"])) } }
                        td { (badge(flag(s, "enabled"))) }
                        td { (when(&s["created_at"])) }
                        td { (toggle(&signed, "servers", id(s), flag(s, "enabled"), &format!("the server {name}"), back)) }
                    }
                }
            }
        }
    };
    layout::page(&signed, "/console/servers", "Servers", done.notice(), body)
}
