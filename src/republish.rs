//! `outbox-tailer republish`: puts `published` events back into the stream
//! (after it was deleted, purged or recreated, or for a consumer that must
//! see them again), as their first publish made them, plus
//! `Outbox-Republished: true`. Rows stay as they are.
//!
//! - **Selection**: `published` rows by `created_at` in `[since, until)` and
//!   the filters, read in `(created_at, id)` pages (a keyset, no offset, no
//!   long snapshot: each page is its own short query).
//! - **Order**: one aggregate's events go in `created_at`, `id` order: an
//!   event is sent only once the aggregate's previous one is acked, and a
//!   failed publish is retried before anything else of its aggregate goes.
//!   Other aggregates' events are pipelined meanwhile.
//! - **Beside a running tailer**: no `Nats-Expected-Last-Msg-Id`. The live
//!   stream chains each publish to the one before it; a republished message
//!   stored in between breaks that chain once, and the tailer sends its
//!   window again from there (go-back-N), so live events are neither lost,
//!   duplicated nor reordered, only resent. `--rate` bounds how often that
//!   happens (docs/design.md, "Republish").
//! - **Duplicates**: `Nats-Msg-Id` is the event id, so a copy still inside
//!   the stream's duplicate window is dropped by JetStream and counted.
//! - **Stopping**: SIGINT/SIGTERM stop after what is in flight; the line
//!   printed says the `created_at` reached, for a rerun with `--since`.

use crate::config::{Config, RepublishArgs};
use crate::db;
use crate::error::Error;
use crate::event::{row_from, OutboxRow};
use crate::metrics::Metrics;
use crate::publish::jetstream::{self, NatsError};
use crate::publish::message::Message;
use crate::shutdown::Shutdown;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// The header that marks a message as republished.
pub const REPUBLISHED: &str = "Outbox-Republished";
/// Rows read per page (held in memory beside the publishes in flight).
const PAGE: i64 = 100;
/// Publishes in flight at once.
const IN_FLIGHT: usize = 256;
/// Tries of one publish before the republish stops.
const TRIES: u32 = 5;
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What a republish did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Events sent (and acked).
    pub sent: u64,
    /// Of them, dropped by JetStream as copies it still had.
    pub duplicates: u64,
    /// Rows whose stored headers no longer keep to the rules: not sent.
    pub skipped: u64,
    /// Where a stop (a signal) left off: the `created_at` reached.
    pub stopped_at: Option<String>,
    /// `--dry-run`: how many events would go.
    pub would_send: Option<u64>,
    pub took: Duration,
}

impl Summary {
    /// What goes to stderr before the closing line: rows not sent, and
    /// where a stop left off.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.skipped > 0 {
            notes.push(format!(
                "{} events not republished: their headers break the rules",
                self.skipped
            ));
        }
        if let Some(at) = &self.stopped_at {
            notes.push(format!(
                "stopped at created_at {at}: run again with --since '{at}' (and the same filters) to go on"
            ));
        }
        notes
    }
}

/// The closing line (contract section 2).
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(count) = self.would_send {
            return write!(f, "would republish {count} events (dry run: nothing sent)");
        }
        write!(
            f,
            "republished {} events ({} already in the stream) in {:.1} s",
            self.sent,
            self.duplicates,
            self.took.as_secs_f64()
        )
    }
}

