//! Feature provisioning: which of a server's tools, prompts and resources an exposure
//! (gateway x server) offers. Pure logic shared by the policy service (which stores the
//! live lists and decides) and the filter (which filters list replies on the response
//! path and answers a blocked call as a JSON-RPC error): definition hashes, list
//! filtering for plain JSON and SSE bodies, and the JSON-RPC refusal.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::check::DenyCode;

/// The three kinds of server features, each provisioned on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Tools,
    Prompts,
    Resources,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Tools, Kind::Prompts, Kind::Resources];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Tools => "tools",
            Kind::Prompts => "prompts",
            Kind::Resources => "resources",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The JSON-RPC method that lists this kind.
    pub const fn list_method(self) -> &'static str {
        match self {
            Kind::Tools => "tools/list",
            Kind::Prompts => "prompts/list",
            Kind::Resources => "resources/list",
        }
    }

    /// The JSON-RPC method that uses one item of this kind.
    pub const fn use_method(self) -> &'static str {
        match self {
            Kind::Tools => "tools/call",
            Kind::Prompts => "prompts/get",
            Kind::Resources => "resources/read",
        }
    }

    /// The kind a list method lists.
    pub fn of_list_method(method: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.list_method() == method)
    }

    /// The kind a method uses one item of.
    pub fn of_use_method(method: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.use_method() == method)
    }

    /// The member of an item (and of the use method's `params`) that names it.
    pub const fn key(self) -> &'static str {
        match self {
            Kind::Tools | Kind::Prompts => "name",
            Kind::Resources => "uri",
        }
    }

    /// The refusal of a call to a blocked item of this kind.
    pub const fn blocked(self) -> DenyCode {
        match self {
            Kind::Tools => DenyCode::ToolBlocked,
            Kind::Prompts => DenyCode::PromptBlocked,
            Kind::Resources => DenyCode::ResourceBlocked,
        }
    }

    /// The members of an item that make its definition: a change to any of them is a
    /// changed item (rug-pull safety). Volatile members (`_meta`, a resource's `size`
    /// or `annotations`) are left out so that they do not re-block an item.
    const fn definition_members(self) -> &'static [&'static str] {
        match self {
            Kind::Tools => &[
                "name",
                "title",
                "description",
                "inputSchema",
                "outputSchema",
                "annotations",
            ],
            Kind::Prompts => &["name", "title", "description", "arguments"],
            Kind::Resources => &["uri", "name", "title", "description", "mimeType"],
        }
    }
}

/// An exposure's mode for one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Everything the server offers (the default, and the behaviour before provisioning).
    #[default]
    AllowAll,
    /// Only the allowlisted items, each at the definition an admin approved.
    AllowSelected,
    /// Nothing.
    BlockAll,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::AllowAll => "allow_all",
            Mode::AllowSelected => "allow_selected",
            Mode::BlockAll => "block_all",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::AllowAll, Mode::AllowSelected, Mode::BlockAll]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// One item of a live list: its name (a resource's URI) and the hash of its definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    pub hash: String,
}

/// The name and definition hash of one item of a list reply, `None` when it has no
/// name (such an item is never offered under a filter).
pub fn item_of(kind: Kind, item: &Value) -> Option<Item> {
    let name = item.get(kind.key())?.as_str()?.to_owned();
    Some(Item {
        name,
        hash: definition_hash(kind, item),
    })
}

/// Hex SHA-256 of the canonical JSON (keys sorted, no spaces) of the item's
/// definition members: the same definition always hashes the same, whatever the
/// server's key order or whitespace.
pub fn definition_hash(kind: Kind, item: &Value) -> String {
    let mut canonical = String::from("{");
    let mut first = true;
    let mut members: Vec<&str> = kind.definition_members().to_vec();
    members.sort_unstable();
    for member in members {
        if let Some(value) = item.get(member) {
            if !first {
                canonical.push(',');
            }
            first = false;
            write_canonical(&Value::String(member.to_owned()), &mut canonical);
            canonical.push(':');
            write_canonical(value, &mut canonical);
        }
    }
    canonical.push('}');
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        // Scalars: serde_json's own compact form (a string is escaped the one way).
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// What a list reply may keep, sent by the policy service with the allow of a list
/// request on a restricted exposure: the items offered, each at the definition an
/// admin approved. An item of the reply whose name or definition is not here is
/// dropped, so a definition that changed upstream since the last refresh is hidden
/// at once, before the policy service has seen it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    pub kind: Kind,
    pub allowed: Vec<Item>,
}

