//! The MCP endpoint `/mcp/{gateway}`: one session toward the client, one (opened
//! lazily) toward each server it uses. Lists merge every server the caller may use
//! now; a use (`tools/call`, `prompts/get`, `resources/read`, ...) goes to the one
//! server its name says. Each server a request touches is checked on that request.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use mcpguard_core::check::{
    CALLER_HEADER, CHECKED_HEADER, CheckResponse, Checked, Credential, DenyCode, EachServer,
    MAX_EACH_SERVER,
};
use mcpguard_core::features::BLOCKED_RPC_CODE;
use mcpguard_core::names::Naming;
use mcpguard_core::route::is_valid_slug;
use serde_json::{Value, json};

use crate::App;
use crate::cursor::{Cursor, MAX_UPSTREAM_CURSOR};
use crate::policy::{Ask, Each};
use crate::session::{Session, UpstreamSession};
use crate::upstream::{Target, UpstreamError};

/// Protocol versions the gateway URL speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/mcp/{gateway}",
            post(message).get(stream).delete(end_session),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app)
}

/// One request's caller and gateway, as Envoy and the filter hand them over.
pub(crate) struct Caller {
    credential: Credential,
    pub(crate) gateway: String,
    request_id: Option<String>,
    /// The filter's check of the one server item this request uses, if it made one.
    checked: Option<Checked>,
}

impl Caller {
    /// The filter's word on who is calling; without it, nothing is done (only
    /// requests the filter allowed carry it, and it removes any a client sends).
    fn of(headers: &HeaderMap, gateway: String) -> Result<Caller, Box<Response>> {
        if !is_valid_slug(&gateway) {
            return Err(Box::new(http_refusal(DenyCode::UnknownRoute)));
        }
        let credential = headers
            .get(CALLER_HEADER)
            .and_then(|v| serde_json::from_slice::<Credential>(v.as_bytes()).ok())
            .ok_or_else(|| Box::new(http_refusal(DenyCode::TokenMissing)))?;
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|id| mcpguard_core::check::bounded_request_id(id).to_owned());
        // Unreadable, it is as if absent: the item is checked here instead.
        let checked = headers
            .get(CHECKED_HEADER)
            .and_then(|v| serde_json::from_slice::<Checked>(v.as_bytes()).ok());
        Ok(Caller {
            credential,
            gateway,
            request_id,
            checked,
        })
    }

    /// The answer for `server`'s `item` for `method`: the filter's, when it checked
    /// exactly that on this request, else a check made now.
    async fn answer(&self, app: &App, server: &str, method: &str, item: &str) -> CheckResponse {
        match &self.checked {
            Some(c) if c.server == server && c.method == method && c.item == item => {
                c.answer.clone()
            }
            _ => app.policy.check(self.ask(server, method, Some(item))).await,
        }
    }

    pub(crate) fn ask<'a>(
        &'a self,
        server: &'a str,
        method: &'a str,
        item: Option<&'a str>,
    ) -> Ask<'a> {
        Ask {
            caller: &self.credential,
            gateway: &self.gateway,
            server,
            method: Some(method),
            item,
            request_id: self.request_id.as_deref(),
        }
    }
}

fn http_refusal(code: DenyCode) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::FORBIDDEN);
    json_response(status, code.body())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn rpc_result(id: &Value, result: Value) -> Response {
    json_response(
        StatusCode::OK,
        json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
    )
}

fn rpc_error(status: StatusCode, id: &Value, code: i64, message: &str) -> Response {
    json_response(
        status,
        json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            .to_string(),
    )
}

/// A refused use of one server: a JSON-RPC error naming the layer, as the filter
/// answers a blocked item; the session goes on.
fn rpc_refusal(id: &Value, code: DenyCode) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {
                "code": BLOCKED_RPC_CODE,
                "message": format!("{}: {}", code.as_str(), code.message()),
                "data": {"code": code.as_str()},
            }
        })
        .to_string(),
    )
}

