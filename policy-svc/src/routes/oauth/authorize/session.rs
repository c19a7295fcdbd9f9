//! The browser's sign-in session on the OAuth pages: a random token in a cookie
//! scoped to `/oauth`, stored as its hash, that carries a signed-in user from the
//! sign-in form to the consent form for a few minutes.

use axum::http::HeaderMap;
use mcpguard_core::oauth as core_oauth;
use sha2::{Digest, Sha256};

use super::super::error::OauthError;
use super::super::sha256_hex;
use crate::AppState;
use crate::pages::{cookie, secure_attr};
use crate::secrets::random_id;
use crate::store::oauth as db;

const SESSION_TTL_MS: i64 = 10 * 60_000;
const SESSION_COOKIE: &str = "mcpguard_session";

/// A session (its token) and its user (id, name).
pub(super) type Session = (String, (i64, String));

/// The session the browser's cookie names, if it is still open.
pub(super) async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Session>, OauthError> {
    let Some(token) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    Ok(db::session_user(&state.db, &sha256_hex(&token))
        .await?
        .map(|user| (token, user)))
}

/// Opens a session for `user_id`: the `Set-Cookie` value that hands it to the browser.
pub(super) async fn open(state: &AppState, user_id: i64) -> Result<String, OauthError> {
    let session = random_id().map_err(|_| OauthError::server_error("no randomness"))?;
    db::insert_session(&state.db, &sha256_hex(&session), user_id, SESSION_TTL_MS).await?;
    Ok(format!(
        "{SESSION_COOKIE}={session}; Path=/oauth; HttpOnly; SameSite=Lax; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        secure_attr(&state.oauth.issuer)
    ))
}

/// The consent form's CSRF token, derived from the session token: only a page that
/// was served to the session's holder can know it, and nothing extra is stored.
pub(super) fn session_csrf(session_token: &str) -> String {
    core_oauth::base64url(&Sha256::digest(
        format!("mcpguard consent csrf {session_token}").as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_csrf_is_bound_to_the_session() {
        assert_eq!(session_csrf("a"), session_csrf("a"));
        assert_ne!(session_csrf("a"), session_csrf("b"));
        assert!(!session_csrf("a").contains('a') || session_csrf("a") != "a");
    }
}
