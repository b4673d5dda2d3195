//! The replay check: a transaction the stream re-delivers from before the
//! session's start may have been published by an earlier run, maybe longer
//! ago than JetStream's duplicate window. Its rows are looked up before
//! publishing: rows already `published` (or `failed`) are skipped, `pending`
//! ones are published, and rows that no longer exist (deleted by a cleanup
//! job) are skipped once their transaction is provably visible, so a row
//! merely not visible *yet* is never mistaken for a deleted one.

use super::visibility;
use crate::event::OutboxRow;
use pgwire_replication::Lsn;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

const STATUS_SQL: &str = "SELECT id, status = 'pending' FROM event_outbox WHERE id = ANY($1)";

/// How long a replayed transaction is waited for to become visible before
/// its missing rows are published anyway (at least once beats never).
const VISIBILITY_WAIT: Duration = Duration::from_secs(10);

/// What the check decided for a chunk of replayed rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub publish: Vec<OutboxRow>,
    /// Already published or dead-lettered by an earlier run.
    pub settled: usize,
    /// Deleted since; nothing left to publish or mark.
    pub deleted: usize,
}

pub(crate) struct ReplayCheck {
    db: Arc<Client>,
    /// Transactions committed before this position may be replays.
    horizon: Lsn,
    status: Statement,
}

impl ReplayCheck {
    /// A check for transactions that committed before `horizon`.
    pub(crate) async fn prepare(
        db: Arc<Client>,
        horizon: Lsn,
    ) -> Result<ReplayCheck, tokio_postgres::Error> {
        let status = db.prepare(STATUS_SQL).await?;
        Ok(ReplayCheck {
            db,
            horizon,
            status,
        })
    }

    /// Whether a transaction whose commit record is at `commit_lsn` may be a replay.
    pub(crate) fn covers(&self, commit_lsn: Lsn) -> bool {
        commit_lsn <= self.horizon
    }

    /// Splits the rows of transaction `xid` into those to publish and those
    /// to skip.
    pub(crate) async fn check(
        &self,
        xid: u32,
        rows: Vec<OutboxRow>,
    ) -> Result<Replayed, tokio_postgres::Error> {
        let mut outcome = Replayed::default();
        let mut waiting = rows;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let ids: Vec<Uuid> = waiting.iter().map(|row| row.id).collect();
            let pending: HashMap<Uuid, bool> = self
                .db
                .query(&self.status, &[&ids])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let mut missing = Vec::new();
            for row in waiting {
                match pending.get(&row.id) {
                    Some(true) => outcome.publish.push(row),
                    Some(false) => outcome.settled += 1,
                    None => missing.push(row),
                }
            }
            if missing.is_empty() {
                return Ok(outcome);
            }
            if visibility::visible(&*self.db, &[xid]).await?.contains(&xid) {
                outcome.deleted += missing.len();
                return Ok(outcome);
            }
            if started.elapsed() >= VISIBILITY_WAIT {
                outcome.publish.extend(missing);
                return Ok(outcome);
            }
            waiting = missing;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}
