//! `outbox-tailer republish`: puts `published` events back into the stream
//! (after it was deleted, purged or recreated, or for a consumer that must
//! see them again), as their first publish made them, plus
//! `Outbox-Republished: true`. Rows stay as they are.
//!
//! - **Selection**: `published` rows by `created_at` in `[since, until)` and
//!   the filters, read in `(created_at, id)` pages (a keyset, no offset, no
//!   long snapshot: each page is its own short query).
//! - **Order**: one aggregate's events go in `created_at`, `id` order: an
//!   event is sent only once the aggregate's previous one is acked (until
//!   then it is held back), and a failed publish is retried before anything
//!   else of its aggregate goes. Other aggregates' events are pipelined
//!   meanwhile, up to [`IN_FLIGHT`] publishes.
//! - **Memory**: the page read and what is under way (sent or held) each
//!   hold payloads of at most half of `--max-in-flight-bytes`.
//! - **Progress**: [`progress`]: a bar on a terminal, log lines otherwise.
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

pub mod progress;

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
use progress::Progress;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// The header that marks a message as republished.
pub const REPUBLISHED: &str = "Outbox-Republished";
/// Rows read per page at most (fewer when the payloads are big).
const PAGE: i64 = 100;
/// Publishes in flight at once.
const IN_FLIGHT: usize = 256;
/// Rows held back behind their aggregate's event in flight, at most (a
/// stop sends them first, without `--rate`).
const HELD: usize = 1024;
/// Tries of one publish before the republish stops.
const TRIES: u32 = 5;

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

/// The selection's queries, as [`republish`] runs them (a test EXPLAINs
/// them on a big outbox, plain and partitioned).
pub struct Pages {
    /// The first page: [`Pages::first_params`].
    pub first: String,
    /// A page after a cursor: [`Pages::next_params`].
    pub next: String,
    /// How many rows the selection holds: [`Pages::params`].
    pub count: String,
    /// Run on the connection before its first page. A page is read from its
    /// cursor along an index, never by reading what is left of the range and
    /// sorting it: the planner costs each page alone and, as it counts the
    /// cursor's bound and the selection's on created_at apart, may think
    /// fewer rows are left than a page holds and choose the sort, which
    /// every page would then do again over the rest (quadratic). So sorting
    /// is off (`--aggregate-id`'s index is still read with an incremental
    /// sort, by time then id within one time), except for `--ids`: its rows
    /// are found by primary key and sorting those few is the plan.
    pub session: &'static str,
    selection: Selection,
}

impl Pages {
    /// `columns`: the row's columns ([`crate::event::ROW_COLUMNS`] or
    /// with headers). A page holds at most the rows its parameters say and,
    /// beyond its first row, payloads of at most `page_bytes` together.
    pub fn new(args: &RepublishArgs, columns: &str, page_bytes: usize) -> Pages {
        let selection = Selection::new(args);
        let n = selection.params.len();
        // The running total of the payloads' bytes (their text, `payload`
        // in the columns) cuts the page short, over the page's rows only.
        let page = |after: &str, limit: usize| {
            format!(
                "SELECT * FROM (SELECT *, sum(octet_length(payload)) OVER page AS page_bytes, \
                 row_number() OVER page AS page_row FROM (\
                 SELECT {columns}, created_at::text AS cursor_at, created_at AS page_at \
                 FROM event_outbox WHERE {}{after} ORDER BY created_at, id LIMIT ${limit}) page_rows \
                 WINDOW page AS (ORDER BY page_at, id ROWS UNBOUNDED PRECEDING)) page \
                 WHERE page_row = 1 OR page_bytes <= {page_bytes}",
                selection.condition
            )
        };
        // The cursor is created_at's own text in this session (it reads back
        // exactly, `infinity` included), and the id among equal times. The
        // row comparison is where the index range starts, so a page never
        // reads again the rows of its cursor's time that came before it (a
        // bulk transaction's rows share one created_at: filtering them
        // instead made each page read from their first, quadratic in their
        // number). The plain bound beside it lets the planner skip the
        // partitions before the cursor (a row comparison prunes none).
        let after = format!(
            " AND created_at >= ${a}::text::timestamptz \
             AND (created_at, id) > (${a}::text::timestamptz, ${b}::uuid)",
            a = n + 1,
            b = n + 2
        );
        Pages {
            first: page("", n + 1),
            next: page(&after, n + 3),
            count: format!(
                "SELECT count(*) FROM event_outbox WHERE {}",
                selection.condition
            ),
            session: match args.ids.is_empty() {
                true => "SET enable_sort = off",
                false => "RESET enable_sort",
            },
            selection,
        }
    }

