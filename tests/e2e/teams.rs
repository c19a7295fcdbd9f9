//! Who may connect: teams grant gateways. A user connects (OAuth consent, an
//! enrollment, a token made for them) only to a gateway one of their teams is granted;
//! leaving the team, or the team losing the grant, refuses their connections on the
//! next request (`gateway_not_granted`), and granting again restores them. Host
//! approval keeps a new headed app `pending` until an admin allows it. All through
//! real Envoy, the real filter and the real policy service.

use std::collections::HashMap;

use mcpguard_e2e::mcp::initialize_with;
use mcpguard_e2e::oauth::{Browser, PASSWORD, RawClient, form_inputs, pkce, query_param};
use mcpguard_e2e::{Admin, Stack};
use reqwest::Method;
use serde_json::{Value, json};

use crate::capabilities::caller_with;

/// Gateway `eng` exposing the demo server as `demo`, restricted to the team `eng-team`
/// (its `everyone` grant taken away), with `alice` in the team and `bob` outside it,
/// both able to connect by OAuth. Returns (owner, gateway, team, alice, bob).
async fn restricted(stack: &Stack) -> (Admin, i64, i64, i64, i64) {
    let owner = stack.admin();
    let gateway = owner.gateway("eng").await;
    let server = owner.server("demo", &stack.demo.upstream_url()).await;
    owner.expose(gateway, server).await;
    let alice = owner.person("alice", PASSWORD).await;
    let bob = owner.person("bob", PASSWORD).await;
    let team = create_team(&owner, "eng-team").await;
    member(&owner, team, alice, true).await;
    grant(&owner, gateway, team, true).await;
    grant(&owner, gateway, everyone(&owner).await, false).await;
    (owner, gateway, team, alice, bob)
}

async fn create_team(owner: &Admin, name: &str) -> i64 {
    let (status, team) = owner.post("/api/v1/teams", json!({"name": name})).await;
    assert_eq!(status, 201, "{team}");
    team["id"].as_i64().unwrap()
}

async fn everyone(owner: &Admin) -> i64 {
    let (status, teams) = owner.get("/api/v1/teams").await;
    assert_eq!(status, 200, "{teams}");
    teams
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["everyone"] == true)
        .expect("the built-in everyone team")["id"]
        .as_i64()
        .unwrap()
}

/// Adds (`true`) or removes a member; asserts it worked.
async fn member(owner: &Admin, team: i64, user: i64, add: bool) {
    let method = if add { Method::PUT } else { Method::DELETE };
    let path = format!("/api/v1/teams/{team}/members/{user}");
    let (status, v) = owner.call(method, &path, None).await;
    assert_eq!(status, 200, "{path}: {v}");
}

/// Grants (`true`) a gateway to a team or takes the grant away; asserts it worked.
async fn grant(owner: &Admin, gateway: i64, team: i64, give: bool) {
    let method = if give { Method::PUT } else { Method::DELETE };
    let path = format!("/api/v1/gateways/{gateway}/teams/{team}");
    let (status, v) = owner.call(method, &path, None).await;
    assert_eq!(status, 200, "{path}: {v}");
}

/// Signs `user` in on the authorization page of a new client for `resource`: the
/// browser (holding the session) and the consent page it is shown.
async fn consent_page(
    stack: &Stack,
    resource: &str,
    user: &str,
) -> (RawClient, Browser, String, mcpguard_e2e::oauth::Page) {
    let client = RawClient::register(&stack.policy.public_url(), &format!("App of {user}")).await;
    let (verifier, challenge) = pkce(user);
    let auth_url = client.authorization_url(resource, &challenge, "st");
    let mut browser = Browser::default();
    let login = browser.get(&auth_url).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), user.into());
    form.insert("password".into(), PASSWORD.into());
    let signed_in = browser
        .post(&format!("{}/oauth/login", client.issuer), &form)
        .await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let consent_url = format!("{}{}", client.issuer, signed_in.location.unwrap());
    let page = browser.get(&consent_url).await;
    (client, browser, verifier, page)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

