//! The PostgreSQL side: start-up checks and setup (publication, slot), the
//! replication session, pgoutput decoding (pure) and LSN progress.

pub(crate) mod pgoutput;
pub(crate) mod progress;
pub(crate) mod setup;
pub(crate) mod source;
