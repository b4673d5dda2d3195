//! The domain type every component shares: one committed `event_outbox` row,
//! and how it is read back from the table. The pgoutput decoder and the
//! sweeper produce it; publishing, marking and the replay check consume it,
//! so the broker side never depends on the WAL side.

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

/// The columns [`row_from`] reads, in its order.
pub const ROW_COLUMNS: &str =
    "id, aggregate_type, aggregate_id, user_id::text, project_id::text, event_type, \
     payload::text, \
     coalesce(to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00', created_at::text)";

/// An outbox row read with [`ROW_COLUMNS`], as the stream would deliver it
/// (the payload as PostgreSQL renders the jsonb, the time in ISO UTC).
pub fn row_from(r: &tokio_postgres::Row) -> Result<OutboxRow, tokio_postgres::Error> {
    Ok(OutboxRow {
        id: r.try_get(0)?,
        aggregate_type: r.try_get(1)?,
        aggregate_id: r.try_get(2)?,
        user_id: r.try_get(3)?,
        project_id: r.try_get(4)?,
        event_type: r.try_get(5)?,
        payload: bytes::Bytes::from(r.try_get::<_, String>(6)?),
        // `infinity` has no to_char rendering: its own text, never a NULL.
        created_at: r.try_get::<_, Option<String>>(7)?.unwrap_or_default(),
    })
}
