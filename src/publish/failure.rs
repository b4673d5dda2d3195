//! What a failed publish means for its event (CONTRACT.md section 3). Pure.
//!
//! - `Permanent`: no retry can fix it (the payload is over the server's
//!   `max_payload`): the event fails at once.
//! - `EventSpecific`: the server rejected this event: it counts toward
//!   `--max-retries`, then the event fails.
//! - `Transient`: NATS as a whole is unavailable (disconnected, timed out,
//!   JetStream or the stream missing): retried without limit, never fails an
//!   event.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Permanent,
    EventSpecific,
    Transient,
}

pub fn classify(error: &PublishError) -> Failure {
    classify_kind(error.kind())
}

fn classify_kind(kind: PublishErrorKind) -> Failure {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent,
        PublishErrorKind::Other
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Failure::EventSpecific,
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => Failure::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_never_fail_an_event() {
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::MaxAckPending,
        ] {
            assert_eq!(classify_kind(kind), Failure::Transient, "{kind:?}");
        }
        assert_eq!(
            classify_kind(PublishErrorKind::MaxPayloadExceeded),
            Failure::Permanent
        );
        assert_eq!(
            classify_kind(PublishErrorKind::Other),
            Failure::EventSpecific
        );
    }
}
