//! The connection flow of a token-based host (Apps & Agents → Generate token): the same
//! steps as any connection. First the gateway is confirmed (what it exposes, how each
//! server knows the caller); then the signed-in user brings an identity for each
//! per-user server it exposes that they lack; only then is the token generated, and
//! shown once. Every step is an admin API call as the user, like the rest of the console,
//! but one: an OAuth-protected server is connected by the user themself ([`start`]),
//! at its own sign-in, as on the OAuth consent page.

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::super::act::{refused, safe_back};
use super::super::layout::{self, Action, action, badge, copyable, tag, text};
use super::super::session::Signed;
use super::super::signin::field;
use super::super::{Console, Done};
use super::{by_id, flag, id, mcp_url, name_in};
use crate::oauth_identity;
use crate::routes::Verb;
use crate::store::identities::missing_on_gateway;

/// The gateway picked on the host's page.
#[derive(Deserialize, Default)]
pub struct Pick {
    gateway_id: Option<String>,
}

/// Where one exposed server stands for the signed-in user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Shared: the gateway sends its own credential (or none); nothing to bring.
    Shared,
    /// Per-user, and the user has an enabled identity for it.
    Ready,
    /// Per-user, the user's identity is disabled: refused with `identity_disabled`
    /// until someone enables it (bringing a new one keeps it disabled).
    Disabled,
    /// Per-user, connected by OAuth, and the downstream refused its refresh: refused
    /// with `identity_expired` until the user connects again.
    Reconnect,
    /// Per-user and the user has none: bring one before the token is made.
    Missing,
    /// Per-user, and this user may not read identities: the answer will say.
    Unknown,
}

/// `exposure`'s need, given the user's identities (`None`: not readable).
pub fn need_of(exposure: &Value, identities: Option<&[Value]>) -> Need {
    if exposure["identity"] != "per_user" {
        return Need::Shared;
    }
    let Some(identities) = identities else {
        return Need::Unknown;
    };
    match identities
        .iter()
        .find(|i| i["server_id"] == exposure["server_id"])
    {
        Some(i) if !flag(i, "enabled") => Need::Disabled,
        Some(i) if i["oauth_status"] == oauth_identity::NEEDS_RECONNECT => Need::Reconnect,
        Some(_) => Need::Ready,
        None => Need::Missing,
    }
}

