//! The PostgreSQL side: start-up checks and setup (publication, slot), the
//! replication session, pgoutput decoding (pure) and LSN progress.

pub mod pgoutput;
pub mod progress;
pub mod setup;
pub mod source;
