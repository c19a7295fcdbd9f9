//! The audit log's export to an OpenTelemetry collector: every entry, as an OTLP log
//! record over OTLP/HTTP (`POST {endpoint}`, protobuf or JSON), in id order, at least
//! once. It reads what the audit writer already committed, so a check never waits on
//! it, and nothing it does can drop an entry:
//!
//! - **A durable cursor**: the highest id the collector acknowledged (a 2xx) is kept in
//!   the database (`audit_export`) and moved only after the acknowledgement. After a
//!   restart or an outage the export resumes after it; a batch sent but not yet
//!   acknowledged is sent again (records carry the entry id, `log.record.uid`, so a
//!   receiver can drop duplicates).
//! - **One exporter at a time**: every replica tries to take or renew a lease on the
//!   same row before each batch; only the holder sends and moves the cursor, and the
//!   cursor moves only while the mover still holds the lease. A replica that dies
//!   hands over when its lease runs out ([`LEASE`]).
//! - **Retry with backoff**: a failed request is retried from the same cursor, the
//!   wait doubling from [`ExportConfig::interval`] to [`ExportConfig::max_backoff`].
//! - **No entry skipped by a late commit**: on PostgreSQL, ids come from a sequence
//!   and two transactions can commit out of id order, so the export stops at a missing
//!   id and waits up to [`GAP_SETTLE`] for it to appear before passing it (an id can
//!   also be missing for good: a rolled-back insert, or retention).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Serialize;

use crate::store::{self, Db, audit::Event, audit_export as db};

/// How long a replica's lease lasts after its last renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How long a missing id is waited for before the export passes it. Longer than any
/// transaction that writes audit entries takes between taking its ids and committing
/// (each statement is bounded by `--db-statement-timeout-ms`, 5 s by default).
pub const GAP_SETTLE: Duration = Duration::from_secs(10);
/// How long one request to the collector may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `application/x-protobuf` (the OTLP/HTTP default).
    Protobuf,
    /// `application/json` (OTLP/JSON).
    Json,
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The collector's logs URL, e.g. `http://127.0.0.1:4318/v1/logs`.
    pub endpoint: String,
    pub encoding: Encoding,
    /// Most records per request.
    pub batch: usize,
    /// How often the export looks for new entries; the first retry's wait.
    pub interval: Duration,
    /// The longest wait between retries.
    pub max_backoff: Duration,
    /// How an https collector is trusted.
    pub outbound: crate::outbound::Outbound,
}

/// Where the export stands, shared with `/api/v1/audit/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Progress {
    enabled: AtomicBool,
    leader: AtomicBool,
    cursor: AtomicI64,
    lag_entries: AtomicU64,
    lag_seconds: AtomicI64,
    exported: AtomicU64,
    failures: AtomicU64,
    endpoint: Mutex<Option<(String, Encoding)>>,
    last_error: Mutex<Option<String>>,
}

/// The export's state as `/api/v1/audit/status` shows it (`export`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    /// Whether `--audit-otlp-endpoint` is set.
    pub enabled: bool,
    pub endpoint: Option<String>,
    pub encoding: Option<Encoding>,
    /// Whether this replica holds the lease (is the one exporting).
    pub leader: bool,
    /// The highest entry id the collector acknowledged.
    pub cursor: i64,
    /// Entries written after the cursor (ids, so an id that never committed counts).
    pub lag_entries: u64,
    /// Age of the oldest entry after the cursor, in seconds; 0 when none.
    pub lag_seconds: i64,
    /// Records acknowledged, sent by this replica since it started.
    pub exported: u64,
    /// Requests that failed, on this replica since it started.
    pub failures: u64,
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Progress {
    pub fn status(&self) -> Status {
        let endpoint = lock(&self.endpoint).clone();
        Status {
            enabled: self.enabled.load(Ordering::Relaxed),
            endpoint: endpoint.as_ref().map(|(url, _)| url.clone()),
            encoding: endpoint.map(|(_, encoding)| encoding),
            leader: self.leader.load(Ordering::Relaxed),
            cursor: self.cursor.load(Ordering::Relaxed),
            lag_entries: self.lag_entries.load(Ordering::Relaxed),
            lag_seconds: self.lag_seconds.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }

    fn failed(&self, error: String) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(failures = n, %error, "audit export: the collector did not take the batch; retrying with backoff");
        }
        *lock(&self.last_error) = Some(error);
    }
}

