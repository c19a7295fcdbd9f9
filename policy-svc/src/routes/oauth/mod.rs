//! The OAuth 2.1 authorization server for headed hosts (MCP authorization spec), one
//! module per endpoint:
//! - [`metadata`]: the server metadata (RFC 8414) and the JWKS;
//! - [`registration`]: dynamic client registration (RFC 7591);
//! - [`authorize`]: the authorization endpoint, its request, the sign-in and consent
//!   pages and the browser session, and the code the consent grants;
//! - [`token`]: the token endpoint (authorization code with PKCE S256, refresh with
//!   rotation and reuse detection, RFC 8707 `resource` bound into the audience);
//! - [`revocation`]: token revocation (RFC 7009).
//!
//! Errors of the token, registration and revocation endpoints are RFC 6749 bodies
//! (`{"error","error_description"}`, [`error::OauthError`]); the pages answer with
//! pages ([`crate::pages`]). A refused request changes nothing, except that a replayed
//! code or refresh token revokes its whole grant, as RFC 6749 §4.1.2 and OAuth 2.1
//! §4.3.1 ask.

mod authorize;
mod error;
mod metadata;
mod registration;
mod revocation;
mod token;

use axum::Router;
use axum::extract::Form;
use axum::extract::rejection::FormRejection;
use axum::routing::{get, post};
use mcpguard_core::oauth as core_oauth;
use sha2::{Digest, Sha256};

use crate::AppState;
// The check path's tests name the settings here; they live in `crate::oauth_config`.
pub use crate::oauth_config::OauthConfig;

/// The public port's OAuth routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/.well-known/oauth-authorization-server",
            get(metadata::metadata),
        )
        .route(core_oauth::JWKS_PATH, get(metadata::jwks))
        .route(core_oauth::REGISTER_PATH, post(registration::register))
        .route(core_oauth::AUTHORIZE_PATH, get(authorize::authorize))
        .route("/oauth/login", post(authorize::login))
        .route("/oauth/consent", post(authorize::consent))
        .route("/oauth/connect", post(authorize::connect_start))
        .route(
            crate::oauth_identity::CALLBACK_PATH,
            get(authorize::connect_callback),
        )
        .route(core_oauth::TOKEN_PATH, post(token::token))
        .route(core_oauth::REVOKE_PATH, post(revocation::revoke))
}

/// The check port's JWKS, which the filter fetches through the policy cluster.
pub fn check_routes() -> Router<AppState> {
    Router::new().route(core_oauth::CHECK_JWKS_PATH, get(metadata::jwks))
}

/// Request parameters as sent, so that a repeated one is refused (RFC 6749 §3.1) and
/// the consent form's per-server fields can be read.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Result<Option<&str>, String> {
        let mut found = self.0.iter().filter(|(k, _)| k == name);
        let first = found.next().map(|(_, v)| v.as_str());
        if found.next().is_some() {
            return Err(format!("{name} is repeated"));
        }
        Ok(first.filter(|v| !v.is_empty()))
    }

    fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name)?.ok_or_else(|| format!("{name} is required"))
    }
}

fn form_params(form: Result<Form<Vec<(String, String)>>, FormRejection>) -> Option<Params> {
    form.ok().map(|Form(pairs)| Params(pairs))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameters_are_refused() {
        let p = Params(vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("b".into(), "3".into()),
            ("c".into(), "".into()),
        ]);
        assert_eq!(p.get("a"), Ok(Some("1")));
        assert!(p.get("b").is_err());
        assert_eq!(p.get("c"), Ok(None));
        assert!(p.required("c").is_err());
    }
}
