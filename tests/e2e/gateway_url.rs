//! The gateway URL `/mcp/{gateway}` through real Envoy, the real `.wasm`, the real
//! aggregator and policy service, and two real MCP servers: one session sees both
//! servers' tools under `{server}__{name}`; each call reaches its own server with that
//! server's credential; each server is checked on the very request (a disabled one is
//! refused `server_disabled` on the next call and left out of the next list);
//! provisioning holds; no token, no entry; a session is bound to its token.

use mcpguard_e2e::gateway::GatewayStack;
use mcpguard_e2e::mcp::{self, call_text};
use reqwest::Method;
use serde_json::{Value, json};

/// Two servers, `alpha` and `beta`, on gateway `eng`, each with its own service
/// credential; returns (stack, token, alpha's id, beta's id, gateway id).
pub(crate) async fn two_servers() -> (GatewayStack, String, i64, i64, i64) {
    two_servers_on(GatewayStack::start(2).await).await
}

/// [`two_servers`] on a stack already started (with at least two demo servers).
async fn two_servers_on(stack: GatewayStack) -> (GatewayStack, String, i64, i64, i64) {
    let admin = stack.admin();
    let p = admin
        .provision("eng", "alpha", &stack.demos[0].upstream_url())
        .await;
    let beta = admin.server("beta", &stack.demos[1].upstream_url()).await;
    for (server, secret) in [(p.server_id, "alpha-secret"), (beta, "beta-secret")] {
        admin
            .expose_as(
                p.gateway_id,
                server,
                json!({"identity": "shared", "credential": {"type": "bearer", "token": secret}}),
            )
            .await;
    }
    (stack, p.token, p.server_id, beta, p.gateway_id)
}

pub(crate) async fn tool_names(client: &rmcp::Peer<rmcp::RoleClient>) -> Vec<String> {
    let mut names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn one_url_merges_the_servers_and_checks_each_on_every_call() {
    let (stack, token, _alpha, beta, _) = two_servers().await;
    let admin = stack.admin();
    let url = stack.gateway_url("eng");

    let client = mcp::connect(&url, Some(&token)).await.expect("initialize");
    let info = client.peer_info().expect("the gateway's initialize result");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("mcpguard gateway eng")
    );
    assert_eq!(
        tool_names(&client).await,
        strings(&[
            "alpha__echo",
            "alpha__header",
            "alpha__whoami",
            "beta__echo",
            "beta__header",
            "beta__whoami",
        ])
    );
    // Definitions pass unchanged but for the name.
    let tools = client.list_all_tools().await.unwrap();
    let echo = tools.iter().find(|t| t.name == "beta__echo").unwrap();
    assert_eq!(
        echo.description.as_deref(),
        Some("Echo the given text back")
    );
    assert!(echo.input_schema.get("properties").is_some(), "{echo:?}");

    // Each call reaches its own server, with that server's credential and never the
    // client's token or the caller header.
    assert_eq!(
        call_text(&client, "alpha__whoami", json!({}))
            .await
            .unwrap(),
        "Bearer alpha-secret"
    );
    assert_eq!(
        call_text(&client, "beta__whoami", json!({})).await.unwrap(),
        "Bearer beta-secret"
    );
    let host = call_text(&client, "beta__header", json!({"name": "host"}))
        .await
        .unwrap();
    assert_eq!(host, format!("127.0.0.1:{}", stack.demos[1].port));
    for leaked in [
        "x-mcpguard-caller",
        "x-mcpguard-route",
        "x-mcpguard-check-secret",
    ] {
        assert_eq!(
            call_text(&client, "alpha__header", json!({"name": leaked}))
                .await
                .unwrap(),
            "none",
            "{leaked} reached the upstream"
        );
    }
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "hi"}))
            .await
            .unwrap(),
        "hi"
    );

    // Beta disabled: its very next call is refused with the layer's code, as a
    // JSON-RPC error; it leaves the list; alpha keeps working in the same session.
    admin.set_enabled("servers", beta, false).await;
    let err = call_text(&client, "beta__echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("server_disabled"), "{err}");
    assert_eq!(
        tool_names(&client).await,
        strings(&["alpha__echo", "alpha__header", "alpha__whoami"])
    );
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "still"}))
            .await
            .unwrap(),
        "still"
    );
    // And back, on the next request.
    admin.set_enabled("servers", beta, true).await;
    assert_eq!(
        call_text(&client, "beta__echo", json!({"text": "back"}))
            .await
            .unwrap(),
        "back"
    );
    assert_eq!(tool_names(&client).await.len(), 6);

    // A name the gateway never gave out, or of a server it does not expose.
    for name in ["echo", "gamma__echo"] {
        let err = call_text(&client, name, json!({"text": "x"}))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unknown") || text.contains("server_not_exposed"),
            "{name}: {text}"
        );
    }

    // Every per-server call is one audited decision naming the server and the tool.
    admin
        .allowed_decision(|e| e["server"] == "beta" && e["tool"] == "whoami")
        .await;
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn no_token_no_entry_and_nothing_reaches_the_aggregator() {
    let (stack, token, ..) = two_servers().await;
    let url = stack.gateway_url("eng");
    let before = stack
        .envoy
        .stat("cluster.mcpguard_aggregator.upstream_rq_total")
        .await;
    let (_challenge, metadata) = mcp::challenge_and_metadata(&url).await;
    assert_eq!(metadata["resource"], url);
    // A forged caller header, or route header, without a token: still 401.
    let hash = mcpguard_core::token::TokenHash::of(&token).to_hex();
    let forged = json!({"kind": "api_token", "hash": hash}).to_string();
    for headers in [
        vec![("x-mcpguard-caller", forged.as_str())],
        vec![
            ("x-mcpguard-route", "aggregator"),
            ("x-mcpguard-caller", &forged),
        ],
    ] {
        let a = mcp::post_initialize(&url, &headers).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (401, "token_missing"),
            "{}",
            a.body
        );
    }
    // Another gateway's URL, and a trailing slash (not the gateway URL, no server).
    mcp::expect_refusal(
        &stack.gateway_url("ops"),
        Some(&token),
        (401, "token_wrong_gateway"),
    )
    .await;
    mcp::expect_refusal(&format!("{url}/"), Some(&token), (404, "unknown_route")).await;
    assert_eq!(
        stack
            .envoy
            .stat("cluster.mcpguard_aggregator.upstream_rq_total")
            .await,
        before,
        "a refused request reached the aggregator"
    );
    // The gateway's own switch is decided by the filter, before the aggregator.
    let admin = stack.admin();
    let (_, gateways) = admin.get("/api/v1/gateways").await;
    let eng = gateways
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["slug"] == "eng")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    admin.set_enabled("gateways", eng, false).await;
    mcp::expect_refusal(&url, Some(&token), (403, "gateway_disabled")).await;
}

