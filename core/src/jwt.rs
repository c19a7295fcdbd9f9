//! OAuth access tokens (JWTs signed by the policy service): signature against a
//! published key, then issuer, audience and expiry. The wasm filter verifies them so
//! that bad ones are refused without a callout; the policy service's ext_authz endpoint
//! verifies them the same way. Plain functions; the clock is an argument.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::Deserialize;

use crate::check::DenyCode;
use crate::oauth::{AccessClaims, ClaimsError, JWT_ALG, base64url_decode, check_claims};

/// The verification keys of a JWKS, by `kid`. Only Ed25519 (`OKP`) keys are used;
/// others are skipped, so the policy service can add key types later.
pub struct Keys(Vec<(String, VerifyingKey)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(kid, _)| kid))
            .finish()
    }
}

impl Keys {
    /// Parses a JWKS document (`{"keys":[...]}`).
    pub fn from_jwks(bytes: &[u8]) -> Result<Keys, String> {
        let doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        Self::from_value(&doc)
    }

    pub fn from_value(doc: &serde_json::Value) -> Result<Keys, String> {
        let keys = doc["keys"]
            .as_array()
            .ok_or("a JWKS has a \"keys\" array")?;
        let mut out = Vec::new();
        for k in keys {
            if k["kty"] != "OKP" || k["crv"] != "Ed25519" {
                continue;
            }
            let (Some(kid), Some(x)) = (k["kid"].as_str(), k["x"].as_str()) else {
                return Err("an Ed25519 key needs \"kid\" and \"x\"".into());
            };
            let key = base64url_decode(x)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| format!("key {kid:?} is not a valid Ed25519 key"))?;
            out.push((kid.to_owned(), key));
        }
        Ok(Keys(out))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.0.iter().find(|(k, _)| k == kid).map(|(_, key)| key)
    }

    /// Whether a key of this `kid` is among these.
    pub fn knows(&self, kid: &str) -> bool {
        self.get(kid).is_some()
    }
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts), so it is
/// verified as one rather than refused as a malformed mcpguard token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// The `kid` a JWT's header names, if it has a readable header naming one: lets a
/// verifier that keeps keys tell "a key I have not read yet" from "a bad token".
pub fn kid(token: &str) -> Option<String> {
    parse_header(token.split('.').next()?)?.kid
}

fn parse_header(part: &str) -> Option<Header> {
    serde_json::from_slice(&base64url_decode(part)?).ok()
}

/// Verifies an access token for `audience` (this request's MCP URL) at `now` (unix
/// seconds); the refusal code on failure. Ed25519 directly rather than a JWT library:
/// one algorithm is all the filter accepts, and the .wasm stays a third of the size.
pub fn verify(
    token: &str,
    keys: &Keys,
    issuer: &str,
    audience: &str,
    now: i64,
) -> Result<AccessClaims, DenyCode> {
    let claims = signed_claims(token, keys)?;
    check(&claims, issuer, audience, now)?;
    Ok(claims)
}

/// Verifies an access token as [`verify`] does, whatever resource it was granted for:
/// for the revocation endpoint, where a client hands back a token of its own.
pub fn verify_any_audience(
    token: &str,
    keys: &Keys,
    issuer: &str,
    now: i64,
) -> Result<AccessClaims, DenyCode> {
    let claims = signed_claims(token, keys)?;
    check(&claims, issuer, &claims.aud, now)?;
    Ok(claims)
}

/// The claims of a token signed by one of `keys`, in our kind of JWT, not yet checked.
fn signed_claims(token: &str, keys: &Keys) -> Result<AccessClaims, DenyCode> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(DenyCode::TokenMalformed);
    };
    let decoded = |part: &str| base64url_decode(part).ok_or(DenyCode::TokenMalformed);
    let head = parse_header(header).ok_or(DenyCode::TokenMalformed)?;
    // Only our own kind of token: an EdDSA access token (RFC 9068), never `none` or an
    // algorithm picked by the sender.
    if head.alg != JWT_ALG || head.typ.as_deref() != Some("at+jwt") {
        return Err(DenyCode::TokenUnknown);
    }
    let key = head
        .kid
        .as_deref()
        .and_then(|kid| keys.get(kid))
        .ok_or(DenyCode::TokenUnknown)?;
    let signature =
        <[u8; 64]>::try_from(decoded(signature)?).map_err(|_| DenyCode::TokenMalformed)?;
    let signed = &token[..header.len() + 1 + payload.len()];
    key.verify_strict(signed.as_bytes(), &Signature::from_bytes(&signature))
        .map_err(|_| DenyCode::TokenUnknown)?;
    // Signed by us but not our claims: not a token this gateway issued.
    serde_json::from_slice(&decoded(payload)?).map_err(|_| DenyCode::TokenUnknown)
}

fn check(claims: &AccessClaims, issuer: &str, audience: &str, now: i64) -> Result<(), DenyCode> {
    check_claims(claims, issuer, audience, now).map_err(|e| match e {
        ClaimsError::WrongIssuer => DenyCode::TokenUnknown,
        ClaimsError::WrongAudience => DenyCode::TokenWrongGateway,
        ClaimsError::Expired => DenyCode::TokenExpired,
    })
}

