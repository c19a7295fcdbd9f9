//! The aggregator's checks: the same `/v1/check` the filter calls, on the policy
//! service's check port with the check secret, for each server a request touches, on
//! that very request and uncached (a request that touches every server asks for all of
//! them in one exchange). Anything but a well-formed 200 is a refusal
//! (`policy_unavailable`): fail closed.

use std::collections::BTreeMap;
use std::time::Duration;

use mcpguard_core::check::{
    CHECK_PATH, CheckRequest, CheckResponse, Credential, DenyCode, EachServer, bounded_name,
};

/// The header the check port wants its secret in (policy-svc `check_auth::HEADER`).
pub const SECRET_HEADER: &str = "x-mcpguard-check-secret";

#[derive(Clone)]
pub struct Policy {
    http: reqwest::Client,
    url: String,
    /// None where the mesh authenticates the check port.
    secret: Option<String>,
    timeout: Duration,
}

/// A gateway-level answer with each server's ([`Policy::check_each`]).
pub struct Each {
    /// The servers the gateway exposes now, in slug order.
    pub servers: Vec<String>,
    /// The decision for each server asked for.
    pub answers: BTreeMap<String, CheckResponse>,
}

/// What one check is about.
pub struct Ask<'a> {
    pub caller: &'a Credential,
    pub gateway: &'a str,
    /// Empty: the gateway itself (its servers are the answer).
    pub server: &'a str,
    pub method: Option<&'a str>,
    /// The upstream's own name or URI the request uses.
    pub item: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl Policy {
    pub fn new(
        http: reqwest::Client,
        check_url: &str,
        secret: Option<String>,
        timeout: Duration,
    ) -> Self {
        Policy {
            http,
            url: format!("{}{CHECK_PATH}", check_url.trim_end_matches('/')),
            secret,
            timeout,
        }
    }

    /// The answer, or the refusal that stands for no answer.
    pub async fn check(&self, ask: Ask<'_>) -> CheckResponse {
        self.send(&ask, None).await
    }

    /// A gateway-level check (`ask.server` empty) that also decides `each` of the
    /// gateway's servers, in one exchange: the servers the gateway exposes and each
    /// answer, or the refusal of the caller.
    pub async fn check_each(&self, ask: Ask<'_>, each: EachServer) -> Result<Each, DenyCode> {
        match self.send(&ask, Some(each)).await {
            CheckResponse::Gateway { servers, answers } => Ok(Each { servers, answers }),
            CheckResponse::Deny { code } => Err(code),
            CheckResponse::Allow { .. } => Err(DenyCode::PolicyUnavailable),
        }
    }

    async fn send(&self, ask: &Ask<'_>, each_server: Option<EachServer>) -> CheckResponse {
        let req = CheckRequest {
            credential: ask.caller.clone(),
            gateway: Some(ask.gateway.to_owned()),
            server: ask.server.to_owned(),
            mcp_method: ask.method.map(|m| bounded_name(m).to_owned()),
            tool: ask.item.map(|i| bounded_name(i).to_owned()),
            request_id: ask.request_id.map(str::to_owned),
            item: ask.item.map(str::to_owned),
            each_server,
        };
        let unavailable = CheckResponse::Deny {
            code: DenyCode::PolicyUnavailable,
        };
        let Ok(body) = serde_json::to_vec(&req) else {
            return unavailable;
        };
        let mut req = self.http.post(&self.url);
        if let Some(secret) = &self.secret {
            req = req.header(SECRET_HEADER, secret);
        }
        let sent = req
            .header("content-type", "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    server = ask.server,
                    "policy check answered non-200; refusing"
                );
                return unavailable;
            }
            Err(e) => {
                tracing::warn!(error = %e, server = ask.server, "policy check unreachable; refusing");
                return unavailable;
            }
        };
        match resp.bytes().await.map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(answer)) => answer,
            _ => unavailable,
        }
    }
}
