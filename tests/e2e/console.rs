//! The admin console in a real headless Chromium (WebDriver), against the real stack:
//! an admin signs in, creates an agent's host, generates its token and reads it off the
//! page, the agent uses it through Envoy with the MCP SDK client, the admin disables
//! the host in the console and the agent's next request is refused, and the refusal is
//! in the audit page. A user without the capability sees no toggle, and forged or
//! CSRF-less posts change nothing. Screenshots: `target/console-screenshots/`.

use std::time::{Duration, Instant};

use mcpguard_e2e::Stack;
use mcpguard_e2e::browser::Browser;
use mcpguard_e2e::mcp::{call_text, connect, expect_refusal, initialize_with};
use reqwest::Method;
use serde_json::json;

pub const OWNER_PASSWORD: &str = "correct horse battery";

pub async fn set_password(stack: &Stack, user_id: i64, password: &str) {
    let (status, body) = stack
        .admin()
        .call(
            Method::PUT,
            &format!("/api/v1/users/{user_id}/password"),
            Some(json!({"password": password})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
}

pub async fn sign_in(browser: &Browser, base: &str, user: &str, password: &str) {
    browser.goto(&format!("{base}/console/login")).await;
    browser.fill("#username", user).await;
    browser.fill("#password", password).await;
    browser.click("form.stack button[type=submit]").await;
    assert!(
        browser.text("header.top .who").await.contains(user),
        "signed in as {user}: {}",
        browser.page_text().await
    );
}

/// Reloads `url` until its text contains `needle` (the audit writer batches every
/// 200 ms), at most 10 s.
pub async fn until_page_shows(browser: &Browser, url: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        browser.goto(url).await;
        let text = browser.page_text().await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never showed {needle:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn host_id_in(url: &str) -> i64 {
    url.rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no host id in {url}"))
}

#[tokio::test]
async fn an_admin_issues_an_agents_token_in_the_console_and_cuts_it_off() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let gateway_id = admin.gateway("eng").await;
    let server_id = admin.server("demo", &stack.demo.upstream_url()).await;
    admin.expose(gateway_id, server_id).await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;

    browser.goto(&format!("{base}/console")).await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/console/login"),
        "not signed in: sent to sign-in"
    );
    browser.screenshot("01-sign-in").await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;
    let overview = browser.page_text().await;
    assert!(
        overview.contains(&stack.envoy.mcp_url("eng", "demo"))
            || overview.contains("/mcp/eng/demo"),
        "{overview}"
    );
    browser.screenshot("02-overview").await;

    // Apps & Agents: create the agent's host.
    browser.click("nav a[href='/console/hosts']").await;
    browser.fill("#host-name", "Feedback bot").await;
    browser.click_labelled("section.card", "Create host").await;
    assert!(browser.page_text().await.contains("Created."));
    browser.screenshot("03-apps-and-agents").await;
    let link = browser
        .client
        .find(fantoccini::Locator::XPath(
            "//a[normalize-space()='Feedback bot']",
        ))
        .await
        .expect("the new host is listed");
    link.click().await.unwrap();
    browser.find("#token-gateway").await;
    let host_id = host_id_in(browser.client.current_url().await.unwrap().as_str());

    // Generate a token for the gateway through the connection flow: confirm the
    // gateway (its one server is shared: nothing to bring), then the token, shown
    // once, with Copy and Download.
    browser.click_labelled("section.card", "Continue").await;
    let confirm = browser.page_text().await;
    assert!(
        confirm.contains("Connect Feedback bot to Gateway eng")
            && confirm.contains("nothing to bring (shared)")
            && confirm.contains("Nothing to bring"),
        "{confirm}"
    );
    browser.screenshot("03b-connect-confirm-gateway").await;
    browser
        .click_labelled("ol.steps > li:last-child", "Generate token")
        .await;
    let token = browser.text("#secret").await;
    assert!(token.starts_with("mcpgt_"), "{token}");
    let page = browser.page_text().await;
    assert!(page.contains("Shown once."), "{page}");
    let download = browser.find("a[download='token.txt']").await;
    let href = download.attr("href").await.unwrap().unwrap();
    assert!(
        href.ends_with(&token),
        "the download holds the token: {href}"
    );
    browser.find("button[data-copy=secret]").await;
    browser.screenshot("04-token-shown-once").await;

    // The agent connects through Envoy with it, as any MCP client would.
    let url = stack.envoy.mcp_url("eng", "demo");
    let agent = connect(&url, Some(&token)).await.expect("the token works");
    assert_eq!(
        call_text(&agent, "echo", json!({"text": "hi"}))
            .await
            .unwrap(),
        "hi"
    );

    // The host page lists the token (prefix, never the secret) and its state.
    browser.click_labelled("main", "Done").await;
    let page = browser.page_text().await;
    assert!(
        page.contains(&token[..14]) && !page.contains(&token),
        "{page}"
    );

    // Rotation: a new token for the same connection; both work until the old one is
    // revoked, which stops it on the next request and leaves the new one alone.
    browser.click_labelled("main table", "Rotate").await;
    let rotated = browser.text("#secret").await;
    assert!(
        rotated.starts_with("mcpgt_") && rotated != token,
        "{rotated}"
    );
    browser.click_labelled("main", "Done").await;
    assert_eq!(initialize_with(&url, Some(&token)).await.status, 200);
    assert_eq!(initialize_with(&url, Some(&rotated)).await.status, 200);
    browser
        .click_xpath(&format!(
            "//tr[contains(., '{}')]//button[normalize-space()='Revoke']",
            &token[..14]
        ))
        .await;
    browser.click_labelled("main", "Yes, remove").await;
    assert!(browser.page_text().await.contains("Revoked."));
    expect_refusal(&url, Some(&token), (401, "token_revoked")).await;
    let token = rotated;
    let agent = connect(&url, Some(&token))
        .await
        .expect("the new token works");

    // Break-glass: Disable asks first, then holds from the next request.
    browser.click_labelled("main > div.state", "Disable").await;
    assert!(
        browser
            .page_text()
            .await
            .contains("Disable the host Feedback bot?")
    );
    browser.screenshot("05-confirm-disable").await;
    browser.click_labelled("main", "Yes, disable").await;
    let page = browser.page_text().await;
    assert!(
        page.contains("Disabled. This holds from the next request."),
        "{page}"
    );
    assert!(
        browser
            .text("main > div.state .badge.off")
            .await
            .contains("disabled")
    );
    browser.screenshot("06-host-disabled").await;
    expect_refusal(&url, Some(&token), (403, "host_disabled")).await;
    assert!(
        call_text(&agent, "echo", json!({"text": "again"}))
            .await
            .is_err(),
        "the open session is refused too"
    );

    // The refusal, and who disabled the host, are in the audit page.
    let audit = until_page_shows(
        &browser,
        &format!("{base}/console/audit?kind=decision&decision=deny"),
        "host_disabled",
    )
    .await;
    assert!(audit.contains("eng / demo"), "{audit}");
    browser.screenshot("07-audit-refusals").await;
    let admin_log = until_page_shows(
        &browser,
        &format!("{base}/console/audit?kind=admin"),
        "host.disable",
    )
    .await;
    assert!(
        admin_log.contains(&format!("hosts/{host_id}")) || admin_log.contains("host.disable"),
        "{admin_log}"
    );

    // The other pages, for a person to look at.
    for (name, path) in [
        ("08-gateways", "/console/gateways".to_owned()),
        (
            "09-gateway-connections",
            format!("/console/gateways/{gateway_id}"),
        ),
        ("10-servers", "/console/servers".to_owned()),
        ("11-people", "/console/people".to_owned()),
        ("12-person", "/console/people/1".to_owned()),
        ("13-signing-keys", "/console/keys".to_owned()),
        ("14-audit", "/console/audit".to_owned()),
    ] {
        browser.goto(&format!("{base}{path}")).await;
        assert!(!browser.page_text().await.contains("Not done"), "{path}");
        browser.screenshot(name).await;
    }
    let connections = {
        browser
            .goto(&format!("{base}/console/gateways/{gateway_id}"))
            .await;
        browser.text("#connections + p + table").await
    };
    assert!(
        connections.contains("Feedback bot") && connections.contains("owner"),
        "{connections}"
    );

    // Enabling restores access on the next request.
    browser
        .goto(&format!("{base}/console/hosts/{host_id}"))
        .await;
    browser.click_labelled("main > div.state", "Enable").await;
    browser.click_labelled("main", "Yes, enable").await;
    assert_eq!(initialize_with(&url, Some(&token)).await.status, 200);

    // Sign-out ends the session: its cookie opens nothing any more.
    let session = browser
        .cookie("mcpguard_console")
        .await
        .expect("a session cookie");
    browser.click("header.top .signout button").await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/console/login")
    );
    let stale = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/console/hosts"))
        .header("cookie", format!("mcpguard_console={}", session.value()))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 303, "signed out: back to sign-in");
}

