//! The console's people and credentials pages in a real headless Chromium, against the
//! real stack: roles with their capabilities, users, identities (metadata only, with
//! their break-glass toggle holding on the next request through Envoy), personal admin
//! tokens (shown once, revoked), enrollments (the link shown once, the user's own
//! consent in their browser, the per-user token claimed) and OAuth signing-key rotation.

use mcpguard_e2e::Stack;
use mcpguard_e2e::browser::Browser;
use mcpguard_e2e::mcp::{call_text, connect, expect_refusal, initialize_with};
use serde_json::{Value, json};

use crate::console::{OWNER_PASSWORD, set_password, sign_in};

/// The page's whole HTML (hidden inputs included): where a secret must never be.
async fn source(browser: &Browser) -> String {
    browser.client.source().await.unwrap()
}

/// `GET /api/v1/me` with an admin token: the status.
async fn me_with(base: &str, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn roles_users_identities_and_admin_tokens_are_managed_in_the_console() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    admin
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    // A role, with capabilities picked from checkboxes; the implied reads come with it.
    browser.goto(&format!("{base}/console/people")).await;
    browser.fill("#role-name", "auditor").await;
    for cap in ["audit.read", "hosts.toggle"] {
        browser
            .find(&format!("fieldset.caps input[value='{cap}']"))
            .await
            .click()
            .await
            .unwrap();
    }
    browser.click_labelled("main", "Create role").await;
    let row = browser
        .client
        .find(fantoccini::Locator::XPath(
            "//table//tr[td[1][normalize-space()='auditor']]",
        ))
        .await
        .expect("the role is listed")
        .text()
        .await
        .unwrap();
    for cap in ["audit.read", "hosts.toggle", "hosts.read"] {
        assert!(row.contains(cap), "{cap} in {row}");
    }
    assert!(!row.contains("users.manage"), "{row}");
    let (_, roles) = admin.get("/api/v1/roles").await;
    let auditor = roles
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "auditor")
        .expect("made through the API");
    let auditor_id = auditor["id"].as_i64().unwrap();

    // A user with that role.
    browser.fill("#user-name", "alice").await;
    browser
        .find("#user-role")
        .await
        .select_by_value(&auditor_id.to_string())
        .await
        .unwrap();
    browser.click_labelled("main", "Add user").await;
    assert!(browser.page_text().await.contains("Created."));
    browser.screenshot("30-people-roles").await;
    let (_, users) = admin.get("/api/v1/users").await;
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .expect("alice exists");
    assert_eq!(alice["role_id"], auditor_id);
    let alice_id = alice["id"].as_i64().unwrap();

    // Her identity for the per-user server: saved, then only its metadata shown.
    browser
        .goto(&format!("{base}/console/people/{alice_id}"))
        .await;
    browser
        .fill("#identity-token", "alice-downstream-secret")
        .await;
    browser.click_labelled("main", "Save identity").await;
    let page = browser.page_text().await;
    assert!(page.contains("Saved."), "{page}");
    assert!(
        !source(&browser).await.contains("alice-downstream-secret"),
        "never shown back"
    );
    let identity_row = browser
        .client
        .find(fantoccini::Locator::XPath(
            "//tr[td[1][normalize-space()='Server demo']]",
        ))
        .await
        .expect("the identity is listed")
        .text()
        .await
        .unwrap();
    assert!(
        identity_row.to_lowercase().contains("authorization") && identity_row.contains("enabled"),
        "{identity_row}"
    );
    browser.screenshot("31-person-identity").await;

    // Her token on the gateway reaches the server as her; disabling her identity in
    // the console asks first, then refuses her next request, and enabling restores it.
    let token = admin.user_token(p.host_id, p.gateway_id, alice_id).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let agent = connect(&url, Some(&token)).await.expect("alice's token");
    assert_eq!(
        call_text(&agent, "whoami", json!({})).await.unwrap(),
        "Bearer alice-downstream-secret"
    );
    browser
        .goto(&format!("{base}/console/people/{alice_id}"))
        .await;
    browser
        .click_xpath(
            "//tr[td[1][normalize-space()='Server demo']]//button[normalize-space()='Disable']",
        )
        .await;
    let confirm = browser.page_text().await;
    assert!(
        confirm.contains("Disable alice's identity for Server demo?"),
        "{confirm}"
    );
    assert_eq!(
        initialize_with(&url, Some(&token)).await.status,
        200,
        "nothing happens before the confirmation"
    );
    browser.click_labelled("main", "Yes, disable").await;
    let page = browser.page_text().await;
    assert!(
        page.contains("Disabled. This holds from the next request."),
        "{page}"
    );
    expect_refusal(&url, Some(&token), (403, "identity_disabled")).await;
    browser.screenshot("32-identity-disabled").await;
    browser
        .click_xpath(
            "//tr[td[1][normalize-space()='Server demo']]//button[normalize-space()='Enable']",
        )
        .await;
    browser.click_labelled("main", "Yes, enable").await;
    assert_eq!(initialize_with(&url, Some(&token)).await.status, 200);

    // A personal admin token for her: shown once, works with her role, revoked in the
    // console, refused on the next call.
    browser
        .goto(&format!("{base}/console/people/{alice_id}"))
        .await;
    browser.click_labelled("main", "Create admin token").await;
    let admin_token = browser.text("#secret").await;
    assert!(admin_token.starts_with("mcpga_"), "{admin_token}");
    assert!(browser.page_text().await.contains("Shown once."));
    browser.screenshot("33-admin-token-shown-once").await;
    let (status, me) = me_with(&base, &admin_token).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"]["name"], "alice", "{me}");
    browser.click_labelled("main", "Done").await;
    let page = browser.page_text().await;
    assert!(
        page.contains(&admin_token[..14]) && !source(&browser).await.contains(&admin_token),
        "{page}"
    );
    browser
        .click_xpath(&format!(
            "//tr[contains(., '{}')]//button[normalize-space()='Revoke']",
            &admin_token[..14]
        ))
        .await;
    browser.click_labelled("main", "Yes, remove").await;
    assert_eq!(me_with(&base, &admin_token).await.0, 401);
    let page = browser.page_text().await;
    assert!(page.contains("revoked"), "{page}");
}

