//! The OAuth 2.1 authorization server for headed hosts (MCP authorization spec):
//! metadata (RFC 8414), JWKS, dynamic client registration (RFC 7591), the
//! authorization endpoint with its sign-in and consent pages, the token endpoint
//! (authorization code with PKCE S256, refresh with rotation and reuse detection,
//! RFC 8707 `resource` bound into the audience) and revocation (RFC 7009).
//!
//! Errors of the token, registration and revocation endpoints are RFC 6749 bodies
//! (`{"error","error_description"}`); a refused request changes nothing, except that a
//! replayed code or refresh token revokes its whole grant, as RFC 6749 §4.1.2 and
//! OAuth 2.1 §4.3.1 ask.

use axum::Router;
use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mcpguard_core::oauth::{self as core_oauth, AccessClaims};
use mcpguard_core::route::McpPath;
use mcpguard_core::token::{TokenHash, TokenKind, parse_token};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secrets::random_id;
use crate::signin::{self, SignIn};
use crate::store::{self, now_ms, oauth as db};
use crate::{AppState, keys, secrets};

/// OAuth settings, from the command line (`Config::oauth`).
#[derive(Debug, Clone)]
pub struct OauthConfig {
    /// This service's public URL, no trailing slash.
    pub issuer: String,
    /// Data-plane base URLs under which resources may be named.
    pub resource_base_urls: Vec<String>,
    pub access_token_ttl_secs: i64,
    pub refresh_token_ttl_ms: i64,
    /// Peers whose `X-Forwarded-For` names the client of a sign-in (`--trusted-proxies`).
    pub trusted_proxies: Vec<crate::signin::Network>,
}

impl OauthConfig {
    pub fn for_tests() -> Self {
        OauthConfig {
            issuer: "http://127.0.0.1:8080".into(),
            resource_base_urls: vec!["http://127.0.0.1:10000".into()],
            access_token_ttl_secs: 300,
            refresh_token_ttl_ms: 86_400_000,
            trusted_proxies: Vec::new(),
        }
    }

    /// How long a retired key stays published: its last token's lifetime, and a
    /// margin for clocks and in-flight requests.
    pub fn max_token_age_ms(&self) -> i64 {
        (self.access_token_ttl_secs + 60) * 1000
    }
}

const CODE_TTL_MS: i64 = 60_000;
const SESSION_TTL_MS: i64 = 10 * 60_000;
const SESSION_COOKIE: &str = "mcpguard_session";
const LOGIN_CSRF_COOKIE: &str = "mcpguard_login_csrf";

/// The public port's OAuth routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route(core_oauth::JWKS_PATH, get(jwks))
        .route(core_oauth::REGISTER_PATH, post(register))
        .route(core_oauth::AUTHORIZE_PATH, get(authorize))
        .route("/oauth/login", post(login))
        .route("/oauth/consent", post(consent))
        .route(core_oauth::TOKEN_PATH, post(token))
        .route(core_oauth::REVOKE_PATH, post(revoke))
}

/// The check port's JWKS, which the filter fetches through the policy cluster.
pub fn check_routes() -> Router<AppState> {
    Router::new().route(core_oauth::CHECK_JWKS_PATH, get(jwks))
}

// ---- errors ----

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
pub struct OauthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OauthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OauthError {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn server_error(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "oauth: internal error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "try again",
        )
    }
}

impl From<store::StoreError> for OauthError {
    fn from(e: store::StoreError) -> Self {
        OauthError::server_error(e)
    }
}

impl IntoResponse for OauthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "error_description": self.description});
        no_store((self.status, axum::Json(body)).into_response())
    }
}