/// Runs the export until the process ends.
pub async fn run(db: Db, config: ExportConfig, progress: Arc<Progress>) {
    progress.enabled.store(true, Ordering::Relaxed);
    *lock(&progress.endpoint) = Some((config.endpoint.clone(), config.encoding));
    let holder = holder_id();
    let client = match config.outbound.builder().timeout(REQUEST_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "audit export: no HTTP client; not exporting");
            return;
        }
    };
    tracing::info!(endpoint = %config.endpoint, encoding = ?config.encoding, "audit export to an OTLP collector");
    let mut gaps = Gaps::default();
    let mut failed_in_a_row = 0u32;
    let mut next_send = Instant::now();
    loop {
        tokio::time::sleep(config.interval).await;
        // Every tick renews the lease and the lag; a batch goes only once the backoff
        // after a failure has run out.
        loop {
            let send = Instant::now() >= next_send;
            match round(&db, &config, &client, &holder, &progress, &mut gaps, send).await {
                // A full batch went out: more may be waiting, so go on without the tick.
                Round::Sent => failed_in_a_row = 0,
                Round::Idle => {
                    if send {
                        failed_in_a_row = 0;
                    }
                    break;
                }
                Round::Failed => {
                    failed_in_a_row = failed_in_a_row.saturating_add(1);
                    next_send = Instant::now() + backoff(&config, failed_in_a_row);
                    break;
                }
            }
        }
    }
}

/// The wait before the next try after `failures` failures in a row: the interval,
/// doubled per failure, at most `max_backoff`.
fn backoff(config: &ExportConfig, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(16));
    config
        .interval
        .saturating_mul(factor)
        .min(config.max_backoff)
}

enum Round {
    /// A full batch was acknowledged.
    Sent,
    /// Nothing (more) to send now, not the leader, or waiting out a backoff.
    Idle,
    Failed,
}

/// Renews the lease, updates the lag, and sends one batch if this replica leads and
/// `send` (no backoff running).
async fn round(
    db: &Db,
    config: &ExportConfig,
    client: &reqwest::Client,
    holder: &str,
    progress: &Progress,
    gaps: &mut Gaps,
    send: bool,
) -> Round {
    let now = store::now_ms();
    let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let leader = match db::take_lease(db, holder, now, now.saturating_add(lease_ms)).await {
        Ok(leader) => leader,
        Err(e) => {
            tracing::warn!(error = %e, "audit export: could not renew the lease");
            false
        }
    };
    if leader != progress.leader.swap(leader, Ordering::Relaxed) {
        tracing::info!(
            leader,
            "audit export: lease {}",
            if leader {
                "taken"
            } else {
                "held by another replica"
            }
        );
    }
    let (cursor, last) = match tokio::try_join!(db::cursor(db), db::last_id(db)) {
        Ok(read) => read,
        Err(e) => {
            progress.failed(format!("reading the cursor: {e}"));
            return Round::Failed;
        }
    };
    progress.cursor.store(cursor, Ordering::Relaxed);
    progress
        .lag_entries
        .store(u64::try_from(last - cursor).unwrap_or(0), Ordering::Relaxed);
    let limit = i64::try_from(config.batch).unwrap_or(512);
    let rows = match db::ascending(db, cursor, None, None, limit).await {
        Ok(rows) => rows,
        Err(e) => {
            progress.failed(format!("reading entries: {e}"));
            return Round::Failed;
        }
    };
    let lag = rows.first().map_or(0, |e| (now - e.at).max(0) / 1000);
    progress.lag_seconds.store(lag, Ordering::Relaxed);
    if !leader || !send {
        return Round::Idle;
    }
    let ids: Vec<i64> = rows.iter().map(|e| e.id).collect();
    let ready = gaps.sendable(cursor, &ids, Instant::now());
    let Some(last_sent) = ready.checked_sub(1).map(|i| ids[i]) else {
        return Round::Idle;
    };
    let request = records(&rows[..ready], &holder_resource(holder));
    let (body, content_type) = match config.encoding {
        Encoding::Protobuf => (
            prost::Message::encode_to_vec(&request),
            "application/x-protobuf",
        ),
        Encoding::Json => match serde_json::to_vec(&request) {
            Ok(body) => (body, "application/json"),
            Err(e) => {
                progress.failed(format!("encoding JSON: {e}"));
                return Round::Failed;
            }
        },
    };
    let sent = client
        .post(&config.endpoint)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => {}
        Ok(resp) => {
            progress.failed(format!("the collector answered {}", resp.status()));
            return Round::Failed;
        }
        Err(e) => {
            progress.failed(format!("sending: {e}"));
            return Round::Failed;
        }
    }
    progress.exported.fetch_add(ready as u64, Ordering::Relaxed);
    match db::advance(db, holder, last_sent).await {
        Ok(true) => {
            progress.cursor.store(last_sent, Ordering::Relaxed);
            *lock(&progress.last_error) = None;
        }
        // The lease went elsewhere meanwhile: the new holder sends these again.
        Ok(false) => return Round::Idle,
        Err(e) => {
            progress.failed(format!("moving the cursor: {e}"));
            return Round::Failed;
        }
    }
    if rows.len() == config.batch && ready == rows.len() {
        Round::Sent
    } else {
        Round::Idle
    }
}

