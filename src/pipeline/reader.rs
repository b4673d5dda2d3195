//! The reader stage: replication events → decoded outbox rows → publishes,
//! with `Confirm` markers at transaction ends and idle keepalives.

use super::InFlight;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::replay::ReplayCheck;
use crate::publish::message::Message;
use crate::replication::pgoutput::{Decoder, OutboxRow};
use crate::replication::progress::seconds_since;
use async_nats::jetstream::{self, message::PublishMessage};
use pgwire_replication::{Lsn, ReplicationEvent};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc::Sender;
use tokio_postgres::Client;

/// Rows of a replayed transaction checked against the table in one query.
const REPLAY_CHUNK: usize = 2000;

pub(super) struct Reader {
    decoder: Decoder,
    subject_prefix: String,
    js: jetstream::Context,
    /// None once the reader is closed (shutdown): the acker then drains.
    inflight: Option<Sender<InFlight>>,
    db: Arc<Client>,
    replay: ReplayCheck,
    /// Transactions committed before this position may be replays.
    horizon: Lsn,
    /// The open transaction, if any.
    open: Option<OpenTransaction>,
    /// Rows of a replayed transaction waiting for their status check.
    replayed: Vec<OutboxRow>,
    /// The highest position sent down the pipeline (confirms are monotonic).
    last_confirm: Lsn,
    /// Ends and commit times of the transactions not yet confirmed, oldest
    /// first: the replication lag in seconds is the age of the first.
    unconfirmed: VecDeque<(Lsn, i64)>,
    metrics: Arc<Metrics>,
}

impl Reader {
    pub(super) fn new(
        config: &Config,
        js: jetstream::Context,
        inflight: Sender<InFlight>,
        db: Arc<Client>,
        replay: ReplayCheck,
        horizon: Lsn,
        metrics: Arc<Metrics>,
    ) -> Reader {
        Reader {
            decoder: Decoder::new(),
            subject_prefix: config.subject_prefix.clone(),
            js,
            inflight: Some(inflight),
            db,
            replay,
            horizon,
            open: None,
            replayed: Vec::new(),
            last_confirm: Lsn::ZERO,
            unconfirmed: VecDeque::new(),
            metrics,
        }
    }

    /// Stops feeding the pipeline, so the stages behind drain and finish.
    pub(super) fn close(&mut self) {
        self.inflight = None;
    }

    /// Everything up to `lsn` is confirmed to the server.
    pub(super) fn acknowledged(&mut self, lsn: Lsn) {
        while self.unconfirmed.front().is_some_and(|(end, _)| *end <= lsn) {
            self.unconfirmed.pop_front();
        }
    }

    /// Age of the oldest received commit not yet confirmed; 0 when caught up.
    pub(super) fn lag_seconds(&self) -> f64 {
        self.unconfirmed
            .front()
            .map_or(0.0, |(_, committed)| seconds_since(*committed))
    }

    fn sender(&self) -> Result<&Sender<InFlight>, Error> {
        self.inflight.as_ref().ok_or(Error::PipelineClosed)
    }

    pub(super) async fn on_event(&mut self, event: ReplicationEvent) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.open = Some(OpenTransaction {
                    xid,
                    replay: final_lsn <= self.horizon,
                    committed_at: commit_time_micros,
                });
                Ok(())
            }
            ReplicationEvent::XLogData { data, .. } => {
                let Some(row) = self.decoder.decode(&data)? else {
                    return Ok(());
                };
                if self.open.is_some_and(|tx| tx.replay) {
                    self.replayed.push(row);
                    if self.replayed.len() >= REPLAY_CHUNK {
                        self.publish_replayed().await?;
                    }
                    Ok(())
                } else {
                    self.publish(&row).await
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.publish_replayed().await?;
                self.open = None;
                if end_lsn > self.last_confirm {
                    self.unconfirmed.push_back((end_lsn, commit_time_micros));
                }
                self.confirm(end_lsn).await
            }
            // Between transactions everything before the server's position
            // has been delivered: confirming it lets an idle outbox release
            // the WAL that other tables write.
            ReplicationEvent::KeepAlive { wal_end, .. } if self.open.is_none() => {
                self.confirm(wal_end).await
            }
            ReplicationEvent::KeepAlive { .. }
            | ReplicationEvent::Message { .. }
            | ReplicationEvent::StoppedAt { .. } => Ok(()),
        }
    }

    async fn publish(&mut self, row: &OutboxRow) -> Result<(), Error> {
        let message = Message::from_row(&self.subject_prefix, row);
        let ack = self
            .js
            .send_publish(
                message.subject,
                PublishMessage::build()
                    .payload(message.body)
                    .headers(message.headers),
            )
            .await
            .map_err(|e| Error::Nats(format!("publishing event {}: {e}", row.id)))?;
        self.metrics.in_flight.inc();
        let event = InFlight::Event {
            id: row.id,
            ack,
            committed_at: self.open.map_or(0, |tx| tx.committed_at),
            published: self.metrics.published(&row.aggregate_type),
        };
        self.sender()?
            .send(event)
            .await
            .map_err(|_| Error::PipelineClosed)
    }

    /// Publishes the buffered rows of a replayed transaction, except those an
    /// earlier run already published (or dead-lettered). Once the replay is
    /// over this is never reached: the check costs nothing on the live path.
    async fn publish_replayed(&mut self) -> Result<(), Error> {
        if self.replayed.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.replayed);
        let xid = self.open.map_or(0, |tx| tx.xid);
        let outcome = self.replay.check(&self.db, xid, rows).await?;
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
        for row in &outcome.publish {
            self.publish(row).await?;
        }
        Ok(())
    }

    async fn confirm(&mut self, lsn: Lsn) -> Result<(), Error> {
        if lsn <= self.last_confirm {
            return Ok(());
        }
        self.last_confirm = lsn;
        self.sender()?
            .send(InFlight::Confirm(lsn))
            .await
            .map_err(|_| Error::PipelineClosed)
    }
}

/// The transaction being decoded.
#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    xid: u32,
    /// Committed before the session started: maybe published already.
    replay: bool,
    /// Commit time, µs since 2000-01-01.
    committed_at: i64,
}