/// Responses that carry or lead to credentials are never cached (RFC 6749 §5.1).
fn no_store(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

// ---- form and query parameters ----

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

// ---- metadata, JWKS ----

async fn metadata(State(state): State<AppState>) -> Response {
    axum::Json(core_oauth::authorization_server_metadata(
        &state.oauth.issuer,
    ))
    .into_response()
}

async fn jwks(State(state): State<AppState>) -> Result<Response, OauthError> {
    let keys = db::published_keys(&state.db, state.oauth.max_token_age_ms()).await?;
    Ok(axum::Json(keys::jwks(&keys)).into_response())
}

// ---- dynamic client registration (RFC 7591) ----

#[derive(Deserialize)]
struct Registration {
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

async fn register(
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
    let name = super::validate_name(name).map_err(|_| {
        registration_error(
            "invalid_client_metadata",
            "client_name must be 1 to 200 printable characters",
        )
    })?;
    let client_id = random_id().map_err(OauthError::server_error)?;
    let client = db::insert_client(&state.db, &client_id, name, &reg.redirect_uris).await?;
    tracing::info!(client_id = %client.client_id, client_name = %client.client_name, "oauth client registered");
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

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

// ---- the authorization request ----

/// A validated authorization request.
struct Authz {
    client: db::Client,
    redirect_uri: String,
    state: Option<String>,
    code_challenge: String,
    resource: String,
    gateway_id: i64,
    gateway_name: String,
    scope: Option<String>,
}

/// The authorization request's parameters, carried through the sign-in and consent
/// forms as hidden fields and validated again at each step.
const AUTHZ_PARAMS: [&str; 8] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "scope",
];

enum AuthzError {
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

/// `<base>/mcp/{gateway}/{server}` under one of `bases`: (gateway, server) slugs.
pub fn parse_resource<'a>(resource: &'a str, bases: &[String]) -> Option<(&'a str, &'a str)> {
    let base = bases.iter().find(|b| resource.starts_with(b.as_str()))?;
    let path = &resource[base.len()..];
    if path.contains('?') || path.contains('#') {
        return None;
    }
    let p = McpPath::parse(path).ok()?;
    (p.rest.is_empty() && p.query.is_none()).then_some((p.gateway, p.server))
}

async fn validate_authz(state: &AppState, p: &Params) -> Result<Authz, AuthzError> {
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
            "resource must be an MCP URL of this gateway: <base>/mcp/{gateway}/{server}".into(),
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
fn client_redirect(
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

fn see_other(location: &str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    no_store(response)
}

fn authz_error_response(issuer: &str, e: AuthzError) -> Response {
    match e {
        AuthzError::Page(message) => html(
            StatusCode::BAD_REQUEST,
            "Cannot sign in",
            format!("<p>{}</p>", escape(&message)),
        ),
        AuthzError::Redirect {
            redirect_uri,
            state,
            error,
            description,
        } => client_redirect(
            issuer,
            &redirect_uri,
            state.as_deref(),
            &[("error", error), ("error_description", &description)],
        ),
    }
}

// ---- pages ----

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) fn html(status: StatusCode, title: &str, body: String) -> Response {
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · mcpguard</title>\
         <style>body{{font-family:sans-serif;max-width:32em;margin:3em auto}}label,input,button{{display:block;margin:.4em 0}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    let mut response = (status, page).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // No framing (clickjacking on the consent page), no scripts, no referrer leaks.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    no_store(response)
}

fn hidden_authz_fields(p: &Params) -> String {
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

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub(super) fn secure_attr(issuer: &str) -> &'static str {
    if issuer.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

pub(super) fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The consent form's CSRF token, derived from the session token: only a page that
/// was served to the session's holder can know it, and nothing extra is stored.
fn session_csrf(session_token: &str) -> String {
    core_oauth::base64url(&Sha256::digest(
        format!("mcpguard consent csrf {session_token}").as_bytes(),
    ))
}

fn login_page(issuer: &str, p: &Params, authz: &Authz, error: Option<&str>) -> Response {
    let Ok(csrf) = random_id() else {
        return OauthError::server_error("no randomness").into_response();
    };
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
    response
}

async fn consent_page(
    state: &AppState,
    p: &Params,
    authz: &Authz,
    session: &str,
    user: (i64, String),
) -> Response {
    let missing =
        match store::identities::missing_on_gateway(&state.db, authz.gateway_id, user.0).await {
            Ok(m) => m,
            Err(e) => return OauthError::from(e).into_response(),
        };
    let identities: String = missing
        .iter()
        .map(|m| {
            format!(
                "<label>Your token for <strong>{}</strong> ({}), optional <input name=\"identity_{}\" type=\"password\" autocomplete=\"off\"></label>",
                escape(&m.name),
                escape(&m.slug),
                m.server_id
            )
        })
        .collect();
    let identities = if identities.is_empty() {
        identities
    } else {
        format!(
            "<fieldset><legend>Servers on this gateway that act as you</legend>{identities}</fieldset>"
        )
    };
    let body = format!(
        "<p>Signed in as <strong>{user}</strong>.</p>\
         <p>Allow <strong>{client}</strong> to use the gateway <strong>{gateway}</strong> as you?</p>\
         <p><small>{resource}</small></p>\
         <p><small>Your answer goes back to {redirect}</small></p>\
         <form method=\"post\" action=\"/oauth/consent\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{hidden}{identities}\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        user = escape(&user.1),
        client = escape(&authz.client.client_name),
        gateway = escape(&authz.gateway_name),
        resource = escape(&authz.resource),
        redirect = escape(&authz.redirect_uri),
        csrf = session_csrf(session),
        hidden = hidden_authz_fields(p),
    );
    html(StatusCode::OK, "Allow access", body)
}

async fn signed_in(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(String, (i64, String))>, OauthError> {
    let Some(token) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    Ok(db::session_user(&state.db, &sha256_hex(&token))
        .await?
        .map(|user| (token, user)))
}

async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Ok(Query(pairs)) = query else {
        return html(
            StatusCode::BAD_REQUEST,
            "Cannot sign in",
            "<p>Malformed request.</p>".into(),
        );
    };
    let p = Params(pairs);
    let authz = match validate_authz(&state, &p).await {
        Ok(a) => a,
        Err(e) => return authz_error_response(&state.oauth.issuer, e),
    };
    match signed_in(&state, &headers).await {
        Ok(Some((session, user))) => consent_page(&state, &p, &authz, &session, user).await,
        Ok(None) => login_page(&state.oauth.issuer, &p, &authz, None),
        Err(e) => e.into_response(),
    }
}

fn form_params(form: Result<Form<Vec<(String, String)>>, FormRejection>) -> Option<Params> {
    form.ok().map(|Form(pairs)| Params(pairs))
}

/// A page that says "not now": `status`, and when to come back.
pub(super) fn refused_for_now(
    mut page: Response,
    status: StatusCode,
    retry_after: u64,
) -> Response {
    *page.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
        page.headers_mut().insert(header::RETRY_AFTER, v);
    }
    page
}

/// Too many password hashes at once ([`signin::Busy`]): 503, retry in a second.
pub(super) fn busy_page() -> Response {
    refused_for_now(
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            format!("<p>{}</p>", escape(SignIn::BUSY_MESSAGE)),
        ),
        StatusCode::SERVICE_UNAVAILABLE,
        signin::Busy::RETRY_AFTER_SECS,
    )
}

async fn login(
    State(state): State<AppState>,
    client: signin::Client,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let issuer = state.oauth.issuer.clone();
    let Some(p) = form_params(form) else {
        return html(
            StatusCode::BAD_REQUEST,
            "Cannot sign in",
            "<p>Malformed form.</p>".into(),
        );
    };
    let csrf_ok = match (cookie(&headers, LOGIN_CSRF_COOKIE), p.get("csrf")) {
        (Some(c), Ok(Some(f))) => ct_eq(&c, f),
        _ => false,
    };
    if !csrf_ok {
        return html(
            StatusCode::FORBIDDEN,
            "Cannot sign in",
            "<p>The form expired or did not come from this site. Start again from your application.</p>".into(),
        );
    }
    // Before any read: beyond the hashing bound a sign-in costs nothing.
    let Ok(admitted) = state.passwords.admit() else {
        return busy_page();
    };
    let authz = match validate_authz(&state, &p).await {
        Ok(a) => a,
        Err(e) => return authz_error_response(&issuer, e),
    };
    let (Ok(Some(username)), Ok(Some(password))) = (p.get("username"), p.get("password")) else {
        return login_page(
            &issuer,
            &p,
            &authz,
            Some("Enter your user name and password."),
        );
    };
    let user_id = match signin::sign_in(&state, admitted, &client, username, password).await {
        Ok(SignIn::User(id)) => id,
        Ok(SignIn::Throttled(retry_after)) => {
            tracing::warn!(client_id = %authz.client.client_id, retry_after, "oauth sign-in throttled");
            let page = login_page(&issuer, &p, &authz, Some(SignIn::THROTTLED_MESSAGE));
            return refused_for_now(page, StatusCode::TOO_MANY_REQUESTS, retry_after);
        }
        Ok(SignIn::Busy) => return busy_page(),
        Ok(SignIn::Refused) => {
            tracing::info!(client_id = %authz.client.client_id, "oauth sign-in refused");
            return login_page(&issuer, &p, &authz, Some("Wrong user name or password."));
        }
        Err(e) => return OauthError::from(e).into_response(),
    };
    let Ok(session) = random_id() else {
        return OauthError::server_error("no randomness").into_response();
    };
    if let Err(e) =
        db::insert_session(&state.db, &sha256_hex(&session), user_id, SESSION_TTL_MS).await
    {
        return OauthError::from(e).into_response();
    }
    tracing::info!(user_id, client_id = %authz.client.client_id, "oauth sign-in");
    // Back to the authorization endpoint (post/redirect/get), which now shows consent.
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            AUTHZ_PARAMS
                .iter()
                .filter_map(|n| p.get(n).ok().flatten().map(|v| (*n, v))),
        )
        .finish();
    see_other(
        &format!("{}?{query}", core_oauth::AUTHORIZE_PATH),
        Some(format!(
            "{SESSION_COOKIE}={session}; Path=/oauth; HttpOnly; SameSite=Lax; Max-Age={}{}",
            SESSION_TTL_MS / 1000,
            secure_attr(&issuer)
        )),
    )
}

async fn consent(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let issuer = state.oauth.issuer.clone();
    let Some(p) = form_params(form) else {
        return html(
            StatusCode::BAD_REQUEST,
            "Cannot continue",
            "<p>Malformed form.</p>".into(),
        );
    };
    let (session, (user_id, _)) = match signed_in(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return html(
                StatusCode::FORBIDDEN,
                "Cannot continue",
                "<p>Your sign-in expired. Start again from your application.</p>".into(),
            );
        }
        Err(e) => return e.into_response(),
    };
    if !p
        .get("csrf")
        .ok()
        .flatten()
        .is_some_and(|f| ct_eq(f, &session_csrf(&session)))
    {
        return html(
            StatusCode::FORBIDDEN,
            "Cannot continue",
            "<p>The form did not come from this site.</p>".into(),
        );
    }
    let authz = match validate_authz(&state, &p).await {
        Ok(a) => a,
        Err(e) => return authz_error_response(&issuer, e),
    };
    if p.get("decision").ok().flatten() != Some("allow") {
        return client_redirect(
            &issuer,
            &authz.redirect_uri,
            authz.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", "the user declined"),
            ],
        );
    }
    match grant_code(&state, &p, &authz, user_id).await {
        Ok(code) => client_redirect(
            &issuer,
            &authz.redirect_uri,
            authz.state.as_deref(),
            &[("code", &code)],
        ),
        Err(response) => response,
    }
}

