//! Dynamic client registration (RFC 7591): public clients only (PKCE, no secret),
//! with redirect URIs as RFC 8252 allows them.

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::OauthError;
use crate::AppState;
use crate::pages::no_store;
use crate::secrets::random_id;
use crate::store::oauth as db;

#[derive(Deserialize)]
pub(super) struct Registration {
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default)]
    client_name: Option<String>,
    #[serde(default)]
    token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    grant_types: Option<Vec<String>>,
    #[serde(default)]
    response_types: Option<Vec<String>>,
    // Other metadata (scope, logo_uri, application_type, …) is accepted and ignored,
    // as RFC 7591 §2 allows.
}

fn registration_error(error: &'static str, description: impl Into<String>) -> OauthError {
    OauthError::new(StatusCode::BAD_REQUEST, error, description)
}

/// RFC 8252 / OAuth 2.1 §2.3.1: https anywhere, plain http only to a loopback address
/// (native apps listen there), or a private-use scheme (`com.example.app:/cb`). No
/// fragments.
pub fn is_acceptable_redirect_uri(uri: &str) -> bool {
    let Ok(url) = url::Url::parse(uri) else {
        return false;
    };
    if url.fragment().is_some() || uri.len() > 2000 {
        return false;
    }
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => matches!(
            url.host(),
            Some(url::Host::Domain("localhost"))
                | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
                | Some(url::Host::Ipv6(std::net::Ipv6Addr::LOCALHOST))
        ),
        // Private-use schemes are reverse domain names: at least one dot.
        scheme => scheme.contains('.') && !matches!(scheme, "javascript" | "data" | "file"),
    }
}

pub(super) async fn register(
    State(state): State<AppState>,
    body: Result<axum::Json<Registration>, JsonRejection>,
) -> Result<Response, OauthError> {
    let axum::Json(reg) =
        body.map_err(|e| registration_error("invalid_client_metadata", e.body_text()))?;
    if reg.redirect_uris.is_empty() || reg.redirect_uris.len() > 10 {
        return Err(registration_error(
            "invalid_redirect_uri",
            "redirect_uris must list 1 to 10 URIs",
        ));
    }
    if let Some(bad) = reg
        .redirect_uris
        .iter()
        .find(|u| !is_acceptable_redirect_uri(u))
    {
        return Err(registration_error(
            "invalid_redirect_uri",
            format!("{bad:?}: use https, http to a loopback address, or a private-use scheme"),
        ));
    }
    if reg
        .token_endpoint_auth_method
        .as_deref()
        .is_some_and(|m| m != "none")
    {
        return Err(registration_error(
            "invalid_client_metadata",
            "only public clients (token_endpoint_auth_method \"none\", PKCE) are supported",
        ));
    }
    let grants_ok = reg.grant_types.as_ref().is_none_or(|g| {
        g.iter()
            .all(|t| t == "authorization_code" || t == "refresh_token")
    });
    let responses_ok = reg
        .response_types
        .as_ref()
        .is_none_or(|r| r.iter().all(|t| t == "code"));
    if !grants_ok || !responses_ok {
        return Err(registration_error(
            "invalid_client_metadata",
            "only the authorization_code and refresh_token grants (response type code) are supported",
        ));
    }
    let name = reg.client_name.as_deref().unwrap_or("Unnamed MCP client");
    let name = crate::routes::validate_name(name).map_err(|_| {
        registration_error(
            "invalid_client_metadata",
            "client_name must be 1 to 200 printable characters",
        )
    })?;
    let client_id = random_id().map_err(OauthError::server_error)?;
    let client = db::insert_client(&state.db, &client_id, name, &reg.redirect_uris).await?;
    tracing::info!(client_id = %client.client_id, client_name = %client.client_name, "oauth client registered");
    crate::metrics::get().oauth(crate::metrics::OauthEvent::Registration);
    let body = serde_json::json!({
        "client_id": client.client_id,
        "client_id_issued_at": client.created_at / 1000,
        "client_name": client.client_name,
        "redirect_uris": reg.redirect_uris,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    });
    Ok(no_store(
        (StatusCode::CREATED, axum::Json(body)).into_response(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_follow_rfc_8252() {
        for ok in [
            "http://127.0.0.1:4567/callback",
            "http://localhost/cb",
            "http://[::1]:80/cb",
            "https://app.example.com/oauth/cb",
            "com.example.app:/oauth2redirect",
        ] {
            assert!(is_acceptable_redirect_uri(ok), "{ok}");
        }
        for bad in [
            "http://example.com/cb",
            "http://10.0.0.1/cb",
            "https://app.example.com/cb#frag",
            "javascript:alert(1)",
            "notaurl",
            "data:text/html,hi",
        ] {
            assert!(!is_acceptable_redirect_uri(bad), "{bad}");
        }
    }
}
