//! The hand-off between the check path and its background writers (audit entries,
//! last-used times). The check only ever `try_send`s; the writer takes what is queued
//! on its own tick instead of waiting on the channel, because a receiver waiting on the
//! channel is woken by every send: one task wake-up, and often a parked worker thread
//! woken with it, per check.

use tokio::sync::mpsc::{self, error::TryRecvError};

/// Whether the senders are still there after a [`drain`].
#[derive(Debug, PartialEq, Eq)]
pub enum Senders {
    Open,
    /// Every sender is dropped and the queue is empty: the writer's last round.
    Gone,
}

/// Hands everything queued now to `take`, without waiting.
pub fn drain<T>(rx: &mut mpsc::Receiver<T>, mut take: impl FnMut(T)) -> Senders {
    loop {
        match rx.try_recv() {
            Ok(item) => take(item),
            Err(TryRecvError::Empty) => return Senders::Open,
            Err(TryRecvError::Disconnected) => return Senders::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_everything_queued_then_reports_the_senders_gone_once_empty() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        let mut got = Vec::new();
        assert_eq!(drain(&mut rx, |n| got.push(n)), Senders::Open);
        assert_eq!(got, [1, 2]);
        assert_eq!(drain(&mut rx, |n| got.push(n)), Senders::Open);
        tx.try_send(3).unwrap();
        drop(tx);
        assert_eq!(drain(&mut rx, |n| got.push(n)), Senders::Gone);
        assert_eq!(got, [1, 2, 3]);
    }
}
