//! "Last used" times, recorded off the check path: the check hands uses to a channel
//! and a background task writes them, coalesced, once a second.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::queue::{self, Senders};
use crate::store::{self, Db};

const QUEUE: usize = 16_384;
/// How often the writer takes the queued uses (coalescing them as it goes): at 30,000
/// checks/s, a fifth of the queue.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct LastUsed {
    tx: mpsc::Sender<(Option<i64>, i64)>,
    dropped: Arc<AtomicU64>,
}

impl LastUsed {
    /// Starts the writer. It flushes a last time and ends once every `LastUsed` is dropped.
    pub fn spawn(db: Db) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(db, rx));
        (
            LastUsed {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            task,
        )
    }

    /// Never waits: when the writer falls behind, the use is counted as dropped (a
    /// "last used" time may lag; a decision never does).
    /// `token_id`: the API token used, if the credential was one.
    pub fn record(&self, token_id: Option<i64>, connection_id: i64) {
        if self.tx.try_send((token_id, connection_id)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "last-used updates dropped: writer behind");
            }
        }
    }
}

async fn write_loop(db: Db, mut rx: mpsc::Receiver<(Option<i64>, i64)>) {
    let mut pending: HashSet<(Option<i64>, i64)> = HashSet::new();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    let mut flushed = Instant::now();
    loop {
        tick.tick().await;
        let senders = queue::drain(&mut rx, |used| {
            pending.insert(used);
        });
        if senders == Senders::Gone {
            flush(&db, &mut pending).await;
            return;
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            flush(&db, &mut pending).await;
            flushed = Instant::now();
        }
    }
}

async fn flush(db: &Db, pending: &mut HashSet<(Option<i64>, i64)>) {
    if pending.is_empty() {
        return;
    }
    let uses: Vec<(Option<i64>, i64)> = pending.drain().collect();
    if let Err(e) = store::hosts::record_last_used(db, &uses, store::now_ms()).await {
        tracing::warn!(error = %e, count = uses.len(), "could not record last-used times");
    }
}
