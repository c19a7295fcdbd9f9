//! Prometheus metrics, served as `GET /metrics` on the check port (text format 0.0.4).
//!
//! Two kinds: counters and histograms the request paths bump as they go (checks, the
//! store read, OAuth events, admin actions, pool acquire timeouts), held in one
//! process-wide [`Metrics`] like a client library's default registry (one process, one
//! set of counts, so no handle has to be threaded through every constructor); and
//! values read when scraped from what already counts them (the database pool, the
//! audit writer's counters, the export's cursor), so nothing is counted twice.
//!
//! Every label value comes from a closed set written in this code (the wire, allow or
//! deny, a refusal code, an OAuth event, an admin action name): never a token, a user,
//! a name a client sent, or a request id.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `[(name, value)]` label sets of values fixed in this code.
type Labels<const N: usize> = [(&'static str, &'static str); N];
type Histograms<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The counters and histograms bumped on the request paths.
pub struct Metrics {
    registry: Registry,
    checks: Family<Labels<3>, Counter>,
    check_seconds: Histograms<1>,
    store_read_seconds: Histogram,
    oauth_events: Family<Labels<1>, Counter>,
    /// Keyed by the action's name: a fixed set in the code, but some are built with
    /// `format!` (`hosts.disable`), so owned.
    admin_actions: Family<[(&'static str, String); 1], Counter>,
    pool_acquire_timeouts: Counter,
}

/// 100 µs to about 1.6 s, doubling: a check is well under a millisecond on SQLite,
/// and the deadline (`--check-deadline-ms`, 200 by default) must show in the top buckets.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 15))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// What an OAuth endpoint did (`mcpguard_oauth_events_total{event}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OauthEvent {
    /// A client registered itself (RFC 7591).
    Registration,
    /// A user signed in on the authorization page.
    SignIn,
    /// A sign-in refused (wrong user or password, disabled user).
    SignInFailure,
    /// A sign-in refused for too many failures (throttled).
    SignInThrottled,
    /// An authorization code exchanged for tokens.
    CodeExchange,
    /// A refresh token exchanged (rotated) for new tokens.
    Refresh,
    /// A used code or rotated refresh token presented again: the grant is revoked.
    ReuseDetected,
}

impl OauthEvent {
    fn as_str(self) -> &'static str {
        match self {
            OauthEvent::Registration => "registration",
            OauthEvent::SignIn => "sign_in",
            OauthEvent::SignInFailure => "sign_in_failure",
            OauthEvent::SignInThrottled => "sign_in_throttled",
            OauthEvent::CodeExchange => "code_exchange",
            OauthEvent::Refresh => "refresh",
            OauthEvent::ReuseDetected => "reuse_detected",
        }
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mcpguard");
        let checks = Family::<Labels<3>, Counter>::default();
        registry.register(
            "checks",
            "Data-plane checks answered, by wire (check, ext_authz), decision (allow, deny, \
             unavailable) and refusal code",
            checks.clone(),
        );
        let check_seconds: Histograms<1> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "check_duration_seconds",
            "Time from a check's arrival to its answer, by wire",
            check_seconds.clone(),
        );
        let store_read_seconds = latency_buckets();
        registry.register(
            "check_store_read_duration_seconds",
            "The check's one read of the store (the row it decides on), answered or not",
            store_read_seconds.clone(),
        );
        let oauth_events = Family::<Labels<1>, Counter>::default();
        registry.register(
            "oauth_events",
            "OAuth authorization-server events, by event",
            oauth_events.clone(),
        );
        let admin_actions = Family::<[(&'static str, String); 1], Counter>::default();
        registry.register(
            "admin_actions",
            "Admin actions written to the audit log, by action (e.g. gateway.create)",
            admin_actions.clone(),
        );
        let pool_acquire_timeouts = Counter::default();
        registry.register(
            "db_pool_acquire_timeouts",
            "Requests that waited longer than --db-acquire-timeout-ms for a database connection",
            pool_acquire_timeouts.clone(),
        );
        Metrics {
            registry,
            checks,
            check_seconds,
            store_read_seconds,
            oauth_events,
            admin_actions,
            pool_acquire_timeouts,
        }
    }

    /// One check answered: `decision` is `allow`, `deny` or `unavailable`, `code` the
    /// refusal's (empty otherwise).
    pub fn check(
        &self,
        wire: &'static str,
        decision: &'static str,
        code: &'static str,
        took: Duration,
    ) {
        self.checks
            .get_or_create(&[("wire", wire), ("decision", decision), ("code", code)])
            .inc();
        self.check_seconds
            .get_or_create(&[("wire", wire)])
            .observe(took.as_secs_f64());
    }

    pub fn store_read(&self, took: Duration) {
        self.store_read_seconds.observe(took.as_secs_f64());
    }

    pub fn oauth(&self, event: OauthEvent) {
        self.oauth_events
            .get_or_create(&[("event", event.as_str())])
            .inc();
    }

    pub fn admin_action(&self, action: &str) {
        self.admin_actions
            .get_or_create(&[("action", action.to_owned())])
            .inc();
    }

    pub fn pool_acquire_timeout(&self) {
        self.pool_acquire_timeouts.inc();
    }
}

/// The values read when scraped, from where they are already kept.
#[derive(Debug, Default)]
pub struct Scraped {
    /// The pool's open connections, and how many of them are idle.
    pub pool_size: u32,
    pub pool_idle: u32,
    pub pool_max: u32,
    pub audit: crate::audit::Status,
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges: [(&str, &str, u64); 5] = [
            (
                "db_pool_connections_in_use",
                "Database pool connections lent out now",
                u64::from(self.pool_size.saturating_sub(self.pool_idle)),
            ),
            (
                "db_pool_connections_idle",
                "Database pool connections open and idle now",
                u64::from(self.pool_idle),
            ),
            (
                "db_pool_max_connections",
                "The pool's size limit (--db-max-connections)",
                u64::from(self.pool_max),
            ),
            (
                "audit_queue_depth",
                "Decision entries queued for the audit writer",
                self.audit.queue_depth,
            ),
            (
                "audit_export_lag_entries",
                "Audit entries written but not yet acknowledged by the OTLP collector \
                 (0 when the export is off)",
                self.audit.export.lag_entries,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let lag = ConstGauge::new(self.audit.export.lag_seconds);
        lag.encode(encoder.encode_descriptor(
            "audit_export_lag_seconds",
            "Age of the oldest audit entry not yet acknowledged by the OTLP collector",
            None,
            lag.metric_type(),
        )?)?;
        let counters: [(&str, &str, u64); 6] = [
            (
                "audit_entries_written",
                "Decision entries written to the audit log",
                self.audit.written,
            ),
            (
                "audit_entries_dropped",
                "Decision entries dropped because the audit writer was behind",
                self.audit.dropped,
            ),
            (
                "audit_entries_failed",
                "Decision entries lost to database errors",
                self.audit.failed,
            ),
            (
                "audit_entries_suppressed",
                "Anonymous refusals over the audit budget, counted in summary entries",
                self.audit.suppressed,
            ),
            (
                "audit_export_records",
                "Audit entries the OTLP collector acknowledged, sent by this replica",
                self.audit.export.exported,
            ),
            (
                "audit_export_failures",
                "OTLP export requests that failed (retried with backoff)",
                self.audit.export.failures,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The text of `GET /metrics`: the request-path metrics, then the scraped values.
pub fn encode(scraped: Scraped) -> Result<String, std::fmt::Error> {
    use prometheus_client::encoding::prometheus_text;
    let mut text = String::new();
    prometheus_text::encode(&mut text, &get().registry)?;
    let mut now = Registry::with_prefix("mcpguard");
    now.register_collector(Box::new(scraped));
    prometheus_text::encode(&mut text, &now)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels as printed).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn checks_and_scraped_values_show_in_the_text_format_with_fixed_labels() {
        let before = encode(Scraped::default()).unwrap();
        let series = r#"mcpguard_checks_total{wire="check",decision="deny",code="host_disabled"}"#;
        let was = sample(&before, series).unwrap_or(0.0);
        get().check("check", "deny", "host_disabled", Duration::from_micros(300));
        get().check("check", "deny", "host_disabled", Duration::from_micros(300));
        get().admin_action("gateway.create");
        let text = encode(Scraped {
            pool_size: 5,
            pool_idle: 2,
            pool_max: 8,
            audit: crate::audit::Status {
                written: 41,
                queue_depth: 3,
                ..crate::audit::Status::default()
            },
        })
        .unwrap();
        assert_eq!(sample(&text, series), Some(was + 2.0), "{text}");
        assert!(
            sample(
                &text,
                r#"mcpguard_check_duration_seconds_count{wire="check"}"#
            )
            .is_some_and(|n| n >= 2.0),
            "{text}"
        );
        assert!(text.contains("# TYPE mcpguard_check_duration_seconds histogram"));
        assert!(
            sample(
                &text,
                r#"mcpguard_admin_actions_total{action="gateway.create"}"#
            )
            .is_some_and(|n| n >= 1.0)
        );
        assert_eq!(
            sample(&text, "mcpguard_db_pool_connections_in_use"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "mcpguard_db_pool_connections_idle"),
            Some(2.0)
        );
        assert_eq!(sample(&text, "mcpguard_audit_queue_depth"), Some(3.0));
        assert_eq!(
            sample(&text, "mcpguard_audit_entries_written_total"),
            Some(41.0)
        );
        assert!(text.contains("# TYPE mcpguard_audit_entries_written_total counter"));
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }
}