/// A raw MCP session on the gateway URL, to see statuses and exact messages.
pub(crate) struct Raw {
    pub(crate) http: reqwest::Client,
    pub(crate) url: String,
}

impl Raw {
    /// POSTs `body` as an MCP client does; the response as it comes (headers, stream).
    pub(crate) async fn send(
        &self,
        token: &str,
        session: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(&self.url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(id) = session {
            req = req.header("mcp-session-id", id);
        }
        req.send().await.unwrap()
    }

    /// [`Raw::send`], read whole: status, session id, and the message answering (or
    /// the JSON body).
    pub(crate) async fn post(
        &self,
        token: &str,
        session: Option<&str>,
        body: Value,
    ) -> (u16, Option<String>, Value) {
        let resp = self.send(token, session, &body).await;
        let status = resp.status().as_u16();
        let sid = resp
            .headers()
            .get("mcp-session-id")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = resp.text().await.unwrap();
        let message = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|m| m.get("id").is_some())
            .or_else(|| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null);
        (status, sid, message)
    }
}

#[tokio::test]
async fn a_session_is_bound_to_its_token_and_ids_come_back_as_sent() {
    let (stack, token, ..) = two_servers().await;
    let admin = stack.admin();
    let (_, gateways) = admin.get("/api/v1/gateways").await;
    let gateway_id = gateways[0]["id"].as_i64().unwrap();
    let host = admin.host("Another agent").await;
    let other = admin.token(host, gateway_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let raw = Raw {
        http: mcpguard_e2e::http(),
        url: stack.gateway_url("eng"),
    };
    let (status, sid, init) = raw.post(&token, None, mcp::initialize_body()).await;
    assert_eq!(status, 200, "{init}");
    let sid = sid.expect("a session id");
    raw.post(
        &token,
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    for id in [json!(7), json!("req-0001")] {
        let (status, _, reply) = raw
            .post(
                &token,
                Some(&sid),
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                       "params": {"name": "alpha__echo", "arguments": {"text": "x"}}}),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["result"]["content"][0]["text"], "x", "{reply}");
    }
    let (status, _, reply) = raw
        .post(
            &token,
            Some(&sid),
            json!({"jsonrpc": "2.0", "id": "p", "method": "ping"}),
        )
        .await;
    assert_eq!((status, &reply["id"]), (200, &json!("p")), "{reply}");
    let (status, _, reply) = raw
        .post(&token, Some(&sid), json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"cursor": "bogus"}}))
        .await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (200, &json!(-32602)),
        "{reply}"
    );

    // Another token, valid on the same gateway, presenting this session: unknown to
    // it (404, so a client starts over), and it learns nothing.
    let list = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"});
    let (status, _, reply) = raw.post(&other, Some(&sid), list.clone()).await;
    assert_eq!(status, 404, "{reply}");
    let forged = format!(
        "{}{}",
        &sid[..sid.len() - 1],
        if sid.ends_with('0') { '1' } else { '0' }
    );
    assert_eq!(raw.post(&token, Some(&forged), list.clone()).await.0, 404);
    assert_eq!(raw.post(&token, None, list.clone()).await.0, 400);
    // The owner's session still works; DELETE ends it.
    assert_eq!(raw.post(&token, Some(&sid), list.clone()).await.0, 200);
    let deleted = raw
        .http
        .request(Method::DELETE, &raw.url)
        .bearer_auth(&token)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    assert_eq!(raw.post(&token, Some(&sid), list).await.0, 404);
}

