//! The NATS side: subjects (pure), the message for a row (pure), and the
//! JetStream connection and stream, and whose turn it is to publish.

pub mod failure;
pub mod jetstream;
pub mod message;
pub mod subject;
pub mod turn;
