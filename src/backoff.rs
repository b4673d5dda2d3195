//! Exponential backoff with jitter and a cap. Pure code.

use std::time::Duration;

/// A backoff policy: `base * 2^attempt`, capped, with "equal jitter" (half
/// the delay fixed, the other half a uniform pick: `[delay/2, delay]`), so
/// many waiters do not retry in step and none retries much sooner than asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// Retrying a failed publish: the first retry within 1 s, at most 30 s.
    pub(crate) const PUBLISH: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
    };

    /// Waiting out an outage or a full stream: 1 s, doubling, at most 5 s.
    /// Nothing is wrong with the event, and each try costs one publish: a
    /// short cap resumes publishing within seconds of NATS coming back or the
    /// limit being lifted, however long the incident was (every fault
    /// recovers within 10 s).
    pub(crate) const STALL: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(5),
    };

    /// Polling a stream with no leader (see `Failure::Leaderless`): 250 ms,
    /// doubling, at most 1 s, so publishing resumes within a second of the
    /// election's end.
    pub(crate) const ELECTION: Backoff = Backoff {
        base: Duration::from_millis(250),
        cap: Duration::from_secs(1),
    };

    /// Reconnecting a session: 250 ms, doubling, at most 4 s. A restarting
    /// server is back within seconds, and a failed attempt costs one
    /// connection: a short cap follows it closely (every fault recovers
    /// within 10 s), where 30 s would leave the slot idle for half a minute.
    pub(crate) const RECONNECT: Backoff = Backoff {
        base: Duration::from_millis(250),
        cap: Duration::from_secs(4),
    };

    /// Looking again at a transaction whose commit was decoded but is not
    /// visible yet (`outbox::visibility`): 1 ms, doubling, at most 200 ms.
    /// Nearly always visible at once or within a few milliseconds; a
    /// stalled synchronous standby can hold it for as long as it stalls.
    pub(crate) const VISIBILITY: Backoff = Backoff {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(200),
    };

    /// The delay before retry number `attempt` (0 for the first retry).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }

    /// As [`Backoff::delay`], with the jitter given (`0.0..1.0`) for tests.
    pub(crate) fn delay_with(&self, attempt: u32, jitter: f64) -> Duration {
        let full = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.cap);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_equal_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
        };
        assert_eq!(b.delay_with(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay_with(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_with(20, 1.0), Duration::from_secs(30));
        assert_eq!(
            b.delay_with(u32::MAX, 1.0),
            Duration::from_secs(30),
            "no overflow"
        );
        for attempt in 0..40 {
            let d = b.delay(attempt);
            assert!(
                d <= Duration::from_secs(30) && d >= Duration::from_millis(50),
                "{attempt}: {d:?}"
            );
        }
    }
}