#[tokio::test]
async fn an_enrollment_link_is_shown_once_and_the_users_consent_yields_their_token() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let bob = admin.end_users(&["bob"]).await[0];
    set_password(&stack, bob, "bob's own password").await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    browser
        .goto(&format!("{base}/console/hosts/{}", p.host_id))
        .await;
    browser
        .find("#enroll-user")
        .await
        .select_by_value(&bob.to_string())
        .await
        .unwrap();
    browser
        .click_labelled("main", "Create enrollment link")
        .await;
    let link = browser.text("#secret").await;
    assert!(link.starts_with(&format!("{base}/enroll/")), "{link}");
    assert!(browser.page_text().await.contains("Shown once."));
    let download = browser
        .find("a[download='enrollment-link.txt']")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(download.starts_with("data:text/plain"), "{download}");
    browser.screenshot("34-enrollment-link-shown-once").await;
    browser.click_labelled("main", "Done").await;
    let code = link.rsplit('/').next().unwrap();
    assert!(
        !source(&browser).await.contains(code),
        "the link is never shown again"
    );
    let row = browser.text("main section:last-of-type table tbody").await;
    assert!(row.contains("bob") && row.contains("pending"), "{row}");
    let claims = browser
        .client
        .find_all(fantoccini::Locator::XPath(
            "//button[normalize-space()='Claim per-user token']",
        ))
        .await
        .unwrap();
    assert!(claims.is_empty(), "nothing to claim before bob consents");

    // Bob opens the link in his own browser and allows it with his password.
    let bobs = Browser::start(stack.dir.path()).await;
    bobs.goto(&link).await;
    bobs.fill("input[name=username]", "bob").await;
    bobs.fill("input[name=password]", "bob's own password")
        .await;
    bobs.click("form button[type=submit]").await;
    let page = bobs.page_text().await;
    assert!(!page.contains("Wrong"), "{page}");

    // Completed: the agent's per-user token for bob, claimed in the console, shown once.
    browser
        .goto(&format!("{base}/console/hosts/{}", p.host_id))
        .await;
    let row = browser.text("main section:last-of-type table tbody").await;
    assert!(row.contains("completed"), "{row}");
    browser
        .click_labelled("main section:last-of-type table", "Claim per-user token")
        .await;
    let token = browser.text("#secret").await;
    assert!(token.starts_with("mcpgu_"), "{token}");
    let url = stack.envoy.mcp_url("eng", "demo");
    assert_eq!(initialize_with(&url, Some(&token)).await.status, 200);
    browser.click_labelled("main", "Done").await;
    let row = browser.text("main section:last-of-type table tbody").await;
    assert!(row.contains("claimed"), "{row}");
    let (_, tokens) = admin
        .get(&format!("/api/v1/hosts/{}/tokens", p.host_id))
        .await;
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["user_id"] == bob),
        "{tokens}"
    );
}

