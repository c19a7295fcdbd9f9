//! `POST /console/act`: every change the console makes. A form names one admin API call
//! (`_method`, `_path`: an endpoint of the table, with numbers for its `{id}`s) and
//! carries its body as fields; this handler checks the session's CSRF token, asks for
//! confirmation of break-glass toggles, revocations and rotations, then makes the call
//! as the signed-in user through the API's own gate, and shows what came of it: the
//! secret of a new token or link once, or back to the page with a notice.

use axum::extract::Form;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde_json::{Map, Value};

use super::layout::{self, copyable};
use super::session::Signed;
use super::signin::field;
use crate::routes::{Verb, admin_api};

/// Fields of the form itself, not of the call's body.
const CONTROL_FIELDS: [&str; 6] = ["csrf", "_method", "_path", "_back", "_what", "_confirm"];

/// The endpoint template `path` is an instance of, for `method`: an `{id}` or `{…_id}`
/// of the template stands for one segment of digits, any other `{…}` (`{kind}`) for one
/// short lowercase word. `None` when no admin endpoint matches.
pub fn endpoint_of(method: Verb, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').collect();
    admin_api()
        .into_iter()
        .filter(|e| e.method == method)
        .map(|e| e.path)
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| {
                    if t == &"{id}" || (t.starts_with('{') && t.ends_with("_id}")) {
                        !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit())
                    } else if t.starts_with('{') {
                        !s.is_empty()
                            && s.len() <= 32
                            && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    } else {
                        t == s
                    }
                })
        })
}

fn verb_of(method: &str) -> Option<(Verb, Method)> {
    Some(match method {
        "POST" => (Verb::Post, Method::POST),
        "PUT" => (Verb::Put, Method::PUT),
        "DELETE" => (Verb::Delete, Method::DELETE),
        _ => return None,
    })
}

/// The call's JSON body from the form's other fields: empty fields left out; names
/// ending in `_id` and `expires_in_minutes` as numbers; `name[]` fields as one array;
/// `a.b` as nested objects; `expires_at` from a `datetime-local` input (UTC) as RFC 3339;
/// `required` (`true`/`false`) as a boolean.
pub fn body_of(fields: &[(String, String)]) -> Value {
    let mut body = Map::new();
    for (name, value) in fields {
        if CONTROL_FIELDS.contains(&name.as_str()) {
            continue;
        }
        if let Some(list) = name.strip_suffix("[]") {
            let entry = body
                .entry(list.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let (Value::Array(items), false) = (entry, value.is_empty()) {
                items.push(Value::String(value.clone()));
            }
            continue;
        }
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let typed = if name.ends_with("_id") || name == "expires_in_minutes" {
            value
                .parse::<i64>()
                .map_or_else(|_| Value::String(value.to_owned()), Value::from)
        } else if name == "required" && (value == "true" || value == "false") {
            Value::Bool(value == "true")
        } else if name == "expires_at" && value.len() == 16 {
            Value::String(format!("{value}:00Z"))
        } else {
            Value::String(value.to_owned())
        };
        match name.split_once('.') {
            Some((outer, inner)) => {
                let entry = body
                    .entry(outer.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(o) = entry {
                    o.insert(inner.to_owned(), typed);
                }
            }
            None => {
                body.insert(name.clone(), typed);
            }
        }
    }
    Value::Object(body)
}

/// Calls that take something away at once ask first, on a page of their own (no script
/// needed); the page says when it holds.
fn needs_confirmation(method: Verb, template: &str) -> bool {
    method == Verb::Delete
        || template.ends_with("/disable")
        || template.ends_with("/enable")
        || template.ends_with("/rotate")
}

/// Where the browser goes back to: a console page, nothing else (no open redirect).
pub fn safe_back(back: Option<&str>) -> &str {
    match back {
        Some(b)
            if b.starts_with("/console")
                && !b.contains("//")
                && b.bytes().all(|c| c.is_ascii_graphic() && c != b'\\') =>
        {
            b
        }
        _ => "/console",
    }
}

/// The notice for the page the browser goes back to (see `Done`).
fn done_of(method: Verb, template: &str) -> &'static str {
    if template.ends_with("/disable") {
        "disabled"
    } else if template.ends_with("/enable") {
        "enabled"
    } else if template == "/api/v1/tokens/{id}" {
        "revoked"
    } else if method == Verb::Delete {
        "removed"
    } else if template.ends_with("/rotate") {
        "rotated"
    } else if template.ends_with("/refresh") {
        "refreshed"
    } else if template.ends_with("/approve") {
        "approved"
    } else if template.starts_with("/api/v1/gateways/{id}/teams/") && method == Verb::Put {
        "granted"
    } else if method == Verb::Post {
        "created"
    } else {
        "saved"
    }
}

pub fn refused(signed: &Signed, status: StatusCode, message: &str, back: &str) -> Response {
    layout::page_with_status(
        status,
        signed,
        back,
        "Not done",
        None,
        html! {
            p.error role="alert" { (message) }
            p.muted { "Nothing was changed." }
            p { a href=(back) { "Back" } }
        },
    )
}

pub async fn act(
    signed: Result<Signed, Response>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let signed = match signed {
        Ok(s) => s,
        // No live session: nothing to act for.
        Err(_) => {
            return (
                StatusCode::UNAUTHORIZED,
                "sign in to the console first: /console/login",
            )
                .into_response();
        }
    };
    let Ok(Form(fields)) = form else {
        return refused(
            &signed,
            StatusCode::BAD_REQUEST,
            "Malformed form.",
            "/console",
        );
    };
    let back = safe_back(field(&fields, "_back"));
    if !signed.csrf_ok(field(&fields, "csrf")) {
        tracing::warn!(
            user_id = signed.api.admin.user_id,
            "console form refused: CSRF token missing or wrong"
        );
        return refused(
            &signed,
            StatusCode::FORBIDDEN,
            "This form did not come from your console session (its CSRF token is missing or wrong). Reload the page and try again.",
            back,
        );
    }
    let (Some((verb, method)), Some(path)) = (
        field(&fields, "_method").and_then(verb_of),
        field(&fields, "_path"),
    ) else {
        return refused(
            &signed,
            StatusCode::BAD_REQUEST,
            "The form names no call.",
            back,
        );
    };
    let Some(template) = endpoint_of(verb, path) else {
        return refused(&signed, StatusCode::NOT_FOUND, "No such admin call.", back);
    };
    // The gate would refuse it too; refusing here spares the confirmation page.
    if !signed.api.can(verb, template) {
        let cap = crate::routes::capability_of(verb, template)
            .flatten()
            .map_or("", |c| c.as_str());
        tracing::warn!(
            user_id = signed.api.admin.user_id,
            capability = cap,
            path,
            "console action refused: missing capability"
        );
        return refused(
            &signed,
            StatusCode::FORBIDDEN,
            &format!("You need the capability {cap} for this."),
            back,
        );
    }
    if needs_confirmation(verb, template) && field(&fields, "_confirm") != Some("yes") {
        return confirm(&signed, &fields, verb, template, back);
    }
    let body = body_of(&fields);
    let with_body =
        (verb != Verb::Delete && !template.ends_with("/disable") && !template.ends_with("/enable"))
            .then_some(&body);
    let answer = signed.api.call(method, path, with_body).await;
    if !answer.status.is_success() {
        return refused(&signed, answer.status, &answer.message(), back);
    }
    if let Some(shown) = shown_once(&signed, &answer.body, back) {
        return shown;
    }
    let to = format!(
        "{back}{}done={}",
        if back.contains('?') { '&' } else { '?' },
        done_of(verb, template)
    );
    match HeaderValue::from_str(&to) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => refused(
            &signed,
            StatusCode::BAD_REQUEST,
            "Bad return address.",
            "/console",
        ),
    }
}

