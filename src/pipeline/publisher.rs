//! The publisher stage: publishes the reader's events in stream order,
//! awaits their acks in the same order, retries what fails, and hands the
//! acked ids to the marker in batches.
//!
//! Order across a broken connection: every publish is chained to the one
//! sent before it, and when the oldest publish in flight fails, it and
//! everything behind it are sent again ([`Chain`], go-back-N). The failure's
//! verdict (`publish::policy`) is recorded on the first event's row and it is
//! retried with backoff; a dead letter leaves the window and the rest go on
//! without it. After NATS reconnects, everything in flight is sent again at
//! once rather than after its ack times out. Memory stays bounded: the window
//! holds at most [`PUBLISH_WINDOW`] events.
//!
//! Marking: a batch goes to the marker when it is full, or when its oldest
//! id has lingered [`LINGER`]. Marking late costs nothing the consumer sees
//! (the event is already in the stream); marking in few, large statements
//! saves the database a statement and a commit per handful of events.

use super::budget::Held;
use super::{Batch, Item};
use crate::error::{Error, Transient};
use crate::metrics::Metrics;
use crate::outbox::{attempts, visibility};
use crate::pgtime::{seconds_since, unix_seconds};
use crate::publish::chain::{AckFuture, Chain};
use crate::publish::jetstream::PUBLISH_WINDOW;
use crate::publish::policy::{classify, never_sent, verdict, Failure};
use crate::publish::turn::{PublishTurn, PUBLISHER_SHARE};
use crate::publish::window::Window;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{Receiver, Sender};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

/// Most ids in one UPDATE: large enough to amortise the round trip and the
/// statement, small enough to keep each transaction short.
const MAX_BATCH: usize = 2000;
/// How long an acked id may wait for others to share its UPDATE.
const LINGER: Duration = Duration::from_millis(20);
/// How long no stream may answer (no responders) before this session gives
/// up on it as deleted: well past a cluster's leader election (4-5 s).
const STREAM_GONE_AFTER: Duration = Duration::from_secs(15);
/// Acks that time out in a row, while the client still counts itself
/// connected, before the connection is taken for silent and replaced. The
/// client's pings usually notice first (`jetstream::PING_INTERVAL`); this
/// catches a connection that answers pings but nothing else.
const SILENT_ACKS: u32 = 3;

pub(super) struct Publisher {
    chain: Chain,
    db: Arc<Client>,
    max_retries: u32,
    metrics: Arc<Metrics>,
    turn: Arc<PublishTurn>,
    /// NATS (re)connects: publishes in flight over a connection that broke
    /// may be lost, and would otherwise wait out their ack timeout.
    connects: watch::Receiver<u64>,
    /// Sent events awaiting their acks, and the positions behind them.
    window: Window<AckFuture, Held>,
    batch: Batch,
    /// When the oldest item of the current batch arrived.
    since: Instant,
    /// Whether the last publish failed: state changes are logged once, the
    /// attempts of each event only at debug level.
    failing: bool,
    /// Since when no stream has answered: an election, unless it lasts.
    leaderless_since: Option<Instant>,
    /// Acks timed out in a row (reset by any answer).
    ack_timeouts: u32,
    /// How long a statement on the shared connection may go unanswered.
    statement_timeout: Duration,
}

impl Publisher {
    pub(super) fn new(
        chain: Chain,
        db: Arc<Client>,
        max_retries: u32,
        metrics: Arc<Metrics>,
        turn: Arc<PublishTurn>,
        mut connects: watch::Receiver<u64>,
        statement_timeout: Duration,
    ) -> Publisher {
        connects.mark_unchanged();
        Publisher {
            chain,
            db,
            max_retries,
            metrics,
            turn,
            connects,
            window: Window::new(),
            batch: Batch::default(),
            since: Instant::now(),
            failing: false,
            leaderless_since: None,
            ack_timeouts: 0,
            statement_timeout,
        }
    }