/// The session a request names, or the answer that it names none usable: 400 when
/// missing, 404 when unknown, ended, of another gateway, or bound to another
/// credential (the client initializes again).
fn session_of(
    app: &App,
    headers: &HeaderMap,
    caller: &Caller,
) -> Result<Arc<Session>, Box<Response>> {
    let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
        return Err(Box::new(rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            -32600,
            "Mcp-Session-Id required: initialize first",
        )));
    };
    app.sessions
        .get(&app.key, id, &caller.credential)
        .filter(|s| s.gateway == caller.gateway)
        .ok_or_else(|| {
            Box::new(rpc_error(
                StatusCode::NOT_FOUND,
                &Value::Null,
                -32001,
                "session not found",
            ))
        })
}

async fn message(
    State(app): State<Arc<App>>,
    Path(gateway): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match Caller::of(&headers, gateway) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return rpc_error(StatusCode::BAD_REQUEST, &Value::Null, -32700, "parse error");
    };
    if !message.is_object() {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            -32600,
            "one JSON-RPC message per request (no batches)",
        );
    }
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let id = message.get("id").cloned();
    if method.as_deref() == Some("initialize") {
        return initialize(&app, &caller, id.as_ref(), &message);
    }
    let session = match session_of(&app, &headers, &caller) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    // Present: `session_of` found the session by it.
    let session_id = headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let lists = |spec| Lister {
        app: &app,
        caller: &caller,
        session: &session,
        session_id,
        spec,
    };
    let (Some(method), Some(id)) = (method, id) else {
        // A notification, or the client's answer to a request of a server.
        if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
            cancel(&app, &session, &message).await;
        } else if message.get("method").is_none() {
            answer_server(&app, &caller, &session, message).await;
        }
        return StatusCode::ACCEPTED.into_response();
    };
    match method.as_str() {
        "ping" => rpc_result(&id, json!({})),
        "logging/setLevel" => set_level(&app, &caller, &session, &id, &message).await,
        "tools/list" => lists(&TOOLS).page(&id, &message).await,
        "prompts/list" => lists(&PROMPTS).page(&id, &message).await,
        "resources/list" => lists(&RESOURCES).page(&id, &message).await,
        "resources/templates/list" => lists(&TEMPLATES).page(&id, &message).await,
        "tools/call" | "prompts/get" => {
            use_item(
                &app,
                &caller,
                &session,
                id,
                message,
                &method,
                "/params/name",
                Naming::Name,
            )
            .await
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            use_item(
                &app,
                &caller,
                &session,
                id,
                message,
                &method,
                "/params/uri",
                Naming::Uri,
            )
            .await
        }
        "completion/complete" => {
            let (pointer, naming) =
                match message.pointer("/params/ref/type").and_then(Value::as_str) {
                    Some("ref/prompt") => ("/params/ref/name", Naming::Name),
                    _ => ("/params/ref/uri", Naming::Uri),
                };
            use_item(
                &app, &caller, &session, id, message, &method, pointer, naming,
            )
            .await
        }
        _ => rpc_error(StatusCode::OK, &id, -32601, "method not found"),
    }
}

fn initialize(app: &App, caller: &Caller, id: Option<&Value>, message: &Value) -> Response {
    let Some(id) = id else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            -32600,
            "initialize needs an id",
        );
    };
    let asked = message
        .pointer("/params/protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    let version = PROTOCOL_VERSIONS
        .into_iter()
        .find(|v| *v == asked)
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    let Ok(session_id) = app.key.issue(&caller.credential) else {
        return rpc_error(StatusCode::SERVICE_UNAVAILABLE, id, -32603, "no randomness");
    };
    let declared = message
        .pointer("/params/capabilities")
        .unwrap_or(&Value::Null);
    let session = Session::new(&caller.gateway, version).with_client_capabilities(declared);
    if !app.sessions.insert(session_id.clone(), session) {
        return rpc_error(
            StatusCode::SERVICE_UNAVAILABLE,
            id,
            -32603,
            "too many sessions",
        );
    }
    // One server toward the client: everything a gateway's servers may offer. Upstream
    // sessions are opened when first used.
    let result = json!({
        "protocolVersion": version,
        "capabilities": {
            "tools": {},
            "prompts": {},
            "resources": {},
            "completions": {},
            "logging": {},
        },
        "serverInfo": {
            "name": format!("mcpguard gateway {}", caller.gateway),
            "version": env!("CARGO_PKG_VERSION"),
        },
    });
    let mut response = rpc_result(id, result);
    if let Ok(v) = HeaderValue::from_str(&session_id) {
        response.headers_mut().insert("mcp-session-id", v);
    }
    response
}

