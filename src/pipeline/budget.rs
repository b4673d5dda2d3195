//! The byte budget: payload bytes held between decoding and settling
//! (queued for the publisher, in its window awaiting an ack, or in a replay
//! chunk awaiting its check) are capped, whatever the payload sizes. Counted
//! in KiB units on a semaphore; a unit travels with its event ([`Held`]) and
//! returns when the event settles (acked, or a dead letter) or the session
//! ends. An event larger than the whole budget waits for all of it, then goes
//! alone.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const UNIT: usize = 1024;

#[derive(Clone)]
pub(super) struct Budget {
    units: Arc<Semaphore>,
    /// The whole budget, in units: no event asks for more.
    total: u32,
}

/// A share of the budget, returned on drop.
#[derive(Debug)]
pub(crate) struct Held {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    pub(super) fn new(max_bytes: usize) -> Budget {
        let total = u32::try_from((max_bytes / UNIT).max(1)).unwrap_or(u32::MAX >> 4);
        Budget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    fn units(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.total)
    }

    /// Waits until `bytes` fit.
    pub(super) async fn hold(&self, bytes: usize) -> Held {
        let permit = Arc::clone(&self.units)
            .acquire_many_owned(self.units(bytes))
            .await
            .expect("the budget's semaphore is never closed");
        Held { _permit: permit }
    }

    /// `bytes` if they fit now.
    pub(super) fn try_hold(&self, bytes: usize) -> Option<Held> {
        Arc::clone(&self.units)
            .try_acquire_many_owned(self.units(bytes))
            .ok()
            .map(|permit| Held { _permit: permit })
    }

    /// Bytes free now.
    #[cfg(test)]
    fn available_bytes(&self) -> usize {
        self.units.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_held_until_dropped_and_a_giant_goes_alone() {
        let budget = Budget::new(10 * UNIT);
        let a = budget.hold(4 * UNIT).await;
        let b = budget.try_hold(5 * UNIT + 1).expect("6 units fit beside 4");
        assert!(budget.try_hold(1).is_none(), "full");
        drop(a);
        assert_eq!(budget.available_bytes(), 4 * UNIT);
        drop(b);
        // Larger than the whole budget: it waits for all of it.
        let giant = budget.hold(1 << 30).await;
        assert_eq!(budget.available_bytes(), 0);
        assert!(budget.try_hold(1).is_none());
        drop(giant);
        assert_eq!(budget.available_bytes(), 10 * UNIT);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_bytes_return() {
        let budget = Budget::new(2 * UNIT);
        let first = budget.hold(2 * UNIT).await;
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.hold(UNIT).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "nothing free yet");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
