//! One replication session: the slot's stream through three stages, each a
//! task, joined by bounded channels that carry items in commit order.
//!
//! ```text
//!  slot ─► reader ──(events, positions)──► publisher ──(batch of acked ids)──► marker
//!          decode, replay check             publish chained, await acks        UPDATE … RETURNING id
//!             ▲                             in order, retry (go-back-N)             │
//!             └──────────── confirmed LSN (watch) ◄─────────────────────────────────┘
//! ```
//!
//! Every transaction's end (and every keepalive outside a transaction) goes
//! down the pipeline as a `Confirm(lsn)` behind its events, so a position
//! reaches the server only after every event before it is acked *and* marked.
//! Memory is bounded by the channels and the publish window, however large a
//! transaction is. Any failure ends the session; the next one resumes from
//! the slot's confirmed position and re-delivers the rest.

pub(crate) mod budget;
mod marking;
mod publisher;
mod reader;

use crate::config::Config;
use crate::db;
use crate::db::hosts::Endpoint;
use crate::error::{Error, Internal, Transient};
use crate::event::OutboxRow;
use crate::metrics::Metrics;
use crate::outbox::boundary::Boundary;
use crate::outbox::marker::Marker;
use crate::outbox::replay::ReplayCheck;
use crate::publish::chain::Chain;
use crate::publish::turn::PublishTurn;
use crate::replication::progress::Progress;
use crate::replication::setup::Slot;
use crate::replication::timeline::{self, Change, PrimaryWatch, ServerId};
use crate::replication::{setup, source};
use crate::shutdown::Shutdown;
use budget::{Budget, Held};
use marking::{mark_batches, Marking, MARKING_SESSIONS};
use pgwire_replication::{Lsn, ReplicationClient};
use publisher::Publisher;
use reader::Reader;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use uuid::Uuid;

/// Time allowed, on shutdown, for in-flight acks and marks to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);
/// Time allowed, on shutdown, for the final position to reach the server.
const FEEDBACK_TIMEOUT: Duration = Duration::from_secs(2);

/// An item from the reader to the publisher, in stream order. Nearly every
/// item is an event, so boxing it would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    Event {
        row: OutboxRow,
        /// Its transaction's commit time (µs since 2000-01-01), for latency.
        committed_at: i64,
        /// Its transaction's id (32 bits, as the stream gives it).
        xid: u32,
        /// Its payload's share of the byte budget.
        held: Held,
    },
    /// Everything before this position has been handed to the pipeline.
    Confirm(Lsn),
}

/// Events decoded and not yet sent, between the reader and the publisher
/// (the publisher's window holds those sent and not yet acked).
const QUEUED: usize = 1024;

/// Acked ids to mark, and the position to confirm once they are marked.
#[derive(Debug, Default)]
struct Batch {
    ids: Vec<Uuid>,
    /// `xids[i]`: the transaction of `ids[i]`.
    xids: Vec<u32>,
    confirm: Option<Lsn>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.confirm.is_none()
    }
}

/// The NATS side, shared by every session.
pub(crate) struct Nats {
    pub js: async_nats::jetstream::Context,
    /// Taken by the sweeper between the publisher's chains.
    pub turn: Arc<PublishTurn>,
    /// Bumped on every (re)connect: what was in flight is sent again.
    pub connects: watch::Receiver<u64>,
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// The last position confirmed to the server.
    pub confirmed: Lsn,
}

/// Streams until shutdown (`Ok`) or a failure (`Err`, the caller decides
/// whether to start another session).
pub(crate) async fn run_session(
    config: &Config,
    nats: &Nats,
    metrics: &Arc<Metrics>,
    sweep: &Arc<Boundary>,
    primary: &mut PrimaryWatch,
    shutdown: &mut Shutdown,
) -> Result<Drained, Error> {
    metrics.sessions.inc();
    // Connecting waits up to its timeout on a server that does not answer:
    // shutdown must not wait for it (nothing is in flight yet).
    let open = Opened::open(config, metrics, sweep, primary);
    let Some(opened) = shutdown.unless(open).await else {
        return Ok(Drained {
            confirmed: Lsn::ZERO,
        });
    };
    let result = match opened {
        Ok(opened) => {
            // The slot is held: this instance is the active one.
            metrics.replication_connected.set(1);
            metrics.tailer_active.set(1);
            metrics.tailer_standby.set(0);
            stream_until_done(config, nats, metrics, sweep, shutdown, opened).await
        }
        Err(error) => Err(error),
    };
    metrics.replication_connected.set(0);
    metrics.tailer_active.set(0);
    metrics.replication_lag_seconds.set(0.0);
    if result.is_err() {
        metrics.session_failures.inc();
    }
    result
}

