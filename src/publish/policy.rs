//! What a failed publish does to its event (docs/contract.md section 3), in
//! one place, pure: the failure's class ([`classify`]) and the verdict for
//! the event ([`verdict`]). The SQL that writes it on the row lives with the
//! outbox code (`outbox::attempts`).
//!
//! | class | counts toward `--max-retries` | dead letter | next attempt |
//! |---|---|---|---|
//! | `Permanent` (no retry can send it) | yes | at once | - |
//! | `Rejected` (the server refused this event) | yes | at the limit | backoff |
//! | `Outage` (NATS, JetStream or the stream unavailable) | no | never | backoff to 5 s |
//! | `Leaderless` (no stream answered: an election, or deleted) | no | never | short backoff |
//! | `Capacity` (a stream or account limit is reached) | no | never | backoff to 5 s, stalls publishing |
//! | `Chain` (the chained predecessor is missing) | no | never | at once, the window again |
//!
//! The first retry of an event goes at once (after an outage the events
//! that failed behind it are sent with it); repeated failures back off.

use crate::backoff::Backoff;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::ErrorCode;
use std::time::Duration;

/// The subject length the tailer sends at most. nats-server reads a publish's
/// control line (`HPUB <subject> <reply> <sizes>`) into 4 KiB by default
/// (`max_control_line`) and drops the connection beyond it, so a longer
/// subject would stall every event behind it.
pub(crate) const MAX_SUBJECT_BYTES: usize = 3840;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Permanent,
    Rejected,
    Outage,
    /// No stream answered the publish (no responders). On a cluster that is
    /// an election: a stream's subjects have no responder while its leader
    /// is elected (4-5 s after a leader's kill -9 on nats-server 2.9.10), and
    /// the publish goes through as soon as one is. Otherwise it was deleted.
    Leaderless,
    Capacity,
    Chain,
}

/// A publish the tailer refused to send: no retry can change it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unsendable {
    #[error("subject is {0} bytes, over the {MAX_SUBJECT_BYTES} a NATS control line takes: shorten aggregate_type or event_type")]
    SubjectTooLong(usize),
    /// The row's own headers break the contract's rules.
    #[error("{0}: fix event_outbox.headers, then `outbox-tailer requeue`")]
    Headers(#[from] outbox_producer::HeaderError),
}

/// The error for a publish the tailer refused to send: no retry changes it.
pub(crate) fn unsendable(why: Unsendable) -> PublishError {
    PublishError::with_source(PublishErrorKind::Other, why)
}

/// The error for a publish the tailer must not send, if `subject` is one.
pub(crate) fn refuse(subject: &str) -> Option<PublishError> {
    (subject.len() > MAX_SUBJECT_BYTES)
        .then(|| unsendable(Unsendable::SubjectTooLong(subject.len())))
}

pub(crate) fn classify(error: &PublishError) -> Failure {
    let source = std::error::Error::source(error);
    if source.is_some_and(|s| s.downcast_ref::<Unsendable>().is_some()) {
        return Failure::Permanent;
    }
    let server = source.and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
    classify_kind(error.kind(), server.map(|e| (e.code(), e.error_code())))
}

/// True when the client refused the publish before sending it (its payload
/// or subject is too large): nothing reached the stream, so the events
/// behind it need not wait for it.
pub(crate) fn never_sent(error: &PublishError) -> bool {
    error.kind() == PublishErrorKind::MaxPayloadExceeded
        || std::error::Error::source(error)
            .is_some_and(|s| s.downcast_ref::<Unsendable>().is_some())
}

/// `server`: the JetStream error's HTTP-like code and its `err_code`, when
/// the server answered with one.
fn classify_kind(kind: PublishErrorKind, server: Option<(usize, ErrorCode)>) -> Failure {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent,
        PublishErrorKind::WrongLastMessageId => Failure::Chain,
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => Failure::Outage,
        PublishErrorKind::StreamNotFound => Failure::Leaderless,
        PublishErrorKind::WrongLastSequence => Failure::Rejected,
        PublishErrorKind::Other => match server {
            Some((_, code)) if is_capacity(code) => Failure::Capacity,
            Some((_, ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)) => Failure::Permanent,
            // The cluster, the stream's leader or its storage is briefly
            // unavailable (leader election, stream offline): the server's
            // 5xx, never a verdict on the event.
            Some((_, ErrorCode::CLUSTER_NOT_AVAILABLE | ErrorCode::JETSTREAM_NOT_ENABLED))
            | Some((_, ErrorCode::CLUSTER_NOT_LEADER | ErrorCode::RAFT_GENERAL))
            | Some((500.., _)) => Failure::Outage,
            Some(_) => Failure::Rejected,
            // Not the server's verdict on this event (a garbled answer).
            None => Failure::Outage,
        },
    }
}

/// Stream, account and server limits: the stream is full (discard `new`),
/// storage or memory is exhausted. Lifted by the operator, not by retrying
/// sooner; no event is at fault.
fn is_capacity(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::STREAM_STORE_FAILED
            | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | ErrorCode::MEMORY_RESOURCES_EXCEEDED
            | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::STREAM_LIMITS
    )
}

/// What one failure does to its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The failure increments `retry_count`: only the server's verdicts on
    /// the event count toward `--max-retries`.
    pub(crate) counts: bool,
    /// The event becomes `failed` once `retry_count` reaches this (0: at
    /// once); `None`: never.
    pub(crate) dead_at: Option<u32>,
    /// When to try again (written as `next_retry_at`).
    pub(crate) retry_in: Duration,
}