/// After consent: identities the user brought, the headed host (on the client's first
/// authorization), the connection, and the code.
async fn grant_code(
    state: &AppState,
    p: &Params,
    authz: &Authz,
    user_id: i64,
) -> Result<String, Response> {
    let fail = |e: store::StoreError| OauthError::from(e).into_response();
    // Validate every identity field before storing any, so a bad one changes nothing.
    let missing = store::identities::missing_on_gateway(&state.db, authz.gateway_id, user_id)
        .await
        .map_err(fail)?;
    let field = |name: &str| p.get(name).ok().flatten();
    let brought = super::users::identities_from_form(&missing, field, false).map_err(|m| {
        html(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Cannot continue",
            format!(
                "<p>The token for {} must be one word, without spaces.</p>",
                escape(&m.name)
            ),
        )
    })?;
    super::users::save_identities(state, user_id, brought)
        .await
        .map_err(IntoResponse::into_response)?;
    let first = authz.client.host_id.is_none();
    let host_id = db::host_for_client(&state.db, &authz.client, user_id)
        .await
        .map_err(fail)?;
    let connection_id = store::hosts::connect(&state.db, host_id, authz.gateway_id, user_id)
        .await
        .map_err(fail)?;
    if first {
        tracing::info!(host_id, client_id = %authz.client.client_id, name = %authz.client.client_name, "client's first authorization: its headed host settled");
    }
    let code =
        secrets::mint(TokenKind::Code).map_err(|e| OauthError::server_error(e).into_response())?;
    db::insert_code(
        &state.db,
        &db::NewCode {
            code_hash: &TokenHash::of(&code).to_hex(),
            client_id: authz.client.id,
            user_id,
            connection_id,
            redirect_uri: &authz.redirect_uri,
            code_challenge: &authz.code_challenge,
            resource: &authz.resource,
            scope: authz.scope.as_deref(),
            ttl_ms: CODE_TTL_MS,
        },
    )
    .await
    .map_err(fail)?;
    let _ = state
        .audit
        .admin(
            user_id,
            "oauth.authorize",
            format!("connections/{connection_id}"),
            None,
            Some(serde_json::json!({"host_id": host_id, "client_id": authz.client.client_id, "resource": authz.resource})),
        )
        .await;
    Ok(code)
}