/// One list method: which member of the result holds the items, which member of an
/// item names it, and how names are mapped.
struct ListSpec {
    method: &'static str,
    key: &'static str,
    field: &'static str,
    naming: Naming,
}

const TOOLS: ListSpec = ListSpec {
    method: "tools/list",
    key: "tools",
    field: "name",
    naming: Naming::Name,
};
const PROMPTS: ListSpec = ListSpec {
    method: "prompts/list",
    key: "prompts",
    field: "name",
    naming: Naming::Name,
};
const RESOURCES: ListSpec = ListSpec {
    method: "resources/list",
    key: "resources",
    field: "uri",
    naming: Naming::Uri,
};
const TEMPLATES: ListSpec = ListSpec {
    method: "resources/templates/list",
    key: "resourceTemplates",
    field: "uriTemplate",
    naming: Naming::Uri,
};

/// One page of a merged list, for one session.
struct Lister<'a> {
    app: &'a App,
    caller: &'a Caller,
    session: &'a Session,
    /// The session's id, which its cursors are bound to.
    session_id: &'a str,
    spec: &'a ListSpec,
}

/// One server's part of a page: its items, renamed, and its own cursor when its list
/// goes on.
type Part = (Vec<Value>, Option<String>);

impl Lister<'_> {
    /// A page of the merged list: one upstream page from each server that still has
    /// one (without a cursor: every server of the gateway the caller may use now), each
    /// checked for this list (all in one exchange with the policy service), asked at
    /// once, in slug order. One that is refused, down
    /// or slow is left out (and logged) and the others still answer; the `nextCursor`
    /// names each server whose list goes on.
    async fn page(&self, id: &Value, message: &Value) -> Response {
        let (app, caller, spec) = (self.app, self.caller, self.spec);
        let mut cursor = match message.pointer("/params/cursor") {
            None | Some(Value::Null) => None,
            Some(c) => match c
                .as_str()
                .and_then(|text| Cursor::decode(&app.key, self.session_id, spec.method, text))
            {
                Some(c) => Some(c),
                None => return rpc_error(StatusCode::OK, id, -32602, "invalid cursor"),
            },
        };
        // A later page asks for at most MAX_EACH_SERVER of the servers its cursor
        // names; the others go on in its own cursor as they came.
        let mut later = match &mut cursor {
            Some(c) => c.servers.split_off(c.servers.len().min(MAX_EACH_SERVER)),
            None => Vec::new(),
        };
        let each = match &cursor {
            None => EachServer::All,
            Some(c) => EachServer::Only(c.servers.iter().map(|(s, _)| s.clone()).collect()),
        };
        let Each {
            mut servers,
            mut answers,
        } = match app
            .policy
            .check_each(caller.ask("", spec.method, None), each)
            .await
        {
            Ok(each) => each,
            Err(code) => return rpc_refusal(id, code),
        };
        servers.sort();
        servers.dedup();
        // Where each server's list starts on this page: its own cursor, or (a first
        // page) its beginning. A server the cursor names that the gateway no longer
        // exposes is left out.
        let asked: Vec<(String, Option<String>)> = match cursor {
            None => servers.into_iter().map(|s| (s, None)).collect(),
            Some(c) => c
                .servers
                .into_iter()
                .filter(|(server, _)| {
                    let exposed = servers.binary_search(server).is_ok();
                    if !exposed {
                        tracing::info!(
                            gateway = caller.gateway,
                            server,
                            method = spec.method,
                            "left out of the list: no longer on the gateway"
                        );
                    }
                    exposed
                })
                .map(|(s, c)| (s, Some(c)))
                .collect(),
        };
        let parts = futures_util::future::join_all(asked.iter().map(|(server, cursor)| {
            let answer = answers.remove(server);
            self.part(server, cursor.as_deref(), answer)
        }))
        .await;
        let mut items = Vec::new();
        let mut next = Vec::new();
        for ((server, _), (page, more)) in asked.into_iter().zip(parts) {
            items.extend(page);
            if let Some(c) = more {
                next.push((server, c));
            }
        }
        next.append(&mut later);
        let mut result = json!({ spec.key: items });
        if !next.is_empty() {
            let cursor = Cursor {
                method: spec.method.to_owned(),
                servers: next,
            };
            result["nextCursor"] = json!(cursor.encode(&app.key, self.session_id));
        }
        rpc_result(id, result)
    }

    /// One server's part of a page, or none (logged) when it is refused (`answer`,
    /// its check for this list), down or slow.
    async fn part(
        &self,
        server: &str,
        cursor: Option<&str>,
        answer: Option<CheckResponse>,
    ) -> Part {
        let (caller, spec) = (self.caller, self.spec);
        let deadline = self.app.upstreams.timeout + self.app.upstreams.timeout / 2;
        let answer = answer.unwrap_or(CheckResponse::Deny {
            code: DenyCode::PolicyUnavailable,
        });
        match tokio::time::timeout(deadline, self.one_page(server, cursor, answer)).await {
            Ok(Ok((items, more))) => {
                let more = more.filter(|c| {
                    let fits = c.len() <= MAX_UPSTREAM_CURSOR;
                    if !fits {
                        tracing::warn!(
                            gateway = caller.gateway,
                            server,
                            method = spec.method,
                            "list cut short: the server's cursor is over {MAX_UPSTREAM_CURSOR} bytes"
                        );
                    }
                    fits
                });
                (items, more)
            }
            Ok(Err(why)) => {
                tracing::info!(
                    gateway = caller.gateway,
                    server,
                    method = spec.method,
                    why,
                    "left out of the list"
                );
                (Vec::new(), None)
            }
            Err(_) => {
                tracing::warn!(
                    gateway = caller.gateway,
                    server,
                    method = spec.method,
                    "left out of the list: no answer in time"
                );
                (Vec::new(), None)
            }
        }
    }

    /// One upstream page of `server`'s list from `cursor`, as its check for this
    /// list (`answer`) allows, renamed; `Err` says why it has none.
    async fn one_page(
        &self,
        server: &str,
        cursor: Option<&str>,
        answer: CheckResponse,
    ) -> Result<Part, String> {
        let (app, caller, session, spec) = (self.app, self.caller, self.session, self.spec);
        let (upstream, inject, list_filter) = match answer {
            CheckResponse::Allow {
                upstream,
                inject,
                list_filter,
            } => (upstream, inject, list_filter),
            CheckResponse::Deny { code } => return Err(format!("refused {}", code.as_str())),
            CheckResponse::Gateway { .. } => return Err("a gateway answer for a server".into()),
        };
        let target =
            Target::of(&upstream, inject.map(|h| (h.name, h.value))).map_err(|e| e.to_string())?;
        let mut params = json!({});
        if let Some(c) = cursor {
            params["cursor"] = json!(c);
        }
        let request = json!({"jsonrpc": "2.0", "id": "mcpguard-list", "method": spec.method, "params": params});
        let mut answer = exchange(app, session, server, &target, &request)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(filter) = &list_filter {
            filter.filter_message(&mut answer);
        }
        let Some(result) = answer.get_mut("result") else {
            return Err(format!(
                "no result: {}",
                answer.get("error").unwrap_or(&Value::Null)
            ));
        };
        let more = result
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let items = match result.get_mut(spec.key).and_then(Value::as_array_mut) {
            Some(page) => std::mem::take(page),
            None => Vec::new(),
        };
        let items = items
            .into_iter()
            .filter_map(|mut item| {
                let own = item.get(spec.field)?.as_str()?;
                let Some(exposed) = spec.naming.expose(server, own) else {
                    tracing::warn!(
                        gateway = caller.gateway,
                        server,
                        name = own,
                        "left out: its gateway name would be over 64 characters"
                    );
                    return None;
                };
                item[spec.field] = Value::String(exposed);
                Some(item)
            })
            .collect();
        Ok((items, more))
    }
}