/// The selection as SQL: a condition on `event_outbox` and its parameters
/// (from `$1` on).
struct Selection {
    condition: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Selection {
    fn new(args: &RepublishArgs) -> Selection {
        let mut selection = Selection {
            condition: "status = 'published'".to_owned(),
            params: Vec::new(),
        };
        if let Some(since) = &args.since {
            selection.time(">=", since);
        }
        if let Some(until) = &args.until {
            selection.time("<", until);
        }
        let filters = [
            ("aggregate_type", &args.aggregate_type),
            ("aggregate_id", &args.aggregate_id),
            ("event_type", &args.event_type),
        ];
        for (column, value) in filters {
            if let Some(value) = value {
                selection.push(column, "=", "", Box::new(value.clone()));
            }
        }
        if !args.ids.is_empty() {
            let n = selection.params.len() + 1;
            selection
                .condition
                .push_str(&format!(" AND id = ANY(${n})"));
            selection.params.push(Box::new(args.ids.clone()));
        }
        selection
    }

    fn push(&mut self, column: &str, op: &str, cast: &str, value: Box<dyn ToSql + Sync + Send>) {
        let n = self.params.len() + 1;
        self.condition
            .push_str(&format!(" AND {column} {op} ${n}{cast}"));
        self.params.push(value);
    }

    /// A time: a duration back from now (`2h`), or a timestamp PostgreSQL
    /// reads (RFC 3339).
    fn time(&mut self, op: &str, text: &str) {
        match humantime::parse_duration(text.trim()) {
            Ok(back) => {
                let n = self.params.len() + 1;
                self.condition.push_str(&format!(
                    " AND created_at {op} now() - ${n}::float8 * interval '1 second'"
                ));
                self.params.push(Box::new(back.as_secs_f64()));
            }
            Err(_) => self.push(
                "created_at",
                op,
                "::text::timestamptz",
                Box::new(text.trim().to_owned()),
            ),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// A publish in flight, and what its row needs for a retry and the order.
struct Sent {
    row: OutboxRow,
    ack: PublishAckFuture,
}

/// Republishes what `args` selects until done or `shutdown`.
pub async fn republish(
    config: &Config,
    args: &RepublishArgs,
    shutdown: Shutdown,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let db = db::connect(config).await?;
    let selection = Selection::new(args);
    if args.dry_run {
        let count: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM event_outbox WHERE {}",
                    selection.condition
                ),
                &selection.params(),
            )
            .await?
            .get(0);
        return Ok(Summary {
            would_send: Some(u64::try_from(count).unwrap_or(0)),
            took: started.elapsed(),
            ..Summary::default()
        });
    }
    let (client, _) = jetstream::connect(config, Arc::new(Metrics::new())).await?;
    let js = jetstream::context(client);
    jetstream::ensure_stream_within(&js, config, Duration::from_secs(30)).await?;
    let columns = db::outbox_row_columns(&db).await?;
    // The cursor is created_at's own text in this session (it reads back
    // exactly, `infinity` included), and the id among equal times.
    let n = selection.params.len();
    let page = |after: &str| {
        format!(
            "SELECT {columns}, created_at::text AS cursor_at FROM event_outbox WHERE {}{after} \
             ORDER BY created_at, id LIMIT {PAGE}",
            selection.condition
        )
    };
    let first_page = page("");
    let next_page = page(&format!(
        " AND (created_at, id) > (${}::text::timestamptz, ${}::uuid)",
        n + 1,
        n + 2
    ));
    let mut summary = Summary::default();
    let mut cursor: Option<(String, Uuid)> = None;
    let mut window: VecDeque<Sent> = VecDeque::new();
    let mut pacing = Pacing::new(args.rate);
    let mut last_progress = Instant::now();
    'pages: loop {
        let mut params = selection.params();
        let rows = match &cursor {
            None => db.query(&first_page, &params).await?,
            Some((at, id)) => {
                params.push(at);
                params.push(id);
                db.query(&next_page, &params).await?
            }
        };
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            if shutdown.is_fired() {
                settle_all(&js, config, &mut window, &mut summary).await?;
                // Everything before the next row is stored: go on from it.
                summary.stopped_at = Some(r.try_get("cursor_at")?);
                break 'pages;
            }
            let row = row_from(r)?;
            let at: String = r.try_get("cursor_at")?;
            // The aggregate's previous event first: acked before this one goes.
            while window
                .iter()
                .any(|sent| sent.row.aggregate_id == row.aggregate_id)
            {
                settle_front(&js, config, &mut window, &mut summary).await?;
            }
            // In flight: at most IN_FLIGHT events, and their payloads
            // within the byte budget (one larger event still goes alone).
            while window.len() >= IN_FLIGHT
                || (!window.is_empty()
                    && in_flight_bytes(&window) + row.payload.len() > config.max_in_flight_bytes)
            {
                settle_front(&js, config, &mut window, &mut summary).await?;
            }
            pacing.wait().await;
            let row_id = row.id;
            match send(&js, config, &row).await {
                Some(ack) => window.push_back(Sent { row, ack: ack? }),
                None => summary.skipped += 1,
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                tracing::info!(
                    sent = summary.sent,
                    duplicates = summary.duplicates,
                    reached = %at,
                    "republishing"
                );
            }
            cursor = Some((at, row_id));
        }
    }
    settle_all(&js, config, &mut window, &mut summary).await?;
    summary.took = started.elapsed();
    Ok(summary)
}

