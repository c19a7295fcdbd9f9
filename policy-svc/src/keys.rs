//! Access-token signing keys (Ed25519): generated here, private halves sealed at rest
//! with the [`SecretBox`], public halves published as a JWKS. Every replica reads the
//! active key from the store, so a rotation on one replica holds on all of them.
//! [`Verifier`] holds the published halves for verifying tokens presented here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mcpguard_core::jwt::{self, Keys};
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

/// The published keys, as the ext_authz endpoint verifies access tokens with them: read
/// from the store, like the JWKS the filter fetches, and kept between requests as the
/// filter keeps its JWKS. Keeping them is safe because a key stays published until
/// every token it signed has expired, and a `next` key is published before it signs.
#[derive(Default)]
pub struct Verifier {
    read: Mutex<Option<KeysRead>>,
}

struct KeysRead {
    keys: Arc<Keys>,
    at: Instant,
}

/// Keys older than this are read again by the next token: a `next` key is known here
/// within the filter's default `jwks_refresh_s` of being created, like in the filter.
const KEYS_REFRESH: Duration = Duration::from_secs(30);

/// A token naming a key not among those held makes the verifier read them again, at
/// most this often: made-up `kid`s cannot turn every request into a store read.
const KEYS_MISS_INTERVAL: Duration = Duration::from_secs(1);

impl Verifier {
    /// The keys to verify `token` with: those held, or read again if they are old or
    /// lack the key `token` names. A failed read is an error (the caller fails closed);
    /// the keys held stay for the next token.
    pub async fn keys_for(
        &self,
        token: &str,
        db: &Db,
        max_token_age_ms: i64,
        deadline: Duration,
    ) -> Result<Arc<Keys>, StoreError> {
        if let Some(keys) = self.held_unless_stale(token) {
            return Ok(keys);
        }
        let read =
            tokio::time::timeout(deadline, store::oauth::published_keys(db, max_token_age_ms))
                .await
                .map_err(|_| {
                    StoreError::Keys(format!(
                        "no answer from the store within {} ms",
                        deadline.as_millis()
                    ))
                })??;
        let keys = Arc::new(Keys::from_value(&jwks(&read)).map_err(StoreError::Keys)?);
        if let Ok(mut held) = self.read.lock() {
            *held = Some(KeysRead {
                keys: keys.clone(),
                at: Instant::now(),
            });
        }
        Ok(keys)
    }

    /// The keys held, if they will do for `token`; otherwise `None`, and the caller
    /// reads. Claims the read by restarting the clock, so concurrent tokens use the
    /// keys held (or wait out the miss interval) instead of reading too.
    fn held_unless_stale(&self, token: &str) -> Option<Arc<Keys>> {
        let mut held = self.read.lock().ok()?;
        let read = held.as_mut()?;
        let age = read.at.elapsed();
        let missing = jwt::kid(token).is_some_and(|kid| !read.keys.knows(&kid));
        if age < KEYS_REFRESH && !(missing && age >= KEYS_MISS_INTERVAL) {
            return Some(read.keys.clone());
        }
        read.at = Instant::now();
        None
    }

    /// Makes the keys held look `by` older, as if that much time had passed.
    #[cfg(test)]
    pub fn backdate(&self, by: Duration) {
        if let Some(read) = self.read.lock().unwrap().as_mut() {
            read.at = read.at.checked_sub(by).unwrap();
        }
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

    /// A JWT whose header names `kid` (the rest does not matter to the verifier's keys).
    fn naming(kid: &str) -> String {
        let header = mcpguard_core::oauth::base64url(
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}"}}"#).as_bytes(),
        );
        format!("{header}.e30.c2ln")
    }

    #[tokio::test]
    async fn the_verifier_rereads_keys_when_old_or_missing_one_but_not_on_every_made_up_kid() {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open_sqlite_file(&dir.path().join("t.db")).await;
        let secrets = SecretBox::load_or_create(&dir.path().join("k")).unwrap();
        store::oauth::ensure_keys(&db, &mut || generate(&secrets))
            .await
            .unwrap();
        let published = |keys: &Keys| keys.len();
        let kids = || async {
            store::oauth::published_keys(&db, 60_000)
                .await
                .unwrap()
                .into_iter()
                .map(|k| k.kid)
                .collect::<Vec<_>>()
        };
        let deadline = Duration::from_secs(1);
        let verifier = Verifier::default();
        let first = kids().await;
        let keys = verifier
            .keys_for(&naming(&first[0]), &db, 60_000, deadline)
            .await
            .unwrap();
        assert_eq!(published(&keys), 2, "active and next");

        // Two rotations publish a key the verifier has not read.
        for _ in 0..2 {
            store::oauth::rotate_keys(&db, generate(&secrets).unwrap())
                .await
                .unwrap();
        }
        let newest = kids().await.last().unwrap().clone();
        assert!(!keys.knows(&newest));
        // Just after a read, a token naming an unknown key is verified with the keys
        // held (and refused), without reading: made-up kids cost no store read.
        let held = verifier
            .keys_for(&naming(&newest), &db, 60_000, deadline)
            .await
            .unwrap();
        assert!(!held.knows(&newest));
        // A second later it reads, and the new key is known.
        verifier.backdate(KEYS_MISS_INTERVAL);
        let reread = verifier
            .keys_for(&naming(&newest), &db, 60_000, deadline)
            .await
            .unwrap();
        assert!(reread.knows(&newest));
        assert_eq!(published(&reread), 4, "two retired, active, next");
        // That read restarted the clock: the next made-up kid does not read again.
        assert!(verifier.held_unless_stale(&naming("made-up")).is_some());

        // Old keys are read again whichever kid the token names; a store that fails
        // the read is an error, not the old keys.
        verifier.backdate(KEYS_REFRESH);
        db.close().await;
        assert!(
            verifier
                .keys_for(&naming(&newest), &db, 60_000, deadline)
                .await
                .is_err()
        );
    }
}
