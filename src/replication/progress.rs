//! The stream's progress as a type: how far the server may forget.
//!
//! Only a position whose events are all published *and* marked may be
//! confirmed; confirming is monotonic (a lower position is a bug, asserted in
//! debug builds and ignored in release, as the server would).

use pgwire_replication::Lsn;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    confirmed: Lsn,
}

impl Progress {
    pub(crate) fn new(start: Lsn) -> Progress {
        Progress { confirmed: start }
    }

    /// The highest position whose events are durable in JetStream and marked.
    pub(crate) fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records that everything before `lsn` is published and marked. Returns
    /// true when that moved the confirmed position forward.
    pub(crate) fn confirm(&mut self, lsn: Lsn) -> bool {
        debug_assert!(
            lsn >= self.confirmed,
            "confirmed position went back: {} < {}",
            lsn,
            self.confirmed
        );
        if lsn > self.confirmed {
            self.confirmed = lsn;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_forward() {
        let mut progress = Progress::new(Lsn(100));
        assert!(progress.confirm(Lsn(200)));
        assert!(!progress.confirm(Lsn(200)));
        assert_eq!(progress.confirmed(), Lsn(200));
    }

    #[test]
    #[should_panic(expected = "went back")]
    #[cfg(debug_assertions)]
    fn going_back_is_a_bug() {
        let mut progress = Progress::new(Lsn(100));
        progress.confirm(Lsn(50));
    }
}
