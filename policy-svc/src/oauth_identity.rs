//! Identities by OAuth (issue 24): an OAuth-protected server's set-up (discovery and
//! registration), the "Connect" flow that turns a user's sign-in at the server's
//! authorization server into their identity, and the refresh that keeps its access
//! token current, one replica at a time per identity.
//!
//! Tokens are sealed like every identity (the access token in `identities.sealed` as
//! `Bearer …`, so injection is unchanged) and never logged, audited or returned.

use std::sync::LazyLock;
use std::time::Duration;

use mcpguard_core::check::DenyCode;

use crate::AppState;
use crate::error::ApiError;
use crate::oauth_client::{self, ClientError, ClientSecret, Http, Tokens};
use crate::secrets::{self, identity_binding};
use crate::store::check::CheckRow;
use crate::store::oauth_identities::{self as db, SealedTokens, ServerOauth};
use crate::store::{self, DbBool, now_ms};

/// An identity's OAuth states (`identities.oauth_status`).
pub const CONNECTED: &str = "connected";
pub const NEEDS_RECONNECT: &str = "needs_reconnect";

/// Where the authorization server sends the browser back.
pub const CALLBACK_PATH: &str = "/oauth/connect/callback";

/// The cookie that binds a Connect to the browser that started it on a page with no
/// sign-in session of its own (the enrollment page): random, sent only to the
/// callback, and the flow stores only its hash.
pub const CONNECT_COOKIE: &str = "mcpguard_connect";

/// A fresh browser binding for [`begin_connect`]: the `Set-Cookie` value to hand the
/// browser, and the hash to bind the flow to.
pub fn connect_cookie(state: &AppState) -> Result<(String, String), ApiError> {
    let value = secrets::random_id().map_err(ApiError::no_randomness)?;
    let cookie = format!(
        "{CONNECT_COOKIE}={value}; Path={CALLBACK_PATH}; HttpOnly; SameSite=Lax; Max-Age={}{}",
        CONNECT_TTL_MS / 1000,
        crate::pages::secure_attr(&state.oauth.issuer)
    );
    Ok((cookie, session_hash(&value)))
}

/// What a browser binding (a session token, a connect cookie) is stored as.
pub fn session_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The page a Connect returns to when it has none to go back to.
pub const RETURN_DONE: &str = "";

/// How long a refresh lease lasts: longer than a token call may take (10 s), so that
/// a lease ends only when its holder died mid-refresh.
const LEASE_MS: i64 = 15_000;
/// How long a check waits for an expired access token to be refreshed.
const INLINE_WAIT: Duration = Duration::from_secs(2);
/// How often a replica that does not hold the lease looks whether the refresh is done.
const POLL: Duration = Duration::from_millis(25);

/// One client for the process, on the service's outbound trust (its roots are read
/// once).
static HTTP: std::sync::OnceLock<Http> = std::sync::OnceLock::new();

fn http(state: &AppState) -> &'static Http {
    HTTP.get_or_init(|| Http::new(&state.outbound, state.upstreams.clone()))
}

/// What the refresh token is bound to: the identity's own binding would let a sealed
/// refresh token be swapped into `sealed` and injected upstream.
pub fn refresh_binding(user_id: i64, server_id: i64) -> String {
    format!("mcpguard identity refresh user={user_id} server={server_id}")
}

pub fn client_secret_binding(server_id: i64) -> String {
    format!("mcpguard oauth client secret server={server_id}")
}

pub fn verifier_binding(state_hash: &str) -> String {
    format!("mcpguard oauth connect state={state_hash}")
}

pub fn redirect_uri(state: &AppState) -> String {
    format!(
        "{}{CALLBACK_PATH}",
        state.oauth.issuer.trim_end_matches('/')
    )
}

fn seal(state: &AppState, plain: &str, bound_to: &str) -> Result<Vec<u8>, ApiError> {
    state.secrets.seal(plain, bound_to).map_err(|e| {
        tracing::error!(error = %e, "could not seal an OAuth value");
        ApiError::Unavailable
    })
}

