//! The PostgreSQL side: start-up checks and setup (publication, slot), the
//! servers of a multi-host URL, the replication session, which primary it
//! streams from (timeline), pgoutput decoding (pure) and LSN progress.

pub(crate) mod hosts;
pub(crate) mod pgoutput;
pub(crate) mod progress;
pub(crate) mod setup;
pub(crate) mod source;
pub(crate) mod timeline;
