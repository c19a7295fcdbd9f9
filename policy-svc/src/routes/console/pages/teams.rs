//! Teams: who may connect to which gateway. Per team its members (add, remove) and the
//! gateways granted to it (grant, take away); creating and deleting teams. The built-in
//! `everyone` team holds every user and has no member rows.

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::super::layout::{self, Action, action, none_yet, tag, text, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{by_id, flag, id, name_in};
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let teams = api.items("/api/v1/teams").await;
    let users = api.items("/api/v1/users").await;
    let gateways = api.items("/api/v1/gateways").await;
    let (user_names, gateway_names) = (by_id(&users), by_id(&gateways));
    let back = "/console/teams";
    let manage = api.can(Verb::Post, "/api/v1/teams");
    let grant = api.can(Verb::Put, "/api/v1/gateways/{id}/teams/{team_id}");
    let body = html! {
        p.muted { "A user may connect an app or agent to a gateway when one of their teams is granted it. Taking a member out, or a grant away, refuses their connections from the next request, unless another of their teams is granted the gateway." }
        @if manage {
            section.card {
                h2 { "New team" }
                (action(&signed, &Action { method: "POST", path: "/api/v1/teams".into(), label: "Create team", what: String::new(), back, danger: false }, html! {
                    label for="team-name" { "Name" }
                    input id="team-name" name="name" required maxlength="200" placeholder="Support";
                }))
            }
        }
        @if teams.is_empty() { p.muted { "No team, or you may not read them." } }
        @for t in &teams {
            @let tid = id(t);
            @let name = text(&t["name"]);
            @let everyone = flag(t, "everyone");
            @let members: Vec<i64> = t["members"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_i64).collect();
            @let granted: Vec<i64> = t["gateways"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_i64).collect();
            section.card.team id={ "team-" (tid) } {
                h2 { (name) " " @if everyone { (tag("every user")) } " " span.muted.small { "created " (when(&t["created_at"])) } }
                div.columns {
                    div {
                        h3 { "Members" }
                        table {
                            tbody {
                                @if everyone { (none_yet(2, "Every user, always.")) }
                                @else if members.is_empty() { (none_yet(2, "No member yet.")) }
                                @for m in &members {
                                    @let uname = name_in(&user_names, &serde_json::Value::from(*m));
                                    tr {
                                        td { (uname) }
                                        td.num { @if manage {
                                            (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/teams/{tid}/members/{m}"), label: "Remove", what: format!("{uname} from the team {name}"), back, danger: true }, html! {}))
                                        } }
                                    }
                                }
                            }
                        }
                        @if manage && !everyone {
                            @let candidates: Vec<_> = users.iter().filter(|u| !members.contains(&id(u))).collect();
                            @if !candidates.is_empty() {
                                form.inline method="post" action="/console/act" {
                                    input type="hidden" name="csrf" value=(signed.csrf);
                                    input type="hidden" name="_method" value="PUT";
                                    input type="hidden" name="_back" value=(back);
                                    label for={ "member-" (tid) } { "User" }
                                    select id={ "member-" (tid) } name="_path" {
                                        @for u in &candidates { option value={ "/api/v1/teams/" (tid) "/members/" (id(u)) } { (text(&u["name"])) } }
                                    }
                                    button type="submit" { "Add member" }
                                }
                            }
                        }
                    }
                    div {
                        h3 { "Gateways granted" }
                        table {
                            tbody {
                                @if granted.is_empty() { (none_yet(2, "No gateway granted.")) }
                                @for g in &granted {
                                    @let gname = name_in(&gateway_names, &serde_json::Value::from(*g));
                                    tr {
                                        td { a href={ "/console/gateways/" (g) } { (gname) } }
                                        td.num { @if grant {
                                            (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/gateways/{g}/teams/{tid}"), label: "Take away", what: format!("the gateway {gname} from the team {name}"), back, danger: true }, html! {}))
                                        } }
                                    }
                                }
                            }
                        }
                        @if grant {
                            @let candidates: Vec<_> = gateways.iter().filter(|g| !granted.contains(&id(g))).collect();
                            @if !candidates.is_empty() {
                                form.inline method="post" action="/console/act" {
                                    input type="hidden" name="csrf" value=(signed.csrf);
                                    input type="hidden" name="_method" value="PUT";
                                    input type="hidden" name="_back" value=(back);
                                    label for={ "grant-" (tid) } { "Gateway" }
                                    select id={ "grant-" (tid) } name="_path" {
                                        @for g in &candidates { option value={ "/api/v1/gateways/" (id(g)) "/teams/" (tid) } { (text(&g["name"])) } }
                                    }
                                    button type="submit" { "Grant gateway" }
                                }
                            }
                        }
                    }
                }
                @if manage && !everyone {
                    p { (action(&signed, &Action { method: "DELETE", path: format!("/api/v1/teams/{tid}"), label: "Delete team", what: format!("the team {name}"), back, danger: true }, html! {})) }
                }
            }
        }
    };
    layout::page(&signed, "/console/teams", "Teams", done.notice(), body)
}
