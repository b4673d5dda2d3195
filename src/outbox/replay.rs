//! The replay check: a transaction the stream re-delivers from before the
//! session's start may have been published by an earlier run, maybe longer
//! ago than JetStream's duplicate window. Its rows are looked up before
//! publishing: rows already `published` (or `failed`) are skipped, `pending`
//! ones are published, and rows that no longer exist (deleted by a cleanup
//! job) are skipped once their transaction is provably visible, so a row
//! merely not visible *yet* is never mistaken for a deleted one.

use crate::event::OutboxRow;
use pgwire_replication::Lsn;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

const STATUS_SQL: &str = "SELECT id, status = 'pending' FROM event_outbox WHERE id = ANY($1)";
const VISIBLE_SQL: &str = "SELECT pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())";
const CURRENT_XID_SQL: &str = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text";

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
    visible: Statement,
    current_xid: Statement,
}

impl ReplayCheck {
    /// A check for transactions that committed before `horizon`.
    pub(crate) async fn prepare(
        db: Arc<Client>,
        horizon: Lsn,
    ) -> Result<ReplayCheck, tokio_postgres::Error> {
        let status = db.prepare(STATUS_SQL).await?;
        let visible = db.prepare(VISIBLE_SQL).await?;
        let current_xid = db.prepare(CURRENT_XID_SQL).await?;
        Ok(ReplayCheck {
            db,
            horizon,
            status,
            visible,
            current_xid,
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
            // The stream's ids are 32 bits: widened against the server's
            // counter read now, not at the session's start, so a transaction
            // begun after the counter wrapped lands in the right epoch.
            let current: String = self.db.query_one(&self.current_xid, &[]).await?.get(0);
            let xid8 = widen(xid, current.parse().unwrap_or(u64::MAX));
            let visible: bool = self
                .db
                .query_one(&self.visible, &[&xid8.to_string()])
                .await?
                .get(0);
            if visible {
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

/// The 64-bit id of 32-bit `xid`, a transaction already assigned when the
/// server's next id was `current` (so `current` must be read after `xid`
/// was assigned: then `xid` is the newest id below it with those low bits).
fn widen(xid: u32, current: u64) -> u64 {
    let candidate = (current & !0xFFFF_FFFF) | u64::from(xid);
    if candidate > current && candidate >= 1 << 32 {
        candidate - (1 << 32)
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::widen;

    #[test]
    fn widens_within_and_across_an_epoch() {
        assert_eq!(widen(700, 1000), 700);
        assert_eq!(widen(700, (3 << 32) | 1000), (3 << 32) | 700);
        // An older transaction from before the counter wrapped.
        assert_eq!(widen(0xFFFF_FF00, (3 << 32) | 5), (2 << 32) | 0xFFFF_FF00);
    }

    #[test]
    fn at_the_wrap_the_counter_read_after_the_transaction_decides() {
        let before_wrap = (3u64 << 32) | 0xFFFF_FFF0;
        let after_wrap = (4u64 << 32) | 20;
        // Begun just after the wrap, widened against a counter read later:
        // the new epoch (judged against a counter read before the wrap it
        // would land 2^32 ids in the past, and look long committed).
        assert_eq!(widen(5, after_wrap), (4 << 32) | 5);
        assert_ne!(
            widen(5, before_wrap),
            (4 << 32) | 5,
            "why the counter is read fresh"
        );
        // Begun just before the wrap: still the old epoch.
        assert_eq!(widen(0xFFFF_FFF8, after_wrap), (3 << 32) | 0xFFFF_FFF8);
        assert_eq!(widen(0xFFFF_FFF8, before_wrap + 9), (3 << 32) | 0xFFFF_FFF8);
        // The first epoch has nothing before it.
        assert_eq!(widen(0xFFFF_FFF8, 20), 0xFFFF_FFF8);
        assert_eq!(widen(19, 20), 19);
    }
}
