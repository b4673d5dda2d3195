//! Shared pieces of the tailer's integration tests: a migrated database and a
//! NATS server, the real `outbox-tailer` binary as a child process, load,
//! reading the stream back, and bounded waits.

pub mod dockerfile;
pub mod load;
pub mod proxy;
pub mod tools;

pub use load::{Load, LoadOptions};

use async_nats::jetstream;
use outbox_testkit::{alembic, repo_root, NatsServer, PgServer};
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

pub const DB: &str = "chat";
/// The slot and stream names the tailer uses by default.
pub const SLOT: &str = "event_outbox_tailer";
pub const STREAM: &str = "EVENTS";

/// A migrated database with the tailer's least-privilege role
/// (`sql/roles.sql`), and a NATS server.
pub struct Env {
    pub pg: PgServer,
    pub nats: NatsServer,
    /// The superuser's URL: producers, and the tests' own checks.
    pub url: String,
    /// The tailer's URL: the `outbox_tailer` role, as the docs deploy it.
    pub tailer_url: String,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(PgServer::builder()).await
    }

    pub async fn start_with(pg: outbox_testkit::PgBuilder) -> Env {
        let pg = pg.start().expect("start postgres");
        let nats = NatsServer::start().expect("start nats-server");
        let (url, tailer_url) = migrate(&pg).await;
        Env {
            pg,
            nats,
            url,
            tailer_url,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub async fn db(&self) -> Client {
        self.pg.connect(DB).await.unwrap()
    }

    pub async fn js(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        jetstream::new(client)
    }

    /// Starts the tailer binary with the test's servers and `args`.
    pub fn tailer(&self, args: &[&str]) -> Tailer {
        Tailer::spawn(&self.tailer_url, &self.nats.url(), args, self.dir.path())
    }

    /// Starts the tailer and waits until it holds the default slot.
    pub async fn streaming(&self, db: &Client, args: &[&str]) -> Tailer {
        let tailer = self.tailer(args);
        wait_streaming(db, SLOT, &tailer).await;
        tailer
    }
}

/// Creates the database, migrates it and adds the tailer's role; returns the
/// superuser's URL and the tailer's.
pub async fn migrate(pg: &PgServer) -> (String, String) {
    let url = pg.create_database(DB).await.unwrap();
    alembic(&url, &["upgrade", "head"]).unwrap();
    let roles = std::fs::read_to_string(repo_root().join("sql/roles.sql")).unwrap();
    pg.connect(DB)
        .await
        .unwrap()
        .batch_execute(&roles)
        .await
        .unwrap();
    (url, pg.url_as("outbox_tailer", DB))
}

/// The real `outbox-tailer` binary, killed (-9) on drop.
pub struct Tailer {
    pub child: Child,
    pub log: PathBuf,
}

impl Tailer {
    pub fn spawn(
        database_url: &str,
        nats_url: &str,
        args: &[&str],
        dir: &std::path::Path,
    ) -> Tailer {
        Tailer::spawn_env(database_url, nats_url, args, dir, &[])
    }

    /// As [`Tailer::spawn`], with more environment variables.
    pub fn spawn_env(
        database_url: &str,
        nats_url: &str,
        args: &[&str],
        dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Tailer {
        let log = dir.join(format!("tailer-{}.log", fastrand::u64(..)));
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("NATS_URL", nats_url)
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info,outbox_tailer=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Tailer { child, log }
    }

    /// SIGTERM, as a container runtime stops it.
    pub fn terminate(&self) {
        outbox_testkit::procfs::terminate(self.child.id());
    }

    /// kill -9, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 10 s.
    pub fn stop_cleanly(&mut self) {
        self.terminate();
        let status = self
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM:\n{}", self.output()));
        assert!(status.success(), "exit status {status}:\n{}", self.output());
    }

    /// Waits for exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url`: (status, body); (0, "") when nothing answers.
pub async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The sum of every sample of metric `name` in a Prometheus text scrape.
pub fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the tailer to its exit (bounded) and returns (exit code, output).
pub fn run_to_exit(database_url: &str, nats_url: &str, args: &[&str]) -> (i32, String) {
    run_to_exit_env(database_url, nats_url, args, &[])
}

/// As [`run_to_exit`], with more environment variables.
pub fn run_to_exit_env(
    database_url: &str,
    nats_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut tailer = Tailer::spawn_env(database_url, nats_url, args, dir.path(), env);
    let status = tailer
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no exit within 30 s:\n{}", tailer.output()));
    let output = tailer.output();
    assert!(!output.contains("panicked"), "{output}");
    (status.code().unwrap_or(-1), output)
}

/// The last line the tailer printed: the one an operator reads.
pub fn last_line(output: &str) -> &str {
    output.lines().last().unwrap_or("")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_seen(what, timeout, || {
        let checked = check();
        async move { checked.await.ok_or_else(String::new) }
    })
    .await
}

/// Like [`wait_for`], but `check` says what it saw when it is not there
/// yet, and the timeout names the last of it: a stall reads differently from
/// a slow machine.
pub async fn wait_for_seen<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}{}{seen}",
            if seen.is_empty() { "" } else { "; last seen: " }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the tailer holds the slot (it is streaming).
/// Whether `tailer` is the process holding the slot: the slot's walsender's
/// client port is a socket of the tailer's.
pub async fn holds_slot(db: &Client, tailer: &Tailer) -> bool {
    let port: Option<i32> = db
        .query_opt(
            "SELECT r.client_port FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
            &[&SLOT],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get(0));
    port.and_then(|p| u16::try_from(p).ok())
        .is_some_and(|p| outbox_testkit::procfs::holds_local_port(tailer.child.id(), p))
}

pub async fn wait_streaming(db: &Client, slot: &str, tailer: &Tailer) {
    wait_for(
        "the tailer to hold the slot",
        Duration::from_secs(30),
        || async {
            let active: Option<bool> = db
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            assert!(
                !tailer.output().contains("panicked"),
                "tailer panicked:\n{}",
                tailer.output()
            );
            (active == Some(true)).then_some(())
        },
    )
    .await
}

/// Count of messages in the stream (0 while it does not exist).
pub async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message in the stream, in stream order.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut messages = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return messages;
    }
    let s = &s;
    for seq in state.first_sequence..=state.last_sequence {
        // Right after a cluster fault a direct get can meet "JetStream system
        // temporarily unavailable" (503) while every replica reports current.
        let message = wait_for_seen(
            &format!("message {seq} of {stream}"),
            Duration::from_secs(30),
            || async move { s.get_raw_message(seq).await.map_err(|e| e.to_string()) },
        )
        .await;
        messages.push(message);
    }
    messages
}