    /// The parameters of [`Pages::count`].
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.selection.params()
    }

    /// The parameters of [`Pages::first`]: at most `rows` rows.
    pub fn first_params<'a>(&'a self, rows: &'a i64) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut params = self.selection.params();
        params.push(rows);
        params
    }

    /// The parameters of [`Pages::next`]: after the row at `at`
    /// (`created_at::text`), `id`; at most `rows` rows.
    pub fn next_params<'a>(
        &'a self,
        at: &'a String,
        id: &'a Uuid,
        rows: &'a i64,
    ) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut params = self.selection.params();
        params.push(at);
        params.push(id);
        params.push(rows);
        params
    }
}

/// Republishes what `args` selects until done or `shutdown`.
pub async fn republish(
    config: &Config,
    args: &RepublishArgs,
    shutdown: Shutdown,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let db = db::connect(config).await?;
    let pages = Pages::new(args, db::outbox_row_columns(&db).await?, budget(config));
    if args.dry_run {
        let count: i64 = db.query_one(&pages.count, &pages.params()).await?.get(0);
        return Ok(Summary {
            would_send: Some(u64::try_from(count).unwrap_or(0)),
            took: started.elapsed(),
            ..Summary::default()
        });
    }
    let (client, _) = jetstream::connect(config, Arc::new(Metrics::new())).await?;
    let js = jetstream::context(client);
    jetstream::ensure_stream_within(&js, config, Duration::from_secs(30)).await?;
    let mut flight = Flight::new(config, args.rate, Progress::new(count_beside(config, args)));
    let mut summary = Summary::default();
    db.batch_execute(pages.session).await?;
    let mut cursor: Option<(String, Uuid)> = None;
    let mut limit = PAGE;
    'pages: loop {
        let rows = match &cursor {
            None => db.query(&pages.first, &pages.first_params(&limit)).await?,
            Some((at, id)) => {
                db.query(&pages.next, &pages.next_params(at, id, &limit))
                    .await?
            }
        };
        if rows.is_empty() {
            break;
        }
        // As many rows next time as this page's payloads say fit: the
        // server then reads (and sums) few rows past the cut.
        let bytes: i64 = rows[rows.len() - 1].try_get("page_bytes")?;
        let average = (bytes / rows.len() as i64).max(1);
        limit = (budget(config) as i64 / average).clamp(1, PAGE);
        for r in &rows {
            let at: String = r.try_get("cursor_at")?;
            if shutdown.is_fired() {
                // The rows held back go too, at once: at most HELD, and
                // then everything before this row is stored.
                flight.pacing = Pacing::new(0);
                flight.settle_all(&js, &mut summary).await?;
                // Go on from this row.
                summary.stopped_at = Some(at);
                break 'pages;
            }
            let row = row_from(r)?;
            let id = row.id;
            flight.take(&js, row, &mut summary).await?;
            cursor = Some((at, id));
        }
    }
    flight.settle_all(&js, &mut summary).await?;
    flight.progress.finish();
    summary.took = started.elapsed();
    Ok(summary)
}

/// The payload bytes a page may hold, and those under way may: half of
/// `--max-in-flight-bytes` each, so that a republish stays within it (but
/// for one event larger than half, which still goes alone).
fn budget(config: &Config) -> usize {
    config.max_in_flight_bytes / 2
}

/// Counts the selection on a connection of its own, beside the republish,
/// for the progress bar's total; dropped (no total) if it fails.
fn count_beside(config: &Config, args: &RepublishArgs) -> oneshot::Receiver<u64> {
    let (total, counted) = oneshot::channel();
    let config = config.clone();
    let args = args.clone();
    tokio::spawn(async move {
        let db = db::connect(&config).await.ok()?;
        let pages = Pages::new(&args, db::outbox_row_columns(&db).await.ok()?, 0);
        let count: i64 = db
            .query_one(&pages.count, &pages.params())
            .await
            .ok()?
            .get(0);
        total.send(u64::try_from(count).ok()?).ok()
    });
    counted
}

/// A publish in flight, and the row it is of (for a retry and the order).
struct Sent {
    row: OutboxRow,
    ack: PublishAckFuture,
}

