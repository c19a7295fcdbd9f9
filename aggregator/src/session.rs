//! The gateway URL's sessions: an `Mcp-Session-Id` that no one can forge and that only
//! the credential which opened it can use, and what the aggregator keeps per session
//! (the upstream sessions it opened, lazily, one per server).
//!
//! An id is `{nonce}{tag}` in hex: 16 random bytes, then HMAC-SHA256 over the nonce
//! and the caller's credential under a key drawn when the process starts. A request
//! presenting it with another credential fails the tag, and is answered exactly as an
//! unknown session (404, so the client initializes again): no oracle for which
//! sessions exist. A restart draws a new key, so every old id is unknown (404) and
//! clients re-initialize cleanly; sessions live in this one process (see
//! docs/gateway.md on replicas).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use mcpguard_core::check::Credential;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const NONCE: usize = 16;
const TAG: usize = 32;

/// Signs and verifies session ids.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    pub fn random() -> std::io::Result<SessionKey> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(SessionKey(key))
    }

    #[cfg(test)]
    pub fn fixed(byte: u8) -> SessionKey {
        SessionKey([byte; 32])
    }

    fn tag(&self, nonce: &[u8], caller: &Credential) -> [u8; TAG] {
        // `new_from_slice` takes a key of any length: 32 bytes cannot fail.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.0) else {
            return [0; TAG];
        };
        mac.update(b"mcpguard-aggregator-session\0");
        mac.update(nonce);
        mac.update(&fingerprint(caller));
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 under this key over `domain` (what the tag is for, so a tag of one
    /// kind is never one of another), then each part with its length before it.
    pub fn tag_parts(&self, domain: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.0) else {
            return [0; TAG];
        };
        mac.update(domain);
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// A new session id for `caller`.
    pub fn issue(&self, caller: &Credential) -> std::io::Result<String> {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        Ok(self.issue_with(nonce, caller))
    }

    fn issue_with(&self, nonce: [u8; NONCE], caller: &Credential) -> String {
        let mut id = hex::encode(nonce);
        id.push_str(&hex::encode(self.tag(&nonce, caller)));
        id
    }

    /// Whether `id` was issued by this key for `caller`. Constant time in the tag.
    pub fn verify(&self, id: &str, caller: &Credential) -> bool {
        // Lowercase hex only: one spelling per id.
        if !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return false;
        }
        let Ok(raw) = hex::decode(id) else {
            return false;
        };
        if raw.len() != NONCE + TAG {
            return false;
        }
        let (nonce, tag) = raw.split_at(NONCE);
        bool::from(self.tag(nonce, caller).ct_eq(tag))
    }
}

/// What a session is bound to: the API token's hash, or (OAuth) the access token's
/// SHA-256 and the resource it was verified for.
fn fingerprint(caller: &Credential) -> [u8; 32] {
    let mut h = Sha256::new();
    match caller {
        Credential::ApiToken { hash } => {
            h.update(b"api_token\0");
            h.update(hash.as_bytes());
        }
        Credential::Oauth { token, resource } => {
            h.update(b"oauth\0");
            h.update(Sha256::digest(token.as_bytes()));
            h.update(b"\0");
            h.update(resource.as_bytes());
        }
    }
    h.finalize().into()
}

/// Where one server's upstream session was opened, and how it is reached: kept so
/// `DELETE` can end it without a new check (ending a session grants nothing).
#[derive(Clone, Debug)]
pub struct UpstreamSession {
    /// The upstream's `Mcp-Session-Id`, when it gave one (stateless servers do not).
    pub id: Option<String>,
    pub protocol_version: Option<String>,
    pub target: crate::upstream::Target,
}

/// One session of the gateway URL.
pub struct Session {
    pub gateway: String,
    /// The protocol version agreed with the client, used toward every upstream.
    pub protocol_version: String,
    /// The upstream sessions opened so far, by server slug.
    pub upstreams: tokio::sync::Mutex<HashMap<String, UpstreamSession>>,
    /// Requests in flight to an upstream, by the JSON text of their id: where a
    /// `notifications/cancelled` for them goes.
    pub in_flight: std::sync::Mutex<HashMap<String, String>>,
    last_used: std::sync::Mutex<Instant>,
}

