//! The catch-up sweeper: publishes `pending` rows the stream will never
//! deliver (rows inserted before the slot existed, requeued rows, rows left
//! behind when a slot was lost and recreated).
//!
//! It reads them through the `(status, next_retry_at, created_at)` index in
//! batches of 500 with `FOR UPDATE SKIP LOCKED`, honouring `next_retry_at`,
//! publishes each batch (pipelined), records failures on their rows as the
//! stream does, marks the rest and commits. It does not race the stream: it
//! only takes rows created well before the time up to which the stream has
//! published every committed transaction (known exactly from samples of the
//! server's time and WAL position, see [`Samples`], and the stream's
//! confirmed position, [`Boundary`], both in `outbox::boundary`), and the stream checks a row created
//! before the sweeper's cutoff before publishing it (a long transaction can
//! commit a row with an old `created_at`). Each batch is published in the
//! sweeper's own turn ([`PublishTurn`]), so it never lands between two
//! chained publishes of the stream. When nothing is due the sweep is one
//! index probe that finds nothing (and the stream is not interrupted).

use crate::config::Config;
use crate::db;
use crate::event::{row_from, OutboxRow};
use crate::outbox::attempts;
use crate::outbox::boundary::{Boundary, Samples};
use crate::outbox::marker::Marker;
use crate::pgtime::PG_EPOCH_UNIX_MICROS;
use crate::publish::chain::Chain;
use crate::publish::policy::{classify, never_sent, verdict, Failure};
use crate::publish::turn::PublishTurn;
use crate::publish::window::Window;
use crate::replication::timeline;
use async_nats::jetstream;
use pgwire_replication::Lsn;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

/// Pending rows whose time to try has come.
macro_rules! pending_due {
    () => {
        "FROM event_outbox WHERE status = 'pending' AND next_retry_at <= now() "
    };
}
/// A row stamped in the future (a producer's clock ahead, up to `infinity`:
/// only such a row has `created_at` after `now()`) goes only when the
/// transaction that wrote it had ended before the stream's confirmed sample
/// (`$2`: the oldest transaction then running, as the 32-bit id `xmin` is;
/// `age` compares ids across a wrap): its commit is before the confirmed
/// position, so the stream is past it and will never deliver it (again).
macro_rules! stamped_ahead_and_passed {
    () => {
        "created_at > now() AND age(xmin) > age($2::text::xid)"
    };
}
/// The rows the sweeper may take: due, and created before the cutoff (`$1`),
/// or stamped in the future and passed by the stream.
macro_rules! due_rows {
    () => {
        concat!(
            pending_due!(),
            "AND (created_at < $1 OR (",
            stamped_ahead_and_passed!(),
            "))"
        )
    };
}
/// Whether any row is due: two index probes, no lock, no turn taken. Each
/// range on `created_at` is an index condition, so the first is index-only
/// and the second reads the heap only for rows stamped in the future.
pub const PROBE_SQL: &str = concat!(
    "SELECT EXISTS (SELECT 1 ",
    pending_due!(),
    "AND created_at < $1) OR EXISTS (SELECT 1 ",
    pending_due!(),
    "AND ",
    stamped_ahead_and_passed!(),
    ")"
);
/// The batch: the first 500 due rows, cut where their payloads pass `$2`
/// bytes (the first row always goes), locked. The sizes are measured on at
/// most 500 rows, not on the whole backlog. The order is total: rows of one
/// transaction share their times, and then go in their physical order
/// (`ctid`), which is the order they were inserted in unless the table
/// reused space freed by a VACUUM. One write moves a row out of that order:
/// the failure recorded on the row a sweep stopped at
/// ([`attempts::record_in_place`]) makes a new tuple version, after its
/// neighbours. That row is the first of its transaction still pending, and
/// the only one with a `last_error` (the rows before it are published, the
/// rows behind it were never tried), so among equal times a row with a
/// `last_error` goes first. (`requeue` rewrites all its rows, so requeued
/// rows of one transaction keep no order but their times anyway.)
const SWEEP_WHERE: &str = concat!(
    "FROM event_outbox WHERE id IN (SELECT id FROM (",
    "SELECT id, row_number() OVER w AS n, sum(size) OVER w AS upto FROM (",
    "SELECT id, ctid AS tid, next_retry_at, created_at, last_error IS NULL AS untried, ",
    "octet_length(payload::text) AS size ",
    due_rows!(),
    " ORDER BY next_retry_at, created_at, last_error IS NULL, ctid LIMIT 500) first ",
    "WINDOW w AS (ORDER BY next_retry_at, created_at, untried, tid)) sized ",
    "WHERE n = 1 OR upto <= $3) ",
    "AND status = 'pending' AND next_retry_at <= now() ",
    "ORDER BY next_retry_at, created_at, last_error IS NULL, ctid FOR UPDATE SKIP LOCKED"
);
/// The server's time, then its WAL insert position (read in that order:
/// every commit before the time was inserted before the position), which
/// server it is ([`timeline::IDENTITY_SQL`]'s columns): a position means
/// something only on the timeline it was read on; and the oldest
/// transaction running at the statement's start (every older one had ended,
/// its commit before the position).
const SAMPLE_SQL: &str =
    "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8, pg_current_wal_insert_lsn(), \
            (SELECT system_identifier::text FROM pg_control_system()), \
            pg_walfile_name(pg_current_wal_insert_lsn()), \
            pg_snapshot_xmin(pg_current_snapshot())::text";

