//! The PostgreSQL side of the stream: start-up checks and setup
//! (publication, slot), the replication session, which primary it streams
//! from (timeline), pgoutput decoding (pure) and LSN progress. (Query
//! connections and the servers of a multi-host URL are `db`'s.)

pub(crate) mod bridge;
pub(crate) mod pgoutput;
pub(crate) mod progress;
pub(crate) mod setup;
pub(crate) mod source;
pub(crate) mod timeline;
