//! Envoy's native `ext_authz` filter (HTTP service) as an alternative to the wasm filter.
//!
//! Envoy sends the client's method, `Authorization`, `Host` and path — prefixed with the
//! filter's `path_prefix`, which must be [`PATH_PREFIX`] — with no body. The decision is
//! the check endpoint's own: the same token parsing (`mcpguard_core`), the same single
//! store read ([`check::Reads::load`]) and the same pure [`check::decide`]. OAuth access
//! tokens are verified here as the wasm filter verifies them ([`mcpguard_core::jwt`]),
//! with the published keys held by [`Verifier`](crate::keys::Verifier), and the
//! protected-resource metadata the filter answers itself is served here for Envoy to
//! route to ([`resource_metadata`]). What differs is only the wire form, which is
//! Envoy's:
//! - allow: `200`, with `x-envoy-auth-headers-to-remove: authorization` (the upstream never
//!   sees the client's token) and, when the exposure injects a downstream credential, that
//!   header — list it in `allowed_upstream_headers`;
//! - deny: the contract's status and `{"error":{"code","message"}}` body, with
//!   `WWW-Authenticate` on 401s, which Envoy relays to the client as they are;
//! - store error, or no answer from the store within `--check-deadline-ms` (as on
//!   `/v1/check`): `503 policy_unavailable`. Envoy treats any 5xx from the authorization
//!   service as a failure and answers `status_on_error` (configure 503) itself: fail closed.
//!
//! Every decision is logged and audited as on `/v1/check`, including the refusals the
//! wasm filter makes on its own (no token, malformed token), which arrive here; with
//! Envoy's MCP filter in front, the entries name the MCP method and tool too.
//!
//! Routing stays in Envoy's route configuration in this mode: the decision's upstream is
//! not used, so each route must point at the upstream the server is registered with.

use std::time::Instant;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use mcpguard_core::check::{CheckResponse, DenyCode, bounded_name, bounded_request_id};
use mcpguard_core::jwt;
use mcpguard_core::oauth::{RESOURCE_METADATA_PREFIX, protected_resource_metadata, resource_url};
use mcpguard_core::route::{McpPath, PathError};
use mcpguard_core::token::{TokenHash, TokenKind, parse_token};

use crate::AppState;
use crate::config::CheckDeadline;
use crate::store::{self, audit::Event, check};

/// The `http_service.path_prefix` Envoy's ext_authz filter must be configured with.
pub const PATH_PREFIX: &str = "/v1/ext_authz";

/// The request header Envoy removes before forwarding an allowed request, listed in the
/// allow answer (Envoy's `x-envoy-auth-headers-to-remove`).
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// The JSON-RPC method and tool name, when Envoy's MCP filter parsed them; Envoy adds
/// them from its metadata (`authorization_request.headers_to_add`), so the audit trail
/// names the tool as it does for the wasm filter.
const MCP_METHOD_HEADER: &str = "x-mcpguard-mcp-method";
const MCP_TOOL_HEADER: &str = "x-mcpguard-mcp-tool";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PATH_PREFIX}/{{*path}}"), any(run))
        .route(
            &format!("{RESOURCE_METADATA_PREFIX}/{{*path}}"),
            get(resource_metadata),
        )
}

/// How the client proved who it is, once its token has been looked at.
pub(super) enum Presented {
    ApiToken(TokenHash),
    /// A verified access token's grant and connection.
    Oauth {
        grant: i64,
        connection: i64,
    },
}