    pub(super) async fn run(
        mut self,
        mut items: Receiver<Item>,
        batches: Sender<Batch>,
    ) -> Result<(), Error> {
        let mut turn = self.turn.publisher().await;
        let mut turn_since = Instant::now();
        let mut open = true;
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        loop {
            self.take_confirms();
            // The sweeper waits for its turn: hand over once nothing is in
            // flight, after a share of the time while events keep coming.
            let handing_over =
                self.turn.wanted() && (items.is_empty() || turn_since.elapsed() >= PUBLISHER_SHARE);
            if self.window.is_empty() {
                if !open {
                    break;
                }
                if handing_over {
                    self.flush(&batches).await?;
                    drop(turn);
                    turn = self.turn.publisher().await;
                    turn_since = Instant::now();
                    self.chain.restart();
                    continue;
                }
            }
            let room = open && !handing_over && self.window.len() < PUBLISH_WINDOW;
            let lingering = !self.batch.is_empty();
            if lingering && linger.deadline() != self.since + LINGER {
                linger.as_mut().reset(self.since + LINGER);
            }
            tokio::select! {
                biased;
                result = front_ack(&mut self.window) => self.settle_front(result, &batches).await?,
                item = items.recv(), if room => match item {
                    Some(Item::Event { row, committed_at, xid, held }) => {
                        let ack = self.chain.send(&row).await;
                        self.metrics.in_flight.inc();
                        self.window.push_event(row, (committed_at, xid), ack, held);
                    }
                    Some(Item::Confirm(lsn)) => self.window.push_position(lsn),
                    None => open = false,
                },
                Ok(()) = self.connects.changed() => {
                    self.connects.borrow_and_update();
                    if self.window.in_flight() > 0 {
                        tracing::debug!(in_flight = self.window.in_flight(), "NATS reconnected: sending what was in flight again");
                        self.resend(0).await;
                    }
                }
                // Only an idle publisher needs waking: with events in flight
                // the loop comes round on every ack and sees the request.
                () = self.turn.asked(), if !handing_over && self.window.is_empty() => {}
                () = &mut linger, if lingering => self.flush(&batches).await?,
            }
        }
        self.flush(&batches).await
    }

    /// Positions at the front of the window: everything before them is acked.
    fn take_confirms(&mut self) {
        if let Some(lsn) = self.window.take_settled_position() {
            self.started_batch();
            self.batch.confirm = Some(lsn);
        }
    }

    fn started_batch(&mut self) {
        if self.batch.is_empty() {
            self.since = Instant::now();
        }
    }

    /// The oldest event in flight has its answer.
    async fn settle_front(
        &mut self,
        result: Result<PublishAck, PublishError>,
        batches: &Sender<Batch>,
    ) -> Result<(), Error> {
        let ack = match result {
            Ok(ack) => ack,
            Err(error) => return self.retry_front(error, batches).await,
        };
        let Some(sent) = self.window.settle_front() else {
            return Ok(());
        };
        self.metrics.in_flight.dec();
        self.leaderless_since = None;
        self.ack_timeouts = 0;
        if self.failing {
            self.failing = false;
            self.metrics.stream_limit_reached.set(0);
            tracing::info!(id = %sent.row.id, attempts = sent.attempts + 1, "publishing recovered");
        }
        if ack.duplicate {
            self.metrics.duplicates.inc();
            tracing::debug!(id = %sent.row.id, "JetStream dropped a duplicate");
        } else {
            self.metrics.published(&sent.row.aggregate_type).inc();
            self.metrics
                .publish_latency
                .observe(seconds_since(sent.committed_at));
        }
        self.metrics.last_publish_timestamp.set(unix_seconds());
        self.started_batch();
        self.batch.ids.push(sent.row.id);
        self.batch.xids.push(sent.xid);
        if self.batch.ids.len() >= MAX_BATCH {
            self.flush(batches).await?;
        }
        Ok(())
    }

