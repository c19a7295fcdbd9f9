//! Access-token signing keys (Ed25519): generated here, private halves sealed at rest
//! with the [`SecretBox`], public halves published as a JWKS. Every replica reads the
//! active key from the store, so a rotation on one replica holds on all of them.

use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mcpguard_core::oauth::{AccessClaims, JWT_ALG};

use crate::secrets::{SecretBox, signing_key_binding};
use crate::store::{self, Db, StoreError, oauth::NewKey};

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the DER that jsonwebtoken
/// takes is this followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    [ED25519_PKCS8_PREFIX.as_slice(), seed].concat()
}

/// The base64url public key (`x` of an OKP JWK) of a PKCS#8 Ed25519 key.
fn public_x(der: &[u8]) -> Result<String, jsonwebtoken::errors::Error> {
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
        &EncodingKey::from_ed_der(der),
        Algorithm::EdDSA,
    )?;
    match jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p) => Ok(p.x),
        _ => Err(jsonwebtoken::errors::ErrorKind::InvalidEddsaKey.into()),
    }
}

/// A new key pair, its private half sealed.
pub fn generate(secrets: &SecretBox) -> Result<NewKey, StoreError> {
    let no_randomness = |e: getrandom::Error| StoreError::Keys(format!("no randomness: {e}"));
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(no_randomness)?;
    let mut id = [0u8; 12];
    getrandom::fill(&mut id).map_err(no_randomness)?;
    let kid = mcpguard_core::oauth::base64url(&id);
    let der = pkcs8(&seed);
    let public_x = public_x(&der).map_err(|e| StoreError::Keys(e.to_string()))?;
    // The seed is sealed hex-encoded: SecretBox seals text.
    let sealed_private = secrets
        .seal(&hex::encode(seed), &signing_key_binding(&kid))
        .map_err(no_randomness)?;
    Ok(NewKey {
        kid,
        public_x,
        sealed_private,
    })
}

/// Signs access tokens with the store's active key, opening it once per key.
pub struct Signer {
    cached: Mutex<Option<(String, EncodingKey)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no active signing key")]
    NoKey,
    #[error("the active signing key does not open with the secrets key")]
    Sealed,
    #[error("signing: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
}

impl Default for Signer {
    fn default() -> Self {
        Signer {
            cached: Mutex::new(None),
        }
    }
}

impl Signer {
    pub async fn sign(
        &self,
        db: &Db,
        secrets: &SecretBox,
        claims: &AccessClaims,
    ) -> Result<String, SignError> {
        let (kid, sealed) = store::oauth::active_key(db)
            .await?
            .ok_or(SignError::NoKey)?;
        let key = {
            let cached = self.cached.lock().ok().and_then(|c| {
                c.as_ref()
                    .filter(|(k, _)| *k == kid)
                    .map(|(_, key)| key.clone())
            });
            match cached {
                Some(key) => key,
                None => {
                    let seed_hex = secrets
                        .open(&sealed, &signing_key_binding(&kid))
                        .ok_or(SignError::Sealed)?;
                    let mut seed = [0u8; 32];
                    hex::decode_to_slice(seed_hex.trim(), &mut seed)
                        .map_err(|_| SignError::Sealed)?;
                    let key = EncodingKey::from_ed_der(&pkcs8(&seed));
                    if let Ok(mut c) = self.cached.lock() {
                        *c = Some((kid.clone(), key.clone()));
                    }
                    key
                }
            }
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid);
        // RFC 9068: an access token says so, so it cannot pass for another kind of JWT.
        header.typ = Some("at+jwt".into());
        Ok(jsonwebtoken::encode(&header, claims, &key)?)
    }
}

/// The JWKS document of the published keys.
pub fn jwks(keys: &[store::oauth::KeyInfo]) -> serde_json::Value {
    serde_json::json!({
        "keys": keys.iter().map(|k| serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": JWT_ALG,
            "use": "sig",
            "kid": k.kid,
            "x": k.public_x,
        })).collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_tokens_their_published_half_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretBox::load_or_create(&dir.path().join("k")).unwrap();
        let key = generate(&secrets).unwrap();
        let seed_hex = secrets
            .open(&key.sealed_private, &signing_key_binding(&key.kid))
            .unwrap();
        assert!(
            secrets
                .open(&key.sealed_private, &signing_key_binding("other"))
                .is_none()
        );
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&seed_hex, &mut seed).unwrap();
        let claims = AccessClaims {
            iss: "i".into(),
            aud: "a".into(),
            sub: "1".into(),
            exp: i64::MAX / 2,
            iat: 0,
            jti: "j".into(),
            client_id: "c".into(),
            gid: 1,
            cid: 2,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&pkcs8(&seed)))
            .unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_ed_components(&key.public_x).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["a"]);
        let got = jsonwebtoken::decode::<AccessClaims>(&jwt, &decoding, &validation).unwrap();
        assert_eq!(got.claims, claims);
    }
}
