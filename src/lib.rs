//! outbox-tailer: publishes PostgreSQL transactional-outbox events to NATS
//! JetStream by tailing a logical replication slot. The WAL is the queue.
//!
//! # Layout
//! - [`app`]: `run` (the session loop, reconnecting after failures) and `setup`.
//! - [`pipeline`]: one replication session: reader → publisher → marker tasks.
//! - [`replication`]: start-up checks, publication and slot, the replication
//!   stream, pgoutput decoding (pure), LSN progress.
//! - [`publish`]: subjects and messages (pure), failure classes, the JetStream
//!   connection and stream, and whose turn it is to publish (stream or sweeper).
//! - [`error`]: error kinds and the one retry policy; [`backoff`]; [`shutdown`].
//! - [`metrics`]: every exported metric; [`http`]: /metrics, /healthz, /readyz;
//!   [`stats`]: the outbox's state from the database (gauges and `status`).
//! - [`config`]: the command line and environment (the contract's flags) and
//!   their validation into one [`config::Config`].
//! - [`outbox`]: the `event_outbox` table: the producer API that writes an event
//!   inside the caller's transaction, and the batched status writes.
//! - [`chat`]: the reference chat endpoint: posts a message and its
//!   `message.created` event in one transaction (the demo's and benchmarks' load).
//! - [`testkit`]: throwaway PostgreSQL and nats-server processes for tests, the
//!   demo and the benchmarks.
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
//! previous with `Nats-Expected-Last-Msg-Id`). See `CONTRACT.md`.

pub mod app;
pub mod backoff;
pub mod chat;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod publish;
pub mod replication;
pub mod shutdown;
pub mod stats;
pub mod testkit;