// ---- token endpoint ----

async fn token(
    State(state): State<AppState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, OauthError> {
    let p = form_params(form).ok_or_else(|| {
        OauthError::invalid_request("send application/x-www-form-urlencoded parameters")
    })?;
    match p
        .required("grant_type")
        .map_err(OauthError::invalid_request)?
    {
        "authorization_code" => exchange(&state, &p).await,
        "refresh_token" => refresh(&state, &p).await,
        _ => Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )),
    }
}

async fn exchange(state: &AppState, p: &Params) -> Result<Response, OauthError> {
    let req = |n| p.required(n).map_err(OauthError::invalid_request);
    let (code, client_id, redirect_uri, verifier) = (
        req("code")?,
        req("client_id")?,
        req("redirect_uri")?,
        req("code_verifier")?,
    );
    let resource = p.get("resource").map_err(OauthError::invalid_request)?;
    let presented = TokenHash::of(code);
    let row = db::get_code(&state.db, &presented.to_hex())
        .await?
        .filter(|c| TokenHash::from_hex(&c.code_hash).is_some_and(|h| h.ct_eq(&presented)))
        .ok_or_else(|| OauthError::invalid_grant("unknown authorization code"))?;
    if !ct_eq(&row.client_id, client_id) {
        return Err(OauthError::invalid_grant(
            "the code was issued to another client",
        ));
    }
    if row.used_at.is_some() {
        return Err(replayed_code(state, &row).await);
    }
    if row.expires_at <= now_ms() {
        return Err(OauthError::invalid_grant(
            "the authorization code has expired",
        ));
    }
    if row.redirect_uri != redirect_uri {
        return Err(OauthError::invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    if resource.is_some_and(|r| r != row.resource) {
        return Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "resource differs from the authorization request",
        ));
    }
    if !core_oauth::pkce_matches(verifier, &row.code_challenge) {
        return Err(OauthError::invalid_grant(
            "code_verifier does not match the code_challenge",
        ));
    }
    let refresh_token = secrets::mint(TokenKind::Refresh).map_err(OauthError::server_error)?;
    let issued = db::exchange_code(
        &state.db,
        &row,
        &TokenHash::of(&refresh_token).to_hex(),
        state.oauth.refresh_token_ttl_ms,
    )
    .await?;
    let Some(issued) = issued else {
        // Used between our read and our write: the same replay, raced.
        let row = db::get_code(&state.db, &presented.to_hex())
            .await?
            .unwrap_or(row);
        return Err(replayed_code(state, &row).await);
    };
    tracing::info!(
        grant_id = issued.grant_id,
        client_id,
        "oauth code exchanged"
    );
    let claims = Claims {
        client_id,
        user_id: row.user_id,
        connection_id: row.connection_id,
        grant_id: issued.grant_id,
        resource: &row.resource,
    };
    token_response(state, &claims, &refresh_token, row.scope.as_deref()).await
}

