//! Overview: the gateways with the URLs clients connect to, and recent refusals by
//! layer.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::super::layout::{self, badge, copyable, none_yet, text, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use super::{flag, id, mcp_url};
use crate::routes::Verb;

/// How many recent refusals the counts by layer are taken over.
const RECENT: usize = 500;

pub async fn page(
    State(console): State<Console>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let base = console
        .app
        .oauth
        .resource_base_urls
        .first()
        .cloned()
        .unwrap_or_default();
    let gateways = api.items("/api/v1/gateways").await;
    let all_servers = api.items("/api/v1/servers").await;
    let server_names = super::by_id(&all_servers);
    let mut exposed = Vec::new();
    for g in &gateways {
        exposed.push(
            api.items(&format!("/api/v1/gateways/{}/servers", id(g)))
                .await,
        );
    }
    let refusals = if api.can(Verb::Get, "/api/v1/audit") {
        match api
            .get(&format!(
                "/api/v1/audit?kind=decision&decision=deny&limit={RECENT}"
            ))
            .await
        {
            Ok(page) => page["entries"].as_array().cloned(),
            Err(_) => None,
        }
    } else {
        None
    };
    let body = html! {
        section {
            h2 { "Gateways" }
            p.muted { "Each gateway is one URL per server it exposes. Clients connect with a token made for the gateway (Apps & Agents) or by OAuth." }
            table {
                thead { tr { th { "Gateway" } th { "State" } th { "Servers and their URLs" } } }
                tbody {
                    @if gateways.is_empty() { (none_yet(3, "No gateway yet, or you may not read gateways.")) }
                    @for (g, servers) in gateways.iter().zip(&exposed) {
                        tr {
                            td { a href={ "/console/gateways/" (id(g)) } { (text(&g["name"])) } br; code.muted { (text(&g["slug"])) } }
                            td { (badge(flag(g, "enabled"))) }
                            td {
                                @if servers.is_empty() { span.muted { "exposes no server" } }
                                ul.plain {
                                    @for e in servers {
                                        @let sid = e["server_id"].as_i64().unwrap_or(0);
                                        @let slug = server_names.get(&sid).and_then(|s| s["slug"].as_str()).unwrap_or("");
                                        li {
                                            @if slug.is_empty() { "server #" (sid) }
                                            @else {
                                                (copyable(&format!("url-{}-{sid}", id(g)), &mcp_url(&base, g["slug"].as_str().unwrap_or(""), slug)))
                                            }
                                            " " (layout::tag(e["identity"].as_str().unwrap_or("")))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(entries) = &refusals {
            section {
                h2 { "Recent refusals by layer" }
                @let counts = by_code(entries);
                @if counts.is_empty() {
                    p.muted { "No refusal in the last " (RECENT) " decisions." }
                } @else {
                    table.narrow {
                        thead { tr { th { "Refused because" } th.num { "Count" } } }
                        tbody { @for (code, n) in &counts { tr { td { code { (code) } } td.num { (n) } } } }
                    }
                    h3 { "Latest" }
                    table {
                        thead { tr { th { "When" } th { "Code" } th { "Gateway / server" } th { "Host" } th { "Tool" } } }
                        tbody {
                            @for e in entries.iter().take(10) {
                                tr {
                                    td { (when(&e["at"])) }
                                    td { code { (text(&e["code"])) } }
                                    td { (text(&e["gateway"])) " / " (text(&e["server"])) }
                                    td { (text(&e["host_id"])) }
                                    td { (text(&e["tool"])) }
                                }
                            }
                        }
                    }
                    p { a href="/console/audit?kind=decision&decision=deny" { "All refusals in the audit log" } }
                }
            }
        }
    };
    layout::page(&signed, "/console", "Overview", done.notice(), body)
}

/// Refusal codes (the layer that refused) and how often, most frequent first.
fn by_code(entries: &[serde_json::Value]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in entries {
        if let Some(code) = e["code"].as_str() {
            *counts.entry(code.to_owned()).or_default() += e["suppressed"]
                .as_u64()
                .map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX));
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}