/// What an admin says of an OAuth-protected server; all optional: by default the
/// authorization server is discovered and a client registered there. (No `Debug`: it
/// holds the client secret.)
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// The authorization server's issuer, when the upstream does not say (RFC 9728).
    pub issuer: Option<String>,
    /// A client registered by hand, when the server offers no dynamic registration.
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub scope: Option<String>,
}

fn bad_setup(e: ClientError) -> ApiError {
    let code = match e {
        ClientError::NotAllowed { .. } => "oauth_endpoint_not_allowed",
        _ => "oauth_discovery_failed",
    };
    ApiError::unprocessable(code, e.to_string())
}

/// Sets a server up as OAuth-protected: discovery (unless configured), then our client
/// (registered dynamically unless given), stored with its secret sealed.
pub async fn set_up(
    state: &AppState,
    server_id: i64,
    upstream_url: &str,
    setup: Setup,
) -> Result<ServerOauth, ApiError> {
    let upstream = url::Url::parse(upstream_url).map_err(|_| {
        ApiError::unprocessable("invalid_upstream", "the server's upstream is no URL")
    })?;
    for (name, value) in [
        ("client_id", &setup.client_id),
        ("client_secret", &setup.client_secret),
        ("scope", &setup.scope),
    ] {
        if value.as_deref().is_some_and(|v| {
            v.is_empty() || v.len() > 2048 || v.bytes().any(|b| b.is_ascii_control())
        }) {
            return Err(ApiError::unprocessable(
                "invalid_oauth",
                format!("{name} must be 1 to 2048 printable characters"),
            ));
        }
    }
    if setup.client_secret.is_some() && setup.client_id.is_none() {
        return Err(ApiError::unprocessable(
            "invalid_oauth",
            "client_secret needs its client_id",
        ));
    }
    let found = http(state)
        .discover(&upstream, setup.issuer.as_deref())
        .await
        .map_err(bad_setup)?;
    // Endpoints this service will call later are judged now too, so that an admin
    // learns of one the upstream network policy refuses at set-up, not at a Connect.
    for endpoint in std::iter::once(&found.token_endpoint).chain(&found.revocation_endpoint) {
        http(state).judge(endpoint).await.map_err(bad_setup)?;
    }
    let (client_id, secret, registered) = match setup.client_id {
        Some(id) => (id, setup.client_secret.map(ClientSecret), false),
        None => {
            let Some(endpoint) = found.registration_endpoint.as_deref() else {
                return Err(ApiError::unprocessable(
                    "oauth_client_required",
                    "the authorization server offers no dynamic client registration: give client_id (and client_secret)",
                ));
            };
            let (id, secret) = http(state)
                .register(endpoint, &redirect_uri(state))
                .await
                .map_err(bad_setup)?;
            (id, secret, true)
        }
    };
    let client_secret_sealed = secret
        .map(|ClientSecret(s)| seal(state, &s, &client_secret_binding(server_id)))
        .transpose()?;
    Ok(db::put_server_oauth(
        &state.db,
        &ServerOauth {
            server_id,
            issuer: found.issuer,
            authorization_endpoint: found.authorization_endpoint,
            token_endpoint: found.token_endpoint,
            revocation_endpoint: found.revocation_endpoint,
            resource: found.resource,
            scope: setup.scope,
            client_id,
            client_secret_sealed,
            registered: DbBool(registered),
            created_at: now_ms(),
        },
    )
    .await?)
}

fn client_secret(state: &AppState, server_id: i64, sealed: Option<&[u8]>) -> Option<ClientSecret> {
    sealed
        .and_then(|s| state.secrets.open(s, &client_secret_binding(server_id)))
        .map(ClientSecret)
}

