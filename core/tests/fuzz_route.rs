//! Property tests of the data-plane path parser: no input panics it, and whatever it
//! accepts maps to an upstream path inside the server's base path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcpguard_core::route::{McpPath, is_valid_slug};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Pieces an attacker strings together to walk out of a base path.
fn piece() -> impl Strategy<Value = String> {
    // Weighted so that many paths pass the slug checks and reach the walk checks.
    prop_oneof![
        6 => Just("/".to_owned()),
        2 => Just(".".to_owned()),
        2 => Just("..".to_owned()),
        1 => Just(";".to_owned()),
        1 => Just("\\".to_owned()),
        1 => Just("?".to_owned()),
        1 => Just("#".to_owned()),
        1 => "%(2[eEfF5]|5[cC]|00|[0-9a-fA-F]{2})",
        6 => "[a-z0-9-]{1,6}",
        1 => "\\PC{1,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    let tail = || prop::collection::vec(piece(), 0..8).prop_map(|p| p.concat());
    prop_oneof![
        any::<String>(),
        tail().prop_map(|t| format!("/{t}")),
        ("[a-z0-9-]{1,8}", "[a-z0-9-]{1,8}", tail())
            .prop_map(|(g, s, t)| format!("/mcp/{g}/{s}{t}")),
    ]
}

fn base() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_owned()),
        Just("/mcp".to_owned()),
        Just("/api/v1/mcp/".to_owned()),
        "(/[a-z0-9]{1,5}){1,3}/?",
    ]
}

/// Whether the path part of an upstream path walks or hides a walk: a dot segment
/// (also `..;x`, which some servers read as `..`), an encoded dot, slash, backslash or
/// percent (decoded once more upstream), a backslash, or an empty segment (`//x`).
fn walks(path: &str) -> Option<&'static str> {
    let lowered = path.to_ascii_lowercase();
    for encoded in ["%2e", "%2f", "%5c", "%25"] {
        if lowered.contains(encoded) {
            return Some("an encoded dot, slash, backslash or percent");
        }
    }
    if path.contains('\\') {
        return Some("a backslash");
    }
    if path.contains("//") {
        return Some("an empty segment");
    }
    let dot = |seg: &str| matches!(seg.split(';').next(), Some("." | ".."));
    path.split('/').any(dot).then_some("a dot segment")
}

proptest! {
    #![proptest_config(config())]

    /// Never panics, and what it accepts has valid slugs and a rest that starts with
    /// `/` (or is empty).
    #[test]
    fn parse_never_panics_and_accepts_only_valid_slugs(p in path()) {
        if let Ok(parsed) = McpPath::parse(&p) {
            prop_assert!(is_valid_slug(parsed.gateway) && is_valid_slug(parsed.server));
            prop_assert!(parsed.rest.is_empty() || parsed.rest.starts_with('/'), "{p:?}");
            prop_assert!(!parsed.rest.contains('?') && !parsed.rest.contains('#'), "{p:?}");
        }
    }

}

proptest! {
    // Cheap, and the walks are a few in a thousand paths: more cases.
    #![proptest_config(ProptestConfig { cases: 1024, ..config() })]

    /// Whatever is accepted stays under the base path: the upstream path starts with
    /// the base and walks nowhere. Before the parser refused empty segments, it found
    /// `/mcp/a/a//` on base `""` giving `//`.
    #[test]
    fn an_accepted_path_never_walks_out_of_the_base(p in path(), base in base()) {
        let Ok(parsed) = McpPath::parse(&p) else {
            return Ok(());
        };
        let upstream = parsed.upstream_path(&base);
        let trimmed = base.trim_end_matches('/');
        prop_assert!(upstream.starts_with(trimmed), "{p:?} on {base:?}: {upstream:?}");
        let path_part = upstream.split('?').next().unwrap_or_default();
        prop_assert!(path_part.starts_with('/'), "{p:?} on {base:?}: {upstream:?}");
        let after_base = &path_part[trimmed.len()..];
        prop_assert!(after_base.is_empty() || after_base.starts_with('/'), "{upstream:?}");
        if let Some(why) = walks(path_part) {
            prop_assert!(false, "{p:?} on base {base:?} gives {upstream:?}: {why}");
        }
    }
}

/// The walks issue 19 names, each refused (or made harmless) by the parser.
#[test]
fn the_known_walks_are_refused() {
    let walked = [
        "/mcp/g/s/%2e%2e/x",
        "/mcp/g/s/..;/x",
        "/mcp/g/s/%5c..%5cx",
        "/mcp/g/s/%252e%252e/x",
        "/mcp/g/s//x",
        "/mcp/g/s/a//b",
        "/mcp/g/s//",
    ]
    .into_iter()
    .filter_map(|p| {
        let upstream = McpPath::parse(p).ok()?.upstream_path("/mcp");
        walks(&upstream).map(|why| format!("{p:?} gives {upstream:?}: {why}"))
    })
    .collect::<Vec<_>>();
    assert!(walked.is_empty(), "{walked:#?}");
}
