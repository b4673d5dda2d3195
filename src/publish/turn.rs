//! Whose turn it is to publish: the stream's publisher or the sweeper.
//!
//! The stream chains each publish to the one before it
//! (`Nats-Expected-Last-Msg-Id`), so that a publish lost in a broken
//! connection cannot be overtaken by those sent after it. A message the
//! sweeper stored in between would break that chain and make the server
//! refuse everything the stream has in flight. So the sweeper asks for a
//! turn: the publisher stops sending, waits for its in-flight publishes to
//! be acked, and hands over; after the sweeper's batch it starts a new chain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

/// How long the publisher keeps its turn, once it has it, while the sweeper
/// waits and live events keep coming: the sweeper cannot starve the stream.
pub(crate) const PUBLISHER_SHARE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub(crate) struct PublishTurn {
    lock: Arc<Mutex<()>>,
    /// The sweeper waits for its turn.
    wanted: AtomicBool,
    /// Wakes an idle publisher when the sweeper starts waiting.
    asked: Notify,
}

/// The sweeper's turn; the publisher gets it back when this is dropped.
pub(crate) struct SweeperTurn<'a> {
    turn: &'a PublishTurn,
    _guard: OwnedMutexGuard<()>,
}

impl Drop for SweeperTurn<'_> {
    fn drop(&mut self) {
        // Before the guard is released: the publisher, back in its turn,
        // must not see a request that is already over.
        self.turn.wanted.store(false, Ordering::Relaxed);
    }
}

impl PublishTurn {
    /// Waits until the publisher (if any) has nothing in flight and hands over.
    pub(crate) async fn sweeper(&self) -> SweeperTurn<'_> {
        self.wanted.store(true, Ordering::Relaxed);
        self.asked.notify_one();
        let guard = self.lock.clone().lock_owned().await;
        SweeperTurn {
            turn: self,
            _guard: guard,
        }
    }

    /// The publisher's turn; it holds it while it publishes.
    pub(crate) async fn publisher(&self) -> OwnedMutexGuard<()> {
        self.lock.clone().lock_owned().await
    }

    /// Whether the sweeper is waiting for its turn.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// Completes when the sweeper (may have) started waiting.
    pub(crate) async fn asked(&self) {
        self.asked.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sweeper_gets_its_turn_only_when_the_publisher_hands_over() {
        let turn = Arc::new(PublishTurn::default());
        let held = turn.publisher().await;
        let sweeper = {
            let turn = turn.clone();
            tokio::spawn(async move {
                let _mine = turn.sweeper().await;
            })
        };
        tokio::time::timeout(Duration::from_secs(5), turn.asked())
            .await
            .expect("the publisher is told");
        assert!(turn.wanted());
        tokio::task::yield_now().await;
        assert!(!sweeper.is_finished(), "the sweeper waits for the handover");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), sweeper)
            .await
            .expect("the sweeper gets its turn")
            .unwrap();
        assert!(
            !turn.wanted(),
            "the request is over once the sweeper is done"
        );
        let _back = tokio::time::timeout(Duration::from_secs(5), turn.publisher())
            .await
            .expect("the publisher gets its turn back");
    }
}