fn in_flight_bytes(window: &VecDeque<Sent>) -> usize {
    window.iter().map(|sent| sent.row.payload.len()).sum()
}

/// Sends `row` as its first publish made it, plus [`REPUBLISHED`]. None for
/// a row whose stored headers no longer keep to the rules.
async fn send(
    js: &async_nats::jetstream::Context,
    config: &Config,
    row: &OutboxRow,
) -> Option<Result<PublishAckFuture, Error>> {
    let message = match Message::from_row(&config.subject_prefix, row) {
        Ok(message) => message,
        Err(error) => {
            tracing::warn!(id = %row.id, %error, "not republished: its headers break the rules");
            return None;
        }
    };
    let mut headers = message.headers;
    headers.insert(REPUBLISHED, "true");
    let publish = PublishMessage::build()
        .payload(message.body)
        .headers(headers);
    Some(
        js.send_publish(message.subject, publish)
            .await
            .map_err(|error| publish_error(row.id, error)),
    )
}

fn publish_error(id: Uuid, error: async_nats::jetstream::context::PublishError) -> Error {
    Error::Nats(NatsError::Republish { id, error })
}

/// Waits for the oldest publish in flight; retries it (nothing of its
/// aggregate is in flight behind it) until it is stored or the tries run out.
async fn settle_front(
    js: &async_nats::jetstream::Context,
    config: &Config,
    window: &mut VecDeque<Sent>,
    summary: &mut Summary,
) -> Result<(), Error> {
    let Some(sent) = window.pop_front() else {
        return Ok(());
    };
    let mut ack = sent.ack;
    let mut tries = 1;
    loop {
        match ack.await {
            Ok(stored) => {
                summary.sent += 1;
                summary.duplicates += u64::from(stored.duplicate);
                return Ok(());
            }
            Err(error) if tries < TRIES => {
                tracing::warn!(id = %sent.row.id, %error, tries, "republish failed; trying again");
                tokio::time::sleep(crate::backoff::Backoff::STALL.delay(tries - 1)).await;
                tries += 1;
                ack = match send(js, config, &sent.row).await {
                    Some(next) => next?,
                    None => return Ok(()),
                };
            }
            Err(error) => return Err(publish_error(sent.row.id, error)),
        }
    }
}

async fn settle_all(
    js: &async_nats::jetstream::Context,
    config: &Config,
    window: &mut VecDeque<Sent>,
    summary: &mut Summary,
) -> Result<(), Error> {
    while !window.is_empty() {
        settle_front(js, config, window, summary).await?;
    }
    Ok(())
}

/// `--rate`: at most `rate` sends a second (0: no limit).
struct Pacing {
    rate: u64,
    started: Instant,
    sent: u64,
}

impl Pacing {
    fn new(rate: u64) -> Pacing {
        Pacing {
            rate,
            started: Instant::now(),
            sent: 0,
        }
    }

    async fn wait(&mut self) {
        self.sent += 1;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        if let Some(early) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(early).await;
        }
    }
}
