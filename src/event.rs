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
    /// The event's own message headers as stored (a JSON object of strings),
    /// unchecked; None when the row has none or the table no such column.
    pub headers: Option<String>,
}

impl OutboxRow {
    /// The W3C trace id of the row's `traceparent` header, if it has a
    /// well-formed one: the tailer's own log lines about the event carry it,
    /// so they join the producer's and the subscriber's trace.
    pub(crate) fn trace_id(&self) -> Option<String> {
        let headers: serde_json::Value = serde_json::from_str(self.headers.as_deref()?).ok()?;
        let parent = headers.get("traceparent")?.as_str()?;
        let id = parent.split('-').nth(1)?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    }
}

/// The columns [`row_from`] reads, in its order (the text of each as the
/// stream would deliver it: `created_at` as PostgreSQL writes it in ISO and
/// UTC, the fraction without trailing zeros, whatever this session's
/// DateStyle and TimeZone; `infinity` as itself).
macro_rules! row_columns {
    () => {
        "id, aggregate_type, aggregate_id, user_id::text, project_id::text, event_type, \
         payload::text, \
         coalesce(rtrim(rtrim(to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), '0'), '.') \
                  || '+00', created_at::text)"
    };
}
/// The columns for a table without the `headers` column.
pub const ROW_COLUMNS: &str = row_columns!();
/// [`ROW_COLUMNS`] and `headers`, for a table with the column.
pub const ROW_COLUMNS_WITH_HEADERS: &str = concat!(row_columns!(), ", headers::text");

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
        // Read with [`ROW_COLUMNS_WITH_HEADERS`]: its ninth column.
        headers: match r.columns().get(8) {
            Some(column) if column.name() == "headers" => r.try_get(8)?,
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_comes_from_a_well_formed_traceparent() {
        let row = |headers: Option<&str>| OutboxRow {
            id: Uuid::nil(),
            aggregate_type: "chat".into(),
            aggregate_id: "1".into(),
            user_id: None,
            project_id: None,
            event_type: "x".into(),
            payload: Bytes::new(),
            created_at: String::new(),
            headers: headers.map(Into::into),
        };
        let parent =
            r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        assert_eq!(
            row(Some(parent)).trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(row(None).trace_id(), None);
        assert_eq!(row(Some(r#"{"traceparent": "nonsense"}"#)).trace_id(), None);
        assert_eq!(row(Some(r#"{"tenant": "a"}"#)).trace_id(), None);
    }
}
