//! The stream's progress as a type, the one place a session keeps its
//! positions: how far it has read (received: every event before it is on
//! its way down the pipeline) and how far the server may forget (confirmed).
//!
//! Only a position whose events are all published *and* marked may be
//! confirmed, so confirmed never passes received; both only go forward (a
//! lower confirmation is a bug, asserted in debug builds and ignored in
//! release, as the server would).

use pgwire_replication::Lsn;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    received: Lsn,
    confirmed: Lsn,
}

impl Progress {
    pub(crate) fn new(start: Lsn) -> Progress {
        Progress {
            received: start,
            confirmed: start,
        }
    }

    /// The stream reached `lsn` (a transaction's end, or an idle keepalive's
    /// position). True when that is past every position before: then it goes
    /// down the pipeline, behind the events before it.
    pub(crate) fn receive(&mut self, lsn: Lsn) -> bool {
        if lsn > self.received {
            self.received = lsn;
            true
        } else {
            false
        }
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
        debug_assert!(
            lsn <= self.received,
            "confirmed {} before receiving it (received {})",
            lsn,
            self.received
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
    fn receives_only_forward() {
        let mut progress = Progress::new(Lsn(100));
        assert!(!progress.receive(Lsn(100)));
        assert!(progress.receive(Lsn(300)));
        assert!(
            !progress.receive(Lsn(200)),
            "an older position is not sent again"
        );
        assert!(progress.confirm(Lsn(300)));
    }

    #[test]
    fn confirms_only_forward() {
        let mut progress = Progress::new(Lsn(100));
        progress.receive(Lsn(200));
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

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "before receiving it")]
    fn confirming_past_what_was_received_is_a_bug() {
        let mut progress = Progress::new(Lsn(100));
        progress.receive(Lsn(200));
        progress.confirm(Lsn(300));
    }
}
