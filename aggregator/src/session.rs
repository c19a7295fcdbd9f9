//! The gateway URL's sessions: an `Mcp-Session-Id` that no one can forge and that only
//! the credential which opened it can use, and what the aggregator keeps per session
//! (the upstream sessions it opened, lazily, one per server: the first use opens it,
//! and uses at the same moment wait for that one, [`Session::upstream`]).
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

use crate::upstream::{Client, Target, UpstreamError};
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
    pub target: Target,
}

/// An upstream session's id and the protocol version it speaks (`None` each when the
/// upstream gave none: a stateless server, an older one).
pub type Opened = (Option<String>, Option<String>);

/// The opening of one server's upstream session under way: whoever comes while it is
/// takes its outcome instead of opening another.
type Opening = Arc<tokio::sync::OnceCell<Result<Opened, UpstreamError>>>;

/// A request a server made of the client, waiting for the client's answer.
#[derive(Clone, Debug)]
pub struct Asked {
    pub server: String,
    /// The server's own id for it.
    pub id: serde_json::Value,
    pub method: String,
}

/// Most requests of servers waiting for the client's answer, per session; past that a
/// server's request is refused (a client that never answers holds no more memory).
pub const MAX_ASKED: usize = 64;

/// One session of the gateway URL.
pub struct Session {
    pub gateway: String,
    /// The protocol version agreed with the client, used toward every upstream.
    pub protocol_version: String,
    /// The upstream sessions opened so far, by server slug.
    pub upstreams: tokio::sync::Mutex<HashMap<String, UpstreamSession>>,
    /// The openings under way, by server slug ([`Session::upstream`]).
    opening: std::sync::Mutex<HashMap<String, Opening>>,
    /// Requests in flight to an upstream, by the JSON text of their id: where a
    /// `notifications/cancelled` for them goes.
    pub in_flight: std::sync::Mutex<HashMap<String, String>>,
    /// What the client declared it can answer of a server's requests
    /// (`elicitation`, `sampling`, `roots` of its `initialize`); declared to each
    /// upstream as the aggregator's own.
    pub client_capabilities: serde_json::Value,
    /// Requests servers made of the client, relayed under the aggregator's id, by
    /// that id's JSON text: where the client's answer goes.
    pub asked: std::sync::Mutex<HashMap<String, Asked>>,
    asked_count: std::sync::atomic::AtomicU64,
    /// Turns true once the session ends (`DELETE`, expiry): its GET stream ends.
    ended: tokio::sync::watch::Sender<bool>,
    /// The newest GET stream's number: only it is served (a client that opens another
    /// has given up on the one before), and one replaced ends at once.
    newest_stream: tokio::sync::watch::Sender<u64>,
    /// Held by the GET stream that relays the upstreams' streams: a newer one opens
    /// its upstream streams only once the one before has closed its own. Break before
    /// make, as a server may serve one GET stream per session (rmcp's gives a second
    /// one nothing while the first looks alive).
    pub relaying: tokio::sync::Mutex<()>,
    last_used: std::sync::Mutex<Instant>,
}

