//! The console's gateway pages in a real headless Chromium, against the real stack:
//! exposing a server with a shared credential (sent upstream, never shown back), feature
//! provisioning (modes, the live items with first and last seen, the allowlist, a
//! changed item allowed again), teams (members, grants), and every break-glass toggle
//! confirmed first and holding on the next request through Envoy.

use mcpguard_e2e::Stack;
use mcpguard_e2e::browser::Browser;
use mcpguard_e2e::mcp::{call_text, connect, expect_refusal, initialize_with};
use serde_json::{Value, json};

use crate::console::{OWNER_PASSWORD, set_password, sign_in};
use crate::provisioning::put_upstream_tool;

/// The text of the row of `section`'s table whose name cell is `name`.
async fn row(browser: &Browser, section: &str, name: &str) -> String {
    browser
        .client
        .find(fantoccini::Locator::XPath(&format!(
            "//section[@id='{section}']//tr[td//code[normalize-space()='{name}']]"
        )))
        .await
        .unwrap_or_else(|e| panic!("no {name} in {section}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn status_of(stack: &Stack, g: i64, s: i64, kind: &str, name: &str) -> String {
    let (status, p) = stack
        .admin()
        .get(&format!("/api/v1/gateways/{g}/servers/{s}/features"))
        .await;
    assert_eq!(status, 200, "{p}");
    p[kind]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .map(|i| i["status"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {p}"))
}

#[tokio::test]
async fn a_server_is_exposed_with_a_shared_credential_and_its_features_provisioned() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let g = admin.gateway("eng").await;
    let s = admin.server("demo", &stack.demo.upstream_url()).await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    // Expose, shared, with a service credential: sealed, and only its header shown.
    browser.goto(&format!("{base}/console/gateways/{g}")).await;
    browser
        .find("#expose-cred-type")
        .await
        .select_by_value("bearer")
        .await
        .unwrap();
    browser.fill("#expose-cred-token", "service-secret-1").await;
    browser.click_labelled("main", "Expose").await;
    let page = browser.page_text().await;
    assert!(
        page.contains("Saved.") && page.contains("sends authorization"),
        "{page}"
    );
    assert!(
        !browser
            .client
            .source()
            .await
            .unwrap()
            .contains("service-secret-1"),
        "never shown back"
    );
    browser.screenshot("40-gateway-shared-credential").await;
    let host = admin.host("Agent").await;
    let token = admin.token(host, g).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = stack.envoy.mcp_url("eng", "demo");
    let agent = connect(&url, Some(&token)).await.expect("the token works");
    assert_eq!(
        call_text(&agent, "whoami", json!({})).await.unwrap(),
        "Bearer service-secret-1",
        "the upstream gets the service credential, not the agent's token"
    );

    // Feature provisioning: the live lists, fetched now, with first and last seen.
    browser
        .click_labelled("main table", "Tools, prompts, resources")
        .await;
    browser.click_labelled("main", "Refresh now").await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Refreshed from the upstream.")
    );
    let echo = row(&browser, "tools", "echo").await;
    assert!(echo.contains("offered"), "{echo}");
    let first_seen = browser
        .find("section#tools tr[data-name=echo] td:nth-child(4) time")
        .await
        .attr("datetime")
        .await
        .unwrap();
    assert!(first_seen.is_some(), "first seen is shown");

    // allow_selected with an empty allowlist: every tool is off on the next request.
    browser
        .find("#mode-tools")
        .await
        .select_by_value("allow_selected")
        .await
        .unwrap();
    browser.click_labelled("section#tools", "Set mode").await;
    assert!(browser.page_text().await.contains("Saved."));
    assert_eq!(
        status_of(&stack, g, s, "tools", "echo").await,
        "not_selected"
    );
    assert!(
        call_text(&agent, "echo", json!({"text": "x"}))
            .await
            .is_err(),
        "blocked"
    );
    // Pick echo on the allowlist: offered on the next request.
    browser
        .find("section#tools input[value=echo]")
        .await
        .click()
        .await
        .unwrap();
    browser
        .click_labelled("section#tools", "Save the allowlist of tools")
        .await;
    assert!(row(&browser, "tools", "echo").await.contains("offered"));
    assert_eq!(
        call_text(&agent, "echo", json!({"text": "back"}))
            .await
            .unwrap(),
        "back"
    );

    // A new tool upstream: not selected until allowed; then its definition changes,
    // which blocks it until it is allowed again.
    put_upstream_tool(&stack.demo, "fresh", "Echo, freshly added").await;
    browser.click_labelled("main", "Refresh now").await;
    let fresh = row(&browser, "tools", "fresh").await;
    assert!(fresh.contains("not selected"), "{fresh}");
    browser
        .click_xpath(
            "//section[@id='tools']//tr[@data-name='fresh']//button[normalize-space()='Allow']",
        )
        .await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Allowed. This holds from the next request.")
    );
    assert_eq!(status_of(&stack, g, s, "tools", "fresh").await, "offered");
    let agent = connect(&url, Some(&token)).await.unwrap();
    assert_eq!(
        call_text(&agent, "fresh", json!({"text": "y"}))
            .await
            .unwrap(),
        "y"
    );
    put_upstream_tool(&stack.demo, "fresh", "Now also reads your files").await;
    browser.click_labelled("main", "Refresh now").await;
    let fresh = row(&browser, "tools", "fresh").await;
    assert!(fresh.contains("changed: blocked"), "{fresh}");
    assert!(fresh.contains("Now also reads your files"), "{fresh}");
    browser.screenshot("41-features-changed-item").await;
    assert!(
        call_text(&agent, "fresh", json!({"text": "z"}))
            .await
            .is_err(),
        "a changed tool is blocked"
    );
    browser
        .click_xpath("//section[@id='tools']//tr[@data-name='fresh']//button[normalize-space()='Allow again']")
        .await;
    assert_eq!(status_of(&stack, g, s, "tools", "fresh").await, "offered");
    assert_eq!(
        call_text(&agent, "fresh", json!({"text": "z"}))
            .await
            .unwrap(),
        "z"
    );

    // block_all for prompts.
    browser
        .find("#mode-prompts")
        .await
        .select_by_value("block_all")
        .await
        .unwrap();
    browser.click_labelled("section#prompts", "Set mode").await;
    let (_, p) = admin
        .get(&format!("/api/v1/gateways/{g}/servers/{s}/features"))
        .await;
    assert_eq!(p["modes"]["prompts"], "block_all", "{p}");
    assert_eq!(p["modes"]["tools"], "allow_selected", "{p}");
    browser.screenshot("42-features").await;
}

fn team_id(teams: &Value, name: &str) -> i64 {
    teams
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["id"].as_i64())
        .unwrap_or_else(|| panic!("no team {name} in {teams}"))
}

