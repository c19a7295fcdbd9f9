//! The break-glass proof: concurrent MCP requests through Envoy while layers are
//! disabled and re-enabled, every request and toggle timed on one clock, then checked:
//! no request that started after a disable returned (and before the matching enable
//! was called) was allowed; every request that started after an enable returned (and
//! before the next disable was called) was allowed; nothing failed for any other reason.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::Admin;

/// One layer on the request path, and the code its refusal must carry.
#[derive(Debug, Clone)]
pub struct Layer {
    pub kind: &'static str,
    pub id: i64,
    pub code: &'static str,
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
    /// Requests refused although they started while every layer was enabled.
    pub not_restored: Vec<String>,
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

/// Runs the proof against `url` (a stateless MCP server behind the gateway) with
/// `token`, toggling each of `layers` in turn, `plan.cycles` times.
pub async fn prove(url: &str, token: &str, admin: &Admin, layers: &[Layer], plan: &Plan) -> Report {
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let began = Instant::now();
    let deadline = began + plan.time_limit;

    let mut clients = Vec::new();
    for _ in 0..plan.clients {
        let (log, stop, url, token) = (log.clone(), stop.clone(), url.to_owned(), token.to_owned());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
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
    for o in &outcomes {
        let at = format!(
            "t+{:.3}s status {} {}",
            (o.start - began).as_secs_f64(),
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
        // Inside a disabled window: must be refused by that layer.
        if let Some(w) = windows
            .iter()
            .find(|w| o.start > w.disable_returned && o.start < w.enable_called)
        {
            let layer = &layers[w.layer];
            if o.status == 200 {
                r.stale_allows.push(format!(
                    "{at} while {} {} was disabled",
                    layer.kind, layer.id
                ));
            } else if o.code != layer.code {
                r.wrong_codes.push(format!("{at}, expected {}", layer.code));
            }
            continue;
        }
        // Wholly enabled: before the first disable call, or after an enable returned
        // and before the next disable call.
        let enabled = match windows.iter().position(|w| o.start < w.disable_called) {
            Some(0) => true,
            Some(next) => o.start > windows[next - 1].enable_returned,
            None => windows.last().is_none_or(|w| o.start > w.enable_returned),
        };
        if enabled && o.status != 200 {
            r.not_restored.push(at);
        }
    }
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

    /// One window: disable called at 10, returned at 20; enable called at 30, returned at 40.
    fn judged(outcomes: Vec<Outcome>, base: Instant) -> Report {
        let windows = [Window {
            layer: 0,
            disable_called: at(base, 10),
            disable_returned: at(base, 20),
            enable_called: at(base, 30),
            enable_returned: at(base, 40),
        }];
        let layers = [Layer {
            kind: "hosts",
            id: 1,
            code: "host_disabled",
        }];
        judge(outcomes, &windows, &layers, base)
    }

    #[test]
    fn a_clean_run_is_clean_and_requests_spanning_a_toggle_may_go_either_way() {
        let b = Instant::now();
        let r = judged(
            vec![
                outcome(b, 1, 200, ""),
                outcome(b, 15, 200, ""), // started before disable returned
                outcome(b, 15, 403, "host_disabled"), // likewise
                outcome(b, 25, 403, "host_disabled"),
                outcome(b, 35, 200, ""), // enable called, not yet returned
                outcome(b, 45, 200, ""),
            ],
            b,
        );
        assert!(r.is_clean(), "{r}");
        assert_eq!((r.requests, r.allowed, r.refused), (6, 4, 2));
    }

    #[test]
    fn every_kind_of_violation_is_caught() {
        let b = Instant::now();
        let r = judged(
            vec![
                outcome(b, 25, 200, ""),                   // stale allow
                outcome(b, 26, 403, "gateway_disabled"),   // wrong layer named
                outcome(b, 45, 403, "host_disabled"),      // not restored after enable
                outcome(b, 5, 403, "host_disabled"),       // refused before any disable
                outcome(b, 50, 503, "policy_unavailable"), // other failure
                outcome(b, 51, 0, "connection reset"),     // transport error
            ],
            b,
        );
        assert_eq!(r.stale_allows.len(), 1, "{r}");
        assert_eq!(r.wrong_codes.len(), 1, "{r}");
        assert_eq!(r.not_restored.len(), 2, "{r}");
        assert_eq!(r.other_failures.len(), 2, "{r}");
        assert!(!r.is_clean());
    }
}