/// What is under way: publishes in flight, oldest first, and rows held back
/// until their aggregate's event in flight is acked; their payloads' bytes
/// together stay within [`budget`] (one larger event still goes alone).
struct Flight<'c> {
    config: &'c Config,
    window: VecDeque<Sent>,
    /// Per aggregate with an event in flight: its next rows, in order.
    held: HashMap<String, VecDeque<OutboxRow>>,
    held_rows: usize,
    bytes: usize,
    pacing: Pacing,
    progress: Progress,
}

impl<'c> Flight<'c> {
    fn new(config: &'c Config, rate: u64, progress: Progress) -> Flight<'c> {
        Flight {
            config,
            window: VecDeque::new(),
            held: HashMap::new(),
            held_rows: 0,
            bytes: 0,
            pacing: Pacing::new(rate),
            progress,
        }
    }

    /// Sends `row`, or holds it behind its aggregate's event in flight;
    /// first waits for room.
    async fn take(
        &mut self,
        js: &async_nats::jetstream::Context,
        row: OutboxRow,
        summary: &mut Summary,
    ) -> Result<(), Error> {
        let size = row.payload.len();
        while !self.window.is_empty()
            && (self.bytes + size > budget(self.config) || self.held_rows >= HELD)
        {
            self.settle_front(js, summary).await?;
        }
        if let Some(queue) = self.held.get_mut(&row.aggregate_id) {
            queue.push_back(row);
            self.held_rows += 1;
            self.bytes += size;
            return Ok(());
        }
        // Settling sends only rows held behind other aggregates: this one's
        // has nothing in flight still.
        while self.window.len() >= IN_FLIGHT {
            self.settle_front(js, summary).await?;
        }
        self.bytes += size;
        if !self.launch(js, row, summary).await? {
            self.bytes -= size;
        }
        Ok(())
    }

    /// Publishes `row` (its aggregate has nothing in flight); false if it
    /// was not sent (its stored headers break the rules).
    async fn launch(
        &mut self,
        js: &async_nats::jetstream::Context,
        row: OutboxRow,
        summary: &mut Summary,
    ) -> Result<bool, Error> {
        self.pacing.wait().await;
        match send(js, self.config, &row).await {
            Some(ack) => {
                let ack = ack?;
                self.held.entry(row.aggregate_id.clone()).or_default();
                self.window.push_back(Sent { row, ack });
                Ok(true)
            }
            None => {
                summary.skipped += 1;
                Ok(false)
            }
        }
    }

    /// Waits for the oldest publish in flight, retrying it (nothing of its
    /// aggregate is in flight behind it) until it is stored or the tries
    /// run out; then sends the aggregate's next held row.
    async fn settle_front(
        &mut self,
        js: &async_nats::jetstream::Context,
        summary: &mut Summary,
    ) -> Result<(), Error> {
        let Some(sent) = self.window.pop_front() else {
            return Ok(());
        };
        let mut ack = sent.ack;
        let mut tries = 1;
        loop {
            match ack.await {
                Ok(stored) => {
                    summary.sent += 1;
                    summary.duplicates += u64::from(stored.duplicate);
                    self.progress
                        .tick(summary.sent, summary.duplicates, &sent.row.created_at);
                    break;
                }
                Err(error) if tries < TRIES => {
                    tracing::warn!(id = %sent.row.id, %error, tries, "republish failed; trying again");
                    tokio::time::sleep(crate::backoff::Backoff::STALL.delay(tries - 1)).await;
                    tries += 1;
                    ack = match send(js, self.config, &sent.row).await {
                        Some(next) => next?,
                        None => break,
                    };
                }
                Err(error) => return Err(publish_error(sent.row.id, error)),
            }
        }
        self.bytes -= sent.row.payload.len();
        let aggregate = sent.row.aggregate_id;
        while let Some(next) = self.held.get_mut(&aggregate).and_then(VecDeque::pop_front) {
            self.held_rows -= 1;
            let size = next.payload.len();
            if self.launch(js, next, summary).await? {
                return Ok(());
            }
            self.bytes -= size;
        }
        self.held.remove(&aggregate);
        Ok(())
    }

    /// Settles everything, held rows included.
    async fn settle_all(
        &mut self,
        js: &async_nats::jetstream::Context,
        summary: &mut Summary,
    ) -> Result<(), Error> {
        while !self.window.is_empty() {
            self.settle_front(js, summary).await?;
        }
        Ok(())
    }
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