/// `logging/setLevel`: sent to every server of the gateway the caller may use now,
/// each checked on its own; `{}` when at least one accepted it, else a JSON-RPC error
/// saying why each did not.
async fn set_level(
    app: &App,
    caller: &Caller,
    session: &Session,
    id: &Value,
    message: &Value,
) -> Response {
    const METHOD: &str = "logging/setLevel";
    let answers = match app
        .policy
        .check_each(caller.ask("", METHOD, None), EachServer::All)
        .await
    {
        Ok(each) => each.answers,
        Err(code) => return rpc_refusal(id, code),
    };
    let outcomes =
        futures_util::future::join_all(answers.into_iter().map(|(server, answer)| async move {
            let deadline = app.upstreams.timeout + app.upstreams.timeout / 2;
            let outcome = tokio::time::timeout(
                deadline,
                set_level_one(app, session, &server, answer, message),
            )
            .await
            .unwrap_or_else(|_| Err("no answer in time".into()));
            if let Err(why) = &outcome {
                tracing::info!(
                    gateway = caller.gateway,
                    server,
                    why,
                    "logging/setLevel not accepted"
                );
            }
            (server, outcome)
        }))
        .await;
    if outcomes.iter().any(|(_, o)| o.is_ok()) {
        return rpc_result(id, json!({}));
    }
    let why: Vec<String> = outcomes
        .iter()
        .filter_map(|(server, o)| o.as_ref().err().map(|e| format!("{server}: {e}")))
        .collect();
    let why = if why.is_empty() {
        "the gateway has no server".to_owned()
    } else {
        why.join("; ")
    };
    rpc_error(
        StatusCode::OK,
        id,
        -32603,
        &format!("no server accepted {METHOD}: {why}"),
    )
}

