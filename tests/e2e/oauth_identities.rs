//! Identities by OAuth (issue 24): a per-user server protected by its own OAuth. The
//! downstream is a second, real mcpguard stack (its policy service the authorization
//! server, its Envoy and filter in front of the demo server), whose client side
//! mcpguard did not write for itself: the upstream mcpguard discovers it from its 401,
//! registers a client there, and a user connects their downstream account from the
//! consent page (the test plays both browsers, posting the forms). Calls then reach the
//! downstream as that downstream user; short downstream token lifetimes prove the
//! refresh; a revoked grant gives `identity_expired`, and reconnecting restores it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::oauth::{Browser, PASSWORD, RawClient, form_inputs, pkce, query_param};
use mcpguard_e2e::raw::Spy;
use mcpguard_e2e::{Admin, Stack};
use reqwest::Method;
use serde_json::{Value, json};

/// Downstream access tokens live this long: refreshed three quarters in.
const DOWNSTREAM_TTL_SECS: &str = "6";

/// The downstream: gateway `saas` exposing its demo server as `tracker`, and its user
/// `dana`, who can sign in there.
struct Downstream {
    stack: Stack,
    owner: Admin,
    dana: i64,
    url: String,
}

async fn downstream() -> Downstream {
    let stack = Stack::start_with(
        false,
        &[("MCPGUARD_ACCESS_TOKEN_TTL_SECS", DOWNSTREAM_TTL_SECS)],
        None,
    )
    .await;
    let owner = stack.admin();
    let gateway = owner.gateway("saas").await;
    let server = owner.server("tracker", &stack.demo.upstream_url()).await;
    owner.expose(gateway, server).await;
    let dana = owner.person("dana", PASSWORD).await;
    let url = stack.envoy.mcp_url("saas", "tracker");
    Downstream {
        stack,
        owner,
        dana,
        url,
    }
}

/// Alice's app authorizing at the upstream: she signs in, connects her downstream
/// account as `dana` (with `dana_password`) from the consent page, comes back to it and
/// allows. Returns the app's access token at the upstream.
async fn connect_and_consent(
    up: &Stack,
    down: &Downstream,
    client: &RawClient,
    dana_password: &str,
) -> String {
    let issuer = up.policy.public_url();
    let url = up.envoy.mcp_url("eng", "tracker");
    let (verifier, challenge) = pkce("alice");
    let auth_url = client.authorization_url(&url, &challenge, "st");
    // Two browsers' worth of cookies: both services name their session cookie alike.
    let mut browser = Browser::default();
    let login = browser.get(&auth_url).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), "alice".into());
    form.insert("password".into(), PASSWORD.into());
    let signed_in = browser.post(&format!("{issuer}/oauth/login"), &form).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let consent_url = format!("{issuer}{}", signed_in.location.unwrap());
    let consent = browser.get(&consent_url).await;
    assert_eq!(consent.status, 200, "{}", consent.body);
    assert!(
        consent.body.contains("Connect your Server tracker account")
            && !consent.body.contains("name=\"identity_"),
        "an OAuth server is connected, not typed in: {}",
        consent.body
    );

    // Connect: to the downstream's sign-in, with PKCE, state and resource.
    let started = browser
        .post(
            &format!("{issuer}/oauth/connect"),
            &form_inputs(&consent.body),
        )
        .await;
    assert_eq!(started.status, 303, "{}", started.body);
    let to_downstream = started.location.unwrap();
    let downstream_issuer = down.stack.policy.public_url();
    assert!(to_downstream.starts_with(&format!("{downstream_issuer}/oauth/authorize?")));
    assert_eq!(
        query_param(&to_downstream, "resource").as_deref(),
        Some(down.url.as_str())
    );
    assert_eq!(
        query_param(&to_downstream, "code_challenge_method").as_deref(),
        Some("S256")
    );
    let callback = Browser::default()
        .authorize(
            &downstream_issuer,
            &to_downstream,
            "dana",
            dana_password,
            &[],
        )
        .await;
    assert!(
        callback.starts_with(&format!("{issuer}/oauth/connect/callback?")),
        "{callback}"
    );

    // The callback's state works once, and only for the session that started it.
    let mut stranger = Browser::default();
    let refused = stranger.get(&callback).await;
    assert_eq!(refused.status, 400, "another session: {}", refused.body);
    // That spent the state (it works once, whoever presents it): start again.
    let started = browser
        .post(
            &format!("{issuer}/oauth/connect"),
            &form_inputs(&consent.body),
        )
        .await;
    let callback = Browser::default()
        .authorize(
            &downstream_issuer,
            &started.location.unwrap(),
            "dana",
            dana_password,
            &[],
        )
        .await;
    let back = browser.get(&callback).await;
    assert_eq!(back.status, 303, "{}", back.body);
    let replayed = browser.get(&callback).await;
    assert_eq!(
        replayed.status, 400,
        "a state works once: {}",
        replayed.body
    );

    // Back on the consent page, nothing is missing any more: allow.
    let consent = browser
        .get(&format!("{issuer}{}", back.location.unwrap()))
        .await;
    assert_eq!(consent.status, 200, "{}", consent.body);
    assert!(!consent.body.contains("Connect your"), "{}", consent.body);
    let mut form = form_inputs(&consent.body);
    form.insert("decision".into(), "allow".into());
    let allowed = browser
        .post(&format!("{issuer}/oauth/consent"), &form)
        .await;
    assert_eq!(allowed.status, 303, "{}", allowed.body);
    let code = query_param(&allowed.location.unwrap(), "code").expect("a code");
    let (status, tokens) = client.exchange(&code, &verifier).await;
    assert_eq!(status, 200, "{tokens}");
    tokens["access_token"].as_str().unwrap().to_owned()
}

