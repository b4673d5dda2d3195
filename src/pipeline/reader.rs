//! The reader stage: replication events → decoded outbox rows → events for
//! the publisher, with `Confirm` markers at transaction ends and idle
//! keepalives.

use super::budget::{Budget, Held};
use super::Item;
use crate::error::Error;
use crate::event::OutboxRow;
use crate::metrics::Metrics;
use crate::outbox::boundary::Boundary;
use crate::outbox::replay::ReplayCheck;
use crate::outbox::{attempts, visibility};
use crate::pgtime::parse_utc_micros;
use crate::pgtime::seconds_since;
use crate::replication::pgoutput::{DecodeError, Decoder};
use crate::replication::progress::Progress;
use pgwire_replication::{Lsn, ReplicationEvent};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc::Sender;
use tokio_postgres::Client;
use uuid::Uuid;

/// Replayed rows checked against the table in one query, across
/// transactions (a catch-up after downtime is mostly small transactions).
const REPLAY_CHUNK: usize = 2000;

/// A replayed row held back until it is checked.
struct HeldBack {
    row: OutboxRow,
    held: Held,
    xid: u32,
    committed_at: i64,
}

pub(super) struct Reader {
    decoder: Decoder,
    /// None once the reader is closed (shutdown): the stages behind drain.
    items: Option<Sender<Item>>,
    replay: ReplayCheck,
    /// The open transaction, if any.
    open: Option<OpenTransaction>,
    /// Replayed rows waiting for their status check, in stream order.
    held_back: Vec<HeldBack>,
    /// The newest position behind them: it must not overtake them, and one
    /// position sent after the chunk confirms what the positions in between
    /// would have (a transaction's end each, in a catch-up of small ones).
    held_position: Option<Lsn>,
    /// Payload bytes between here and settling are capped.
    budget: Budget,
    /// For dead-lettering an event that cannot be decoded into a message.
    db: Arc<Client>,
    /// Ends and commit times of the transactions not yet confirmed, oldest
    /// first: the replication lag in seconds is the age of the first.
    unconfirmed: VecDeque<(Lsn, i64)>,
    /// Shared with the sweeper: whether it took rows the stream must look up.
    sweep: Arc<Boundary>,
    metrics: Arc<Metrics>,
}

impl Reader {
    pub(super) fn new(
        items: Sender<Item>,
        replay: ReplayCheck,
        budget: Budget,
        db: Arc<Client>,
        sweep: Arc<Boundary>,
        metrics: Arc<Metrics>,
    ) -> Reader {
        Reader {
            decoder: Decoder::new(),
            items: Some(items),
            replay,
            open: None,
            held_back: Vec::new(),
            held_position: None,
            budget,
            db,
            unconfirmed: VecDeque::new(),
            sweep,
            metrics,
        }
    }

    /// Stops feeding the pipeline, so the stages behind drain and finish.
    pub(super) fn close(&mut self) {
        self.items = None;
    }

    /// Everything up to `lsn` is confirmed to the server: the lag is
    /// measured from the next transaction on.
    pub(super) fn acknowledged(&mut self, lsn: Lsn) {
        while self.unconfirmed.front().is_some_and(|(end, _)| *end <= lsn) {
            self.unconfirmed.pop_front();
        }
    }

    /// Whether `row` must be looked up before publishing: its transaction is
    /// a possible replay, or the sweeper may have published the row already
    /// (from then on the rest of the transaction goes the same way, in order).
    fn must_check(&mut self, row: &OutboxRow) -> bool {
        let Some(tx) = self.open.as_mut() else {
            return false;
        };
        if !tx.check
            && self.sweep.sweeping()
            && parse_utc_micros(&row.created_at).is_some_and(|at| self.sweep.maybe_swept(at))
        {
            tx.check = true;
        }
        tx.check
    }

    /// Age of the oldest received commit not yet confirmed; 0 when caught up.
    pub(super) fn lag_seconds(&self) -> f64 {
        self.unconfirmed
            .front()
            .map_or(0.0, |(_, committed)| seconds_since(*committed))
    }

    async fn send(&self, item: Item) -> Result<(), Error> {
        let items = self.items.as_ref().ok_or(Error::PipelineClosed)?;
        items.send(item).await.map_err(|_| Error::PipelineClosed)
    }