/// Why a Connect could not be finished.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("this sign-in link was used already, or is too old: start again")]
    UnknownState,
    #[error("this sign-in was started in another browser session: start again")]
    OtherSession,
    #[error("the server is not OAuth-protected any more")]
    NotOauth,
    #[error("the server's sign-in did not complete: {0}")]
    Token(ClientError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<store::StoreError> for ConnectError {
    fn from(e: store::StoreError) -> Self {
        ConnectError::Api(e.into())
    }
}

const CONNECT_TTL_MS: i64 = 10 * 60_000;

/// Starts a Connect of `user_id`'s identity by the signed-in `started_by` (the user
/// themself, or an admin connecting a service account), whose browser session hashes
/// to `session_hash`: a single-use `state` bound to that session, a PKCE pair, and the
/// authorization URL the browser is sent to. `return_to` is where the browser comes
/// back afterwards (a path of ours).
pub async fn begin_connect(
    state: &AppState,
    (user_id, started_by): (i64, i64),
    session_hash: &str,
    server_id: i64,
    return_to: &str,
) -> Result<Option<String>, ApiError> {
    let Some(o) = db::server_oauth(&state.db, server_id).await? else {
        return Ok(None);
    };
    let flow_state = secrets::random_id().map_err(ApiError::no_randomness)?;
    let state_hash = state_hash(&flow_state);
    let (verifier, challenge) = oauth_client::pkce_pair().map_err(ApiError::no_randomness)?;
    let verifier_sealed = seal(state, &verifier, &verifier_binding(&state_hash))?;
    db::insert_connect_state(
        &state.db,
        &db::NewConnectState {
            state_hash: &state_hash,
            session_hash,
            user_id,
            server_id,
            verifier_sealed: &verifier_sealed,
            return_to,
            ttl_ms: CONNECT_TTL_MS,
            started_by: (started_by != user_id).then_some(started_by),
        },
    )
    .await?;
    let url = oauth_client::authorize_url(
        &o.authorization_endpoint,
        &o.client_id,
        &redirect_uri(state),
        &flow_state,
        &challenge,
        &o.resource,
        o.scope.as_deref(),
    )
    .map_err(|e| ApiError::unprocessable("invalid_oauth", e.to_string()))?;
    Ok(Some(url))
}

pub fn state_hash(flow_state: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        format!("mcpguard connect {flow_state}").as_bytes(),
    ))
}

/// Whether a taken flow may be finished by this browser session now: the session
/// that started it, before it expired. Pure, so that the binding is tested alone.
/// `bindings` are the hashes of what the browser presented (its sign-in session, its
/// connect cookie).
pub fn flow_is_this_sessions(
    flow: &db::ConnectState,
    bindings: &[&str],
    now: i64,
) -> Result<(), ConnectError> {
    if flow.expires_at < now {
        return Err(ConnectError::UnknownState);
    }
    // Every one compared, in constant time each.
    let matched = bindings
        .iter()
        .fold(false, |m, h| secrets::ct_eq(h, &flow.session_hash) | m);
    if matched {
        Ok(())
    } else {
        Err(ConnectError::OtherSession)
    }
}

