//! The data plane's check, one pipeline for both of its wires: `/v1/check`, the wasm
//! filter's callout, and `/v1/ext_authz`, Envoy's ext_authz filter. A request is
//!
//! 1. **presented** ([`present`]): what its credential proves before the store is
//!    asked, an API token's hash or an access token verified here (signature, issuer,
//!    expiry, audience);
//! 2. **loaded**: one read of the authoritative store
//!    ([`Reads::load`](crate::store::check::Reads::load)), uncached;
//! 3. **decided** ([`decide`]): a pure function of that row, layer by layer;
//! 4. **pinned** ([`pin`]), on `/v1/check` only: the wasm filter sends an allowed request
//!    where the answer says, so the upstream's address is resolved and judged here;
//!    with ext_authz, Envoy's route configuration picks the upstream ([`Wire`]);
//! 5. **recorded** ([`record`]): logged and audited, and the credential's use noted.
//!
//! The routes only translate, their wire form into an [`Input`] and the [`Outcome`] into
//! their wire answer. A store that gives no answer in time, or no keys to verify an
//! access token with, is no decision: [`Outcome::Unavailable`], a 503, logged and not
//! audited. Fail closed, and fast.

mod decide;
mod pin;
mod present;
mod record;

use std::collections::BTreeMap;
use std::time::Duration;

use mcpguard_core::check::{CheckResponse, DenyCode, EachServer};

pub use present::WireCredential;
pub use record::Context;

use crate::store::{self, check::Lookup, features::Modes};
use crate::{AppState, features};
use present::{Presented, Unpresentable};
use record::Seen;

/// Which wire a request came in on: what its log lines are called, and who routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `/v1/check`: the wasm filter routes an allowed request to the upstream the
    /// answer names, so the answer carries the address it was judged at.
    Check,
    /// `/v1/ext_authz`: Envoy routes by its own route configuration and uses only
    /// allow or deny (and the header to inject); there is no address to pin.
    ExtAuthz,
}

impl Wire {
    /// Whether an allow is pinned to the upstream address judged for it.
    fn pins_upstream(self) -> bool {
        matches!(self, Wire::Check)
    }

    /// The wire's `wire` label in the metrics.
    fn label(self) -> &'static str {
        match self {
            Wire::Check => "check",
            Wire::ExtAuthz => "ext_authz",
        }
    }

    /// The message of this wire's log lines.
    fn name(self) -> &'static str {
        match self {
            Wire::Check => "check",
            Wire::ExtAuthz => "ext_authz check",
        }
    }
}

/// One request to decide, read from either wire.
pub struct Input<'a> {
    pub wire: Wire,
    /// `None` when the request's path names no gateway: the token's own is used.
    pub gateway: Option<&'a str>,
    pub server: &'a str,
    pub credential: WireCredential<'a>,
    pub context: Context<'a>,
    /// The item a use method names, whole (feature provisioning decides on it).
    pub item: Option<&'a str>,
    /// On a gateway-level check: the servers to decide too (`/v1/check` only).
    pub each_server: Option<&'a EachServer>,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// Refused on its credential alone, before the store was asked (none, malformed,
    /// not for the data plane, or an access token that does not verify).
    Refused(DenyCode),
    /// Decided on the store's row.
    Decided(CheckResponse),
    /// No answer from the store in time, or no keys to verify an access token with.
    Unavailable,
}

/// Present, load, decide, pin (`/v1/check`), record; `deadline` bounds each wait on
/// the store (and the upstream's resolution). Counted in the metrics by outcome, with
/// the time since the request arrived.
pub async fn run(state: &AppState, input: Input<'_>, deadline: Duration) -> Outcome {
    let (wire, started) = (input.wire, input.context.started);
    let outcome = decide_request(state, input, deadline).await;
    count(wire, &outcome, started);
    outcome
}

/// Counts one decision in the metrics, with the time since its request arrived.
fn count(wire: Wire, outcome: &Outcome, started: std::time::Instant) {
    let (decision, code) = match outcome {
        Outcome::Refused(code) | Outcome::Decided(CheckResponse::Deny { code }) => {
            ("deny", code.as_str())
        }
        Outcome::Decided(CheckResponse::Allow { .. } | CheckResponse::Gateway { .. }) => {
            ("allow", "")
        }
        Outcome::Unavailable => ("unavailable", ""),
    };
    crate::metrics::get().check(wire.label(), decision, code, started.elapsed());
}

