//! Property tests of the HTTP surface on an attacker's path: the check port's
//! `/v1/check` and `/v1/ext_authz/…`, and the public port's OAuth and enrollment forms,
//! driven through the routers as `run()` serves them (body limits included) with
//! arbitrary bodies and headers. Whatever arrives, the answer is a refusal (4xx, in
//! the endpoint's error format) or a well-formed answer; never a panic or a 500.

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use mcpguard_core::check::CheckResponse;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::ServiceExt;

use crate::{routes, serve, store};

struct Fixture {
    rt: tokio::runtime::Runtime,
    check: Router,
    public: Router,
    token: String,
    _dir: tempfile::TempDir,
}

/// A store with one exposed server, a host with a live token and an OAuth grant; the
/// two routers as `run()` builds them.
fn fixture() -> Fixture {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (check, public, token, dir) = rt.block_on(async {
        let crate::fixture::Seeded { state, token, dir } = crate::fixture::seeded(|db, url| {
            store::check::Reads::for_store(db, url, std::time::Duration::from_secs(1))
        })
        .await;
        let check = serve::limit_bodies(
            routes::check(state.clone())
                .layer(axum::Extension(crate::config::CheckDeadline::default())),
            16_384,
        );
        let public = serve::limit_bodies(routes::public(state), 262_144);
        (check, public, token, dir)
    });
    Fixture {
        rt,
        check,
        public,
        token,
        _dir: dir,
    }
}

fn config(cases: u32) -> Config {
    // PROPTEST_CASES, when set, wins over each test's own count.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

async fn ask(app: &Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        content_type,
        body,
    }
}

/// A request with arbitrary header bytes: those that cannot be a header are dropped
/// (as hyper would refuse them before any router saw them).
fn request(
    method: &str,
    path: &str,
    headers: &[(String, Vec<u8>)],
    body: Vec<u8>,
) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_bytes(value),
        ) {
            req = req.header(n, v);
        }
    }
    req.body(Body::from(body)).unwrap()
}

/// A refusal in our error format: `{"error":{"code","message"}}`.
fn our_error(a: &Answer) -> Result<(), TestCaseError> {
    let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| {
        TestCaseError::fail(format!(
            "{} is not JSON ({e}): {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ))
    })?;
    prop_assert!(
        v["error"]["code"].is_string() && v["error"]["message"].is_string(),
        "{v}"
    );
    Ok(())
}

fn header_list() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "authorization",
            "content-type",
            "host",
            "x-request-id",
            "x-forwarded-host",
            "x-forwarded-proto",
            "cookie",
            "x-envoy-original-path",
        ])
        .prop_map(str::to_owned),
        "[a-z-]{1,12}",
    ];
    let value = prop_oneof![
        any::<Vec<u8>>(),
        "(Bearer |bearer )?[ -~]{0,80}".prop_map(String::into_bytes),
        Just(b"application/json".to_vec()),
        Just(b"application/x-www-form-urlencoded".to_vec()),
    ];
    prop::collection::vec((name, value), 0..6)
}

fn check_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        "\\PC{0,64}".prop_map(String::into_bytes),
        (
            "[0-9a-f]{0,66}",
            "[a-z]{0,5}",
            "[a-z]{0,5}",
            prop::option::of("\\PC{0,300}")
        )
            .prop_map(|(hash, g, s, rid)| {
                let mut v = serde_json::json!({"credential": {"kind": "api_token", "hash": hash},
                    "gateway": g, "server": s});
                if let Some(rid) = rid {
                    v["request_id"] = rid.into();
                }
                v.to_string().into_bytes()
            }),
        (any::<i64>(), any::<i64>(), "\\PC{0,20}").prop_map(|(g, c, j)| {
            serde_json::json!({"credential": {"kind": "oauth", "grant": g, "connection": c, "jti": j},
                "gateway": "eng", "server": "demo"})
            .to_string()
            .into_bytes()
        }),
        Just(vec![b'x'; 20_000]),
    ]
}