/// What a session works with once the slot is held.
struct Opened {
    /// The first of them also records the publisher's failed attempts.
    marking: Vec<Arc<Marking>>,
    stream: ReplicationClient,
    /// The reader's session (replay checks, dead letters it decodes).
    checks: Arc<Client>,
    /// Transactions that committed before this point may have been published
    /// by an earlier run (a replay): their rows are checked before publishing.
    horizon: Lsn,
}

impl Opened {
    /// Connects to the primary (the first server of the URL that accepts a
    /// session as `target_session_attrs` asks), makes sure its slot exists,
    /// and opens the stream on that same server.
    async fn open(
        config: &Config,
        metrics: &Metrics,
        sweep: &Boundary,
        primary: &mut PrimaryWatch,
    ) -> Result<Opened, Error> {
        let (db, endpoint) = db::connect_endpoint(config).await?;
        let server = timeline::query(&db).await?;
        let marker = Marker::prepare(&db, config.event_logs).await?;
        let mut marking = vec![Arc::new(Marking {
            db: Arc::new(db),
            marker,
        })];
        let slot = setup::ensure_slot(&marking[0].db, config, Some(&endpoint)).await?;
        // A server that accepts the connection and then says nothing must
        // not hold the session (or a standby's attempt) for ever.
        let opening = config.replication_timeout + Duration::from_secs(10);
        let stream = tokio::time::timeout(opening, source::open(config, &endpoint, server))
            .await
            .map_err(|_| Transient::NoAnswer {
                what: "opening the replication stream",
                after: opening,
            })??;
        // Before the stream confirms anything on this server.
        sweep.streaming_from(server);
        report_server(config, metrics, primary.observe(server), slot);
        while marking.len() < MARKING_SESSIONS {
            let db = another_session(config, &endpoint, server).await?;
            let marker = Marker::prepare(&db, config.event_logs).await?;
            marking.push(Arc::new(Marking {
                db: Arc::new(db),
                marker,
            }));
        }
        // The reader's own session: its checks do not queue behind a
        // marking commit (which waits for the WAL flush), nor the marks
        // behind its checks.
        let checks = another_session(config, &endpoint, server).await?;
        let horizon = current_wal_lsn(&checks).await?;
        tracing::info!(slot = %config.slot, server = %endpoint, timeline = server.timeline, replay_horizon = %horizon, "streaming");
        Ok(Opened {
            marking,
            checks: Arc::new(checks),
            stream,
            horizon,
        })
    }
}

/// One more session to the server the first one reached, or none.
async fn another_session(
    config: &Config,
    endpoint: &Endpoint,
    server: ServerId,
) -> Result<Client, Error> {
    let client = db::connect_to(config, endpoint).await?;
    let reached = timeline::query(&client).await?;
    if reached != server {
        return Err(Transient::PrimaryChanging {
            first: format!("the first session's server ({server})"),
            second: format!("another session's to {endpoint} ({reached})"),
        }
        .into());
    }
    Ok(client)
}

/// Says when the session streams from another primary than the last one.
fn report_server(config: &Config, metrics: &Metrics, change: Change, slot: Slot) {
    let Change::Primary { from, to } = change else {
        return;
    };
    metrics.primary_changes.inc();
    let what = if from.system == to.system {
        format!("timeline {} -> {}", from.timeline, to.timeline)
    } else {
        format!(
            "another cluster: system {} timeline {} -> system {} timeline {}",
            from.system, from.timeline, to.system, to.timeline
        )
    };
    let slot_text = match slot {
        Slot::Created => "created anew",
        Slot::Existed => "already there (a PostgreSQL 17 failover slot, or made earlier)",
    };
    tracing::warn!(
        "PostgreSQL primary changed ({what}): slot {} {slot_text}; rows still pending are published by the catch-up sweeper",
        config.slot
    );
}

