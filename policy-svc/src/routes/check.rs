//! `/v1/check`, the wasm filter's callout: the check pipeline ([`crate::check`]) over
//! JSON. One read of the store, no cache; the allow names the upstream and the address
//! it was judged at, since the filter routes there.

use std::time::Instant;

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use mcpguard_core::check::{
    CHECK_PATH, CheckRequest, CheckResponse, Credential, EachServer, MAX_EACH_SERVER, bounded_name,
    bounded_request_id,
};
use mcpguard_core::token::TokenHash;

use crate::AppState;
use crate::check::{self, Context, Input, Outcome, Wire};
use crate::config::CheckDeadline;
use crate::error::ApiError;
use crate::extract::Json;

pub fn routes() -> Router<AppState> {
    Router::new().route(CHECK_PATH, post(run))
}

async fn run(
    State(state): State<AppState>,
    deadline: Option<Extension<CheckDeadline>>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<CheckResponse>, ApiError> {
    let deadline = deadline.map(|Extension(d)| d).unwrap_or_default();
    answer(&state, deadline, &req).await.map(Json)
}

/// One check through the pipeline: what `/v1/check` answers, and each message of the
/// check stream (`check_stream`).
pub(super) async fn answer(
    state: &AppState,
    deadline: CheckDeadline,
    req: &CheckRequest,
) -> Result<CheckResponse, ApiError> {
    let started = Instant::now();
    // No answer from the database in time, or an error: 503, which the filter turns
    // into a refusal (`policy_unavailable`). Fail closed, and fast.
    let deadline = deadline.0;
    let credential = match &req.credential {
        // A hash that is not one is no check at all: 400, not a decision.
        Credential::ApiToken { hash } => {
            check::WireCredential::ApiTokenHash(TokenHash::from_hex(hash).ok_or_else(|| {
                ApiError::bad_request("invalid_hash", "credential.hash must be 64 hex digits")
            })?)
        }
        Credential::Oauth { token, resource } => {
            check::WireCredential::AccessToken { token, resource }
        }
    };
    match &req.each_server {
        Some(_) if !req.server.is_empty() => {
            return Err(ApiError::bad_request(
                "invalid_each_server",
                "each_server is for a gateway-level check (an empty server)",
            ));
        }
        Some(EachServer::Only(only)) if only.len() > MAX_EACH_SERVER => {
            return Err(ApiError::bad_request(
                "invalid_each_server",
                format!("each_server names at most {MAX_EACH_SERVER} servers"),
            ));
        }
        _ => {}
    }
    let input = Input {
        wire: Wire::Check,
        gateway: req.gateway.as_deref(),
        server: &req.server,
        credential,
        context: Context {
            started,
            mcp_method: req.mcp_method.as_deref().map(bounded_name),
            // A resource is named by its URI: the audit entry names it too.
            tool: req
                .tool
                .as_deref()
                .or(req.item.as_deref())
                .map(bounded_name),
            request_id: req.request_id.as_deref().map(bounded_request_id),
        },
        item: req.item.as_deref(),
        each_server: req.each_server.as_ref(),
    };
    match check::run(state, input, deadline).await {
        Outcome::Refused(code) => Ok(CheckResponse::Deny { code }),
        Outcome::Decided(decision) => Ok(decision),
        Outcome::Unavailable => Err(ApiError::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use mcpguard_core::check::{DenyCode, Scheme};
    use mcpguard_core::token::{TokenKind, format_token};
    use tower::ServiceExt;

    use super::*;
    use crate::fixture::{Fixture, GRANT, fixture, fixture_reading};
    use crate::store::check::Reads;

    /// The fixture's `/mcp/eng/demo` under `--resource-base-urls` (as `for_tests` sets it).
    const RESOURCE: &str = "http://127.0.0.1:10000/mcp/eng/demo";

    struct Answer {
        status: u16,
        body: serde_json::Value,
    }

    impl Answer {
        fn decision(&self) -> CheckResponse {
            serde_json::from_value(self.body.clone()).unwrap()
        }

        /// The refusal's code; `None` for an allow.
        fn code(&self) -> Option<DenyCode> {
            assert_eq!(self.status, 200, "{}", self.body);
            match self.decision() {
                CheckResponse::Deny { code } => Some(code),
                CheckResponse::Allow { .. } | CheckResponse::Gateway { .. } => None,
            }
        }
    }

    fn request(credential: Credential, gateway: &str, server: &str) -> CheckRequest {
        CheckRequest {
            credential,
            gateway: Some(gateway.into()),
            server: server.into(),
            mcp_method: None,
            tool: None,
            request_id: None,
            item: None,
            each_server: None,
        }
    }

    fn api_token(token: &str) -> Credential {
        Credential::ApiToken {
            hash: TokenHash::of(token).to_hex(),
        }
    }

    fn access_token(token: &str, resource: &str) -> Credential {
        Credential::Oauth {
            token: token.into(),
            resource: resource.into(),
        }
    }

    /// What the wasm filter sends for a request it passed on.
    async fn ask(app: &Router, req: &CheckRequest) -> Answer {
        let req = Request::post(CHECK_PATH)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(req).unwrap()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            body: serde_json::from_slice(&body).unwrap(),
        }
    }

    /// An access token for [`RESOURCE`], edited.
    async fn access_token_for_resource(
        f: &Fixture,
        edit: impl FnOnce(&mut mcpguard_core::oauth::AccessClaims),
    ) -> String {
        f.access_token(|c| {
            c.aud = RESOURCE.into();
            edit(c);
        })
        .await
    }

    #[tokio::test]
    async fn a_live_token_is_allowed_to_its_upstream_at_the_address_judged_for_it() {
        let f = fixture().await;
        let a = ask(&f.app, &request(api_token(&f.token), "eng", "demo")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let CheckResponse::Allow {
            upstream, inject, ..
        } = a.decision()
        else {
            panic!("expected allow: {}", a.body);
        };
        assert_eq!(upstream.scheme, Scheme::Http);
        assert_eq!(upstream.authority, "127.0.0.1:9100");
        assert_eq!(upstream.base_path, "/mcp");
        // The filter refuses an allow without the address it is to connect to.
        assert_eq!(upstream.address.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(inject, None);
    }

    #[tokio::test]
    async fn each_refusal_names_its_layer_and_a_bad_hash_is_no_check() {
        let f = fixture().await;
        let live = |gateway: &str, server: &str| request(api_token(&f.token), gateway, server);

        let bad = request(Credential::ApiToken { hash: "zz".into() }, "eng", "demo");
        let a = ask(&f.app, &bad).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "invalid_hash");

        let forged = format_token(TokenKind::HostApi, &"Z".repeat(40)).unwrap();
        let a = ask(&f.app, &request(api_token(&forged), "eng", "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenUnknown));
        let a = ask(&f.app, &live("ops", "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
        let a = ask(&f.app, &live("eng", "other")).await;
        assert_eq!(a.code(), Some(DenyCode::ServerNotExposed));

        sqlx::query("UPDATE hosts SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &live("eng", "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::HostDisabled));
        sqlx::query("UPDATE api_tokens SET revoked_at = 1 WHERE id = $1")
            .bind(f.token_id)
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &live("eng", "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenRevoked));
    }

    #[tokio::test]
    async fn an_access_token_is_verified_again_for_the_resource_the_filter_names() {
        let f = fixture().await;
        let good = access_token_for_resource(&f, |_| {}).await;
        let ask_for = |token: &str, resource: &str, server: &str| {
            request(access_token(token, resource), "eng", server)
        };
        let a = ask(&f.app, &ask_for(&good, RESOURCE, "demo")).await;
        assert_eq!(a.code(), None, "{}", a.body);
        let CheckResponse::Allow { upstream, .. } = a.decision() else {
            panic!("expected allow");
        };
        assert_eq!(upstream.address.as_deref(), Some("127.0.0.1:9100"));

        // The resource must be this request's MCP URL under one of ours.
        let a = ask(
            &f.app,
            &ask_for(&good, "http://evil:10000/mcp/eng/demo", "demo"),
        )
        .await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
        let a = ask(&f.app, &ask_for(&good, RESOURCE, "other")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
        let a = ask(&f.app, &ask_for("not-a-jwt", RESOURCE, "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenMalformed));

        // Verified here whatever the filter said: the token's own audience, expiry,
        // issuer and signature.
        let other_server = access_token_for_resource(&f, |c| {
            c.aud = "http://127.0.0.1:10000/mcp/eng/other".into()
        })
        .await;
        let expired = access_token_for_resource(&f, |c| c.exp = c.iat - 1).await;
        let foreign = access_token_for_resource(&f, |c| c.iss = "http://evil".into()).await;
        let mut tampered = good.clone();
        let at = good.rfind('.').unwrap() + 2;
        let flipped = if &good[at..=at] == "A" { "B" } else { "A" };
        tampered.replace_range(at..=at, flipped);
        let wrong_connection = access_token_for_resource(&f, |c| c.cid = 2).await;
        for (token, code) in [
            (&other_server, DenyCode::TokenWrongGateway),
            (&expired, DenyCode::TokenExpired),
            (&foreign, DenyCode::TokenUnknown),
            (&tampered, DenyCode::TokenUnknown),
            (&wrong_connection, DenyCode::TokenUnknown),
        ] {
            let a = ask(&f.app, &ask_for(token, RESOURCE, "demo")).await;
            assert_eq!(a.code(), Some(code), "{}", a.body);
        }

        // The layers, through the grant.
        sqlx::query("UPDATE oauth_grants SET revoked_at = 1 WHERE id = $1")
            .bind(GRANT)
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &ask_for(&good, RESOURCE, "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenRevoked));
    }

    #[tokio::test]
    async fn a_gateway_level_check_names_the_servers_and_decides_the_outer_layers() {
        let f = fixture().await;
        let gateway = |g: &str| request(api_token(&f.token), g, "");
        let a = ask(&f.app, &gateway("eng")).await;
        assert_eq!(
            a.decision(),
            CheckResponse::Gateway {
                servers: vec!["demo".into()],
                answers: Default::default(),
            },
            "{}",
            a.body
        );
        // A disabled server is still named: the aggregator's own check of it refuses.
        sqlx::query("UPDATE servers SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &gateway("eng")).await;
        assert!(matches!(a.decision(), CheckResponse::Gateway { .. }));
        let a = ask(&f.app, &gateway("ops")).await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
        sqlx::query("UPDATE gateways SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &gateway("eng")).await;
        assert_eq!(a.code(), Some(DenyCode::GatewayDisabled));
    }

    #[tokio::test]
    async fn a_gateway_level_check_decides_each_server_asked_for_as_its_own_check_would() {
        let f = fixture().await;
        let each = |each: EachServer, server: &str| CheckRequest {
            mcp_method: Some("tools/list".into()),
            each_server: Some(each),
            ..request(api_token(&f.token), "eng", server)
        };
        let answers = |a: &Answer| match a.decision() {
            CheckResponse::Gateway { answers, .. } => answers,
            other => panic!("{other:?}"),
        };
        let a = ask(&f.app, &each(EachServer::All, "")).await;
        let all = answers(&a);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["demo"], "{}", a.body);
        // The same answer as the server's own check, pinned address and all.
        let own = ask(&f.app, &request(api_token(&f.token), "eng", "demo")).await;
        assert_eq!(all["demo"], own.decision());
        // Each decision is its own audit entry: the gateway's, then the server's.
        let rows: Vec<(String, Option<String>, Option<String>)> =
            crate::fixture::decisions(&f.db, "action, server, mcp_method", 3).await;
        assert_eq!(
            rows[..2],
            [
                ("allow".into(), None, Some("tools/list".into())),
                (
                    "allow".into(),
                    Some("demo".into()),
                    Some("tools/list".into())
                ),
            ]
        );

        // A server of the gateway that is refused now is answered with its refusal,
        // and one it does not expose as such.
        sqlx::query("UPDATE servers SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let only = EachServer::Only(vec!["demo".into(), "nope".into()]);
        let a = ask(&f.app, &each(only, "")).await;
        let some = answers(&a);
        assert_eq!(
            some["demo"],
            CheckResponse::Deny {
                code: DenyCode::ServerDisabled
            }
        );
        assert_eq!(
            some["nope"],
            CheckResponse::Deny {
                code: DenyCode::ServerNotExposed
            }
        );
        // A refusal of the caller has no answers to give.
        sqlx::query("UPDATE gateways SET enabled = 0")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &each(EachServer::All, "")).await;
        assert_eq!(a.code(), Some(DenyCode::GatewayDisabled));

        // Asked of one server, or of too many: no decision at all.
        let a = ask(&f.app, &each(EachServer::All, "demo")).await;
        assert_eq!(a.status, 400, "{}", a.body);
        let many = EachServer::Only(vec!["a".into(); MAX_EACH_SERVER + 1]);
        let a = ask(&f.app, &each(many, "")).await;
        assert_eq!(a.status, 400, "{}", a.body);
    }

    #[tokio::test]
    async fn an_access_token_for_the_gateway_url_serves_each_server_of_that_gateway() {
        let f = fixture().await;
        let gateway_url = "http://127.0.0.1:10000/mcp/eng";
        let token = f.access_token(|c| c.aud = gateway_url.into()).await;
        let for_server = |server: &str| request(access_token(&token, gateway_url), "eng", server);
        let a = ask(&f.app, &for_server("demo")).await;
        assert_eq!(a.code(), None, "{}", a.body);
        let a = ask(&f.app, &for_server("")).await;
        assert!(
            matches!(a.decision(), CheckResponse::Gateway { .. }),
            "{}",
            a.body
        );
        // Each server still decided on its own layers.
        let a = ask(&f.app, &for_server("other")).await;
        assert_eq!(a.code(), Some(DenyCode::ServerNotExposed));
        // The token's audience is verified again: a server's token is not the gateway's.
        let server_token = access_token_for_resource(&f, |_| {}).await;
        let a = ask(
            &f.app,
            &request(access_token(&server_token, gateway_url), "eng", "demo"),
        )
        .await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
        let a = ask(
            &f.app,
            &request(
                access_token(&token, "http://127.0.0.1:10000/mcp/ops"),
                "eng",
                "demo",
            ),
        )
        .await;
        assert_eq!(a.code(), Some(DenyCode::TokenWrongGateway));
    }

    #[tokio::test]
    async fn an_upstream_in_a_denied_network_is_refused_here_and_left_to_envoy_by_ext_authz() {
        let f = fixture().await;
        sqlx::query("UPDATE servers SET upstream_authority = '169.254.169.254:80'")
            .execute(&f.db)
            .await
            .unwrap();
        let a = ask(&f.app, &request(api_token(&f.token), "eng", "demo")).await;
        assert_eq!(a.code(), Some(DenyCode::UpstreamDenied));
        // ext_authz pins nothing: Envoy's route configuration names the upstream.
        let req = Request::post(format!(
            "{}/mcp/eng/demo",
            super::super::ext_authz::PATH_PREFIX
        ))
        .header("host", "gw.local:10000")
        .header("authorization", format!("Bearer {}", f.token))
        .header("x-mcpguard-mcp-method", "ping")
        .body(Body::empty())
        .unwrap();
        let resp = f.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn every_decision_is_audited_with_the_layer_that_refused() {
        let f = fixture().await;
        let mut allowed = request(api_token(&f.token), "eng", "demo");
        allowed.mcp_method = Some("tools/call".into());
        allowed.tool = Some("echo".into());
        allowed.request_id = Some("r-1\nforged".into());
        assert_eq!(ask(&f.app, &allowed).await.code(), None);
        let a = ask(&f.app, &request(api_token(&f.token), "eng", "other")).await;
        assert_eq!(a.code(), Some(DenyCode::ServerNotExposed));
        // Refused on the credential alone: no connection to name.
        let good = access_token_for_resource(&f, |_| {}).await;
        let foreign = request(
            access_token(&good, "http://evil/mcp/eng/demo"),
            "eng",
            "demo",
        );
        assert_eq!(
            ask(&f.app, &foreign).await.code(),
            Some(DenyCode::TokenWrongGateway)
        );
        // No check at all: not audited.
        let bad = request(Credential::ApiToken { hash: "zz".into() }, "eng", "demo");
        assert_eq!(ask(&f.app, &bad).await.status, 400);

        type AuditRow = (
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<AuditRow> = crate::fixture::decisions(
            &f.db,
            "action, code, connection_id, server, tool, request_id",
            3,
        )
        .await;
        assert_eq!(
            rows,
            vec![
                (
                    "allow".into(),
                    None,
                    Some(1),
                    Some("demo".into()),
                    Some("echo".into()),
                    Some("r-1".into())
                ),
                (
                    "deny".into(),
                    Some("server_not_exposed".into()),
                    Some(1),
                    Some("other".into()),
                    None,
                    None
                ),
                (
                    "deny".into(),
                    Some("token_wrong_gateway".into()),
                    None,
                    Some("demo".into()),
                    None,
                    None
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_store_failure_is_a_503_which_the_filter_refuses_on() {
        // Through the pool: the pool is closed.
        let f = fixture_reading(|db, _| Reads::Pool(db.clone())).await;
        f.db.close().await;
        assert_503(&f).await;
        // On SQLite: the file is no longer a database.
        let f = fixture().await;
        f.db.close().await;
        std::fs::write(f.dir.path().join("t.db"), vec![b'x'; 8192]).unwrap();
        assert_503(&f).await;
    }

    #[tokio::test]
    async fn a_store_slower_than_the_deadline_is_a_quick_503() {
        // Through the pool: every pooled connection busy.
        let f = fixture_reading(|db, _| Reads::Pool(db.clone())).await;
        let _held = (f.db.acquire().await.unwrap(), f.db.acquire().await.unwrap());
        let started = Instant::now();
        assert_503(&f).await;
        assert!(started.elapsed() < std::time::Duration::from_millis(800));
        // On SQLite: another connection holds the file locked.
        let f = fixture().await;
        f.db.close().await;
        let holder = rusqlite::Connection::open(f.dir.path().join("t.db")).unwrap();
        holder
            .execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE; BEGIN; UPDATE hosts SET enabled = 1; COMMIT;",
            )
            .unwrap();
        let started = Instant::now();
        assert_503(&f).await;
        assert!(started.elapsed() < std::time::Duration::from_millis(800));
    }

    async fn assert_503(f: &Fixture) {
        let a = ask(&f.app, &request(api_token(&f.token), "eng", "demo")).await;
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "unavailable");
    }
}