/// A code presented twice may have been stolen: revoke what it produced.
async fn replayed_code(state: &AppState, row: &db::Code) -> OauthError {
    if let Some(grant) = row.grant_id {
        tracing::warn!(
            grant_id = grant,
            "oauth: authorization code reused; grant revoked"
        );
        if let Err(e) = db::revoke_grant(&state.db, grant).await {
            return OauthError::from(e);
        }
    }
    OauthError::invalid_grant("the authorization code was already used")
}

async fn refresh(state: &AppState, p: &Params) -> Result<Response, OauthError> {
    let req = |n| p.required(n).map_err(OauthError::invalid_request);
    let (token, client_id) = (req("refresh_token")?, req("client_id")?);
    let resource = p.get("resource").map_err(OauthError::invalid_request)?;
    if parse_token(token) != Ok(TokenKind::Refresh) {
        return Err(OauthError::invalid_grant("not a refresh token"));
    }
    let presented = TokenHash::of(token);
    let row = db::get_refresh(&state.db, &presented.to_hex())
        .await?
        .filter(|r| TokenHash::from_hex(&r.token_hash).is_some_and(|h| h.ct_eq(&presented)))
        .ok_or_else(|| OauthError::invalid_grant("unknown refresh token"))?;
    if !ct_eq(&row.client_id, client_id) {
        return Err(OauthError::invalid_grant(
            "the refresh token was issued to another client",
        ));
    }
    if row.grant_revoked_at.is_some() {
        return Err(OauthError::invalid_grant("the grant was revoked"));
    }
    if row.used_at.is_some() {
        return Err(reused_refresh(state, row.grant_id).await);
    }
    if row.expires_at <= now_ms() {
        return Err(OauthError::invalid_grant("the refresh token has expired"));
    }
    if resource.is_some_and(|r| r != row.resource) {
        return Err(OauthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "a refresh token only serves the resource it was granted for",
        ));
    }
    let next = secrets::mint(TokenKind::Refresh).map_err(OauthError::server_error)?;
    let rotated = db::rotate_refresh(
        &state.db,
        &row,
        &TokenHash::of(&next).to_hex(),
        state.oauth.refresh_token_ttl_ms,
    )
    .await?;
    if rotated.is_none() {
        return Err(reused_refresh(state, row.grant_id).await);
    }
    let claims = Claims {
        client_id,
        user_id: row.user_id,
        connection_id: row.connection_id,
        grant_id: row.grant_id,
        resource: &row.resource,
    };
    token_response(state, &claims, &next, row.scope.as_deref()).await
}