/// The body of a session, once the stream is open.
async fn stream_until_done(
    config: &Config,
    nats: &Nats,
    metrics: &Arc<Metrics>,
    sweep: &Arc<Boundary>,
    shutdown: &mut Shutdown,
    opened: Opened,
) -> Result<Drained, Error> {
    let Opened {
        marking: sessions,
        checks,
        mut stream,
        horizon,
    } = opened;
    let (items_tx, items_rx) = mpsc::channel(QUEUED);
    let (batch_tx, batch_rx) = mpsc::channel(1);
    let (confirmed_tx, mut confirmed_rx) = watch::channel(Lsn::ZERO);
    let publisher = Publisher::new(
        Chain::new(nats.js.clone(), config.subject_prefix.clone()),
        sessions[0].db.clone(),
        config.max_retries,
        metrics.clone(),
        nats.turn.clone(),
        nats.connects.clone(),
        config.statement_timeout,
    );
    let mut publishing = tokio::spawn(publisher.run(items_rx, batch_tx));
    let mut marking = tokio::spawn(mark_batches(
        sessions,
        batch_rx,
        confirmed_tx,
        metrics.clone(),
    ));
    let replay = ReplayCheck::prepare(checks.clone(), horizon).await?;
    let budget = Budget::new(config.max_in_flight_bytes);
    let mut reader = Reader::new(
        items_tx,
        replay,
        budget,
        checks,
        sweep.clone(),
        metrics.clone(),
    );
    let mut progress = Progress::new(Lsn::ZERO);
    let mut lag_tick = tokio::time::interval(Duration::from_secs(1));
    let mut lag_watch = LagWatch::default();
    // The heartbeat: when the loop last began to wait for the server (see
    // `source::silence_options`). Time spent handling an event (waiting for
    // room while NATS is down, say) is not the server's silence.
    let mut waiting_since = Instant::now();
    // One timer for the whole session, not one per event: when it fires
    // early (something came meanwhile) it is set again from the last event.
    let silence = tokio::time::sleep(config.replication_timeout);
    tokio::pin!(silence);

    // Priorities: shutdown first, then a failed stage, then confirmations
    // (they free WAL on the server), then the next replication event, then
    // a server silent for too long.
    let failure = loop {
        tokio::select! {
            biased;
            _ = shutdown.fired() => break None,
            ended = &mut publishing => break Some(stage_failure("publisher", ended)),
            ended = &mut marking => break Some(stage_failure("marker", ended)),
            Ok(()) = confirmed_rx.changed() => {
                let lsn = *confirmed_rx.borrow_and_update();
                confirm(&stream, &mut progress, &mut reader, sweep, metrics, lsn);
            }
            _ = lag_tick.tick() => {
                let lag = reader.lag_seconds();
                metrics.replication_lag_seconds.set(lag);
                lag_watch.observe(lag);
                // Replayed rows held back for their check wait at most a
                // tick when the server sends nothing more (no keepalive).
                let began = Instant::now();
                match shutdown.unless(reader.publish_replayed()).await {
                    // That wait was the tailer's, not the server's silence.
                    Some(Ok(())) => waiting_since += began.elapsed(),
                    Some(Err(error)) => break Some(error),
                    None => break None,
                }
            }
            event = stream.recv() => {
                let handled = match event {
                    // The reader may wait (a full queue, the byte budget, a
                    // replay check) while NATS is down: shutdown still wins.
                    // Abandoning the event is safe: nothing past the last
                    // marked position is confirmed, so it is re-delivered.
                    Ok(Some(event)) => match shutdown.unless(reader.on_event(event, &mut progress)).await {
                        Some(handled) => handled,
                        None => break None,
                    },
                    Ok(None) => Err(Transient::StreamEnded.into()),
                    Err(error) => Err(error.into()),
                };
                if let Err(error) = handled {
                    break Some(error);
                }
                waiting_since = Instant::now();
            }
            () = &mut silence => {
                let deadline = waiting_since + config.replication_timeout;
                if Instant::now() >= deadline {
                    break Some(Transient::ReplicationSilent(config.replication_timeout).into());
                }
                silence.as_mut().reset(deadline.into());
            }
        }
    };

    if let Some(error) = failure {
        let error = root_cause(error, &mut publishing, &mut marking).await;
        publishing.abort();
        marking.abort();
        stream.abort();
        return Err(error);
    }

    // Shutdown: stop reading, let what is in flight finish, confirm it.
    reader.close();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let acked = (&mut publishing).await;
        let marked = (&mut marking).await;
        (acked, marked)
    })
    .await;
    if let Ok((Ok(Err(error)), _) | (_, Ok(Err(error)))) = drained {
        tracing::warn!(%error, "in-flight events did not all finish; they will be re-delivered");
    }
    publishing.abort();
    marking.abort();
    let last = *confirmed_rx.borrow();
    confirm(&stream, &mut progress, &mut reader, sweep, metrics, last);
    wait_for_feedback(&stream, progress.confirmed()).await;
    stream.stop();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    Ok(Drained {
        confirmed: progress.confirmed(),
    })
}