/// One server's answer to `logging/setLevel`; `Err` says why it did not accept it.
async fn set_level_one(
    app: &App,
    session: &Session,
    server: &str,
    answer: CheckResponse,
    message: &Value,
) -> Result<(), String> {
    let (upstream, inject) = match answer {
        CheckResponse::Allow {
            upstream, inject, ..
        } => (upstream, inject),
        CheckResponse::Deny { code } => return Err(format!("refused {}", code.as_str())),
        CheckResponse::Gateway { .. } => return Err("a gateway answer for a server".into()),
    };
    let target =
        Target::of(&upstream, inject.map(|h| (h.name, h.value))).map_err(|e| e.to_string())?;
    let mut request = message.clone();
    request["id"] = json!("mcpguard-set-level");
    let answer = exchange(app, session, server, &target, &request)
        .await
        .map_err(|e| e.to_string())?;
    match answer.get("error") {
        None => Ok(()),
        Some(e) => Err(e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("an error")
            .to_owned()),
    }
}

/// A use of one server's item: checked for that server and item, then sent there
/// with the server's own name; the reply streams back as it comes (progress
/// notifications included). A resource read's reply is read whole, to map its URIs.
#[allow(clippy::too_many_arguments)]
async fn use_item(
    app: &App,
    caller: &Caller,
    session: &Arc<Session>,
    id: Value,
    mut message: Value,
    method: &str,
    pointer: &str,
    naming: Naming,
) -> Response {
    let Some(exposed) = message
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return rpc_error(StatusCode::OK, &id, -32602, &format!("{pointer} missing"));
    };
    let Some((server, own)) = naming.resolve(&exposed) else {
        return rpc_error(StatusCode::OK, &id, -32602, &format!("unknown: {exposed}"));
    };
    let (upstream, inject) = match caller.answer(app, server, method, own).await {
        CheckResponse::Allow {
            upstream, inject, ..
        } => (upstream, inject),
        CheckResponse::Deny { code } => return rpc_refusal(&id, code),
        CheckResponse::Gateway { .. } => return rpc_refusal(&id, DenyCode::PolicyUnavailable),
    };
    let target = match Target::of(&upstream, inject.map(|h| (h.name, h.value))) {
        Ok(t) => t,
        Err(e) => return rpc_error(StatusCode::OK, &id, -32603, &format!("{server}: {e}")),
    };
    if let Some(slot) = message.pointer_mut(pointer) {
        *slot = Value::String(own.to_owned());
    }
    if method == "resources/read" {
        return match exchange(app, session, server, &target, &message).await {
            Ok(mut answer) => {
                if let Some(contents) = answer
                    .pointer_mut("/result/contents")
                    .and_then(Value::as_array_mut)
                {
                    for c in contents {
                        if let Some(uri) = c
                            .get("uri")
                            .and_then(Value::as_str)
                            .and_then(|u| naming.expose(server, u))
                        {
                            c["uri"] = Value::String(uri);
                        }
                    }
                }
                json_response(StatusCode::OK, answer.to_string())
            }
            Err(e) => rpc_error(StatusCode::OK, &id, -32603, &format!("{server}: {e}")),
        };
    }
    let flight = InFlight::start(session, &id, server);
    let (reply, opened) = match send(app, session, server, &target, &message).await {
        Ok(r) => r,
        Err(e) => return rpc_error(StatusCode::OK, &id, -32603, &format!("{server}: {e}")),
    };
    if reply.status != 200 {
        return rpc_error(
            StatusCode::OK,
            &id,
            -32603,
            &format!("{server}: upstream answered {}", reply.status),
        );
    }
    let content_type = if reply.content_type.is_empty() {
        "application/json".to_owned()
    } else {
        reply.content_type.clone()
    };
    let is_sse = content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"));
    // The request stays in flight (cancellable) until its reply has streamed through.
    let body = if is_sse {
        // Requests the server makes of the client on the way are relayed, or refused.
        let asks = crate::asks::Asks {
            upstreams: app.upstreams.clone(),
            session: session.clone(),
            server: server.to_owned(),
            target,
            opened,
        };
        Body::from_stream(asks.relay(reply.response, flight))
    } else if let Some(len) = reply
        .response
        .content_length()
        .filter(|&n| n <= WHOLE_REPLY as u64)
    {
        // One JSON message of a known, small length is of no use to the client before
        // its last byte: it goes out whole, with its length, so Envoy (and the filter
        // in it) handle one body frame instead of a chunked stream and its end.
        let read = tokio::time::timeout(app.upstreams.timeout, reply.response.bytes()).await;
        drop(flight);
        match read {
            Ok(Ok(bytes)) if bytes.len() as u64 == len => Body::from(bytes),
            failed => {
                let why = match failed {
                    Ok(Ok(_)) => "reply cut short".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no reply within {:?}", app.upstreams.timeout),
                };
                return rpc_error(StatusCode::OK, &id, -32603, &format!("{server}: {why}"));
            }
        }
    } else {
        Body::from_stream(reply.response.bytes_stream().map(move |chunk| {
            let _ = &flight;
            chunk
        }))
    };
    let mut response = Response::new(body);
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Largest call reply of a known length (JSON, not SSE) read whole and sent on with
/// its length; longer ones stream through.
const WHOLE_REPLY: usize = 1 << 20;