#[tokio::test]
async fn provisioning_holds_on_the_gateway_url() {
    let (stack, token, alpha, _beta, gateway_id) = two_servers().await;
    let admin = stack.admin();
    let features = format!("/api/v1/gateways/{gateway_id}/servers/{alpha}/features");
    let (status, v) = admin.post(&format!("{features}/refresh"), json!({})).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = admin
        .call(
            Method::PUT,
            &format!("{features}/tools"),
            Some(json!({"mode": "allow_selected", "allowed": ["echo"]})),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    let client = mcp::connect(&stack.gateway_url("eng"), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        tool_names(&client).await,
        strings(&["alpha__echo", "beta__echo", "beta__header", "beta__whoami"])
    );
    let err = call_text(&client, "alpha__whoami", json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tool_blocked"), "{err}");
    // The other server's tool of that name is its own exposure's business.
    assert_eq!(
        call_text(&client, "beta__whoami", json!({})).await.unwrap(),
        "Bearer beta-secret"
    );
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "ok"}))
            .await
            .unwrap(),
        "ok"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn prompts_and_resources_are_merged_and_reach_their_own_server() {
    let (stack, token, ..) = two_servers().await;
    let raw = Raw {
        http: mcpguard_e2e::http(),
        url: stack.gateway_url("eng"),
    };
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let sid = sid.expect("a session id");
    let rpc = |id: i64, method: &str, params: Value| json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let names = |reply: &Value, key: &str, field: &str| {
        let mut names: Vec<String> = reply["result"][key]
            .as_array()
            .unwrap_or_else(|| panic!("{reply}"))
            .iter()
            .map(|item| item[field].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };

    let (_, _, prompts) = raw
        .post(&token, Some(&sid), rpc(1, "prompts/list", json!({})))
        .await;
    assert_eq!(
        names(&prompts, "prompts", "name"),
        strings(&[
            "alpha__greet",
            "alpha__summarize",
            "beta__greet",
            "beta__summarize"
        ])
    );
    let (_, _, got) = raw
        .post(
            &token,
            Some(&sid),
            rpc(2, "prompts/get", json!({"name": "beta__greet"})),
        )
        .await;
    assert_eq!(
        got["result"]["messages"][0]["content"]["text"], "Greet someone by name (greet)",
        "{got}"
    );

    let (_, _, resources) = raw
        .post(&token, Some(&sid), rpc(3, "resources/list", json!({})))
        .await;
    assert_eq!(
        names(&resources, "resources", "uri"),
        strings(&[
            "alpha+demo://readme",
            "alpha+demo://secret",
            "beta+demo://readme",
            "beta+demo://secret"
        ])
    );
    let (_, _, read) = raw
        .post(
            &token,
            Some(&sid),
            rpc(4, "resources/read", json!({"uri": "beta+demo://readme"})),
        )
        .await;
    assert_eq!(read["id"], 4, "{read}");
    assert_eq!(
        read["result"]["contents"][0]["uri"], "beta+demo://readme",
        "the URI the client knows: {read}"
    );
    assert_eq!(
        read["result"]["contents"][0]["text"], "The demo server's readme",
        "{read}"
    );
    // A resource of a server the gateway does not expose: refused, the session goes on.
    let (_, _, refused) = raw
        .post(
            &token,
            Some(&sid),
            rpc(5, "resources/read", json!({"uri": "gamma+demo://readme"})),
        )
        .await;
    assert_eq!(
        refused["error"]["data"]["code"], "server_not_exposed",
        "{refused}"
    );
    assert_eq!(refused["id"], 5);
}

/// The official Python SDK's client (PyPI `mcp`, in the test venv: `make test`
/// installs it) on the gateway URL: initialize, list, a call to each server.
#[tokio::test]
async fn the_python_sdk_client_works_on_the_gateway_url() {
    let root = mcpguard_e2e::workspace_root();
    let python = root.join(".venv/bin/python");
    let (stack, token, ..) = two_servers().await;
    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/py/gateway_client.py"))
        .arg(stack.gateway_url("eng"))
        .arg(&token)
        .args(["alpha__echo", "beta__echo"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e} (`make test` makes the venv)", python.display()));
    assert!(
        out.status.success(),
        "the Python client failed (is PyPI `mcp` in .venv? `make test` installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(seen["server"], "mcpguard gateway eng", "{seen}");
    assert_eq!(
        seen["tools"],
        json!([
            "alpha__echo",
            "alpha__header",
            "alpha__whoami",
            "beta__echo",
            "beta__header",
            "beta__whoami"
        ])
    );
    for tool in ["alpha__echo", "beta__echo"] {
        assert_eq!(
            seen["calls"][tool],
            json!({"error": false, "text": ["from python"]}),
            "{seen}"
        );
    }
}

/// A headed app (OAuth, the official Rust SDK's flow): discovery from the gateway
/// URL's 401, sign-in, a token for the gateway URL, and each server of the gateway
/// reached with its own credential.
#[tokio::test]
async fn an_oauth_client_gets_a_token_for_the_gateway_url() {
    let (stack, ..) = two_servers().await;
    stack
        .admin()
        .person("alice", mcpguard_e2e::oauth::PASSWORD)
        .await;
    let url = stack.gateway_url("eng");
    let issuer = stack.policy.public_url();
    let (challenge, metadata) = mcp::challenge_and_metadata(&url).await;
    assert_eq!(metadata["authorization_servers"], json!([issuer]));
    let (_auth, client) =
        mcpguard_e2e::oauth::sdk_connect(&url, &challenge, &issuer, "Desktop app").await;
    assert_eq!(tool_names(&client).await.len(), 6);
    assert_eq!(
        call_text(&client, "alpha__whoami", json!({}))
            .await
            .unwrap(),
        "Bearer alpha-secret"
    );
    assert_eq!(
        call_text(&client, "beta__whoami", json!({})).await.unwrap(),
        "Bearer beta-secret"
    );
    client.cancel().await.unwrap();
}

/// A server that accepts connections and never answers costs only its own tools: the
/// list answers from the others within the upstream timeout (3 s in the tests), its
/// call fails as a JSON-RPC error in bounded time, the others keep working.
#[tokio::test]
async fn a_stalled_server_costs_only_its_own_tools() {
    let (stack, token, _, _, gateway_id) = two_servers().await;
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = stall.accept().await {
            open.push(conn);
        }
    });
    let admin = stack.admin();
    let stalled = admin
        .server("stalled", &format!("http://127.0.0.1:{stall_port}/mcp"))
        .await;
    admin.expose(gateway_id, stalled).await;

    let client = mcp::connect(&stack.gateway_url("eng"), Some(&token))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(tool_names(&client).await.len(), 6, "alpha's and beta's");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(8), "{took:?}");
    let started = std::time::Instant::now();
    let err = call_text(&client, "stalled__echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(
        call_text(&client, "beta__echo", json!({"text": "fine"}))
            .await
            .unwrap(),
        "fine"
    );
    held.abort();
    client.cancel().await.unwrap();
}

/// Sessions live in the aggregator: after a restart an old session id is unknown (404,
/// so the client initializes again), never a wrong answer; a new session works. It
/// comes back on one worker thread (`--worker-threads`), which serves as well.
#[tokio::test]
async fn after_an_aggregator_restart_old_sessions_are_404_and_new_ones_work() {
    let (mut stack, token, ..) = two_servers().await;
    let raw = Raw {
        http: mcpguard_e2e::http(),
        url: stack.gateway_url("eng"),
    };
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let sid = sid.expect("a session id");
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    assert_eq!(raw.post(&token, Some(&sid), list.clone()).await.0, 200);

    let port = stack.aggregators[0].port;
    stack.aggregators[0].proc.kill();
    stack.aggregators[0] = mcpguard_e2e::gateway::Aggregator::start_with(
        port,
        stack.policy.check_port,
        stack.dir.path(),
        &["--worker-threads".as_ref(), "1".as_ref()],
    )
    .await;
    let log = stack.aggregators[0].proc.log_text();
    assert!(log.contains(" workers=1\n"), "{log}");
    let (status, _, reply) = raw.post(&token, Some(&sid), list.clone()).await;
    assert_eq!(status, 404, "{reply}");
    let (status, fresh, _) = raw.post(&token, None, mcp::initialize_body()).await;
    assert_eq!(status, 200);
    let (status, _, reply) = raw.post(&token, fresh.as_deref(), list).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["result"]["tools"].as_array().unwrap().len(),
        6,
        "{reply}"
    );
}