#[tokio::test]
async fn teams_members_and_grants_are_managed_in_the_console_and_hold_on_the_next_request() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let bob = admin.end_users(&["bob"]).await[0];
    let bob_token = admin.user_token(p.host_id, p.gateway_id, bob).await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let url = stack.envoy.mcp_url("eng", "demo");
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    browser.goto(&format!("{base}/console/teams")).await;
    browser.fill("#team-name", "Support").await;
    browser.click_labelled("main", "Create team").await;
    assert!(browser.page_text().await.contains("Created."));
    let (_, teams) = admin.get("/api/v1/teams").await;
    let (support, everyone) = (team_id(&teams, "Support"), team_id(&teams, "everyone"));
    browser
        .find(&format!("#member-{support}"))
        .await
        .select_by_label("bob")
        .await
        .unwrap();
    browser
        .click_labelled(&format!("#team-{support}"), "Add member")
        .await;
    browser
        .find(&format!("#grant-{support}"))
        .await
        .select_by_label("Gateway eng")
        .await
        .unwrap();
    browser
        .click_labelled(&format!("#team-{support}"), "Grant gateway")
        .await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Granted. This holds from the next request.")
    );
    let card = browser.text(&format!("#team-{support}")).await;
    assert!(
        card.contains("bob") && card.contains("Gateway eng"),
        "{card}"
    );
    let (_, teams) = admin.get("/api/v1/teams").await;
    let t = teams
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == support)
        .unwrap();
    assert_eq!(t["members"], json!([bob]), "{t}");
    assert_eq!(t["gateways"], json!([p.gateway_id]), "{t}");

    // Take the gateway away from everyone: the owner's connection is refused on the
    // next request, bob's holds through Support.
    browser
        .click_labelled(&format!("#team-{everyone}"), "Take away")
        .await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Remove the gateway Gateway eng from the team everyone?")
    );
    browser.click_labelled("main", "Yes, remove").await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Removed. This holds from the next request.")
    );
    expect_refusal(&url, Some(&p.token), (403, "gateway_not_granted")).await;
    assert_eq!(initialize_with(&url, Some(&bob_token)).await.status, 200);
    // The owner's connection flow for that gateway says so, and offers no token.
    browser
        .goto(&format!(
            "{base}/console/hosts/{}/connect?gateway_id={}",
            p.host_id, p.gateway_id
        ))
        .await;
    let page = browser.page_text().await;
    assert!(
        page.contains("None of your teams is granted this gateway"),
        "{page}"
    );
    assert!(
        browser
            .client
            .find_all(fantoccini::Locator::XPath(
                "//button[normalize-space()='Generate token']"
            ))
            .await
            .unwrap()
            .is_empty(),
        "{page}"
    );
    browser.goto(&format!("{base}/console/teams")).await;
    browser.screenshot("43-teams").await;
    browser
        .goto(&format!("{base}/console/gateways/{}", p.gateway_id))
        .await;
    let page = browser.page_text().await;
    assert!(page.contains("Granted to the teams: Support"), "{page}");
    // Headed apps new to the gateway can be made to wait for approval.
    browser
        .click_labelled("main", "Require approval of new apps")
        .await;
    assert!(
        browser
            .page_text()
            .await
            .contains("waits for an admin's approval")
    );
    let (_, gateways) = admin.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["approve_hosts"], true, "{gateways}");

    // Bob out of Support: refused from his next request.
    browser.goto(&format!("{base}/console/teams")).await;
    browser
        .click_labelled(&format!("#team-{support}"), "Remove")
        .await;
    browser.click_labelled("main", "Yes, remove").await;
    expect_refusal(&url, Some(&bob_token), (403, "gateway_not_granted")).await;

    // Deleting the team asks first, too.
    browser
        .click_labelled(&format!("#team-{support}"), "Delete team")
        .await;
    browser.click_labelled("main", "Yes, remove").await;
    let (_, teams) = admin.get("/api/v1/teams").await;
    assert_eq!(teams.as_array().unwrap().len(), 1, "{teams}");
}