/// A random id for this process's lease.
fn holder_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Unique enough among replicas: the pid and the start time.
        return format!("{}-{}", std::process::id(), store::now_ms());
    }
    hex::encode(bytes)
}

/// Which of the ids read after the cursor may be sent now: up to the first missing
/// id, unless that id has been missing for [`GAP_SETTLE`].
#[derive(Debug, Default)]
struct Gaps {
    /// The missing id waited for, and since when.
    waiting: Option<(i64, Instant)>,
}

impl Gaps {
    /// How many of `ids` (ascending, all above `cursor`) to send.
    fn sendable(&mut self, cursor: i64, ids: &[i64], now: Instant) -> usize {
        let mut expected = cursor + 1;
        for (i, &id) in ids.iter().enumerate() {
            if id != expected {
                match self.waiting {
                    Some((missing, since))
                        if missing == expected && now.duration_since(since) >= GAP_SETTLE =>
                    {
                        tracing::info!(
                            from = expected,
                            to = id - 1,
                            "audit export: ids missing for good (rolled back or trimmed); passing them"
                        );
                        self.waiting = None;
                    }
                    Some((missing, _)) if missing == expected => return i,
                    _ => {
                        self.waiting = Some((expected, now));
                        return i;
                    }
                }
            }
            expected = id + 1;
        }
        ids.len()
    }
}

fn holder_resource(holder: &str) -> Resource {
    Resource {
        attributes: vec![
            string("service.name", "mcpguard-policy"),
            string("service.version", env!("CARGO_PKG_VERSION")),
            string("service.instance.id", holder),
        ],
        ..Resource::default()
    }
}

