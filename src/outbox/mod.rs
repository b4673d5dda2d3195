//! The `event_outbox` table, seen from Rust.

pub mod producer;

pub use producer::{insert_event, insert_event_with, NewEvent, INSERT_EVENT_SQL};
