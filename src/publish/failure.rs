//! What a failed publish means for its event (docs/contract.md section 3). Pure.
//!
//! - `Permanent`: no retry can fix it (the payload is over the server's
//!   `max_payload`): the event fails at once.
//! - `EventSpecific`: the server rejected this event: it counts toward
//!   `--max-retries`, then the event fails.
//! - `Transient`: NATS as a whole is unavailable (disconnected, timed out,
//!   JetStream or the stream missing): retried without limit, never fails an
//!   event.
//! - `Chain`: the stream's last message was not the one this publish was
//!   chained to (`Nats-Expected-Last-Msg-Id`): an earlier publish is missing,
//!   or another publisher wrote in between. Nothing is wrong with the event:
//!   it is sent again, never counted as a failure.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Permanent,
    EventSpecific,
    Transient,
    Chain,
}

pub(crate) fn classify(error: &PublishError) -> Failure {
    classify_kind(error.kind())
}

fn classify_kind(kind: PublishErrorKind) -> Failure {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent,
        PublishErrorKind::WrongLastMessageId => Failure::Chain,
        PublishErrorKind::Other | PublishErrorKind::WrongLastSequence => Failure::EventSpecific,
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
        assert_eq!(
            classify_kind(PublishErrorKind::WrongLastMessageId),
            Failure::Chain
        );
    }
}
