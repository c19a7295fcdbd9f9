//! The console's pages, one module per area. Each reads what it shows from the admin
//! API as the signed-in user, and shows a control only when the user may use it.

pub mod audit;
pub mod connect;
pub mod features;
pub mod gateways;
pub mod hosts;
pub mod keys;
pub mod overview;
pub mod people;
pub mod servers;
pub mod teams;

use std::collections::HashMap;

use serde_json::Value;

/// Items of a listing by their `id`.
pub fn by_id(items: &[Value]) -> HashMap<i64, &Value> {
    items
        .iter()
        .filter_map(|v| v["id"].as_i64().map(|id| (id, v)))
        .collect()
}

/// The `name` of item `id`, or `#id` when the listing is not readable to this user;
/// `—` for no id.
pub fn name_in(items: &HashMap<i64, &Value>, id: &Value) -> String {
    if id.is_null() {
        return "—".into();
    }
    id.as_i64()
        .and_then(|i| items.get(&i))
        .and_then(|v| v["name"].as_str())
        .map_or_else(|| format!("#{}", super::layout::text(id)), str::to_owned)
}

pub fn flag(v: &Value, name: &str) -> bool {
    v[name].as_bool().unwrap_or(false)
}

pub fn id(v: &Value) -> i64 {
    v["id"].as_i64().unwrap_or(0)
}

/// The data-plane URL of `server` through `gateway` (first `--resource-base-urls`).
pub fn mcp_url(base: &str, gateway: &str, server: &str) -> String {
    format!("{base}/mcp/{gateway}/{server}")
}