/// A rotated refresh token presented again: someone holds a copy. Revoke the family.
async fn reused_refresh(state: &AppState, grant_id: i64) -> OauthError {
    tracing::warn!(
        grant_id,
        "oauth: refresh token reused; the whole grant is revoked"
    );
    if let Err(e) = db::revoke_grant(&state.db, grant_id).await {
        return OauthError::from(e);
    }
    OauthError::invalid_grant("the refresh token was already used; the grant is revoked")
}

struct Claims<'a> {
    client_id: &'a str,
    user_id: i64,
    connection_id: i64,
    grant_id: i64,
    resource: &'a str,
}

async fn token_response(
    state: &AppState,
    c: &Claims<'_>,
    refresh_token: &str,
    scope: Option<&str>,
) -> Result<Response, OauthError> {
    let now = now_ms() / 1000;
    let claims = AccessClaims {
        iss: state.oauth.issuer.clone(),
        aud: c.resource.to_owned(),
        sub: c.user_id.to_string(),
        exp: now + state.oauth.access_token_ttl_secs,
        iat: now,
        jti: random_id().map_err(OauthError::server_error)?,
        client_id: c.client_id.to_owned(),
        gid: c.grant_id,
        cid: c.connection_id,
    };
    let access_token = state
        .signer
        .sign(&state.db, &state.secrets, &claims)
        .await
        .map_err(OauthError::server_error)?;
    let mut body = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.oauth.access_token_ttl_secs,
        "refresh_token": refresh_token,
    });
    if let Some(scope) = scope {
        body["scope"] = scope.into();
    }
    Ok(no_store(axum::Json(body).into_response()))
}

