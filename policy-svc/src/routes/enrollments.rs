//! Enrollments: how one token-based host (an agent) comes to act for many end users.
//! An admin (or the agent, with an admin token that holds `tokens.manage`) creates an
//! enrollment for a user and hands the user its link; the user signs in on that page of
//! this service and brings an identity for each per-user server of the gateway; the
//! agent then claims, once, a per-user token (`mcpgu_`) bound to (host, gateway, user).

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mcpguard_core::token::{TokenHash, TokenKind, display_prefix};
use serde::{Deserialize, Serialize};

use super::hosts::{IssuedToken, connection_target, issued};
use super::{Endpoint, Verb, audit_admin, endpoint, state_of};
use crate::AppState;
use crate::auth::{Admin, Capability, HostOf, Scope};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::identities::{identities_from_form, save_identities};
use crate::oauth_identity;
use crate::pages::{PageError, cookie, escape, html, refused_for_now, secure_attr};
use crate::secrets::{self, ct_eq};
use crate::signin::{self, SignIn, sign_in};
use crate::store::enrollments::{self as db, Enrollment, Status};
use crate::store::{hosts, identities, now_ms};

/// How long a link stays valid by default, and at most.
const DEFAULT_TTL_MINUTES: u32 = 24 * 60;
const MAX_TTL_MINUTES: u32 = 7 * 24 * 60;
const CSRF_COOKIE: &str = "mcpguard_enroll_csrf";

pub fn endpoints() -> Vec<Endpoint> {
    let manage = Some(Capability::TokensManage);
    let (own_host, own_enrollment) = (Scope::Host(HostOf::Host), Scope::Host(HostOf::Enrollment));
    vec![
        endpoint(Verb::Post, "/api/v1/hosts/{id}/enrollments", manage, create).scope(own_host),
        endpoint(Verb::Get, "/api/v1/hosts/{id}/enrollments", manage, list).scope(own_host),
        endpoint(Verb::Get, "/api/v1/enrollments/{id}", manage, get_one).scope(own_enrollment),
        endpoint(Verb::Post, "/api/v1/enrollments/{id}/token", manage, claim).scope(own_enrollment),
    ]
}

/// The page the user opens: `/enroll/{code}`.
pub fn pages() -> Router<AppState> {
    Router::new().route("/enroll/{code}", get(page).post(submit))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollment {
    gateway_id: i64,
    user_id: i64,
    /// How long the link stays valid (1 to 10080 minutes; 1440 by default).
    #[serde(default)]
    expires_in_minutes: Option<u32>,
}

#[derive(Serialize)]
struct EnrollmentView {
    #[serde(flatten)]
    enrollment: Enrollment,
    status: Status,
}

impl From<Enrollment> for EnrollmentView {
    fn from(enrollment: Enrollment) -> Self {
        let status = enrollment.status(now_ms());
        EnrollmentView { enrollment, status }
    }
}

/// The one response that holds the link (its secret): hand it to the user.
#[derive(Serialize)]
struct CreatedEnrollment {
    #[serde(flatten)]
    view: EnrollmentView,
    url: String,
    /// Per-user servers the user will be asked to bring an identity for.
    missing_identities: Vec<identities::Missing>,
}

async fn create(
    State(state): State<AppState>,
    admin: Admin,
    Path(host_id): Path<i64>,
    Json(body): Json<NewEnrollment>,
) -> Result<(StatusCode, Json<CreatedEnrollment>), ApiError> {
    let minutes = body.expires_in_minutes.unwrap_or(DEFAULT_TTL_MINUTES);
    if !(1..=MAX_TTL_MINUTES).contains(&minutes) {
        return Err(ApiError::unprocessable(
            "invalid_expires_in",
            format!("expires_in_minutes is 1 to {MAX_TTL_MINUTES}"),
        ));
    }
    connection_target(&state, host_id, body.gateway_id, body.user_id).await?;
    let code = secrets::random_id().map_err(ApiError::no_randomness)?;
    let enrollment = db::create(
        &state.db,
        &db::NewEnrollment {
            host_id,
            gateway_id: body.gateway_id,
            user_id: body.user_id,
            code_hash: &TokenHash::of(&code).to_hex(),
            created_by: admin.user_id,
            expires_at: now_ms() + i64::from(minutes) * 60_000,
        },
    )
    .await?;
    audit_admin(
        &state,
        &admin,
        "enrollment.create",
        format!("enrollments/{}", enrollment.id),
        None,
        state_of(&enrollment),
    )
    .await?;
    let missing_identities =
        identities::missing_on_gateway(&state.db, body.gateway_id, body.user_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollment {
            view: enrollment.into(),
            url: format!("{}/enroll/{code}", state.oauth.issuer),
            missing_identities,
        }),
    ))
}