/// Rows by status.
pub async fn status_counts(db: &Client) -> (i64, i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'published'), \
                    count(*) FILTER (WHERE status = 'failed') FROM event_outbox",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Waits until no row is pending and the stream holds `expected` messages.
pub async fn wait_all_published(
    db: &Client,
    js: &jetstream::Context,
    stream: &str,
    expected: u64,
    timeout: Duration,
) {
    wait_for_seen(
        &format!("{expected} events published and marked"),
        timeout,
        || async {
            let (pending, published, failed) = status_counts(db).await;
            let in_stream = stream_count(js, stream).await;
            if pending == 0 && published as u64 == expected && in_stream >= expected {
                Ok(())
            } else {
                Err(format!(
                    "{pending} pending, {published} published, {failed} failed, {in_stream} in the stream"
                ))
            }
        },
    )
    .await
}

/// Inserts `n` events for `aggregate` in one transaction; payload `{"agg", "n"}` from `first`.
pub async fn insert_events(db: &Client, aggregate: &str, first: i64, n: i64) {
    try_insert_events(db, aggregate, first, n).await.unwrap();
}

pub async fn try_insert_events(
    db: &Client,
    aggregate: &str,
    first: i64,
    n: i64,
) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'chat', $1, 'message.created', jsonb_build_object('agg', $1::text, 'n', i) \
         FROM generate_series($2::bigint, $2::bigint + $3::bigint - 1) i",
        &[&aggregate, &first, &n],
    )
    .await
    .map(drop)
}