#[tokio::test]
async fn a_token_is_shown_only_once_the_user_has_an_identity_for_each_per_user_server() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let gateway_id = admin.gateway("eng").await;
    let shared = admin.server("demo", &stack.demo.upstream_url()).await;
    let per_user = admin.server("tickets", &stack.demo.upstream_url()).await;
    admin.expose(gateway_id, shared).await;
    admin
        .expose_as(gateway_id, per_user, json!({"identity": "per_user"}))
        .await;
    let host_id = admin.host("Support bot").await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "owner", OWNER_PASSWORD).await;

    // Confirm the gateway: the per-user server wants the owner's identity, and there is
    // no token to generate until it is brought.
    browser
        .goto(&format!("{base}/console/hosts/{host_id}"))
        .await;
    browser.click_labelled("section.card", "Continue").await;
    let page = browser.page_text().await;
    assert!(
        page.contains("identity missing") && page.contains("Your bearer token for Server tickets"),
        "{page}"
    );
    let generate = browser
        .client
        .find_all(fantoccini::Locator::XPath(
            "//button[normalize-space()='Generate token']",
        ))
        .await
        .unwrap();
    assert!(generate.is_empty(), "no token before the identity: {page}");
    browser.screenshot("15-connect-identity-missing").await;

    // Bring it: saved sealed, shown as metadata only, and the flow goes on.
    browser
        .fill(&format!("#identity-{per_user}"), "owner-downstream-secret")
        .await;
    browser
        .click_labelled("section.identity", "Save identity")
        .await;
    let page = browser.page_text().await;
    assert!(
        page.contains("Saved.") && page.contains("identity ready"),
        "{page}"
    );
    assert!(
        !browser
            .client
            .source()
            .await
            .unwrap()
            .contains("owner-downstream-secret"),
        "the credential is never shown back"
    );
    browser.screenshot("16-connect-identity-ready").await;
    browser
        .click_labelled("ol.steps > li:last-child", "Generate token")
        .await;
    let token = browser.text("#secret").await;
    assert!(token.starts_with("mcpgt_"), "{token}");
    let page = browser.page_text().await;
    assert!(
        !page.contains("identity_missing"),
        "nothing missing: {page}"
    );

    // The per-user server sees the owner's own credential, the shared one none.
    let tickets = connect(&stack.envoy.mcp_url("eng", "tickets"), Some(&token))
        .await
        .expect("the token works on the per-user server");
    assert_eq!(
        call_text(&tickets, "whoami", json!({})).await.unwrap(),
        "Bearer owner-downstream-secret"
    );
    let demo = connect(&stack.envoy.mcp_url("eng", "demo"), Some(&token))
        .await
        .expect("and on the shared one");
    assert_eq!(call_text(&demo, "whoami", json!({})).await.unwrap(), "none");
}

