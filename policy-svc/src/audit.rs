//! The audit trail. Admin actions are written before the call returns (they are rare
//! and must not be lost); data-plane decisions go through a bounded queue to a writer
//! that inserts them in batches, so the check path never waits on an audit write.
//! Under overload, decisions are still enforced and the dropped entries are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::queue::{self, Senders};
use crate::store::{self, Db, StoreError, audit::Event};

const QUEUE: usize = 65_536;
/// Most entries per transaction, which holds SQLite's write lock.
const BATCH: usize = 512;
/// How often the writer takes the queued entries and writes them: the most an entry
/// waits, and at 30,000 decisions/s a tenth of the queue.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    db: Db,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// Decision entries written.
    pub written: u64,
    /// Decision entries dropped because the writer was behind (never silent: also logged).
    pub dropped: u64,
    /// Decision entries lost to database errors.
    pub failed: u64,
    pub retention_days: u32,
}

impl Audit {
    /// Starts the writer and the retention task. The writer drains and ends once every
    /// `Audit` handle is dropped.
    pub fn spawn(db: Db, retention_days: u32) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let writer = tokio::spawn(write_loop(db.clone(), rx, counters.clone()));
        if retention_days > 0 {
            tokio::spawn(retention_loop(db.clone(), retention_days));
        }
        (Audit { tx, counters, db }, writer)
    }

    /// Queues a data-plane decision; never waits.
    pub fn decision(&self, event: Event) {
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
        store::audit::append(&self.db, &[event]).await
    }

    pub fn status(&self, retention_days: u32) -> Status {
        Status {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            retention_days,
        }
    }
}

async fn write_loop(db: Db, mut rx: mpsc::Receiver<Event>, counters: Arc<Counters>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        let senders = queue::drain(&mut rx, |e| batch.push(e));
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
}
