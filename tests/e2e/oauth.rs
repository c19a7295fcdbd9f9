//! Headed hosts: an MCP client that follows the MCP authorization spec connects with no
//! pre-registration. The official Rust SDK (rmcp, feature `auth`) discovers the
//! authorization server from the gateway's 401, registers itself, sends the user to
//! sign in and consent (the test plays the user: it posts the forms with their CSRF
//! tokens), exchanges the code with PKCE, calls a tool through Envoy and refreshes.
//! The negative cases use a hand-driven client, as no SDK makes those mistakes.

use mcpguard_e2e::mcp::{self, call_text, challenge_and_metadata, initialize_with};
use mcpguard_e2e::oauth::{
    Browser, PASSWORD, RawClient, form_inputs, pkce, query_param, sdk_connect,
};
use mcpguard_e2e::{Admin, Stack};
use reqwest::Method;
use serde_json::{Value, json};

/// A gateway `eng` exposing the demo server as `demo` (and again as `other`), and a
/// person who can sign in.
async fn setup(stack: &Stack) -> (Admin, i64) {
    let owner = stack.admin();
    let gateway = owner.gateway("eng").await;
    for slug in ["demo", "other"] {
        let server = owner.server(slug, &stack.demo.upstream_url()).await;
        owner.expose(gateway, server).await;
    }
    owner.person("alice", PASSWORD).await;
    (owner, gateway)
}

async fn hosts(owner: &Admin) -> Vec<Value> {
    let (status, hosts) = owner.get("/api/v1/hosts").await;
    assert_eq!(status, 200);
    hosts.as_array().unwrap().clone()
}

#[tokio::test]
async fn a_headed_app_connects_with_the_official_sdk_and_appears_as_a_host() {
    let stack = Stack::start().await;
    let (owner, gateway) = setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let issuer = stack.policy.public_url();

    // The 401 says where to go; the metadata is reachable through Envoy with no token.
    let (challenge, prm) = challenge_and_metadata(&url).await;
    assert_eq!(prm["authorization_servers"], json!([issuer]));
    let asm: Value = reqwest::get(format!("{issuer}/.well-known/oauth-authorization-server"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(asm["issuer"], issuer);
    assert_eq!(asm["code_challenge_methods_supported"], json!(["S256"]));

    // The SDK: discovery from the challenge, registration; the user signs in and
    // allows; the code is exchanged (PKCE). Then tools/call through Envoy.
    let (auth, client) = sdk_connect(&url, &challenge, &issuer, "Claude Desktop").await;
    assert_eq!(
        call_text(&client, "echo", json!({"text": "hi"}))
            .await
            .unwrap(),
        "hi"
    );
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none",
        "the access token never reaches the upstream"
    );

    // The host appeared, named after the client, with its connection on the gateway.
    let host = hosts(&owner)
        .await
        .into_iter()
        .find(|h| h["name"] == "Claude Desktop")
        .expect("a host named after the client");
    assert_eq!(
        (host["kind"].as_str(), host["enabled"].as_bool()),
        (Some("oauth"), Some(true))
    );
    let (_, connections) = owner
        .get(&format!("/api/v1/gateways/{gateway}/connections"))
        .await;
    assert!(
        connections
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["host_id"] == host["id"]
                && c["user_name"] == "alice"
                && c["host_kind"] == "oauth"),
        "{connections}"
    );

    // Refresh (rotation) through the SDK; the new access token works.
    let before = auth.get_access_token().await.unwrap();
    let refreshed = auth
        .auth_manager
        .lock()
        .await
        .refresh_token()
        .await
        .unwrap();
    let refreshed = serde_json::to_value(&refreshed).unwrap();
    let after = s(&refreshed, "access_token").to_owned();
    assert_ne!(before, after);
    assert_eq!(initialize_with(&url, Some(&after)).await.status, 200);

    // Break-glass applies to headed hosts: disabling the host refuses the next request.
    let host_id = host["id"].as_i64().unwrap();
    owner.set_enabled("hosts", host_id, false).await;
    let refused = initialize_with(&url, Some(&after)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "host_disabled")
    );
    let err = call_text(&client, "echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert_eq!(mcp::status_of_service_error(&err), Some(403), "{err:?}");
    owner.set_enabled("hosts", host_id, true).await;
    assert_eq!(
        call_text(&client, "echo", json!({"text": "back"}))
            .await
            .unwrap(),
        "back"
    );

    // Nothing secret in the logs or the database: not the tokens, not the password.
    let stored = String::from_utf8_lossy(&stack.policy.stored_bytes()).to_string();
    let refresh = s(&refreshed, "refresh_token").to_owned();
    assert!(refresh.starts_with("mcpgr_"), "{refreshed}");
    for secret in [after.as_str(), refresh.as_str(), PASSWORD] {
        assert!(
            !stack.policy.proc.log_text().contains(secret),
            "policy log holds a secret"
        );
        assert!(
            !stack.envoy.proc.log_text().contains(secret),
            "envoy log holds a secret"
        );
        assert!(
            !stored.contains(secret),
            "the database holds a secret in clear"
        );
    }
}