// ---- revocation (RFC 7009) ----

async fn revoke(
    State(state): State<AppState>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, OauthError> {
    let p = form_params(form).ok_or_else(|| {
        OauthError::invalid_request("send application/x-www-form-urlencoded parameters")
    })?;
    let token = p.required("token").map_err(OauthError::invalid_request)?;
    let client_id = p
        .required("client_id")
        .map_err(OauthError::invalid_request)?;
    let grant = if parse_token(token) == Ok(TokenKind::Refresh) {
        let presented = TokenHash::of(token);
        db::get_refresh(&state.db, &presented.to_hex())
            .await?
            .filter(|r| TokenHash::from_hex(&r.token_hash).is_some_and(|h| h.ct_eq(&presented)))
            .filter(|r| ct_eq(&r.client_id, client_id))
            .map(|r| r.grant_id)
    } else {
        verified_access_token_grant(&state, token).await?
    };
    if let Some(grant) = grant {
        // A client may only revoke its own tokens (RFC 7009 §2.1).
        if db::grant_client(&state.db, grant)
            .await?
            .is_some_and(|c| ct_eq(&c, client_id))
        {
            db::revoke_grant(&state.db, grant).await?;
            tracing::info!(grant_id = grant, "oauth grant revoked by its client");
        }
    }
    // Unknown and foreign tokens get the same answer (RFC 7009 §2.2).
    Ok(no_store(StatusCode::OK.into_response()))
}

/// The grant of an access token this service signed (any published key), if valid.
async fn verified_access_token_grant(
    state: &AppState,
    token: &str,
) -> Result<Option<i64>, OauthError> {
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        return Ok(None);
    };
    let keys = db::published_keys(&state.db, state.oauth.max_token_age_ms()).await?;
    let Some(key) = keys.iter().find(|k| Some(&k.kid) == header.kid.as_ref()) else {
        return Ok(None);
    };
    let Ok(decoding) = jsonwebtoken::DecodingKey::from_ed_components(&key.public_x) else {
        return Ok(None);
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.validate_aud = false;
    validation.set_issuer(&[&state.oauth.issuer]);
    Ok(
        jsonwebtoken::decode::<AccessClaims>(token, &decoding, &validation)
            .ok()
            .map(|d| d.claims.gid),
    )
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
        for bad in [
            "http://evil.example/mcp/eng/demo",
            "http://127.0.0.1:100000/mcp/eng/demo",
            "http://127.0.0.1:10000/mcp/eng",
            "http://127.0.0.1:10000/mcp/eng/demo/extra",
            "http://127.0.0.1:10000/mcp/eng/demo?x=1",
            "http://127.0.0.1:10000/mcp/eng/demo#f",
            "http://127.0.0.1:10000/other/eng/demo",
        ] {
            assert_eq!(parse_resource(bad, &bases), None, "{bad}");
        }
    }

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

    #[test]
    fn pages_escape_what_clients_and_users_send() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn consent_csrf_is_bound_to_the_session() {
        assert_eq!(session_csrf("a"), session_csrf("a"));
        assert_ne!(session_csrf("a"), session_csrf("b"));
        assert!(!session_csrf("a").contains('a') || session_csrf("a") != "a");
    }
}