async fn decide_request(state: &AppState, input: Input<'_>, deadline: Duration) -> Outcome {
    let Input {
        wire,
        gateway,
        server,
        credential,
        context,
        item,
        each_server,
    } = input;
    // An empty server: the gateway URL itself (its aggregator checks each server).
    let scope = if server.is_empty() {
        decide::Scope::Gateway
    } else {
        decide::Scope::Server
    };
    let seen = Seen {
        wire,
        gateway,
        server: (scope == decide::Scope::Server).then_some(server),
        context,
    };
    let presented = match present::present(state, credential, gateway, server, deadline).await {
        Ok(presented) => presented,
        Err(Unpresentable::Refused(code)) => {
            record::record(state, &seen, None, Some(code));
            return Outcome::Refused(code);
        }
        Err(Unpresentable::NoKeys(e)) => {
            tracing::warn!(error = %e, gateway, server, request_id = context.request_id, "{}: no verification keys from the store; refusing", wire.name());
            return Outcome::Unavailable;
        }
    };
    let outcome = decide_presented(state, &presented, &seen, scope, item, deadline).await;
    let (Some(each), Outcome::Decided(CheckResponse::Gateway { servers, .. })) =
        (each_server, &outcome)
    else {
        return outcome;
    };
    // Each server asked for, decided as its own check would be, on the credential
    // presented once; all at once, so the slowest store read bounds the wait.
    let asked = match each {
        EachServer::All => servers.as_slice(),
        EachServer::Only(only) => only.as_slice(),
    };
    let presented = &presented;
    let decisions = futures_util::future::join_all(asked.iter().map(|one| {
        let seen = Seen {
            server: Some(one.as_str()),
            ..seen
        };
        async move {
            let outcome = decide_presented(
                state,
                presented,
                &seen,
                decide::Scope::Server,
                item,
                deadline,
            )
            .await;
            count(wire, &outcome, context.started);
            let answer = match outcome {
                Outcome::Decided(answer) => answer,
                Outcome::Refused(code) => CheckResponse::Deny { code },
                Outcome::Unavailable => CheckResponse::Deny {
                    code: DenyCode::PolicyUnavailable,
                },
            };
            (one.clone(), answer)
        }
    }))
    .await;
    Outcome::Decided(CheckResponse::Gateway {
        servers: servers.clone(),
        answers: decisions.into_iter().collect(),
    })
}