#[tokio::test]
async fn every_break_glass_toggle_asks_first_and_holds_on_the_next_request() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let bob = admin.end_users(&["bob"]).await[0];
    let bob_token = admin.user_token(p.host_id, p.gateway_id, bob).await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let url = stack.envoy.mcp_url("eng", "demo");
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    let g = p.gateway_id;
    // (page, the row's xpath, whose token, the refusal)
    let cases = [
        (
            "/console/servers".to_owned(),
            "//tr[td[1][normalize-space()='Server demo']]",
            &p.token,
            "server_disabled",
        ),
        (
            "/console/gateways".to_owned(),
            "//tr[td[1][normalize-space()='Gateway eng']]",
            &p.token,
            "gateway_disabled",
        ),
        (
            format!("/console/gateways/{g}"),
            "//section[h2[@id='connections']]//tr[td[2][normalize-space()='bob']]",
            &bob_token,
            "connection_disabled",
        ),
        (
            "/console/people".to_owned(),
            "//tr[td[1][normalize-space()='bob']]",
            &bob_token,
            "user_disabled",
        ),
        (
            "/console/hosts".to_owned(),
            "//tr[td[1][normalize-space()='Agent for eng']]",
            &p.token,
            "host_disabled",
        ),
    ];
    for (page, row, token, code) in &cases {
        browser.goto(&format!("{base}{page}")).await;
        browser
            .click_xpath(&format!("{row}//button[normalize-space()='Disable']"))
            .await;
        let confirm = browser.page_text().await;
        assert!(
            confirm.contains("refused from the next request on"),
            "{page}: {confirm}"
        );
        assert_eq!(
            initialize_with(&url, Some(token)).await.status,
            200,
            "{page}: nothing before the confirmation"
        );
        browser.click_labelled("main", "Yes, disable").await;
        assert!(
            browser
                .page_text()
                .await
                .contains("Disabled. This holds from the next request."),
            "{page}"
        );
        let state = browser
            .client
            .find(fantoccini::Locator::XPath(row))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(state.contains("disabled"), "{page}: {state}");
        expect_refusal(&url, Some(token), (403, code)).await;
        browser
            .click_xpath(&format!("{row}//button[normalize-space()='Enable']"))
            .await;
        browser.click_labelled("main", "Yes, enable").await;
        assert_eq!(
            initialize_with(&url, Some(token)).await.status,
            200,
            "{page}: enabled again"
        );
    }
    browser.goto(&format!("{base}/console/gateways/{g}")).await;
    browser.screenshot("44-gateway-connections").await;
}

#[tokio::test]
async fn a_new_headed_app_waits_until_approved_in_the_console() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let g = admin.gateway("eng").await;
    let s = admin.server("demo", &stack.demo.upstream_url()).await;
    admin.expose(g, s).await;
    admin.person("alice", mcpguard_e2e::oauth::PASSWORD).await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let url = stack.envoy.mcp_url("eng", "demo");
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    browser.goto(&format!("{base}/console/gateways/{g}")).await;
    browser
        .click_labelled("main", "Require approval of new apps")
        .await;
    let (_, gateways) = admin.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["approve_hosts"], true, "{gateways}");

    // Alice connects a new app by OAuth: it has tokens, but waits.
    let client = mcpguard_e2e::oauth::RawClient::register(&base, "New app").await;
    let tokens = client
        .sign_in(&url, "alice", mcpguard_e2e::oauth::PASSWORD)
        .await;
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    expect_refusal(&url, Some(&access), (403, "host_pending")).await;

    // Apps & Agents shows it pending, with Approve; approving lets it in at once.
    browser.goto(&format!("{base}/console/hosts")).await;
    let row = "//tr[td[1][normalize-space()='New app']]";
    let text = browser
        .client
        .find(fantoccini::Locator::XPath(row))
        .await
        .expect("the app is listed")
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("headed (OAuth)") && text.contains("pending approval"),
        "{text}"
    );
    browser.screenshot("45-host-pending-approval").await;
    browser
        .click_xpath(&format!("{row}//button[normalize-space()='Approve']"))
        .await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Allowed. This holds from the next request.")
    );
    assert_eq!(initialize_with(&url, Some(&access)).await.status, 200);
    let text = browser
        .client
        .find(fantoccini::Locator::XPath(row))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("pending"), "{text}");
}