/// Drops `aggregate_type`'s NOT NULL (a schema change the contract does not
/// allow) and inserts one event of aggregate `no-type` without one: an event
/// that cannot become a message.
pub async fn insert_undecodable(db: &Client) -> Result<(), tokio_postgres::Error> {
    db.batch_execute(
        "ALTER TABLE event_outbox ALTER COLUMN aggregate_type DROP NOT NULL; \
         INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES (NULL, 'no-type', 'message.created', '{}')",
    )
    .await
}

/// Every row's id, as text.
pub async fn table_ids(db: &Client) -> std::collections::HashSet<String> {
    db.query("SELECT id::text FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until the outbox's (pending, published, failed) counts are
/// `counts`, then asserts the stream holds `published` messages.
pub async fn wait_settled(db: &Client, js: &jetstream::Context, counts: (i64, i64, i64)) {
    wait_for("every row settled", Duration::from_secs(30), || async {
        (status_counts(db).await == counts).then_some(())
    })
    .await;
    assert_eq!(stream_count(js, STREAM).await, counts.1 as u64);
}

/// The `last_error` of the (first) row of aggregate `aggregate`.
pub async fn last_error(db: &Client, aggregate: &str) -> String {
    db.query_one(
        "SELECT coalesce(last_error, '') FROM event_outbox WHERE aggregate_id = $1 LIMIT 1",
        &[&aggregate],
    )
    .await
    .unwrap()
    .get(0)
}

/// Inserts one event of aggregate `aggregate` with a 2 MB payload: over
/// nats-server's default `max_payload` of 1 MB.
pub async fn insert_oversized(db: &Client, aggregate: &str) {
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('chat', $1, 'message.created', jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024)))",
        &[&aggregate],
    )
    .await
    .unwrap();
}

/// The table is the truth (an insert whose reply was lost may still have
/// committed): waits until every row is published and asserts the stream
/// holds exactly that many messages, so none is missing or twice.
pub async fn assert_every_row_published_once(
    db: &Client,
    js: &jetstream::Context,
    stream: &str,
    timeout: Duration,
) {
    let committed: i64 = db
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    wait_all_published(db, js, stream, committed as u64, timeout).await;
    assert_eq!(
        stream_count(js, stream).await,
        committed as u64,
        "every event once"
    );
}

/// Where the stream breaks the commit order of an aggregate: events whose
/// payload number `n` is not above the one stored before them for the same
/// `Outbox-Aggregate-Id` (payloads without `n` are skipped).
pub fn order_breaks(messages: &[jetstream::message::StreamMessage]) -> Vec<String> {
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut breaks = Vec::new();
    for m in messages {
        let Some(aggregate) = m.headers.get("Outbox-Aggregate-Id") else {
            continue;
        };
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let Some(n) = body["n"].as_i64() else {
            continue;
        };
        if let Some(previous) = last.insert(aggregate.as_str().to_owned(), n) {
            if previous >= n {
                breaks.push(format!(
                    "aggregate {}: {n} after {previous}",
                    aggregate.as_str()
                ));
            }
        }
    }
    breaks
}

/// The operator's stream, created before the tailer: it takes `max_messages`
/// and then refuses more (discard `new`).
pub async fn create_full_stream(js: &jetstream::Context, max_messages: i64) {
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        max_messages,
        discard: jetstream::stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The operator lifts the stream's message limit.
pub async fn lift_stream_limit(js: &jetstream::Context) {
    let mut config = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.max_messages = -1;
    js.update_stream(config).await.unwrap();
}

/// A message's headers as (name, value) pairs sorted by name (a header map
/// keeps no order), without those `drop` says to leave out.
pub fn sorted_headers(
    message: &jetstream::message::StreamMessage,
    drop: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(|v| (name.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .filter(|(name, _)| !drop(name))
        .collect();
    pairs.sort();
    pairs
}
