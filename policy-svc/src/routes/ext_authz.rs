//! Envoy's native `ext_authz` filter (HTTP service) as an alternative to the wasm filter.
//!
//! Envoy sends the client's method, `Authorization`, `Host` and path — prefixed with the
//! filter's `path_prefix`, which must be [`PATH_PREFIX`] — with no body. The decision is
//! the check endpoint's own, the same pipeline ([`crate::check`]): the filter's token
//! policy (`mcpguard_core::token::data_plane_kind`), the same single store read and
//! the same pure decision. OAuth access tokens are verified here as the wasm filter
//! verifies them ([`mcpguard_core::jwt`]), with the published keys held by
//! [`Verifier`](crate::keys::Verifier), and the
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
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use mcpguard_core::check::{Body, CheckResponse, DenyCode, bounded_name, bounded_request_id};
use mcpguard_core::oauth::{RESOURCE_METADATA_PREFIX, protected_resource_metadata, resource_url};
use mcpguard_core::route::{McpPath, PathError};

use crate::AppState;
use crate::check::{self, Context, Input, Outcome, Wire};
use crate::config::CheckDeadline;

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
/// The MCP filter's `is_exceeding_limit` (`true` when the body went past its parse
/// limit), added by Envoy likewise.
const MCP_EXCEEDING_HEADER: &str = "x-mcpguard-mcp-exceeding";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{PATH_PREFIX}/{{*path}}"), any(run))
        .route(
            &format!("{RESOURCE_METADATA_PREFIX}/{{*path}}"),
            get(resource_metadata),
        )
}

async fn run(
    State(state): State<AppState>,
    deadline: Option<Extension<CheckDeadline>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let full = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let original = full.strip_prefix(PATH_PREFIX).unwrap_or(full);
    let context = Context {
        started,
        request_id: header("x-request-id").map(bounded_request_id),
        mcp_method: header(MCP_METHOD_HEADER)
            .filter(|v| !v.is_empty())
            .map(bounded_name),
        tool: header(MCP_TOOL_HEADER)
            .filter(|v| !v.is_empty())
            .map(bounded_name),
    };

    let path = match McpPath::parse(original) {
        Ok(p) => p,
        // Nothing but MCP endpoints is ours to pass: a route that sends other paths
        // through this filter gets a refusal, never an allow.
        Err(PathError::NotMcp | PathError::Malformed) => {
            check::refuse_unrouted(&state, Wire::ExtAuthz, context, DenyCode::UnknownRoute);
            return refuse(DenyCode::UnknownRoute, None);
        }
    };
    // Envoy sends the client's method (with no body): a POST whose body its MCP
    // filter could not read as one message is refused, as the wasm filter does.
    let body = Body::of(
        method == Method::POST,
        context.mcp_method.is_some(),
        header(MCP_EXCEEDING_HEADER) == Some("true"),
    );
    if let Some(code) = body.refusal() {
        check::refuse_unrouted(&state, Wire::ExtAuthz, context, code);
        return refuse(code, None);
    }
    // Built only when needed (a refusal's challenge, an access token's audience), not
    // for every API token.
    let base = || client_base_url(&uri, &headers);
    let metadata = || mcpguard_core::check::resource_metadata_url(&base(), original);
    let audience = || resource_url(&base(), path.gateway, path.server);
    let credential = match header("authorization") {
        None => check::WireCredential::Missing,
        Some(authorization) => match mcpguard_core::bearer_token(authorization) {
            Some(token) => check::WireCredential::Bearer {
                token,
                audience: &audience,
            },
            None => check::WireCredential::NotBearer,
        },
    };
    let input = Input {
        wire: Wire::ExtAuthz,
        gateway: Some(path.gateway),
        server: path.server,
        credential,
        context,
        // Envoy's config passes `params.name` only: a `resources/read` names no item
        // here, and is refused on an exposure that restricts resources.
        item: header(MCP_TOOL_HEADER).filter(|v| !v.is_empty()),
        each_server: None,
    };
    // The same deadline as /v1/check: a slow store is a quick refusal, not a wait.
    let deadline = deadline.map(|Extension(d)| d).unwrap_or_default().0;
    match check::run(&state, input, deadline).await {
        // A refusal of the credential points the client at the OAuth metadata.
        Outcome::Refused(code) => refuse(code, Some(&metadata())),
        Outcome::Decided(CheckResponse::Allow { inject, .. }) => {
            allow(inject.map(|h| (h.name, h.value)))
        }
        Outcome::Decided(CheckResponse::Deny { code }) => refuse(code, None),
        // Never asked for here (the path always names a server), and the gateway URL
        // needs the aggregator, which only the wasm filter routes to.
        Outcome::Decided(CheckResponse::Gateway { .. }) => refuse(DenyCode::UnknownRoute, None),
        // Not a decision, and not audited: Envoy answers `status_on_error` (503).
        Outcome::Unavailable => refuse(DenyCode::PolicyUnavailable, None),
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
    use mcpguard_core::token::{TokenKind, format_token};
    use tower::ServiceExt;

    use crate::fixture::{Fixture, GRANT, fixture, fixture_reading};
    use crate::store;
    use crate::store::check::Reads;

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

    /// What Envoy's ext_authz filter sends for a client's `POST {path}` of a JSON-RPC
    /// message its MCP filter read (`ping`, unless `extra` names the method).
    async fn ask(app: &Router, path: &str, authorization: Option<&str>) -> Answer {
        ask_with(app, path, authorization, &[]).await
    }

    async fn ask_with(
        app: &Router,
        path: &str,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut headers = extra.to_vec();
        if !extra.iter().any(|(k, _)| *k == MCP_METHOD_HEADER) {
            headers.push((MCP_METHOD_HEADER, "ping"));
        }
        send(app, Method::POST, path, authorization, &headers).await
    }

    async fn send(
        app: &Router,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{PATH_PREFIX}{path}"))
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
    async fn a_post_whose_body_the_mcp_filter_did_not_read_is_refused_before_the_token() {
        let f = fixture().await;
        let bearer = format!("Bearer {}", f.token);
        let path = "/mcp/eng/demo";
        let a = send(&f.app, Method::POST, path, Some(&bearer), &[]).await;
        assert_eq!((a.status, a.code()), (400, "request_unreadable".into()));
        let a = send(&f.app, Method::POST, path, None, &[]).await;
        assert_eq!(a.code(), "request_unreadable", "before the token");
        let past_limit = [
            (MCP_METHOD_HEADER, "tools/call"),
            (MCP_EXCEEDING_HEADER, "true"),
        ];
        let a = send(&f.app, Method::POST, path, Some(&bearer), &past_limit).await;
        assert_eq!((a.status, a.code()), (413, "request_too_large".into()));
        // A GET (the stream) has no body to read: checked as ever.
        let a = send(&f.app, Method::GET, path, Some(&bearer), &[]).await;
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
        type AuditRow = (
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<AuditRow> =
            crate::fixture::decisions(&f.db, "action, code, connection_id, server, tool", 3).await;
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