/// Finishes a Connect: the state is taken (it works once, whatever follows), checked
/// against the browser's session, the code exchanged with the PKCE verifier, and the
/// tokens kept sealed as the user's identity. Returns where to send the browser.
pub async fn finish_connect(
    state: &AppState,
    bindings: &[&str],
    flow_state: &str,
    code: &str,
) -> Result<String, ConnectError> {
    let state_hash = state_hash(flow_state);
    let flow = db::take_connect_state(&state.db, &state_hash)
        .await?
        .ok_or(ConnectError::UnknownState)?;
    flow_is_this_sessions(&flow, bindings, now_ms())?;
    let o = db::server_oauth(&state.db, flow.server_id)
        .await?
        .ok_or(ConnectError::NotOauth)?;
    let verifier = state
        .secrets
        .open(&flow.verifier_sealed, &verifier_binding(&state_hash))
        .ok_or(ConnectError::Api(ApiError::Unavailable))?;
    let secret = client_secret(state, o.server_id, o.client_secret_sealed.as_deref());
    let redirect = redirect_uri(state);
    let tokens = http(state)
        .token(
            "code exchange",
            &o.token_endpoint,
            &o.client_id,
            secret.as_ref(),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &redirect),
                ("code_verifier", &verifier),
                ("resource", &o.resource),
            ],
            now_ms(),
        )
        .await
        .map_err(ConnectError::Token)?;
    let (user_id, server_id) = (flow.user_id, flow.server_id);
    let sealed = seal_tokens(state, user_id, server_id, &tokens)?;
    let id = db::put_connected(&state.db, user_id, server_id, &sealed.as_tokens()).await?;
    state
        .audit
        .admin(
            flow.started_by.unwrap_or(user_id),
            "identity.connect",
            format!("identities/{id}"),
            None,
            Some(
                serde_json::json!({"user_id": user_id, "server_id": server_id, "issuer": o.issuer}),
            ),
        )
        .await
        .map_err(ApiError::from)?;
    tracing::info!(
        identity_id = id,
        user_id,
        server_id,
        "identity connected by OAuth"
    );
    Ok(flow.return_to)
}

struct Sealed {
    access: Vec<u8>,
    refresh: Option<Vec<u8>>,
    expires_at: i64,
    refresh_at: i64,
}

impl Sealed {
    fn as_tokens(&self) -> SealedTokens<'_> {
        SealedTokens {
            access: &self.access,
            refresh: self.refresh.as_deref(),
            expires_at: self.expires_at,
            refresh_at: self.refresh_at,
        }
    }
}

fn seal_tokens(
    state: &AppState,
    user_id: i64,
    server_id: i64,
    t: &Tokens,
) -> Result<Sealed, ApiError> {
    Ok(Sealed {
        access: seal(
            state,
            &format!("Bearer {}", t.access_token),
            &identity_binding(user_id, server_id),
        )?,
        refresh: t
            .refresh_token
            .as_deref()
            .map(|r| seal(state, r, &refresh_binding(user_id, server_id)))
            .transpose()?,
        expires_at: t.expires_at,
        refresh_at: t.refresh_at,
    })
}

/// An OAuth identity in a check's row whose refresh is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub identity_id: i64,
    pub refresh_at: i64,
    /// The access token has expired (or is about to): the check waits for the refresh.
    pub expired: bool,
}

/// Whether the row's identity is a connected OAuth one whose refresh is due at `now`.
pub fn due(row: &CheckRow, now: i64) -> Option<Due> {
    if row.identity_owner().is_none()
        || row.identity_oauth_status.as_deref() != Some(CONNECTED)
        || !row.identity_enabled.is_some_and(|e| e.0)
    {
        return None;
    }
    let (identity_id, refresh_at) = (row.identity_id?, row.identity_oauth_refresh_at?);
    (refresh_at <= now).then(|| Due {
        identity_id,
        refresh_at,
        // A second of slack: the token must still work when it reaches the upstream.
        expired: row
            .identity_oauth_expires_at
            .is_none_or(|e| e <= now.saturating_add(1_000)),
    })
}

/// What became of a refresh attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// New tokens stored (by us, or by whoever held the lease).
    Done,
    /// The authorization server refused: the identity needs reconnecting.
    Refused,
    /// Another replica (or task) holds the lease.
    Busy,
    /// No answer; the lease was given back.
    Failed,
}

/// Refreshes an identity whose refresh was due at `seen_refresh_at`, if this replica
/// gets its lease; otherwise [`Refresh::Busy`].
pub async fn refresh(state: &AppState, identity_id: i64, seen_refresh_at: i64) -> Refresh {
    match try_refresh(state, identity_id, seen_refresh_at).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(identity_id, error = %e, "OAuth identity refresh: store error");
            Refresh::Failed
        }
    }
}

