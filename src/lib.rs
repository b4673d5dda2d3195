//! outbox-tailer: publishes PostgreSQL transactional-outbox events to NATS
//! JetStream by tailing a logical replication slot. The WAL is the queue.
//!
//! # Layout
//! Layers, lowest first; a module uses only the layers below its own
//! (`tests/it/layering.rs` checks it).
//! 1. [`backoff`] (pure policies), [`event`] (the one domain type, an
//!    outbox row, and its column list), [`pgtime`] (PostgreSQL's time, unit
//!    and text), [`metrics`] (every exported metric), [`shutdown`].
//! 2. [`tls`]: one crypto provider, verifiers, libpq's `sslmode`.
//! 3. [`config`]: the command line and environment (the contract's flags),
//!    NATS settings, redaction, validated into one [`config::Config`].
//! 4. [`db`]: query connections to the URL's servers, watched for silence.
//! 5. [`replication`]: start-up checks, publication and slot, the stream and
//!    its TLS bridge, which primary it is (timeline), pgoutput decoding
//!    (pure), progress (received and confirmed positions).
//!    [`publish`]: subjects and messages (pure), failure classes, the publish
//!    window (pure), chained publishing with go-back-N (the stream's and the
//!    sweeper's), the JetStream connection and stream, whose turn it is.
//! 6. [`outbox`]: the `event_outbox` table: batched status writes, failed
//!    attempts, visibility, the replay check, the catch-up sweeper and its
//!    boundary with the stream, retention.
//! 7. [`error`]: every error with its typed cause, and the one retry policy.
//! 8. [`pipeline`]: one replication session (reader → publisher → marker);
//!    [`stats`] (the outbox's state, `status`); [`http`] (/metrics, /healthz,
//!    /readyz); [`supervise`] (background tasks that must not die silently).
//! 9. [`app`]: `run` (the session loop, reconnecting after failures), `setup`
//!    and the other subcommands.
//!
//! Outside this crate, in the workspace: `outbox-producer` (write an event
//! inside your own transaction), `outbox-testkit` (throwaway servers for
//! tests), `outbox-chat` (the reference chat endpoint, the demo, the benchmark).
//!
//! # Data flow
//! ```text
//!  producer tx ──► messages + event_outbox ──► WAL ──► slot (pgoutput, inserts only)
//!                                                        │
//!        confirm LSN ◄── mark published (batched) ◄── JetStream ack ◄── publish
//! ```
//!
//! # Guarantee
//! An event rolled back never appears; a committed event appears at least
//! once and, within the stream's duplicate window (`Nats-Msg-Id` = event id),
//! exactly once, in commit order per aggregate (each publish chained to the
//! previous with `Nats-Expected-Last-Msg-Id`). See `docs/contract.md`.

#![forbid(unsafe_code)]

// The library's API is what the binary needs: flags and config, the
// subcommands, and shutdown. Everything else is crate-private.
pub mod app;
pub mod config;
pub mod shutdown;
pub mod tls;

mod backoff;
mod db;
mod error;
mod event;
pub mod http;
mod metrics;
mod outbox;
mod pgtime;
mod pipeline;
mod publish;
mod replication;
pub mod republish;
mod stats;
mod supervise;

/// Internals the workspace's integration tests and the benchmark's polling
/// relay use. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::event::{row_from, ROW_COLUMNS, ROW_COLUMNS_WITH_HEADERS};
    pub use crate::outbox::marker::Marker;
    pub use crate::outbox::sweeper::PROBE_SQL;
    pub use crate::publish::message::{self, Message};
    pub use crate::publish::subject::subject;
    pub use crate::stats::{FAILED_SQL, PENDING_SQL};
}
