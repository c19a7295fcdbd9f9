//! The authorization request (RFC 6749 §4.1.1 with PKCE and an RFC 8707 `resource`):
//! validated when the endpoint is opened and again at each form it is carried through,
//! and the redirects back to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mcpguard_core::oauth as core_oauth;
use mcpguard_core::route::{McpPath, gateway_url};

use super::super::Params;
use crate::AppState;
use crate::pages::{PageError, escape, html, no_store};
use crate::store::oauth as db;

/// A validated authorization request.
pub(super) struct Authz {
    pub(super) client: db::Client,
    pub(super) redirect_uri: String,
    pub(super) state: Option<String>,
    pub(super) code_challenge: String,
    pub(super) resource: String,
    pub(super) gateway_id: i64,
    pub(super) gateway_name: String,
    pub(super) scope: Option<String>,
}

/// The authorization request's parameters, carried through the sign-in and consent
/// forms as hidden fields and validated again at each step.
pub(super) const AUTHZ_PARAMS: [&str; 8] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "scope",
];

pub(super) enum AuthzError {
    /// The client or redirect URI cannot be trusted: tell the user, redirect nowhere
    /// (RFC 6749 §4.1.2.1).
    Page(String),
    /// Tell the client, at its redirect URI.
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: &'static str,
        description: String,
    },
}

/// `<base>/mcp/{gateway}/{server}` under one of `bases`: (gateway, server) slugs; or
/// the gateway URL `<base>/mcp/{gateway}`: (gateway, "") (a token for every server of
/// the gateway, each still checked on its own).
fn parse_resource<'a>(resource: &'a str, bases: &[String]) -> Option<(&'a str, &'a str)> {
    let base = bases.iter().find(|b| resource.starts_with(b.as_str()))?;
    let path = &resource[base.len()..];
    if path.contains('?') || path.contains('#') {
        return None;
    }
    if let Some(gateway) = gateway_url(path) {
        return Some((gateway, ""));
    }
    let p = McpPath::parse(path).ok()?;
    (p.rest.is_empty() && p.query.is_none()).then_some((p.gateway, p.server))
}

pub(super) async fn validate_authz(state: &AppState, p: &Params) -> Result<Authz, AuthzError> {
    let page = AuthzError::Page;
    let client_id = p.required("client_id").map_err(page)?;
    let client = db::get_client(&state.db, client_id)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "oauth: reading client");
            AuthzError::Page("temporarily unavailable, try again".into())
        })?
        .ok_or_else(|| AuthzError::Page("unknown client_id: register the client first".into()))?;
    let redirect_uri = p.required("redirect_uri").map_err(AuthzError::Page)?;
    if !client.redirect_uris().iter().any(|u| u == redirect_uri) {
        return Err(AuthzError::Page(
            "redirect_uri is not one the client registered".into(),
        ));
    }
    let redirect = |state: Option<String>, error, description: String| AuthzError::Redirect {
        redirect_uri: redirect_uri.to_owned(),
        state,
        error,
        description,
    };
    let st = p
        .get("state")
        .map_err(|e| redirect(None, "invalid_request", e))?
        .map(str::to_owned);
    let bad = |error, description: String| redirect(st.clone(), error, description);
    let get = |name| p.get(name).map_err(|e| bad("invalid_request", e));
    if get("response_type")? != Some("code") {
        return Err(bad(
            "unsupported_response_type",
            "response_type must be code".into(),
        ));
    }
    if get("code_challenge_method")? != Some("S256") {
        return Err(bad(
            "invalid_request",
            "PKCE is required: code_challenge_method=S256".into(),
        ));
    }
    let code_challenge = get("code_challenge")?
        .filter(|c| core_oauth::is_valid_code_challenge(c))
        .ok_or_else(|| {
            bad(
                "invalid_request",
                "code_challenge must be a S256 challenge".into(),
            )
        })?;
    let resource = get("resource")?.ok_or_else(|| {
        bad(
            "invalid_target",
            "resource is required: the MCP server URL (RFC 8707)".into(),
        )
    })?;
    let Some((gateway, server)) = parse_resource(resource, &state.oauth.resource_base_urls) else {
        return Err(bad(
            "invalid_target",
            "resource must be an MCP URL of this gateway: <base>/mcp/{gateway}[/{server}]".into(),
        ));
    };
    let target = db::resource_target(&state.db, gateway, server)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "oauth: reading resource");
            bad("temporarily_unavailable", "try again".into())
        })?;
    let Some((gateway_id, gateway_name)) = target else {
        return Err(bad(
            "invalid_target",
            "no such gateway, or it does not expose this server".into(),
        ));
    };
    let scope = get("scope")?.map(str::to_owned);
    Ok(Authz {
        redirect_uri: redirect_uri.to_owned(),
        client,
        state: st,
        code_challenge: code_challenge.to_owned(),
        resource: resource.to_owned(),
        gateway_id,
        gateway_name,
        scope,
    })
}

