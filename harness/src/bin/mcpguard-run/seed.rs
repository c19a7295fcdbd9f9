//! Seeding through the admin API, idempotently: gateway `demo` exposing server `demo`
//! (the demo MCP server) with the shared identity.

use mcpguard_harness::http;
use serde_json::{Value, json};

/// The ids of gateway `demo` and server `demo`.
pub struct Seeded {
    pub gateway_id: i64,
    pub server_id: i64,
}

/// The admin API on loopback `port`, with the admin token.
struct Api<'a> {
    port: u16,
    token: &'a str,
}

impl Api<'_> {
    /// One request; fails unless the answer's status is one of `expected`.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        expected: &[u16],
    ) -> Result<Value, String> {
        let bearer = format!("Bearer {}", self.token);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, answer) = http::request(
            self.port,
            method,
            path,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            &body,
        )
        .map_err(|e| format!("{method} {path} failed: {e}"))?;
        if !expected.contains(&status) {
            return Err(format!("admin API answered {status}: {answer}"));
        }
        Ok(serde_json::from_str(&answer).unwrap_or(Value::Null))
    }

    /// The id of the element with `slug` in the list at `path`.
    fn id_of(&self, path: &str, slug: &str) -> Result<Option<i64>, String> {
        let list = self.call("GET", path, None, &[200])?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["slug"] == slug)
            .and_then(|x| x["id"].as_i64()))
    }
}

pub fn seed(policy_port: u16, token: &str, upstream_url: &str) -> Result<Seeded, String> {
    let api = Api {
        port: policy_port,
        token,
    };
    api.call(
        "POST",
        "/api/v1/gateways",
        Some(json!({"name": "Demo", "slug": "demo"})),
        &[201, 409],
    )?;
    let gateway_id = api.id_of("/api/v1/gateways", "demo")?;
    api.call(
        "POST",
        "/api/v1/servers",
        Some(json!({"name": "Demo MCP server", "slug": "demo", "upstream_url": upstream_url})),
        &[201, 409],
    )?;
    let server_id = api.id_of("/api/v1/servers", "demo")?;
    let (Some(gateway_id), Some(server_id)) = (gateway_id, server_id) else {
        return Err("gateway or server `demo` not found after creating it".to_owned());
    };
    api.call(
        "PUT",
        &format!("/api/v1/gateways/{gateway_id}/servers/{server_id}"),
        Some(json!({"identity": "shared"})),
        &[200],
    )?;
    Ok(Seeded {
        gateway_id,
        server_id,
    })
}
