//! Failed publishes, written on the row: `retry_count` (the server's
//! verdicts on the event), `next_retry_at`, `last_error`, and
//! `status = 'failed'` for a dead letter. What a failure does is decided in
//! `publish::policy`; this is its SQL.

use crate::publish::policy::{verdict, Failure, Verdict};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// `$2`: seconds until the next attempt (NULL: `next_retry_at` stays); `$4`:
/// 1 when the failure counts, else 0; `$5`: the `retry_count` at which the
/// event is failed (NULL: never). Every SET expression reads the row as it
/// was. Rows not `pending` (or not visible yet) are left alone.
const RECORD_SQL: &str = "UPDATE event_outbox SET retry_count = retry_count + $4, \
       next_retry_at = coalesce(now() + make_interval(secs => $2), next_retry_at), last_error = $3, \
       status = CASE WHEN retry_count + $4 >= $5 THEN 'failed' ELSE status END \
     WHERE id = $1 AND status = 'pending' RETURNING status = 'failed'";

/// Records one failed attempt with its `verdict`. Returns Some(true) when
/// the event is now a dead letter, Some(false) when it stays pending, None
/// when no pending row was found (not visible yet, or settled meanwhile).
pub(crate) async fn record(
    db: &impl GenericClient,
    id: Uuid,
    error: &str,
    verdict: Verdict,
) -> Result<Option<bool>, tokio_postgres::Error> {
    write(db, id, error, verdict, Some(verdict.retry_in)).await
}

/// As [`record`], but the row keeps its `next_retry_at`, so it keeps its
/// place in the sweeper's order (`next_retry_at`, `created_at`, and among
/// equal times a row with a `last_error` first): the sweeper tries it again
/// first, at its next sweep, and nothing behind it overtakes it.
pub(crate) async fn record_in_place(
    db: &impl GenericClient,
    id: Uuid,
    error: &str,
    verdict: Verdict,
) -> Result<Option<bool>, tokio_postgres::Error> {
    write(db, id, error, verdict, None).await
}

async fn write(
    db: &impl GenericClient,
    id: Uuid,
    error: &str,
    verdict: Verdict,
    retry_in: Option<std::time::Duration>,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let counts = i32::from(verdict.counts);
    let dead_at = verdict
        .dead_at
        .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let row = db
        .query_opt(
            RECORD_SQL,
            &[
                &id,
                &retry_in.map(|delay| delay.as_secs_f64()),
                &error,
                &counts,
                &dead_at,
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Records that the row of `id` cannot become a message (`cause`: a NULL
/// the contract has no room for, after a schema change): a dead letter at
/// once, with the reason, logged. Returns as [`record`] does; the stream and
/// the sweeper both fail such a row this way.
pub(crate) async fn record_unpublishable(
    db: &impl GenericClient,
    id: Uuid,
    cause: &(dyn std::fmt::Display + Sync),
) -> Result<Option<bool>, tokio_postgres::Error> {
    let reason = format!("cannot publish: {cause}");
    let dead = record(db, id, &reason, verdict(Failure::Permanent, 0, 0)).await?;
    if dead == Some(true) {
        tracing::warn!(%id, error = %reason, "event failed (dead letter); fix the row and `outbox-tailer requeue` retries it");
    }
    Ok(dead)
}