/// A request in flight to a server, known to `notifications/cancelled` until dropped.
pub(crate) struct InFlight {
    session: Arc<Session>,
    key: String,
}

impl InFlight {
    fn start(session: &Arc<Session>, id: &Value, server: &str) -> InFlight {
        let key = id.to_string();
        if let Ok(mut m) = session.in_flight.lock() {
            m.insert(key.clone(), server.to_owned());
        }
        InFlight {
            session: session.clone(),
            key,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut m) = self.session.in_flight.lock() {
            m.remove(&self.key);
        }
    }
}

/// Sends the client's answer to a server's request back to the server that asked,
/// under that server's own id, if it may still be used; an answer to nothing asked is
/// dropped.
async fn answer_server(app: &App, caller: &Caller, session: &Session, mut message: Value) {
    let Some(asked) = message.get("id").and_then(|id| session.answered(id)) else {
        return;
    };
    let server = asked.server.as_str();
    let target = match app
        .policy
        .check(caller.ask(server, &asked.method, None))
        .await
    {
        CheckResponse::Allow {
            upstream, inject, ..
        } => Target::of(&upstream, inject.map(|h| (h.name, h.value))),
        CheckResponse::Deny { code } => {
            tracing::info!(
                server,
                code = code.as_str(),
                "client's answer not sent: refused now"
            );
            return;
        }
        CheckResponse::Gateway { .. } => return,
    };
    let Ok(target) = target else { return };
    let upstream = session.upstreams.lock().await.get(server).cloned();
    let Some(up) = upstream.filter(|u| u.target.same_upstream(&target)) else {
        return;
    };
    message["id"] = asked.id;
    let sent = app
        .upstreams
        .post(
            &target,
            up.id.as_deref(),
            up.protocol_version.as_deref(),
            &message,
        )
        .await;
    if let Err(e) = sent {
        tracing::debug!(server, error = %e, "sending the client's answer failed");
    }
}

