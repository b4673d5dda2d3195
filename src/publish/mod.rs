//! The NATS side: subjects (pure), the message for a row (pure), and the
//! JetStream connection and stream, and whose turn it is to publish.

pub(crate) mod chain;
pub(crate) mod jetstream;
pub mod message;
pub(crate) mod policy;
pub(crate) mod subject;
pub(crate) mod turn;