/// Load, decide, pin and record the request `seen` describes, on a credential
/// already presented.
async fn decide_presented(
    state: &AppState,
    presented: &Presented,
    seen: &Seen<'_>,
    scope: decide::Scope,
    item: Option<&str>,
    deadline: Duration,
) -> Outcome {
    let (wire, gateway, context) = (seen.wire, seen.gateway, seen.context);
    let server = seen.server.unwrap_or_default();

    let hex;
    let lookup = match &presented {
        Presented::ApiToken(hash) => {
            hex = hash.to_hex();
            Lookup::ApiToken(&hex)
        }
        Presented::Oauth { grant, .. } => Lookup::Grant(*grant),
    };
    let read_started = std::time::Instant::now();
    let read = state.check_reads.load(lookup, server, deadline).await;
    crate::metrics::get().store_read(read_started.elapsed());
    let row = match read {
        Ok(row) => row,
        Err(e) => {
            tracing::warn!(error = %e, gateway, server, request_id = context.request_id, "{}: no answer from the store; refusing", wire.name());
            return Outcome::Unavailable;
        }
    };

    let decide_row = |row: Option<&store::check::CheckRow>| match &presented {
        Presented::ApiToken(hash) => decide::decide(
            row,
            hash,
            gateway,
            store::now_ms(),
            scope,
            state.secrets.opener(),
        ),
        Presented::Oauth { connection, .. } => {
            decide::decide_oauth(row, *connection, gateway, scope, state.secrets.opener())
        }
    };
    let mut decision = decide_row(row.as_ref());

    // An allowed request whose OAuth identity is due for a refresh: refreshed (in the
    // background while its token still works), then decided again on the row as it is
    // now, so that a refused refresh refuses this very request.
    let mut row = row;
    if let (CheckResponse::Allow { .. }, Some(r)) = (&decision, &row) {
        match crate::oauth_identity::freshen(state, r).await {
            Ok(false) => {}
            Ok(true) => match state.check_reads.load(lookup, server, deadline).await {
                Ok(again) => {
                    row = again;
                    decision = decide_row(row.as_ref());
                }
                Err(e) => {
                    tracing::warn!(error = %e, gateway, server, request_id = context.request_id, "{}: no answer from the store after a refresh; refusing", wire.name());
                    return Outcome::Unavailable;
                }
            },
            Err(_) => {
                tracing::warn!(
                    gateway,
                    server,
                    request_id = context.request_id,
                    "{}: the OAuth identity's expired token could not be refreshed in time; refusing",
                    wire.name()
                );
                return Outcome::Unavailable;
            }
        }
        // Still expired after that (the refresh got no answer, or was lost): do not
        // send a dead token upstream.
        if let Some(r) = &row
            && crate::oauth_identity::due(r, store::now_ms()).is_some_and(|d| d.expired)
            && matches!(decision, CheckResponse::Allow { .. })
        {
            tracing::warn!(
                gateway,
                server,
                request_id = context.request_id,
                "{}: the OAuth identity's token has expired and was not refreshed; refusing",
                wire.name()
            );
            return Outcome::Unavailable;
        }
    }

    // The gateway URL: the servers it exposes, read as uncached as the row.
    let decision = match (decision, &row) {
        (CheckResponse::Gateway { .. }, Some(row)) => {
            let read = store::check::within(
                deadline,
                store::catalog::exposed_slugs(&state.db, row.gateway_id),
                store::check::ReadError::Store,
            )
            .await;
            match read {
                Ok(servers) => CheckResponse::Gateway {
                    servers,
                    answers: BTreeMap::new(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, gateway, request_id = context.request_id, "{}: no answer from the store on the gateway's servers; refusing", wire.name());
                    return Outcome::Unavailable;
                }
            }
        }
        (decision, _) => decision,
    };

    // Feature provisioning, on what the layers allowed: uncached, like every layer.
    let decision = match (decision, &row) {
        (
            CheckResponse::Allow {
                upstream, inject, ..
            },
            Some(row),
        ) => {
            let exposure = (row.gateway_id, row.server_id.unwrap_or_default());
            let modes = Modes::from_columns(
                row.tools_mode.as_deref(),
                row.prompts_mode.as_deref(),
                row.resources_mode.as_deref(),
            );
            match features::enforce(state, exposure, modes, context.mcp_method, item, deadline)
                .await
            {
                Ok(list_filter) => CheckResponse::Allow {
                    upstream,
                    inject,
                    list_filter,
                },
                Err(features::Refusal::Blocked(code)) => CheckResponse::Deny { code },
                Err(features::Refusal::Unavailable(e)) => {
                    tracing::warn!(error = %e, gateway, server, request_id = context.request_id, "{}: no answer from the store on feature provisioning; refusing", wire.name());
                    return Outcome::Unavailable;
                }
            }
        }
        (decision, _) => decision,
    };

    let decision = match decision {
        CheckResponse::Allow {
            mut upstream,
            inject,
            list_filter,
        } if wire.pins_upstream() => match pin::pin(state, &upstream.authority, deadline).await {
            Ok(address) => {
                upstream.address = Some(address.to_string());
                CheckResponse::Allow {
                    upstream,
                    inject,
                    list_filter,
                }
            }
            Err(code) => CheckResponse::Deny { code },
        },
        decision => decision,
    };

    let code = match (&decision, &row) {
        (CheckResponse::Deny { code }, _) => Some(*code),
        (CheckResponse::Allow { .. } | CheckResponse::Gateway { .. }, Some(row)) => {
            // An OAuth row's id is its grant's, not an API token's.
            let token = matches!(presented, Presented::ApiToken(_)).then_some(row.token_id);
            state.last_used.record(token, row.connection_id);
            None
        }
        (CheckResponse::Allow { .. } | CheckResponse::Gateway { .. }, None) => None,
    };
    record::record(state, seen, row.as_ref(), code);
    Outcome::Decided(decision)
}

/// Records a refusal made before there was an [`Input`] to run: ext_authz's request
/// for a path that is no MCP endpoint, which names no gateway or server.
pub fn refuse_unrouted(state: &AppState, wire: Wire, context: Context<'_>, code: DenyCode) {
    let seen = Seen {
        wire,
        gateway: None,
        server: None,
        context,
    };
    record::record(state, &seen, None, Some(code));
}
