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

use crate::publish::jetstream::NatsError;
use crate::replication::pgoutput::DecodeError;
use crate::replication::setup::SetupError;
use crate::tls::postgres::PgTlsError;

/// Every error of the service, each variant with its typed cause, so that
/// [`Error::action`] decides by what happened, never by which wrapper a
/// call site picked.
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
    Nats(#[from] NatsError),
    /// The replication connection's own TLS (the bridge, see
    /// `tls::postgres`): the network's failure, or the certificates'.
    #[error("replication connection to {server}: {error}")]
    ReplicationTls {
        server: String,
        #[source]
        error: PgTlsError,
    },
    #[error(transparent)]
    Transient(#[from] Transient),
    /// A stage's channel closed: the stage behind it failed (its own error says why).
    #[error("the pipeline stopped")]
    PipelineClosed,
    #[error(transparent)]
    Internal(#[from] Internal),
    /// `prune`: the function is missing, the role may not run it, or the
    /// database failed.
    #[error(transparent)]
    Prune(#[from] crate::outbox::retention::PruneError),
}

/// Each cause of a stream that would not open, as the error kind it is.
impl From<crate::replication::source::OpenError> for Error {
    fn from(error: crate::replication::source::OpenError) -> Error {
        use crate::replication::source::OpenError;
        match error {
            OpenError::Tls { server, error } => Error::ReplicationTls { server, error },
            OpenError::PrimaryChanging { first, second } => {
                Transient::PrimaryChanging { first, second }.into()
            }
            OpenError::Stream(error) => Error::Replication(error),
        }
    }
}

/// No server of the URL accepted: a set-up failure (retried in a session).
impl From<crate::db::Unreachable> for Error {
    fn from(error: crate::db::Unreachable) -> Error {
        Error::Setup(error.into())
    }
}

/// The world is briefly not as a session needs it; a new session fixes it.
#[derive(Debug, thiserror::Error)]
pub enum Transient {
    #[error("nothing from PostgreSQL on the replication connection for {0:?} (--replication-timeout), not even its keepalive: the connection went silent (a NAT, a load balancer or the network dropped it without closing); starting a new session")]
    ReplicationSilent(std::time::Duration),
    #[error("the server ended the replication stream")]
    StreamEnded,
    /// Two connections of one session reached different servers.
    #[error("{first} and {second} are different servers: the primary is changing")]
    PrimaryChanging { first: String, second: String },
    /// A statement on a connection shared with pipelined ones, unanswered
    /// (see `db::watched`: a read for the other answers hides its silence).
    #[error("no answer from PostgreSQL to {what} for {after:?} (--statement-timeout): the connection went silent; starting a new session")]
    NoAnswer {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error("no stream has answered for {id} for {after:?} (deleted?): starting a new session")]
    StreamGone {
        id: uuid::Uuid,
        after: std::time::Duration,
    },
}

/// A bug or a broken invariant: the process exits, and its supervisor
/// (the container) restarts it.
#[derive(Debug, thiserror::Error)]
pub enum Internal {
    /// A background task returned before shutdown (`supervise`).
    #[error("the {0} stopped unexpectedly")]
    TaskStopped(&'static str),
    #[error("a background task panicked: {0}")]
    TaskPanicked(String),
    #[error("a background task was cancelled: {0}")]
    TaskCancelled(#[source] tokio::task::JoinError),
    #[error("the {0} stopped unexpectedly")]
    StageStopped(&'static str),
    #[error("the {stage} failed: {error}")]
    StageFailed {
        stage: &'static str,
        #[source]
        error: tokio::task::JoinError,
    },
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
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
            Error::Setup(error) => setup_action(error),
            Error::Decode(_) | Error::DecodeAt { .. } | Error::Internal(_) | Error::Prune(_) => {
                Action::Stop
            }
            Error::Transient(_) | Error::PipelineClosed => Action::Retry,
            Error::Database(error) => match error.code() {
                // Lost privileges or a dropped table will not fix themselves.
                Some(code) if code.code().starts_with("42") => Action::Stop,
                _ => Action::Retry,
            },
            Error::Replication(error) => replication_action(error),
            Error::Nats(error) => {
                if error.refused() {
                    Action::Stop
                } else {
                    Action::Retry
                }
            }
            Error::ReplicationTls { error, .. } => match error {
                PgTlsError::Io(_) => Action::Retry,
                _ => Action::Stop,
            },
        }
    }

    /// True when another walsender holds the slot (SQLSTATE 55006): a hot
    /// standby waits for it rather than reporting an error.
    pub fn slot_in_use(&self) -> bool {
        matches!(self, Error::Replication(pgwire_replication::PgWireError::Server(text)) if text.contains("55006"))
    }
}

/// Set-up during a session: what the operator must fix stops, what the
/// network or a restarting server did is retried.
fn setup_action(error: &SetupError) -> Action {
    match error {
        // Reported every attempt, and recovered from by itself once the
        // operator drops the invalidated slot.
        SetupError::SlotLost(_) | SetupError::Unreachable(_) => Action::Retry,
        SetupError::Query(error) | SetupError::Slot { error, .. } if transient(error) => {
            Action::Retry
        }
        _ => Action::Stop,
    }
}

/// A failure of the connection or of the server's state, not of the
/// request: no SQLSTATE (the connection closed, timed out, was reset), a
/// connection exception (class 08), the server shutting down or starting
/// (57P01-57P03), too many connections (53300), or a conflict to run again
/// (40001, 40P01).
pub(crate) fn transient(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return true;
    };
    let code = code.code();
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
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
            (Error::Transient(Transient::StreamEnded), Action::Retry),
            (
                Error::Decode(DecodeError::MissingColumn("payload")),
                Action::Stop,
            ),
        ];
        for (error, action) in cases {
            assert_eq!(error.action(), action, "{error}");
        }
    }

    #[test]
    fn the_policy_reads_the_typed_cause_not_the_wrapper() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let cases = [
            // Set-up during a session: the network's failures are retried,
            // the operator's are not.
            (
                Error::Setup(SetupError::Unreachable(crate::db::Unreachable {
                    target: "db:5432".into(),
                    reason: "connection refused".into(),
                })),
                Action::Retry,
            ),
            (
                Error::Setup(SetupError::SlotLost("s".into())),
                Action::Retry,
            ),
            (
                Error::Setup(SetupError::WalLevel("replica".into())),
                Action::Stop,
            ),
            (Error::Setup(SetupError::NoOutboxTable), Action::Stop),
            // The replication connection's TLS: the network, or the settings.
            (
                Error::ReplicationTls {
                    server: "db:5432".into(),
                    error: PgTlsError::Io(io()),
                },
                Action::Retry,
            ),
            (
                Error::ReplicationTls {
                    server: "db:5432".into(),
                    error: PgTlsError::NotOffered("require"),
                },
                Action::Stop,
            ),
            (
                Error::Transient(Transient::ReplicationSilent(
                    std::time::Duration::from_secs(20),
                )),
                Action::Retry,
            ),
            (
                Error::Internal(Internal::TaskStopped("sweeper")),
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