async fn run(
    State(state): State<AppState>,
    deadline: Option<Extension<CheckDeadline>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let full = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let original = full.strip_prefix(PATH_PREFIX).unwrap_or(full);
    let mut seen = Seen {
        started: Some(started),
        request_id: header("x-request-id").map(bounded_request_id),
        mcp_method: header(MCP_METHOD_HEADER)
            .filter(|v| !v.is_empty())
            .map(bounded_name),
        tool: header(MCP_TOOL_HEADER)
            .filter(|v| !v.is_empty())
            .map(bounded_name),
        ..Seen::default()
    };

    let path = match McpPath::parse(original) {
        Ok(p) => p,
        // Nothing but MCP endpoints is ours to pass: a route that sends other paths
        // through this filter gets a refusal, never an allow.
        Err(PathError::NotMcp | PathError::Malformed) => {
            return seen.refuse(&state, DenyCode::UnknownRoute, None);
        }
    };
    seen.gateway = Some(path.gateway);
    seen.server = Some(path.server);
    // Built only when needed (a refusal's challenge, an access token's audience), not
    // for every API token.
    let base = || client_base_url(&uri, &headers);
    let metadata = || mcpguard_core::check::resource_metadata_url(&base(), original);
    let Some(authorization) = header("authorization") else {
        return seen.refuse(&state, DenyCode::TokenMissing, Some(&metadata()));
    };
    let Some(token) = mcpguard_core::bearer_token(authorization) else {
        return seen.refuse(&state, DenyCode::TokenMalformed, Some(&metadata()));
    };
    // The same deadline as /v1/check: a slow store is a quick refusal, not a wait.
    let deadline = deadline.map(|Extension(d)| d).unwrap_or_default().0;
    let audience = || resource_url(&base(), path.gateway, path.server);
    let presented = match present(&state, token, audience, deadline).await {
        Ok(presented) => presented,
        Err(Unpresentable::Refused(code)) => {
            return seen.refuse(&state, code, Some(&metadata()));
        }
        Err(Unpresentable::NoKeys(e)) => {
            tracing::warn!(error = %e, gateway = path.gateway, server = path.server, request_id = seen.request_id, "ext_authz check: no verification keys from the store; refusing");
            return refuse(DenyCode::PolicyUnavailable, None);
        }
    };

    let hex;
    let lookup = match &presented {
        Presented::ApiToken(hash) => {
            hex = hash.to_hex();
            check::Lookup::ApiToken(&hex)
        }
        Presented::Oauth { grant, .. } => check::Lookup::Grant(*grant),
    };
    let read = state.check_reads.load(lookup, path.server, deadline);
    let row = match read.await {
        Ok(row) => row,
        Err(e) => {
            // As on /v1/check, a failed read is not a decision: it is refused, not audited.
            tracing::warn!(error = %e, gateway = path.gateway, server = path.server, request_id = seen.request_id, "ext_authz check: no answer from the store; refusing");
            return refuse(DenyCode::PolicyUnavailable, None);
        }
    };
    let now = store::now_ms();
    let decision = match &presented {
        Presented::ApiToken(hash) => check::decide(
            row.as_ref(),
            hash,
            path.gateway,
            now,
            state.secrets.opener(),
        ),
        Presented::Oauth { connection, .. } => check::decide_oauth(
            row.as_ref(),
            *connection,
            path.gateway,
            state.secrets.opener(),
        ),
    };
    seen.row = row.as_ref();
    match decision {
        CheckResponse::Allow { inject, .. } => {
            if let Some(row) = &row {
                // An OAuth row's id is its grant's, not an API token's.
                let token = matches!(presented, Presented::ApiToken(_)).then_some(row.token_id);
                state.usage.record(token, row.connection_id);
            }
            seen.record(&state, now, None);
            allow(inject.map(|h| (h.name, h.value)))
        }
        CheckResponse::Deny { code } => seen.refuse(&state, code, None),
    }
}

/// Why a bearer token goes no further than its own look.
pub(super) enum Unpresentable {
    Refused(DenyCode),
    /// An access token, and no keys to verify it with: not a decision.
    NoKeys(store::StoreError),
}