/// (resource, client, first token response) after one good sign-in.
async fn signed_in(stack: &Stack, name: &str) -> (String, RawClient, Value) {
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), name).await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    (url, client, tokens)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

#[tokio::test]
async fn codes_are_single_use_and_bound_to_their_pkce_verifier() {
    let stack = Stack::start().await;
    setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Raw client").await;
    let (verifier, challenge) = pkce("good");
    let auth_url = client.authorization_url(&url, &challenge, "s1");
    let back = Browser::default()
        .authorize(&client.issuer, &auth_url, "alice", PASSWORD, &[])
        .await;
    assert_eq!(query_param(&back, "state").as_deref(), Some("s1"));
    let code = query_param(&back, "code").unwrap();

    // A wrong verifier is refused and changes nothing: the right one still works.
    let (wrong, _) = pkce("attacker");
    let (status, body) = client.exchange(&code, &wrong).await;
    assert_eq!(
        (status, s(&body, "error")),
        (400, "invalid_grant"),
        "{body}"
    );
    let (status, tokens) = client.exchange(&code, &verifier).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(s(&tokens, "token_type"), "Bearer");
    let access = s(&tokens, "access_token").to_owned();
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);

    // The same code again: refused, and what it produced is revoked.
    let (status, body) = client.exchange(&code, &verifier).await;
    assert_eq!(
        (status, s(&body, "error")),
        (400, "invalid_grant"),
        "{body}"
    );
    let refused = initialize_with(&url, Some(&access)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "token_revoked")
    );
    let (status, body) = client.refresh(s(&tokens, "refresh_token")).await;
    assert_eq!((status, s(&body, "error")), (400, "invalid_grant"));
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_whole_family() {
    let stack = Stack::start().await;
    setup(&stack).await;
    let (url, client, first) = signed_in(&stack, "Rotating client").await;
    let (status, second) = client.refresh(s(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(s(&second, "refresh_token"), s(&first, "refresh_token"));
    assert_eq!(
        initialize_with(&url, Some(s(&second, "access_token")))
            .await
            .status,
        200
    );

    // The rotated-out token again: someone holds a copy. The family is revoked.
    let (status, body) = client.refresh(s(&first, "refresh_token")).await;
    assert_eq!(
        (status, s(&body, "error")),
        (400, "invalid_grant"),
        "{body}"
    );
    let (status, body) = client.refresh(s(&second, "refresh_token")).await;
    assert_eq!(
        (status, s(&body, "error")),
        (400, "invalid_grant"),
        "{body}"
    );
    for access in [s(&first, "access_token"), s(&second, "access_token")] {
        let refused = initialize_with(&url, Some(access)).await;
        assert_eq!(
            (refused.status, refused.code().as_str()),
            (401, "token_revoked")
        );
    }

    // Revocation (RFC 7009) of a fresh family, by its client.
    let (_, other_client, third) = signed_in(&stack, "Revoking client").await;
    assert_eq!(
        initialize_with(&url, Some(s(&third, "access_token")))
            .await
            .status,
        200
    );
    assert_eq!(
        client.revoke(s(&third, "refresh_token")).await,
        200,
        "another client's: no effect"
    );
    assert_eq!(
        initialize_with(&url, Some(s(&third, "access_token")))
            .await
            .status,
        200
    );
    assert_eq!(other_client.revoke(s(&third, "refresh_token")).await, 200);
    let refused = initialize_with(&url, Some(s(&third, "access_token"))).await;
    assert_eq!(refused.code(), "token_revoked");
    assert_eq!(
        other_client.revoke("mcpgr_garbage").await,
        200,
        "unknown tokens: 200 too"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_by_the_filter_without_a_callout() {
    let stack = Stack::start().await;
    setup(&stack).await;
    let (url, _, tokens) = signed_in(&stack, "Audience client").await;
    let access = s(&tokens, "access_token").to_owned();
    let checks_before = stack.envoy.stat("wasmcustom.mcpguard.allowed").await;

    // For another resource (the same server exposed as `other`).
    let other = stack.envoy.mcp_url("eng", "other");
    let refused = initialize_with(&other, Some(&access)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "token_wrong_gateway")
    );
    assert!(
        refused
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    // Signed by a key the gateway does not know, with the real kid or another one.
    let header = jsonwebtoken::decode_header(&access).unwrap();
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&access)
        .unwrap()
        .claims;
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend([7u8; 32]);
    let rogue = jsonwebtoken::EncodingKey::from_ed_der(&der);
    for kid in [header.kid.clone().unwrap(), "unknown-kid".to_owned()] {
        let mut h = header.clone();
        h.kid = Some(kid);
        let forged = jsonwebtoken::encode(&h, &claims, &rogue).unwrap();
        let refused = initialize_with(&url, Some(&forged)).await;
        assert_eq!(
            (refused.status, refused.code().as_str()),
            (401, "token_unknown")
        );
    }
    // Garbage shaped like a JWT.
    let refused = initialize_with(&url, Some("abc.def.ghi")).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "token_malformed")
    );

    // None was allowed, and none reached the policy service: the audit writer keeps
    // order, so once the decision of a later good request is visible, a decision for
    // any of the bad ones would be too.
    assert_eq!(
        stack.envoy.stat("wasmcustom.mcpguard.allowed").await,
        checks_before
    );
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);
    let start = std::time::Instant::now();
    let decisions = loop {
        let (_, audit) = stack.admin().get("/api/v1/audit?kind=decision").await;
        let entries = audit["entries"].as_array().unwrap().clone();
        if !entries.is_empty() {
            break entries;
        }
        assert!(
            start.elapsed().as_secs() < 10,
            "the allow was never audited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let actions: Vec<&str> = decisions.iter().map(|e| s(e, "action")).collect();
    assert_eq!(actions, ["allow"], "{decisions:?}");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let stack = Stack::start_with(false, &[("MCPGUARD_ACCESS_TOKEN_TTL_SECS", "1")], None).await;
    setup(&stack).await;
    let (url, _, tokens) = signed_in(&stack, "Short-lived client").await;
    assert_eq!(tokens["expires_in"], 1);
    // Polls until the one-second token has expired: each answer is a real request.
    let start = std::time::Instant::now();
    loop {
        let answer = initialize_with(&url, Some(s(&tokens, "access_token"))).await;
        if answer.status == 401 {
            assert_eq!(answer.code(), "token_expired");
            break;
        }
        assert_eq!(answer.status, 200);
        assert!(start.elapsed().as_secs() < 10, "the token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sign_in_and_consent_refuse_forged_forms_and_bad_requests() {
    let stack = Stack::start().await;
    let (owner, _) = setup(&stack).await;
    let issuer = stack.policy.public_url();
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&issuer, "Careful client").await;
    let (_, challenge) = pkce("x");
    let auth_url = client.authorization_url(&url, &challenge, "st");

    // Sign-in form posted without its CSRF cookie (from another site): refused.
    let mut browser = Browser::default();
    let login = browser.get(&auth_url).await;
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), "alice".into());
    form.insert("password".into(), PASSWORD.into());
    browser.forget_cookies();
    assert_eq!(
        browser
            .post(&format!("{issuer}/oauth/login"), &form)
            .await
            .status,
        403
    );

    // Wrong password: the page again, no session.
    let mut browser = Browser::default();
    let login = browser.get(&auth_url).await;
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), "alice".into());
    form.insert("password".into(), "wrong password".into());
    let again = browser.post(&format!("{issuer}/oauth/login"), &form).await;
    assert_eq!(again.status, 401);
    assert!(again.body.contains("Wrong user name or password"));

    // Consent posted with a wrong CSRF token: refused, no host created.
    let mut browser = Browser::default();
    let login = browser.get(&auth_url).await;
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), "alice".into());
    form.insert("password".into(), PASSWORD.into());
    let signed = browser.post(&format!("{issuer}/oauth/login"), &form).await;
    let consent = browser
        .get(&format!("{issuer}{}", signed.location.unwrap()))
        .await;
    let mut form = form_inputs(&consent.body);
    form.insert("csrf".into(), "forged".into());
    form.insert("decision".into(), "allow".into());
    assert_eq!(
        browser
            .post(&format!("{issuer}/oauth/consent"), &form)
            .await
            .status,
        403
    );
    assert!(hosts(&owner).await.iter().all(|h| h["kind"] != "oauth"));

    // Denying sends the client access_denied.
    let mut form = form_inputs(&consent.body);
    form.insert("decision".into(), "deny".into());
    let denied = browser
        .post(&format!("{issuer}/oauth/consent"), &form)
        .await;
    assert_eq!(
        query_param(&denied.location.unwrap(), "error").as_deref(),
        Some("access_denied")
    );

    // A resource that is not this gateway's, or a server it does not expose.
    for resource in [
        "http://127.0.0.1:1/mcp/eng/demo".to_owned(),
        url.replace("/demo", "/nope"),
    ] {
        let page = Browser::default()
            .get(&client.authorization_url(&resource, &challenge, "st"))
            .await;
        assert_eq!(page.status, 303);
        assert_eq!(
            query_param(&page.location.unwrap(), "error").as_deref(),
            Some("invalid_target")
        );
    }
    // An unregistered redirect URI is never redirected to.
    let evil = client
        .authorization_url(&url, &challenge, "st")
        .replace("127.0.0.1%3A1", "evil.example");
    let page = Browser::default().get(&evil).await;
    assert_eq!((page.status, page.location), (400, None));

    // Registration refuses what it cannot serve, with RFC 7591 errors.
    let http = reqwest::Client::new();
    for (body, error) in [
        (
            json!({"redirect_uris": ["http://evil.example/cb"]}),
            "invalid_redirect_uri",
        ),
        (json!({"redirect_uris": []}), "invalid_redirect_uri"),
        (
            json!({"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "client_secret_basic"}),
            "invalid_client_metadata",
        ),
    ] {
        let resp = http
            .post(format!("{issuer}/oauth/register"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], error, "{body}");
    }
    // The token endpoint: RFC 6749 errors.
    let (status, v) = client.token(&[("grant_type", "password")]).await;
    assert_eq!((status, s(&v, "error")), (400, "unsupported_grant_type"));
    let (status, v) = client
        .token(&[("grant_type", "authorization_code"), ("code", "x")])
        .await;
    assert_eq!((status, s(&v, "error")), (400, "invalid_request"));

    // Passwords are never returned; a short one is refused.
    let (_, users) = owner.get("/api/v1/users").await;
    assert!(!users.to_string().contains(PASSWORD) && !users.to_string().contains("argon2"));
    let (status, v) = owner
        .call(
            Method::PUT,
            "/api/v1/users/1/password",
            Some(json!({"password": "short"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_password"))
    );
}

/// One sign-in attempt on a fresh sign-in page: the status and the page.
async fn try_sign_in(
    client: &RawClient,
    resource: &str,
    user: &str,
    password: &str,
) -> (u16, String) {
    let (_, challenge) = pkce("lock");
    let mut browser = Browser::default();
    let login = browser
        .get(&client.authorization_url(resource, &challenge, "st"))
        .await;
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), user.into());
    form.insert("password".into(), password.into());
    let answer = browser
        .post(&format!("{}/oauth/login", client.issuer), &form)
        .await;
    (answer.status, answer.body)
}

#[tokio::test]
async fn repeated_wrong_passwords_slow_the_client_whether_or_not_the_name_exists() {
    let stack = Stack::start().await;
    setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Guessing client").await;
    for name in ["alice", "nobody-by-this-name"] {
        for attempt in 1..=3 {
            let (status, _) = try_sign_in(&client, &url, name, "wrong password").await;
            assert_eq!(status, 401, "{name}, attempt {attempt}");
        }
        // This client waits now: even the right password is not verified, and the
        // answer is the same for a name no user has. (Other clients are not held back:
        // tests/e2e/attacks_signin.rs.)
        let (status, page) = try_sign_in(&client, &url, name, PASSWORD).await;
        assert_eq!(status, 429, "{name}");
        assert!(page.contains("Too many sign-in attempts"), "{page}");
    }
}

#[tokio::test]
async fn key_rotation_keeps_issued_tokens_valid_and_new_ones_work_at_once() {
    let stack = Stack::start().await;
    let (owner, _) = setup(&stack).await;
    let (url, client, first) = signed_in(&stack, "Rotation client").await;
    let (status, keys) = owner.get("/api/v1/oauth/signing-keys").await;
    assert_eq!(status, 200);
    let states: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| s(k, "state"))
        .collect();
    assert_eq!(states, ["active", "next"]);

    let (status, keys) = owner
        .post("/api/v1/oauth/signing-keys/rotate", json!({}))
        .await;
    assert_eq!(status, 200, "{keys}");
    let states: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| s(k, "state"))
        .collect();
    assert_eq!(states, ["retired", "active", "next"]);
    // The filter knew the new active key before it signed anything (it was `next`), and
    // still knows the retired one: both tokens pass at once, no refresh waited for.
    let (status, second) = client.refresh(s(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        initialize_with(&url, Some(s(&first, "access_token")))
            .await
            .status,
        200
    );
    assert_eq!(
        initialize_with(&url, Some(s(&second, "access_token")))
            .await
            .status,
        200
    );
    let jwks: Value = reqwest::get(format!("{}/oauth/jwks", stack.policy.public_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 3);
    assert!(!jwks.to_string().contains("\"d\""), "never a private half");
}

#[tokio::test]
async fn the_filter_refreshes_its_keys_on_a_timer() {
    let stack = Stack::start_with(false, &[], Some(1)).await;
    let (owner, _) = setup(&stack).await;
    let (url, client, first) = signed_in(&stack, "Timer client").await;
    // The filter now holds the first active and next keys.
    assert_eq!(
        initialize_with(&url, Some(s(&first, "access_token")))
            .await
            .status,
        200
    );
    // Two rotations: the signing key is now one the filter has never seen.
    for _ in 0..2 {
        let (status, keys) = owner
            .post("/api/v1/oauth/signing-keys/rotate", json!({}))
            .await;
        assert_eq!(status, 200, "{keys}");
    }
    let (status, fresh) = client.refresh(s(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{fresh}");
    // Refused as unknown until the filter's next refresh, then accepted.
    let start = std::time::Instant::now();
    loop {
        let answer = initialize_with(&url, Some(s(&fresh, "access_token"))).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (401, "token_unknown")
        );
        assert!(
            start.elapsed().as_secs() < 10,
            "the filter never refreshed its keys"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_consent_page_asks_for_missing_identities_of_per_user_servers() {
    let stack = Stack::start().await;
    let (owner, gateway) = setup(&stack).await;
    let server = owner.server("personal", &stack.demo.upstream_url()).await;
    let path = format!("/api/v1/gateways/{gateway}/servers/{server}");
    let (status, _) = owner
        .call(Method::PUT, &path, Some(json!({"identity": "per_user"})))
        .await;
    assert_eq!(status, 200);
    let url = stack.envoy.mcp_url("eng", "personal");
    let client = RawClient::register(&stack.policy.public_url(), "Identity client").await;
    let (verifier, challenge) = pkce("id");
    let auth_url = client.authorization_url(&url, &challenge, "st");
    let field = format!("identity_{server}");
    let back = Browser::default()
        .authorize(
            &client.issuer,
            &auth_url,
            "alice",
            PASSWORD,
            &[(&field, "alice-downstream")],
        )
        .await;
    let (status, tokens) = client
        .exchange(&query_param(&back, "code").unwrap(), &verifier)
        .await;
    assert_eq!(status, 200, "{tokens}");
    let session = mcp::connect(&url, Some(s(&tokens, "access_token")))
        .await
        .unwrap();
    assert_eq!(
        call_text(&session, "whoami", json!({})).await.unwrap(),
        "Bearer alice-downstream",
        "the user's own credential, from the consent page"
    );
}