/// A server that answers a call with plain JSON of a known length (as stateless
/// servers do): the reply reaches the client whole, with its length, its id as sent;
/// a server that streams (SSE) still streams.
#[tokio::test]
async fn a_plain_json_reply_goes_out_whole_and_an_sse_reply_still_streams() {
    let (stack, token, _, _, gateway_id) = two_servers().await;
    let plain = mcpguard_e2e::Demo::start_stateless(stack.dir.path()).await;
    let admin = stack.admin();
    let id = admin.server("plain", &plain.upstream_url()).await;
    admin.expose(gateway_id, id).await;
    let raw = Raw {
        http: mcpguard_e2e::http(),
        url: stack.gateway_url("eng"),
    };
    let sid = raw_session(&raw, &token).await;
    for (tool, streams) in [("plain__echo", false), ("alpha__echo", true)] {
        let call = json!({"jsonrpc": "2.0", "id": "call-7", "method": "tools/call",
            "params": {"name": tool, "arguments": {"text": "whole"}}});
        let resp = raw.send(&token, Some(&sid), &call).await;
        assert_eq!(resp.status(), 200, "{tool}");
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let length = resp.headers().get("content-length").cloned();
        let text = resp.text().await.unwrap();
        if streams {
            assert!(
                content_type.starts_with("text/event-stream"),
                "{tool}: {content_type}"
            );
            assert!(text.contains("whole"), "{tool}: {text}");
            continue;
        }
        assert!(
            content_type.starts_with("application/json"),
            "{tool}: {content_type}"
        );
        let length = length.unwrap_or_else(|| panic!("{tool}: no content-length"));
        assert_eq!(length.to_str().unwrap(), text.len().to_string(), "{tool}");
        let reply: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reply["id"], "call-7", "{reply}");
        assert!(reply["result"].to_string().contains("whole"), "{reply}");
    }
}

/// A per-user server on the gateway URL: reached with the connection user's own
/// identity, the shared one with its service credential; the identity disabled, that
/// server is refused `identity_disabled` and leaves the list, the other stays.
#[tokio::test]
async fn a_per_user_server_gets_the_users_own_identity_and_only_that_server() {
    let (stack, token, alpha, _beta, gateway_id) = two_servers().await;
    let admin = stack.admin();
    admin
        .expose_as(gateway_id, alpha, json!({"identity": "per_user"}))
        .await;
    let (status, identity) = admin
        .call(
            Method::PUT,
            &format!("/api/v1/users/1/identities/{alpha}"),
            Some(json!({"credential": {"type": "bearer", "token": "owner-at-alpha"}})),
        )
        .await;
    assert_eq!(status, 200, "{identity}");
    let client = mcp::connect(&stack.gateway_url("eng"), Some(&token))
        .await
        .unwrap();
    assert_eq!(
        call_text(&client, "alpha__whoami", json!({}))
            .await
            .unwrap(),
        "Bearer owner-at-alpha"
    );
    assert_eq!(
        call_text(&client, "beta__whoami", json!({})).await.unwrap(),
        "Bearer beta-secret"
    );
    admin
        .set_enabled("identities", identity["id"].as_i64().unwrap(), false)
        .await;
    let err = call_text(&client, "alpha__whoami", json!({}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("identity_disabled"), "{err}");
    assert_eq!(
        tool_names(&client).await,
        strings(&["beta__echo", "beta__header", "beta__whoami"])
    );
    client.cancel().await.unwrap();
}

/// Requests Envoy sent to the aggregator on `port`.
async fn sent_to(envoy: &mcpguard_e2e::Envoy, port: u16) -> u64 {
    let n = envoy
        .host_stat("mcpguard_aggregator", port, "rq_total")
        .await;
    n.trim().parse().unwrap_or(0)
}

/// `envoy/mcpguard-replicas.yaml` with two aggregators: every request of a session
/// reaches the aggregator that opened it (a consistent hash on the caller's
/// credential), so initialize, lists and calls on one session all work across
/// requests. That aggregator stopped, the session is unknown to the other (404) and a
/// client initializing again is served there.
#[tokio::test]
async fn with_two_aggregators_a_session_stays_on_one_and_the_other_takes_over() {
    let stack = GatewayStack::start_with("envoy/mcpguard-replicas.yaml", 2, 2).await;
    let (mut stack, token, ..) = two_servers_on(stack).await;
    let ports = [stack.aggregators[0].port, stack.aggregators[1].port];
    let raw = Raw {
        http: reqwest::Client::new(),
        url: stack.gateway_url("eng"),
    };
    let session = |sid: Option<String>| sid.expect("a session id");
    let (status, sid, init) = raw.post(&token, None, mcp::initialize_body()).await;
    assert_eq!(status, 200, "{init}");
    let sid = session(sid);
    let list = json!({"jsonrpc": "2.0", "id": "l", "method": "tools/list"});
    let call = |tool: &str, text: &str| {
        json!({"jsonrpc": "2.0", "id": "c", "method": "tools/call",
        "params": {"name": tool, "arguments": {"text": text}}})
    };
    for round in 0..4 {
        let (status, _, reply) = raw.post(&token, Some(&sid), list.clone()).await;
        assert_eq!(status, 200, "round {round}: {reply}");
        assert_eq!(
            reply["result"]["tools"].as_array().map(Vec::len),
            Some(6),
            "{reply}"
        );
        for tool in ["alpha__echo", "beta__echo"] {
            let text = format!("{tool} {round}");
            let (status, _, reply) = raw.post(&token, Some(&sid), call(tool, &text)).await;
            assert_eq!(status, 200, "{reply}");
            assert_eq!(reply["result"]["content"][0]["text"], text, "{reply}");
        }
    }
    let counts = [
        sent_to(&stack.envoy, ports[0]).await,
        sent_to(&stack.envoy, ports[1]).await,
    ];
    let serving = usize::from(counts[1] > counts[0]);
    assert_eq!(
        (counts[serving], counts[1 - serving]),
        (13, 0),
        "one session's requests all go to one aggregator: {counts:?}"
    );

    stack.aggregators[serving]
        .proc
        .stop(std::time::Duration::from_secs(5));
    let (status, _, reply) = raw.post(&token, Some(&sid), list.clone()).await;
    assert_eq!(status, 404, "the other aggregator never knew it: {reply}");
    let (status, fresh, init) = raw.post(&token, None, mcp::initialize_body()).await;
    assert_eq!(status, 200, "{init}");
    let fresh = session(fresh);
    let (status, _, reply) = raw.post(&token, Some(&fresh), list).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["result"]["tools"].as_array().map(Vec::len),
        Some(6),
        "{reply}"
    );
    let (_, _, reply) = raw
        .post(&token, Some(&fresh), call("beta__echo", "after"))
        .await;
    assert_eq!(reply["result"]["content"][0]["text"], "after", "{reply}");
    assert_eq!(
        sent_to(&stack.envoy, ports[1 - serving]).await,
        4,
        "the other aggregator took over"
    );
}

