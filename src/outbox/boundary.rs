//! The boundary between the stream and the catch-up sweeper: what each
//! tells the other so that they never both publish a row. The stream says
//! where it stands (the server, the position up to which it has published
//! and marked everything); the sweeper samples the server's time, WAL
//! position and oldest running transaction ([`Samples`]) and takes only
//! rows the stream is past, and says when it took rows so the stream looks
//! those up first.

use crate::replication::timeline::ServerId;
use pgwire_replication::Lsn;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// What the stream and the sweeper tell each other so that they do not both
/// publish a row.
#[derive(Debug, Default)]
pub(crate) struct Boundary {
    /// Where the stream stands: the server it streams from, and the WAL
    /// position up to which it has published and marked every transaction.
    confirmed: Mutex<Confirmed>,
    /// The sweeper may have taken rows created before this (microseconds
    /// since 2000-01-01; 0: none taken).
    swept_before: AtomicI64,
}

/// The stream's confirmed position, on the server it was confirmed on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Confirmed {
    /// None until a session has started.
    server: Option<ServerId>,
    /// Only increasing while the server stays the same (0/0: nothing yet).
    lsn: Lsn,
}

impl Boundary {
    /// A session streams from `server`. After a change of primary the old
    /// timeline's position means nothing on the new one (the new slot starts
    /// elsewhere): the stream's progress starts again from nothing.
    pub(crate) fn streaming_from(&self, server: ServerId) {
        let mut confirmed = self.lock();
        if confirmed.server != Some(server) {
            *confirmed = Confirmed {
                server: Some(server),
                lsn: Lsn::ZERO,
            };
        }
    }

    /// The stream confirmed `lsn` to the server.
    pub(crate) fn confirmed(&self, lsn: Lsn) {
        let mut confirmed = self.lock();
        confirmed.lsn = confirmed.lsn.max(lsn);
    }

    /// Where the stream stands now.
    pub(crate) fn position(&self) -> Confirmed {
        *self.lock()
    }