/// The verdict for `failure` of an event that already failed `attempts`
/// times in this run.
pub(crate) fn verdict(failure: Failure, attempts: u32, max_retries: u32) -> Verdict {
    let retry_in = match (failure, attempts) {
        (Failure::Chain, _) | (_, 0) => Duration::ZERO,
        // Polled closely: the election ends within seconds, and each poll
        // costs one publish answered at once by "no responders".
        (Failure::Leaderless, n) => Backoff::ELECTION.delay(n - 1),
        // Not the event's fault: followed closely, so publishing resumes
        // within seconds of the end of an incident of any length.
        (Failure::Outage | Failure::Capacity, n) => Backoff::STALL.delay(n - 1),
        (_, n) => Backoff::PUBLISH.delay(n - 1),
    };
    let (counts, dead_at) = match failure {
        Failure::Permanent => (true, Some(0)),
        Failure::Rejected => (true, Some(max_retries)),
        Failure::Outage | Failure::Leaderless | Failure::Capacity | Failure::Chain => (false, None),
    };
    Verdict {
        counts,
        dead_at,
        retry_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_class() {
        use PublishErrorKind as K;
        type Case = (K, Option<(usize, ErrorCode)>, Failure);
        let cases: &[Case] = &[
            (K::TimedOut, None, Failure::Outage),
            (K::BrokenPipe, None, Failure::Outage),
            (K::StreamNotFound, None, Failure::Leaderless),
            (K::MaxAckPending, None, Failure::Outage),
            (K::MaxPayloadExceeded, None, Failure::Permanent),
            (K::WrongLastMessageId, None, Failure::Chain),
            (K::WrongLastSequence, None, Failure::Rejected),
            (
                K::Other,
                Some((503, ErrorCode::STREAM_STORE_FAILED)),
                Failure::Capacity,
            ),
            (
                K::Other,
                Some((400, ErrorCode::STORAGE_RESOURCES_EXCEEDED)),
                Failure::Capacity,
            ),
            (
                K::Other,
                Some((400, ErrorCode::ACCOUNT_RESOURCES_EXCEEDED)),
                Failure::Capacity,
            ),
            (
                K::Other,
                Some((503, ErrorCode::INSUFFICIENT_RESOURCES)),
                Failure::Capacity,
            ),
            (
                K::Other,
                Some((500, ErrorCode::MEMORY_RESOURCES_EXCEEDED)),
                Failure::Capacity,
            ),
            (
                K::Other,
                Some((400, ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)),
                Failure::Permanent,
            ),
            (
                K::Other,
                Some((503, ErrorCode::CLUSTER_NOT_AVAILABLE)),
                Failure::Outage,
            ),
            (
                K::Other,
                Some((503, ErrorCode::JETSTREAM_NOT_ENABLED)),
                Failure::Outage,
            ),
            (K::Other, Some((503, ErrorCode(1))), Failure::Outage),
            (
                K::Other,
                Some((400, ErrorCode::BAD_REQUEST)),
                Failure::Rejected,
            ),
            (K::Other, None, Failure::Outage),
        ];
        for (kind, server, want) in cases {
            assert_eq!(classify_kind(*kind, *server), *want, "{kind:?} {server:?}");
        }
    }

    #[test]
    fn a_subject_the_tailer_will_not_send_is_permanent() {
        assert!(refuse(&"x".repeat(MAX_SUBJECT_BYTES)).is_none());
        let error = refuse(&"x".repeat(5000)).unwrap();
        assert_eq!(classify(&error), Failure::Permanent);
        assert!(never_sent(&error));
        assert!(
            error.to_string().contains("5000 bytes") || format!("{:?}", error).contains("5000")
        );
    }

    #[test]
    fn only_the_servers_verdicts_on_the_event_count_and_outages_never_kill() {
        let max = 10;
        // (class, attempts so far) -> (counts, dead_at, at once?)
        let cases = [
            (Failure::Permanent, 0, true, Some(0), true),
            (Failure::Rejected, 0, true, Some(max), true),
            (Failure::Rejected, 3, true, Some(max), false),
            (Failure::Outage, 0, false, None, true),
            (Failure::Outage, 500, false, None, false),
            (Failure::Capacity, 0, false, None, true),
            (Failure::Capacity, 40, false, None, false),
            (Failure::Chain, 7, false, None, true),
            (Failure::Leaderless, 0, false, None, true),
            (Failure::Leaderless, 30, false, None, false),
        ];
        for (failure, attempts, counts, dead_at, at_once) in cases {
            let v = verdict(failure, attempts, max);
            assert_eq!(
                (v.counts, v.dead_at),
                (counts, dead_at),
                "{failure:?} after {attempts}"
            );
            assert_eq!(
                v.retry_in.is_zero(),
                at_once,
                "{failure:?} after {attempts}: {v:?}"
            );
            assert!(v.retry_in <= Duration::from_secs(30), "capped: {v:?}");
            if matches!(failure, Failure::Outage | Failure::Capacity) {
                assert!(
                    v.retry_in <= Duration::from_secs(5),
                    "{failure:?} after {attempts}: resumes within seconds: {v:?}"
                );
            }
        }
        for attempts in 1..40 {
            let v = verdict(Failure::Leaderless, attempts, max);
            assert!(
                v.retry_in <= Duration::from_secs(1),
                "an election is polled at least every second: {v:?}"
            );
        }
    }
}