/// An https server on the gateway URL: the aggregator speaks TLS to it, verified for
/// the server's own name against the system's roots and `--trusted-ca-file`, at the
/// address the policy service judged. Not trusted (the test CA unknown; or the same
/// server by address, which its certificate does not name), it is left out of lists
/// and its call is a JSON-RPC error saying why; trusted, it is listed and called.
#[tokio::test]
async fn https_servers_are_reached_over_verified_tls() {
    let (mut stack, token, _, _, gateway_id) = two_servers().await;
    let (ca, cert, key) = mcpguard_e2e::tls::certificate(stack.dir.path());
    let (front_port, front_admin) = (mcpguard_e2e::free_port(), mcpguard_e2e::free_port());
    let front =
        mcpguard_e2e::tls::tls_front(front_port, front_admin, stack.demos[0].port, &cert, &key);
    let _front =
        mcpguard_e2e::Envoy::start_config(&front, front_port, front_admin, stack.dir.path()).await;
    let admin = stack.admin();
    for (slug, host) in [("secure", "localhost"), ("byaddress", "127.0.0.1")] {
        let id = admin
            .server(slug, &format!("https://{host}:{front_port}/mcp"))
            .await;
        admin.expose(gateway_id, id).await;
    }
    let has = |names: &[String], prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let url = stack.gateway_url("eng");

    // The test CA is not trusted yet.
    let client = mcp::connect(&url, Some(&token)).await.unwrap();
    let names = tool_names(&client).await;
    assert_eq!(names.len(), 6, "alpha's and beta's only: {names:?}");
    let err = call_text(&client, "secure__echo", json!({"text": "x"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("secure") && err.contains("UnknownIssuer"),
        "{err}"
    );
    client.cancel().await.unwrap();

    let port = stack.aggregators[0].port;
    stack.aggregators[0].proc.kill();
    stack.aggregators[0] = mcpguard_e2e::gateway::Aggregator::start_with(
        port,
        stack.policy.check_port,
        stack.dir.path(),
        &["--trusted-ca-file".as_ref(), ca.as_os_str()],
    )
    .await;
    let client = mcp::connect(&url, Some(&token)).await.unwrap();
    let names = tool_names(&client).await;
    assert!(has(&names, "secure__"), "{names:?}");
    assert!(!has(&names, "byaddress__"), "{names:?}");
    assert_eq!(names.len(), 9, "{names:?}");
    assert_eq!(
        call_text(&client, "secure__echo", json!({"text": "over tls"}))
            .await
            .unwrap(),
        "over tls"
    );
    // The Host the server saw is its own authority, not the address.
    assert_eq!(
        call_text(&client, "secure__header", json!({"name": "host"}))
            .await
            .unwrap(),
        format!("localhost:{front_port}")
    );
    let err = call_text(&client, "byaddress__echo", json!({"text": "x"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("byaddress") && err.contains("certificate not valid for name"),
        "{err}"
    );
    client.cancel().await.unwrap();
}

/// `logging/setLevel` on the gateway URL goes to every server of the gateway the caller
/// may use, each checked on that request (the demo server accepts it and prints the
/// level it was set to): `{}` while at least one accepted; a disabled server is not
/// sent it; with none left it is a JSON-RPC error saying why for each.
#[tokio::test]
async fn set_level_is_forwarded_to_every_server_the_caller_may_use() {
    let (stack, token, alpha, beta, _) = two_servers().await;
    let admin = stack.admin();
    let raw = Raw {
        http: reqwest::Client::new(),
        url: stack.gateway_url("eng"),
    };
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let sid = sid.expect("a session id");
    let set = |level: &str| {
        json!({"jsonrpc": "2.0", "id": "lv", "method": "logging/setLevel",
               "params": {"level": level}})
    };
    let set_to = |level: &str| format!("logging level set to {level}");
    let (status, _, reply) = raw.post(&token, Some(&sid), set("debug")).await;
    assert_eq!((status, &reply["result"]), (200, &json!({})), "{reply}");
    for demo in &stack.demos {
        assert!(
            demo.proc.log_text().contains(&set_to("debug")),
            "{}",
            demo.proc.log_tail()
        );
    }

    admin.set_enabled("servers", beta, false).await;
    let (_, _, reply) = raw.post(&token, Some(&sid), set("error")).await;
    assert_eq!(reply["result"], json!({}), "{reply}");
    assert!(stack.demos[0].proc.log_text().contains(&set_to("error")));
    assert!(
        !stack.demos[1].proc.log_text().contains(&set_to("error")),
        "a disabled server was sent it"
    );

    admin.set_enabled("servers", alpha, false).await;
    let (_, _, reply) = raw.post(&token, Some(&sid), set("info")).await;
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("alpha: refused server_disabled")
            && message.contains("beta: refused server_disabled"),
        "{reply}"
    );
    assert_eq!(reply["id"], "lv");
}

/// Asks demo server `demo` to send `notifications/resources/updated` for `uri` to
/// every session it has (on their GET streams).
pub(crate) async fn updated(stack: &GatewayStack, demo: usize, uri: &str) {
    let url = format!(
        "http://127.0.0.1:{}/demo/resources/updated",
        stack.demos[demo].port
    );
    let resp = reqwest::Client::new()
        .post(url)
        .body(uri.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

/// Sends `notifications/resources/updated` for `uri` from demo `demo` until `arrived`
/// says it reached the client (the aggregator opens the upstream's GET stream a moment
/// after the client's; a notification sent before is lost, as the spec allows); bounded.
async fn update_until<F, Fut>(stack: &GatewayStack, demo: usize, uri: &str, arrived: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..50 {
        updated(stack, demo, uri).await;
        if arrived().await {
            return;
        }
    }
    panic!("notifications/resources/updated {uri} from demo {demo} never reached the client");
}

pub(crate) const WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// The GET stream on the gateway URL with the official Rust SDK's client: an upstream's
/// `notifications/resources/updated` reaches it under the gateway's name for the
/// resource, its `notifications/tools/list_changed` is passed on, from each server.
#[tokio::test]
async fn an_upstreams_notifications_reach_the_get_stream_under_gateway_names() {
    let (stack, token, ..) = two_servers().await;
    let (client, seen) = mcp::connect_recording(&stack.gateway_url("eng"), &token).await;
    update_until(&stack, 0, "demo://readme", || {
        seen.arrives("resources/updated alpha+demo://readme", WAIT)
    })
    .await;
    update_until(&stack, 1, "demo://secret", || {
        seen.arrives("resources/updated beta+demo://secret", WAIT)
    })
    .await;
    assert!(
        !seen.seen().iter().any(|s| s.ends_with(" demo://readme")),
        "an upstream's own URI reached the client: {:?}",
        seen.seen()
    );
    // A server's tools changed: its list_changed reaches the client, which lists again.
    seen.clear();
    let resp = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/demo/tools/late",
            stack.demos[1].port
        ))
        .body("A tool added at run time")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(
        seen.arrives("tools/list_changed", std::time::Duration::from_secs(10))
            .await,
        "{:?}",
        seen.seen()
    );
    assert!(tool_names(&client).await.contains(&"beta__late".to_owned()));
    client.cancel().await.unwrap();
}

/// The test: a server disabled mid-session sends the client `list_changed`
/// on its GET stream; its next call is refused `server_disabled`, the list shrinks, the
/// other server keeps working; enabled again, `list_changed` again and it is back.
#[tokio::test]
async fn a_server_disabled_mid_session_sends_list_changed() {
    let (stack, token, _alpha, beta, _) = two_servers().await;
    let admin = stack.admin();
    let (client, seen) = mcp::connect_recording(&stack.gateway_url("eng"), &token).await;
    // The stream is up (and has seen which servers the caller may use).
    update_until(&stack, 0, "demo://readme", || {
        seen.arrives("resources/updated alpha+demo://readme", WAIT)
    })
    .await;
    assert_eq!(tool_names(&client).await.len(), 6);
    seen.clear();
    admin.set_enabled("servers", beta, false).await;
    let within = std::time::Duration::from_secs(10);
    for note in [
        "tools/list_changed",
        "prompts/list_changed",
        "resources/list_changed",
    ] {
        assert!(
            seen.arrives(note, within).await,
            "{note}: {:?}",
            seen.seen()
        );
    }
    let err = call_text(&client, "beta__echo", json!({"text": "x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("server_disabled"), "{err}");
    assert_eq!(
        tool_names(&client).await,
        strings(&["alpha__echo", "alpha__header", "alpha__whoami"])
    );
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "still"}))
            .await
            .unwrap(),
        "still"
    );
    seen.clear();
    admin.set_enabled("servers", beta, true).await;
    assert!(
        seen.arrives("tools/list_changed", within).await,
        "{:?}",
        seen.seen()
    );
    assert_eq!(tool_names(&client).await.len(), 6);
    client.cancel().await.unwrap();
}

/// A raw GET stream on the gateway URL, its messages as they arrive.
pub(crate) struct RawStream {
    messages: tokio::sync::mpsc::UnboundedReceiver<Value>,
    /// Resolves when the aggregator ended the stream.
    pub(crate) ended: tokio::task::JoinHandle<()>,
}

impl RawStream {
    pub(crate) async fn open(url: &str, token: &str, sid: &str) -> RawStream {
        Self::open_with(url, token, sid, &[]).await
    }

    /// [`RawStream::open`] with these headers besides.
    pub(crate) async fn open_with(
        url: &str,
        token: &str,
        sid: &str,
        headers: &[(&str, &str)],
    ) -> RawStream {
        let mut req = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", sid);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            resp.headers()
        );
        let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let ended = tokio::spawn(async move {
            let mut resp = resp;
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                        let _ = tx.send(serde_json::from_str(data).unwrap());
                    }
                }
            }
        });
        RawStream { messages, ended }
    }

    /// The next message within `within`, if any.
    pub(crate) async fn next(&mut self, within: std::time::Duration) -> Option<Value> {
        tokio::time::timeout(within, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// Whether a message `matches` arrives within `within` (others are skipped).
    pub(crate) async fn arrives(
        &mut self,
        within: std::time::Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(m) = self.next(deadline - tokio::time::Instant::now()).await {
            if matches(&m) {
                return true;
            }
        }
        false
    }
}

pub(crate) fn updated_of(uri: &str) -> impl Fn(&Value) -> bool + '_ {
    move |m: &Value| m["method"] == "notifications/resources/updated" && m["params"]["uri"] == uri
}