/// Keys and tokens signed the way the policy service signs them, for tests (here and,
/// with the `testing` feature, in the filter's).
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used)] // test fixtures: a broken one should stop the test
pub mod testing {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    use crate::oauth::AccessClaims;

    /// A test key pair: the signing key and a JWKS publishing it under `kid`.
    pub fn key(seed: u8, kid: &str) -> (EncodingKey, serde_json::Value) {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend([seed; 32]);
        let encoding = EncodingKey::from_ed_der(&der);
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).unwrap();
        let mut jwk = serde_json::to_value(jwk).unwrap();
        jwk["kid"] = kid.into();
        (encoding, serde_json::json!({"keys": [jwk]}))
    }

    pub fn claims() -> AccessClaims {
        AccessClaims {
            iss: "http://as".into(),
            aud: "http://gw.local:10000/mcp/eng/github".into(),
            sub: "1".into(),
            exp: 2_000,
            iat: 1_000,
            jti: "jti-1".into(),
            client_id: "client".into(),
            gid: 7,
            cid: 8,
        }
    }

    pub fn sign(key: &EncodingKey, kid: &str, claims: &AccessClaims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{claims, key, sign};
    use super::*;
    use jsonwebtoken::{Algorithm, Header};

    #[test]
    fn any_audience_verification_checks_everything_but_the_audience() {
        let (k1, jwks) = key(1, "k1");
        let keys = Keys::from_value(&jwks).unwrap();
        let good = sign(&k1, "k1", &claims());
        assert_eq!(
            verify_any_audience(&good, &keys, "http://as", 1_500),
            Ok(claims())
        );
        let (k2, _) = key(2, "k1");
        let forged = sign(&k2, "k1", &claims());
        assert_eq!(
            verify_any_audience(&good, &keys, "http://as", 2_000),
            Err(DenyCode::TokenExpired)
        );
        assert_eq!(
            verify_any_audience(&good, &keys, "http://evil", 1_500),
            Err(DenyCode::TokenUnknown)
        );
        assert_eq!(
            verify_any_audience(&forged, &keys, "http://as", 1_500),
            Err(DenyCode::TokenUnknown)
        );
    }

    #[test]
    fn a_good_token_verifies_and_each_flaw_has_its_code() {
        let (k1, jwks) = key(1, "k1");
        let keys = Keys::from_value(&jwks).unwrap();
        let aud = "http://gw.local:10000/mcp/eng/github";
        let good = sign(&k1, "k1", &claims());
        assert!(looks_like_jwt(&good));
        assert_eq!(verify(&good, &keys, "http://as", aud, 1_500), Ok(claims()));

        let (k2, _) = key(2, "k1");
        let forged = sign(&k2, "k1", &claims());
        let unknown_kid = sign(&k1, "k9", &claims());
        let mut tampered = good.clone();
        tampered.insert(good.find('.').unwrap() + 3, 'A');
        let cases = [
            (
                verify(&good, &keys, "http://as", aud, 2_000),
                DenyCode::TokenExpired,
            ),
            (
                verify(
                    &good,
                    &keys,
                    "http://as",
                    "http://gw.local:10000/mcp/eng/other",
                    1_500,
                ),
                DenyCode::TokenWrongGateway,
            ),
            (
                verify(&good, &keys, "http://evil", aud, 1_500),
                DenyCode::TokenUnknown,
            ),
            (
                verify(&forged, &keys, "http://as", aud, 1_500),
                DenyCode::TokenUnknown,
            ),
            (
                verify(&unknown_kid, &keys, "http://as", aud, 1_500),
                DenyCode::TokenUnknown,
            ),
            (
                verify("a.b.c", &keys, "http://as", aud, 1_500),
                DenyCode::TokenMalformed,
            ),
        ];
        for (i, (got, code)) in cases.into_iter().enumerate() {
            assert_eq!(got, Err(code), "case {i}");
        }
        assert!(verify(&tampered, &keys, "http://as", aud, 1_500).is_err());
    }

    #[test]
    fn alg_none_and_other_token_types_are_refused() {
        let (k1, jwks) = key(1, "k1");
        let keys = Keys::from_value(&jwks).unwrap();
        let aud = "http://gw.local:10000/mcp/eng/github";
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let untyped = jsonwebtoken::encode(&header, &claims(), &k1).unwrap();
        assert_eq!(
            verify(&untyped, &keys, "http://as", aud, 1_500),
            Err(DenyCode::TokenUnknown)
        );
        let none = format!(
            "{}.{}.",
            crate::oauth::base64url(br#"{"alg":"none","typ":"at+jwt","kid":"k1"}"#),
            crate::oauth::base64url(serde_json::to_string(&claims()).unwrap().as_bytes())
        );
        assert!(verify(&none, &keys, "http://as", aud, 1_500).is_err());
    }

    #[test]
    fn jwks_parsing_keeps_ed25519_keys_and_refuses_broken_ones() {
        let (_, jwks) = key(1, "k1");
        let mut doc = jwks.clone();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"}));
        assert_eq!(Keys::from_value(&doc).unwrap().len(), 1);
        assert!(Keys::from_jwks(b"{}").is_err());
        assert!(Keys::from_jwks(br#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k"}]}"#).is_err());
        assert!(!looks_like_jwt("mcpgt_abc"));
        assert!(!looks_like_jwt("a.b"));
    }
}
