//! The NATS side: subjects (pure), the message for a row (pure), and the
//! JetStream connection and stream, whose turn it is to publish, and the
//! publish window (pure) both publishing paths keep their sends in.

pub(crate) mod chain;
pub(crate) mod jetstream;
pub mod message;
pub(crate) mod policy;
pub(crate) mod subject;
pub(crate) mod turn;
pub(crate) mod window;
