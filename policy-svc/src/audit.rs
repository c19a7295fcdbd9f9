//! The audit trail. Admin actions are written before the call returns (they are rare
//! and must not be lost); data-plane decisions go through a bounded queue to a writer
//! that inserts them in batches, so the check path never waits on an audit write.
//! Under overload, decisions are still enforced and the dropped entries are counted.
//!
//! Refusals that anyone can cause without a credential (`token_unknown`,
//! `token_malformed`: a forged token costs an attacker nothing) are written one by one
//! only up to a budget per second ([`Budget`]); beyond it they are counted, and each
//! second's count is written as one summary row per code. A flood of forged tokens so
//! costs at most the budget's rows plus two a second, and still shows in the log: when,
//! which code, how many. Decisions that name a connection are never suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcpguard_core::check::DenyCode;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audit_export;
use crate::queue::{self, Senders};
use crate::store::{self, Db, StoreError, audit::Event};

const QUEUE: usize = 65_536;
/// Most entries per transaction, which holds SQLite's write lock.
const BATCH: usize = 512;
/// How often the writer takes the queued entries and writes them: the most an entry
/// waits, and at 30,000 decisions/s a tenth of the queue.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// `--audit-anonymous-refusals-per-sec` when not given.
pub const DEFAULT_ANONYMOUS_REFUSALS_PER_SEC: u32 = 50;

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    suppressed: AtomicU64,
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    budget: Arc<Mutex<Budget>>,
    db: Db,
    /// The OTLP export's progress (idle unless [`Audit::export_to`] started it).
    export: Arc<audit_export::Progress>,
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    /// Decision entries written.
    pub written: u64,
    /// Decision entries dropped because the writer was behind (never silent: also logged).
    pub dropped: u64,
    /// Decision entries lost to database errors.
    pub failed: u64,
    /// Anonymous refusals (`token_unknown`, `token_malformed`) over the budget: not
    /// written one by one, but counted in the summary rows (`suppressed` on an entry).
    pub suppressed: u64,
    /// The budget: anonymous refusals written one by one per second, on this replica.
    pub anonymous_refusals_per_sec: u32,
    pub retention_days: u32,
    /// Decision entries queued for the writer now.
    pub queue_depth: u64,
    /// The OTLP export (`--audit-otlp-endpoint`): cursor, lag, lease.
    pub export: audit_export::Status,
}

impl Audit {
    /// Starts the writer and the retention task. The writer drains and ends once every
    /// `Audit` handle is dropped.
    pub fn spawn(db: Db, retention_days: u32) -> (Self, JoinHandle<()>) {
        Self::spawn_with_budget(db, retention_days, DEFAULT_ANONYMOUS_REFUSALS_PER_SEC)
    }

    /// Like [`Audit::spawn`], writing at most `anonymous_refusals_per_sec` anonymous
    /// refusals one by one per second.
    pub fn spawn_with_budget(
        db: Db,
        retention_days: u32,
        anonymous_refusals_per_sec: u32,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let budget = Arc::new(Mutex::new(Budget::new(anonymous_refusals_per_sec)));
        let writer = tokio::spawn(write_loop(db.clone(), rx, counters.clone(), budget.clone()));
        if retention_days > 0 {
            tokio::spawn(retention_loop(db.clone(), retention_days));
        }
        (
            Audit {
                tx,
                counters,
                budget,
                db,
                export: Arc::default(),
            },
            writer,
        )
    }

    /// Queues a data-plane decision; never waits. An anonymous refusal over the budget
    /// is counted instead (see [`Budget`]).
    pub fn decision(&self, event: Event) {
        if let Some(code) = Anonymous::of(&event) {
            let admitted = lock(&self.budget).admit(event.at, code);
            if !admitted {
                let n = self.counters.suppressed.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        suppressed = n,
                        "anonymous refusals over the audit budget: counted in summary entries"
                    );
                }
                return;
            }
        }
        if self.tx.try_send(event).is_err() {
            let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "audit writer behind: decision entries dropped");
            }
        }
    }

    /// Writes an admin action now: who, what, and the state before and after.
    pub async fn admin(
        &self,
        actor: i64,
        action: &str,
        target: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> Result<(), StoreError> {
        let event = Event {
            at: store::now_ms(),
            kind: "admin".into(),
            action: action.into(),
            actor_user_id: Some(actor),
            target: Some(target),
            before_state: before.map(|v| v.to_string()),
            after_state: after.map(|v| v.to_string()),
            ..Event::default()
        };
        store::audit::append(&self.db, &[event]).await?;
        crate::metrics::get().admin_action(action);
        Ok(())
    }

    /// Starts the OTLP export of the audit log (runs until the process ends).
    pub fn export_to(&self, config: audit_export::ExportConfig) -> JoinHandle<()> {
        tokio::spawn(audit_export::run(
            self.db.clone(),
            config,
            self.export.clone(),
        ))
    }

    pub fn status(&self, retention_days: u32) -> Status {
        Status {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            suppressed: self.counters.suppressed.load(Ordering::Relaxed),
            anonymous_refusals_per_sec: lock(&self.budget).per_sec,
            retention_days,
            queue_depth: (self.tx.max_capacity() - self.tx.capacity()) as u64,
            export: self.export.status(),
        }
    }
}

