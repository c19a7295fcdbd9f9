//! OAuth signing keys: their states, and rotation.

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::super::layout::{self, Action, action, none_yet, tag, text, when};
use super::super::session::Signed;
use super::super::{Console, Done};
use crate::routes::Verb;

pub async fn list(State(_): State<Console>, signed: Signed, Query(done): Query<Done>) -> Response {
    let api = &signed.api;
    let keys = api.items("/api/v1/oauth/signing-keys").await;
    let back = "/console/keys";
    let body = html! {
        p.muted { "The active key signs access tokens; the next one is published before it signs; a retired one stays published until its last token has expired. Rotate at most once per filter refresh interval." }
        table {
            thead { tr { th { "Key id" } th { "State" } th { "Created" } th { "Activated" } th { "Retired" } } }
            tbody {
                @if keys.is_empty() { (none_yet(5, "No key, or you may not read them.")) }
                @for k in &keys {
                    tr {
                        td { code { (text(&k["kid"])) } }
                        td { (tag(k["state"].as_str().unwrap_or(""))) }
                        td { (when(&k["created_at"])) }
                        td { (when(&k["activated_at"])) }
                        td { (when(&k["retired_at"])) }
                    }
                }
            }
        }
        @if api.can(Verb::Post, "/api/v1/oauth/signing-keys/rotate") {
            (action(&signed, &Action { method: "POST", path: "/api/v1/oauth/signing-keys/rotate".into(), label: "Rotate signing keys", what: "the OAuth signing keys".into(), back, danger: true }, html! {}))
        }
    };
    layout::page(
        &signed,
        "/console/keys",
        "OAuth signing keys",
        done.notice(),
        body,
    )
}