/// Where to send the browser back to the client: the redirect URI with the response
/// parameters (and `iss`, RFC 9207).
pub(super) fn client_redirect(
    issuer: &str,
    redirect_uri: &str,
    state: Option<&str>,
    pairs: &[(&str, &str)],
) -> Response {
    let Ok(mut url) = url::Url::parse(redirect_uri) else {
        return html(
            StatusCode::BAD_REQUEST,
            "Error",
            "<p>The redirect URI is invalid.</p>".into(),
        );
    };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
        if let Some(s) = state {
            q.append_pair("state", s);
        }
        q.append_pair("iss", issuer);
    }
    see_other(url.as_str(), None)
}

pub(super) fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    no_store(response)
}

impl AuthzError {
    /// The answer to a refused request: a page, or the client's redirect URI.
    pub(super) fn into_page(self, issuer: &str) -> PageError {
        match self {
            AuthzError::Page(message) => PageError::page(
                StatusCode::BAD_REQUEST,
                "Cannot sign in",
                format!("<p>{}</p>", escape(&message)),
            ),
            AuthzError::Redirect {
                redirect_uri,
                state,
                error,
                description,
            } => PageError::shown(client_redirect(
                issuer,
                &redirect_uri,
                state.as_deref(),
                &[("error", error), ("error_description", &description)],
            )),
        }
    }
}

pub(super) fn hidden_authz_fields(p: &Params) -> String {
    AUTHZ_PARAMS
        .iter()
        .filter_map(|name| {
            p.get(name).ok().flatten().map(|v| {
                format!(
                    "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                    escape(v)
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_mcp_urls_under_a_known_base() {
        let bases = vec![
            "http://127.0.0.1:10000".to_owned(),
            "https://mcp.example.com".to_owned(),
        ];
        assert_eq!(
            parse_resource("http://127.0.0.1:10000/mcp/eng/demo", &bases),
            Some(("eng", "demo"))
        );
        assert_eq!(
            parse_resource("https://mcp.example.com/mcp/ops/github", &bases),
            Some(("ops", "github"))
        );
        assert_eq!(
            parse_resource("http://127.0.0.1:10000/mcp/eng", &bases),
            Some(("eng", "")),
            "the gateway URL"
        );
        for bad in [
            "http://evil.example/mcp/eng/demo",
            "http://127.0.0.1:100000/mcp/eng/demo",
            "http://127.0.0.1:10000/mcp/eng/",
            "http://127.0.0.1:10000/mcp/eng?x=1",
            "http://127.0.0.1:10000/mcp/",
            "http://127.0.0.1:10000/mcp/eng/demo/extra",
            "http://127.0.0.1:10000/mcp/eng/demo?x=1",
            "http://127.0.0.1:10000/mcp/eng/demo#f",
            "http://127.0.0.1:10000/other/eng/demo",
        ] {
            assert_eq!(parse_resource(bad, &bases), None, "{bad}");
        }
    }
}