fn confirm(
    signed: &Signed,
    fields: &[(String, String)],
    verb: Verb,
    template: &str,
    back: &str,
) -> Response {
    let what = field(fields, "_what").unwrap_or("this");
    let (title, consequence) = if template.ends_with("/disable") {
        (
            format!("Disable {what}?"),
            "Every request through it is refused from the next request on. Nothing is deleted; enabling restores access.",
        )
    } else if template.ends_with("/enable") {
        (
            format!("Enable {what}?"),
            "Requests through it are allowed again from the next request on.",
        )
    } else if template.ends_with("/rotate") {
        (
            format!("Rotate {what}?"),
            "The next key starts signing now; the active one retires and stays published until its tokens expire.",
        )
    } else {
        (
            format!("Remove {what}?"),
            "It stops working from the next request on.",
        )
    };
    let verb_label = match verb {
        Verb::Delete => "Yes, remove",
        _ if template.ends_with("/disable") => "Yes, disable",
        _ if template.ends_with("/enable") => "Yes, enable",
        _ => "Yes, rotate",
    };
    layout::page(
        signed,
        back,
        &title,
        None,
        html! {
            p.warning { (consequence) }
            form.inline method="post" action="/console/act" {
                @for (name, value) in fields {
                    @if name != "_confirm" {
                        input type="hidden" name=(name) value=(value);
                    }
                }
                input type="hidden" name="_confirm" value="yes";
                button.danger type="submit" autofocus { (verb_label) }
            }
            " "
            a.button.secondary href=(back) { "Cancel" }
        },
    )
}

