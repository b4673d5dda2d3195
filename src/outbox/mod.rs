//! The `event_outbox` table, seen from Rust: the producer API, and the
//! tailer's status writes.

pub mod failures;
pub mod marker;
pub mod producer;
pub mod replay;
pub mod sweeper;

pub use producer::{insert_event, insert_event_with, NewEvent, INSERT_EVENT_SQL};