/// A raw post to `/console/act` with a browser's session cookie.
pub async fn post_act(base: &str, session: Option<&str>, form: &[(&str, &str)]) -> (u16, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut req = client.post(format!("{base}/console/act")).form(form);
    if let Some(s) = session {
        req = req.header("cookie", format!("mcpguard_console={s}"));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn without_the_capability_there_is_no_toggle_and_forged_or_csrf_less_posts_change_nothing() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let (status, role) = admin
        .post(
            "/api/v1/roles",
            json!({"name": "viewer", "capabilities": ["hosts.read"]}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (status, viewer) = admin
        .post(
            "/api/v1/users",
            json!({"name": "viewer", "role_id": role["id"]}),
        )
        .await;
    assert_eq!(status, 201, "{viewer}");
    let viewer_id = viewer["id"].as_i64().unwrap();
    set_password(&stack, viewer_id, "viewer password 1").await;
    set_password(&stack, 1, OWNER_PASSWORD).await;
    let base = stack.policy.public_url();
    let url = stack.envoy.mcp_url("eng", "demo");

    let browser = Browser::start(stack.dir.path()).await;
    sign_in(&browser, &base, "viewer", "viewer password 1").await;
    // The viewer reads hosts, and sees neither toggles nor create forms, nor the areas
    // it may not read.
    browser.goto(&format!("{base}/console/hosts")).await;
    let page = browser.page_text().await;
    assert!(page.contains("Agent for eng"), "{page}");
    let buttons = browser
        .client
        .find_all(fantoccini::Locator::Css("main button"))
        .await
        .unwrap();
    assert!(
        buttons.is_empty(),
        "no control without a capability: {page}"
    );
    let nav = browser.text("header.top nav").await;
    assert!(!nav.contains("Audit") && !nav.contains("People"), "{nav}");
    browser.screenshot("20-viewer-sees-no-toggle").await;

    // A forged post with the viewer's own session and CSRF token: 403, nothing changed.
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
    let disable = format!("/api/v1/hosts/{}/disable", p.host_id);
    let forged = [
        ("csrf", csrf.as_str()),
        ("_method", "POST"),
        ("_path", disable.as_str()),
        ("_back", "/console/hosts"),
        ("_confirm", "yes"),
    ];
    let (status, body) = post_act(&base, Some(&session), &forged).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("hosts.toggle"), "{body}");
    assert_eq!(
        initialize_with(&url, Some(&p.token)).await.status,
        200,
        "still enabled"
    );
    let (_, hosts) = admin.get("/api/v1/hosts").await;
    assert_eq!(hosts[0]["enabled"], true);

    // The owner, who holds the capability, without the CSRF token: 403, nothing changed;
    // with another session's token: the same.
    let owner = Browser::start(stack.dir.path()).await;
    sign_in(&owner, &base, "owner", OWNER_PASSWORD).await;
    let owner_session = owner
        .cookie("mcpguard_console")
        .await
        .unwrap()
        .value()
        .to_owned();
    let no_csrf = &forged[1..];
    let (status, body) = post_act(&base, Some(&owner_session), no_csrf).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = post_act(&base, Some(&owner_session), &forged).await;
    assert_eq!(status, 403, "the viewer's CSRF token is not the owner's");
    // No session at all.
    let (status, _) = post_act(&base, None, &forged).await;
    assert_eq!(status, 401);
    assert_eq!(
        initialize_with(&url, Some(&p.token)).await.status,
        200,
        "still enabled"
    );

    // The same post with the owner's own token goes through: the refusals above were
    // about the token and the capability, not a broken form.
    let owner_csrf = owner
        .find("header.top input[name=csrf]")
        .await
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let mut good = forged;
    good[0].1 = owner_csrf.as_str();
    let (status, _) = post_act(&base, Some(&owner_session), &good).await;
    assert_eq!(status, 303);
    expect_refusal(&url, Some(&p.token), (403, "host_disabled")).await;
}

#[tokio::test]
async fn sessions_are_strict_cookies_the_pages_forbid_inline_script_and_links_work_once() {
    let stack = Stack::start().await;
    let base = stack.policy.public_url();
    let out = stack
        .policy
        .command(&["--issuer", &base, "console-link"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(link.starts_with(&format!("{base}/console/link/")), "{link}");

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // Opening the link shows a button; only its form signs in, once.
    let page = client.get(&link).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let login_cookie = page.headers()["set-cookie"].to_str().unwrap().to_owned();
    let csrf_pair = login_cookie.split(';').next().unwrap().to_owned();
    let csrf = csrf_pair.split_once('=').unwrap().1.to_owned();
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains(" style="),
        "no inline script or style"
    );
    let signed = client
        .post(&link)
        .header("cookie", &csrf_pair)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    assert!(!set.contains("Secure"), "plain http: not Secure");
    let session = set.split(';').next().unwrap().to_owned();
    let overview = client
        .get(format!("{base}/console"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    assert!(overview.text().await.unwrap().contains("Signed in as"));
    // The audit exports: the sign-in above left no admin entry, so make one to export.
    let made = stack.admin().host("Exported bot").await;
    let jsonl = client
        .get(format!("{base}/console/audit/export.jsonl"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(jsonl.status(), 200);
    assert!(
        jsonl.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("audit.jsonl")
    );
    let lines: Vec<serde_json::Value> = jsonl
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|e| e["action"] == "host.create" && e["target"] == format!("hosts/{made}")),
        "{lines:?}"
    );
    let csv = client
        .get(format!("{base}/console/audit/export.csv?kind=admin"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = csv.text().await.unwrap();
    let mut rows = csv.lines();
    assert!(
        rows.next().unwrap().starts_with("id,at,kind,action,code"),
        "{csv}"
    );
    assert!(
        rows.any(|r| r.contains(",admin,host.create,") && r.contains(&format!("hosts/{made}"))),
        "{csv}"
    );
    // Used: the link is gone.
    let again = client
        .post(&link)
        .header("cookie", &csrf_pair)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    assert_eq!(client.get(&link).send().await.unwrap().status(), 404);
    // A wrong password is refused with the same page as an unknown user.
    let form = client
        .get(format!("{base}/console/login"))
        .send()
        .await
        .unwrap();
    let pair = form.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let token = pair.split_once('=').unwrap().1.to_owned();
    let refused = client
        .post(format!("{base}/console/login"))
        .header("cookie", &pair)
        .form(&[
            ("csrf", token.as_str()),
            ("username", "owner"),
            ("password", "not the password"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("Wrong user name or password.")
    );
    // The static script and stylesheet are served; nothing else under /console/static.
    for asset in ["console.js", "console.css"] {
        let r = client
            .get(format!("{base}/console/static/{asset}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }
}