#[tokio::test]
async fn signing_keys_rotate_after_a_confirmation() {
    let stack = Stack::start().await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let admin = stack.admin();
    let kid = |keys: &Value, state: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["state"] == state)
            .and_then(|k| k["kid"].as_str())
            .unwrap()
            .to_owned()
    };
    let (_, before) = admin.get("/api/v1/oauth/signing-keys").await;
    let (active, next) = (kid(&before, "active"), kid(&before, "next"));
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;
    browser.goto(&format!("{base}/console/keys")).await;
    let table = browser.text("main table").await;
    assert!(table.contains(&active) && table.contains(&next), "{table}");
    browser.click_labelled("main", "Rotate signing keys").await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Rotate the OAuth signing keys?")
    );
    let (_, unchanged) = admin.get("/api/v1/oauth/signing-keys").await;
    assert_eq!(unchanged, before, "nothing before the confirmation");
    browser.click_labelled("main", "Yes, rotate").await;
    assert!(browser.page_text().await.contains("Rotated."));
    let (_, after) = admin.get("/api/v1/oauth/signing-keys").await;
    assert_eq!(kid(&after, "active"), next, "the next key signs now");
    assert_eq!(kid(&after, "retired"), active);
    let row = browser
        .client
        .find(fantoccini::Locator::XPath(&format!(
            "//tr[contains(., '{active}')]"
        )))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(row.contains("retired"), "{row}");
    browser.screenshot("35-signing-keys-rotated").await;
}

