//! Each stage of the tailer's pipeline alone, at full speed, on throwaway
//! servers on this machine (fsync on): where one tailer saturates. The
//! figures behind "The road past one slot" in docs/design.md.
//!
//! Phases (each on a fresh outbox of `--events` committed events, in
//! transactions of 100, ~400-byte chat payloads like the benchmark's, over
//! 64 chats):
//! - decode: the walsender alone. A pgoutput slot (created before the
//!   events) is read to its end by `pg_recvlogical -f /dev/null`, a consumer
//!   that does nothing; events/s, and the walsender's CPU seconds (one
//!   process: its ceiling is one core).
//! - decode2 (not run by default): the same with two slots read at once,
//!   each on a publication whose row filter takes half of the aggregates
//!   (`hashtext(aggregate_id) & 1 = k`): what a second slot buys.
//! - mark: the marker alone. The tailer's own `Marker` (`UPDATE … WHERE id =
//!   ANY($1) AND status = 'pending' RETURNING id`) over every row in batches
//!   of `--batch` with one connection and one batch in flight, then with two
//!   connections marking disjoint batches at the same time; rows/s, and the
//!   CPU seconds of PostgreSQL (every process).
//! - publish: JetStream alone. The same events as messages
//!   (`Message::from_row`), chained with `Nats-Expected-Last-Msg-Id` as the
//!   tailer sends them, `--window` in flight, no PostgreSQL in the loop;
//!   messages/s, and the CPU seconds of nats-server and of this process.
//!
//! - drain (not run by default): the whole tailer on the same events, for
//!   comparison, with how full the marker's batches were
//!   (`outbox_mark_batch_size`): full batches (2,000) mean the marker was
//!   behind, small ones that it kept up.
//!
//! Each figure is one `result` line. The machine's load average is printed
//! before and after: on a shared machine the figures are only as quiet as it.

use async_nats::jetstream::{self, message::PublishMessage, stream};
use clap::Parser;
use outbox_tailer::internals::{row_from, Marker, Message, ROW_COLUMNS};
use outbox_testkit::procfs;
use outbox_testkit::{alembic, NatsServer, PgServer};
use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
struct Args {
    /// Events committed before each phase.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Rows per marker batch (the tailer's largest).
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Publishes in flight (the tailer's window).
    #[arg(long, default_value_t = 4_096)]
    window: usize,
    /// Run only these phases (decode, decode2, mark, mark1, mark2, publish,
    /// drain; mark is mark1 then mark2).
    #[arg(long, value_delimiter = ',', default_value = "decode,mark,publish")]
    phases: Vec<String>,
    /// PostgreSQL fsync and synchronous_commit.
    #[arg(long, default_value = "on")]
    fsync: String,
}

/// One `pg_recvlogical` and the walsender serving it.
struct Reader {
    child: std::process::Child,
    slot: String,
    walsender: Option<u32>,
    walsender_cpu: f64,
    /// pg_recvlogical's own CPU seconds.
    cpu: f64,
    /// Seconds from the start until it reached the end.
    done: Option<f64>,
}

/// The slots and publications of `slots` partitions: the tailer's
/// publication for one, filtered ones for more.
fn partitions(slots: usize) -> Vec<(String, String)> {
    match slots {
        1 => vec![("ceiling".into(), "event_outbox_pub".into())],
        _ => (0..slots)
            .map(|k| (format!("ceiling_{k}"), format!("ceiling_pub_{k}")))
            .collect(),
    }
}
const STREAM: &str = "CEILING";

struct Ceiling {
    pg: PgServer,
    nats: NatsServer,
    db: Client,
    args: Args,
}

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        // The whole chain: tokio-postgres says only "db error" at the top.
        let mut line = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            line = format!("{line}: {cause}");
            source = cause.source();
        }
        eprintln!("ceiling: {line}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let args = Args::parse();
    if args.events == 0 || args.batch == 0 || args.window == 0 {
        return Err("--events, --batch and --window must be positive".into());
    }
    for phase in &args.phases {
        if ![
            "decode", "decode2", "mark", "mark1", "mark2", "publish", "drain",
        ]
        .contains(&phase.as_str())
        {
            return Err(format!(
                "unknown phase {phase} (decode, decode2, mark, mark1, mark2, publish, drain)"
            )
            .into());
        }
    }
    // The benchmark's server settings: a checkpoint does not land mid-phase.
    let pg = PgServer::builder()
        .setting("fsync", &args.fsync)
        .setting("synchronous_commit", &args.fsync)
        .setting("shared_buffers", "256MB")
        .setting("max_wal_size", "4GB")
        .setting("checkpoint_timeout", "30min")
        .start()?;
    let nats = NatsServer::start()?;
    let url = pg.create_database("chat").await?;
    alembic(&url, &["upgrade", "head"])?;
    let db = pg.connect("chat").await?;
    let version: String = db.query_one("SHOW server_version", &[]).await?.get(0);
    println!(
        "ceiling: PostgreSQL {version} (fsync={0}, synchronous_commit={0}), nats-server, {1} cores, {2} events; load average {3}",
        args.fsync,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.events,
        loadavg(),
    );
    let ceiling = Ceiling { pg, nats, db, args };
    for phase in &ceiling.args.phases {
        match phase.as_str() {
            "decode" => ceiling.decode(1).await?,
            "decode2" => ceiling.decode(2).await?,
            "mark" => {
                let one = ceiling.mark(1).await?;
                let two = ceiling.mark(2).await?;
                println!("result   mark     2 vs 1 connection: {:.2}x", two / one);
            }
            "drain" => ceiling.drain().await?,
            // One connection count alone, to run them in either order.
            "mark1" => drop(ceiling.mark(1).await?),
            "mark2" => drop(ceiling.mark(2).await?),
            _ => ceiling.publish().await?,
        }
    }
    println!("ceiling: done; load average {}", loadavg());
    Ok(())
}