async fn host_count(owner: &Admin) -> usize {
    let (status, hosts) = owner.get("/api/v1/hosts").await;
    assert_eq!(status, 200, "{hosts}");
    hosts.as_array().unwrap().len()
}

#[tokio::test]
async fn a_user_outside_the_gateways_teams_is_refused_at_consent_and_at_enrollment() {
    let stack = Stack::start().await;
    let (owner, gateway, team, alice, bob) = restricted(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let hosts_before = host_count(&owner).await;

    // Bob's teams are not granted the gateway: the consent page refuses, with no form.
    let (_, _, _, page) = consent_page(&stack, &url, "bob").await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("None of your teams"), "{}", page.body);
    assert!(
        !form_inputs(&page.body).contains_key("csrf"),
        "{}",
        page.body
    );
    assert_eq!(host_count(&owner).await, hosts_before, "no host appeared");

    // A consent form that comes back after the grant is gone goes to the client as
    // access_denied, and grants nothing. (Bob is let in to get the form, then out.)
    member(&owner, team, bob, true).await;
    let (client, mut browser, _, page) = consent_page(&stack, &url, "bob").await;
    assert_eq!(page.status, 200, "{}", page.body);
    member(&owner, team, bob, false).await;
    let mut form: HashMap<String, String> = form_inputs(&page.body);
    form.insert("decision".into(), "allow".into());
    let back = browser
        .post(&format!("{}/oauth/consent", client.issuer), &form)
        .await;
    assert_eq!(back.status, 303, "{}", back.body);
    let location = back.location.unwrap();
    assert!(location.starts_with(&client.redirect_uri), "{location}");
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(&location, "code"), None);
    assert_eq!(host_count(&owner).await, hosts_before, "no host appeared");

    // Alice is in the team: she consents and connects.
    let (client, mut browser, verifier, page) = consent_page(&stack, &url, "alice").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let mut form = form_inputs(&page.body);
    form.insert("decision".into(), "allow".into());
    let back = browser
        .post(&format!("{}/oauth/consent", client.issuer), &form)
        .await;
    let code = query_param(&back.location.unwrap(), "code").expect("a code");
    let (status, tokens) = client.exchange(&code, &verifier).await;
    assert_eq!(status, 200, "{tokens}");
    let answer = initialize_with(&url, Some(s(&tokens, "access_token"))).await;
    assert_eq!(answer.status, 200);

    // Enrollments and tokens for a user need the grant too.
    let host = owner.host("Feedback bot").await;
    for path in [
        format!("/api/v1/hosts/{host}/enrollments"),
        format!("/api/v1/hosts/{host}/tokens"),
    ] {
        let (status, v) = owner
            .post(&path, json!({"gateway_id": gateway, "user_id": bob}))
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("gateway_not_granted")),
            "{path}: {v}"
        );
    }
    let (_, enrollments) = owner
        .get(&format!("/api/v1/hosts/{host}/enrollments"))
        .await;
    assert_eq!(enrollments, json!([]), "nothing made");
    let (status, v) = owner
        .post(
            &format!("/api/v1/hosts/{host}/enrollments"),
            json!({"gateway_id": gateway, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    // Connecting by OAuth at all needs oauth.connect: a team member whose role lacks
    // it is refused at consent.
    let (status, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "no-oauth", "capabilities": []}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (_, carol) = owner
        .post(
            "/api/v1/users",
            json!({"name": "carol", "role_id": role["id"]}),
        )
        .await;
    let carol = carol["id"].as_i64().unwrap();
    let (status, _) = owner
        .call(
            Method::PUT,
            &format!("/api/v1/users/{carol}/password"),
            Some(json!({"password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 204);
    member(&owner, team, carol, true).await;
    let (_, _, _, page) = consent_page(&stack, &url, "carol").await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("oauth.connect"), "{}", page.body);
}

#[tokio::test]
async fn leaving_the_team_refuses_oauth_and_api_tokens_on_the_next_request_and_regranting_restores()
{
    let stack = Stack::start().await;
    let (owner, gateway, team, alice, _) = restricted(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // An agent acts for Alice with an API token, and she connects a headed app by
    // OAuth (in this order: enrolling sets her password, which ends her OAuth grants).
    let host = owner.host("Feedback bot").await;
    let api_token = owner.user_token(host, gateway, alice).await;
    let client = RawClient::register(&stack.policy.public_url(), "Desktop app").await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let access = s(&tokens, "access_token").to_owned();
    let both = [access.as_str(), api_token.as_str()];
    let statuses = || async {
        let mut out = Vec::new();
        for token in both {
            let answer = initialize_with(&url, Some(token)).await;
            // An allowed answer is the upstream's (an SSE stream), with no error code.
            let code = if answer.status == 200 {
                String::new()
            } else {
                answer.code()
            };
            out.push((answer.status, code));
        }
        out
    };
    let allowed = vec![(200, String::new()), (200, String::new())];
    let refused = vec![
        (403, "gateway_not_granted".to_owned()),
        (403, "gateway_not_granted".to_owned()),
    ];
    assert_eq!(statuses().await, allowed);
    let (_, connections_before) = owner
        .get(&format!("/api/v1/gateways/{gateway}/connections"))
        .await;

    // She leaves the team: the very next request of each is refused.
    member(&owner, team, alice, false).await;
    assert_eq!(statuses().await, refused, "after leaving the team");
    // Back in the team: the same tokens work again.
    member(&owner, team, alice, true).await;
    assert_eq!(statuses().await, allowed, "back in the team");

    // The team loses the grant: refused; granted again: restored.
    grant(&owner, gateway, team, false).await;
    assert_eq!(statuses().await, refused, "after the grant is taken");
    // A refreshed OAuth token is refused as well: the grant is the check's, not the
    // token's.
    let (status, refreshed) = client.refresh(s(&tokens, "refresh_token")).await;
    assert_eq!(status, 200, "{refreshed}");
    let answer = initialize_with(&url, Some(s(&refreshed, "access_token"))).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (403, "gateway_not_granted")
    );
    grant(&owner, gateway, team, true).await;
    assert_eq!(
        initialize_with(&url, Some(&api_token)).await.status,
        200,
        "granted again"
    );
    let answer = initialize_with(&url, Some(s(&refreshed, "access_token"))).await;
    assert_eq!(answer.status, 200);

    // Nothing was deleted: the connections are the same, enabled, as before.
    let (_, connections_after) = owner
        .get(&format!("/api/v1/gateways/{gateway}/connections"))
        .await;
    let ids = |v: &Value| {
        let mut ids: Vec<(i64, bool)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_i64().unwrap(), c["enabled"].as_bool().unwrap()))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&connections_after), ids(&connections_before));
    assert_eq!(ids(&connections_after).len(), 2);

    // The refusals are audited with their code (the audit writer batches: polled).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, page) = owner.get("/api/v1/audit?kind=decision&decision=deny").await;
        let n = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["code"] == "gateway_not_granted")
            .count();
        if n >= 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_host_approval_a_new_headed_app_waits_pending_until_an_admin_approves_it() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let gateway = owner.gateway("eng").await;
    let server = owner.server("demo", &stack.demo.upstream_url()).await;
    owner.expose(gateway, server).await;
    owner.person("alice", PASSWORD).await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // Off by default: the gateway says so.
    let (_, gateways) = owner.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["approve_hosts"], false, "{gateways}");

    // A caller without gateways.manage cannot turn it on; nothing changes.
    let reader = caller_with(&owner, "reader", vec!["gateways.read", "hosts.read"]).await;
    let path = format!("/api/v1/gateways/{gateway}/host-approval");
    let (status, v) = reader
        .call(Method::PUT, &path, Some(json!({"required": true})))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("missing_capability"))
    );
    assert_eq!(owner.get("/api/v1/gateways").await.1, gateways);

    let (status, v) = owner
        .call(Method::PUT, &path, Some(json!({"required": true})))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["approve_hosts"], true, "{v}");

    // A new app connects: it gets its tokens, but waits as pending.
    let client = RawClient::register(&stack.policy.public_url(), "New app").await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let access = s(&tokens, "access_token").to_owned();
    let answer = initialize_with(&url, Some(&access)).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (403, "host_pending")
    );
    let (_, hosts) = owner.get("/api/v1/hosts").await;
    let host = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "New app")
        .expect("the app is listed for admins")
        .clone();
    assert_eq!(
        (host["pending"].as_bool(), host["kind"].as_str()),
        (Some(true), Some("oauth"))
    );
    let host_id = host["id"].as_i64().unwrap();

    // Approving needs hosts.toggle: refused without it, and the host still waits.
    let approve = format!("/api/v1/hosts/{host_id}/approve");
    let (status, _) = reader.post(&approve, json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(
        initialize_with(&url, Some(&access)).await.code(),
        "host_pending"
    );

    let (status, v) = owner.post(&approve, json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["pending"], false, "{v}");
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);

    // The approved app connecting again (another sign-in) is not pending again.
    let again = client.sign_in(&url, "alice", PASSWORD).await;
    assert_eq!(
        initialize_with(&url, Some(s(&again, "access_token")))
            .await
            .status,
        200
    );
    let (_, audit) = owner.get("/api/v1/audit?kind=admin&limit=100").await;
    assert!(
        audit.to_string().contains("host.approve")
            && audit.to_string().contains("gateway.host_approval"),
        "{audit}"
    );
}