/// Whether one of the teams granted the gateway (`granted`, as the API lists them) holds
/// user `me`: `everyone` holds every user, the others their members.
pub fn granted_to(me: i64, granted: &[Value]) -> bool {
    granted.iter().any(|t| {
        flag(t, "everyone")
            || t["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|u| u.as_i64() == Some(me)))
    })
}

fn need_badge(need: Need) -> Markup {
    match need {
        Need::Shared => tag("nothing to bring (shared)"),
        Need::Ready => html! { span.badge.on { "identity ready" } },
        Need::Disabled => html! { span.badge.off { "identity disabled" } },
        Need::Missing => html! { span.badge.off { "identity missing" } },
        Need::Reconnect => html! { span.badge.off { "needs reconnecting" } },
        Need::Unknown => tag("not checked"),
    }
}

fn not_found(signed: &Signed, what: &str, back: &str) -> Response {
    layout::page_with_status(
        StatusCode::NOT_FOUND,
        signed,
        "/console/hosts",
        what,
        None,
        html! { p { a href=(back) { "Back" } } },
    )
}

pub async fn page(
    State(console): State<Console>,
    signed: Signed,
    Path(host_id): Path<i64>,
    Query(pick): Query<Pick>,
    Query(done): Query<Done>,
) -> Response {
    let api = &signed.api;
    let host_back = format!("/console/hosts/{host_id}");
    if !api.can(Verb::Post, "/api/v1/hosts/{id}/tokens") {
        return layout::page_with_status(
            StatusCode::FORBIDDEN,
            &signed,
            "/console/hosts",
            "Not allowed",
            None,
            html! { p.error { "You need the capability tokens.manage for this." } },
        );
    }
    let hosts = api.items("/api/v1/hosts").await;
    let Some(host) = hosts.iter().find(|h| id(h) == host_id) else {
        return not_found(&signed, "No such host", "/console/hosts");
    };
    let gateways = api.items("/api/v1/gateways").await;
    let gateway_id = pick
        .gateway_id
        .as_deref()
        .and_then(|g| g.trim().parse::<i64>().ok());
    let Some(g) = gateway_id.and_then(|gid| gateways.iter().find(|g| id(g) == gid)) else {
        return not_found(&signed, "No such gateway", &host_back);
    };
    let gateway_id = id(g);
    let me = api.admin.user_id;
    let exposed = api
        .items(&format!("/api/v1/gateways/{gateway_id}/servers"))
        .await;
    let servers = api.items("/api/v1/servers").await;
    let server_names = by_id(&servers);
    let identities = api
        .get(&format!("/api/v1/users/{me}/identities"))
        .await
        .ok()
        .and_then(|v| v.as_array().cloned());
    // The per-user servers here the user lacks an identity for that sign in by OAuth:
    // the user connects those themself, whatever their capabilities (their own account,
    // as on the consent page); the others are typed in through the API (users.manage).
    // Their names come along: the user connects them without reading the catalog.
    let oauth: HashMap<i64, String> = missing_on_gateway(&console.app.db, gateway_id, me)
        .await
        .map(|m| {
            m.into_iter()
                .filter(|m| m.oauth.0)
                .map(|m| (m.server_id, m.name))
                .collect()
        })
        .unwrap_or_default();
    let is_oauth = |e: &Value| {
        e["server_id"]
            .as_i64()
            .is_some_and(|s| oauth.contains_key(&s))
    };
    let needs: Vec<(Value, Need)> = exposed
        .into_iter()
        .map(|e| {
            let need = match need_of(&e, identities.as_deref()) {
                // Known without reading identities: the user's own, from the store.
                Need::Unknown if is_oauth(&e) => Need::Missing,
                need => need,
            };
            (e, need)
        })
        .collect();
    let missing: Vec<&Value> = needs
        .iter()
        .filter(|(_, n)| matches!(n, Need::Missing | Need::Reconnect))
        .map(|(e, _)| e)
        .collect();
    let can_bring = api.can(Verb::Put, "/api/v1/users/{id}/identities/{server_id}");
    let typed = missing.iter().filter(|e| !is_oauth(e)).count();
    // What this user can still bring here; the token waits until it is brought.
    let to_bring = missing.iter().filter(|e| is_oauth(e) || can_bring).count();
    // The API refuses a token for a gateway none of the user's teams is granted; say so
    // before the user brings identities for nothing.
    let granted = api
        .get(&format!("/api/v1/gateways/{gateway_id}/teams"))
        .await
        .ok()
        .and_then(|v| v.as_array().map(|teams| granted_to(me, teams)))
        .unwrap_or(true);
    let base = console
        .app
        .oauth
        .resource_base_urls
        .first()
        .cloned()
        .unwrap_or_default();
    let host_name = text(&host["name"]);
    let gateway_name = text(&g["name"]);
    let slug = g["slug"].as_str().unwrap_or("");
    let back = format!("/console/hosts/{host_id}/connect?gateway_id={gateway_id}");
    let body = html! {
        p.muted { "The token will act as you (" strong { (signed.name) } ") on this gateway: the servers below see your identity, never the agent's token." }
        ol.steps {
            li {
                h2 { "Confirm the gateway" }
                div.state { strong { (gateway_name) } " " code { (slug) } " " (badge(flag(g, "enabled"))) }
                @if !granted {
                    p.error role="alert" { "None of your teams is granted this gateway, so a token for it would be refused (gateway_not_granted). Ask for a grant on Teams, or pick another gateway." }
                }
                table {
                    thead { tr { th { "Server" } th { "Identity scheme" } th { "URL" } th { "You" } } }
                    tbody {
                        @if needs.is_empty() { (layout::none_yet(4, "This gateway exposes no server yet: the token would reach nothing.")) }
                        @for (e, need) in &needs {
                            @let sid = e["server_id"].as_i64().unwrap_or(0);
                            tr {
                                td { (name_in(&server_names, &e["server_id"])) }
                                td { (tag(if e["identity"] == "per_user" { "per-user" } else { "shared" })) }
                                td { @if let Some(s) = server_names.get(&sid).and_then(|s| s["slug"].as_str()) { (copyable(&format!("url-{sid}"), &mcp_url(&base, slug, s))) } }
                                td { (need_badge(*need)) }
                            }
                        }
                    }
                }
                p { a href=(host_back) { "Pick another gateway" } }
            }
            li {
                h2 { "Bring your identities" }
                @if missing.is_empty() {
                    p.muted { "Nothing to bring: every per-user server here already knows you." }
                } @else {
                    p.muted { "Each per-user server gets your own credential for it, sealed at rest and never shown again. Without it, that server refuses the token with identity_missing." }
                    @if typed > 0 && !can_bring {
                        p.warning { "You have no identity for " (typed) " per-user server(s) here, and saving one needs the capability users.manage. Ask an admin, or use an enrollment link for yourself." }
                    }
                    @for e in &missing {
                        @let sid = e["server_id"].as_i64().unwrap_or(0);
                        @let sname = name_in(&server_names, &e["server_id"]);
                        @if let Some(oauth_name) = oauth.get(&sid) {
                            @let sname = oauth_name;
                            section.card.identity {
                                h3 { (sname) }
                                p.muted { "It signs in by OAuth: you sign in there, and it hands mcpguard a token for you, refreshed from then on." }
                                form.inline method="post" action="/console/connect" {
                                    input type="hidden" name="csrf" value=(signed.csrf);
                                    input type="hidden" name="server_id" value=(sid);
                                    input type="hidden" name="_back" value=(back);
                                    button type="submit" { "Connect your " (sname) " account" }
                                }
                            }
                        } @else if can_bring {
                            section.card.identity {
                                h3 { (sname) }
                                (action(&signed, &Action { method: "PUT", path: format!("/api/v1/users/{me}/identities/{sid}"), label: "Save identity", what: String::new(), back: &back, danger: false }, html! {
                                    input type="hidden" name="credential.type" value="bearer";
                                    label for={ "identity-" (sid) } { "Your bearer token for " (sname) }
                                    input id={ "identity-" (sid) } name="credential.token" type="password" autocomplete="off" required;
                                }))
                            }
                        }
                    }
                }
                @if needs.iter().any(|(_, n)| *n == Need::Disabled) {
                    p.warning { "An identity of yours here is disabled: that server refuses the token with identity_disabled until an admin enables it (People)." }
                }
            }
            li {
                h2 { "Generate the token" }
                @if !granted {
                    p.muted { "Not until one of your teams is granted the gateway." }
                } @else if to_bring == 0 {
                    section.card {
                        p { "For " strong { (host_name) } " on " strong { (gateway_name) } ". It is shown once, with Copy and Download." }
                        (action(&signed, &Action { method: "POST", path: format!("/api/v1/hosts/{host_id}/tokens"), label: "Generate token", what: String::new(), back: &host_back, danger: false }, html! {
                            input type="hidden" name="gateway_id" value=(gateway_id);
                            label for="token-expiry" { "Expires (UTC, optional)" }
                            input id="token-expiry" name="expires_at" type="datetime-local";
                        }))
                    }
                } @else {
                    p.muted { "Once every identity above is saved." }
                }
            }
        }
    };
    layout::page(
        &signed,
        "/console/hosts",
        &format!("Connect {host_name} to {gateway_name}"),
        done.notice(),
        body,
    )
}

/// `POST /console/connect` (`csrf`, `server_id`, `_back`, optional `user_id`): the
/// signed-in user connects their own account at an OAuth-protected server, or, with
/// `users.manage`, another user's (a service account that a shared exposure sends for
/// every caller: `identity_of`). The flow is bound to this browser by
/// the connect cookie (the console's own cookie is `SameSite=Strict` and scoped to
/// `/console`, so it is not sent to the callback), and comes back to the console page
/// it left.
pub async fn start(
    State(console): State<Console>,
    signed: Result<Signed, Response>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let signed = match signed {
        Ok(s) => s,
        Err(to_sign_in) => return to_sign_in,
    };
    let Ok(Form(fields)) = form else {
        return refused(
            &signed,
            StatusCode::BAD_REQUEST,
            "Malformed form.",
            "/console/hosts",
        );
    };
    if !signed.csrf_ok(field(&fields, "csrf")) {
        tracing::warn!(
            user_id = signed.api.admin.user_id,
            "console connect refused: CSRF token missing or wrong"
        );
        return refused(
            &signed,
            StatusCode::FORBIDDEN,
            "The form did not come from this page. Reload the page and try again.",
            "/console/hosts",
        );
    }
    let Some(server_id) = field(&fields, "server_id").and_then(|s| s.parse::<i64>().ok()) else {
        return refused(
            &signed,
            StatusCode::BAD_REQUEST,
            "No server to connect.",
            "/console/hosts",
        );
    };
    let back = safe_back(field(&fields, "_back"));
    let return_to = format!(
        "{back}{}done=connected",
        if back.contains('?') { '&' } else { '?' }
    );
    let me = signed.api.admin.user_id;
    let user_id = match field(&fields, "user_id") {
        None => me,
        Some(u) => match u.parse::<i64>() {
            Ok(u) => u,
            Err(_) => {
                return refused(
                    &signed,
                    StatusCode::BAD_REQUEST,
                    "No such user.",
                    "/console/hosts",
                );
            }
        },
    };
    if user_id != me
        && !signed
            .api
            .can(Verb::Put, "/api/v1/users/{id}/identities/{server_id}")
    {
        return refused(
            &signed,
            StatusCode::FORBIDDEN,
            "Connecting an account for another user needs the capability users.manage.",
            "/console/hosts",
        );
    }
    let started = async {
        if !crate::store::users::user_exists(&console.app.db, user_id).await? {
            return Err(crate::error::ApiError::NotFound("user"));
        }
        let (set_cookie, binding) = oauth_identity::connect_cookie(&console.app)?;
        let url = oauth_identity::begin_connect(
            &console.app,
            (user_id, me),
            &binding,
            server_id,
            &return_to,
        )
        .await?;
        Ok::<_, crate::error::ApiError>(url.map(|url| (url, set_cookie)))
    };
    match started.await {
        Ok(Some((url, set_cookie))) => {
            tracing::info!(
                user_id,
                started_by = me,
                server_id,
                "oauth connect started from the console"
            );
            let mut response = StatusCode::SEE_OTHER.into_response();
            for (name, value) in [(header::LOCATION, url), (header::SET_COOKIE, set_cookie)] {
                if let Ok(v) = value.parse() {
                    response.headers_mut().append(name, v);
                }
            }
            crate::pages::no_store(response)
        }
        Ok(None) => refused(
            &signed,
            StatusCode::NOT_FOUND,
            "That server does not sign in by OAuth.",
            "/console/hosts",
        ),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_per_user_server_needs_the_users_own_enabled_identity() {
        let shared = json!({"server_id": 1, "identity": "shared"});
        let per_user = json!({"server_id": 2, "identity": "per_user"});
        let mine = [json!({"server_id": 2, "enabled": true})];
        let off = [json!({"server_id": 2, "enabled": false})];
        let other = [json!({"server_id": 3, "enabled": true})];
        assert_eq!(need_of(&shared, Some(&[])), Need::Shared);
        assert_eq!(need_of(&shared, None), Need::Shared);
        assert_eq!(need_of(&per_user, Some(&mine)), Need::Ready);
        assert_eq!(need_of(&per_user, Some(&off)), Need::Disabled);
        let expired = [json!({"server_id": 2, "enabled": true, "oauth_status": "needs_reconnect"})];
        let expired_off =
            [json!({"server_id": 2, "enabled": false, "oauth_status": "needs_reconnect"})];
        let connected = [json!({"server_id": 2, "enabled": true, "oauth_status": "connected"})];
        assert_eq!(need_of(&per_user, Some(&expired)), Need::Reconnect);
        assert_eq!(need_of(&per_user, Some(&expired_off)), Need::Disabled);
        assert_eq!(need_of(&per_user, Some(&connected)), Need::Ready);
        assert_eq!(need_of(&per_user, Some(&other)), Need::Missing);
        assert_eq!(need_of(&per_user, Some(&[])), Need::Missing);
        assert_eq!(need_of(&per_user, None), Need::Unknown);
    }

    #[test]
    fn a_gateway_is_granted_through_everyone_or_a_team_the_user_is_in() {
        let everyone = json!({"everyone": true, "members": []});
        let support = json!({"everyone": false, "members": [2, 3]});
        assert!(granted_to(7, &[everyone]));
        assert!(granted_to(3, std::slice::from_ref(&support)));
        assert!(!granted_to(7, std::slice::from_ref(&support)));
        assert!(!granted_to(7, &[]));
    }
}
