//! outbox-tailer: publishes PostgreSQL transactional-outbox events to NATS
//! JetStream by tailing a logical replication slot. The WAL is the queue.
//!
//! # Layout
//! - [`config`]: the command line and environment (the contract's flags) and
//!   their validation into one [`config::Config`].
//! - [`outbox`]: the `event_outbox` table: the producer API that writes an event
//!   inside the caller's transaction.
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
//! exactly once, in commit order per aggregate. See `CONTRACT.md`.

pub mod chat;
pub mod config;
pub mod outbox;
pub mod testkit;