/// The GET stream at the HTTP level: `text/event-stream`; no session, 400; another's or
/// a forged one, 404; a disabled server's notifications are not relayed and its
/// `list_changed` arrives; an upstream whose stream breaks (its server stopped) does
/// not end the client's stream; `DELETE` ends it, and so do disabling the gateway and
/// stopping the aggregator (which then exits at once).
#[tokio::test]
async fn the_get_stream_outlives_a_broken_upstream_and_ends_on_delete() {
    let (mut stack, token, _alpha, beta, gateway_id) = two_servers().await;
    let url = stack.gateway_url("eng");
    let raw = Raw {
        http: reqwest::Client::new(),
        url: url.clone(),
    };
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let sid = sid.expect("a session id");
    let get = |sid: Option<&str>| {
        let mut req = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&token)
            .header("accept", "text/event-stream");
        if let Some(sid) = sid {
            req = req.header("mcp-session-id", sid);
        }
        req.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 400);
    let forged = format!("{}0", &sid[..sid.len() - 1]);
    let forged = if forged == sid {
        format!("{}1", &sid[..sid.len() - 1])
    } else {
        forged
    };
    assert_eq!(get(Some(&forged)).await.unwrap().status(), 404);

    let mut stream = RawStream::open(&url, &token, &sid).await;
    for demo in [0, 1] {
        let uri = if demo == 0 {
            "alpha+demo://readme"
        } else {
            "beta+demo://readme"
        };
        let mut arrived = false;
        for _ in 0..50 {
            updated(&stack, demo, "demo://readme").await;
            if stream.arrives(WAIT, updated_of(uri)).await {
                arrived = true;
                break;
            }
        }
        assert!(arrived, "{uri} never arrived");
    }

    // Beta disabled: list_changed, and nothing of beta's is relayed any more.
    stack.admin().set_enabled("servers", beta, false).await;
    assert!(
        stream
            .arrives(std::time::Duration::from_secs(10), |m| {
                m["method"] == "notifications/tools/list_changed"
            })
            .await
    );
    updated(&stack, 1, "demo://readme").await;
    updated(&stack, 0, "demo://readme").await;
    let mut seen = Vec::new();
    while let Some(m) = stream.next(std::time::Duration::from_secs(2)).await {
        seen.push(m);
    }
    assert!(
        seen.iter().any(updated_of("alpha+demo://readme")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(updated_of("beta+demo://readme")),
        "a disabled server's notification was relayed: {seen:?}"
    );
    stack.admin().set_enabled("servers", beta, true).await;

    // Beta's server stops: its upstream stream breaks; the client's stream goes on.
    stack.demos[1].proc.kill();
    updated(&stack, 0, "demo://secret").await;
    assert!(
        stream
            .arrives(
                std::time::Duration::from_secs(5),
                updated_of("alpha+demo://secret")
            )
            .await,
        "the client's stream ended with beta's"
    );
    assert!(!stream.ended.is_finished());

    // DELETE ends the session and its stream.
    let deleted = raw
        .http
        .request(Method::DELETE, &url)
        .bearer_auth(&token)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.ended)
        .await
        .expect("DELETE ends the GET stream")
        .unwrap();

    // The gateway disabled: a stream opened before it ends (the caller may use none of
    // it now).
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let stream = RawStream::open(&url, &token, &sid.expect("a session id")).await;
    stack
        .admin()
        .set_enabled("gateways", gateway_id, false)
        .await;
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.ended)
        .await
        .expect("a disabled gateway ends its GET streams")
        .unwrap();

    // An aggregator told to stop ends its open GET streams and exits (a graceful
    // shutdown waits for open responses: a stream would hold it forever).
    stack
        .admin()
        .set_enabled("gateways", gateway_id, true)
        .await;
    let (_, sid, _) = raw.post(&token, None, mcp::initialize_body()).await;
    let stream = RawStream::open(&url, &token, &sid.expect("a session id")).await;
    assert!(
        stack.aggregators[0]
            .proc
            .stop(std::time::Duration::from_secs(5)),
        "the aggregator did not stop within 5 s with a GET stream open"
    );
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.ended)
        .await
        .expect("the stream ended with the aggregator")
        .unwrap();
}