impl Ceiling {
    /// A fresh outbox of `--events` committed events in transactions of 100,
    /// spread over 64 aggregates (chats), written by one server-side loop
    /// (fast; not measured). With `slots` > 0, pgoutput slots are created
    /// first, so they stream them: one on the tailer's publication, or
    /// several, each on a publication whose row filter takes its share of
    /// the aggregates (`hashtext(aggregate_id) & (slots - 1) = k`).
    async fn load(&self, slots: usize) -> Result<()> {
        self.db
            .batch_execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots; \
                 TRUNCATE event_outbox",
            )
            .await?;
        // As the benchmark: clean before the load, not after, so the rows are
        // marked as the tailer meets them (just written, never vacuumed, and
        // no checkpoint in between to make every page's first change a
        // full-page image).
        self.db.batch_execute("VACUUM ANALYZE event_outbox").await?;
        self.db.batch_execute("CHECKPOINT").await?;
        for (k, (slot, publication)) in partitions(slots).iter().enumerate() {
            if slots > 1 {
                self.db
                    .batch_execute(&format!(
                        "DROP PUBLICATION IF EXISTS {publication}; \
                         CREATE PUBLICATION {publication} FOR TABLE event_outbox \
                           WHERE ((hashtext(aggregate_id) & {mask}) = {k}) \
                           WITH (publish = 'insert', publish_via_partition_root = true)",
                        mask = slots - 1
                    ))
                    .await?;
            }
            self.db
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await?;
        }
        let started = Instant::now();
        // The benchmark's payload: ~400 bytes of JSON.
        self.db
            .batch_execute(&format!(
                "DO $$
                 DECLARE
                   u uuid := gen_random_uuid();
                   p uuid := gen_random_uuid();
                 BEGIN
                   FOR b IN 0..({n} - 1) / 100 LOOP
                     INSERT INTO event_outbox (id, aggregate_type, aggregate_id, user_id, project_id, event_type, payload)
                     SELECT id, 'chat', chat, u, p, 'message.created',
                       jsonb_build_object('message_id', id, 'chat_id', chat, 'project_id', p, 'user_id', u, 'role', 'user',
                         'content', 'message ' || (b * 100 + i) || ': the deploy finished, the dashboards look green, and the on-call rotation for next week is posted in the channel; ping me if the lag alert fires again.')
                     FROM (SELECT gen_random_uuid() AS id, 'chat-' || (i % 64) AS chat, i
                           FROM generate_series(1, least(100, {n} - b * 100)) i) t;
                     COMMIT;
                   END LOOP;
                 END $$",
                n = self.args.events
            ))
            .await?;
        println!(
            "load     {} events committed in transactions of 100 in {:.1} s",
            self.args.events,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The walsenders of `slots` slots decoding to the end, each for a
    /// consumer (`pg_recvlogical`) that writes to /dev/null, all at once.
    async fn decode(&self, slots: usize) -> Result<()> {
        self.load(slots).await?;
        let end: String = self
            .db
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?
            .get(0);
        let started = Instant::now();
        let mut readers = Vec::new();
        for (slot, publication) in partitions(slots) {
            let child = Command::new(self.pg.bin("pg_recvlogical"))
                .args(["-d", &self.pg.url("chat"), "--slot", &slot, "--start"])
                .args(["--endpos", &end, "--no-loop", "-f", "/dev/null"])
                .args(["-o", "proto_version=1"])
                .args(["-o", &format!("publication_names={publication}")])
                .stdin(Stdio::null())
                .spawn()?;
            readers.push(Reader {
                child,
                slot,
                walsender: None,
                walsender_cpu: 0.0,
                cpu: 0.0,
                done: None,
            });
        }
        // A walsender exits with its reader: its CPU is sampled until then.
        while readers.iter().any(|r| r.done.is_none()) {
            for reader in readers.iter_mut().filter(|r| r.done.is_none()) {
                if let Some(status) = reader.child.try_wait()? {
                    if !status.success() {
                        return Err(format!("pg_recvlogical failed: {status}").into());
                    }
                    reader.done = Some(started.elapsed().as_secs_f64());
                    continue;
                }
                if reader.walsender.is_none() {
                    reader.walsender = self
                        .db
                        .query_opt(
                            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                            &[&reader.slot],
                        )
                        .await?
                        .map(|row| row.get::<_, i32>(0) as u32);
                }
                if let Some(pid) = reader.walsender {
                    reader.walsender_cpu =
                        f64::max(reader.walsender_cpu, procfs::usage(pid).cpu_seconds);
                }
                reader.cpu = f64::max(reader.cpu, procfs::usage(reader.child.id()).cpu_seconds);
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err("pg_recvlogical did not reach the end in 600 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for reader in &readers {
            let confirmed: bool = self
                .db
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    &[&end, &reader.slot],
                )
                .await?
                .get(0);
            if !confirmed {
                return Err(
                    format!("pg_recvlogical stopped before the end of {}", reader.slot).into(),
                );
            }
        }
        let elapsed = readers.iter().filter_map(|r| r.done).fold(0.0, f64::max);
        let walsender_cpu: f64 = readers.iter().map(|r| r.walsender_cpu).sum();
        let reader_cpu: f64 = readers.iter().map(|r| r.cpu).sum();
        let each: Vec<String> = readers
            .iter()
            .map(|r| format!("{:.2}", r.walsender_cpu))
            .collect();
        let n = self.args.events as f64;
        println!(
            "result   decode   {slots} slot{}   {} events {:.0} events/s in {elapsed:.2} s; walsender cpu {walsender_cpu:.2} s ({} each; {:.0}% of one core each), {:.0} events per walsender cpu s; pg_recvlogical cpu {reader_cpu:.2} s",
            if slots == 1 { " " } else { "s" },
            self.args.events,
            n / elapsed,
            each.join(" + "),
            100.0 * walsender_cpu / slots as f64 / elapsed,
            n / walsender_cpu,
        );
        Ok(())
    }

    /// The marker's UPDATE over every row, in batches, on `connections`
    /// connections marking disjoint batches (one in flight on each).
    /// Returns rows/s.
    async fn mark(&self, connections: usize) -> Result<f64> {
        self.load(0).await?;
        // Physical order: the order the tailer sees them in (commit order).
        let ids: Vec<Uuid> = self
            .db
            .query("SELECT id FROM event_outbox", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let batches: Arc<Vec<Vec<Uuid>>> =
            Arc::new(ids.chunks(self.args.batch).map(<[Uuid]>::to_vec).collect());
        let mut markers = Vec::new();
        let mut backends = Vec::new();
        for _ in 0..connections {
            let db = self.pg.connect("chat").await?;
            let marker = Marker::prepare(&db, false).await?;
            let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
            backends.push(pid as u32);
            markers.push((db, marker));
        }
        let backends_cpu = || -> f64 {
            backends
                .iter()
                .map(|&pid| procfs::usage(pid).cpu_seconds)
                .sum()
        };
        // Kernel time apart: a backend that writes and flushes the WAL itself
        // spends it there.
        let backends_system = || -> f64 { backends.iter().map(|&pid| system_seconds(pid)).sum() };
        let system_before = backends_system();
        let postgres = self.pg.pid().ok_or("postgres is not running")?;
        let cpu_before = procfs::tree_cpu_seconds(postgres);
        let backends_before = backends_cpu();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (k, (db, marker)) in markers.into_iter().enumerate() {
            let batches = batches.clone();
            tasks.push(tokio::spawn(async move {
                let mut marked = 0;
                for batch in batches.iter().skip(k).step_by(connections) {
                    marked += marker.mark(&db, batch, &[]).await?.marked;
                }
                Ok::<_, tokio_postgres::Error>(marked)
            }));
        }
        let mut marked = 0;
        for task in tasks {
            marked += task.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let backends = backends_cpu() - backends_before;
        let system = backends_system() - system_before;
        // All of PostgreSQL: also the WAL writer, checkpointer and autovacuum
        // (a worker that ends meanwhile is not counted, so this is rough).
        let cpu = procfs::tree_cpu_seconds(postgres) - cpu_before;
        if marked != ids.len() {
            return Err(format!("marked {marked} of {} rows", ids.len()).into());
        }
        let rate = marked as f64 / elapsed;
        println!(
            "result   mark     {connections} conn    {marked} rows {rate:.0} rows/s in {elapsed:.2} s; batches of {}; marking backends cpu {backends:.2} s (system {system:.2} s; {:.0} rows per backend cpu s), all postgres cpu {cpu:.2} s",
            self.args.batch,
            marked as f64 / backends,
        );
        Ok(rate)
    }

    /// The same events to JetStream, chained, `--window` in flight.
    async fn publish(&self) -> Result<()> {
        self.load(0).await?;
        let rows = self
            .db
            .query(&format!("SELECT {ROW_COLUMNS} FROM event_outbox"), &[])
            .await?
            .iter()
            .map(row_from)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let js = jetstream::new(async_nats::connect(self.nats.url()).await?);
        let _ = js.delete_stream(STREAM).await;
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["events.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        let nats = self.nats.pid().ok_or("nats-server is not running")?;
        let me = std::process::id();
        let (nats_before, me_before) = (
            procfs::usage(nats).cpu_seconds,
            procfs::usage(me).cpu_seconds,
        );
        let started = Instant::now();
        let mut window = VecDeque::with_capacity(self.args.window);
        let mut last: Option<Uuid> = None;
        let mut stored = 0usize;
        for row in &rows {
            if window.len() == self.args.window {
                let ack: jetstream::context::PublishAckFuture =
                    window.pop_front().ok_or("empty window")?;
                stored += usize::from(!ack.await?.duplicate);
            }
            let message = Message::from_row("events", row)?;
            let mut publish = PublishMessage::build()
                .payload(message.body)
                .headers(message.headers);
            if let Some(last) = last {
                publish = publish.expected_last_message_id(last.to_string());
            }
            window.push_back(js.send_publish(message.subject, publish).await?);
            last = Some(row.id);
        }
        while let Some(ack) = window.pop_front() {
            stored += usize::from(!ack.await?.duplicate);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let nats_cpu = procfs::usage(nats).cpu_seconds - nats_before;
        let me_cpu = procfs::usage(me).cpu_seconds - me_before;
        if stored != rows.len() {
            return Err(format!("stored {stored} of {} messages", rows.len()).into());
        }
        println!(
            "result   publish  jetstream {stored} msgs {:.0} msgs/s in {elapsed:.2} s; window {}; nats-server cpu {nats_cpu:.2} s, publisher cpu {me_cpu:.2} s",
            stored as f64 / elapsed,
            self.args.window,
        );
        Ok(())
    }
}

impl Ceiling {
    /// The real tailer draining the events (its slot created before them).
    async fn drain(&self) -> Result<()> {
        // The publish phase's stream would overlap the tailer's subjects.
        let js = jetstream::new(async_nats::connect(self.nats.url()).await?);
        let _ = js.delete_stream(STREAM).await;
        let _ = js.delete_stream("EVENTS").await;
        self.load(1).await?;
        let port = outbox_testkit::free_port()?;
        let mut tailer = Command::new(outbox_testkit::tailer_bin()?)
            .args(["run", "--slot", &partitions(1)[0].0])
            .env("DATABASE_URL", self.pg.url("chat"))
            .env("NATS_URL", self.nats.url())
            .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        let drained = async {
            loop {
                let pending: i64 = self
                    .db
                    .query_one(
                        "SELECT count(*) FROM event_outbox WHERE status = 'pending'",
                        &[],
                    )
                    .await?
                    .get(0);
                if pending == 0 {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                }
                if started.elapsed() > Duration::from_secs(600) {
                    return Err("the outbox did not drain in 600 s".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let scrape = match drained {
            Ok(()) => reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await?
                .text()
                .await
                .map_err(Into::into),
            Err(error) => Err(error),
        };
        let _ = tailer.kill();
        let _ = tailer.wait();
        let scrape = scrape?;
        let metric = |name: &str| -> f64 {
            scrape
                .lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.rsplit(' ').next()?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let (rows, batches) = (
            metric("outbox_mark_batch_size_sum"),
            metric("outbox_mark_batch_size_count"),
        );
        let small = metric("outbox_mark_batch_size_bucket{le=\"1000\"}");
        println!(
            "result   drain    tailer    {} events {:.0} events/s in {elapsed:.2} s; marker: {batches} batches, {:.0} rows each on average, {:.0}% of them under 1,000 rows",
            self.args.events,
            self.args.events as f64 / elapsed,
            rows / batches,
            100.0 * small / batches,
        );
        Ok(())
    }
}

/// `pid`'s kernel-mode CPU seconds (stime, the 15th field of its stat line,
/// counted after the command name's last `)`).
fn system_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: f64 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(12))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    ticks / procfs::clock_ticks_per_second()
}

/// The 1, 5 and 15-minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