impl ListFilter {
    fn keeps(&self, item: &Value) -> bool {
        item_of(self.kind, item).is_some_and(|it| self.allowed.contains(&it))
    }

    /// Drops what is not allowed from one JSON-RPC message; `true` if it changed.
    pub fn filter_message(&self, message: &mut Value) -> bool {
        let Some(items) = message
            .get_mut("result")
            .and_then(|r| r.get_mut(self.kind.as_str()))
            .and_then(Value::as_array_mut)
        else {
            return false;
        };
        let before = items.len();
        items.retain(|item| self.keeps(item));
        items.len() != before
    }

    /// The reply body with what the caller may not see removed. `content_type` picks
    /// plain JSON or an SSE stream (`text/event-stream`), each event's `data` a
    /// JSON-RPC message; an SSE event that is not JSON (a priming event, a comment) is
    /// kept as it is. `None` when a JSON body does not parse: the caller must not get
    /// it unfiltered.
    pub fn filter_body(&self, content_type: Option<&str>, body: &[u8]) -> Option<Vec<u8>> {
        let is_sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        if is_sse {
            let text = std::str::from_utf8(body).ok()?;
            return Some(self.filter_sse(text).into_bytes());
        }
        let mut message: Value = serde_json::from_slice(body).ok()?;
        if self.filter_message(&mut message) {
            serde_json::to_vec(&message).ok()
        } else {
            Some(body.to_vec())
        }
    }

    fn filter_sse(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        // Events end at a blank line; line ends may be \n, \r\n or \r (WHATWG).
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut rest = normalized.as_str();
        while !rest.is_empty() {
            let (event, tail) = match rest.find("\n\n") {
                Some(i) => (&rest[..i], &rest[i + 2..]),
                None => (rest, ""),
            };
            rest = tail;
            out.push_str(&self.filter_event(event));
            out.push_str(if tail.is_empty() && !normalized.ends_with("\n\n") {
                ""
            } else {
                "\n\n"
            });
        }
        out
    }

    fn filter_event(&self, event: &str) -> String {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return event.to_owned();
        }
        let Ok(mut message) = serde_json::from_str::<Value>(&data.join("\n")) else {
            return event.to_owned();
        };
        if !self.filter_message(&mut message) {
            return event.to_owned();
        }
        let mut lines: Vec<String> = event
            .lines()
            .filter(|l| !l.starts_with("data:"))
            .map(str::to_owned)
            .collect();
        lines.push(format!("data: {message}"));
        lines.join("\n")
    }
}

/// A JSON-RPC request id, as Envoy's MCP filter keeps it: a string, or a number
/// (which Envoy stores as a double, so integers beyond 2^53 lose precision there).
#[derive(Debug, Clone, PartialEq)]
pub enum RpcId {
    Number(f64),
    Text(String),
}

impl RpcId {
    /// From the bytes proxy-wasm's `get_property` gives for the metadata's `id`: a
    /// string's raw UTF-8, or a number as the 8 bytes of a little-endian double. An
    /// id of 8 printable ASCII characters is read as text: no integer id below 2^52
    /// encodes to such bytes (their low mantissa bytes are zero).
    pub fn from_property(bytes: &[u8]) -> Option<RpcId> {
        if let Ok(raw) = <[u8; 8]>::try_from(bytes)
            && !raw.iter().all(|b| (0x20..0x7f).contains(b))
        {
            let n = f64::from_le_bytes(raw);
            return n.is_finite().then_some(RpcId::Number(n));
        }
        std::str::from_utf8(bytes)
            .ok()
            .map(|s| RpcId::Text(s.to_owned()))
    }