/// The sample's oldest running transaction (64 bits, as text).
fn xmin_of(sample: &tokio_postgres::Row) -> Result<u64, SweepError> {
    let text: String = sample.try_get(4)?;
    text.parse().map_err(|_| {
        SweepError::Internal(format!(
            "the server's snapshot xmin {text:?} is not a number"
        ))
    })
}

/// What the sweeper works with.
pub(crate) struct Sweeper {
    js: jetstream::Context,
    turn: Arc<PublishTurn>,
    boundary: Arc<Boundary>,
    subject_prefix: String,
    /// Rows younger than this (before the stream's boundary) are left alone.
    min_age: Duration,
    max_retries: u32,
    /// Whether marks also project into `event_logs` (`--event-logs`).
    event_logs: bool,
    /// A batch's payload bytes, at most (the byte budget; one larger row
    /// still goes alone).
    max_batch_bytes: i64,
    samples: Samples,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    pub published: u64,
    /// Failed publishes recorded on rows that stay pending.
    pub retried: u64,
    /// Rows that became `failed`.
    pub dead: u64,
}

impl Sweeper {
    /// A sweeper with `config`'s prefix, minimum age, retries, projection
    /// and byte budget (a batch's payload bytes at most).
    pub(crate) fn new(
        js: jetstream::Context,
        turn: Arc<PublishTurn>,
        boundary: Arc<Boundary>,
        config: &Config,
    ) -> Sweeper {
        Sweeper {
            js,
            turn,
            boundary,
            subject_prefix: config.subject_prefix.clone(),
            min_age: config.sweep_min_age,
            max_retries: config.max_retries,
            event_logs: config.event_logs,
            max_batch_bytes: i64::try_from(config.max_in_flight_bytes).unwrap_or(i64::MAX),
            samples: Samples::default(),
        }
    }

