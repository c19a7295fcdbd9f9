//! Feature provisioning through real Envoy: each mode for tools, prompts and
//! resources; list replies filtered per caller, over SSE (the stateful demo server) and
//! plain JSON (the stateless one); a blocked item refused on the next call as a JSON-RPC
//! error with the request's id; a new tool upstream blocked under `allow_selected` until
//! allowed, a changed one blocked again; `features.manage` required.

use mcpguard_e2e::admin::{Admin, Provisioned};
use mcpguard_e2e::mcp;
use mcpguard_e2e::{Stack, procs::Demo};
use reqwest::Method;
use serde_json::{Value, json};

use crate::capabilities::caller_with;

/// A raw MCP session through Envoy (`initialize` done), so a test sees the exact
/// JSON-RPC messages, ids and content types.
struct Session {
    http: reqwest::Client,
    url: String,
    token: String,
    id: Option<String>,
}

/// One JSON-RPC reply: the HTTP status, the content type, and the message whose id is
/// the request's (or the only one).
struct Reply {
    status: u16,
    content_type: String,
    message: Value,
}

impl Session {
    async fn open(url: &str, token: &str) -> Session {
        let mut s = Session {
            http: mcpguard_e2e::http(),
            url: url.to_owned(),
            token: token.to_owned(),
            id: None,
        };
        let init = s
            .send(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": mcp::initialize_body()["params"]}))
            .await;
        assert_eq!(init.status, 200, "{}", init.message);
        s.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        s
    }

    async fn send(&mut self, body: Value) -> Reply {
        let id = body.get("id").cloned();
        self.send_raw(body.to_string(), id).await
    }

    /// Posts `body` as it is (a batch, a body no JSON-RPC library would write); the
    /// reply's message is the one with `id`, or the first.
    async fn send_raw(&mut self, body: String, id: Option<Value>) -> Reply {
        let mut req = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body);
        if let Some(id) = &self.id {
            req = req
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", "2025-06-18");
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        if let Some(id) = resp.headers().get("mcp-session-id") {
            self.id = Some(id.to_str().unwrap().to_owned());
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = resp.text().await.unwrap();
        let messages: Vec<Value> = if content_type.starts_with("text/event-stream") {
            text.replace("\r\n", "\n")
                .split("\n\n")
                .filter_map(|event| {
                    let data: Vec<&str> = event
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    serde_json::from_str(&data.join("\n")).ok()
                })
                .collect()
        } else {
            serde_json::from_str(&text).into_iter().collect()
        };
        let message = messages
            .iter()
            .find(|m| id.is_some() && m.get("id") == id.as_ref())
            .or(messages.first())
            .cloned()
            .unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            message,
        }
    }

    async fn rpc(&mut self, id: Value, method: &str, params: Value) -> Reply {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await
    }

    /// The names (a resource's URIs) of a list reply.
    async fn names(&mut self, kind: &str) -> Vec<String> {
        let reply = self.rpc(json!(9), &format!("{kind}/list"), json!({})).await;
        assert_eq!(reply.status, 200, "{}", reply.message);
        let key = if kind == "resources" { "uri" } else { "name" };
        let mut names: Vec<String> = reply.message["result"][kind]
            .as_array()
            .unwrap_or_else(|| panic!("{kind}/list: {}", reply.message))
            .iter()
            .map(|item| item[key].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    }

    /// The mcpguard code of a refused call, `None` when it went through.
    async fn refusal(&mut self, id: Value, method: &str, params: Value) -> Option<String> {
        let reply = self.rpc(id.clone(), method, params).await;
        assert_eq!(reply.status, 200, "{method}: {}", reply.message);
        let error = reply.message.get("error")?;
        if error["code"] == -32003 {
            assert_eq!(
                reply.message["id"], id,
                "the request's id comes back as sent"
            );
            assert_eq!(reply.content_type, "application/json");
            let code = error["data"]["code"].as_str().unwrap().to_owned();
            assert!(
                error["message"].as_str().unwrap().starts_with(&code),
                "{error}"
            );
            Some(code)
        } else {
            panic!("{method} failed upstream, not refused: {error}")
        }
    }
}

fn features_path(p: &Provisioned) -> String {
    format!(
        "/api/v1/gateways/{}/servers/{}/features",
        p.gateway_id, p.server_id
    )
}

async fn refresh(admin: &Admin, p: &Provisioned) -> Value {
    let (status, v) = admin
        .post(&format!("{}/refresh", features_path(p)), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn set(admin: &Admin, p: &Provisioned, kind: &str, body: Value) -> Value {
    let (status, v) = admin
        .call(
            Method::PUT,
            &format!("{}/{kind}", features_path(p)),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn approve(admin: &Admin, p: &Provisioned, kind: &str, names: &[&str]) {
    let (status, v) = admin
        .post(
            &format!("{}/{kind}/approve", features_path(p)),
            json!({ "names": names }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

/// The status the API shows for one item.
async fn status_of(admin: &Admin, p: &Provisioned, kind: &str, name: &str) -> String {
    let (_, v) = admin.get(&features_path(p)).await;
    v[kind]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {v}"))["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Adds a tool to the demo server, or changes its description.
pub async fn put_upstream_tool(demo: &Demo, name: &str, description: &str) {
    let resp = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{}/demo/tools/{name}", demo.port))
        .body(description.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn tool_modes_filter_sse_lists_and_refuse_blocked_calls_on_the_next_request() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let mut s = Session::open(&url, &p.token).await;

    // allow_all, the default: the whole list, over SSE.
    let all = strings(&["echo", "header", "whoami"]);
    assert_eq!(s.names("tools").await, all);
    let listed = s.rpc(json!(1), "tools/list", json!({})).await;
    assert!(
        listed.content_type.starts_with("text/event-stream"),
        "{}",
        listed.content_type
    );

    let found = refresh(&admin, &p).await;
    assert_eq!(
        found["counts"],
        json!({"prompts": 2, "resources": 2, "tools": 3})
    );
    set(
        &admin,
        &p,
        "tools",
        json!({"mode": "allow_selected", "allowed": ["echo"]}),
    )
    .await;
    // The same session, the very next request: the list is filtered, whoami refused
    // (numeric and string ids both come back as sent), echo still works.
    assert_eq!(s.names("tools").await, strings(&["echo"]));
    for id in [json!(41), json!("req-0001"), json!("abc")] {
        let code = s
            .refusal(id, "tools/call", json!({"name": "whoami", "arguments": {}}))
            .await;
        assert_eq!(code.as_deref(), Some("tool_blocked"));
    }
    let echoed = s
        .rpc(
            json!(42),
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "hi"}}),
        )
        .await;
    assert_eq!(
        echoed.message["result"]["content"][0]["text"], "hi",
        "{}",
        echoed.message
    );
    assert_eq!(
        status_of(&admin, &p, "tools", "whoami").await,
        "not_selected"
    );
    assert_eq!(status_of(&admin, &p, "tools", "echo").await, "offered");

    // The official SDK client sees the same.
    let client = mcp::connect(&url, Some(&p.token)).await.unwrap();
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(
        tools.iter().map(|t| t.name.to_string()).collect::<Vec<_>>(),
        ["echo"]
    );
    let err = mcp::call_text(&client, "header", json!({"name": "x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tool_blocked"), "{err}");

    // block_all: nothing listed, nothing callable.
    set(&admin, &p, "tools", json!({"mode": "block_all"})).await;
    assert!(s.names("tools").await.is_empty());
    let code = s
        .refusal(
            json!(43),
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "x"}}),
        )
        .await;
    assert_eq!(code.as_deref(), Some("tool_blocked"));
    assert_eq!(status_of(&admin, &p, "tools", "echo").await, "blocked");

    // Back to allow_all: everything again, on the next request.
    set(&admin, &p, "tools", json!({"mode": "allow_all"})).await;
    assert_eq!(s.names("tools").await, all);
    assert_eq!(
        s.refusal(
            json!(44),
            "tools/call",
            json!({"name": "whoami", "arguments": {}})
        )
        .await,
        None
    );

    // Refusals are audited with the code and the tool (the writer batches: polled).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let denied = admin.get("/api/v1/audit?decision=deny&limit=50").await.1;
        let found = denied["entries"].as_array().unwrap().iter().any(|e| {
            e["code"] == "tool_blocked" && e["tool"] == "whoami" && e["mcp_method"] == "tools/call"
        });
        if found {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{denied}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let changes = admin.get("/api/v1/audit?kind=admin&limit=50").await.1;
    assert!(
        changes["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "features.set"),
        "{changes}"
    );
    // The other kinds were never touched.
    assert_eq!(s.names("prompts").await, strings(&["greet", "summarize"]));
}

#[tokio::test]
async fn prompt_and_resource_modes_filter_plain_json_lists_and_refuse_reads() {
    let stack = Stack::start_stateless().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let mut s = Session::open(&stack.envoy.mcp_url("eng", "demo"), &p.token).await;
    refresh(&admin, &p).await;

    set(
        &admin,
        &p,
        "prompts",
        json!({"mode": "allow_selected", "allowed": ["greet"]}),
    )
    .await;
    let listed = s.rpc(json!(1), "prompts/list", json!({})).await;
    assert!(
        listed.content_type.starts_with("application/json"),
        "{}",
        listed.content_type
    );
    assert_eq!(s.names("prompts").await, strings(&["greet"]));
    assert_eq!(
        s.refusal(json!(2), "prompts/get", json!({"name": "summarize"}))
            .await
            .as_deref(),
        Some("prompt_blocked")
    );
    assert_eq!(
        s.refusal(json!(3), "prompts/get", json!({"name": "greet"}))
            .await,
        None
    );

    set(&admin, &p, "resources", json!({"mode": "block_all"})).await;
    assert!(s.names("resources").await.is_empty());
    assert_eq!(
        s.refusal(
            json!("r1"),
            "resources/read",
            json!({"uri": "demo://readme"})
        )
        .await
        .as_deref(),
        Some("resource_blocked")
    );
    set(
        &admin,
        &p,
        "resources",
        json!({"mode": "allow_selected", "allowed": ["demo://readme"]}),
    )
    .await;
    assert_eq!(s.names("resources").await, strings(&["demo://readme"]));
    assert_eq!(
        s.refusal(json!(5), "resources/read", json!({"uri": "demo://readme"}))
            .await,
        None
    );
    assert_eq!(
        s.refusal(json!(6), "resources/read", json!({"uri": "demo://secret"}))
            .await
            .as_deref(),
        Some("resource_blocked")
    );
    // Tools were left at allow_all.
    assert_eq!(s.names("tools").await.len(), 3);

    // A name the live list does not have cannot be allowed, and changes nothing.
    let (status, v) = admin
        .call(
            Method::PUT,
            &format!("{}/tools", features_path(&p)),
            Some(json!({"mode": "allow_selected", "allowed": ["nope"]})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("unknown_feature"))
    );
    assert_eq!(s.names("tools").await.len(), 3);
}

#[tokio::test]
async fn a_new_tool_stays_blocked_until_allowed_and_a_changed_one_is_blocked_again() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let mut s = Session::open(&stack.envoy.mcp_url("eng", "demo"), &p.token).await;
    refresh(&admin, &p).await;
    set(
        &admin,
        &p,
        "tools",
        json!({"mode": "allow_selected", "allowed": ["echo"]}),
    )
    .await;

    // A tool appears upstream: neither listed nor callable, before and after a refresh.
    put_upstream_tool(&stack.demo, "fresh", "Echo, freshly added").await;
    assert_eq!(s.names("tools").await, strings(&["echo"]));
    let call = json!({"name": "fresh", "arguments": {"text": "x"}});
    assert_eq!(
        s.refusal(json!(1), "tools/call", call.clone())
            .await
            .as_deref(),
        Some("tool_blocked")
    );
    let found = refresh(&admin, &p).await;
    assert!(
        found["changes"]
            .as_array()
            .unwrap()
            .contains(&json!({"change": "new", "kind": "tools", "name": "fresh"})),
        "{found}"
    );
    assert_eq!(
        status_of(&admin, &p, "tools", "fresh").await,
        "not_selected"
    );
    assert_eq!(
        s.refusal(json!(2), "tools/call", call.clone())
            .await
            .as_deref(),
        Some("tool_blocked")
    );

    // Allowed: listed and callable on the next request.
    approve(&admin, &p, "tools", &["fresh"]).await;
    assert_eq!(s.names("tools").await, strings(&["echo", "fresh"]));
    assert_eq!(s.refusal(json!(3), "tools/call", call.clone()).await, None);

    // Its definition changes upstream (a rug-pull): the list hides it at once, since
    // the filter compares definitions; the refresh sees the change and blocks calls.
    put_upstream_tool(&stack.demo, "fresh", "Now also reads your files").await;
    assert_eq!(s.names("tools").await, strings(&["echo"]));
    let found = refresh(&admin, &p).await;
    assert!(
        found["changes"].as_array().unwrap().contains(
            &json!({"change": "changed", "kind": "tools", "name": "fresh", "was_approved": true})
        ),
        "{found}"
    );
    assert_eq!(status_of(&admin, &p, "tools", "fresh").await, "changed");
    assert_eq!(
        s.refusal(json!(4), "tools/call", call.clone())
            .await
            .as_deref(),
        Some("tool_blocked")
    );
    let audit = admin.get("/api/v1/audit?kind=admin&limit=100").await.1;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"feature.new"), "{actions:?}");
    assert!(actions.contains(&"feature.changed"), "{actions:?}");

    // Approved again, at the new definition.
    approve(&admin, &p, "tools", &["fresh"]).await;
    assert_eq!(status_of(&admin, &p, "tools", "fresh").await, "offered");
    assert_eq!(s.names("tools").await, strings(&["echo", "fresh"]));
    assert_eq!(s.refusal(json!(5), "tools/call", call).await, None);
}

#[tokio::test]
async fn provisioning_needs_features_manage_and_a_refused_call_changes_nothing() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    refresh(&owner, &p).await;
    let gatekeeper = caller_with(&owner, "gatekeeper", vec!["gateways.manage"]).await;
    let before = owner.get(&features_path(&p)).await.1;
    for (method, path, body) in [
        (
            Method::PUT,
            format!("{}/tools", features_path(&p)),
            json!({"mode": "block_all"}),
        ),
        (
            Method::POST,
            format!("{}/tools/approve", features_path(&p)),
            json!({"names": ["echo"]}),
        ),
        (
            Method::POST,
            format!("{}/refresh", features_path(&p)),
            json!({}),
        ),
    ] {
        let (status, v) = gatekeeper.call(method, &path, Some(body)).await;
        assert_eq!(
            (status, v["error"]["capability"].as_str()),
            (403, Some("features.manage")),
            "{path}: {v}"
        );
    }
    assert_eq!(owner.get(&features_path(&p)).await.1, before);
    // Reading needs only gateways.read, which gateways.manage brings.
    let (status, _) = gatekeeper.get(&features_path(&p)).await;
    assert_eq!(status, 200);
    let mut s = Session::open(&stack.envoy.mcp_url("eng", "demo"), &p.token).await;
    assert_eq!(s.names("tools").await.len(), 3);
}

/// Provisioning decides on what Envoy's MCP filter read of the body, so a POST it could
/// not read as one whole message must be refused, never passed as if it named no tool:
/// a batch (no metadata at all), a body that is not JSON-RPC, and one past the parse
/// limit. A large body within the limit, with the tool's name after its arguments, is
/// read whole and decided on its real name.
#[tokio::test]
async fn a_body_envoy_could_not_read_whole_is_refused_not_passed_unchecked() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let mut s = Session::open(&stack.envoy.mcp_url("eng", "demo"), &p.token).await;
    refresh(&admin, &p).await;
    set(
        &admin,
        &p,
        "tools",
        json!({"mode": "allow_selected", "allowed": ["echo"]}),
    )
    .await;
    let call = |id: i64, name: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": name, "arguments": {}}})
    };
    let refused = |reply: &Reply| {
        (
            reply.status,
            reply.message["error"]["code"].as_str().map(str::to_owned),
        )
    };

    let batch = json!([call(1, "echo"), call(2, "whoami")]).to_string();
    let reply = s.send_raw(batch, None).await;
    assert_eq!(
        refused(&reply),
        (400, Some("request_unreadable".into())),
        "{}",
        reply.message
    );
    let reply = s.send_raw("whoami please".into(), None).await;
    assert_eq!(refused(&reply), (400, Some("request_unreadable".into())));

    // 100 kB of arguments before the name and the method: past Envoy's default parse
    // limit (8 KiB), within the one the shipped configs set (1 MiB).
    let padding = "x".repeat(100_000);
    let late_name = |id: i64, name: &str, text: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"params":{{"arguments":{{"text":"{text}"}},"name":"{name}"}},"method":"tools/call"}}"#
        )
    };
    let blocked = s
        .send_raw(late_name(3, "whoami", &padding), Some(json!(3)))
        .await;
    assert_eq!(blocked.status, 200, "{}", blocked.message);
    assert_eq!(
        blocked.message["error"]["data"]["code"], "tool_blocked",
        "{}",
        blocked.message
    );
    let echoed = s
        .send_raw(late_name(4, "echo", &padding), Some(json!(4)))
        .await;
    assert_eq!(
        echoed.message["result"]["content"][0]["text"].as_str(),
        Some(padding.as_str()),
        "a large body of an offered tool goes through whole"
    );

    // Past the 1 MiB limit: unreadable whole, so refused whatever it names.
    let huge = "x".repeat(1_100_000);
    let reply = s
        .send_raw(late_name(5, "echo", &huge), Some(json!(5)))
        .await;
    assert_eq!(
        refused(&reply),
        (413, Some("request_too_large".into())),
        "{}",
        reply.message
    );
    // And the session is none the worse.
    assert_eq!(s.names("tools").await, strings(&["echo"]));
}
