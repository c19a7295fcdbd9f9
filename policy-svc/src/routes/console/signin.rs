//! Signing in to the console: with a user name and password (the same users, hashing
//! bound and throttle as the OAuth and enrollment pages: `crate::signin`), or with a
//! one-time link from `mcpguard-policy console-link`. Signing out ends the session.

use std::net::SocketAddr;

use axum::extract::rejection::{ExtensionRejection, FormRejection};
use axum::extract::{ConnectInfo, Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

use super::Console;
use super::layout::bare;
use super::session::{self, sha256_hex};
use crate::error::ApiError;
use crate::pages::refused_for_now;
use crate::signin::{Busy, Client, SignIn, forwarded_client, sign_in};
use crate::store::console as db;

/// How long a one-time sign-in link works.
pub const LINK_TTL_MS: i64 = 15 * 60_000;

type Fields = Result<Form<Vec<(String, String)>>, FormRejection>;

pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn with_cookie(mut response: Response, set_cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(set_cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

fn see_other(to: &'static str, set_cookie: &str) -> Response {
    with_cookie(
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, HeaderValue::from_static(to))],
        )
            .into_response(),
        set_cookie,
    )
}

fn sign_in_page(console: &Console, status: StatusCode, error: Option<&str>) -> Response {
    let (csrf, set) = match session::login_csrf(console) {
        Ok(pair) => pair,
        Err(e) => return e.into_response(),
    };
    let body = html! {
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.stack method="post" action="/console/login" {
            input type="hidden" name="csrf" value=(csrf);
            label for="username" { "User name" }
            input id="username" name="username" autocomplete="username" required autofocus;
            label for="password" { "Password" }
            input id="password" name="password" type="password" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
        p.muted { "New here? Run " code { "mcpguard-policy console-link" } " for a one-time sign-in link." }
    };
    with_cookie(bare(status, "Sign in to the console", body), &set)
}

pub async fn form(State(console): State<Console>) -> Response {
    sign_in_page(&console, StatusCode::OK, None)
}

/// The client a sign-in counts against, as the OAuth sign-in page reads it.
fn client_of(console: &Console, peer: Option<SocketAddr>, headers: &HeaderMap) -> Client {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let trusted = &console.app.oauth.trusted_proxies;
    Client::of(peer.map(|p| forwarded_client(p.ip(), forwarded, trusted)))
}

fn refused(status: StatusCode, title: &str, message: &str) -> Response {
    bare(
        status,
        title,
        html! { p.error role="alert" { (message) } p { a href="/console/login" { "Back to sign-in" } } },
    )
}

pub async fn submit(
    State(console): State<Console>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    headers: HeaderMap,
    form: Fields,
) -> Response {
    let Ok(Form(fields)) = form else {
        return refused(StatusCode::BAD_REQUEST, "Cannot sign in", "Malformed form.");
    };
    if !session::login_csrf_ok(&headers, field(&fields, "csrf")) {
        return refused(
            StatusCode::FORBIDDEN,
            "Cannot sign in",
            "The form expired or did not come from this site. Try again.",
        );
    }
    // Before any read: beyond the hashing bound a sign-in costs nothing.
    let Ok(admitted) = console.app.passwords.admit() else {
        return busy();
    };
    let (Some(username), Some(password)) = (field(&fields, "username"), field(&fields, "password"))
    else {
        return sign_in_page(
            &console,
            StatusCode::UNAUTHORIZED,
            Some("Enter your user name and password."),
        );
    };
    let client = client_of(&console, peer.ok().map(|c| c.0), &headers);
    let outcome = match sign_in(&console.app, admitted, &client, username, password).await {
        Ok(o) => o,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match outcome {
        SignIn::User(user_id) => match session::open(&console, user_id).await {
            Ok(set) => {
                tracing::info!(user_id, "console sign-in");
                see_other("/console", &set)
            }
            Err(e) => e.into_response(),
        },
        SignIn::Throttled(retry_after) => {
            tracing::warn!(retry_after, "console sign-in throttled");
            refused_for_now(
                sign_in_page(
                    &console,
                    StatusCode::TOO_MANY_REQUESTS,
                    Some(SignIn::THROTTLED_MESSAGE),
                ),
                StatusCode::TOO_MANY_REQUESTS,
                retry_after,
            )
        }
        SignIn::Busy => busy(),
        SignIn::Refused => {
            tracing::info!("console sign-in refused");
            sign_in_page(
                &console,
                StatusCode::UNAUTHORIZED,
                Some("Wrong user name or password."),
            )
        }
    }
}

fn busy() -> Response {
    refused_for_now(
        refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            SignIn::BUSY_MESSAGE,
        ),
        StatusCode::SERVICE_UNAVAILABLE,
        Busy::RETRY_AFTER_SECS,
    )
}

pub async fn sign_out(
    State(console): State<Console>,
    signed: Result<session::Signed, Response>,
    headers: HeaderMap,
    form: Fields,
) -> Response {
    let Ok(signed) = signed else {
        return see_other("/console/login", "");
    };
    let presented = form
        .ok()
        .and_then(|Form(f)| field(&f, "csrf").map(str::to_owned));
    if !signed.csrf_ok(presented.as_deref()) {
        return refused(
            StatusCode::FORBIDDEN,
            "Cannot sign out",
            "The form did not come from this site.",
        );
    }
    match session::close(&console, &headers).await {
        Ok(set) => see_other("/console/login", &set),
        Err(e) => e.into_response(),
    }
}

fn link_gone() -> Response {
    refused(
        StatusCode::NOT_FOUND,
        "This link does not work",
        "Sign-in links work once, for 15 minutes. Ask for a new one (mcpguard-policy console-link).",
    )
}

/// The page of a one-time link: a button that uses it. Opening the link alone (a
/// preview, a prefetch) does not use it up.
pub async fn link(State(console): State<Console>, Path(code): Path<String>) -> Response {
    match db::link_usable(&console.app.db, &sha256_hex(&code)).await {
        Ok(true) => {}
        Ok(false) => return link_gone(),
        Err(e) => return ApiError::from(e).into_response(),
    }
    let (csrf, set) = match session::login_csrf(&console) {
        Ok(pair) => pair,
        Err(e) => return e.into_response(),
    };
    let body: Markup = html! {
        p { "This one-time link signs you in to the console." }
        form.stack method="post" action={ "/console/link/" (code) } {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" autofocus { "Sign in" }
        }
    };
    with_cookie(bare(StatusCode::OK, "Sign in to the console", body), &set)
}

pub async fn use_link(
    State(console): State<Console>,
    Path(code): Path<String>,
    headers: HeaderMap,
    form: Fields,
) -> Response {
    let presented = form
        .ok()
        .and_then(|Form(f)| field(&f, "csrf").map(str::to_owned));
    if !session::login_csrf_ok(&headers, presented.as_deref()) {
        return refused(
            StatusCode::FORBIDDEN,
            "Cannot sign in",
            "The form expired or did not come from this site. Open the link again.",
        );
    }
    let user_id = match db::use_link(&console.app.db, &sha256_hex(&code)).await {
        Ok(Some(id)) => id,
        Ok(None) => return link_gone(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    match session::open(&console, user_id).await {
        Ok(set) => {
            tracing::info!(user_id, "console sign-in with a one-time link");
            see_other("/console", &set)
        }
        Err(e) => e.into_response(),
    }
}

/// `mcpguard-policy console-link`: a one-time sign-in link for `user`, valid for
/// [`LINK_TTL_MS`]; only its hash is stored.
pub async fn new_link(db: &crate::store::Db, issuer: &str, user: &str) -> anyhow::Result<String> {
    let user_id = db::user_named(db, user)
        .await?
        .ok_or_else(|| anyhow::anyhow!("there is no user named {user:?}"))?;
    let code = crate::secrets::random_id().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    db::insert_link(db, &sha256_hex(&code), user_id, LINK_TTL_MS).await?;
    Ok(format!("{issuer}/console/link/{code}"))
}
