//! Property tests of the opaque token format and the bearer header: every input is
//! handled without a panic, and only well-formed tokens with a matching checksum pass.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcpguard_core::bearer_token;
use mcpguard_core::token::{
    ALPHABET, ENTROPY_CHARS, TokenHash, TokenKind, display_prefix, format_token, parse_token,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    // Cases from PROPTEST_CASES (default 256); no regression files in the tree.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn kind() -> impl Strategy<Value = TokenKind> {
    prop::sample::select(TokenKind::ALL.to_vec())
}

fn entropy() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), ENTROPY_CHARS)
        .prop_map(|b| String::from_utf8(b).unwrap_or_default())
}

/// Strings near the token format: a known or unknown prefix, base62 and a few others.
fn token_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(mcpg[a-z]_)?[0-9A-Za-z_.~ -]{0,60}",
        (kind(), entropy()).prop_map(|(k, e)| format_token(k, &e).unwrap_or_default()),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_token_accepts_only_the_exact_shape(token in token_like()) {
        if let Ok(kind) = parse_token(&token) {
            let body = token.strip_prefix(kind.prefix()).and_then(|r| r.strip_prefix('_'));
            prop_assert!(body.is_some(), "{token:?}");
            let body = body.unwrap_or_default();
            prop_assert_eq!(body.len(), ENTROPY_CHARS + 6);
            prop_assert!(body.bytes().all(|b| ALPHABET.contains(&b)));
            // Accepted means: it is what format_token makes of its entropy.
            prop_assert_eq!(format_token(kind, &body[..ENTROPY_CHARS]).ok(), Some(token.clone()));
        }
        let shown = display_prefix(&token);
        prop_assert!(token.starts_with(shown));
        prop_assert!(shown.len() <= token.len());
    }

    #[test]
    fn a_formatted_token_parses_and_any_one_changed_character_is_refused(
        kind in kind(),
        entropy in entropy(),
        at in any::<prop::sample::Index>(),
        by in prop::sample::select(ALPHABET.to_vec()),
    ) {
        let token = format_token(kind, &entropy).unwrap_or_default();
        prop_assert_eq!(parse_token(&token), Ok(kind));
        let mut bytes = token.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != by);
        bytes[i] = by;
        let mangled = String::from_utf8(bytes).unwrap_or_default();
        prop_assert!(parse_token(&mangled).is_err(), "{mangled:?} accepted");
        // Cut or lengthened: refused too.
        prop_assert!(parse_token(&token[..token.len() - 1]).is_err());
        let longer = format!("{token}0");
        prop_assert!(parse_token(&longer).is_err());
    }

    #[test]
    fn bearer_token_yields_one_nonempty_word_of_the_header(header in any::<String>()) {
        if let Some(token) = bearer_token(&header) {
            prop_assert!(!token.is_empty());
            prop_assert!(!token.contains(char::is_whitespace));
            prop_assert!(header.contains(token));
            let scheme = header.trim_start().get(..6).unwrap_or_default();
            prop_assert!(scheme.eq_ignore_ascii_case("bearer"), "{header:?}");
        }
    }

    #[test]
    fn bearer_token_reads_back_what_was_sent(
        scheme in "[Bb][Ee][Aa][Rr][Ee][Rr]",
        token in "[!-~]{1,80}",
        pad in " {0,3}",
    ) {
        let header = format!("{pad}{scheme} {pad}{token}{pad}");
        prop_assert_eq!(bearer_token(&header), Some(token.as_str()));
    }

    #[test]
    fn a_token_hash_reads_only_64_hex_characters(s in "[0-9a-fA-F]{0,70}|\\PC{0,70}") {
        let parsed = TokenHash::from_hex(&s);
        prop_assert_eq!(parsed.is_some(), s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
        if let Some(h) = parsed {
            prop_assert_eq!(h.to_hex(), s.to_ascii_lowercase());
        }
    }
}