/// The operator's switch for every gateway: with `--approve-new-hosts`, a new headed
/// app waits on a gateway whose own setting is off, and turning that off changes nothing.
#[tokio::test]
async fn approve_new_hosts_makes_every_gateway_hold_new_apps_pending() {
    let stack = Stack::start_with(false, &[("MCPGUARD_APPROVE_NEW_HOSTS", "true")], None).await;
    let owner = stack.admin();
    let gateway = owner.gateway("eng").await;
    let server = owner.server("demo", &stack.demo.upstream_url()).await;
    owner.expose(gateway, server).await;
    owner.person("alice", PASSWORD).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let path = format!("/api/v1/gateways/{gateway}/host-approval");
    let (status, v) = owner
        .call(Method::PUT, &path, Some(json!({"required": false})))
        .await;
    assert_eq!((status, &v["approve_hosts"]), (200, &json!(false)), "{v}");

    let client = RawClient::register(&stack.policy.public_url(), "Global app").await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let access = s(&tokens, "access_token").to_owned();
    assert_eq!(
        initialize_with(&url, Some(&access)).await.code(),
        "host_pending"
    );
    let (_, hosts) = owner.get("/api/v1/hosts").await;
    let host = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "Global app")
        .expect("the app is listed for admins")
        .clone();
    assert_eq!(host["pending"], true, "{host}");
    let approve = format!("/api/v1/hosts/{}/approve", host["id"]);
    assert_eq!(owner.post(&approve, json!({})).await.0, 200);
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);
}