/// Forwards a cancellation to the server its request went to.
async fn cancel(app: &App, session: &Session, message: &Value) {
    let Some(request) = message.pointer("/params/requestId") else {
        return;
    };
    let server = session
        .in_flight
        .lock()
        .ok()
        .and_then(|m| m.get(&request.to_string()).cloned());
    let Some(server) = server else { return };
    let upstream = session.upstreams.lock().await.get(&server).cloned();
    if let Some(up) = upstream {
        let sent = app
            .upstreams
            .post(
                &up.target,
                up.id.as_deref(),
                up.protocol_version.as_deref(),
                message,
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(server, error = %e, "forwarding a cancellation failed");
        }
    }
}

/// The upstream session with `server` for this session ([`Session::upstream`]).
pub(crate) async fn open(
    app: &App,
    session: &Session,
    server: &str,
    target: &Target,
) -> Result<(Option<String>, Option<String>), UpstreamError> {
    session.upstream(&app.upstreams, server, target).await
}

/// A request answered whole by `server`; a session the upstream dropped is opened
/// again once.
async fn exchange(
    app: &App,
    session: &Session,
    server: &str,
    target: &Target,
    message: &Value,
) -> Result<Value, UpstreamError> {
    let mut retried = false;
    loop {
        let (sid, version) = open(app, session, server, target).await?;
        match app
            .upstreams
            .request_reply(target, sid.as_deref(), version.as_deref(), message)
            .await
        {
            Err(UpstreamError::SessionGone) if !retried => {
                retried = true;
                session.forget_upstream(server, sid.as_deref()).await;
            }
            other => return other.map(|(_, answer)| answer),
        }
    }
}

/// The upstream session a reply came on: its id and protocol version.
type Opened = (Option<String>, Option<String>);

/// A request sent to `server`, its reply to be streamed, and the upstream session it
/// went on; like [`exchange`] on a dropped session.
async fn send(
    app: &App,
    session: &Session,
    server: &str,
    target: &Target,
    message: &Value,
) -> Result<(crate::upstream::Reply, Opened), UpstreamError> {
    let mut retried = false;
    loop {
        let (sid, version) = open(app, session, server, target).await?;
        match app
            .upstreams
            .post(target, sid.as_deref(), version.as_deref(), message)
            .await
        {
            Err(UpstreamError::SessionGone) if !retried => {
                retried = true;
                session.forget_upstream(server, sid.as_deref()).await;
            }
            other => return other.map(|reply| (reply, (sid, version))),
        }
    }
}

/// The caller and the session it names, for a request that must have one (GET,
/// DELETE): refused as [`Caller::of`] and [`session_of`] refuse.
fn caller_and_session(
    app: &App,
    headers: &HeaderMap,
    gateway: String,
) -> Result<(Caller, Arc<Session>), Box<Response>> {
    let caller = Caller::of(headers, gateway)?;
    let session = session_of(app, headers, &caller)?;
    Ok((caller, session))
}

/// GET: the session's server-initiated stream ([`crate::stream`]).
async fn stream(
    State(app): State<Arc<App>>,
    Path(gateway): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (caller, session) = match caller_and_session(&app, &headers, gateway) {
        Ok(both) => both,
        Err(r) => return *r,
    };
    let accepts_sse = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream") || v.contains("*/*"));
    if !accepts_sse {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            &Value::Null,
            -32600,
            "the GET stream is text/event-stream: say so in Accept",
        );
    }
    crate::stream::serve(app, caller, session)
}

/// DELETE: ends the session and every upstream session it opened.
async fn end_session(
    State(app): State<Arc<App>>,
    Path(gateway): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match caller_and_session(&app, &headers, gateway) {
        Ok((_, session)) => session,
        Err(r) => return *r,
    };
    if let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        // Ends its GET stream too.
        app.sessions.remove(id);
    }
    let upstreams: Vec<UpstreamSession> = session
        .upstreams
        .lock()
        .await
        .drain()
        .map(|(_, u)| u)
        .collect();
    futures_util::future::join_all(upstreams.iter().filter_map(|u| {
        let id = u.id.as_deref()?;
        Some(
            app.upstreams
                .end(&u.target, id, u.protocol_version.as_deref()),
        )
    }))
    .await;
    StatusCode::NO_CONTENT.into_response()
}
