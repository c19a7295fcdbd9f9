//! The break-glass proof: concurrent MCP requests through Envoy while layers are
//! disabled and re-enabled, every request and toggle timed on one clock, then checked.
//! The check of a request happens somewhere between its start and its end, so each
//! request is judged by its whole lifetime:
//! - started after a disable returned and ended before the matching enable was called:
//!   must be refused, by that layer (an allow is a *stale allow*);
//! - started after an enable returned (or before any toggle) and ended before the next
//!   disable was called: must be allowed;
//! - lived across a toggle call: either answer is right; counted, not judged;
//! - anything but 200 or 403 (5xx, transport errors) is a failure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Admin, Stack};

/// One layer on the request path, and the code its refusal must carry.
#[derive(Debug, Clone)]
pub struct Layer {
    pub kind: &'static str,
    pub id: i64,
    pub code: &'static str,
}

/// What the proof runs against: an MCP URL, a token, and the five layers on its path.
pub struct Target {
    pub url: String,
    pub token: String,
    pub layers: Vec<Layer>,
}

/// Provisions the stack for the proof: gateway `eng` exposing its demo server per-user,
/// a host with one token, and an identity for the token's user, so the request path has
/// all five layers: host, connection, server, gateway, identity.
pub async fn five_layers(stack: &Stack) -> Target {
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let identity = admin.make_per_user(&p, "downstream-credential").await;
    let layer = |kind, id, code| Layer { kind, id, code };
    Target {
        url: stack.envoy.mcp_url("eng", "demo"),
        token: p.token.clone(),
        layers: vec![
            layer("hosts", p.host_id, "host_disabled"),
            layer("connections", p.connection_id, "connection_disabled"),
            layer("servers", p.server_id, "server_disabled"),
            layer("gateways", p.gateway_id, "gateway_disabled"),
            layer("identities", identity, "identity_disabled"),
        ],
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub clients: usize,
    pub cycles: usize,
    /// Requests that must start (and finish) inside each phase before moving on.
    pub requests_per_phase: usize,
    pub time_limit: Duration,
}

#[derive(Debug, Clone)]
struct Outcome {
    start: Instant,
    took: Duration,
    /// 0 for a transport error.
    status: u16,
    code: String,
}

#[derive(Debug)]
struct Window {
    layer: usize,
    disable_called: Instant,
    disable_returned: Instant,
    enable_called: Instant,
    enable_returned: Instant,
}

#[derive(Debug, Default)]
pub struct Report {
    /// Disable and enable calls made.
    pub toggles: usize,
    pub requests: usize,
    pub allowed: usize,
    pub refused: usize,
    /// Requests allowed although they started while their layer was disabled.
    pub stale_allows: Vec<String>,
    /// Requests refused with a code other than the disabled layer's.
    pub wrong_codes: Vec<String>,
    /// Requests refused although they lived wholly while every layer was enabled.
    pub not_restored: Vec<String>,
    /// Requests that lived across a toggle call (either answer is right).
    pub spanning: usize,
    /// Requests judged: wholly inside a disabled window, or wholly while enabled.
    pub judged_disabled: usize,
    pub judged_enabled: usize,
    /// Disabled windows in which no request was judged: nothing was proven there.
    pub unproven_windows: usize,
    /// 5xx, transport errors, anything but 200 and 403.
    pub other_failures: Vec<String>,
    pub allowed_ms: Percentiles,
    pub refused_ms: Percentiles,
    pub elapsed: Duration,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.stale_allows.is_empty()
            && self.wrong_codes.is_empty()
            && self.not_restored.is_empty()
            && self.other_failures.is_empty()
            && self.unproven_windows == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "toggles (disable + enable calls): {}", self.toggles)?;
        writeln!(
            f,
            "requests: {} ({} allowed, {} refused) in {:.1} s",
            self.requests,
            self.allowed,
            self.refused,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "judged: {} wholly inside a disabled window, {} wholly while enabled; {} lived across a toggle call (either answer is right)",
            self.judged_disabled, self.judged_enabled, self.spanning
        )?;
        writeln!(
            f,
            "disabled windows with no request judged (must be 0): {}",
            self.unproven_windows
        )?;
        writeln!(f, "stale allows (must be 0): {}", self.stale_allows.len())?;
        writeln!(f, "refused with the wrong code: {}", self.wrong_codes.len())?;
        writeln!(
            f,
            "refused after enable returned: {}",
            self.not_restored.len()
        )?;
        writeln!(
            f,
            "other failures (5xx, transport): {}",
            self.other_failures.len()
        )?;
        writeln!(
            f,
            "request latency through Envoy, allowed (check + upstream): {}",
            self.allowed_ms
        )?;
        write!(
            f,
            "request latency through Envoy, refused (check only):      {}",
            self.refused_ms
        )?;
        for (what, list) in [
            ("stale allow", &self.stale_allows),
            ("wrong code", &self.wrong_codes),
            ("not restored", &self.not_restored),
            ("other failure", &self.other_failures),
        ] {
            for line in list.iter().take(5) {
                write!(f, "\n  {what}: {line}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

/// Runs the proof against `target` (a stateless MCP server behind the gateway), toggling
/// each of its layers in turn, `plan.cycles` times.
pub async fn prove(target: &Target, admin: &Admin, plan: &Plan) -> Report {
    let (url, token, layers) = (
        target.url.as_str(),
        target.token.as_str(),
        target.layers.as_slice(),
    );
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let began = Instant::now();
    let deadline = began + plan.time_limit;

    let mut clients = Vec::new();
    for _ in 0..plan.clients {
        let (log, stop, url, token) = (log.clone(), stop.clone(), url.to_owned(), token.to_owned());
        clients.push(tokio::spawn(async move {
            let http = crate::http();
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "break-glass"}}})
            .to_string();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let start = Instant::now();
                let sent = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .timeout(Duration::from_secs(5))
                    .body(body.clone())
                    .send()
                    .await;
                let (status, code) = match sent {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let text = resp.text().await.unwrap_or_default();
                        let code = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        (status, code)
                    }
                    Err(e) => (0, e.to_string()),
                };
                log.lock().unwrap().push(Outcome {
                    start,
                    took: start.elapsed(),
                    status,
                    code,
                });
            }
        }));
    }

    // Waits until `n` requests that started after `since` have finished.
    let settled = |since: Instant, n: usize| {
        let log = log.clone();
        async move {
            loop {
                let done = log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|o| o.start > since)
                    .count();
                if done >= n || Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };

    settled(began, plan.requests_per_phase).await;
    let mut windows = Vec::new();
    'cycles: for _ in 0..plan.cycles {
        for (i, layer) in layers.iter().enumerate() {
            if Instant::now() >= deadline {
                break 'cycles;
            }
            let disable_called = Instant::now();
            admin.set_enabled(layer.kind, layer.id, false).await;
            let disable_returned = Instant::now();
            settled(disable_returned, plan.requests_per_phase).await;
            let enable_called = Instant::now();
            admin.set_enabled(layer.kind, layer.id, true).await;
            let enable_returned = Instant::now();
            settled(enable_returned, plan.requests_per_phase).await;
            windows.push(Window {
                layer: i,
                disable_called,
                disable_returned,
                enable_called,
                enable_returned,
            });
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let outcomes = std::mem::take(&mut *log.lock().unwrap());
    judge(outcomes, &windows, layers, began)
}

fn judge(outcomes: Vec<Outcome>, windows: &[Window], layers: &[Layer], began: Instant) -> Report {
    let mut r = Report {
        toggles: windows.len() * 2,
        requests: outcomes.len(),
        elapsed: began.elapsed(),
        ..Report::default()
    };
    let (mut allowed_ms, mut refused_ms) = (Vec::new(), Vec::new());
    // Every toggle call as (called, returned), in order.
    let calls: Vec<(Instant, Instant)> = windows
        .iter()
        .flat_map(|w| {
            [
                (w.disable_called, w.disable_returned),
                (w.enable_called, w.enable_returned),
            ]
        })
        .collect();
    let mut judged_per_window = vec![0usize; windows.len()];
    for o in &outcomes {
        let end = o.start + o.took;
        let at = format!(
            "t+{:.3}s..{:.3}s status {} {}",
            (o.start - began).as_secs_f64(),
            (end - began).as_secs_f64(),
            o.status,
            o.code
        );
        match o.status {
            200 => {
                r.allowed += 1;
                allowed_ms.push(o.took.as_secs_f64() * 1e3);
            }
            403 => {
                r.refused += 1;
                refused_ms.push(o.took.as_secs_f64() * 1e3);
            }
            _ => {
                r.other_failures.push(at);
                continue;
            }
        }
        if calls
            .iter()
            .any(|(called, returned)| o.start <= *returned && end >= *called)
        {
            r.spanning += 1;
            continue;
        }
        // Wholly inside a disabled window: must be refused by that layer.
        if let Some((i, w)) = windows
            .iter()
            .enumerate()
            .find(|(_, w)| o.start > w.disable_returned && end < w.enable_called)
        {
            judged_per_window[i] += 1;
            r.judged_disabled += 1;
            let layer = &layers[w.layer];
            if o.status == 200 {
                let after = (o.start - w.disable_returned).as_secs_f64() * 1e3;
                r.stale_allows.push(format!(
                    "{at}, started {after:.1} ms after disabling {} {} returned",
                    layer.kind, layer.id
                ));
            } else if o.code != layer.code {
                r.wrong_codes.push(format!("{at}, expected {}", layer.code));
            }
        } else if o.status == 200 {
            r.judged_enabled += 1;
        } else {
            r.judged_enabled += 1;
            // Touches no toggle call and no disabled window: every layer was enabled.
            let since = windows
                .iter()
                .filter(|w| w.enable_returned < o.start)
                .map(|w| {
                    format!(
                        ", started {:.1} ms after an enable returned",
                        (o.start - w.enable_returned).as_secs_f64() * 1e3
                    )
                })
                .next_back()
                .unwrap_or_default();
            r.not_restored.push(format!("{at}{since}"));
        }
    }
    r.unproven_windows = judged_per_window.iter().filter(|n| **n == 0).count();
    r.allowed_ms = Percentiles::of(allowed_ms);
    r.refused_ms = Percentiles::of(refused_ms);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn outcome(base: Instant, ms: u64, status: u16, code: &str) -> Outcome {
        Outcome {
            start: at(base, ms),
            took: Duration::from_millis(1),
            status,
            code: code.into(),
        }
    }

    /// One window: disable called at 10, returned at 20; enable called at 40, returned at 50.
    fn judged(outcomes: Vec<Outcome>, base: Instant) -> Report {
        let windows = [Window {
            layer: 0,
            disable_called: at(base, 10),
            disable_returned: at(base, 20),
            enable_called: at(base, 40),
            enable_returned: at(base, 50),
        }];
        let layers = [Layer {
            kind: "hosts",
            id: 1,
            code: "host_disabled",
        }];
        judge(outcomes, &windows, &layers, base)
    }

    #[test]
    fn a_clean_run_is_clean_and_requests_across_a_toggle_may_go_either_way() {
        let b = Instant::now();
        let r = judged(
            vec![
                outcome(b, 1, 200, ""),
                outcome(b, 9, 403, "host_disabled"), // across the disable call
                outcome(b, 15, 200, ""),             // during the disable call
                outcome(b, 25, 403, "host_disabled"), // wholly disabled
                outcome(b, 39, 200, ""),             // across the enable call
                outcome(b, 45, 403, "host_disabled"), // during the enable call
                outcome(b, 55, 200, ""),             // wholly enabled again
            ],
            b,
        );
        assert!(r.is_clean(), "{r}");
        assert_eq!((r.requests, r.allowed, r.refused, r.spanning), (7, 4, 3, 4));
        assert_eq!(
            (r.judged_disabled, r.judged_enabled, r.unproven_windows),
            (1, 2, 0)
        );
    }

    #[test]
    fn every_kind_of_violation_is_caught() {
        let b = Instant::now();
        let r = judged(
            vec![
                outcome(b, 25, 200, ""),                   // stale allow
                outcome(b, 30, 403, "gateway_disabled"),   // wrong layer named
                outcome(b, 55, 403, "host_disabled"),      // not restored after enable
                outcome(b, 2, 403, "host_disabled"),       // refused before any toggle
                outcome(b, 60, 503, "policy_unavailable"), // other failure
                outcome(b, 61, 0, "connection reset"),     // transport error
            ],
            b,
        );
        assert_eq!(r.stale_allows.len(), 1, "{r}");
        assert_eq!(r.wrong_codes.len(), 1, "{r}");
        assert_eq!(r.not_restored.len(), 2, "{r}");
        assert_eq!(r.other_failures.len(), 2, "{r}");
        assert!(!r.is_clean());
    }

    #[test]
    fn a_window_in_which_nothing_was_judged_is_not_clean() {
        let b = Instant::now();
        let r = judged(vec![outcome(b, 1, 200, ""), outcome(b, 55, 200, "")], b);
        assert_eq!(r.unproven_windows, 1);
        assert!(!r.is_clean(), "{r}");
    }
}