async fn list(
    State(state): State<AppState>,
    Path(host_id): Path<i64>,
) -> Result<Json<Vec<EnrollmentView>>, ApiError> {
    hosts::get_host(&state.db, host_id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    let all = db::list_for_host(&state.db, host_id).await?;
    Ok(Json(all.into_iter().map(EnrollmentView::from).collect()))
}

async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<EnrollmentView>, ApiError> {
    let enrollment = db::get(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("enrollment"))?;
    Ok(Json(enrollment.into()))
}

/// Mints the per-user token once the user has completed the enrollment; only once.
async fn claim(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    let enrollment = db::get(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("enrollment"))?;
    let not_yet =
        |code: &'static str, message: &'static str| Err(ApiError::conflict(code, message));
    let claimed = || {
        not_yet(
            "enrollment_claimed",
            "this enrollment's token was claimed already",
        )
    };
    match enrollment.status(now_ms()) {
        Status::Completed => {}
        Status::Pending => {
            return not_yet(
                "enrollment_pending",
                "the user has not completed the enrollment yet",
            );
        }
        Status::Expired => return not_yet("enrollment_expired", "the enrollment link expired"),
        Status::Claimed => return claimed(),
    }
    let token = secrets::mint(TokenKind::PerUser).map_err(ApiError::no_randomness)?;
    let hash = TokenHash::of(&token).to_hex();
    let Some(token_id) = db::claim(
        &state.db,
        &enrollment,
        &hash,
        display_prefix(&token),
        admin.user_id,
    )
    .await?
    else {
        // Claimed by another call since the status was read.
        return claimed();
    };
    let meta = hosts::get_token(&state.db, token_id)
        .await?
        .ok_or(ApiError::NotFound("token"))?;
    tracing::info!(enrollment_id = id, "per-user token claimed");
    issued(&state, &admin, meta, token).await
}

// ---- the page ----

fn link_not_valid() -> PageError {
    PageError::page(
        StatusCode::NOT_FOUND,
        "Link not valid",
        "<p>This enrollment link is not valid: it may have expired or been used already. \
         Ask for a new one.</p>"
            .into(),
    )
}

/// What the page needs to know about an enrollment its link opens.
struct Opened {
    enrollment: Enrollment,
    user_name: String,
    host_name: String,
    gateway_name: String,
    missing: Vec<identities::Missing>,
}

/// The pending enrollment a link's secret opens, or the page that says why not. Unknown,
/// expired and used links all look alike to whoever holds one.
async fn open(state: &AppState, code: &str) -> Result<Opened, PageError> {
    let failed = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "enrollment page: database error");
        unavailable()
    };
    let enrollment = db::by_code(&state.db, &TokenHash::of(code).to_hex())
        .await
        .map_err(failed)?
        .filter(|e| e.status(now_ms()) == Status::Pending)
        .ok_or_else(link_not_valid)?;
    let names = db::names(&state.db, &enrollment).await.map_err(failed)?;
    let missing =
        identities::missing_on_gateway(&state.db, enrollment.gateway_id, enrollment.user_id)
            .await
            .map_err(failed)?;
    Ok(Opened {
        enrollment,
        user_name: names.user,
        host_name: names.host,
        gateway_name: names.gateway,
        missing,
    })
}

