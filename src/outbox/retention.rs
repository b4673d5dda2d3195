//! Retention: deletes `published` rows published longer ago than a
//! duration, never `pending` or `failed` ones. Through `outbox_prune()`
//! (Alembic revision 0004, `sql/schema.sql`): batches of [`BATCH`] rows,
//! oldest first, each its own short statement over the partial index
//! `ix_event_outbox_published_at`, skipping rows another session holds. The
//! function is SECURITY DEFINER, so the tailer's role needs no DELETE.

use crate::metrics::Metrics;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Rows per statement: each holds its row locks for a few milliseconds.
pub(crate) const BATCH: i32 = 1000;
/// A breath between batches, so a long prune yields to the product's writes.
const PAUSE: Duration = Duration::from_millis(5);

const PRUNE_SQL: &str = "SELECT outbox_prune(make_interval(secs => $1), $2)";

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("outbox_prune() is missing: run `alembic upgrade head` (revision 0004_outbox_retention), or psql -f sql/schema.sql")]
    Missing,
    #[error("the role may not prune: GRANT EXECUTE ON FUNCTION outbox_prune(interval, integer) TO <role> (sql/roles.sql)")]
    NotAllowed,
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// Deletes every published row published more than `older_than` ago, in
/// batches; returns how many. Counted in `outbox_pruned_events_total`.
pub(crate) async fn prune(
    db: &Client,
    older_than: Duration,
    metrics: &Metrics,
) -> Result<u64, PruneError> {
    let statement = db.prepare(PRUNE_SQL).await.map_err(classify)?;
    let mut total = 0u64;
    loop {
        let deleted: i32 = db
            .query_one(&statement, &[&older_than.as_secs_f64(), &BATCH])
            .await
            .map_err(classify)?
            .get(0);
        let deleted = u64::try_from(deleted).unwrap_or(0);
        total += deleted;
        metrics.pruned.inc_by(deleted);
        if deleted < BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

fn classify(error: tokio_postgres::Error) -> PruneError {
    match error.code() {
        Some(code) if *code == SqlState::UNDEFINED_FUNCTION => PruneError::Missing,
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => PruneError::NotAllowed,
        _ => PruneError::Database(error),
    }
}

/// How often `--retention` prunes: a tenth of the retention, between 1 s
/// and 10 minutes (a week's retention prunes every 10 minutes).
pub(crate) fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_the_retention_within_bounds() {
        assert_eq!(
            interval(Duration::from_secs(7 * 86400)),
            Duration::from_secs(600)
        );
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_secs(1));
    }
}