/// The budget is a few integers: a panic elsewhere while it was held leaves it usable.
fn lock(budget: &Mutex<Budget>) -> std::sync::MutexGuard<'_, Budget> {
    budget.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn write_loop(
    db: Db,
    mut rx: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
    budget: Arc<Mutex<Budget>>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        let senders = queue::drain(&mut rx, |e| batch.push(e));
        // The summaries of the seconds that are over; on the last round, every one.
        // They go straight into the batch, so a full queue cannot drop them.
        let now = match senders {
            Senders::Open => store::now_ms(),
            Senders::Gone => i64::MAX,
        };
        batch.extend(lock(&budget).summaries(now));
        for chunk in batch.chunks(BATCH) {
            flush(&db, chunk, &counters).await;
        }
        batch.clear();
        if senders == Senders::Gone {
            return;
        }
    }
}

async fn flush(db: &Db, batch: &[Event], counters: &Counters) {
    let n = batch.len() as u64;
    match store::audit::append(db, batch).await {
        Ok(()) => {
            counters.written.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            counters.failed.fetch_add(n, Ordering::Relaxed);
            tracing::error!(error = %e, lost = n, "could not write audit entries");
        }
    }
}

async fn retention_loop(db: Db, days: u32) {
    let mut tick = tokio::time::interval(RETENTION_EVERY);
    loop {
        tick.tick().await;
        let cutoff = store::now_ms() - i64::from(days) * 86_400_000;
        match store::audit::trim(&db, cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, days, "audit retention"),
            Err(e) => tracing::warn!(error = %e, "audit retention failed"),
        }
    }
}

/// The refusals an outsider can cause at will, with no valid credential: the only
/// decisions the budget applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anonymous {
    TokenMalformed,
    TokenUnknown,
}

impl Anonymous {
    const ALL: [Anonymous; 2] = [Anonymous::TokenMalformed, Anonymous::TokenUnknown];

    /// `Some` for a refusal coded `token_unknown` or `token_malformed` that names no
    /// connection; every other decision (allows, refusals of a real connection's
    /// request) is written whatever the rate.
    fn of(event: &Event) -> Option<Self> {
        if event.kind != "decision" || event.action != "deny" || event.connection_id.is_some() {
            return None;
        }
        let code = event.code.as_deref()?;
        Self::ALL.into_iter().find(|a| a.code() == code)
    }

    fn code(self) -> &'static str {
        match self {
            Anonymous::TokenMalformed => DenyCode::TokenMalformed.as_str(),
            Anonymous::TokenUnknown => DenyCode::TokenUnknown.as_str(),
        }
    }

    fn index(self) -> usize {
        match self {
            Anonymous::TokenMalformed => 0,
            Anonymous::TokenUnknown => 1,
        }
    }
}

/// The anonymous-refusal budget, in clock seconds (the decisions' own `at`): the first
/// `per_sec` anonymous refusals of a second are written one by one, the rest are
/// counted per code. Once the second is over, each nonzero count becomes one summary
/// row: `at` the second's start, the code, and `suppressed` the count. So the rows of
/// one second with a code, plus its summary's `suppressed`, are every such refusal
/// this replica made in that second.
#[derive(Debug)]
struct Budget {
    per_sec: u32,
    /// The second being counted (`at / 1000`).
    second: i64,
    admitted: u32,
    suppressed: [u64; 2],
    /// Summaries of seconds that are over, not yet taken by the writer.
    done: Vec<Event>,
}

impl Budget {
    fn new(per_sec: u32) -> Self {
        Budget {
            per_sec,
            second: i64::MIN,
            admitted: 0,
            suppressed: [0; 2],
            done: Vec::new(),
        }
    }

    /// Whether the refusal decided at `at_ms` is written on its own; if not, it is
    /// counted. A decision stamped just before the current second (stamped on another
    /// thread a moment before a later one got here) counts in the current second.
    fn admit(&mut self, at_ms: i64, code: Anonymous) -> bool {
        let second = at_ms.div_euclid(1000);
        if second > self.second {
            self.close();
            self.second = second;
        }
        if self.admitted < self.per_sec {
            self.admitted += 1;
            return true;
        }
        self.suppressed[code.index()] += 1;
        false
    }