/// What the token proves, before the store is asked: an API token's hash, or an access
/// token verified for `audience` (this request's MCP URL, as the filter checks it).
pub(super) async fn present(
    state: &AppState,
    token: &str,
    audience: impl FnOnce() -> String,
    deadline: std::time::Duration,
) -> Result<Presented, Unpresentable> {
    if jwt::looks_like_jwt(token) {
        let keys = state
            .verifier
            .keys_for(token, &state.db, state.oauth.max_token_age_ms(), deadline)
            .await
            .map_err(Unpresentable::NoKeys)?;
        let now_s = store::now_ms() / 1000;
        let claims = jwt::verify(token, &keys, &state.oauth.issuer, &audience(), now_s)
            .map_err(Unpresentable::Refused)?;
        return Ok(Presented::Oauth {
            grant: claims.gid,
            connection: claims.cid,
        });
    }
    match parse_token(token) {
        Ok(TokenKind::HostApi | TokenKind::PerUser) => {
            Ok(Presented::ApiToken(TokenHash::of(token)))
        }
        // Admin tokens are for the admin API only, refresh tokens and codes for the
        // token endpoint; never let one act on the data plane.
        Ok(TokenKind::Admin | TokenKind::Refresh | TokenKind::Code) => {
            Err(Unpresentable::Refused(DenyCode::TokenUnknown))
        }
        Err(_) => Err(Unpresentable::Refused(DenyCode::TokenMalformed)),
    }
}

/// What is known of a request when it is decided, for the log and the audit trail.
#[derive(Default)]
struct Seen<'a> {
    started: Option<Instant>,
    request_id: Option<&'a str>,
    gateway: Option<&'a str>,
    server: Option<&'a str>,
    mcp_method: Option<&'a str>,
    tool: Option<&'a str>,
    row: Option<&'a check::CheckRow>,
}

impl Seen<'_> {
    /// Logs and audits the decision (`code` is `None` for an allow), as /v1/check does.
    fn record(&self, state: &AppState, now: i64, code: Option<DenyCode>) {
        let action = if code.is_some() { "deny" } else { "allow" };
        let code = code.map(DenyCode::as_str);
        let connection_id = self.row.map(|r| r.connection_id);
        tracing::debug!(
            gateway = self.gateway,
            server = self.server,
            action,
            code,
            connection_id,
            request_id = self.request_id,
            "ext_authz check"
        );
        state.audit.decision(Event {
            at: now,
            kind: "decision".into(),
            action: action.into(),
            code: code.map(str::to_owned),
            host_id: self.row.map(|r| r.host_id),
            user_id: self.row.map(|r| r.user_id),
            connection_id,
            gateway: self.gateway.map(str::to_owned),
            server: self.server.map(str::to_owned),
            mcp_method: self.mcp_method.map(str::to_owned),
            tool: self.tool.map(str::to_owned),
            latency_us: self
                .started
                .and_then(|t| i64::try_from(t.elapsed().as_micros()).ok()),
            request_id: self.request_id.map(str::to_owned),
            ..Event::default()
        });
    }

    fn refuse(
        &self,
        state: &AppState,
        code: DenyCode,
        resource_metadata: Option<&str>,
    ) -> Response {
        self.record(state, store::now_ms(), Some(code));
        refuse(code, resource_metadata)
    }
}

/// `200` with the headers Envoy applies to the upstream request.
fn allow(inject: Option<(String, String)>) -> Response {
    let mut headers = HeaderMap::new();
    let injected = inject.and_then(|(name, value)| {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(name), Ok(value)) => Some((name, value)),
            _ => None,
        }
    });
    let replaces_authorization = injected
        .as_ref()
        .is_some_and(|(name, _)| name == axum::http::header::AUTHORIZATION);
    if let Some((name, value)) = injected {
        headers.insert(name, value);
    }
    // Envoy sets the allowed headers first and removes these after; an injected
    // `Authorization` replaces the client's, so it must not be removed.
    if !replaces_authorization {
        headers.insert(HEADERS_TO_REMOVE, HeaderValue::from_static("authorization"));
    }
    (StatusCode::OK, headers).into_response()
}

