//! outbox-tailer: publishes PostgreSQL transactional-outbox events to NATS
//! JetStream by tailing a logical replication slot. The WAL is the queue.
//!
//! # Layout
//! - [`app`]: `run` (the session loop, reconnecting after failures) and `setup`.
//! - [`pipeline`]: one replication session: reader → publisher → marker tasks.
//! - [`replication`]: start-up checks, publication and slot, the servers of a
//!   multi-host URL, the replication stream (on the server the query
//!   connection reached), which primary it is (timeline), pgoutput decoding
//!   (pure), LSN progress.
//! - [`publish`]: subjects and messages (pure), failure classes, chained
//!   publishing with go-back-N (the stream's and the sweeper's), the JetStream
//!   connection and stream, and whose turn it is to publish (stream or sweeper).
//! - [`db`]: query connections that notice a silent server (keepalives,
//!   `TCP_USER_TIMEOUT`, a watchdog on unanswered requests).
//! - [`error`]: error kinds and the one retry policy; [`backoff`]; [`shutdown`];
//!   [`supervise`]: background tasks that must not die silently.
//! - [`metrics`]: every exported metric; [`http`]: /metrics, /healthz, /readyz;
//!   [`stats`]: the outbox's state from the database (gauges and `status`).
//! - [`config`]: the command line and environment (the contract's flags) and
//!   their validation into one [`config::Config`].
//! - [`outbox`]: the `event_outbox` table: batched status writes, failed
//!   attempts, the replay check and the catch-up sweeper.
//! - [`tls`]: TLS on one crypto provider: libpq's `sslmode` for both
//!   PostgreSQL connections, verifiers, readable handshake errors.
//! - [`event`]: the one domain type, an outbox row; [`pgtime`]: PostgreSQL's
//!   time unit.
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
mod stats;
mod supervise;

/// Internals the workspace's integration tests and the benchmark's polling
/// relay use. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::event::{row_from, ROW_COLUMNS};
    pub use crate::outbox::marker::Marker;
    pub use crate::outbox::sweeper::PROBE_SQL;
    pub use crate::publish::message::{self, Message};
    pub use crate::publish::subject::subject;
    pub use crate::stats::{FAILED_SQL, PENDING_SQL};
}