    fn to_json(&self) -> Value {
        match self {
            // Integral ids go back as integers, as the client sent them.
            RpcId::Number(n) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 =>
            {
                #[allow(clippy::cast_possible_truncation)]
                Value::from(*n as i64)
            }
            RpcId::Number(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
            RpcId::Text(s) => Value::String(s.clone()),
        }
    }
}

/// JSON-RPC error code of a blocked item: in the range JSON-RPC leaves to servers.
pub const BLOCKED_RPC_CODE: i64 = -32003;

/// The JSON-RPC error answering a call to a blocked item, with the request's id
/// (`null` when it is not known). The mcpguard code leads the message and is in
/// `data.code`, so a model and a program can both read it.
pub fn blocked_reply(id: Option<&RpcId>, code: DenyCode) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.map_or(Value::Null, RpcId::to_json),
        "error": {
            "code": BLOCKED_RPC_CODE,
            "message": format!("{}: {}", code.as_str(), code.message()),
            "data": {"code": code.as_str()},
        }
    })
    .to_string()
}

/// The JSON-RPC error that replaces a list reply the filter could not read (fail
/// closed: the caller never gets an unfiltered list).
pub fn unfilterable_reply() -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": Value::Null,
        "error": {"code": -32603, "message": "mcpguard could not filter this list reply"}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tool(name: &str, description: &str) -> Value {
        json!({"name": name, "description": description, "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}})
    }

    fn allowing(kind: Kind, items: &[Value]) -> ListFilter {
        ListFilter {
            kind,
            allowed: items.iter().filter_map(|i| item_of(kind, i)).collect(),
        }
    }

    #[test]
    fn hash_ignores_key_order_whitespace_and_volatile_members() {
        let a: Value = serde_json::from_str(
            r#"{"name":"echo","inputSchema":{"type":"object","properties":{}},"description":"d"}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{ "description": "d", "_meta": {"x": 1}, "name": "echo", "inputSchema": {"properties": {}, "type": "object"} }"#,
        )
        .unwrap();
        assert_eq!(
            definition_hash(Kind::Tools, &a),
            definition_hash(Kind::Tools, &b)
        );
        let mut c = a.clone();
        c["description"] = json!("changed");
        assert_ne!(
            definition_hash(Kind::Tools, &a),
            definition_hash(Kind::Tools, &c)
        );
        let mut d = a.clone();
        d["inputSchema"]["properties"] = json!({"x": {"type": "string"}});
        assert_ne!(
            definition_hash(Kind::Tools, &a),
            definition_hash(Kind::Tools, &d)
        );
        let r1 = json!({"uri": "demo://a", "name": "a", "size": 1});
        let r2 = json!({"uri": "demo://a", "name": "a", "size": 2});
        assert_eq!(
            definition_hash(Kind::Resources, &r1),
            definition_hash(Kind::Resources, &r2)
        );
    }

    #[test]
    fn json_list_keeps_only_allowed_items_at_their_approved_definition() {
        let echo = tool("echo", "Echo");
        let whoami = tool("whoami", "Who");
        let filter = allowing(Kind::Tools, std::slice::from_ref(&echo));
        let reply = json!({"jsonrpc": "2.0", "id": 3, "result": {"tools": [echo, whoami, tool("echo2", "x")], "nextCursor": "c"}});
        let out = filter
            .filter_body(Some("application/json"), reply.to_string().as_bytes())
            .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> = out["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["echo"]);
        assert_eq!(out["id"], 3);
        assert_eq!(out["result"]["nextCursor"], "c");

        // The same name with another definition (a rug-pull before any refresh).
        let changed = json!({"jsonrpc": "2.0", "id": 4, "result": {"tools": [tool("echo", "Now exfiltrates")]}});
        let out = filter
            .filter_body(None, changed.to_string().as_bytes())
            .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["result"]["tools"], json!([]));
    }

    #[test]
    fn block_all_empties_the_list_and_errors_pass_unchanged() {
        let filter = ListFilter {
            kind: Kind::Prompts,
            allowed: vec![],
        };
        let reply =
            json!({"jsonrpc": "2.0", "id": "a", "result": {"prompts": [{"name": "greet"}]}});
        let out: Value = serde_json::from_slice(
            &filter
                .filter_body(None, reply.to_string().as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(out["result"]["prompts"], json!([]));
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#;
        assert_eq!(filter.filter_body(None, error).unwrap(), error.to_vec());
        assert!(filter.filter_body(None, b"not json").is_none());
    }

    #[test]
    fn sse_events_are_filtered_one_by_one() {
        let readme = json!({"uri": "demo://readme", "name": "readme"});
        let secret = json!({"uri": "demo://secret", "name": "secret"});
        let filter = allowing(Kind::Resources, std::slice::from_ref(&readme));
        let reply = json!({"jsonrpc": "2.0", "id": 2, "result": {"resources": [readme, secret]}});
        let body = format!(
            "id: 0\r\nretry: 3000\r\ndata:\r\n\r\nevent: message\r\nid: 1\r\ndata: {reply}\r\n\r\n: keep-alive\n\n"
        );
        let out = filter
            .filter_body(Some("text/event-stream; charset=utf-8"), body.as_bytes())
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("id: 0\nretry: 3000\ndata:\n\n"), "{out}");
        assert!(out.contains("event: message\nid: 1\ndata: {"), "{out}");
        assert!(out.contains("demo://readme"), "{out}");
        assert!(!out.contains("demo://secret"), "{out}");
        assert!(out.ends_with(": keep-alive\n\n"), "{out}");
        // A data line split over several `data:` lines is one message.
        let split = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"resources\":[{\"uri\":\"demo://secret\",\"name\":\"secret\"}]}}\n\n";
        let out = String::from_utf8(
            filter
                .filter_body(Some("text/event-stream"), split.as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert!(!out.contains("secret"), "{out}");
    }

    #[test]
    fn ids_come_back_as_the_client_sent_them() {
        let number = RpcId::from_property(&7.0f64.to_le_bytes()).unwrap();
        let v: Value =
            serde_json::from_str(&blocked_reply(Some(&number), DenyCode::ToolBlocked)).unwrap();
        assert_eq!(v["id"], json!(7));
        assert_eq!(v["error"]["data"]["code"], "tool_blocked");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("tool_blocked: ")
        );
        let frac = RpcId::from_property(&7.5f64.to_le_bytes()).unwrap();
        assert_eq!(frac, RpcId::Number(7.5));
        for text in ["abc", "req-0001", "12345678", ""] {
            let id = RpcId::from_property(text.as_bytes()).unwrap();
            let v: Value =
                serde_json::from_str(&blocked_reply(Some(&id), DenyCode::PromptBlocked)).unwrap();
            assert_eq!(v["id"], json!(text));
        }
        for n in [0.0f64, 1.0, 42.0, 65_535.0, 4_294_967_296.0, -3.0] {
            assert_eq!(
                RpcId::from_property(&n.to_le_bytes()),
                Some(RpcId::Number(n)),
                "{n}"
            );
        }
        let v: Value =
            serde_json::from_str(&blocked_reply(None, DenyCode::ResourceBlocked)).unwrap();
        assert_eq!(v["id"], Value::Null);
    }

    #[test]
    fn kinds_and_modes_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            assert_eq!(Kind::of_list_method(kind.list_method()), Some(kind));
            assert_eq!(Kind::of_use_method(kind.use_method()), Some(kind));
        }
        assert_eq!(Mode::parse("allow_selected"), Some(Mode::AllowSelected));
        assert_eq!(Mode::parse("nope"), None);
        assert_eq!(Mode::default(), Mode::AllowAll);
    }
}
