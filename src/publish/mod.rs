//! The NATS side: subjects (pure), the message for a row (pure), and the
//! JetStream connection and stream.

pub mod failure;
pub mod jetstream;
pub mod message;
pub mod subject;
