//! The domain type every component shares: one committed `event_outbox` row.
//! The pgoutput decoder and the sweeper produce it; publishing, marking and
//! the replay check consume it, so the broker side never depends on the WAL side.

use bytes::Bytes;
use uuid::Uuid;

/// The outbox table's name; its schema does not matter.
pub(crate) const OUTBOX_TABLE: &str = "event_outbox";

/// One committed `event_outbox` insert: from the replication stream, or read
/// back from the table by the catch-up sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub event_type: String,
    /// The jsonb exactly as PostgreSQL renders it (no re-encoding).
    pub payload: Bytes,
    /// `timestamptz` text in the session's DateStyle (ISO, UTC: see
    /// `replication::source`).
    pub created_at: String,
}
