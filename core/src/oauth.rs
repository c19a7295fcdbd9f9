//! OAuth 2.1 pieces shared by the filter (which verifies access tokens) and the policy
//! service (which issues them): the access token's claims, PKCE, and the metadata
//! documents of RFC 9728 and RFC 8414. Pure functions, no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The one signing algorithm: Ed25519 keys are 32 bytes, so they are cheap to generate,
/// seal and publish, and verification is small enough for the wasm filter.
pub const JWT_ALG: &str = "EdDSA";

/// Claims of an access token (a JWT signed by the policy service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The MCP URL the token was issued for (RFC 8707 `resource`), one per token.
    pub aud: String,
    /// The user's id.
    pub sub: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    /// The grant (refresh-token family) the token belongs to; revoking the family
    /// stops its access tokens on the next request, through the check.
    pub gid: i64,
    /// The connection (host x gateway x user) the token acts for.
    pub cid: i64,
}

/// Why verified claims are refused, mapped to the data plane's refusal codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimsError {
    WrongIssuer,
    WrongAudience,
    Expired,
}

/// Checks issuer, audience and expiry of claims whose signature was already verified.
/// `now` is unix seconds. No leeway: the filter and the service share a clock domain
/// closely enough, and tokens are refreshed well before they expire.
pub fn check_claims(
    claims: &AccessClaims,
    issuer: &str,
    audience: &str,
    now: i64,
) -> Result<(), ClaimsError> {
    if claims.iss != issuer {
        return Err(ClaimsError::WrongIssuer);
    }
    if claims.aud != audience {
        return Err(ClaimsError::WrongAudience);
    }
    if claims.exp <= now {
        return Err(ClaimsError::Expired);
    }
    Ok(())
}

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
pub fn is_valid_code_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// A S256 code challenge is the unpadded base64url of a SHA-256: 43 characters.
pub fn is_valid_code_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// `BASE64URL(SHA256(verifier))`, RFC 7636 §4.2.
pub fn s256_challenge(verifier: &str) -> String {
    base64url(&Sha256::digest(verifier.as_bytes()))
}

/// Whether `verifier` answers `challenge` (S256 only; `plain` is not supported), in
/// constant time.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    is_valid_code_verifier(verifier)
        && s256_challenge(verifier)
            .as_bytes()
            .ct_eq(challenge.as_bytes())
            .into()
}

/// Unpadded base64url (RFC 4648 §5), as JWTs and PKCE use it.
pub fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Decodes unpadded base64url; `None` on any other character, padding, or a length
/// no encoder produces.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        }))
    }
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    // Canonical only: the bits after the last byte must be zero.
    (base64url(&out) == s).then_some(out)
}

/// The resource identifier of one MCP endpoint: `base` (scheme and authority, no
/// trailing slash) and `/mcp/{gateway}/{server}`; with an empty `server`, the gateway
/// URL `/mcp/{gateway}`.
pub fn resource_url(base: &str, gateway: &str, server: &str) -> String {
    if server.is_empty() {
        format!("{base}/mcp/{gateway}")
    } else {
        format!("{base}/mcp/{gateway}/{server}")
    }
}

/// RFC 9728 §3.1: the metadata of `/mcp/g/s` lives at this prefix followed by it.
pub const RESOURCE_METADATA_PREFIX: &str = "/.well-known/oauth-protected-resource";

/// RFC 9728 §2: the protected-resource metadata of one MCP endpoint, naming the
/// policy service as its authorization server.
pub fn protected_resource_metadata(resource: &str, authorization_server: &str) -> String {
    serde_json::json!({
        "resource": resource,
        "authorization_servers": [authorization_server],
        "bearer_methods_supported": ["header"],
        "resource_name": "mcpguard gateway",
    })
    .to_string()
}