fn form_page(
    state: &AppState,
    status: StatusCode,
    code: &str,
    o: &Opened,
    csrf: &str,
    error: Option<&str>,
) -> Response {
    let mut body = format!(
        "<p><b>{host}</b> asks to act for <b>{user}</b> on the gateway <b>{gateway}</b>. \
         Sign in as {user} to allow it.</p>",
        host = escape(&o.host_name),
        user = escape(&o.user_name),
        gateway = escape(&o.gateway_name),
    );
    if let Some(error) = error {
        body.push_str(&format!("<p role=\"alert\"><b>{}</b></p>", escape(error)));
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/enroll/{code}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>User name <input name=\"username\" autocomplete=\"username\" required></label>\
         <label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>",
        code = escape(code),
        csrf = escape(csrf),
    ));
    for m in o.missing.iter().filter(|m| !m.oauth.0) {
        body.push_str(&format!(
            "<label>Your access token for <b>{name}</b> (sent to it as a bearer token; \
             stored encrypted) <input name=\"identity_{id}\" type=\"password\" \
             autocomplete=\"off\" required></label>",
            name = escape(&m.name),
            id = m.server_id,
        ));
    }
    // OAuth-protected servers are connected by the user (signed in here first), not
    // typed in; until then they refuse the agent's token for this user with
    // `identity_missing`. Connecting comes back to a page that says to reopen the link.
    for m in o.missing.iter().filter(|m| m.oauth.0) {
        body.push_str(&format!(
            "<button type=\"submit\" name=\"connect\" value=\"{id}\">Sign in and connect your \
             {name} account</button>",
            id = m.server_id,
            name = escape(&m.name),
        ));
    }
    body.push_str("<button type=\"submit\">Allow</button></form>");
    let mut response = html(status, "Enroll", body);
    // A fresh CSRF value per page, matched against the form (double submit): only a page
    // served by this site to this browser can post it.
    let cookie = format!(
        "{CSRF_COOKIE}={csrf}; Path=/enroll; HttpOnly; SameSite=Strict; Max-Age=1800{}",
        secure_attr(&state.oauth.issuer)
    );
    if let Ok(value) = cookie.parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// A fresh CSRF value, or (logged) the page that says the OS has no randomness to give.
fn fresh_csrf() -> Result<String, PageError> {
    secrets::random_id()
        .inspect_err(|e| tracing::error!(error = %e, "no randomness from the OS"))
        .map_err(|_| unavailable())
}

fn unavailable() -> PageError {
    PageError::page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again",
        "<p>The service is unavailable. Try again in a moment.</p>".into(),
    )
}

