//! The replay check: a transaction the stream re-delivers from before the
//! session's start may have been published by an earlier run, maybe longer
//! ago than JetStream's duplicate window. Its rows are looked up before
//! publishing: rows already `published` (or `failed`) are skipped, `pending`
//! ones are published, and rows that no longer exist (deleted by a cleanup
//! job) are skipped once their transaction is provably visible, so a row
//! merely not visible *yet* is never mistaken for a deleted one. The reader
//! checks the rows of many transactions at once (a catch-up after downtime
//! is mostly small transactions).

use super::visibility;
use pgwire_replication::Lsn;
use std::collections::{HashMap, HashSet};
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
    /// Rows not to publish: settled or deleted.
    pub skip: HashSet<Uuid>,
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

    /// Decides, for rows of any number of transactions (`(id, xid)`), which
    /// to skip: one query for them all while every row is found (the usual
    /// case), more only for rows not visible yet.
    pub(crate) async fn check(
        &self,
        rows: &[(Uuid, u32)],
    ) -> Result<Replayed, tokio_postgres::Error> {
        let mut outcome = Replayed::default();
        let mut missing = self.look_up(rows, &mut outcome).await?;
        let started = Instant::now();
        let mut not_yet = visibility::NotYetVisible::default();
        while !missing.is_empty() {
            // Visible before the look-up below: a row it still cannot find
            // is gone, not late.
            let mut xids: Vec<u32> = missing.iter().map(|&(_, xid)| xid).collect();
            xids.sort_unstable();
            xids.dedup();
            let visible = visibility::visible(&*self.db, &xids).await?;
            let (gone, late): (Vec<_>, Vec<_>) = self
                .look_up(&missing, &mut outcome)
                .await?
                .into_iter()
                .partition(|(_, xid)| visible.contains(xid));
            outcome.deleted += gone.len();
            outcome.skip.extend(gone.iter().map(|&(id, _)| id));
            // Published anyway after the wait: at least once beats never.
            if late.is_empty() || started.elapsed() >= VISIBILITY_WAIT {
                break;
            }
            missing = late;
            not_yet.pause().await;
        }
        Ok(outcome)
    }

    /// Looks `rows` up: settled ones go to `outcome`, missing ones are
    /// returned, pending ones are to be published.
    async fn look_up(
        &self,
        rows: &[(Uuid, u32)],
        outcome: &mut Replayed,
    ) -> Result<Vec<(Uuid, u32)>, tokio_postgres::Error> {
        let ids: Vec<Uuid> = rows.iter().map(|&(id, _)| id).collect();
        let pending: HashMap<Uuid, bool> = self
            .db
            .query(&self.status, &[&ids])
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let mut missing = Vec::new();
        for &(id, xid) in rows {
            match pending.get(&id) {
                Some(true) => {}
                Some(false) => {
                    outcome.settled += 1;
                    outcome.skip.insert(id);
                }
                None => missing.push((id, xid)),
            }
        }
        Ok(missing)
    }
}