#[test]
fn the_check_endpoint_answers_any_body_and_headers_with_a_decision_or_a_4xx() {
    let f = fixture();
    let strategy = (header_list(), check_body(), any::<bool>());
    let mut runner = TestRunner::new(config(256));
    let result = runner.run(&strategy, |(headers, body, json)| {
        f.rt.block_on(async {
            let mut headers = headers;
            if json {
                headers.push(("content-type".into(), b"application/json".to_vec()));
            }
            let a = ask(&f.check, request("POST", "/v1/check", &headers, body)).await;
            prop_assert!(
                a.status < 500,
                "{} {:?}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            if a.status == 200 {
                let answer = serde_json::from_slice::<CheckResponse>(&a.body);
                prop_assert!(answer.is_ok(), "{:?}", String::from_utf8_lossy(&a.body));
            } else {
                our_error(&a)?;
            }
            Ok(())
        })
    });
    result.unwrap();
}

#[test]
fn ext_authz_answers_any_path_and_headers_with_a_decision_or_a_refusal() {
    let f = fixture();
    let bearer = format!("Bearer {}", f.token);
    let path = prop_oneof![
        // The exposed server, so that allows are among the answers.
        "/mcp/eng/demo(/[a-z.%0-9;]{0,6}){0,3}(\\?[a-z=&%]{0,8})?",
        "/mcp/[a-z]{1,5}/[a-z]{1,5}(/[a-z.%0-9;]{0,6}){0,3}(\\?[a-z=&%]{0,8})?",
        "/[ -~]{0,30}",
    ];
    let strategy = (
        path,
        header_list(),
        any::<bool>(),
        prop::sample::select(vec!["GET", "POST", "DELETE"]),
    );
    let mut runner = TestRunner::new(config(256));
    let result = runner.run(&strategy, |(path, headers, with_token, method)| {
        f.rt.block_on(async {
            let mut headers = headers;
            if with_token {
                headers.push(("authorization".into(), bearer.clone().into_bytes()));
            }
            // Characters a URI cannot hold: not a request hyper would hand over.
            let uri = format!("/v1/ext_authz{path}");
            prop_assume!(uri.parse::<axum::http::Uri>().is_ok());
            let a = ask(&f.check, request(method, &uri, &headers, Vec::new())).await;
            prop_assert!(
                a.status < 500,
                "{} {:?}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            if a.status != 200 {
                our_error(&a)?;
            }
            Ok(())
        })
    });
    result.unwrap();
}

#[test]
fn the_oauth_and_enrollment_forms_answer_any_bytes_without_a_500() {
    let f = fixture();
    let form_field = prop_oneof![
        prop::sample::select(vec![
            "grant_type",
            "code",
            "redirect_uri",
            "client_id",
            "code_verifier",
            "refresh_token",
            "resource",
            "token",
            "username",
            "password",
            "session",
            "csrf",
            "approve",
            "state",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,8}",
    ];
    let form = prop_oneof![
        any::<Vec<u8>>(),
        prop::collection::vec((form_field, "[ -~]{0,40}|\\PC{0,10}"), 0..8).prop_map(|pairs| {
            pairs
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                    )
                })
                .collect::<Vec<_>>()
                .join("&")
                .into_bytes()
        }),
        "[a-z=&%0-9+]{0,80}".prop_map(String::into_bytes),
    ];
    let endpoint = prop::sample::select(vec![
        "/oauth/token",
        "/oauth/revoke",
        "/oauth/login",
        "/oauth/consent",
        "/oauth/register",
        "/enroll/abc",
    ]);
    let content_type = prop::sample::select(vec![
        "application/x-www-form-urlencoded",
        "application/json",
        "text/plain",
    ]);
    let strategy = (endpoint, content_type, form, header_list());
    // A sign-in hashes a password (tens of milliseconds): fewer cases.
    let mut runner = TestRunner::new(config(128));
    let result = runner.run(&strategy, |(endpoint, content_type, body, headers)| {
        f.rt.block_on(async {
            let mut headers = headers;
            headers.retain(|(k, _)| k != "content-type");
            headers.push(("content-type".into(), content_type.as_bytes().to_vec()));
            let a = ask(&f.public, request("POST", endpoint, &headers, body)).await;
            prop_assert!(
                a.status < 500,
                "{endpoint}: {} {:?}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            prop_assert!(
                !a.content_type.is_empty() || a.body.is_empty() || a.status == 303,
                "{endpoint}: {}",
                a.status
            );
            Ok(())
        })
    });
    result.unwrap();
}
