//! The `event_outbox` table, seen from the tailer: status writes (the marker),
//! failed attempts, the replay check, the catch-up sweeper and its boundary
//! with the stream, and retention. (Writing events
//! is the `outbox-producer` crate's.)

pub(crate) mod attempts;
pub(crate) mod boundary;
pub(crate) mod marker;
pub(crate) mod replay;
pub(crate) mod retention;
pub(crate) mod sweeper;
pub(crate) mod visibility;