    /// Handles one replication event; the positions it reaches go into
    /// `progress` (the session's) and down the pipeline.
    pub(super) async fn on_event(
        &mut self,
        event: ReplicationEvent,
        progress: &mut Progress,
    ) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.open = Some(OpenTransaction {
                    xid,
                    check: self.replay.covers(final_lsn),
                    committed_at: commit_time_micros,
                });
                Ok(())
            }
            ReplicationEvent::XLogData { data, wal_end, .. } => {
                let row = match self.decoder.decode(&data) {
                    Ok(Some(row)) => row,
                    Ok(None) => return Ok(()),
                    Err(DecodeError::Event { id, cause }) => {
                        return self.unpublishable(id, &cause).await;
                    }
                    Err(error) => {
                        return Err(Error::DecodeAt {
                            lsn: wal_end,
                            error,
                        })
                    }
                };
                let held = self.hold(&row).await?;
                if self.must_check(&row) {
                    let (committed_at, xid) =
                        self.open.map_or((0, 0), |tx| (tx.committed_at, tx.xid));
                    self.held_back.push(HeldBack {
                        row,
                        held,
                        xid,
                        committed_at,
                    });
                    if self.held_back.len() >= REPLAY_CHUNK {
                        self.publish_replayed().await?;
                    }
                    Ok(())
                } else {
                    // Nothing overtakes the rows held back.
                    self.publish_replayed().await?;
                    self.publish(row, held).await
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.open = None;
                if !progress.receive(end_lsn) {
                    return Ok(());
                }
                self.unconfirmed.push_back((end_lsn, commit_time_micros));
                self.hand_down(end_lsn).await
            }
            // Between transactions everything before the server's position
            // has been delivered: confirming it lets an idle outbox release
            // the WAL that other tables write.
            ReplicationEvent::KeepAlive {
                wal_end,
                server_time_micros,
                ..
            } if self.open.is_none() => {
                // The server has nothing more for now: check what is held.
                self.publish_replayed().await?;
                if !progress.receive(wal_end) {
                    return Ok(());
                }
                self.unconfirmed.push_back((wal_end, server_time_micros));
                self.hand_down(wal_end).await
            }
            ReplicationEvent::KeepAlive { .. }
            | ReplicationEvent::Message { .. }
            | ReplicationEvent::StoppedAt { .. } => Ok(()),
        }
    }

    /// An event whose row cannot become a message (a NULL where the contract
    /// has none, after a schema change): it fails alone, as a dead letter
    /// with the reason, and the stream goes on. Its row may not be visible
    /// yet (see `outbox::visibility`): then it is waited for.
    async fn unpublishable(&mut self, id: Uuid, cause: &DecodeError) -> Result<(), Error> {
        let xid = self.open.map_or(0, |tx| tx.xid);
        let mut not_yet = visibility::NotYetVisible::default();
        let dead = loop {
            let dead = attempts::record_unpublishable(&*self.db, id, cause).await?;
            // None: not pending. Settled already, gone, or not visible yet.
            if dead.is_some() || visibility::visible(&*self.db, &[xid]).await?.contains(&xid) {
                break dead;
            }
            not_yet.pause().await;
        };
        if dead == Some(true) {
            self.metrics.events_failed.inc();
        }
        Ok(())
    }

    /// Takes `row`'s share of the byte budget, waiting while the events
    /// ahead of it hold it all. A replay chunk holds bytes too: it is checked
    /// and sent on first, so what it holds comes back as it is acked.
    async fn hold(&mut self, row: &OutboxRow) -> Result<Held, Error> {
        let bytes = row.payload.len()
            + row.aggregate_type.len()
            + row.aggregate_id.len()
            + row.event_type.len();
        if let Some(held) = self.budget.try_hold(bytes) {
            return Ok(held);
        }
        self.publish_replayed().await?;
        Ok(self.budget.hold(bytes).await)
    }

    /// Hands `row` to the publisher.
    async fn publish(&mut self, row: OutboxRow, held: Held) -> Result<(), Error> {
        let (committed_at, xid) = self.open.map_or((0, 0), |tx| (tx.committed_at, tx.xid));
        self.send(Item::Event {
            row,
            committed_at,
            xid,
            held,
        })
        .await
    }

    /// Publishes the held-back rows of replayed transactions, except those
    /// an earlier run already published (or dead-lettered), then the newest
    /// position behind them. Once the replay is over this is never reached:
    /// the check costs nothing on the live path. The publisher works through
    /// the previous chunk meanwhile.
    pub(super) async fn publish_replayed(&mut self) -> Result<(), Error> {
        if self.held_back.is_empty() {
            return Ok(());
        }
        let held_back = std::mem::take(&mut self.held_back);
        let rows: Vec<(Uuid, u32)> = held_back.iter().map(|h| (h.row.id, h.xid)).collect();
        let outcome = self.replay.check(&rows).await?;
        if outcome.settled + outcome.deleted > 0 {
            self.metrics
                .replay_skipped
                .inc_by((outcome.settled + outcome.deleted) as u64);
            tracing::debug!(
                settled = outcome.settled,
                deleted = outcome.deleted,
                "replay: rows already published (or since deleted) are not published again"
            );
        }
        for HeldBack {
            row,
            held,
            xid,
            committed_at,
        } in held_back
        {
            // Rows skipped return their share of the budget as `held` drops.
            if outcome.skip.contains(&row.id) {
                continue;
            }
            self.send(Item::Event {
                row,
                committed_at,
                xid,
                held,
            })
            .await?;
        }
        match self.held_position.take() {
            Some(lsn) => self.send(Item::Confirm(lsn)).await,
            None => Ok(()),
        }
    }

    /// Sends a newly received position down the pipeline, or holds it
    /// behind replayed rows waiting for their check.
    async fn hand_down(&mut self, lsn: Lsn) -> Result<(), Error> {
        if self.held_back.is_empty() {
            return self.send(Item::Confirm(lsn)).await;
        }
        self.held_position = Some(lsn);
        Ok(())
    }
}

/// The transaction being decoded.
#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    xid: u32,
    /// Its rows are looked up before publishing: it committed before the
    /// session started (a replay), or holds rows the sweeper may have taken.
    check: bool,
    /// Commit time, µs since 2000-01-01.
    committed_at: i64,
}