/// The page that shows a new secret once (an API token, a per-user token, an admin
/// token, an enrollment link), with Copy and Download; `None` for other answers.
fn shown_once(signed: &Signed, answer: &Value, back: &str) -> Option<Response> {
    let (secret, kind, file) = if let Some(t) = answer["token"].as_str() {
        (t, "token", "token.txt")
    } else if let Some(u) = answer["url"].as_str() {
        (u, "enrollment link", "enrollment-link.txt")
    } else {
        return None;
    };
    let prefix = answer["prefix"].as_str().unwrap_or("");
    let missing = answer["missing_identities"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let download = format!(
        "data:text/plain;charset=utf-8,{}",
        url::form_urlencoded::byte_serialize(secret.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
    );
    Some(layout::page(
        signed,
        back,
        &format!("Your new {kind}"),
        None,
        html! {
            p.warning role="alert" {
                strong { "Shown once." }
                " Copy or download it now: mcpguard keeps only its hash and cannot show it again."
            }
            p { (copyable("secret", secret)) }
            p {
                a.button download=(file) href=(download) { "Download as a file" }
            }
            @if !prefix.is_empty() {
                p.muted { "Listed from now on by its prefix " code { (prefix) } "." }
            }
            @if kind == "enrollment link" {
                p.muted { "Send it to the user: they open it once, sign in with their own password and bring their identities. Then claim their per-user token on the host's page." }
            }
            @if !missing.is_empty() {
                div.warning {
                    p { "This gateway exposes per-user servers the user has no identity for yet; they refuse this token with identity_missing until one is brought:" }
                    ul { @for m in &missing { li { (layout::text(&m["name"])) " (" code { (layout::text(&m["slug"])) } ")" } } }
                }
            }
            p { a href=(back) { "Done" } }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_admin_endpoints_with_numeric_ids_are_reachable() {
        assert_eq!(
            endpoint_of(Verb::Post, "/api/v1/hosts/12/disable"),
            Some("/api/v1/hosts/{id}/disable")
        );
        assert_eq!(
            endpoint_of(Verb::Put, "/api/v1/gateways/1/servers/2"),
            Some("/api/v1/gateways/{id}/servers/{server_id}")
        );
        assert_eq!(
            endpoint_of(Verb::Post, "/api/v1/hosts"),
            Some("/api/v1/hosts")
        );
        assert_eq!(
            endpoint_of(Verb::Put, "/api/v1/gateways/1/servers/2/features/tools"),
            Some("/api/v1/gateways/{id}/servers/{server_id}/features/{kind}")
        );
        assert_eq!(
            endpoint_of(Verb::Post, "/api/v1/gateways/1/servers/2/features/refresh"),
            Some("/api/v1/gateways/{id}/servers/{server_id}/features/refresh")
        );
        for bad in [
            "/api/v1/gateways/1/servers/2/features/../tools",
            "/api/v1/gateways/1/servers/2/features/Tools",
            "/api/v1/gateways/1/servers/x/features/tools",
            "/api/v1/gateways/1/servers/2/features/",
        ] {
            assert_eq!(endpoint_of(Verb::Put, bad), None, "{bad}");
        }
        for bad in [
            "/api/v1/hosts/x/disable",
            "/api/v1/hosts//disable",
            "/api/v1/hosts/1/disable/",
            "/api/v1/hosts/../disable",
            "/console/act",
            "/api/v1/hosts/1/../../users/1/disable",
            "",
        ] {
            assert_eq!(endpoint_of(Verb::Post, bad), None, "{bad}");
        }
        assert_eq!(endpoint_of(Verb::Delete, "/api/v1/hosts/1/disable"), None);
    }

    #[test]
    fn form_fields_become_the_calls_json_body() {
        let f = |pairs: &[(&str, &str)]| {
            body_of(
                &pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            f(&[
                ("csrf", "x"),
                ("_path", "/api/v1/hosts/1/tokens"),
                ("gateway_id", "3"),
                ("name", " Feedback bot "),
                ("expires_at", "2030-01-02T03:04"),
                ("user_id", ""),
            ]),
            serde_json::json!({"gateway_id": 3, "name": "Feedback bot", "expires_at": "2030-01-02T03:04:00Z"})
        );
        assert_eq!(
            f(&[
                ("capabilities[]", "audit.read"),
                ("capabilities[]", "hosts.read"),
                ("credential.type", "bearer"),
                ("credential.token", "t"),
            ]),
            serde_json::json!({"capabilities": ["audit.read", "hosts.read"], "credential": {"type": "bearer", "token": "t"}})
        );
        assert_eq!(
            f(&[("required", "true")]),
            serde_json::json!({"required": true})
        );
        // A role with no capability picked still sends the (empty) list.
        assert_eq!(
            f(&[("capabilities[]", "")]),
            serde_json::json!({"capabilities": []})
        );
        // Not a number where one is expected: passed on, and the API says 422.
        assert_eq!(
            f(&[("gateway_id", "x")]),
            serde_json::json!({"gateway_id": "x"})
        );
    }

    #[test]
    fn the_browser_goes_back_only_to_console_pages() {
        assert_eq!(safe_back(Some("/console/hosts/3")), "/console/hosts/3");
        assert_eq!(
            safe_back(Some("/console/audit?kind=admin")),
            "/console/audit?kind=admin"
        );
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/console//evil",
            "/consolex\\y",
            "/api/v1",
            "/console/a b",
        ] {
            assert!(
                safe_back(Some(bad)) == "/console" || bad == "/consolex\\y",
                "{bad}"
            );
        }
        assert_eq!(safe_back(Some("/consolex\\y")), "/console");
        assert_eq!(safe_back(None), "/console");
    }
}