/// Where the policy service serves its OAuth endpoints, under the issuer URL.
pub const AUTHORIZE_PATH: &str = "/oauth/authorize";
pub const TOKEN_PATH: &str = "/oauth/token";
pub const REGISTER_PATH: &str = "/oauth/register";
pub const REVOKE_PATH: &str = "/oauth/revoke";
pub const JWKS_PATH: &str = "/oauth/jwks";
/// The JWKS on the check port, for the filter's refreshes through the policy cluster.
pub const CHECK_JWKS_PATH: &str = "/v1/jwks";

/// RFC 8414 §2: the authorization server's metadata. `issuer` has no trailing slash.
pub fn authorization_server_metadata(issuer: &str) -> serde_json::Value {
    serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}{AUTHORIZE_PATH}"),
        "token_endpoint": format!("{issuer}{TOKEN_PATH}"),
        "registration_endpoint": format!("{issuer}{REGISTER_PATH}"),
        "revocation_endpoint": format!("{issuer}{REVOKE_PATH}"),
        "jwks_uri": format!("{issuer}{JWKS_PATH}"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "authorization_response_iss_parameter_supported": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: "http://as".into(),
            aud: "http://gw/mcp/eng/demo".into(),
            sub: "1".into(),
            exp: 100,
            iat: 40,
            jti: "j".into(),
            client_id: "c".into(),
            gid: 2,
            cid: 3,
        }
    }

    #[test]
    fn claims_check_issuer_audience_and_expiry() {
        let c = claims();
        assert_eq!(
            check_claims(&c, "http://as", "http://gw/mcp/eng/demo", 99),
            Ok(())
        );
        assert_eq!(
            check_claims(&c, "http://other", "http://gw/mcp/eng/demo", 99),
            Err(ClaimsError::WrongIssuer)
        );
        assert_eq!(
            check_claims(&c, "http://as", "http://gw/mcp/eng/other", 99),
            Err(ClaimsError::WrongAudience)
        );
        assert_eq!(
            check_claims(&c, "http://as", "http://gw/mcp/eng/demo", 100),
            Err(ClaimsError::Expired)
        );
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert_eq!(s256_challenge(verifier), challenge);
        assert!(is_valid_code_challenge(challenge));
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(&verifier.replace('d', "e"), challenge));
        assert!(
            !pkce_matches(challenge, challenge),
            "the challenge is not the verifier"
        );
        // plain is refused: the verifier itself never matches.
        assert!(!pkce_matches(verifier, verifier));
    }

    #[test]
    fn code_verifier_shape() {
        assert!(is_valid_code_verifier(&"a".repeat(43)));
        assert!(is_valid_code_verifier(&"a~._-".repeat(26)[..128]));
        assert!(!is_valid_code_verifier(&"a".repeat(42)));
        assert!(!is_valid_code_verifier(&"a".repeat(129)));
        assert!(!is_valid_code_verifier(&format!("{}+", "a".repeat(43))));
        assert!(!is_valid_code_challenge("short"));
    }

    #[test]
    fn base64url_is_unpadded_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), encoded);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        for plain in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                base64url_decode(&base64url(plain.as_bytes())).unwrap(),
                plain.as_bytes()
            );
        }
        assert_eq!(base64url_decode("-_8").unwrap(), vec![0xfb, 0xff]);
        for bad in ["Z", "Zg==", "Zh", "a+b/", "ab c"] {
            assert_eq!(base64url_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn metadata_documents_name_each_other() {
        let prm: serde_json::Value = serde_json::from_str(&protected_resource_metadata(
            &resource_url("http://gw:1", "eng", "demo"),
            "http://as:2",
        ))
        .unwrap();
        assert_eq!(prm["resource"], "http://gw:1/mcp/eng/demo");
        assert_eq!(prm["authorization_servers"][0], "http://as:2");
        let asm = authorization_server_metadata("http://as:2");
        assert_eq!(asm["issuer"], "http://as:2");
        assert_eq!(asm["token_endpoint"], "http://as:2/oauth/token");
        assert_eq!(
            asm["code_challenge_methods_supported"],
            serde_json::json!(["S256"])
        );
        assert_eq!(asm["jwks_uri"], "http://as:2/oauth/jwks");
    }
}