    /// The oldest event in flight failed: record it on the row, wait its
    /// backoff, and send it and everything behind it again, in order.
    async fn retry_front(
        &mut self,
        error: PublishError,
        batches: &Sender<Batch>,
    ) -> Result<(), Error> {
        // What is acked gets marked while this one waits.
        self.flush(batches).await?;
        let failure = classify(&error);
        self.count_ack_timeout(&error);
        let Some(head) = self.window.front_mut() else {
            return Ok(());
        };
        if failure == Failure::Chain {
            // Another publisher wrote to the stream after the event before
            // this one (or the server forgot its last id in a restart).
            tracing::debug!(id = %head.row.id, %error, "chain broken; sending the window again");
            self.resend(0).await;
            return Ok(());
        }
        // No stream answers: on a cluster an election, over within seconds;
        // a stream that stays silent longer was deleted, and a new session
        // (each one ensures the stream) recreates it.
        if failure == Failure::Leaderless {
            let since = *self.leaderless_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STREAM_GONE_AFTER {
                return Err(Transient::StreamGone {
                    id: head.row.id,
                    after: STREAM_GONE_AFTER,
                }
                .into());
            }
        }
        let verdict = verdict(failure, head.attempts, self.max_retries);
        let text = error.to_string();
        let id = head.row.id;
        let trace_id = head.row.trace_id();
        // The marker's connection, shared: bounded here, since the
        // marker's own answers could hide this one's silence from the
        // connection's watchdog.
        let deadline = self.statement_timeout;
        let no_answer = |_| Transient::NoAnswer {
            what: "recording a failed publish",
            after: deadline,
        };
        let mut dead =
            tokio::time::timeout(deadline, attempts::record(&*self.db, id, &text, verdict))
                .await
                .map_err(no_answer)??;
        if dead.is_none() && verdict.dead_at.is_some() {
            // No pending row to fail: settled by someone else, deleted, or
            // not visible yet. Only the last is worth waiting for; retrying
            // an event that cannot be sent for a row that is gone would hold
            // up everything behind it for ever.
            let xid = head.xid;
            let visible = tokio::time::timeout(deadline, visibility::visible(&*self.db, &[xid]))
                .await
                .map_err(no_answer)??;
            if visible.contains(&xid) {
                dead = Some(true);
            }
        }
        if dead == Some(true) {
            self.window.settle_front();
            self.metrics.in_flight.dec();
            self.metrics.events_failed.inc();
            tracing::warn!(%id, trace_id, error = %text, "event failed (dead letter); `outbox-tailer requeue` retries it");
            // One the client never sent left no gap: the events behind it
            // were chained past it and stand. Otherwise they were chained
            // to it, and go again.
            if !never_sent(&error) {
                self.resend(0).await;
            }
            return Ok(());
        }
        head.attempts += 1;
        let attempt = head.attempts;
        self.metrics.publish_retries.inc();
        if failure == Failure::Capacity {
            self.metrics.stream_limit_reached.set(1);
        }
        if !self.failing {
            self.failing = true;
            let hint = match failure {
                Failure::Capacity => {
                    "the stream or account is at a limit; publishing stalls until it is lifted"
                }
                Failure::Leaderless => {
                    "no stream answers (a cluster electing its leader?); retrying in order"
                }
                _ => "retrying in order (recorded on the row)",
            };
            tracing::warn!(%id, trace_id, error = %text, "publishing failed; {hint}");
        } else {
            tracing::debug!(%id, trace_id, error = %text, attempt, retry_in = ?verdict.retry_in, "publish failed again");
        }
        let delay = verdict.retry_in;
        tokio::time::sleep(delay).await;
        self.resend(1).await;
        Ok(())
    }

    /// Acks that keep timing out on a connection the client still counts as
    /// up: the connection is silent (a NAT or proxy dropped it without
    /// closing). Replacing it makes the client reconnect, and the publisher
    /// sends the window again at once (`connects`).
    fn count_ack_timeout(&mut self, error: &PublishError) {
        use async_nats::jetstream::context::PublishErrorKind;
        if error.kind() != PublishErrorKind::TimedOut {
            self.ack_timeouts = 0;
            return;
        }
        self.ack_timeouts += 1;
        if self.ack_timeouts < SILENT_ACKS || self.metrics.nats_connected.get() != 1 {
            return;
        }
        self.ack_timeouts = 0;
        tracing::warn!(
            "{SILENT_ACKS} acks in a row timed out on a connection that looks up: taking it for silent and reconnecting to NATS"
        );
        let client = self.chain.client();
        tokio::spawn(async move {
            if let Err(error) = client.force_reconnect().await {
                tracing::warn!(%error, "NATS reconnect failed; the client keeps trying");
            }
        });
    }

    /// Sends every event in the window again, the first one unchained
    /// (everything before it is acked). `retried` of them (at the front)
    /// failed themselves; the others are counted as re-sent.
    async fn resend(&mut self, retried: u64) {
        let sent = self.chain.resend(&mut self.window).await as u64;
        self.metrics.resent.inc_by(sent.saturating_sub(retried));
    }

    async fn flush(&mut self, batches: &Sender<Batch>) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        batches
            .send(std::mem::take(&mut self.batch))
            .await
            .map_err(|_| Error::PipelineClosed)
    }
}

/// A session that ends (or is aborted) with publishes in flight takes its
/// share of the gauge with it; the next session's publisher starts from 0.
impl Drop for Publisher {
    fn drop(&mut self) {
        self.metrics.in_flight.sub(self.window.in_flight() as i64);
    }
}

/// The ack of the oldest event in the window; never completes while the
/// window holds none.
async fn front_ack(window: &mut Window<AckFuture, Held>) -> Result<PublishAck, PublishError> {
    match window.front_mut() {
        Some(sent) => (&mut sent.ack).await,
        None => std::future::pending().await,
    }
}