    /// The summary rows of every second that is over at `now_ms` (`i64::MAX`: all).
    fn summaries(&mut self, now_ms: i64) -> Vec<Event> {
        let now = now_ms.div_euclid(1000);
        if now > self.second {
            self.close();
            self.second = now;
        }
        std::mem::take(&mut self.done)
    }

    /// Ends the current second: its counts become summary rows.
    fn close(&mut self) {
        for code in Anonymous::ALL {
            let n = std::mem::take(&mut self.suppressed[code.index()]);
            if n > 0 {
                self.done.push(Event {
                    at: self.second.saturating_mul(1000),
                    kind: "decision".into(),
                    action: "deny".into(),
                    code: Some(code.code().into()),
                    suppressed: Some(i64::try_from(n).unwrap_or(i64::MAX)),
                    ..Event::default()
                });
            }
        }
        self.admitted = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::audit::{Filter, query};

    #[tokio::test]
    async fn every_queued_decision_is_written_before_the_writer_ends_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open_sqlite_file(&dir.path().join("t.db")).await;
        let (audit, writer) = Audit::spawn(db.clone(), 0);
        // More than one transaction's worth, queued well within one tick.
        let queued = BATCH + 3;
        for i in 0..queued {
            audit.decision(Event {
                at: i64::try_from(i).unwrap(),
                kind: "decision".into(),
                action: "allow".into(),
                ..Event::default()
            });
        }
        let counters = audit.counters.clone();
        drop(audit);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends once no handle is left")
            .unwrap();
        let written = query(
            &db,
            &Filter {
                limit: 1_000,
                ..Filter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(written.len(), queued);
        assert_eq!(counters.written.load(Ordering::Relaxed), queued as u64);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
    }

    fn refusal(at: i64, code: &str, connection_id: Option<i64>) -> Event {
        Event {
            at,
            kind: "decision".into(),
            action: "deny".into(),
            code: Some(code.into()),
            connection_id,
            ..Event::default()
        }
    }

    /// (code, at, suppressed) of summary rows.
    fn summary(rows: &[Event]) -> Vec<(String, i64, i64)> {
        rows.iter()
            .map(|e| {
                assert_eq!((e.kind.as_str(), e.action.as_str()), ("decision", "deny"));
                (
                    e.code.clone().unwrap(),
                    e.at,
                    e.suppressed.expect("a summary row has a count"),
                )
            })
            .collect()
    }

    #[test]
    fn only_refusals_without_a_credential_or_connection_are_anonymous() {
        assert_eq!(
            Anonymous::of(&refusal(0, "token_unknown", None)),
            Some(Anonymous::TokenUnknown)
        );
        assert_eq!(
            Anonymous::of(&refusal(0, "token_malformed", None)),
            Some(Anonymous::TokenMalformed)
        );
        // A refusal that names a real connection is that connection's record.
        assert_eq!(Anonymous::of(&refusal(0, "token_unknown", Some(7))), None);
        for code in [
            "token_revoked",
            "token_expired",
            "host_disabled",
            "token_missing",
        ] {
            assert_eq!(Anonymous::of(&refusal(0, code, None)), None, "{code}");
        }
        let allow = Event {
            kind: "decision".into(),
            action: "allow".into(),
            ..Event::default()
        };
        assert_eq!(Anonymous::of(&allow), None);
        let admin = Event {
            kind: "admin".into(),
            action: "deny".into(),
            code: Some("token_unknown".into()),
            ..Event::default()
        };
        assert_eq!(Anonymous::of(&admin), None);
    }

    #[test]
    fn a_second_writes_the_budget_then_counts_each_code_in_one_summary_once_it_is_over() {
        let mut budget = Budget::new(3);
        let second = 1_700_000_000_000_i64; // a second's start
        let admitted: Vec<bool> = (0..10)
            .map(|i| {
                let code = if i % 2 == 0 {
                    Anonymous::TokenUnknown
                } else {
                    Anonymous::TokenMalformed
                };
                budget.admit(second + i * 90, code)
            })
            .collect();
        // One budget for both codes: the first three of the second, whatever the code.
        assert_eq!(
            admitted,
            [
                true, true, true, false, false, false, false, false, false, false
            ]
        );
        // Nothing is summarised while the second lasts.
        assert!(budget.summaries(second + 999).is_empty());
        let rows = budget.summaries(second + 1_000);
        assert_eq!(
            summary(&rows),
            [
                ("token_malformed".to_owned(), second, 4),
                ("token_unknown".to_owned(), second, 3)
            ]
        );
        // Taken once.
        assert!(budget.summaries(second + 5_000).is_empty());
    }

    #[test]
    fn each_second_has_its_own_budget_and_summary() {
        let mut budget = Budget::new(2);
        let t0 = 42_000;
        let counts: Vec<usize> = (0..3)
            .map(|s| {
                (0..5)
                    .filter(|i| budget.admit(t0 + s * 1_000 + i * 10, Anonymous::TokenUnknown))
                    .count()
            })
            .collect();
        assert_eq!(counts, [2, 2, 2]);
        let rows = budget.summaries(t0 + 3_000);
        assert_eq!(
            summary(&rows),
            [
                ("token_unknown".to_owned(), t0, 3),
                ("token_unknown".to_owned(), t0 + 1_000, 3),
                ("token_unknown".to_owned(), t0 + 2_000, 3)
            ]
        );
        // A quiet second (within budget) leaves no summary.
        assert!(budget.admit(t0 + 3_100, Anonymous::TokenUnknown));
        assert!(budget.summaries(t0 + 9_000).is_empty());
    }

    #[test]
    fn a_decision_stamped_before_the_current_second_counts_in_it() {
        let mut budget = Budget::new(1);
        assert!(budget.admit(10_000, Anonymous::TokenUnknown));
        // Stamped on another thread a moment earlier, arriving later.
        assert!(!budget.admit(9_999, Anonymous::TokenUnknown));
        let rows = budget.summaries(11_000);
        assert_eq!(summary(&rows), [("token_unknown".to_owned(), 10_000, 1)]);
        // And after the writer closed a second, a late one counts in the writer's now.
        assert!(budget.admit(10_500, Anonymous::TokenUnknown));
        assert!(!budget.admit(10_600, Anonymous::TokenUnknown));
        let rows = budget.summaries(i64::MAX);
        assert_eq!(summary(&rows), [("token_unknown".to_owned(), 11_000, 1)]);
    }

    #[test]
    fn a_zero_budget_counts_everything_and_the_last_round_takes_the_open_second() {
        let mut budget = Budget::new(0);
        assert!((0..100).all(|i| !budget.admit(5_000 + i, Anonymous::TokenMalformed)));
        // Shutdown: the second is not over, but its count is written all the same.
        let rows = budget.summaries(i64::MAX);
        assert_eq!(summary(&rows), [("token_malformed".to_owned(), 5_000, 100)]);
    }

    #[tokio::test]
    async fn a_flood_of_anonymous_refusals_costs_the_budget_and_a_summary_but_nothing_else_is_held_back()
     {
        let dir = tempfile::tempdir().unwrap();
        let db = store::open_sqlite_file(&dir.path().join("t.db")).await;
        let (audit, writer) = Audit::spawn_with_budget(db.clone(), 0, 5);
        // One second (in the past, so the writer's first tick closes it): 1,000 forged
        // tokens, and in between a real connection's allows and refusals.
        let second = 3_000;
        for i in 0..1_000 {
            audit.decision(refusal(second + i % 1_000, "token_unknown", None));
            if i % 100 == 0 {
                audit.decision(refusal(second + 500, "token_unknown", Some(9)));
                audit.decision(refusal(second + 500, "token_revoked", None));
                audit.decision(Event {
                    at: second + 500,
                    kind: "decision".into(),
                    action: "allow".into(),
                    connection_id: Some(9),
                    ..Event::default()
                });
            }
        }
        let counters = audit.counters.clone();
        let status = audit.status(0);
        assert_eq!(
            (status.suppressed, status.anonymous_refusals_per_sec),
            (995, 5)
        );
        drop(audit);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends once no handle is left")
            .unwrap();
        let rows = query(
            &db,
            &Filter {
                limit: 1_000,
                ..Filter::default()
            },
        )
        .await
        .unwrap();
        let anonymous: Vec<&Event> = rows
            .iter()
            .filter(|e| e.code.as_deref() == Some("token_unknown") && e.connection_id.is_none())
            .collect();
        let (summaries, one_by_one): (Vec<&Event>, Vec<&Event>) =
            anonymous.iter().partition(|e| e.suppressed.is_some());
        assert_eq!(one_by_one.len(), 5);
        assert_eq!(
            summaries
                .iter()
                .map(|e| (e.at, e.suppressed))
                .collect::<Vec<_>>(),
            [(second, Some(995))]
        );
        // Every other decision is written: 10 of each kind.
        assert_eq!(rows.len(), 5 + 1 + 30);
        assert_eq!(
            rows.iter().filter(|e| e.connection_id == Some(9)).count(),
            20
        );
        assert_eq!(counters.written.load(Ordering::Relaxed), 36);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
    }
}
