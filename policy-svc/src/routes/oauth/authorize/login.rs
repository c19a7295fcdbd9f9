//! The sign-in page of the authorization endpoint and its form (`POST /oauth/login`):
//! a password sign-in ([`crate::signin`]: the hashing bound and the throttle) that opens
//! a session, then back to the authorization endpoint, which asks for consent.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use mcpguard_core::oauth as core_oauth;

use super::super::error::OauthError;
use super::super::{Params, form_params};
use super::request::{AUTHZ_PARAMS, Authz, hidden_authz_fields, see_other, validate_authz};
use super::session;
use crate::AppState;
use crate::pages::{PageError, cookie, escape, html, refused_for_now, secure_attr};
use crate::secrets::{ct_eq, random_id};
use crate::signin::{self, SignIn};

const LOGIN_CSRF_COOKIE: &str = "mcpguard_login_csrf";

/// The sign-in form for `authz`, with a fresh CSRF cookie (double submit), and the
/// reason of a refused attempt (then 401).
pub(super) fn login_page(
    issuer: &str,
    p: &Params,
    authz: &Authz,
    error: Option<&str>,
) -> Result<Response, OauthError> {
    let csrf = random_id().map_err(|_| OauthError::server_error("no randomness"))?;
    let error = error
        .map(|e| format!("<p role=\"alert\"><strong>{}</strong></p>", escape(e)))
        .unwrap_or_default();
    let body = format!(
        "<p><strong>{client}</strong> wants to connect to the gateway <strong>{gateway}</strong>. Sign in to continue.</p>{error}\
         <form method=\"post\" action=\"/oauth/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{hidden}\
         <label>User name <input name=\"username\" autocomplete=\"username\" required></label>\
         <label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
         <button type=\"submit\">Sign in</button></form>",
        client = escape(&authz.client.client_name),
        gateway = escape(&authz.gateway_name),
        hidden = hidden_authz_fields(p),
    );
    let status = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut response = html(status, "Sign in", body);
    let cookie = format!(
        "{LOGIN_CSRF_COOKIE}={csrf}; Path=/oauth; HttpOnly; SameSite=Strict; Max-Age=600{}",
        secure_attr(issuer)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

pub(in crate::routes::oauth) async fn login(
    State(state): State<AppState>,
    client: signin::Client,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, PageError> {
    let issuer = state.oauth.issuer.clone();
    let cannot = |status, message: &str| {
        PageError::page(status, "Cannot sign in", format!("<p>{message}</p>"))
    };
    let p = form_params(form).ok_or_else(|| cannot(StatusCode::BAD_REQUEST, "Malformed form."))?;
    let csrf_ok = match (cookie(&headers, LOGIN_CSRF_COOKIE), p.get("csrf")) {
        (Some(c), Ok(Some(f))) => ct_eq(&c, f),
        _ => false,
    };
    if !csrf_ok {
        return Err(cannot(
            StatusCode::FORBIDDEN,
            "The form expired or did not come from this site. Start again from your application.",
        ));
    }
    // Before any read: beyond the hashing bound a sign-in costs nothing.
    let admitted = state.passwords.admit().map_err(|_| PageError::busy())?;
    let authz = validate_authz(&state, &p)
        .await
        .map_err(|e| e.into_page(&issuer))?;
    let again = |error| -> Result<PageError, PageError> {
        Ok(PageError::shown(login_page(
            &issuer,
            &p,
            &authz,
            Some(error),
        )?))
    };
    let (Ok(Some(username)), Ok(Some(password))) = (p.get("username"), p.get("password")) else {
        return Err(again("Enter your user name and password.")?);
    };
    let signed_in = signin::sign_in(&state, admitted, &client, username, password)
        .await
        .map_err(OauthError::from)?;
    let user_id = match signed_in {
        SignIn::User(id) => id,
        SignIn::Throttled(retry_after) => {
            tracing::warn!(client_id = %authz.client.client_id, retry_after, "oauth sign-in throttled");
            crate::metrics::get().oauth(crate::metrics::OauthEvent::SignInThrottled);
            let page = login_page(&issuer, &p, &authz, Some(SignIn::THROTTLED_MESSAGE))?;
            return Err(PageError::shown(refused_for_now(
                page,
                StatusCode::TOO_MANY_REQUESTS,
                retry_after,
            )));
        }
        SignIn::Busy => return Err(PageError::busy()),
        SignIn::Refused => {
            tracing::info!(client_id = %authz.client.client_id, "oauth sign-in refused");
            crate::metrics::get().oauth(crate::metrics::OauthEvent::SignInFailure);
            return Err(again("Wrong user name or password.")?);
        }
    };
    let session_cookie = session::open(&state, user_id).await?;
    tracing::info!(user_id, client_id = %authz.client.client_id, "oauth sign-in");
    crate::metrics::get().oauth(crate::metrics::OauthEvent::SignIn);
    // Back to the authorization endpoint (post/redirect/get), which now shows consent.
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            AUTHZ_PARAMS
                .iter()
                .filter_map(|n| p.get(n).ok().flatten().map(|v| (*n, v))),
        )
        .finish();
    Ok(see_other(
        &format!("{}?{query}", core_oauth::AUTHORIZE_PATH),
        Some(session_cookie),
    ))
}