/// The OTLP request for `events`: one resource (this service), one scope, a record
/// per entry.
pub fn records(events: &[Event], resource: &Resource) -> ExportLogsServiceRequest {
    let observed = u64::try_from(store::now_ms()).unwrap_or(0) * 1_000_000;
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "mcpguard.audit".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                log_records: events.iter().map(|e| record(e, observed)).collect(),
                ..ScopeLogs::default()
            }],
            ..ResourceLogs::default()
        }],
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// One entry as a log record; the attributes are listed in docs/observability.md.
fn record(e: &Event, observed_ns: u64) -> LogRecord {
    let decision = e.kind == "decision";
    let deny = decision && e.action == "deny";
    let (severity, severity_text) = if deny {
        (SeverityNumber::Warn, "WARN")
    } else {
        (SeverityNumber::Info, "INFO")
    };
    let mut attributes = vec![
        // Semantic conventions: a record's unique id, for de-duplication.
        string("log.record.uid", &e.id.to_string()),
        int("mcpguard.audit.id", e.id),
        string("mcpguard.audit.kind", &e.kind),
        string("mcpguard.audit.action", &e.action),
    ];
    let mut opt_str = |key: &str, v: &Option<String>| {
        if let Some(v) = v {
            attributes.push(string(key, v));
        }
    };
    // `error.type`: the refusal code, the class of the error (semantic conventions).
    opt_str("error.type", &e.code);
    opt_str("mcpguard.gateway", &e.gateway);
    opt_str("mcpguard.server", &e.server);
    // The MCP semantic conventions' method and tool names.
    opt_str("mcp.method.name", &e.mcp_method);
    opt_str("gen_ai.tool.name", &e.tool);
    opt_str("mcpguard.request_id", &e.request_id);
    opt_str("mcpguard.target", &e.target);
    opt_str("mcpguard.before", &e.before_state);
    opt_str("mcpguard.after", &e.after_state);
    // `user.id`: whoever acted, the caller of a decision or the admin of an action.
    let ids = [
        ("user.id", e.user_id.or(e.actor_user_id)),
        ("mcpguard.host.id", e.host_id),
        ("mcpguard.connection.id", e.connection_id),
        ("mcpguard.latency_us", e.latency_us),
        ("mcpguard.suppressed", e.suppressed),
    ];
    attributes.extend(ids.into_iter().filter_map(|(k, v)| Some(int(k, v?))));
    let body = match (&e.code, &e.gateway, &e.server) {
        (Some(code), _, _) => format!("{} {} {code}", e.kind, e.action),
        (None, Some(g), Some(s)) => format!("{} {} {g}/{s}", e.kind, e.action),
        _ => format!("{} {}", e.kind, e.action),
    };
    LogRecord {
        time_unix_nano: u64::try_from(e.at).unwrap_or(0) * 1_000_000,
        observed_time_unix_nano: observed_ns,
        severity_number: severity as i32,
        severity_text: severity_text.into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(body)),
        }),
        attributes,
        event_name: format!(
            "mcpguard.audit.{}",
            if decision { "decision" } else { "admin" }
        ),
        ..LogRecord::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_id_holds_the_batch_until_it_appears_or_has_settled() {
        let t0 = Instant::now();
        let mut gaps = Gaps::default();
        assert_eq!(gaps.sendable(0, &[1, 2, 3], t0), 3);
        // 5 is committed before 4: only 4's predecessors go.
        assert_eq!(gaps.sendable(3, &[5, 6], t0), 0);
        assert_eq!(gaps.sendable(3, &[5, 6], t0 + Duration::from_secs(1)), 0);
        // 4 appears: all go.
        assert_eq!(gaps.sendable(3, &[4, 5, 6], t0 + Duration::from_secs(2)), 3);
        // 8 never appears (rolled back): passed once it has been missing long enough.
        assert_eq!(gaps.sendable(6, &[7, 9], t0), 1);
        assert_eq!(gaps.sendable(7, &[9], t0 + Duration::from_secs(1)), 0);
        assert_eq!(gaps.sendable(7, &[9, 10], t0 + GAP_SETTLE), 2);
        assert_eq!(gaps.sendable(10, &[], t0 + GAP_SETTLE), 0);
    }

    #[test]
    fn an_entry_maps_to_a_record_with_its_id_time_severity_and_attributes() {
        let e = Event {
            id: 42,
            at: 1_700_000_000_123,
            kind: "decision".into(),
            action: "deny".into(),
            code: Some("host_disabled".into()),
            host_id: Some(3),
            user_id: Some(7),
            gateway: Some("eng".into()),
            server: Some("demo".into()),
            mcp_method: Some("tools/call".into()),
            tool: Some("echo".into()),
            ..Event::default()
        };
        let req = records(&[e], &holder_resource("h"));
        let encoded = prost::Message::encode_to_vec(&req);
        let decoded: ExportLogsServiceRequest = prost::Message::decode(&encoded[..]).unwrap();
        let r = &decoded.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(r.time_unix_nano, 1_700_000_000_123_000_000);
        assert_eq!(r.severity_number, SeverityNumber::Warn as i32);
        assert_eq!(r.event_name, "mcpguard.audit.decision");
        let attr = |k: &str| {
            r.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone()?.value)
        };
        assert_eq!(attr("mcpguard.audit.id"), Some(Value::IntValue(42)));
        assert_eq!(
            attr("log.record.uid"),
            Some(Value::StringValue("42".into()))
        );
        assert_eq!(
            attr("error.type"),
            Some(Value::StringValue("host_disabled".into()))
        );
        assert_eq!(attr("user.id"), Some(Value::IntValue(7)));
        assert_eq!(
            attr("gen_ai.tool.name"),
            Some(Value::StringValue("echo".into()))
        );
        assert_eq!(attr("mcpguard.connection.id"), None);
        // OTLP/JSON: camelCase fields, the same record.
        let json = serde_json::to_value(&decoded).unwrap();
        let rec = &json["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(rec["eventName"], "mcpguard.audit.decision", "{json}");
    }
}
