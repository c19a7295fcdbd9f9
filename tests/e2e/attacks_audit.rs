//! Issue 19, item 11: audit amplification. Forged tokens with a valid format cost an
//! attacker nothing; each one reaches the policy service. Through real Envoy and the
//! real policy service: the audit budget bounds the rows such a flood writes while
//! every refusal is still counted, and the example rate limit
//! (`envoy/examples/ratelimit.yaml`) stops most of the flood in Envoy, per client
//! address, whatever `x-forwarded-for` the client claims.

use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use mcpguard_core::token::{ALPHABET, ENTROPY_CHARS, TokenKind, format_token};
use mcpguard_e2e::mcp::{Answer, initialize_body, initialize_with};
use mcpguard_e2e::raw::Rng;
use mcpguard_e2e::{Admin, Stack, workspace_root};
use serde_json::Value;

const FLOOD: usize = 300;
/// Requests in flight at once: one client, a few connections.
const IN_FLIGHT: usize = 8;

/// A token no one issued, with the right prefix, length and checksum: it passes the
/// filter's local checks and costs a check.
fn forged_token(rng: &mut Rng) -> String {
    let entropy: String = (0..ENTROPY_CHARS)
        .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len() as u64) as usize]))
        .collect();
    format_token(TokenKind::HostApi, &entropy).unwrap()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// What a flood did: the answers, and the clock seconds it spanned.
struct Flood {
    answers: Vec<Answer>,
    seconds: i64,
    elapsed: Duration,
}

impl Flood {
    fn count(&self, status: u16, code: &str) -> usize {
        self.answers
            .iter()
            .filter(|a| a.status == status && a.code() == code)
            .count()
    }
}