impl Session {
    pub fn new(gateway: &str, protocol_version: &str) -> Session {
        Session {
            gateway: gateway.to_owned(),
            protocol_version: protocol_version.to_owned(),
            upstreams: tokio::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
            last_used: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Every open session, by id.
#[derive(Default)]
pub struct Sessions {
    map: std::sync::Mutex<HashMap<String, Arc<Session>>>,
}

/// Most sessions open at once; `initialize` beyond is answered 503.
pub const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    /// Keeps `session` under `id`; `false` when full.
    pub fn insert(&self, id: String, session: Session) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return false;
        };
        if map.len() >= MAX_SESSIONS {
            return false;
        }
        map.insert(id, Arc::new(session));
        true
    }

    /// The session `id` names, if `key` issued it for `caller` and it is open.
    pub fn get(&self, key: &SessionKey, id: &str, caller: &Credential) -> Option<Arc<Session>> {
        if !key.verify(id, caller) {
            return None;
        }
        let session = self.map.lock().ok()?.get(id).cloned()?;
        session.touch();
        Some(session)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().ok()?.remove(id)
    }

    /// Drops sessions idle for longer than `idle`; returns how many.
    pub fn sweep(&self, idle: Duration) -> usize {
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let before = map.len();
        map.retain(|_, s| s.idle_for() <= idle);
        before - map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(hash: &str) -> Credential {
        Credential::ApiToken { hash: hash.into() }
    }

    #[test]
    fn an_id_verifies_only_for_the_credential_and_key_that_made_it() {
        let key = SessionKey::fixed(1);
        let alice = api(&"a".repeat(64));
        let bob = api(&"b".repeat(64));
        let id = key.issue(&alice).unwrap();
        assert_eq!(id.len(), 2 * (NONCE + TAG));
        assert!(key.verify(&id, &alice));
        assert!(!key.verify(&id, &bob), "another token");
        assert!(!SessionKey::fixed(2).verify(&id, &alice), "another process");
        let oauth = |token: &str, resource: &str| Credential::Oauth {
            token: token.into(),
            resource: resource.into(),
        };
        let o = key.issue(&oauth("t1", "http://gw/mcp/eng")).unwrap();
        assert!(key.verify(&o, &oauth("t1", "http://gw/mcp/eng")));
        assert!(!key.verify(&o, &oauth("t2", "http://gw/mcp/eng")));
        assert!(!key.verify(&o, &oauth("t1", "http://gw/mcp/ops")));
        // Two ids for one caller differ (the nonce).
        assert_ne!(key.issue(&alice).unwrap(), id);
    }

    #[test]
    fn tampered_or_malformed_ids_never_verify() {
        let key = SessionKey::fixed(1);
        let alice = api("x");
        let id = key.issue_with([7; NONCE], &alice);
        let mut flipped = id.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            "",
            "zz",
            &id[..id.len() - 2],
            &format!("{id}00"),
            &flipped,
            &id.to_uppercase(),
            "é",
        ] {
            if bad == id {
                continue;
            }
            assert!(!key.verify(bad, &alice), "{bad}");
        }
    }

    #[test]
    fn the_store_answers_only_the_bound_caller_and_sweeps_idle_sessions() {
        let key = SessionKey::fixed(3);
        let sessions = Sessions::default();
        let alice = api("a");
        let id = key.issue(&alice).unwrap();
        assert!(sessions.insert(id.clone(), Session::new("eng", "2025-06-18")));
        assert!(sessions.get(&key, &id, &alice).is_some());
        assert!(sessions.get(&key, &id, &api("b")).is_none());
        assert!(
            sessions
                .get(&key, &key.issue(&alice).unwrap(), &alice)
                .is_none()
        );
        assert_eq!(sessions.sweep(Duration::from_secs(60)), 0);
        assert_eq!(sessions.sweep(Duration::ZERO), 1);
        assert!(sessions.get(&key, &id, &alice).is_none());
    }
}
