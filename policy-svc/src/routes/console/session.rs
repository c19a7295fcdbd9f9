//! Console sessions: a random token in an HttpOnly, SameSite=Strict cookie scoped to
//! `/console` (Secure when served over https), stored only as its SHA-256, ended by
//! sign-out, by [`IDLE_MS`] without a request, or [`MAX_AGE_MS`] after sign-in. Every
//! form carries the session's CSRF token, derived from the session token, so only a
//! page served to the session's holder knows it and nothing extra is stored.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Console;
use super::api::Api;
use crate::auth::Admin;
use crate::error::ApiError;
use crate::pages::{cookie, secure_attr};
use crate::secrets::{ct_eq, random_id};
use crate::store::console as db;

pub const COOKIE: &str = "mcpguard_console";
/// The sign-in forms' double-submit CSRF cookie (there is no session yet).
pub const LOGIN_COOKIE: &str = "mcpguard_console_login";
/// A session ends after this long without a request.
pub const IDLE_MS: i64 = 30 * 60_000;
/// ... and this long after sign-in at the latest.
pub const MAX_AGE_MS: i64 = 12 * 3_600_000;

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The CSRF token of the session whose token is `session`.
pub fn csrf_of(session: &str) -> String {
    mcpguard_core::oauth::base64url(&Sha256::digest(
        format!("mcpguard console csrf {session}").as_bytes(),
    ))
}

/// A signed-in console user: who, what they may do (read on this request), and the
/// CSRF token their forms carry.
pub struct Signed {
    pub name: String,
    pub csrf: String,
    pub api: Api,
}

impl Signed {
    /// Whether a form's CSRF token is this session's (compared in constant time).
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| ct_eq(p, &self.csrf))
    }
}

/// Where a request without a live session goes: the sign-in page.
fn to_sign_in() -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, HeaderValue::from_static("/console/login"))],
    )
        .into_response()
}

impl FromRequestParts<Console> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Response> {
        let token = cookie(&parts.headers, COOKIE).ok_or_else(to_sign_in)?;
        let user = db::touch_session(&console.app.db, &sha256_hex(&token), IDLE_MS)
            .await
            .map_err(|e| ApiError::from(e).into_response())?
            .ok_or_else(to_sign_in)?;
        Ok(Signed {
            name: user.name,
            csrf: csrf_of(&token),
            api: Api {
                router: console.api.clone(),
                admin: Admin {
                    user_id: user.user_id,
                    token_id: 0,
                    host_id: None,
                    capabilities: user.capabilities,
                },
            },
        })
    }
}

/// Opens a session for `user_id`: the `Set-Cookie` value that hands it to the browser.
pub async fn open(console: &Console, user_id: i64) -> Result<String, ApiError> {
    let token = random_id().map_err(|_| ApiError::Unavailable)?;
    db::open_session(&console.app.db, &sha256_hex(&token), user_id, MAX_AGE_MS).await?;
    Ok(format!(
        "{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        MAX_AGE_MS / 1000,
        secure_attr(&console.app.oauth.issuer)
    ))
}

/// Ends the session the browser's cookie names: the `Set-Cookie` value that drops it.
pub async fn close(console: &Console, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(token) = cookie(headers, COOKIE) {
        db::close_session(&console.app.db, &sha256_hex(&token)).await?;
    }
    Ok(format!(
        "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure_attr(&console.app.oauth.issuer)
    ))
}

/// A fresh sign-in CSRF value and the `Set-Cookie` that pairs it with the browser.
pub fn login_csrf(console: &Console) -> Result<(String, String), ApiError> {
    let csrf = random_id().map_err(|_| ApiError::Unavailable)?;
    let set = format!(
        "{LOGIN_COOKIE}={csrf}; Path=/console; HttpOnly; SameSite=Strict; Max-Age=600{}",
        secure_attr(&console.app.oauth.issuer)
    );
    Ok((csrf, set))
}

/// Whether a sign-in form's CSRF value is the one its cookie holds.
pub fn login_csrf_ok(headers: &HeaderMap, presented: Option<&str>) -> bool {
    match (cookie(headers, LOGIN_COOKIE), presented) {
        (Some(c), Some(p)) => ct_eq(&c, p),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_are_bound_to_their_session_and_hide_it() {
        assert_eq!(csrf_of("a"), csrf_of("a"));
        assert_ne!(csrf_of("a"), csrf_of("b"));
        assert!(!csrf_of("session-token").contains("session-token"));
        assert_eq!(sha256_hex("abc").len(), 64);
    }
}