/// Logs the state changes of the lag: once when it passes [`LagWatch::LAGGING`]
/// seconds, once when it is back under [`LagWatch::CAUGHT_UP`].
#[derive(Debug, Default)]
struct LagWatch {
    lagging: bool,
}

impl LagWatch {
    const LAGGING: f64 = 30.0;
    const CAUGHT_UP: f64 = 5.0;

    fn observe(&mut self, lag_seconds: f64) {
        if !self.lagging && lag_seconds > Self::LAGGING {
            self.lagging = true;
            tracing::warn!(
                lag_seconds = lag_seconds.round(),
                "lagging: committed events wait to be published and confirmed"
            );
        } else if self.lagging && lag_seconds < Self::CAUGHT_UP {
            self.lagging = false;
            tracing::info!("caught up");
        }
    }
}

/// Tells the server, the sweeper and the lag everything before `lsn` is
/// durable.
fn confirm(
    stream: &ReplicationClient,
    progress: &mut Progress,
    reader: &mut Reader,
    sweep: &Boundary,
    metrics: &Metrics,
    lsn: Lsn,
) {
    if progress.confirm(lsn) {
        stream.update_applied_lsn(lsn);
        sweep.confirmed(lsn);
        reader.acknowledged(lsn);
        metrics
            .confirmed_lsn
            .set(i64::try_from(lsn.0).unwrap_or(i64::MAX));
        metrics.replication_lag_seconds.set(reader.lag_seconds());
    }
}

/// Waits (bounded) until the server has been told about `lsn`.
async fn wait_for_feedback(stream: &ReplicationClient, lsn: Lsn) {
    let deadline = Instant::now() + FEEDBACK_TIMEOUT;
    while stream.metrics().last_applied_lsn() < lsn && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stage_failure(
    stage: &'static str,
    ended: Result<Result<(), Error>, tokio::task::JoinError>,
) -> Error {
    match ended {
        Ok(Err(error)) => error,
        Ok(Ok(())) => Internal::StageStopped(stage).into(),
        Err(error) => Internal::StageFailed { stage, error }.into(),
    }
}

async fn current_wal_lsn(db: &Client) -> Result<Lsn, Error> {
    let lsn: tokio_postgres::types::PgLsn = db
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await?
        .get(0);
    Ok(Lsn(u64::from(lsn)))
}

/// A stage's own error explains a failure better than the closed channel the
/// stage before it saw: prefer the marker's, then the publisher's.
async fn root_cause(
    error: Error,
    publishing: &mut JoinHandle<Result<(), Error>>,
    marking: &mut JoinHandle<Result<(), Error>>,
) -> Error {
    if !matches!(error, Error::PipelineClosed) {
        return error;
    }
    for (stage, handle) in [("marker", marking), ("publisher", publishing)] {
        if let Ok(ended) = tokio::time::timeout(Duration::from_secs(1), &mut *handle).await {
            let cause = stage_failure(stage, ended);
            if !matches!(cause, Error::PipelineClosed) {
                return cause;
            }
        }
    }
    error
}
