//! Present: what a request's credential proves before the store is asked.

use std::time::Duration;

use mcpguard_core::check::DenyCode;
use mcpguard_core::jwt;
use mcpguard_core::oauth::resource_url;
use mcpguard_core::token::{TokenHash, data_plane_kind};

use crate::AppState;
use crate::store::{self, StoreError};

/// A request's credential, in the form its wire carries it.
pub enum WireCredential<'a> {
    /// None at all (ext_authz: no `Authorization` header).
    Missing,
    /// Something that is not a bearer token (ext_authz: `Authorization: Basic …`).
    NotBearer,
    /// An API token's SHA-256: the wasm filter read the token and sends only its hash.
    ApiTokenHash(TokenHash),
    /// An access token the wasm filter verified for `resource`, the MCP URL it says the
    /// client used: that must be this request's URL under one of
    /// `--resource-base-urls`, and the token is verified again here.
    AccessToken { token: &'a str, resource: &'a str },
    /// A bearer token as the client sent it, of either kind (ext_authz). `audience`
    /// builds this request's MCP URL, only for an access token (not for every API token).
    Bearer {
        token: &'a str,
        audience: &'a (dyn Fn() -> String + Sync),
    },
}

/// How the client proved who it is, once its credential has been looked at.
pub(super) enum Presented {
    ApiToken(TokenHash),
    /// A verified access token's grant and connection.
    Oauth {
        grant: i64,
        connection: i64,
    },
}

/// Why a credential goes no further than its own look.
pub(super) enum Unpresentable {
    Refused(DenyCode),
    /// An access token, and no keys to verify it with: not a decision.
    NoKeys(StoreError),
}

/// The credential's proof for a request to `gateway`'s `server`: the filter's token
/// policy for opaque tokens ([`data_plane_kind`]), and an access token verified for
/// this request's MCP URL.
pub(super) async fn present(
    state: &AppState,
    credential: WireCredential<'_>,
    gateway: Option<&str>,
    server: &str,
    deadline: Duration,
) -> Result<Presented, Unpresentable> {
    match credential {
        WireCredential::Missing => Err(Unpresentable::Refused(DenyCode::TokenMissing)),
        WireCredential::NotBearer => Err(Unpresentable::Refused(DenyCode::TokenMalformed)),
        WireCredential::ApiTokenHash(hash) => Ok(Presented::ApiToken(hash)),
        WireCredential::AccessToken { token, resource } => {
            // An access token is for one MCP URL, which names its gateway: this
            // server's, or the gateway URL (whose aggregator checks each server of
            // the gateway with the caller's token; the layers still decide).
            let Some(gateway) = gateway else {
                return Err(Unpresentable::Refused(DenyCode::TokenWrongGateway));
            };
            let ours = state.oauth.resource_base_urls.iter().any(|base| {
                resource_url(base, gateway, server) == resource
                    || resource_url(base, gateway, "") == resource
            });
            if !ours {
                return Err(Unpresentable::Refused(DenyCode::TokenWrongGateway));
            }
            if !jwt::looks_like_jwt(token) {
                return Err(Unpresentable::Refused(DenyCode::TokenMalformed));
            }
            verify(state, token, resource, deadline).await
        }
        WireCredential::Bearer { token, audience } => {
            if jwt::looks_like_jwt(token) {
                return verify(state, token, &audience(), deadline).await;
            }
            data_plane_kind(token).map_err(Unpresentable::Refused)?;
            Ok(Presented::ApiToken(TokenHash::of(token)))
        }
    }
}

/// An access token verified as the filter verifies it, with the published keys: its
/// signature, issuer, expiry, and `audience`.
async fn verify(
    state: &AppState,
    token: &str,
    audience: &str,
    deadline: Duration,
) -> Result<Presented, Unpresentable> {
    let keys = state
        .verifier
        .keys_for(token, &state.db, state.oauth.max_token_age_ms(), deadline)
        .await
        .map_err(Unpresentable::NoKeys)?;
    let now_s = store::now_ms() / 1000;
    let claims = jwt::verify(token, &keys, &state.oauth.issuer, audience, now_s)
        .map_err(Unpresentable::Refused)?;
    Ok(Presented::Oauth {
        grant: claims.gid,
        connection: claims.cid,
    })
}
