//! Fetching an exposure's live lists from its upstream: an MCP client just big enough
//! for `initialize` and the three paginated lists over streamable HTTP (plain JSON or
//! SSE replies), connecting only to the address the upstream network policy judged.

use std::net::SocketAddr;
use std::time::Duration;

use mcpguard_core::features::Kind;

use crate::outbound::Outbound;
use serde_json::{Value, json};

/// Bounds on what an upstream can make the policy service hold or wait for.
const MAX_REPLY: usize = 4 << 20;
const MAX_PAGES: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(10);
const PROTOCOL_VERSION: &str = "2025-06-18";

/// Where and how to reach the upstream.
pub struct Target {
    pub scheme: String,
    pub authority: String,
    pub path: String,
    /// The judged address to connect to.
    pub address: SocketAddr,
    /// The credential header to send, if any.
    pub credential: Option<(String, String)>,
}

/// Each kind's items, for the kinds the server announced in `initialize`.
#[derive(Debug, Default)]
pub struct Lists(pub Vec<(Kind, Vec<Value>)>);

pub async fn fetch(outbound: &Outbound, target: &Target) -> Result<Lists, String> {
    if !matches!(target.scheme.as_str(), "http" | "https") {
        return Err(format!("unknown scheme {:?}", target.scheme));
    }
    let host = crate::upstream_policy::split_authority(&target.authority)
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or("the upstream's authority has no host")?;
    // Connects to the judged address; over https the name stays the authority's, for
    // SNI and the certificate check.
    let client = outbound
        .builder()
        .timeout(TIMEOUT)
        .resolve(&host, target.address)
        .build()
        .map_err(|e| format!("no HTTP client: {e}"))?;
    let url = format!("{}://{}{}", target.scheme, target.authority, target.path);
    let mut session = Session {
        client,
        url,
        credential: target.credential.clone(),
        id: None,
        next_id: 0,
    };
    let init = session
        .request(
            "initialize",
            json!({
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcpguard-policy", "version": env!("CARGO_PKG_VERSION")},
            }),
        )
        .await?;
    let capabilities = init.get("capabilities").cloned().unwrap_or(Value::Null);
    session.notify("notifications/initialized").await?;
    let mut lists = Lists::default();
    for kind in Kind::ALL {
        if capabilities.get(kind.as_str()).is_none() {
            continue;
        }
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = session.request(kind.list_method(), params).await?;
            if let Some(found) = page.get(kind.as_str()).and_then(Value::as_array) {
                items.extend(found.iter().cloned());
            }
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        lists.0.push((kind, items));
    }
    session.close().await;
    Ok(lists)
}

struct Session {
    client: reqwest::Client,
    url: String,
    credential: Option<(String, String)>,
    /// `Mcp-Session-Id`, once the server gave one.
    id: Option<String>,
    next_id: i64,
}

impl Session {
    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(id) = &self.id {
            req = req
                .header("mcp-session-id", id)
                .header("mcp-protocol-version", PROTOCOL_VERSION);
        }
        if let Some((name, value)) = &self.credential {
            req = req.header(name, value);
        }
        req
    }

    async fn request(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let resp = self
            .post(&body)
            .send()
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("{method}: the upstream answered HTTP {status}"));
        }
        if let Some(session) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            self.id = Some(session.to_owned());
        }
        let sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let bytes = read_bounded(resp)
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let text = String::from_utf8_lossy(&bytes);
        let messages = if sse {
            sse_messages(&text)
        } else {
            serde_json::from_str::<Value>(&text).into_iter().collect()
        };
        let reply = messages
            .into_iter()
            .find(|m| m.get("id") == Some(&json!(id)))
            .ok_or_else(|| format!("{method}: no reply in the upstream's answer"))?;
        if let Some(error) = reply.get("error") {
            return Err(format!("{method}: the upstream refused: {error}"));
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| format!("{method}: a reply without a result"))
    }

    async fn notify(&self, method: &str) -> Result<(), String> {
        let body = json!({"jsonrpc": "2.0", "method": method});
        let resp = self
            .post(&body)
            .send()
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "{method}: the upstream answered HTTP {}",
                resp.status()
            ))
        }
    }

    /// Ends the session (best effort: the server forgets it on its own otherwise).
    async fn close(&self) {
        let Some(id) = &self.id else { return };
        let mut req = self.client.delete(&self.url).header("mcp-session-id", id);
        if let Some((name, value)) = &self.credential {
            req = req.header(name, value);
        }
        let _ = req.send().await;
    }
}

async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_REPLY {
            return Err(format!("the upstream's answer is over {MAX_REPLY} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The JSON messages of an SSE stream (each event's `data` lines joined).
fn sse_messages(text: &str) -> Vec<Value> {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    normalized
        .split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            serde_json::from_str(&data.join("\n")).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_are_read_whatever_the_line_ends() {
        let text = "id: 0\r\ndata:\r\n\r\nevent: message\r\ndata: {\"id\":1,\r\ndata: \"result\":{}}\r\n\r\n";
        assert_eq!(sse_messages(text), vec![json!({"id": 1, "result": {}})]);
    }
}
