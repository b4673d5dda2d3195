//! Error kinds, split by what the caller does with them, and the one function
//! that decides it ([`Error::action`]).
//!
//! - *Stop*: the operator must fix something (wal_level, privileges, a
//!   decoder/stream disagreement). The process exits non-zero with one line
//!   that says what to do.
//! - *Retry*: the world is briefly broken (a server restarting, a network
//!   blip, the slot held by another tailer). The session is torn down and
//!   started again from the slot's confirmed position, which re-delivers
//!   everything not yet confirmed: nothing is lost, and JetStream's
//!   de-duplication and the replay check drop the repeats.

use crate::replication::pgoutput::DecodeError;
use crate::replication::setup::SetupError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// Not one event's problem (no id to fail it by): the stream cannot go
    /// on past this position until an operator acts.
    #[error("cannot decode the replication stream at {lsn}: {error}; the slot holds WAL from here: restore event_outbox to the contract's schema (`alembic upgrade head`) and restart")]
    DecodeAt {
        lsn: pgwire_replication::Lsn,
        error: DecodeError,
    },
    #[error("replication stream: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("NATS: {0}")]
    Nats(String),
    /// NATS refused the credentials, or TLS to it failed: retrying with the
    /// same settings cannot help.
    #[error("NATS: {0}")]
    NatsRefused(String),
    /// TLS to PostgreSQL failed on certificates or settings, not the network.
    #[error("PostgreSQL TLS: {0}")]
    PostgresTls(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A stage's channel closed: the stage behind it failed (its own error says why).
    #[error("the pipeline stopped")]
    PipelineClosed,
    #[error("{0}")]
    Internal(String),
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a new session after a backoff.
    Retry,
    /// Give up: exit non-zero with the error's line.
    Stop,
}

impl Error {
    pub fn action(&self) -> Action {
        match self {
            // Reported every attempt, and recovered from by itself once the
            // operator drops the invalidated slot.
            Error::Setup(SetupError::SlotLost(_)) => Action::Retry,
            Error::Setup(_)
            | Error::Decode(_)
            | Error::DecodeAt { .. }
            | Error::Internal(_)
            | Error::NatsRefused(_)
            | Error::PostgresTls(_) => Action::Stop,
            Error::Nats(_) | Error::Unavailable(_) | Error::PipelineClosed => Action::Retry,
            Error::Database(error) => match error.code() {
                // Lost privileges or a dropped table will not fix themselves.
                Some(code) if code.code().starts_with("42") => Action::Stop,
                _ => Action::Retry,
            },
            Error::Replication(error) => replication_action(error),
        }
    }

    /// True when another walsender holds the slot (SQLSTATE 55006): a hot
    /// standby waits for it rather than reporting an error.
    pub fn slot_in_use(&self) -> bool {
        matches!(self, Error::Replication(pgwire_replication::PgWireError::Server(text)) if text.contains("55006"))
    }
}

fn replication_action(error: &pgwire_replication::PgWireError) -> Action {
    use pgwire_replication::PgWireError as E;
    match error {
        E::Io(_) | E::Task(_) => Action::Retry,
        E::Auth(_) | E::Tls(_) => Action::Stop,
        // The server's text carries "(SQLSTATE xxxxx)".
        E::Server(text) => {
            let code = text
                .split("SQLSTATE ")
                .nth(1)
                .map(|rest| &rest[..rest.len().min(5)])
                .unwrap_or("");
            match code {
                // Privileges, an unknown or dropped slot/publication, a bad
                // database: an operator must act.
                c if c.starts_with("42") || c.starts_with("28") || c == "3D000" => Action::Stop,
                _ => Action::Retry,
            }
        }
        _ => Action::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;
    use std::sync::Arc;

    #[test]
    fn the_policy_retries_transient_failures_and_stops_on_operator_errors() {
        let io = PgWireError::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let cases = [
            (Error::Replication(io), Action::Retry),
            (
                Error::Replication(PgWireError::Server(
                    "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
                )),
                Action::Retry,
            ),
            (
                Error::Replication(PgWireError::Server(
                    "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
                )),
                Action::Retry,
            ),
            (
                Error::Replication(PgWireError::Server(
                    "must be superuser or replication role (SQLSTATE 42501)".into(),
                )),
                Action::Stop,
            ),
            (
                Error::Replication(PgWireError::Server(
                    "replication slot \"s\" does not exist (SQLSTATE 42704)".into(),
                )),
                Action::Stop,
            ),
            (
                Error::Replication(PgWireError::Auth("password authentication failed".into())),
                Action::Stop,
            ),
            (Error::Nats("timed out".into()), Action::Retry),
            (
                Error::Decode(DecodeError::MissingColumn("payload")),
                Action::Stop,
            ),
        ];
        for (error, action) in cases {
            assert_eq!(error.action(), action, "{error}");
        }
        let active = Error::Replication(PgWireError::Server("slot active (SQLSTATE 55006)".into()));
        assert!(active.slot_in_use());
    }
}