/// The contract's refusal: status, JSON body and, on 401s, the bearer challenge.
fn refuse(code: DenyCode, resource_metadata: Option<&str>) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = (status, code.body()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(Ok(value)) = code.challenge(resource_metadata).map(HeaderValue::try_from) {
        headers.insert(axum::http::header::WWW_AUTHENTICATE, value);
    }
    response
}

/// RFC 9728: the protected-resource metadata of `/mcp/{g}/{s}`, which names this
/// service as the authorization server. The wasm filter answers it itself; with
/// ext_authz, Envoy routes `/.well-known/oauth-protected-resource/mcp/` here, to the
/// check port (`bench/envoy/ext-authz.yaml`).
async fn resource_metadata(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let resource_path = uri
        .path()
        .strip_prefix(RESOURCE_METADATA_PREFIX)
        .unwrap_or_default();
    match McpPath::parse(resource_path) {
        Ok(p) if p.rest.is_empty() => {
            let resource = resource_url(&client_base_url(&uri, &headers), p.gateway, p.server);
            let doc = protected_resource_metadata(&resource, &state.oauth.issuer);
            (
                [
                    (axum::http::header::CONTENT_TYPE, "application/json"),
                    (axum::http::header::CACHE_CONTROL, "max-age=300"),
                ],
                doc,
            )
                .into_response()
        }
        _ => refuse(DenyCode::UnknownRoute, None),
    }
}