/// A forged post: method, path, body fields, and the capability its refusal names.
type Forged = (
    &'static str,
    String,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

/// Admin API state a forged post could have changed, to compare before and after.
async fn state_of(stack: &Stack) -> Vec<Value> {
    let admin = stack.admin();
    let mut all = Vec::new();
    for path in [
        "/api/v1/roles",
        "/api/v1/users",
        "/api/v1/servers",
        "/api/v1/gateways",
        "/api/v1/teams",
        "/api/v1/oauth/signing-keys",
        "/api/v1/users/1/identities",
        "/api/v1/users/1/admin-tokens",
    ] {
        let (status, v) = admin.get(path).await;
        assert_eq!(status, 200, "{path}: {v}");
        all.push(v);
    }
    all
}

#[tokio::test]
async fn a_reader_sees_no_control_on_any_page_and_every_forged_post_is_refused() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let identity = admin.make_per_user(&p, "owner-downstream").await;
    let (status, role) = admin
        .post(
            "/api/v1/roles",
            json!({"name": "reader", "capabilities": [
                "hosts.read", "gateways.read", "servers.read", "users.read",
                "connections.read", "audit.read"
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (status, reader) = admin
        .post(
            "/api/v1/users",
            json!({"name": "reader", "role_id": role["id"]}),
        )
        .await;
    assert_eq!(status, 201, "{reader}");
    set_password(&stack, reader["id"].as_i64().unwrap(), "reader password 1").await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "reader", "reader password 1").await;

    // Every page reads fine, and holds no form that would change anything.
    let g = p.gateway_id;
    for path in [
        "/console".to_owned(),
        "/console/hosts".to_owned(),
        format!("/console/hosts/{}", p.host_id),
        "/console/gateways".to_owned(),
        format!("/console/gateways/{g}"),
        format!("/console/gateways/{g}/servers/{}", p.server_id),
        "/console/servers".to_owned(),
        "/console/people".to_owned(),
        "/console/people/1".to_owned(),
        "/console/teams".to_owned(),
        "/console/keys".to_owned(),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        let acts = browser
            .client
            .find_all(fantoccini::Locator::Css("main form[action='/console/act']"))
            .await
            .unwrap();
        assert!(
            acts.is_empty(),
            "{path}: no control without its capability:\n{}",
            browser.page_text().await
        );
        assert!(!browser.page_text().await.contains("Not done"), "{path}");
    }
    browser.goto(&format!("{base}/console/people/1")).await;
    browser.screenshot("36-reader-sees-no-control").await;

    // Forged posts with the reader's own session and CSRF token: each 403, and the
    // admin state is the same after as before.
    let session = browser
        .cookie("mcpguard_console")
        .await
        .unwrap()
        .value()
        .to_owned();
    let csrf = browser
        .find("header.top input[name=csrf]")
        .await
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let before = state_of(&stack).await;
    let s = p.server_id;
    let forged: Vec<Forged> = vec![
        (
            "POST",
            format!("/api/v1/identities/{identity}/disable"),
            vec![],
            "identities.toggle",
        ),
        (
            "POST",
            "/api/v1/oauth/signing-keys/rotate".into(),
            vec![],
            "users.manage",
        ),
        (
            "POST",
            "/api/v1/roles".into(),
            vec![("name", "sneaky"), ("capabilities[]", "users.manage")],
            "users.manage",
        ),
        (
            "POST",
            "/api/v1/users/1/admin-tokens".into(),
            vec![],
            "users.manage",
        ),
        (
            "POST",
            format!("/api/v1/servers/{s}/disable"),
            vec![],
            "servers.toggle",
        ),
        (
            "POST",
            format!("/api/v1/gateways/{g}/disable"),
            vec![],
            "gateways.toggle",
        ),
        (
            "PUT",
            format!("/api/v1/gateways/{g}/servers/{s}/features/tools"),
            vec![("mode", "block_all")],
            "features.manage",
        ),
        (
            "POST",
            "/api/v1/teams".into(),
            vec![("name", "sneaky")],
            "teams.manage",
        ),
        (
            "PUT",
            format!("/api/v1/users/1/identities/{s}"),
            vec![("credential.type", "bearer"), ("credential.token", "x")],
            "users.manage",
        ),
    ];
    for (method, path, fields, cap) in &forged {
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("_method", *method),
            ("_path", path.as_str()),
            ("_back", "/console"),
            ("_confirm", "yes"),
        ];
        form.extend(fields.iter().copied());
        let (status, body) = crate::console::post_act(&base, Some(&session), &form).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains(cap), "{method} {path} names {cap}: {body}");
        assert!(body.contains("Nothing was changed."), "{body}");
    }
    assert_eq!(state_of(&stack).await, before, "nothing changed");
    let url = stack.envoy.mcp_url("eng", "demo");
    assert_eq!(
        initialize_with(&url, Some(&p.token)).await.status,
        200,
        "the data plane too"
    );
}
