//! The console's layout and the small pieces every page is made of: badges, times,
//! copyable values and the action form (a button that posts one admin API call through
//! `/console/act`). Templates are maud: checked at compile time, escaped by default.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::session::Signed;
use crate::auth::Capability;
use crate::pages::no_store;

/// The one stylesheet and the one script (copy to clipboard); nothing inline, so the
/// CSP can forbid inline script and style.
pub const CSS: &str = include_str!("static/console.css");
pub const JS: &str = include_str!("static/console.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The areas of the console, in the order of the navigation, with the read that shows
/// each one (`None`: every signed-in user).
const AREAS: &[(&str, &str, Option<Capability>)] = &[
    ("Overview", "/console", None),
    (
        "Apps & Agents",
        "/console/hosts",
        Some(Capability::HostsRead),
    ),
    (
        "Gateways",
        "/console/gateways",
        Some(Capability::GatewaysRead),
    ),
    ("Servers", "/console/servers", Some(Capability::ServersRead)),
    ("People", "/console/people", Some(Capability::UsersRead)),
    ("Teams", "/console/teams", Some(Capability::UsersRead)),
    ("Audit", "/console/audit", Some(Capability::AuditRead)),
    ("Signing keys", "/console/keys", Some(Capability::UsersRead)),
];

/// Any console page: security headers, never cached.
pub fn respond(status: StatusCode, doc: Markup) -> Response {
    let mut response = (status, doc.into_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    no_store(response)
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · mcpguard console" }
            link rel="stylesheet" href="/console/static/console.css";
            script src="/console/static/console.js" defer {}
        }
    }
}

/// A page for someone not signed in (sign-in, links, errors before a session).
pub fn bare(status: StatusCode, title: &str, body: Markup) -> Response {
    respond(
        status,
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body.bare {
                    main.narrow {
                        p.brand { "mcpguard" }
                        h1 { (title) }
                        (body)
                    }
                }
            }
        },
    )
}

/// A page of the signed-in console: navigation (the areas this user may read), who is
/// signed in, sign-out, the outcome of the last action, then `body`.
pub fn page(
    signed: &Signed,
    current: &str,
    title: &str,
    notice: Option<&str>,
    body: Markup,
) -> Response {
    page_with_status(StatusCode::OK, signed, current, title, notice, body)
}

pub fn page_with_status(
    status: StatusCode,
    signed: &Signed,
    current: &str,
    title: &str,
    notice: Option<&str>,
    body: Markup,
) -> Response {
    let caps = &signed.api.admin.capabilities;
    respond(
        status,
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    a.skip href="#main" { "Skip to content" }
                    header.top {
                        span.brand { "mcpguard" }
                        nav aria-label="Console" {
                            ul {
                                @for (label, href, read) in AREAS {
                                    @if read.is_none_or(|c| caps.contains(&c)) {
                                        li {
                                            a href=(href) aria-current=[(*href == current).then_some("page")] { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.signout method="post" action="/console/logout" {
                            span.who { "Signed in as " strong { (signed.name) } }
                            input type="hidden" name="csrf" value=(signed.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                    main id="main" {
                        h1 { (title) }
                        @if let Some(n) = notice {
                            p.notice role="status" { (n) }
                        }
                        (body)
                    }
                }
            }
        },
    )
}

pub fn badge(enabled: bool) -> Markup {
    html! {
        @if enabled { span.badge.on { "enabled" } } @else { span.badge.off { "disabled" } }
    }
}

pub fn tag(text: &str) -> Markup {
    html! { span.badge.neutral { (text) } }
}

/// A time from the API (RFC 3339), shortened for a table; `—` for none.
pub fn when(v: &Value) -> Markup {
    match v.as_str() {
        Some(t) => {
            let short = t.get(..16).unwrap_or(t).replace('T', " ");
            html! { time datetime=(t) title=(t) { (short) } }
        }
        None => html! { span.muted { "—" } },
    }
}

/// `v` as text for a table cell: strings as they are, numbers, `—` for null.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// A value shown with a Copy button (the one script copies `data-copy`'s element).
pub fn copyable(id: &str, value: &str) -> Markup {
    html! {
        span.copyable {
            code id=(id) { (value) }
            button.small type="button" data-copy=(id) aria-label="Copy to clipboard" { "Copy" }
        }
    }
}

/// One admin API call as a button: the form posts to `/console/act`, which checks the
/// session's CSRF token and calls the API as this user. `fields` are the call's body.
pub struct Action<'a> {
    pub method: &'a str,
    pub path: String,
    pub label: &'a str,
    /// What the confirmation page names ("the host Feedback bot").
    pub what: String,
    pub back: &'a str,
    pub danger: bool,
}

pub fn action(signed: &Signed, a: &Action<'_>, fields: Markup) -> Markup {
    html! {
        form.inline method="post" action="/console/act" {
            input type="hidden" name="csrf" value=(signed.csrf);
            input type="hidden" name="_method" value=(a.method);
            input type="hidden" name="_path" value=(a.path);
            input type="hidden" name="_back" value=(a.back);
            input type="hidden" name="_what" value=(a.what);
            (fields)
            button type="submit" class=[a.danger.then_some("danger")] { (a.label) }
        }
    }
}

/// A toggle of the break-glass kind `kind` (`hosts`, `connections`, ...): Disable when
/// enabled, Enable when not; shown only when the user holds its capability. Both ask
/// for confirmation first.
pub fn toggle(
    signed: &Signed,
    kind: &str,
    id: i64,
    enabled: bool,
    what: &str,
    back: &str,
) -> Markup {
    let verb = if enabled { "disable" } else { "enable" };
    let template = format!("/api/v1/{kind}/{{id}}/{verb}");
    if !signed.api.can(crate::routes::Verb::Post, &template) {
        return html! {};
    }
    action(
        signed,
        &Action {
            method: "POST",
            path: format!("/api/v1/{kind}/{id}/{verb}"),
            label: if enabled { "Disable" } else { "Enable" },
            what: what.to_owned(),
            back,
            danger: enabled,
        },
        html! {},
    )
}

/// An empty table's one row.
pub fn none_yet(cols: usize, what: &str) -> Markup {
    html! { tr { td.muted colspan=(cols) { (what) } } }
}
