//! Property tests of the check callout's JSON: any bytes are read or refused without a
//! panic, and what is read writes back to the same value.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcpguard_core::check::{CheckRequest, CheckResponse};
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn small_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z0-9-]{0,10}".prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::from),
        any_json(),
    ]
}

/// Objects shaped like a check request, with each field sometimes wrong.
fn request_like() -> impl Strategy<Value = Value> {
    let credential = prop_oneof![
        "[0-9a-f]{0,70}".prop_map(|h| json!({"kind": "api_token", "hash": h})),
        (any::<i64>(), any::<i64>(), small_text())
            .prop_map(|(g, c, j)| json!({"kind": "oauth", "grant": g, "connection": c, "jti": j})),
        any_json(),
    ];
    (
        credential,
        small_text(),
        small_text(),
        prop::option::of(small_text()),
        prop::option::of(small_text()),
        prop::option::of(small_text()),
        prop::option::of(("[a-z_]{1,8}", any_json())),
    )
        .prop_map(|(credential, gateway, server, method, tool, rid, extra)| {
            let mut v = json!({"credential": credential, "gateway": gateway, "server": server});
            for (k, x) in [("mcp_method", method), ("tool", tool), ("request_id", rid)] {
                if let Some(x) = x {
                    v[k] = x;
                }
            }
            if let Some((k, x)) = extra {
                v[k] = x;
            }
            v
        })
}

fn response_like() -> impl Strategy<Value = Value> {
    let upstream = prop_oneof![
        ("(http|https|ftp)", small_text(), small_text())
            .prop_map(|(s, a, b)| json!({"scheme": s, "authority": a, "base_path": b})),
        any_json(),
    ];
    prop_oneof![
        (upstream, prop::option::of((small_text(), small_text()))).prop_map(|(u, inject)| {
            let mut v = json!({"decision": "allow", "upstream": u});
            if let Some((name, value)) = inject {
                v["inject"] = json!({"name": name, "value": value});
            }
            v
        }),
        small_text().prop_map(|code| json!({"decision": "deny", "code": code})),
        any_json(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_are_read_or_refused(bytes in any::<Vec<u8>>()) {
        let _ = serde_json::from_slice::<CheckRequest>(&bytes);
        let _ = serde_json::from_slice::<CheckResponse>(&bytes);
    }

    #[test]
    fn a_check_request_that_reads_writes_back_the_same(v in request_like()) {
        if let Ok(req) = serde_json::from_value::<CheckRequest>(v) {
            let text = serde_json::to_string(&req).unwrap_or_default();
            prop_assert_eq!(serde_json::from_str::<CheckRequest>(&text).ok(), Some(req));
        }
    }

    #[test]
    fn a_check_response_that_reads_writes_back_the_same(v in response_like()) {
        if let Ok(resp) = serde_json::from_value::<CheckResponse>(v) {
            let text = serde_json::to_string(&resp).unwrap_or_default();
            prop_assert_eq!(serde_json::from_str::<CheckResponse>(&text).ok(), Some(resp));
        }
    }
}