async fn try_refresh(
    state: &AppState,
    identity_id: i64,
    seen_refresh_at: i64,
) -> Result<Refresh, store::StoreError> {
    let now = now_ms();
    let lease = now + LEASE_MS;
    if !db::take_lease(&state.db, identity_id, seen_refresh_at, now, lease).await? {
        return Ok(Refresh::Busy);
    }
    let Some(r) = db::refreshable(&state.db, identity_id).await? else {
        // The server is no longer OAuth-protected: nothing to refresh with.
        db::release_lease(&state.db, identity_id, lease).await?;
        return Ok(Refresh::Failed);
    };
    let refresh_token = r.refresh_sealed.as_deref().and_then(|s| {
        state
            .secrets
            .open(s, &refresh_binding(r.user_id, r.server_id))
    });
    let Some(refresh_token) = refresh_token else {
        // No refresh token was issued (or it does not open): only a new sign-in helps.
        db::mark_needs_reconnect(&state.db, identity_id, lease).await?;
        tracing::info!(
            identity_id,
            "OAuth identity has no usable refresh token: it needs reconnecting"
        );
        return Ok(Refresh::Refused);
    };
    let secret = client_secret(state, r.server_id, r.client_secret_sealed.as_deref());
    let answer = http(state)
        .token(
            "refresh",
            &r.token_endpoint,
            &r.client_id,
            secret.as_ref(),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh_token),
                ("resource", &r.resource),
            ],
            now_ms(),
        )
        .await;
    match answer {
        Ok(tokens) => {
            let Ok(sealed) = seal_tokens(state, r.user_id, r.server_id, &tokens) else {
                db::release_lease(&state.db, identity_id, lease).await?;
                return Ok(Refresh::Failed);
            };
            if db::finish_refresh(&state.db, identity_id, lease, &sealed.as_tokens()).await? {
                tracing::info!(identity_id, "OAuth identity refreshed");
            } else {
                tracing::warn!(
                    identity_id,
                    "OAuth identity refresh finished after its lease ran out; its tokens are dropped"
                );
            }
            Ok(Refresh::Done)
        }
        Err(ClientError::Refused { status, error, .. }) => {
            db::mark_needs_reconnect(&state.db, identity_id, lease).await?;
            tracing::info!(identity_id, status, error = %error, "OAuth identity refresh refused: it needs reconnecting");
            Ok(Refresh::Refused)
        }
        Err(e) => {
            db::release_lease(&state.db, identity_id, lease).await?;
            tracing::warn!(identity_id, error = %e, "OAuth identity refresh got no answer; the next request tries again");
            Ok(Refresh::Failed)
        }
    }
}

/// For the check: makes sure the row's OAuth identity (if any) is fresh enough to
/// inject. A refresh due while the token still works runs in the background and the
/// request goes on with the current token; an expired token is refreshed (or waited
/// for, when another replica holds the lease) before the check goes on. `Ok(true)`
/// when the row must be read again; `Err` refuses the request.
pub async fn freshen(state: &AppState, row: &CheckRow) -> Result<bool, DenyCode> {
    let Some(due) = due(row, now_ms()) else {
        return Ok(false);
    };
    if !due.expired {
        // One background refresh per identity per replica at a time (the lease orders
        // the replicas): the requests meanwhile go on with the current token.
        let Some(in_flight) = InFlight::claim(due.identity_id) else {
            return Ok(false);
        };
        let state = state.clone();
        tokio::spawn(async move {
            refresh(&state, due.identity_id, due.refresh_at).await;
            drop(in_flight);
        });
        return Ok(false);
    }
    let waited = tokio::time::timeout(INLINE_WAIT, async {
        loop {
            match refresh(state, due.identity_id, due.refresh_at).await {
                Refresh::Done | Refresh::Refused => return true,
                Refresh::Failed => return false,
                Refresh::Busy => {}
            }
            // Someone else refreshes: done once the row's refresh time moved on (or
            // its state changed).
            match db_refresh_state(state, due.identity_id).await {
                Some((Some(at), Some(status))) if at == due.refresh_at && status == CONNECTED => {
                    tokio::time::sleep(POLL).await;
                }
                _ => return true,
            }
        }
    })
    .await;
    match waited {
        Ok(true) => Ok(true),
        Ok(false) | Err(_) => Err(DenyCode::PolicyUnavailable),
    }
}

