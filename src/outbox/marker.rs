//! Status writes after the JetStream ack: rows become `published` with
//! `published_at`, one `UPDATE … WHERE id = ANY($1)` per batch, and with
//! `--event-logs` the `event_logs` projection in the same statement.
//!
//! The marker *proves* every id was marked (`RETURNING id`). Logical decoding
//! can hand a transaction over the moment its commit record is flushed, before
//! other sessions see its rows (for as long as a synchronous standby stalls);
//! an UPDATE then matches nothing. A missing row is retried until its
//! transaction is visible (`outbox::visibility`): then it is either marked or
//! truly gone (deleted). The LSN is confirmed only after the whole batch is
//! settled, so a row is never left `pending` behind a confirmed position for
//! the sweeper to publish a second time.

use super::visibility;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_postgres::{GenericClient, Statement};
use uuid::Uuid;

const MARK_SQL: &str = "UPDATE event_outbox SET status = 'published', published_at = now() \
     WHERE id = ANY($1) AND status = 'pending' RETURNING id";

const MARK_AND_LOG_SQL: &str = "WITH marked AS ( \
       UPDATE event_outbox SET status = 'published', published_at = now() \
       WHERE id = ANY($1) AND status = 'pending' \
       RETURNING id, aggregate_type, aggregate_id, user_id, project_id, event_type, payload, created_at, published_at), \
     logged AS ( \
       INSERT INTO event_logs (event_id, aggregate_type, aggregate_id, user_id, project_id, event_type, payload, created_at, published_at) \
       SELECT * FROM marked ON CONFLICT (event_id) DO NOTHING) \
     SELECT id FROM marked";

/// Rows already past `pending`: marked by an earlier run, or dead-lettered.
const SETTLED_SQL: &str = "SELECT id FROM event_outbox WHERE id = ANY($1) AND status <> 'pending'";

/// How long a row whose transaction is unknown (no xid given) is waited for
/// before it counts as gone.
const VISIBILITY_WAIT: Duration = Duration::from_secs(3);
/// A safety net: a row whose transaction is still not visible after this
/// (nothing legitimate takes so long) counts as gone, with a warning.
const INVISIBLE_LIMIT: Duration = Duration::from_secs(600);

/// What one batch came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Marked {
    /// Rows this batch moved to `published`.
    pub marked: usize,
    /// UPDATE attempts beyond the first (the visibility gap at work).
    pub retries: usize,
    /// Rows that no longer exist; their events were published all the same.
    pub vanished: usize,
    /// Whether the batch waited for rows whose transaction was not visible yet.
    pub waited_invisible: bool,
}

pub struct Marker {
    mark: Statement,
    settled: Statement,
}

impl Marker {
    pub async fn prepare(
        db: &impl GenericClient,
        event_logs: bool,
    ) -> Result<Marker, tokio_postgres::Error> {
        let mark = db
            .prepare(if event_logs {
                MARK_AND_LOG_SQL
            } else {
                MARK_SQL
            })
            .await?;
        let settled = db.prepare(SETTLED_SQL).await?;
        Ok(Marker { mark, settled })
    }

    /// Marks every id published, or returns an error (and the caller
    /// confirms nothing). `xids[i]` is the transaction of `ids[i]` (empty:
    /// unknown), to tell a row not visible yet from one that is gone.
    pub async fn mark(
        &self,
        db: &impl GenericClient,
        ids: &[Uuid],
        xids: &[u32],
    ) -> Result<Marked, tokio_postgres::Error> {
        let first = db.query(&self.mark, &[&ids]).await?;
        // Ids in a batch are distinct (primary keys of committed inserts), so
        // equal counts prove every one was marked.
        if first.len() == ids.len() {
            return Ok(Marked {
                marked: ids.len(),
                ..Marked::default()
            });
        }
        let mut outcome = Marked {
            marked: first.len(),
            ..Marked::default()
        };
        let xid_of: HashMap<Uuid, u32> = ids.iter().copied().zip(xids.iter().copied()).collect();
        let done: HashSet<Uuid> = first.iter().map(|row| row.get(0)).collect();
        let mut missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !done.contains(id))
            .copied()
            .collect();
        let started = Instant::now();
        let mut not_yet = visibility::NotYetVisible::default();
        loop {
            // Rows someone else already settled need nothing more.
            let settled = self.settled(db, &missing).await?;
            missing.retain(|id| !settled.contains(id));
            if missing.is_empty() {
                return Ok(outcome);
            }
            // Visible before the UPDATE below: a row it still cannot find
            // is gone, not late.
            let mut xids: Vec<u32> = missing
                .iter()
                .filter_map(|id| xid_of.get(id).copied())
                .collect();
            xids.sort_unstable();
            xids.dedup();
            let visible = visibility::visible(db, &xids).await?;
            let rows = db.query(&self.mark, &[&missing]).await?;
            outcome.marked += rows.len();
            let done: HashSet<Uuid> = rows.iter().map(|row| row.get(0)).collect();
            missing.retain(|id| !done.contains(id));
            let elapsed = started.elapsed();
            let (gone, waiting): (Vec<Uuid>, Vec<Uuid>) =
                missing.iter().partition(|id| match xid_of.get(id) {
                    Some(xid) => visible.contains(xid) || elapsed >= INVISIBLE_LIMIT,
                    None => elapsed >= VISIBILITY_WAIT,
                });
            if !gone.is_empty() {
                // Visible transactions whose rows are not there: deleted since.
                let settled_now = self.settled(db, &gone).await?;
                let vanished = gone.iter().filter(|id| !settled_now.contains(id)).count();
                if vanished > 0 {
                    tracing::warn!(count = vanished, first = %gone[0],
                        "published events whose rows no longer exist; nothing to mark");
                }
                outcome.vanished += vanished;
            }
            missing = waiting;
            if missing.is_empty() {
                return Ok(outcome);
            }
            if !outcome.waited_invisible && elapsed >= VISIBILITY_WAIT {
                outcome.waited_invisible = true;
                tracing::warn!(count = missing.len(), first = %missing[0],
                    "published events whose transactions are not visible yet (a stalled synchronous standby?); waiting to mark them");
            }
            not_yet.pause().await;
            outcome.retries += 1;
        }
    }

    /// Of `ids`, those whose rows are already past `pending`: a replay must
    /// not publish them again.
    pub async fn settled(
        &self,
        db: &impl GenericClient,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
        Ok(db
            .query(&self.settled, &[&ids])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}