/// [`two_servers`] and a third, `asker` (the demo server with `--elicit`), whose tools
/// ask the client for something while serving a call; the demo server is returned so
/// that it lives as long as the test.
pub(crate) async fn with_asker() -> (GatewayStack, String, mcpguard_e2e::Demo) {
    let (stack, token, _, _, gateway_id) = two_servers().await;
    let asker = mcpguard_e2e::Demo::start_eliciting(stack.dir.path()).await;
    let admin = stack.admin();
    let id = admin.server("asker", &asker.upstream_url()).await;
    admin.expose(gateway_id, id).await;
    (stack, token, asker)
}

/// The text of `asker`'s `tool`; bounded, as a call whose request to the client was
/// never answered would wait forever.
pub(crate) async fn asker_call(client: &rmcp::Peer<rmcp::RoleClient>, tool: &str) -> String {
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        call_text(client, &format!("asker__{tool}"), json!({})),
    )
    .await
    .expect("the call ended: the client's answer reached the server")
    .unwrap()
}

/// A server that asks the client for something while serving a call (elicitation):
/// relayed on the call's reply stream to a client that declared it, under an id of the
/// aggregator's, and the client's answer goes back to that server (the call's result
/// says what the client answered). A client that did not declare it is never asked:
/// the server is told it cannot ask (the aggregator declares upstream only what the
/// client declared).
#[tokio::test]
async fn a_servers_elicitation_reaches_a_client_that_declared_it() {
    let (stack, token, _asker) = with_asker().await;
    let url = stack.gateway_url("eng");

    let (client, seen) = mcp::connect_with(&url, &token, mcp::Recorder::answering("Ada")).await;
    assert!(tool_names(&client).await.contains(&"asker__ask".to_owned()));
    assert_eq!(asker_call(&client, "ask").await, "hello Ada");
    assert_eq!(seen.seen(), vec!["elicitation What is your name?"]);
    // Twice, and the other servers' calls in the same session are unaffected.
    assert_eq!(asker_call(&client, "ask").await, "hello Ada");
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "x"}))
            .await
            .unwrap(),
        "x"
    );
    client.cancel().await.unwrap();

    let (plain, seen) = mcp::connect_recording(&url, &token).await;
    let text = asker_call(&plain, "ask").await;
    assert!(text.starts_with("elicitation failed"), "{text}");
    assert!(seen.seen().is_empty(), "{:?}", seen.seen());
    plain.cancel().await.unwrap();
}

/// A server's request of the client outside any call (`roots/list`, on its GET stream):
/// relayed on the client's GET stream when the client declared it, and its answer goes
/// back to the server (which prints it).
#[tokio::test]
async fn a_servers_roots_request_on_its_get_stream_is_answered_by_the_client() {
    let (stack, token, ..) = two_servers().await;
    let (client, _) = mcp::connect_with(
        &stack.gateway_url("eng"),
        &token,
        mcp::Recorder::answering("ada"),
    )
    .await;
    let listed = "roots listed: file:///ada";
    let roots = format!("http://127.0.0.1:{}/demo/roots", stack.demos[1].port);
    let http = reqwest::Client::new();
    // Asked again until the upstream's GET stream is up (one asked before is lost).
    let mut answered = false;
    for _ in 0..50 {
        assert_eq!(http.post(&roots).send().await.unwrap().status(), 202);
        tokio::time::sleep(WAIT).await;
        if stack.demos[1].proc.log_text().contains(listed) {
            answered = true;
            break;
        }
    }
    assert!(answered, "{}", stack.demos[1].proc.log_tail());
    client.cancel().await.unwrap();
}

/// The names on one raw page of a list, and its `nextCursor`.
fn page_of(reply: &Value, key: &str) -> (Vec<String>, Option<String>) {
    let items = reply["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {reply}"));
    let names = items
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    let next = reply["result"]["nextCursor"].as_str().map(str::to_owned);
    (names, next)
}

