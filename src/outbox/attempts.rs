//! Failed publishes, written on the row: `retry_count`, `next_retry_at`,
//! `last_error`, and `status = 'failed'` for a dead letter.

use crate::publish::failure::Failure;
use std::time::Duration;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// `$4` true: the failure makes the event `failed` once `retry_count`
/// reaches `$5`. Rows not `pending` (or not visible yet) are left alone.
const RECORD_SQL: &str = "UPDATE event_outbox SET retry_count = retry_count + 1, \
       next_retry_at = now() + make_interval(secs => $2), last_error = $3, \
       status = CASE WHEN $4 AND retry_count + 1 >= $5 THEN 'failed' ELSE status END \
     WHERE id = $1 AND status = 'pending' RETURNING status = 'failed'";

/// Records one failed attempt of class `failure` (docs/contract.md section 3):
/// only the server's rejections count toward `max_retries`, a payload no
/// retry can send fails at once, and failures of NATS as a whole never fail
/// an event. Returns Some(true) when the event is now a dead letter,
/// Some(false) when it stays pending, None when no pending row was found
/// (not visible yet, or settled meanwhile).
pub(crate) async fn record(
    db: &impl GenericClient,
    id: Uuid,
    error: &str,
    retry_in: Duration,
    failure: Failure,
    max_retries: u32,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let counts = matches!(failure, Failure::Permanent | Failure::EventSpecific);
    let limit = match failure {
        Failure::Permanent => 0,
        _ => i32::try_from(max_retries).unwrap_or(i32::MAX),
    };
    let row = db
        .query_opt(
            RECORD_SQL,
            &[&id, &retry_in.as_secs_f64(), &error, &counts, &limit],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