async fn identity(owner: &Admin, user: i64) -> Value {
    let (status, list) = owner.get(&format!("/api/v1/users/{user}/identities")).await;
    assert_eq!(status, 200, "{list}");
    list[0].clone()
}

#[tokio::test]
async fn a_user_connects_their_downstream_account_and_it_is_refreshed_and_reconnected() {
    let down = downstream().await;
    let up = Stack::start().await;
    let owner = up.admin();
    let p = owner.provision("eng", "tracker", &down.url).await;
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let alice = owner.person("alice", PASSWORD).await;

    // OAuth-protected: found from the downstream's 401, a client registered there.
    let path = format!("/api/v1/servers/{}/oauth", p.server_id);
    let (status, oauth) = owner.call(Method::PUT, &path, Some(json!({}))).await;
    assert_eq!(status, 200, "{oauth}");
    assert_eq!(oauth["issuer"], down.stack.policy.public_url());
    assert_eq!(oauth["resource"], down.url);
    assert_eq!(oauth["registered"], true);
    assert_eq!(oauth["has_client_secret"], false);
    assert_eq!(
        owner.get(&path).await,
        (200, oauth.clone()),
        "the API shows what was set up"
    );

    let client = RawClient::register(&up.policy.public_url(), "Alice's app").await;
    let token = connect_and_consent(&up, &down, &client, PASSWORD).await;
    let state = identity(&owner, alice).await;
    assert_eq!(state["oauth_status"], "connected", "{state}");
    assert_eq!(state["header_name"], "authorization");

    // Many calls across several downstream expiries: none refused, each reaching the
    // downstream as Dana, about one refresh per token lifetime.
    let url = up.envoy.mcp_url("eng", "tracker");
    let session = mcp::connect(&url, Some(&token)).await.expect("connects");
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(14) {
        let echoed = call_text(&session, "echo", json!({"text": format!("call {calls}")}))
            .await
            .unwrap_or_else(|e| panic!("call {calls} at {:?}: {e}", started.elapsed()));
        assert_eq!(echoed, format!("call {calls}"));
        calls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let state = identity(&owner, alice).await;
    let refreshes = state["oauth_refreshes"].as_i64().unwrap();
    let lifetimes = elapsed / DOWNSTREAM_TTL_SECS.parse::<f64>().unwrap();
    assert!(
        refreshes >= 2 && (refreshes as f64) <= lifetimes + 2.0,
        "{refreshes} refreshes over {calls} calls in {elapsed:.1} s: {state}"
    );
    let as_dana = down
        .owner
        .allowed_decision(|e| e["user_id"] == down.dana)
        .await;
    assert_eq!(as_dana["server"], "tracker", "{as_dana}");

    // The downstream revokes Dana's grants (her password changes): the next refresh
    // is refused, and requests get identity_expired until she reconnects.
    let (status, v) = down
        .owner
        .call(
            Method::PUT,
            &format!("/api/v1/users/{}/password", down.dana),
            Some(json!({"password": "a new downstream password"})),
        )
        .await;
    assert_eq!(status, 204, "{v}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let answer = initialize_with(&url, Some(&token)).await;
        if answer.status == 403 {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "never refused: {}",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.code(), "identity_expired", "{:?}", refused.json());
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reconnect"),
        "{:?}",
        refused.json()
    );
    assert_eq!(
        identity(&owner, alice).await["oauth_status"],
        "needs_reconnect"
    );

    // Reconnecting (the consent page asks again) restores the same token's access.
    connect_and_consent(&up, &down, &client, "a new downstream password").await;
    assert_eq!(identity(&owner, alice).await["oauth_status"], "connected");
    let session = mcp::connect(&url, Some(&token)).await.expect("reconnected");
    assert_eq!(
        call_text(&session, "echo", json!({"text": "back"}))
            .await
            .unwrap(),
        "back"
    );

    // None of the downstream's tokens (JWTs, `eyJ…`) in the upstream's logs, audit
    // trail or API answers.
    let (_, audit) = owner.get("/api/v1/audit?limit=500").await;
    let (_, identities) = owner
        .get(&format!("/api/v1/users/{alice}/identities"))
        .await;
    for (what, text) in [
        ("log", up.policy.proc.log_text()),
        ("audit", audit.to_string()),
        ("identities", identities.to_string()),
        ("oauth", owner.get(&path).await.1.to_string()),
    ] {
        assert!(!text.contains("eyJ"), "a token in the upstream's {what}");
    }
}

/// The upstream (`eng` exposing the downstream's tracker per-user, OAuth-protected)
/// and its user Alice; (stack, provisioned, alice).
async fn upstream(down: &Downstream) -> (Stack, mcpguard_e2e::admin::Provisioned, i64) {
    let up = Stack::start().await;
    let owner = up.admin();
    let p = owner.provision("eng", "tracker", &down.url).await;
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let alice = owner.person("alice", PASSWORD).await;
    let path = format!("/api/v1/servers/{}/oauth", p.server_id);
    let (status, oauth) = owner.call(Method::PUT, &path, Some(json!({}))).await;
    assert_eq!(status, 200, "{oauth}");
    (up, p, alice)
}

#[tokio::test]
async fn a_user_connects_their_downstream_account_from_the_enrollment_page() {
    let down = downstream().await;
    let (up, p, alice) = upstream(&down).await;
    let owner = up.admin();
    let (status, e) = owner
        .post(
            &format!("/api/v1/hosts/{}/enrollments", p.host_id),
            json!({"gateway_id": p.gateway_id, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    let link = e["url"].as_str().unwrap().to_owned();

    // Alice signs in on her link and connects her downstream account (as Dana).
    let mut browser = Browser::default();
    let page = browser.get(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains("Sign in and connect your Server tracker account")
            && !page.body.contains("name=\"identity_"),
        "{}",
        page.body
    );
    let mut form = HashMap::new();
    form.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    form.insert("username".to_owned(), "alice".to_owned());
    form.insert("password".to_owned(), PASSWORD.to_owned());
    let mut connect = form.clone();
    connect.insert("connect".to_owned(), p.server_id.to_string());
    // Only the invited user may connect: a wrong password is refused first.
    let mut wrong = connect.clone();
    wrong.insert("password".to_owned(), "wrong password".to_owned());
    assert_eq!(browser.post(&link, &wrong).await.status, 401);
    let page = browser.get(&link).await;
    connect.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    let started = browser.post(&link, &connect).await;
    assert_eq!(started.status, 303, "{}", started.body);
    let downstream_issuer = down.stack.policy.public_url();
    let callback = Browser::default()
        .authorize(
            &downstream_issuer,
            &started.location.unwrap(),
            "dana",
            PASSWORD,
            &[],
        )
        .await;
    // Without the connect cookie (another browser), the callback is refused.
    let refused = Browser::default().get(&callback).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let page = browser.get(&link).await;
    connect.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    let started = browser.post(&link, &connect).await;
    let callback = Browser::default()
        .authorize(
            &downstream_issuer,
            &started.location.unwrap(),
            "dana",
            PASSWORD,
            &[],
        )
        .await;
    let done = browser.get(&callback).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("connected"), "{}", done.body);

    // Back on the link: nothing left to connect; Alice allows, the agent claims.
    let page = browser.get(&link).await;
    assert!(!page.body.contains("connect your"), "{}", page.body);
    form.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    let allowed = browser.post(&link, &form).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let (status, t) = owner
        .post(&format!("/api/v1/enrollments/{}/token", e["id"]), json!({}))
        .await;
    assert_eq!(status, 201, "{t}");
    let url = up.envoy.mcp_url("eng", "tracker");
    let session = mcp::connect(&url, t["token"].as_str())
        .await
        .expect("the agent connects as Alice");
    assert_eq!(
        call_text(&session, "echo", json!({"text": "hi"}))
            .await
            .unwrap(),
        "hi"
    );
    down.owner
        .allowed_decision(|e| e["user_id"] == down.dana)
        .await;

    // Deleting the identity revokes it at the downstream first (RFC 7009): Dana's
    // grant there ends, and the agent's token for Alice finds no identity.
    assert!(
        !down
            .stack
            .policy
            .proc
            .log_text()
            .contains("oauth grant revoked by its client")
    );
    let (status, v) = owner
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{alice}/identities/{}", p.server_id),
            None,
        )
        .await;
    assert_eq!(status, 204, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !down
        .stack
        .policy
        .proc
        .log_text()
        .contains("oauth grant revoked by its client")
    {
        assert!(Instant::now() < deadline, "not revoked at the downstream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = initialize_with(&url, t["token"].as_str()).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "identity_missing")
    );
}

/// Two upstream replicas on one PostgreSQL database behind one Envoy (round robin), a
/// rotating downstream refresh token: every expiry is refreshed by one replica only.
/// Had both used the same refresh token, the downstream would have seen it reused and
/// revoked the grant (its reuse detection), and the calls would fail.
#[tokio::test]
async fn two_replicas_refresh_each_expiry_once() {
    use mcpguard_e2e::db::Postgres;
    use mcpguard_e2e::{Envoy, EnvoyOptions, Policy};

    let down = downstream().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let url = pg.create_database();
    let key = dir.path().join("secrets.key");
    std::fs::write(&key, "5e".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = key.display().to_string();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("MCPGUARD_SECRETS_KEY_FILE", &key),
    ];
    let a = Policy::start_with(&dir.path().join("a"), dir.path(), &env).await;
    let b = Policy::start_with(&dir.path().join("b"), dir.path(), &env).await;
    let opts = EnvoyOptions {
        config: "envoy/mcpguard-replicas.yaml",
        check_port: a.check_port,
        check_timeout_ms: None,
        trusted_ca: None,
        issuer: None,
        jwks_refresh_s: None,
    };
    let envoy = Envoy::start_with_checks(&opts, &[a.check_port, b.check_port], dir.path()).await;

    // Set up through replica A; Alice connects on her enrollment link there.
    let owner = a.admin();
    let p = owner.provision("eng", "tracker", &down.url).await;
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let alice = owner.person("alice", PASSWORD).await;
    let path = format!("/api/v1/servers/{}/oauth", p.server_id);
    let (status, oauth) = owner.call(Method::PUT, &path, Some(json!({}))).await;
    assert_eq!(status, 200, "{oauth}");
    let (status, e) = owner
        .post(
            &format!("/api/v1/hosts/{}/enrollments", p.host_id),
            json!({"gateway_id": p.gateway_id, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    let link = e["url"].as_str().unwrap().to_owned();
    let mut browser = Browser::default();
    let page = browser.get(&link).await;
    let mut form = HashMap::new();
    form.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    form.insert("username".to_owned(), "alice".to_owned());
    form.insert("password".to_owned(), PASSWORD.to_owned());
    let mut connect = form.clone();
    connect.insert("connect".to_owned(), p.server_id.to_string());
    let started = browser.post(&link, &connect).await;
    assert_eq!(started.status, 303, "{}", started.body);
    let callback = Browser::default()
        .authorize(
            &down.stack.policy.public_url(),
            &started.location.unwrap(),
            "dana",
            PASSWORD,
            &[],
        )
        .await;
    assert_eq!(browser.get(&callback).await.status, 200);
    let page = browser.get(&link).await;
    form.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    assert_eq!(browser.post(&link, &form).await.status, 200);
    let (status, t) = owner
        .post(&format!("/api/v1/enrollments/{}/token", e["id"]), json!({}))
        .await;
    assert_eq!(status, 201, "{t}");
    let token = t["token"].as_str().unwrap().to_owned();

    // Both replicas in Envoy's rotation before the clock starts.
    let mcp_url = envoy.mcp_url("eng", "tracker");
    let deadline = Instant::now() + Duration::from_secs(20);
    while initialize_with(&mcp_url, Some(&token)).await.status != 200 {
        assert!(Instant::now() < deadline, "never allowed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let session = mcp::connect(&mcp_url, Some(&token))
        .await
        .expect("connects");
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(14) {
        // Several at once, so that both replicas see each refresh come due.
        let round = (0..4).map(|i| {
            let text = format!("call {calls}.{i}");
            let session = &session;
            async move {
                let echoed = call_text(session, "echo", json!({"text": text.clone()})).await;
                (text, echoed)
            }
        });
        for (text, echoed) in futures::future::join_all(round).await {
            let echoed =
                echoed.unwrap_or_else(|e| panic!("{text} at {:?}: {e}", started.elapsed()));
            assert_eq!(echoed, text);
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let state = identity(&owner, alice).await;
    assert_eq!(state["oauth_status"], "connected", "{state}");
    let refreshes = state["oauth_refreshes"].as_i64().unwrap();
    let lifetimes = elapsed / DOWNSTREAM_TTL_SECS.parse::<f64>().unwrap();
    assert!(
        refreshes >= 2 && (refreshes as f64) <= lifetimes + 2.0,
        "{refreshes} refreshes in {elapsed:.1} s: {state}"
    );
    assert!(
        !down
            .stack
            .policy
            .proc
            .log_text()
            .contains("refresh token reused"),
        "a refresh token was used twice"
    );
    drop((envoy, a, b));
    drop(pg);
}

/// The text of the element `id` (a `<code id=…>`), such as the secret on the page that
/// shows a new token once.
fn code_by_id(body: &str, id: &str) -> Option<String> {
    let start = body.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    let end = body[start..].find('<')? + start;
    Some(body[start..end].to_owned())
}

/// Connect in the console: posts `form` to `/console/connect` from `browser`, which is
/// sent to the downstream's sign-in (its authorization endpoint), where Dana signs in
/// and allows (another browser); returns the callback URL to come back to.
async fn console_connect(
    browser: &mut Browser,
    base: &str,
    form: &HashMap<String, String>,
    down: &Downstream,
) -> String {
    let started = browser.post(&format!("{base}/console/connect"), form).await;
    assert_eq!(started.status, 303, "{}", started.body);
    let url = started.location.unwrap();
    let downstream_issuer = down.stack.policy.public_url();
    assert!(
        url.starts_with(&format!("{downstream_issuer}/oauth/authorize?")),
        "{url}"
    );
    Browser::default()
        .authorize(&downstream_issuer, &url, "dana", PASSWORD, &[])
        .await
}

/// Connect in the console: an operator holding only `tokens.manage` (no `users.manage`,
/// so no identity can be typed in for them) opens a host's connection flow, connects
/// their downstream account at its sign-in, comes back to the flow and generates the
/// token, which reaches the downstream as them.
#[tokio::test]
async fn an_operator_connects_their_downstream_account_in_the_console() {
    let down = downstream().await;
    let (up, p, _alice) = upstream(&down).await;
    let owner = up.admin();
    let olga = owner
        .person_with("olga", PASSWORD, &["tokens.manage"])
        .await;

    let base = up.policy.public_url();
    let mut browser = Browser::default();
    browser.console_sign_in(&base, "olga", PASSWORD).await;

    let flow_path = format!(
        "/console/hosts/{}/connect?gateway_id={}",
        p.host_id, p.gateway_id
    );
    let page = browser.get(&format!("{base}{flow_path}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Connect your Server tracker account")
            && !page.body.contains("credential.token")
            && !page.body.contains(">Generate token<"),
        "an OAuth server is connected, not typed in, before the token: {}",
        page.body
    );
    let mut connect = HashMap::new();
    connect.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    connect.insert("server_id".to_owned(), p.server_id.to_string());
    connect.insert("_back".to_owned(), flow_path.clone());
    // A form without this session's CSRF token starts nothing.
    let mut forged = connect.clone();
    forged.insert("csrf".to_owned(), "forged".to_owned());
    let refused = browser
        .post(&format!("{base}/console/connect"), &forged)
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);

    let callback = console_connect(&mut browser, &base, &connect, &down).await;
    // Bound to the browser that started it: another one is refused (and spends it).
    let refused = Browser::default().get(&callback).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let callback = console_connect(&mut browser, &base, &connect, &down).await;
    let done = browser.get(&callback).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let back = done
        .body
        .split("id=\"back\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a link back to the console")
        .replace("&amp;", "&");
    assert!(back.starts_with(&flow_path), "{back}");

    // Back in the flow: the identity is ready, and the token is Olga's.
    let page = browser.get(&format!("{base}{back}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Connected.")
            && page.body.contains("Nothing to bring")
            && page.body.contains(">Generate token<")
            && !page.body.contains("Connect your"),
        "{}",
        page.body
    );
    let mut generate = HashMap::new();
    generate.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    generate.insert("_method".to_owned(), "POST".to_owned());
    generate.insert(
        "_path".to_owned(),
        format!("/api/v1/hosts/{}/tokens", p.host_id),
    );
    generate.insert("_back".to_owned(), flow_path.clone());
    generate.insert("gateway_id".to_owned(), p.gateway_id.to_string());
    let shown = browser
        .post(&format!("{base}/console/act"), &generate)
        .await;
    assert_eq!(shown.status, 200, "{}", shown.body);
    let token = code_by_id(&shown.body, "secret").expect("the token, shown once");
    let session = mcp::connect(&up.envoy.mcp_url("eng", "tracker"), Some(&token))
        .await
        .expect("the token connects as Olga");
    assert_eq!(
        call_text(&session, "echo", json!({"text": "hi"}))
            .await
            .unwrap(),
        "hi"
    );
    down.owner
        .allowed_decision(|e| e["user_id"] == down.dana)
        .await;
    let (status, identities) = owner.get(&format!("/api/v1/users/{olga}/identities")).await;
    assert_eq!(status, 200, "{identities}");
    assert_eq!(identities[0]["oauth_status"], "connected", "{identities}");
}

/// A shared exposure whose credential is a service account connected once: an admin
/// (`users.manage`, signed in to the console) connects the downstream account of a
/// service user there, and the exposure sends that identity (`identity_of`) for every
/// caller. Calls then reach the downstream as that account across several expiries
/// (refreshed like any identity), and disabling the service identity refuses every
/// caller on the next request.
#[tokio::test]
async fn a_shared_exposure_sends_a_service_account_an_admin_connected_once() {
    let down = downstream().await;
    let up = Stack::start().await;
    let owner = up.admin();
    let p = owner.provision("eng", "tracker", &down.url).await;
    let path = format!("/api/v1/servers/{}/oauth", p.server_id);
    let (status, oauth) = owner.call(Method::PUT, &path, Some(json!({}))).await;
    assert_eq!(status, 200, "{oauth}");
    let svc = owner.end_users(&["svc-tracker"]).await[0];
    let root = owner.person_with("root", PASSWORD, &["users.manage"]).await;

    // Bad input changes nothing: no such user; a per-user exposure takes no credential.
    let exposure = format!("/api/v1/gateways/{}/servers/{}", p.gateway_id, p.server_id);
    for (body, want) in [
        (
            json!({"identity": "shared", "credential": {"type": "identity_of", "user_id": 999}}),
            404,
        ),
        (
            json!({"identity": "per_user", "credential": {"type": "identity_of", "user_id": svc}}),
            422,
        ),
        (
            json!({"identity": "shared", "credential": {"type": "identity_of", "user_id": "svc"}}),
            422,
        ),
    ] {
        let (status, v) = owner.call(Method::PUT, &exposure, Some(body)).await;
        assert_eq!(status, want, "{v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    let shown = owner
        .expose_as(
            p.gateway_id,
            p.server_id,
            json!({"identity": "shared", "credential": {"type": "identity_of", "user_id": svc}}),
        )
        .await;
    assert_eq!(shown["credential_user_id"], svc, "{shown}");
    let url = up.envoy.mcp_url("eng", "tracker");
    let refused = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "identity_missing"),
        "not connected yet"
    );

    // The admin connects the service user's account in the console, as Dana.
    let base = up.policy.public_url();
    let mut browser = Browser::default();
    browser.console_sign_in(&base, "root", PASSWORD).await;
    let people = format!("/console/people/{svc}");
    let page = browser.get(&format!("{base}{people}")).await;
    assert!(
        page.body.contains("Connect an account for svc-tracker"),
        "{}",
        page.body
    );
    let mut connect = HashMap::new();
    connect.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    connect.insert("server_id".to_owned(), p.server_id.to_string());
    connect.insert("user_id".to_owned(), svc.to_string());
    connect.insert("_back".to_owned(), people.clone());
    let callback = console_connect(&mut browser, &base, &connect, &down).await;
    let done = browser.get(&callback).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let page = browser.get(&format!("{base}{people}?done=connected")).await;
    assert!(page.body.contains(">connected<"), "{}", page.body);
    let state = identity(&owner, svc).await;
    assert_eq!(state["oauth_status"], "connected", "{state}");
    let (_, audit) = owner.get("/api/v1/audit?limit=50").await;
    assert!(
        audit
            .as_array()
            .or(audit["entries"].as_array())
            .into_iter()
            .flatten()
            .any(|e| e["action"] == "identity.connect" && e["actor_user_id"] == root),
        "the connect is the admin's: {audit}"
    );

    // Every caller (this token is the owner's) reaches the downstream as Dana, across
    // downstream expiries.
    let session = mcp::connect(&url, Some(&p.token)).await.expect("connects");
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(11) {
        let echoed = call_text(&session, "echo", json!({"text": format!("call {calls}")}))
            .await
            .unwrap_or_else(|e| panic!("call {calls} at {:?}: {e}", started.elapsed()));
        assert_eq!(echoed, format!("call {calls}"));
        calls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = identity(&owner, svc).await;
    assert!(
        state["oauth_refreshes"].as_i64().unwrap() >= 1,
        "refreshed over {calls} calls: {state}"
    );
    down.owner
        .allowed_decision(|e| e["user_id"] == down.dana)
        .await;

    // Break-glass on the service identity holds for every caller, on the next request.
    let (status, v) = owner
        .post(
            &format!("/api/v1/identities/{}/disable", state["id"]),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let refused = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "identity_disabled")
    );
}

/// A refresh that gets no answer (the downstream's authorization server is down) is
/// not a refusal: once the access token has expired, requests are refused for now
/// (`503 policy_unavailable`, recorded as such), the identity stays connected, and
/// when the authorization server is back the next request refreshes and goes through,
/// with no reconnecting.
#[tokio::test]
async fn a_refresh_with_no_answer_refuses_for_now_and_keeps_the_identity() {
    let mut down = downstream().await;
    let (up, _, alice) = upstream(&down).await;
    let owner = up.admin();
    let client = RawClient::register(&up.policy.public_url(), "Alice's app").await;
    let token = connect_and_consent(&up, &down, &client, PASSWORD).await;
    let url = up.envoy.mcp_url("eng", "tracker");
    assert_eq!(initialize_with(&url, Some(&token)).await.status, 200);

    // The authorization server goes away (with the rest of the downstream's policy
    // service); wait out the access token's life.
    down.stack.policy.proc.kill();
    let expires_at = identity(&owner, alice).await["oauth_expires_at"]
        .as_str()
        .map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        })
        .expect("an expiry");
    while time::OffsetDateTime::now_utc() < expires_at + Duration::from_millis(1_100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = initialize_with(&url, Some(&token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "policy_unavailable")
    );
    // Refused by the upstream's own check (not only by the dead downstream): no
    // decision, so not audited, but logged as such.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !up
        .policy
        .proc
        .log_text()
        .contains("expired token could not be refreshed in time")
    {
        assert!(Instant::now() < deadline, "the upstream did not refuse it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = identity(&owner, alice).await;
    assert_eq!(state["oauth_status"], "connected", "not a refusal: {state}");

    // Back: the next request refreshes and reaches the downstream as Dana.
    let before = state["oauth_refreshes"].as_i64().unwrap();
    down.stack.policy.restart(down.stack.dir.path()).await;
    let session = mcp::connect(&url, Some(&token))
        .await
        .expect("connects once the authorization server is back");
    assert_eq!(
        call_text(&session, "echo", json!({"text": "back"}))
            .await
            .unwrap(),
        "back"
    );
    let state = identity(&owner, alice).await;
    assert_eq!(state["oauth_status"], "connected", "{state}");
    assert!(
        state["oauth_refreshes"].as_i64().unwrap() > before,
        "{state}"
    );
}

/// A hostile upstream names endpoints inside the deployment in its OAuth metadata (this
/// service's check port, the cloud metadata address). Set-up refuses them, 422
/// `oauth_endpoint_not_allowed`, stores nothing, and calls none: the upstream network
/// policy judges every address this service calls for OAuth, as it judges upstreams.
#[tokio::test]
async fn oauth_endpoints_inside_the_deployment_are_never_called() {
    let up = Stack::start().await;
    let owner = up.admin();
    let check = format!("http://127.0.0.1:{}", up.policy.check_port);
    let metadata_inside = Spy::answering(|_, _| {
        Some((
            "401 Unauthorized\r\nwww-authenticate: Bearer resource_metadata=\"http://169.254.169.254/latest/meta-data/\"".into(),
            String::new(),
        ))
    })
    .await;
    let endpoints_inside = Spy::answering(move |port, target| {
        let me = format!("http://127.0.0.1:{port}");
        Some(match target {
            "/.well-known/oauth-protected-resource/mcp"
            | "/.well-known/oauth-protected-resource" => (
                "200 OK\r\ncontent-type: application/json".into(),
                json!({"resource": format!("{me}/mcp"), "authorization_servers": [me]}).to_string(),
            ),
            "/.well-known/oauth-authorization-server" => (
                "200 OK\r\ncontent-type: application/json".into(),
                json!({
                    "issuer": me,
                    "authorization_endpoint": format!("{me}/authorize"),
                    "token_endpoint": format!("{check}/v1/token"),
                    "registration_endpoint": format!("{check}/v1/register"),
                    "code_challenge_methods_supported": ["S256"],
                })
                .to_string(),
            ),
            _ => (
                "401 Unauthorized\r\nwww-authenticate: Bearer".into(),
                String::new(),
            ),
        })
    })
    .await;
    for (i, (spy, setup)) in [
        (&metadata_inside, json!({})),
        // Registered dynamically: the registration endpoint is refused.
        (&endpoints_inside, json!({})),
        // A client given by hand: the token endpoint is refused at set-up already.
        (&endpoints_inside, json!({"client_id": "by-hand"})),
    ]
    .into_iter()
    .enumerate()
    {
        let server = owner.server(&format!("hostile{i}"), &spy.url("/mcp")).await;
        let path = format!("/api/v1/servers/{server}/oauth");
        let (status, v) = owner.call(Method::PUT, &path, Some(setup)).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (422, Some("oauth_endpoint_not_allowed")),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not called"),
            "{v}"
        );
        assert_eq!(owner.get(&path).await.0, 404, "nothing stored");
    }
}