async fn page(
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> Result<Response, PageError> {
    let opened = open(&state, &code).await?;
    let csrf = fresh_csrf()?;
    Ok(form_page(
        &state,
        StatusCode::OK,
        &code,
        &opened,
        &csrf,
        None,
    ))
}

async fn submit(
    State(state): State<AppState>,
    client: signin::Client,
    Path(code): Path<String>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, PageError> {
    let opened = open(&state, &code).await?;
    let cannot = |status, message: &str| {
        PageError::page(status, "Cannot enroll", format!("<p>{message}</p>"))
    };
    let Ok(Form(fields)) = form else {
        return Err(cannot(StatusCode::BAD_REQUEST, "Malformed form."));
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let csrf_ok = match (cookie(&headers, CSRF_COOKIE), field("csrf")) {
        (Some(c), Some(f)) => ct_eq(&c, f),
        _ => false,
    };
    if !csrf_ok {
        return Err(cannot(
            StatusCode::FORBIDDEN,
            "The form expired or did not come from this site. Open the link again.",
        ));
    }
    let csrf = fresh_csrf()?;
    let again = |status, error: &str| {
        PageError::shown(form_page(
            &state,
            status,
            &code,
            &opened,
            &csrf,
            Some(error),
        ))
    };

    // Before the sign-in reads anything: beyond the hashing bound it costs nothing.
    let admitted = state.passwords.admit().map_err(|_| PageError::busy())?;
    // Only the invited user may complete it.
    let signed_in = match (field("username"), field("password")) {
        (Some(name), Some(password)) => sign_in(&state, admitted, &client, name, password)
            .await
            .map_err(ApiError::from)?,
        _ => SignIn::Refused,
    };
    match signed_in {
        SignIn::User(id) if id == opened.enrollment.user_id => {}
        SignIn::Throttled(retry_after) => {
            tracing::warn!(
                enrollment_id = opened.enrollment.id,
                retry_after,
                "enrollment sign-in throttled"
            );
            let page = again(StatusCode::TOO_MANY_REQUESTS, SignIn::THROTTLED_MESSAGE);
            return Err(PageError::shown(refused_for_now(
                page.into_response(),
                StatusCode::TOO_MANY_REQUESTS,
                retry_after,
            )));
        }
        SignIn::Busy => return Err(PageError::busy()),
        _ => {
            tracing::info!(
                enrollment_id = opened.enrollment.id,
                "enrollment sign-in refused"
            );
            return Err(again(
                StatusCode::UNAUTHORIZED,
                "Wrong user name or password.",
            ));
        }
    }
    // "Connect": to the server's sign-in, bound to this browser by a connect cookie.
    if let Some(connect) = field("connect") {
        let server = opened
            .missing
            .iter()
            .find(|m| m.oauth.0 && connect.parse() == Ok(m.server_id))
            .ok_or_else(|| cannot(StatusCode::BAD_REQUEST, "No such server to connect."))?;
        let (set_cookie, binding) = oauth_identity::connect_cookie(&state)?;
        let url = oauth_identity::begin_connect(
            &state,
            (opened.enrollment.user_id, opened.enrollment.user_id),
            &binding,
            server.server_id,
            oauth_identity::RETURN_DONE,
        )
        .await?
        .ok_or_else(|| {
            cannot(
                StatusCode::NOT_FOUND,
                "That server does not sign in by OAuth.",
            )
        })?;
        tracing::info!(
            enrollment_id = opened.enrollment.id,
            server_id = server.server_id,
            "oauth connect started from an enrollment"
        );
        let mut response = StatusCode::SEE_OTHER.into_response();
        for (name, value) in [(header::LOCATION, url), (header::SET_COOKIE, set_cookie)] {
            if let Ok(v) = value.parse() {
                response.headers_mut().append(name, v);
            }
        }
        return Ok(crate::pages::no_store(response));
    }
    // Every identity checked before any is saved: a refused form changes nothing.
    let typed: Vec<_> = opened
        .missing
        .iter()
        .filter(|m| !m.oauth.0)
        .cloned()
        .collect();
    let checked = identities_from_form(&typed, field, true).map_err(|m| {
        let error = format!(
            "Enter your access token for {} (one word, no spaces).",
            m.name
        );
        again(StatusCode::UNPROCESSABLE_ENTITY, &error)
    })?;
    let user_id = opened.enrollment.user_id;
    save_identities(&state, user_id, checked).await?;
    if !db::complete(&state.db, opened.enrollment.id)
        .await
        .map_err(ApiError::from)?
    {
        // Expired, or completed by another submission, since the page was opened.
        return Err(link_not_valid());
    }
    state
        .audit
        .admin(
            user_id,
            "enrollment.complete",
            format!("enrollments/{}", opened.enrollment.id),
            None,
            None,
        )
        .await
        .map_err(ApiError::from)?;
    tracing::info!(
        enrollment_id = opened.enrollment.id,
        user_id,
        "enrollment completed"
    );
    Ok(html(
        StatusCode::OK,
        "Done",
        format!(
            "<p><b>{}</b> can now act for you on <b>{}</b>. You can close this page.</p>",
            escape(&opened.host_name),
            escape(&opened.gateway_name)
        ),
    ))
}