    /// The sweeper is taking rows created before `cutoff`: from now on the
    /// stream looks such rows up before publishing them.
    pub(crate) fn sweeping_before(&self, cutoff: i64) {
        self.swept_before.fetch_max(cutoff, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Confirmed> {
        // Two plain fields, never left half-written: a poisoned lock holds a
        // consistent value.
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True once the sweeper has taken rows: only then must the stream look
    /// rows up (and parse their `created_at`) at all.
    pub(crate) fn sweeping(&self) -> bool {
        self.swept_before.load(Ordering::Relaxed) != 0
    }

    /// True when a row created at `created_at` may have been swept already.
    pub(crate) fn maybe_swept(&self, created_at: i64) -> bool {
        created_at < self.swept_before.load(Ordering::Relaxed)
    }
}

/// Pairs of (server time, WAL insert position) the sweeper samples. Every
/// transaction that committed before a sample's time has its commit record
/// before the sample's position; once the stream has confirmed that
/// position, every such transaction is published and marked. So the time of
/// the newest confirmed sample is exact, whatever the lag, and needs neither
/// commit timestamps nor the tailer's clock.
///
/// Samples and confirmations compare only on one server: after a change of
/// primary the samples start again, and none counts until the stream
/// streams from the sweeper's server (a promoted standby's new slot never
/// confirms the old timeline's positions, which would hold sweeping up for
/// ever, nor must the old timeline's confirmations vouch for the new one).
#[derive(Debug, Default)]
pub(crate) struct Samples {
    /// The server the samples were read on.
    server: Option<ServerId>,
    /// Not yet confirmed, oldest first: (µs since 2000-01-01, LSN, the
    /// oldest transaction running then, 64 bits).
    waiting: VecDeque<(i64, Lsn, u64)>,
    /// The newest time up to which the stream has published everything.
    confirmed_at: Option<i64>,
    /// The oldest transaction running at that time: every older one is
    /// published, whatever its rows' `created_at` say.
    confirmed_xmin: Option<u64>,
}

impl Samples {
    /// Samples kept while the stream is behind (at the sweep interval, a
    /// few hours); past that the oldest go, which only delays sweeping.
    const MAX: usize = 4096;

    pub(crate) fn push(&mut self, server: ServerId, at: i64, lsn: Lsn, xmin: u64) {
        if self.server != Some(server) {
            *self = Samples {
                server: Some(server),
                ..Samples::default()
            };
        }
        if self.waiting.len() == Self::MAX {
            self.waiting.pop_front();
        }
        self.waiting.push_back((at, lsn, xmin));
    }

    /// The newest time up to which the stream, having confirmed `confirmed`,
    /// has published every committed transaction.
    pub(crate) fn confirmed_at(&mut self, confirmed: Confirmed) -> Option<i64> {
        if confirmed.server.is_none() || confirmed.server != self.server {
            return None;
        }
        let confirmed = confirmed.lsn;
        while let Some(&(at, lsn, xmin)) = self.waiting.front() {
            if lsn > confirmed {
                break;
            }
            self.confirmed_at = Some(at);
            self.confirmed_xmin = Some(xmin);
            self.waiting.pop_front();
        }
        self.confirmed_at
    }

    /// The oldest transaction running at the newest confirmed sample.
    pub(crate) fn confirmed_xmin(&self) -> Option<u64> {
        self.confirmed_xmin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: ServerId = ServerId {
        system: 7,
        timeline: 1,
    };
    const TWO: ServerId = ServerId {
        system: 7,
        timeline: 2,
    };

    /// The stream on `server` confirmed `lsn`.
    fn on(server: ServerId, lsn: u64) -> Confirmed {
        let lsn = Lsn(lsn);
        Confirmed {
            server: Some(server),
            lsn,
        }
    }

    #[test]
    fn the_horizon_is_the_newest_sample_the_stream_confirmed() {
        let mut samples = Samples::default();
        assert_eq!(
            samples.confirmed_at(on(ONE, u64::MAX)),
            None,
            "no sample yet"
        );
        samples.push(ONE, 1_000, Lsn(100), 0);
        samples.push(ONE, 2_000, Lsn(200), 0);
        samples.push(ONE, 3_000, Lsn(300), 0);
        assert_eq!(
            samples.confirmed_at(on(ONE, 0)),
            None,
            "nothing confirmed yet"
        );
        assert_eq!(samples.confirmed_at(on(ONE, 99)), None);
        assert_eq!(samples.confirmed_at(on(ONE, 250)), Some(2_000));
        assert_eq!(
            samples.confirmed_at(on(ONE, 250)),
            Some(2_000),
            "kept until a newer sample is confirmed"
        );
        assert_eq!(samples.waiting.len(), 1);
        assert_eq!(samples.confirmed_at(on(ONE, 300)), Some(3_000));
        for i in 0..Samples::MAX as u64 + 10 {
            samples.push(ONE, 4_000 + i as i64, Lsn(400 + i), 0);
        }
        assert_eq!(samples.waiting.len(), Samples::MAX, "bounded");
        assert_eq!(
            samples.confirmed_at(on(ONE, u64::MAX)),
            Some(4_000 + Samples::MAX as i64 + 9)
        );
    }

    #[test]
    fn the_oldest_running_transaction_goes_with_its_sample() {
        let mut samples = Samples::default();
        samples.push(ONE, 500, Lsn(800), 41);
        samples.push(ONE, 600, Lsn(950), 42);
        assert_eq!(samples.confirmed_at(on(ONE, 900)), Some(500));
        assert_eq!(samples.confirmed_xmin, Some(41));
        assert_eq!(samples.confirmed_at(on(ONE, 950)), Some(600));
        assert_eq!(samples.confirmed_xmin, Some(42));
    }

    #[test]
    fn after_a_change_of_primary_only_the_new_timeline_counts() {
        let mut samples = Samples::default();
        samples.push(ONE, 1_000, Lsn(900), 0);
        assert_eq!(samples.confirmed_at(on(ONE, 1_000)), Some(1_000));
        // The promoted standby's WAL goes on from where it had replayed,
        // below what the old primary had written and the stream confirmed.
        samples.push(TWO, 2_000, Lsn(500), 0);
        assert_eq!(
            samples.confirmed_at(on(ONE, 1_000)),
            None,
            "the old timeline's position vouches for nothing on the new one"
        );
        samples.push(TWO, 3_000, Lsn(600), 0);
        assert_eq!(
            samples.confirmed_at(on(TWO, 550)),
            Some(2_000),
            "the new slot's stream confirms the new samples"
        );
        let boundary = Boundary::default();
        boundary.streaming_from(ONE);
        boundary.confirmed(Lsn(1_000));
        boundary.streaming_from(ONE);
        assert_eq!(
            *boundary.lock(),
            on(ONE, 1_000),
            "a restart keeps the position"
        );
        boundary.streaming_from(TWO);
        assert_eq!(
            *boundary.lock(),
            on(TWO, 0),
            "a new primary starts from nothing"
        );
        boundary.confirmed(Lsn(550));
        assert_eq!(*boundary.lock(), on(TWO, 550));
    }

    #[test]
    fn the_stream_checks_nothing_until_a_sweep_took_rows() {
        let boundary = Boundary::default();
        assert!(!boundary.sweeping());
        boundary.swept_before.fetch_max(1_000, Ordering::Relaxed);
        assert!(boundary.sweeping() && boundary.maybe_swept(999) && !boundary.maybe_swept(1_000));
    }
}