static IN_FLIGHT: LazyLock<std::sync::Mutex<std::collections::HashSet<i64>>> =
    LazyLock::new(Default::default);

/// An identity this replica is refreshing in the background, until dropped.
struct InFlight(i64);

impl InFlight {
    fn claim(identity_id: i64) -> Option<InFlight> {
        let inserted = IN_FLIGHT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(identity_id);
        // Made only once the lock is released (its drop takes the lock), and only
        // when claimed: `then_some` would make, and drop, one either way.
        inserted.then(|| InFlight(identity_id))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
    }
}

async fn db_refresh_state(
    state: &AppState,
    identity_id: i64,
) -> Option<(Option<i64>, Option<String>)> {
    sqlx::query_as("SELECT oauth_refresh_at, oauth_status FROM identities WHERE id = $1")
        .bind(identity_id)
        .fetch_optional(&state.db)
        .await
        .ok()
        .flatten()
}

/// Revokes an identity's refresh token at its authorization server (RFC 7009), where
/// the server offers revocation; best effort (logged), before the identity goes.
pub async fn revoke(state: &AppState, identity_id: i64) {
    let Ok(Some(r)) = db::revocable(&state.db, identity_id).await else {
        return;
    };
    let Some(token) = state
        .secrets
        .open(&r.refresh_sealed, &refresh_binding(r.user_id, r.server_id))
    else {
        return;
    };
    match http(state)
        .revoke(&r.revocation_endpoint, &r.client_id, &token)
        .await
    {
        Ok(()) => tracing::info!(
            identity_id,
            "OAuth identity revoked at its authorization server"
        ),
        Err(e) => tracing::warn!(identity_id, error = %e, "OAuth identity revocation failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(session: &str, expires_at: i64) -> db::ConnectState {
        db::ConnectState {
            session_hash: session.into(),
            user_id: 1,
            server_id: 2,
            verifier_sealed: Vec::new(),
            return_to: "/oauth/authorize?x".into(),
            expires_at,
            started_by: None,
        }
    }

    #[test]
    fn a_flow_is_finished_only_by_the_session_that_started_it_in_time() {
        assert!(flow_is_this_sessions(&flow("s1", 100), &["s1"], 50).is_ok());
        assert!(flow_is_this_sessions(&flow("s1", 100), &["s0", "s1"], 50).is_ok());
        assert!(matches!(
            flow_is_this_sessions(&flow("s1", 100), &["s2"], 50),
            Err(ConnectError::OtherSession)
        ));
        assert!(matches!(
            flow_is_this_sessions(&flow("s1", 100), &[], 50),
            Err(ConnectError::OtherSession)
        ));
        assert!(matches!(
            flow_is_this_sessions(&flow("s1", 100), &["s1"], 101),
            Err(ConnectError::UnknownState)
        ));
        assert_ne!(state_hash("a"), state_hash("b"));
        assert_ne!(state_hash("a"), "a");
    }

    #[test]
    fn one_background_refresh_per_identity_at_a_time() {
        let first = InFlight::claim(77).expect("free");
        assert!(InFlight::claim(77).is_none(), "already in flight");
        let other = InFlight::claim(78).expect("another identity");
        drop(first);
        assert!(InFlight::claim(77).is_some(), "free again once done");
        drop(other);
    }

    #[test]
    fn bindings_keep_refresh_tokens_out_of_the_injected_slot() {
        assert_ne!(refresh_binding(1, 2), identity_binding(1, 2));
        assert_ne!(refresh_binding(1, 2), refresh_binding(2, 1));
        assert_ne!(client_secret_binding(1), client_secret_binding(2));
    }
}