impl Session {
    pub fn new(gateway: &str, protocol_version: &str) -> Session {
        Session {
            gateway: gateway.to_owned(),
            protocol_version: protocol_version.to_owned(),
            upstreams: tokio::sync::Mutex::default(),
            opening: std::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
            client_capabilities: serde_json::json!({}),
            asked: std::sync::Mutex::default(),
            asked_count: std::sync::atomic::AtomicU64::new(0),
            ended: tokio::sync::watch::Sender::new(false),
            newest_stream: tokio::sync::watch::Sender::new(0),
            relaying: tokio::sync::Mutex::new(()),
            last_used: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// With what the client declared at `initialize` (its `capabilities`): only what
    /// a server may ask of it is kept.
    pub fn with_client_capabilities(mut self, declared: &serde_json::Value) -> Session {
        let mut kept = serde_json::Map::new();
        for key in ["elicitation", "sampling", "roots"] {
            if let Some(v) = declared.get(key).filter(|v| v.is_object()) {
                kept.insert(key.to_owned(), v.clone());
            }
        }
        self.client_capabilities = serde_json::Value::Object(kept);
        self
    }

    /// Whether the client declared the capability a server's request `method` needs.
    pub fn client_answers(&self, method: &str) -> bool {
        let capability = match method {
            "elicitation/create" => "elicitation",
            "sampling/createMessage" => "sampling",
            "roots/list" => "roots",
            _ => return false,
        };
        self.client_capabilities.get(capability).is_some()
    }

    /// Keeps `server`'s request (its own `id`) for the client's answer; the id the
    /// client is sent instead, one of the aggregator's, so two servers' ids never
    /// clash. `None` when too many are waiting.
    pub fn ask_client(&self, server: &str, id: serde_json::Value, method: &str) -> Option<String> {
        let mut asked = self.asked.lock().ok()?;
        if asked.len() >= MAX_ASKED {
            return None;
        }
        let n = self
            .asked_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ours = format!("mcpguard-ask-{n}");
        asked.insert(
            serde_json::Value::String(ours.clone()).to_string(),
            Asked {
                server: server.to_owned(),
                id,
                method: method.to_owned(),
            },
        );
        Some(ours)
    }

    /// The request the client's answer with `id` is for, taken.
    pub fn answered(&self, id: &serde_json::Value) -> Option<Asked> {
        self.asked.lock().ok()?.remove(&id.to_string())
    }

    /// The upstream session with `server`, opened on first use (and again when the
    /// server's upstream changed). Single flight: a session's first call and its GET
    /// stream (or several first calls) arriving at once used to open one upstream
    /// session each, all but the last left open on the server and forgotten here. Now
    /// the first opens it and the others take its outcome, its failure too: they fail
    /// as fast as it did rather than each trying in turn behind it (a stalled server
    /// would cost each waiter another timeout).
    pub async fn upstream(
        &self,
        client: &Client,
        server: &str,
        target: &Target,
    ) -> Result<Opened, UpstreamError> {
        if let Some(opened) = self.opened(server, target).await {
            return Ok(opened);
        }
        let opening = match self.opening.lock() {
            Ok(mut opening) => opening.entry(server.to_owned()).or_default().clone(),
            // A poisoned map (a panic elsewhere) opens without waiting for anyone.
            Err(_) => Opening::default(),
        };
        let outcome = opening
            .get_or_init(|| async {
                // Opened between the look above and this opening being ours.
                if let Some(opened) = self.opened(server, target).await {
                    return Ok(opened);
                }
                let (id, version) = client
                    .initialize(target, &self.protocol_version, &self.client_capabilities)
                    .await?;
                self.upstreams.lock().await.insert(
                    server.to_owned(),
                    UpstreamSession {
                        id: id.clone(),
                        protocol_version: version.clone(),
                        target: target.clone(),
                    },
                );
                Ok((id, version))
            })
            .await
            .clone();
        // Done: the next first use (after a failure, or once the upstream forgot this
        // session) opens anew.
        if let Ok(mut map) = self.opening.lock()
            && map.get(server).is_some_and(|o| Arc::ptr_eq(o, &opening))
        {
            map.remove(server);
        }
        outcome
    }

    /// The upstream session with `server` already open at `target`'s upstream, its
    /// credential now that of `target` (this very allow's).
    async fn opened(&self, server: &str, target: &Target) -> Option<Opened> {
        let mut upstreams = self.upstreams.lock().await;
        let up = upstreams
            .get_mut(server)
            .filter(|up| up.target.same_upstream(target))?;
        up.target = target.clone();
        Some((up.id.clone(), up.protocol_version.clone()))
    }

    /// Forgets the upstream session with `server` whose id is `id` (the upstream
    /// answered 404 to it), so the next use opens another; one opened since by
    /// another request is kept.
    pub async fn forget_upstream(&self, server: &str, id: Option<&str>) {
        let mut upstreams = self.upstreams.lock().await;
        if upstreams
            .get(server)
            .is_some_and(|up| up.id.as_deref() == id)
        {
            upstreams.remove(server);
        }
    }

    /// A new GET stream: its number, now the newest.
    pub fn open_stream(&self) -> u64 {
        let mut number = 0;
        self.newest_stream.send_modify(|n| {
            *n += 1;
            number = *n;
        });
        number
    }

    /// Resolves once GET stream `number` is no longer the newest.
    pub async fn replaced(&self, number: u64) {
        let mut newest = self.newest_stream.subscribe();
        // Err only if the sender is gone, which it is not while `self` lives.
        let _ = newest.wait_for(|n| *n != number).await;
    }

    /// Marks the session ended: whatever waits on [`Session::ended`] stops.
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Resolves once the session has ended.
    pub async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        // Err only if the sender is gone, which it is not while `self` lives.
        let _ = ended.wait_for(|e| *e).await;
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

    /// Ends and forgets the session `id`.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let session = self.map.lock().ok()?.remove(id)?;
        session.end();
        Some(session)
    }

    /// Ends every session's GET stream (the process is stopping: a graceful shutdown
    /// waits for open responses, and a GET stream would otherwise never end).
    pub fn end_all(&self) {
        if let Ok(map) = self.map.lock() {
            map.values().for_each(|s| s.end());
        }
    }

    /// Ends and drops sessions idle for longer than `idle`; returns how many.
    pub fn sweep(&self, idle: Duration) -> usize {
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let before = map.len();
        map.retain(|_, s| {
            let keep = s.idle_for() <= idle;
            if !keep {
                s.end();
            }
            keep
        });
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
        let session = sessions.get(&key, &id, &alice).unwrap();
        assert_eq!(sessions.sweep(Duration::from_secs(60)), 0);
        assert_eq!(sessions.sweep(Duration::ZERO), 1);
        assert!(sessions.get(&key, &id, &alice).is_none());
        assert!(
            *session.ended.borrow(),
            "an expired session's GET stream ends"
        );
    }

    #[test]
    fn requests_of_servers_get_ids_of_their_own_and_only_declared_ones() {
        let declared = serde_json::json!({"elicitation": {}, "experimental": {}, "roots": true});
        let s = Session::new("eng", "2025-06-18").with_client_capabilities(&declared);
        assert!(s.client_answers("elicitation/create"));
        assert!(
            !s.client_answers("roots/list"),
            "not an object: not declared"
        );
        assert!(!s.client_answers("sampling/createMessage"));
        assert!(!s.client_answers("tools/call"));
        let a = s
            .ask_client("alpha", serde_json::json!(0), "elicitation/create")
            .unwrap();
        let b = s
            .ask_client("beta", serde_json::json!(0), "elicitation/create")
            .unwrap();
        assert_ne!(a, b, "the same id from two servers");
        let asked = s.answered(&serde_json::json!(b)).unwrap();
        assert_eq!(
            (asked.server.as_str(), asked.id),
            ("beta", serde_json::json!(0))
        );
        assert!(s.answered(&serde_json::json!(b)).is_none(), "answered once");
        assert!(
            s.answered(&serde_json::json!(0)).is_none(),
            "the server's own id"
        );
        for _ in 1..MAX_ASKED {
            assert!(
                s.ask_client("alpha", serde_json::json!(1), "roots/list")
                    .is_some()
            );
        }
        assert!(
            s.ask_client("alpha", serde_json::json!(2), "roots/list")
                .is_none()
        );
    }

    /// An upstream that counts `initialize`s and answers each slowly (so uses that
    /// arrive together overlap), as session `s{n}`; with `fail`, 500 instead.
    async fn slow_upstream(fail: bool) -> (Target, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(move |body: String| {
                let seen = seen.clone();
                async move {
                    let message: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if message["method"] != "initialize" {
                        return (
                            axum::http::StatusCode::ACCEPTED,
                            [("mcp-session-id", String::new())],
                            String::new(),
                        );
                    }
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if fail {
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [("mcp-session-id", String::new())],
                            String::new(),
                        );
                    }
                    let answer = serde_json::json!({"jsonrpc": "2.0", "id": message["id"],
                        "result": {"protocolVersion": "2025-06-18"}});
                    (
                        axum::http::StatusCode::OK,
                        [("mcp-session-id", format!("s{n}"))],
                        answer.to_string(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let upstream = mcpguard_core::check::Upstream {
            scheme: mcpguard_core::check::Scheme::Http,
            authority: address.clone(),
            base_path: "/mcp".into(),
            address: Some(address),
        };
        (Target::of(&upstream, None).unwrap(), count)
    }

    fn client() -> Client {
        Client::new(reqwest::Client::new(), Vec::new(), Duration::from_secs(5))
    }

    #[tokio::test]
    async fn uses_at_once_open_one_upstream_session_and_share_its_failure() {
        use std::sync::atomic::Ordering;
        let (target, initialized) = slow_upstream(false).await;
        let (client, session) = (client(), Session::new("eng", "2025-06-18"));
        let opened = futures_util::future::join_all(
            (0..8).map(|_| session.upstream(&client, "alpha", &target)),
        )
        .await;
        assert_eq!(initialized.load(Ordering::SeqCst), 1, "one initialize");
        for o in &opened {
            assert_eq!(o.as_ref().unwrap().0.as_deref(), Some("s0"), "{opened:?}");
        }
        // Opened: later uses take it without asking.
        session.upstream(&client, "alpha", &target).await.unwrap();
        assert_eq!(initialized.load(Ordering::SeqCst), 1);
        // Forgotten only under the id the upstream refused.
        session.forget_upstream("alpha", Some("other")).await;
        session.upstream(&client, "alpha", &target).await.unwrap();
        assert_eq!(initialized.load(Ordering::SeqCst), 1);
        session.forget_upstream("alpha", Some("s0")).await;
        let again = session.upstream(&client, "alpha", &target).await.unwrap();
        assert_eq!(
            (again.0.as_deref(), initialized.load(Ordering::SeqCst)),
            (Some("s1"), 2)
        );

        // A failing opening fails every use waiting on it at once (not one timeout
        // each in turn), and the next use tries again.
        let (target, initialized) = slow_upstream(true).await;
        let started = Instant::now();
        let failed = futures_util::future::join_all(
            (0..8).map(|_| session.upstream(&client, "beta", &target)),
        )
        .await;
        assert!(failed.iter().all(Result::is_err), "{failed:?}");
        assert_eq!(initialized.load(Ordering::SeqCst), 1);
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
        assert!(session.upstream(&client, "beta", &target).await.is_err());
        assert_eq!(initialized.load(Ordering::SeqCst), 2, "tried again");
    }

    #[tokio::test]
    async fn a_removed_session_ends() {
        let sessions = Sessions::default();
        assert!(sessions.insert("s".into(), Session::new("eng", "2025-06-18")));
        let session = sessions.map.lock().unwrap().get("s").cloned().unwrap();
        let waiting = tokio::spawn({
            let session = session.clone();
            async move { session.ended().await }
        });
        assert!(sessions.remove("s").is_some());
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("ended() resolves once removed")
            .unwrap();
    }
}