/// A raw session on the gateway URL, initialized; its id.
pub(crate) async fn raw_session(raw: &Raw, token: &str) -> String {
    let (status, sid, init) = raw.post(token, None, mcp::initialize_body()).await;
    assert_eq!(status, 200, "{init}");
    let sid = sid.expect("a session id");
    raw.post(
        token,
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    sid
}

#[tokio::test]
async fn cursors_span_servers_and_every_tool_comes_exactly_once() {
    // Both servers answer `tools/list` two tools a page; alpha has 8 tools (4 pages:
    // echo header | whoami extra0 | extra1 extra2 | extra3 extra4), beta 3 (2 pages).
    let stack = GatewayStack::start_paging("envoy/mcpguard.yaml", 2, 1, Some(2)).await;
    let http = mcpguard_e2e::http();
    for i in 0..5 {
        let put = http
            .put(format!(
                "http://127.0.0.1:{}/demo/tools/extra{i}",
                stack.demos[0].port
            ))
            .body(format!("Extra tool {i}"))
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "{}", put.status());
    }
    let (stack, token, _alpha, beta, _) = two_servers_on(stack).await;
    let admin = stack.admin();
    let url = stack.gateway_url("eng");
    let mut every = strings(&[
        "alpha__echo",
        "alpha__header",
        "alpha__whoami",
        "beta__echo",
        "beta__header",
        "beta__whoami",
    ]);
    every.extend((0..5).map(|i| format!("alpha__extra{i}")));
    every.sort();

    // rmcp's client walks every page: each tool of both servers exactly once.
    let client = mcp::connect(&url, Some(&token)).await.expect("initialize");
    let walked: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    let mut sorted = walked.clone();
    sorted.sort();
    assert_eq!(sorted, every, "walked {walked:?}");
    client.cancel().await.unwrap();

    // Raw: a page holds one upstream page of each server that has one, in slug order,
    // so a big upstream is not read whole for one page.
    let raw = Raw {
        http: mcpguard_e2e::http(),
        url: url.clone(),
    };
    let sid = raw_session(&raw, &token).await;
    let list = |id: i64, cursor: Option<&str>| match cursor {
        Some(c) => json!({"jsonrpc": "2.0", "id": id, "method": "tools/list",
                          "params": {"cursor": c}}),
        None => json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}),
    };
    let (_, _, first) = raw.post(&token, Some(&sid), list(1, None)).await;
    let (names, next) = page_of(&first, "tools");
    assert_eq!(
        names,
        strings(&["alpha__echo", "alpha__header", "beta__echo", "beta__header"]),
        "{first}"
    );
    let cursor = next.expect("a nextCursor");
    assert!(!cursor.contains("alpha"), "opaque: {cursor}");
    let (_, _, second) = raw.post(&token, Some(&sid), list(2, Some(&cursor))).await;
    let (names, next) = page_of(&second, "tools");
    assert_eq!(
        names,
        strings(&["alpha__whoami", "alpha__extra0", "beta__whoami"]),
        "{second}"
    );
    let second_cursor = next.expect("alpha goes on");

    // A cursor is bound to its session and its list, and cannot be changed: each is
    // -32602, and the session goes on.
    let other = raw_session(&raw, &token).await;
    let flipped = format!(
        "{}{}",
        &cursor[..cursor.len() - 1],
        if cursor.ends_with('0') { '1' } else { '0' }
    );
    for (session, body) in [
        (&other, list(3, Some(&cursor))),
        (&sid, list(4, Some(&flipped))),
        (&sid, list(5, Some("bogus"))),
        (
            &sid,
            json!({"jsonrpc": "2.0", "id": 6, "method": "prompts/list",
                   "params": {"cursor": cursor}}),
        ),
    ] {
        let (status, _, reply) = raw.post(&token, Some(session), body.clone()).await;
        assert_eq!(
            (status, &reply["error"]["code"]),
            (200, &json!(-32602)),
            "{body}: {reply}"
        );
    }

    // Every page is checked per server, uncached: beta disabled mid-walk is left out
    // of the pages after, though the first cursor still names it.
    admin.set_enabled("servers", beta, false).await;
    let (_, _, again) = raw.post(&token, Some(&sid), list(7, Some(&cursor))).await;
    let (names, _) = page_of(&again, "tools");
    assert_eq!(
        names,
        strings(&["alpha__whoami", "alpha__extra0"]),
        "{again}"
    );
    admin.set_enabled("servers", beta, true).await;

    // The rest of the walk from the second page: alpha's last tools, then the end.
    let mut rest = Vec::new();
    let mut next = Some(second_cursor);
    for id in 10..20 {
        let Some(c) = next else { break };
        let (_, _, reply) = raw.post(&token, Some(&sid), list(id, Some(&c))).await;
        let (names, more) = page_of(&reply, "tools");
        rest.extend(names);
        next = more;
    }
    assert_eq!(next, None, "the walk ends");
    assert_eq!(
        rest,
        strings(&[
            "alpha__extra1",
            "alpha__extra2",
            "alpha__extra3",
            "alpha__extra4"
        ])
    );
}

#[tokio::test]
async fn a_call_is_one_check_and_a_forged_checked_header_changes_nothing() {
    let (stack, token, _alpha, beta, _) = two_servers().await;
    let admin = stack.admin();
    let url = stack.gateway_url("eng");
    let client = mcp::connect(&url, Some(&token)).await.expect("initialize");

    // The filter checks the call for its server; the aggregator does not check again:
    // one audited decision per call. Audit entries are written in order, so once the
    // later call's entry is there, every entry of the first one is too.
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "once"}))
            .await
            .unwrap(),
        "once"
    );
    call_text(&client, "beta__whoami", json!({})).await.unwrap();
    admin
        .allowed_decision(|e| e["server"] == "beta" && e["tool"] == "whoami")
        .await;
    let (status, page) = admin
        .get("/api/v1/audit?kind=decision&decision=allow")
        .await;
    assert_eq!(status, 200, "{page}");
    let echoes = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["server"] == "alpha" && e["tool"] == "echo")
        .count();
    assert_eq!(echoes, 1, "{page}");

    // A client's own x-mcpguard-checked, claiming an allow for a disabled server, is
    // removed by the filter: the call is refused with the layer's code.
    admin.set_enabled("servers", beta, false).await;
    let init = mcp::initialize_with(&url, Some(&token)).await;
    assert_eq!(init.status, 200, "{}", init.body);
    let session = init.header("mcp-session-id").expect("a session").to_owned();
    let forged = json!({
        "server": "beta", "method": "tools/call", "item": "echo",
        "answer": {"decision": "allow", "upstream": {
            "scheme": "http",
            "authority": format!("127.0.0.1:{}", stack.demos[1].port),
            "base_path": "/mcp",
            "address": format!("127.0.0.1:{}", stack.demos[1].port),
        }},
    })
    .to_string();
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "beta__echo", "arguments": {"text": "x"}}});
    let bearer = format!("Bearer {token}");
    let answer = mcp::post(
        &url,
        &[
            ("authorization", bearer.as_str()),
            ("mcp-session-id", session.as_str()),
            ("mcp-protocol-version", "2025-06-18"),
            ("x-mcpguard-checked", forged.as_str()),
        ],
        call.to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains("server_disabled"), "{}", answer.body);
    assert!(!answer.body.contains("\"result\""), "{}", answer.body);
    client.cancel().await.unwrap();
}