    /// Publishes and marks due rows below the cutoff, in batches, until none
    /// is left or NATS fails.
    pub(crate) async fn sweep(&mut self, db: &mut Client) -> Result<Swept, SweepError> {
        let mut swept = Swept::default();
        let sample = db.query_one(SAMPLE_SQL, &[]).await?;
        let at = sample.get::<_, i64>(0) - PG_EPOCH_UNIX_MICROS;
        let server = timeline::parse(sample.get(2), sample.get(3));
        self.samples.push(
            server,
            at,
            Lsn(u64::from(sample.get::<_, PgLsn>(1))),
            xmin_of(&sample)?,
        );
        let confirmed = self.boundary.position();
        let Some(confirmed_at) = self.samples.confirmed_at(confirmed) else {
            return Ok(swept);
        };
        // As the 32-bit id a row's `xmin` is (see `due_rows`).
        let ended_before = (self.samples.confirmed_xmin().unwrap_or(0) & 0xFFFF_FFFF).to_string();
        let age = i64::try_from(self.min_age.as_micros()).unwrap_or(i64::MAX);
        let cutoff = confirmed_at.saturating_sub(age);
        let cutoff_time = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(cutoff + PG_EPOCH_UNIX_MICROS) * 1000,
        )
        .map_err(|e| SweepError::Internal(e.to_string()))?;
        let mut marker: Option<Marker> = None;
        // Rows read with their headers where the table has the column
        // (added by a migration while the tailer runs, or not at all).
        let mut columns = None;
        loop {
            // Nothing due (nearly always): the stream is not interrupted.
            if !db
                .query_one(PROBE_SQL, &[&cutoff_time, &ended_before])
                .await?
                .get::<_, bool>(0)
            {
                return Ok(swept);
            }
            // Taken before any row is locked: the publisher hands over with
            // nothing in flight, and nothing it waits for waits for us.
            let columns = match columns {
                Some(columns) => columns,
                None => *columns.insert(db::outbox_row_columns(db).await?),
            };
            let _turn = self.turn.sweeper().await;
            let tx = db.transaction().await?;
            let rows = tx
                .query(
                    &format!("SELECT {columns} {SWEEP_WHERE}"),
                    &[&cutoff_time, &ended_before, &self.max_batch_bytes],
                )
                .await?;
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(swept);
            }
            // Rows below the cutoff are being taken: from now on the stream
            // looks such rows up before publishing them. Set before
            // publishing, and only when rows were found, so that a sweep with
            // nothing to do costs the stream nothing.
            self.boundary.sweeping_before(cutoff);
            let mut batch = Vec::with_capacity(rows.len());
            for r in &rows {
                match row_from(r) {
                    Ok(row) => batch.push(row),
                    // A NULL the contract has no room for (after a schema
                    // change): it fails alone, as the stream fails it.
                    Err(error) => {
                        let id = r.try_get(0)?;
                        if attempts::record_unpublishable(&tx, id, &error).await? == Some(true) {
                            swept.dead += 1;
                        }
                    }
                }
            }
            let settled = self.publish(&tx, batch, &mut swept).await?;
            // The stream's mark path: the same statement, `event_logs` too
            // (prepared once a sweep, on the first batch).
            let prepared = match marker.take() {
                Some(prepared) => prepared,
                None => Marker::prepare(&tx, self.event_logs).await?,
            };
            prepared.mark(&tx, &settled.acked, &[]).await?;
            marker = Some(prepared);
            tx.commit().await?;
            swept.published += settled.acked.len() as u64;
            if settled.stalled {
                // The next sweep tries again rather than timing out batch
                // after batch while NATS is down or the stream is full.
                return Ok(swept);
            }
        }
    }

    /// Publishes one batch in order, chained, with the stream's go-back-N
    /// and failure policy (`publish::policy`), recording failures in `tx`.
    /// At the first failure that leaves its event pending, the sweep stops:
    /// the event keeps its place (its `next_retry_at` is not moved), so the
    /// next sweep, an interval later, tries it first and nothing behind it
    /// overtakes it. Moving it back would put it behind every later row.
    async fn publish(
        &self,
        tx: &Transaction<'_>,
        batch: Vec<OutboxRow>,
        swept: &mut Swept,
    ) -> Result<Settled, SweepError> {
        let mut chain = Chain::new(self.js.clone(), self.subject_prefix.clone());
        let mut window = Window::new();
        for row in batch {
            let ack = chain.send(&row).await;
            window.push_event(row, (0, 0), ack, ());
        }
        let mut settled = Settled::default();
        // The chain broke under us (another publisher wrote meanwhile):
        // the window goes again, a few times at most.
        let mut chain_breaks = 0;
        while let Some(front) = window.front_mut() {
            let error = match (&mut front.ack).await {
                Ok(_) => {
                    if let Some(sent) = window.settle_front() {
                        settled.acked.push(sent.row.id);
                    }
                    continue;
                }
                Err(error) => error,
            };
            let id = front.row.id;
            let front_trace = front.row.trace_id();
            let failure = classify(&error);
            if failure == Failure::Chain && chain_breaks < 3 {
                chain_breaks += 1;
                chain.resend(&mut window).await;
                continue;
            }
            // It keeps its place (no backoff, so the attempts so far do not
            // matter): the next sweep tries it first, and the rows behind it
            // (refused by the chain) wait for it.
            let verdict = verdict(failure, 0, self.max_retries);
            let dead = attempts::record_in_place(tx, id, &error.to_string(), verdict).await?;
            window.settle_front();
            if dead == Some(true) {
                swept.dead += 1;
                tracing::warn!(%id, trace_id = front_trace, %error, "swept event failed (dead letter); `outbox-tailer requeue` retries it");
                // The rest were chained to it, unless it was never sent.
                if !never_sent(&error) {
                    chain.resend(&mut window).await;
                }
                continue;
            }
            swept.retried += 1;
            settled.stalled = true;
            break;
        }
        Ok(settled)
    }
}

/// What became of one batch.
#[derive(Debug, Default)]
struct Settled {
    /// Acked, in order: to be marked.
    acked: Vec<Uuid>,
    /// An event failed and stays pending: the rest waits for the next sweep.
    stalled: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SweepError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Internal(String),
}
