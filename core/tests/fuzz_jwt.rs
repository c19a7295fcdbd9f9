//! Property tests of access-token (JWT) verification: no input panics it, and only a
//! token signed by a published key, unchanged, verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcpguard_core::jwt::{self, Keys};
use mcpguard_core::oauth::base64url;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const ISS: &str = "http://as";
const AUD: &str = "http://gw.local:10000/mcp/eng/github";
const NOW: i64 = 1_500;

struct Signed {
    keys: Keys,
    good: String,
}

/// One key and one token it signed, for every case.
fn signed() -> &'static Signed {
    static SIGNED: std::sync::OnceLock<Signed> = std::sync::OnceLock::new();
    SIGNED.get_or_init(|| {
        let (key, jwks) = jwt::testing::key(1, "k1");
        let keys = Keys::from_value(&jwks).unwrap_or_else(|e| panic!("{e}"));
        let good = jwt::testing::sign(&key, "k1", &jwt::testing::claims());
        Signed { keys, good }
    })
}

/// JWT-shaped strings: three base64url parts of JSON-ish or random bytes.
fn jwt_like() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        "[A-Za-z0-9_-]{0,40}",
        any::<Vec<u8>>().prop_map(|b| base64url(&b)),
        "\\{\"alg\":\"(EdDSA|none|HS256)\",\"typ\":\"at\\+jwt\",\"kid\":\"k[0-9]\"\\}"
            .prop_map(|h| base64url(h.as_bytes())),
    ];
    prop_oneof![
        any::<String>(),
        (part.clone(), part.clone(), part).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn nothing_but_a_signed_token_verifies(token in jwt_like()) {
        let s = signed();
        prop_assert!(jwt::verify(&token, &s.keys, ISS, AUD, NOW).is_err(), "{token:?}");
        let _ = jwt::looks_like_jwt(&token);
        let _ = jwt::kid(&token);
    }

    #[test]
    fn any_change_to_a_signed_token_is_refused(
        at in any::<prop::sample::Index>(),
        by in prop::sample::select(b"ABCabc012-_.=+/ ".to_vec()),
    ) {
        let s = signed();
        prop_assert!(jwt::verify(&s.good, &s.keys, ISS, AUD, NOW).is_ok());
        let mut bytes = s.good.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != by);
        bytes[i] = by;
        let mangled = String::from_utf8(bytes).unwrap_or_default();
        prop_assert!(jwt::verify(&mangled, &s.keys, ISS, AUD, NOW).is_err(), "{mangled:?}");
    }

    /// The signed claims with another header (`alg: none`, another `kid`, no `typ`)
    /// or no signature: refused.
    #[test]
    fn a_reheadered_or_unsigned_token_is_refused(
        header in "\\{\"alg\":\"(none|HS256|EdDSA|RS256)\"(,\"typ\":\"(at\\+jwt|JWT)\")?(,\"kid\":\"k[0-9]\")?\\}",
        drop_signature in any::<bool>(),
    ) {
        let s = signed();
        let mut parts = s.good.split('.');
        let (_, payload, signature) = (parts.next(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let original = String::from_utf8(
            mcpguard_core::oauth::base64url_decode(s.good.split('.').next().unwrap_or_default()).unwrap_or_default(),
        ).unwrap_or_default();
        prop_assume!(header != original);
        let signature = if drop_signature { "" } else { signature };
        let token = format!("{}.{payload}.{signature}", base64url(header.as_bytes()));
        prop_assert!(jwt::verify(&token, &s.keys, ISS, AUD, NOW).is_err(), "{header}");
    }

    #[test]
    fn a_jwks_of_any_bytes_is_read_or_refused(bytes in any::<Vec<u8>>(), json in "\\{\"keys\":\\[\\{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"kid\":\"[a-z]{0,3}\",\"x\":\"[A-Za-z0-9_-]{0,50}\"\\}\\]\\}") {
        let _ = Keys::from_jwks(&bytes);
        let _ = Keys::from_jwks(json.as_bytes());
    }
}