/// `FLOOD` initializes, each with a new forged token, from one client; the `i`th also
/// claims to come from `x-forwarded-for: 10.x.y.z` (a new address each time) when
/// `spoof` is set.
async fn flood(url: &str, spoof: bool) -> Flood {
    let client = reqwest::Client::new();
    let mut rng = Rng::new(Rng::seed_from_clock());
    let tokens: Vec<String> = (0..FLOOD).map(|_| forged_token(&mut rng)).collect();
    let (start_ms, started) = (now_ms(), Instant::now());
    let answers: Vec<Answer> = futures::stream::iter(tokens.into_iter().enumerate())
        .map(|(i, token)| {
            let mut req = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .timeout(Duration::from_secs(10))
                .body(initialize_body().to_string());
            if spoof {
                req = req.header("x-forwarded-for", format!("10.{}.{}.7", i / 250, i % 250));
            }
            async move {
                let resp = req.send().await.expect("gateway reachable");
                Answer {
                    status: resp.status().as_u16(),
                    headers: resp.headers().clone(),
                    body: resp.text().await.unwrap_or_default(),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    Flood {
        answers,
        seconds: now_ms() / 1000 - start_ms / 1000 + 1,
        elapsed: started.elapsed(),
    }
}

/// The `token_unknown` decisions in the audit log that name no connection: those
/// written one by one, and the summary entries (their `suppressed` counts).
struct Anonymous {
    one_by_one: Vec<Value>,
    summaries: Vec<Value>,
}

impl Anonymous {
    fn suppressed(&self) -> u64 {
        self.summaries
            .iter()
            .map(|e| e["suppressed"].as_u64().unwrap())
            .sum()
    }

    /// Every refusal the policy service made, written or counted.
    fn decided(&self) -> u64 {
        self.one_by_one.len() as u64 + self.suppressed()
    }
}

async fn anonymous_refusals(admin: &Admin) -> Anonymous {
    let (status, page) = admin
        .get("/api/v1/audit?kind=decision&decision=deny&limit=1000")
        .await;
    assert_eq!(status, 200, "{page}");
    let (summaries, one_by_one) = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == "token_unknown" && e["connection_id"].is_null())
        .cloned()
        .partition(|e| !e["suppressed"].is_null());
    Anonymous {
        one_by_one,
        summaries,
    }
}

/// Polls the audit log until `decided` refusals are accounted for (written, or counted
/// in a summary: a second's summary is written once that second is over).
async fn wait_for_anonymous(admin: &Admin, decided: u64) -> Anonymous {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = anonymous_refusals(admin).await;
        if seen.decided() >= decided || Instant::now() > deadline {
            assert_eq!(
                seen.decided(),
                decided,
                "written {} + counted {}: {:?}",
                seen.one_by_one.len(),
                seen.suppressed(),
                seen.summaries
            );
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The summary entries: one per clock second of the flood at most, each at a second's
/// start, in the shape an operator reads (a `deny` of that code with a count).
fn assert_summaries_shape(seen: &Anonymous, seconds: i64) {
    assert!(
        !seen.summaries.is_empty() && seen.summaries.len() as i64 <= seconds,
        "one summary per second of the flood: {:?}",
        seen.summaries
    );
    for s in &seen.summaries {
        assert_eq!(
            (s["kind"].as_str(), s["action"].as_str()),
            (Some("decision"), Some("deny"))
        );
        assert!(s["suppressed"].as_u64().is_some_and(|n| n > 0), "{s}");
        // A whole second: RFC 3339 with no fraction.
        assert!(
            s["at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && !t.contains('.')),
            "{s}"
        );
    }
}

async fn audit_status(admin: &Admin) -> Value {
    let (status, s) = admin.get("/api/v1/audit/status").await;
    assert_eq!(status, 200, "{s}");
    s
}

#[tokio::test]
async fn a_flood_of_forged_tokens_writes_the_budget_and_a_count_not_a_row_each() {
    const BUDGET: i64 = 5;
    let stack = Stack::start_with(
        false,
        &[(
            "MCPGUARD_AUDIT_ANONYMOUS_REFUSALS_PER_SEC",
            &BUDGET.to_string(),
        )],
        None,
    )
    .await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");

    let (flood, honest) = tokio::join!(flood(&url, false), async {
        // A real client at the same time: its decisions are never held back.
        let mut allowed = 0;
        for _ in 0..10 {
            allowed += usize::from(initialize_with(&url, Some(&p.token)).await.status == 200);
        }
        allowed
    });
    // The shipped config has no rate limit (`make bench` depends on it): every forged
    // token is checked and refused.
    assert_eq!(
        flood.count(401, "token_unknown"),
        FLOOD,
        "{:?}",
        flood.answers.first()
    );
    assert_eq!(honest, 10);

    let seen = wait_for_anonymous(&admin, FLOOD as u64).await;
    // At most the budget is written one by one per second; the rest is counted.
    assert!(
        seen.one_by_one.len() as i64 <= BUDGET * flood.seconds,
        "{} rows for {} forged tokens over {} s with a budget of {BUDGET}/s",
        seen.one_by_one.len(),
        FLOOD,
        flood.seconds
    );
    assert_summaries_shape(&seen, flood.seconds);
    let status = audit_status(&admin).await;
    assert_eq!(
        status["suppressed"].as_u64(),
        Some(seen.suppressed()),
        "{status}"
    );
    assert_eq!(status["anonymous_refusals_per_sec"], BUDGET);
    assert_eq!(status["dropped"], 0);
    // The real client's allows are all there.
    let (_, allows) = admin
        .get(&format!(
            "/api/v1/audit?kind=decision&decision=allow&host_id={}&limit=1000",
            p.host_id
        ))
        .await;
    assert_eq!(allows["entries"].as_array().unwrap().len(), 10, "{allows}");
}

/// The example's per-address bucket (max_tokens, tokens_per_fill per second).
fn example_bucket() -> (u64, u64) {
    let text =
        std::fs::read_to_string(workspace_root().join("envoy/examples/ratelimit.yaml")).unwrap();
    let cfg: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let hcm =
        &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let limiter = hcm["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.local_ratelimit")
        .expect("the example has a local rate limit");
    assert_eq!(
        hcm["http_filters"][0]["name"], "envoy.filters.http.local_ratelimit",
        "the rate limit comes before every other filter"
    );
    let bucket = &limiter["typed_config"]["descriptors"][0]["token_bucket"];
    assert_eq!(bucket["fill_interval"], "1s");
    (
        bucket["max_tokens"].as_u64().unwrap(),
        bucket["tokens_per_fill"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn the_example_rate_limit_refuses_most_of_a_flood_in_envoy_whatever_address_it_claims() {
    let (max_tokens, per_sec) = example_bucket();
    let stack = Stack::start_config("envoy/examples/ratelimit.yaml").await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    // An honest client is served as usual.
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);

    // Each request claims another address in x-forwarded-for: the bucket is the
    // connection's peer's all the same.
    let flood = flood(&url, true).await;
    let limited = flood.count(429, "rate_limited");
    let checked = flood.count(401, "token_unknown");
    assert_eq!(
        limited + checked,
        FLOOD,
        "every answer is a 429 or a 401 token_unknown: {:?}",
        flood
            .answers
            .iter()
            .map(|a| (a.status, a.body.as_str()))
            .collect::<Vec<_>>()
    );
    let most_checks = max_tokens + per_sec * (flood.elapsed.as_secs() + 1);
    assert!(
        checked as u64 <= most_checks && limited > checked,
        "{checked} checked, {limited} limited in {:?}; the bucket is {max_tokens} + {per_sec}/s",
        flood.elapsed
    );
    // Envoy counts what it refused: where an operator sees the rest of the flood.
    assert_eq!(
        stack
            .envoy
            .stat("mcpguard_per_client.http_local_rate_limit.rate_limited")
            .await,
        limited as u64
    );
    let refused = flood.answers.iter().find(|a| a.status == 429).unwrap();
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        refused.body
    );

    // The policy service decided exactly the requests that got past Envoy, and the
    // audit log holds at most its budget of them one by one (50/s by default), the
    // rest counted.
    let seen = wait_for_anonymous(&admin, checked as u64).await;
    assert!(seen.one_by_one.len() as i64 <= 50 * flood.seconds);

    // The limit ends: once the address's bucket refills, the honest client (the same
    // address) is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = initialize_with(&url, Some(&p.token)).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.code(), "rate_limited", "{}", answer.body);
        assert!(Instant::now() < deadline, "still limited after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