/// The data plane's scheme and authority as the client used them: the base of the
/// request's resource URL (an access token's audience) and of its metadata URL. Envoy
/// sends the client's host (`Host` over HTTP/1.1, `:authority` over HTTP/2); the
/// scheme only in `x-forwarded-proto`, when that header is passed on.
fn client_base_url(uri: &Uri, headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let scheme = match header("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or(header("host"))
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use mcpguard_core::oauth::AccessClaims;
    use mcpguard_core::token::format_token;
    use tower::ServiceExt;

    use crate::store::Db;
    use crate::store::check::Reads;

    struct Fixture {
        app: Router,
        db: Db,
        token: String,
        token_id: i64,
        dir: tempfile::TempDir,
        secrets: std::sync::Arc<crate::secrets::SecretBox>,
        verifier: std::sync::Arc<crate::keys::Verifier>,
    }

    /// The grant of the fixture's OAuth client on connection 1.
    const GRANT: i64 = 5;

    impl Fixture {
        /// An access token signed with the store's active key, as the token endpoint
        /// signs one: for `/mcp/eng/demo` on `gw.local:10000`, grant [`GRANT`].
        async fn access_token(&self, edit: impl FnOnce(&mut AccessClaims)) -> String {
            let now = store::now_ms() / 1000;
            let mut claims = AccessClaims {
                iss: crate::routes::oauth::OauthConfig::for_tests().issuer,
                aud: "http://gw.local:10000/mcp/eng/demo".into(),
                sub: "1".into(),
                exp: now + 300,
                iat: now,
                jti: "j1".into(),
                client_id: "c".into(),
                gid: GRANT,
                cid: 1,
            };
            edit(&mut claims);
            crate::keys::Signer::default()
                .sign(&self.db, &self.secrets, &claims)
                .await
                .unwrap()
        }
    }

    /// A store with gateway `eng` exposing server `demo` (shared) and one token for it;
    /// checks read it as they do when shipped (on SQLite, not through the pool).
    async fn fixture() -> Fixture {
        fixture_reading(|db, url| Reads::for_store(db, url, std::time::Duration::from_secs(1)))
            .await
    }

    async fn fixture_reading(reads: impl FnOnce(&Db, &str) -> Reads) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = store::open(&url, 2).await.unwrap();
        let now = store::now_ms();
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', $1)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'owner', 1, 1, $1)",
            "INSERT INTO gateways (id, name, slug, enabled, created_at) VALUES (1, 'Eng', 'eng', 1, $1)",
            "INSERT INTO servers (id, name, slug, upstream_scheme, upstream_authority, upstream_path, enabled, created_at)
             VALUES (1, 'Demo', 'demo', 'http', '127.0.0.1:9100', '/mcp', 1, $1)",
            "INSERT INTO exposures (gateway_id, server_id, identity, created_at) VALUES (1, 1, 'shared', $1)",
            "INSERT INTO hosts (id, name, kind, enabled, created_at) VALUES (1, 'Bot', 'token', 1, $1)",
            "INSERT INTO connections (id, host_id, gateway_id, user_id, enabled, created_at) VALUES (1, 1, 1, 1, 1, $1)",
            "INSERT INTO oauth_clients (id, client_id, client_name, redirect_uris, host_id, created_at) VALUES (1, 'c', 'App', '[]', 1, $1)",
            "INSERT INTO oauth_grants (id, client_id, user_id, connection_id, resource, created_at) VALUES (5, 1, 1, 1, 'http://gw.local:10000/mcp/eng/demo', $1)",
        ] {
            sqlx::query(sql).bind(now).execute(&db).await.unwrap();
        }
        let token = format_token(TokenKind::HostApi, &"k".repeat(40)).unwrap();
        sqlx::query(
            "INSERT INTO api_tokens (id, connection_id, token_hash, prefix, created_by, created_at)
             VALUES (7, 1, $1, 'mcpgt_kkkkkkkk', 1, $2)",
        )
        .bind(TokenHash::of(&token).to_hex())
        .bind(now)
        .execute(&db)
        .await
        .unwrap();
        let secrets = std::sync::Arc::new(
            crate::secrets::SecretBox::load_or_create(&dir.path().join("secrets.key")).unwrap(),
        );
        store::oauth::ensure_keys(&db, &mut || crate::keys::generate(&secrets))
            .await
            .unwrap();
        let verifier = std::sync::Arc::new(crate::keys::Verifier::default());
        let (usage, _writer) = crate::Usage::spawn(db.clone());
        let (audit, _audit_writer) = crate::audit::Audit::spawn(db.clone(), 0);
        let app = super::super::check(AppState {
            check_reads: reads(&db, &url),
            db: db.clone(),
            usage,
            audit,
            audit_retention_days: 0,
            secrets: secrets.clone(),
            oauth: std::sync::Arc::new(crate::routes::oauth::OauthConfig::for_tests()),
            signer: std::sync::Arc::default(),
            verifier: verifier.clone(),
            upstreams: std::sync::Arc::default(),
            passwords: std::sync::Arc::new(crate::signin::Passwords::new(1)),
        });
        Fixture {
            app,
            db,
            token,
            token_id: 7,
            dir,
            secrets,
            verifier,
        }
    }

    struct Answer {
        status: u16,
        headers: HeaderMap,
        body: String,
    }

    impl Answer {
        fn code(&self) -> String {
            let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
            v["error"]["code"].as_str().unwrap().to_owned()
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }
    }

    /// What Envoy's ext_authz filter sends for a client's `POST {path}`.
    async fn ask(app: &Router, path: &str, authorization: Option<&str>) -> Answer {
        ask_with(app, path, authorization, &[]).await
    }

    async fn ask_with(
        app: &Router,
        path: &str,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::post(format!("{PATH_PREFIX}{path}"))
            .header("host", "gw.local:10000")
            .header("content-length", "0");
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_live_token_is_allowed_and_its_token_is_stripped_upstream() {
        let f = fixture().await;
        let a = ask(
            &f.app,
            "/mcp/eng/demo",
            Some(&format!("Bearer {}", f.token)),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header(HEADERS_TO_REMOVE), Some("authorization"));
        assert!(a.body.is_empty());
        // Any method and sub-path of the endpoint is checked the same way.
        let a = ask(
            &f.app,
            "/mcp/eng/demo/sub?x=1",
            Some(&format!("bearer {}", f.token)),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    #[tokio::test]
    async fn refusals_carry_the_contract_status_body_and_challenge() {
        let f = fixture().await;
        let bearer = format!("Bearer {}", f.token);

        let a = ask(&f.app, "/mcp/eng/demo", None).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_missing"));
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(
            a.header("www-authenticate"),
            Some(
                r#"Bearer resource_metadata="http://gw.local:10000/.well-known/oauth-protected-resource/mcp/eng/demo""#
            )
        );

        let a = ask(&f.app, "/mcp/eng/demo", Some("Bearer not-a-token")).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_malformed"));
        assert!(
            a.header("www-authenticate")
                .unwrap()
                .contains(r#"error="invalid_token""#)
        );

        let forged = format_token(TokenKind::HostApi, &"Z".repeat(40)).unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&format!("Bearer {forged}"))).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_unknown"));
        assert!(
            a.header("www-authenticate")
                .unwrap()
                .contains(r#"error="invalid_token""#)
        );
        assert_eq!(a.header(HEADERS_TO_REMOVE), None);

        let admin = format_token(TokenKind::Admin, &"k".repeat(40)).unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&format!("Bearer {admin}"))).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_unknown"));

        let a = ask(&f.app, "/mcp/ops/demo", Some(&bearer)).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_wrong_gateway"));

        let a = ask(&f.app, "/mcp/eng/other", Some(&bearer)).await;
        assert_eq!((a.status, a.code().as_str()), (403, "server_not_exposed"));

        for path in ["/healthz", "/mcp/eng", "/mcp/eng/demo/../x"] {
            let a = ask(&f.app, path, Some(&bearer)).await;
            assert_eq!(
                (a.status, a.code().as_str()),
                (404, "unknown_route"),
                "{path}"
            );
        }

        sqlx::query("UPDATE hosts SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer)).await;
        assert_eq!((a.status, a.code().as_str()), (403, "host_disabled"));
        assert_eq!(a.header("www-authenticate"), None);

        sqlx::query("UPDATE api_tokens SET revoked_at = 1 WHERE id = $1")
            .bind(f.token_id)
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer)).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_revoked"));
    }

    #[tokio::test]
    async fn an_oauth_access_token_is_verified_here_then_checked_by_its_grant() {
        let f = fixture().await;
        let bearer = |t: &str| format!("Bearer {t}");
        let good = f.access_token(|_| {}).await;
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(&good))).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header(HEADERS_TO_REMOVE), Some("authorization"));

        // Verification failures: the filter's codes, with the bearer challenge.
        let other_server = f
            .access_token(|c| c.aud = "http://gw.local:10000/mcp/eng/other".into())
            .await;
        let other_host = f
            .access_token(|c| c.aud = "http://evil:10000/mcp/eng/demo".into())
            .await;
        let expired = f.access_token(|c| c.exp = c.iat - 1).await;
        let foreign = f.access_token(|c| c.iss = "http://evil".into()).await;
        let mut tampered = good.clone();
        let at = good.rfind('.').unwrap() + 2;
        let flipped = if &good[at..=at] == "A" { "B" } else { "A" };
        tampered.replace_range(at..=at, flipped);
        for (token, code) in [
            (&other_server, "token_wrong_gateway"),
            (&other_host, "token_wrong_gateway"),
            (&expired, "token_expired"),
            (&foreign, "token_unknown"),
            (&tampered, "token_unknown"),
        ] {
            let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(token))).await;
            assert_eq!((a.status, a.code().as_str()), (401, code), "{}", a.body);
            let challenge = a.header("www-authenticate").unwrap();
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{challenge}"
            );
            assert!(
                challenge
                    .contains("gw.local:10000/.well-known/oauth-protected-resource/mcp/eng/demo")
            );
        }
        // The token's audience is the MCP URL the client used: the same token is good
        // for no other gateway or server.
        let a = ask(&f.app, "/mcp/eng/other", Some(&bearer(&good))).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_wrong_gateway"));

        // Signed and for this URL, but its connection is not its grant's.
        let wrong_connection = f.access_token(|c| c.cid = 2).await;
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(&wrong_connection))).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_unknown"));

        // The layers, read uncached as for API tokens.
        sqlx::query("UPDATE hosts SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(&good))).await;
        assert_eq!((a.status, a.code().as_str()), (403, "host_disabled"));
        sqlx::query("UPDATE hosts SET enabled = 1")
            .execute(&f.db)
            .await
            .unwrap();
        sqlx::query("UPDATE oauth_grants SET revoked_at = 1 WHERE id = $1")
            .bind(GRANT)
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(&good))).await;
        assert_eq!((a.status, a.code().as_str()), (401, "token_revoked"));
    }

    #[tokio::test]
    async fn a_token_signed_by_a_key_rotated_in_later_is_verified() {
        let f = fixture().await;
        let first = f.access_token(|_| {}).await;
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            ask(&f.app, "/mcp/eng/demo", Some(&bearer(&first)))
                .await
                .status,
            200
        );
        // Two rotations: the active key is one this service has never read.
        for _ in 0..2 {
            store::oauth::rotate_keys(&f.db, crate::keys::generate(&f.secrets).unwrap())
                .await
                .unwrap();
        }
        f.verifier.backdate(std::time::Duration::from_secs(1));
        let rotated = f.access_token(|_| {}).await;
        let a = ask(&f.app, "/mcp/eng/demo", Some(&bearer(&rotated))).await;
        assert_eq!(a.status, 200, "{}", a.body);
        // Tokens of the retired key stay good until they expire.
        assert_eq!(
            ask(&f.app, "/mcp/eng/demo", Some(&bearer(&first)))
                .await
                .status,
            200
        );
    }

    #[tokio::test]
    async fn the_resource_metadata_names_the_clients_url_and_this_issuer() {
        let f = fixture().await;
        let get = |path: &str, proto: Option<&'static str>| {
            let mut req = Request::get(path).header("host", "gw.local:10000");
            if let Some(p) = proto {
                req = req.header("x-forwarded-proto", p);
            }
            f.app.clone().oneshot(req.body(Body::empty()).unwrap())
        };
        let resp = get(
            "/.well-known/oauth-protected-resource/mcp/eng/demo",
            Some("https"),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["resource"], "https://gw.local:10000/mcp/eng/demo");
        assert_eq!(
            doc["authorization_servers"],
            serde_json::json!([crate::routes::oauth::OauthConfig::for_tests().issuer])
        );
        for path in [
            "/.well-known/oauth-protected-resource/mcp/eng",
            "/.well-known/oauth-protected-resource/mcp/eng/demo/x",
            "/.well-known/oauth-protected-resource/other",
        ] {
            let resp = get(path, None).await.unwrap();
            assert_eq!(resp.status(), 404, "{path}");
        }
    }

    #[tokio::test]
    async fn every_decision_is_audited_with_the_layer_that_refused() {
        let f = fixture().await;
        let bearer = format!("Bearer {}", f.token);
        let mcp = [(MCP_METHOD_HEADER, "tools/call"), (MCP_TOOL_HEADER, "echo")];
        let a = ask_with(&f.app, "/mcp/eng/demo", Some(&bearer), &mcp).await;
        assert_eq!(a.status, 200);
        let a = ask(&f.app, "/mcp/eng/other", Some(&bearer)).await;
        assert_eq!(a.status, 403);
        assert_eq!(ask(&f.app, "/mcp/eng/demo", None).await.status, 401);
        // The writer flushes in batches; poll (bounded) rather than sleep.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        type AuditRow = (
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<AuditRow> = loop {
            let rows = sqlx::query_as(
                "SELECT action, code, connection_id, server, tool FROM audit_events
                 WHERE kind = 'decision' ORDER BY id",
            )
            .fetch_all(&f.db)
            .await
            .unwrap();
            if rows.len() >= 3 || Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(
            rows,
            vec![
                (
                    "allow".into(),
                    None,
                    Some(1),
                    Some("demo".into()),
                    Some("echo".into())
                ),
                (
                    "deny".into(),
                    Some("server_not_exposed".into()),
                    Some(1),
                    Some("other".into()),
                    None
                ),
                (
                    "deny".into(),
                    Some("token_missing".into()),
                    None,
                    Some("demo".into()),
                    None
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_store_failure_is_a_5xx_so_envoy_fails_closed() {
        // Through the pool: the pool is closed.
        let f = fixture_reading(|db, _| Reads::Pool(db.clone())).await;
        f.db.close().await;
        assert_503_without_allow_headers(&f).await;
        // On SQLite: the file is no longer a database.
        let f = fixture().await;
        f.db.close().await;
        let path = f.dir.path().join("t.db");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        assert_503_without_allow_headers(&f).await;
    }

    async fn assert_503_without_allow_headers(f: &Fixture) {
        let a = ask(
            &f.app,
            "/mcp/eng/demo",
            Some(&format!("Bearer {}", f.token)),
        )
        .await;
        assert_eq!((a.status, a.code().as_str()), (503, "policy_unavailable"));
        assert_eq!(a.header(HEADERS_TO_REMOVE), None);
    }

    #[tokio::test]
    async fn a_store_slower_than_the_deadline_is_a_quick_503() {
        // Through the pool (PostgreSQL's way): every pooled connection busy, the read
        // would wait out the pool's 1 s acquire timeout.
        let f = fixture_reading(|db, _| Reads::Pool(db.clone())).await;
        let _held = (f.db.acquire().await.unwrap(), f.db.acquire().await.unwrap());
        assert_quick_503(&f).await;
        // On SQLite: another connection holds the file locked.
        let f = fixture().await;
        let path = f.dir.path().join("t.db");
        f.db.close().await;
        let holder = rusqlite::Connection::open(path).unwrap();
        holder
            .execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE; BEGIN; UPDATE hosts SET enabled = 1; COMMIT;",
            )
            .unwrap();
        assert_quick_503(&f).await;
    }

    /// The check's deadline (200 ms by default) answers well before anything else would.
    async fn assert_quick_503(f: &Fixture) {
        let started = std::time::Instant::now();
        let a = ask(
            &f.app,
            "/mcp/eng/demo",
            Some(&format!("Bearer {}", f.token)),
        )
        .await;
        let took = started.elapsed();
        assert_eq!((a.status, a.code().as_str()), (503, "policy_unavailable"));
        assert!(
            took < std::time::Duration::from_millis(800),
            "took {took:?}"
        );
    }

    #[test]
    fn an_injected_authorization_replaces_the_clients_instead_of_being_removed() {
        let r = allow(Some(("authorization".into(), "Bearer down".into())));
        assert_eq!(r.headers().get("authorization").unwrap(), "Bearer down");
        assert!(r.headers().get(HEADERS_TO_REMOVE).is_none());

        let r = allow(Some(("x-api-key".into(), "k".into())));
        assert_eq!(r.headers().get("x-api-key").unwrap(), "k");
        assert_eq!(r.headers().get(HEADERS_TO_REMOVE).unwrap(), "authorization");
    }

    #[test]
    fn the_client_base_url_comes_from_its_host_and_forwarded_scheme() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/mcp/g/s".parse().unwrap();
        assert_eq!(client_base_url(&uri, &headers), "http://localhost");
        headers.insert("host", HeaderValue::from_static("mcp.example.com"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert_eq!(client_base_url(&uri, &headers), "https://mcp.example.com");
        // HTTP/2: the URI's authority.
        let uri: Uri = "http://gw.local:10000/mcp/g/s".parse().unwrap();
        headers.insert("x-forwarded-proto", HeaderValue::from_static("ftp"));
        assert_eq!(client_base_url(&uri, &headers), "http://gw.local:10000");
    }
}