#[tokio::test]
async fn team_and_grant_changes_need_their_capability_and_a_refused_one_changes_nothing() {
    let stack = Stack::start().await;
    let (owner, gateway, team, _, bob) = restricted(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // Who manages teams cannot grant gateways, and the other way round.
    let team_admin = caller_with(&owner, "team-admin", vec!["teams.manage"]).await;
    let gateway_admin = caller_with(&owner, "gateway-admin", vec!["gateways.manage"]).await;
    let snapshot = || async {
        (
            owner.get("/api/v1/teams").await.1,
            owner
                .get(&format!("/api/v1/gateways/{gateway}/teams"))
                .await
                .1,
        )
    };
    let before = snapshot().await;
    let everyone = everyone(&owner).await;
    for (caller, method, path, capability) in [
        (
            &team_admin,
            Method::PUT,
            format!("/api/v1/gateways/{gateway}/teams/{everyone}"),
            "gateways.manage",
        ),
        (
            &team_admin,
            Method::DELETE,
            format!("/api/v1/gateways/{gateway}/teams/{team}"),
            "gateways.manage",
        ),
        (
            &gateway_admin,
            Method::PUT,
            format!("/api/v1/teams/{team}/members/{bob}"),
            "teams.manage",
        ),
        (
            &gateway_admin,
            Method::DELETE,
            format!("/api/v1/teams/{team}"),
            "teams.manage",
        ),
    ] {
        let (status, v) = caller.call(method, &path, None).await;
        assert_eq!(status, 403, "{path}: {v}");
        assert_eq!(
            (
                v["error"]["code"].as_str(),
                v["error"]["capability"].as_str()
            ),
            (Some("missing_capability"), Some(capability)),
            "{path}"
        );
    }
    assert_eq!(snapshot().await, before, "nothing changed");

    // Each does its own part: bob joins, and bob's app can then connect.
    let (status, v) = team_admin
        .call(
            Method::PUT,
            &format!("/api/v1/teams/{team}/members/{bob}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let client = RawClient::register(&stack.policy.public_url(), "Bob's app").await;
    let tokens = client.sign_in(&url, "bob", PASSWORD).await;
    assert_eq!(
        initialize_with(&url, Some(s(&tokens, "access_token")))
            .await
            .status,
        200
    );

    // The everyone team is not edited, nor deleted.
    for (method, path) in [
        (
            Method::PUT,
            format!("/api/v1/teams/{everyone}/members/{bob}"),
        ),
        (Method::DELETE, format!("/api/v1/teams/{everyone}")),
    ] {
        let (status, v) = owner.call(method, &path, None).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (409, Some("everyone_team")),
            "{path}: {v}"
        );
    }
}

/// Takes a stopped policy service's store back to the schema and meaning it had
/// before migration 0021, keeping its data: what a store of the version before teams
/// holds (the migration's tables and columns gone, and the capabilities it gives).
fn back_to_before_teams(policy: &mcpguard_e2e::Policy) {
    const SQL: &str = "DROP TABLE gateway_grants; DROP TABLE team_members; DROP TABLE teams;
        ALTER TABLE gateways DROP COLUMN approve_hosts;
        ALTER TABLE hosts DROP COLUMN pending;
        DELETE FROM role_capabilities WHERE capability IN ('oauth.connect', 'teams.manage');
        DELETE FROM _sqlx_migrations WHERE version = 21;";
    match &policy.database_url {
        Some(url) => {
            let database = url.rsplit('/').next().unwrap();
            mcpguard_e2e::db::Postgres::shared()
                .psql(database, SQL)
                .unwrap();
        }
        None => {
            let db = rusqlite::Connection::open(policy.data_dir.join("mcpguard.db")).unwrap();
            db.execute_batch(SQL).unwrap();
        }
    }
}

#[tokio::test]
async fn a_store_from_before_teams_keeps_working_after_the_upgrade() {
    let mut stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    owner.person("alice", PASSWORD).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Old app").await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let access = s(&tokens, "access_token").to_owned();

    // The store as the version before teams left it; then the new version starts.
    stack.policy.proc.kill();
    back_to_before_teams(&stack.policy);
    let log_dir = stack.dir.path().to_path_buf();
    stack.policy.restart(&log_dir).await;

    // The token and the OAuth connection made before work, and the owner may connect
    // and manage teams.
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);
    let (_, me) = owner.get("/api/v1/me").await;
    for cap in ["oauth.connect", "teams.manage"] {
        assert!(
            me["capabilities"].as_array().unwrap().contains(&json!(cap)),
            "{me}"
        );
    }
    // Alice's role was given oauth.connect: she connects a new app, to the gateway
    // `everyone` was granted.
    let again = RawClient::register(&stack.policy.public_url(), "New app").await;
    let tokens = again.sign_in(&url, "alice", PASSWORD).await;
    assert_eq!(
        initialize_with(&url, Some(s(&tokens, "access_token")))
            .await
            .status,
        200
    );
    let (_, granted) = owner
        .get(&format!("/api/v1/gateways/{}/teams", p.gateway_id))
        .await;
    assert_eq!(granted.as_array().unwrap().len(), 1, "{granted}");
    assert_eq!(granted[0]["everyone"], true, "{granted}");
    let (_, hosts) = owner.get("/api/v1/hosts").await;
    assert!(
        hosts
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["pending"] == false),
        "{hosts}"
    );
}
