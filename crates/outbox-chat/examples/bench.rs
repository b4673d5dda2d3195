//! The benchmark behind `scripts/bench`: outbox-tailer against a faithful
//! polling relay, side by side, on throwaway servers on this machine.
//!
//! Phases (each on a fresh outbox and a purged stream):
//! - drain: N events (transactions of 100, ~400-byte chat payloads) already
//!   committed, then the publisher starts; events/s until every row is
//!   `published`.
//! - live: two producers insert for a while (transactions of 100 single-row
//!   INSERTs, as an application writes), together at `--live-rate` events/s
//!   (default 10,000; 0 = as fast as they can); publish rate, and
//!   commit→JetStream latency.
//! - paced: 300 single-row transactions/s; commit→JetStream latency p50/p99.
//! - catchup (tailer only, not run by default): the drain twice, the events
//!   committed in transactions of 100 and then of 1 while the tailer was
//!   stopped; the second rate as a share of the first.
//! - big (tailer only): one transaction of 200,000 inserts; peak RSS.
//! - prune (tailer only, not run by default): the paced load beside 500,000
//!   old published rows, then again with `outbox-tailer prune` deleting them
//!   meanwhile: what retention costs the live stream's latency.
//!
//! Latency runs from the database's commit timestamp
//! (`track_commit_timestamp=on`, read back per transaction id) to the time
//! JetStream stored the message (its ack), both from this machine's clock.
//! The relay is this binary re-run as `bench relay`: `SELECT … WHERE
//! status='pending' AND next_retry_at <= now() ORDER BY next_retry_at,
//! created_at LIMIT 500 FOR UPDATE SKIP LOCKED`, pipelined publish of the
//! same messages, one batched UPDATE, commit; it polls every 100 ms when idle.

use async_nats::jetstream::{self, consumer, stream};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use outbox_tailer::internals::{row_from, Message, ROW_COLUMNS};
use outbox_testkit::procfs::{self, Usage};
use outbox_testkit::{alembic, tailer_bin, Certs, NatsServer, PgServer};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Events in the drain phase.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Seconds of the live phase.
    #[arg(long, default_value_t = 15)]
    live_seconds: u64,
    /// Events/s the two live producers offer together (0: as fast as they can).
    #[arg(long, default_value_t = 10_000)]
    live_rate: u64,
    /// Transactions per second in the paced phase.
    #[arg(long, default_value_t = 300)]
    paced_rate: u64,
    /// Seconds of the paced phase.
    #[arg(long, default_value_t = 15)]
    paced_seconds: u64,
    /// Inserts in the one big transaction.
    #[arg(long, default_value_t = 200_000)]
    big: usize,
    /// Old published rows in the prune phase.
    #[arg(long, default_value_t = 500_000)]
    prune_rows: usize,
    /// Run only these phases (drain, live, paced, big, prune, catchup).
    #[arg(long, value_delimiter = ',', default_value = "drain,live,paced,big")]
    phases: Vec<String>,
    /// PostgreSQL fsync and synchronous_commit (on: as production runs;
    /// off: as the tests run).
    #[arg(long, default_value = "on")]
    fsync: String,
    /// Also run the tailer with TLS on both connections (PostgreSQL
    /// verify-full, NATS tls:// with a CA), beside the plain one (whose
    /// PostgreSQL sessions still negotiate TLS unverified: no sslmode in its
    /// URL means prefer, and the server offers TLS).
    #[arg(long)]
    tls: bool,
    /// More PostgreSQL settings, `name=value` (repeatable).
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
}

#[derive(Subcommand)]
enum Mode {
    /// The polling relay baseline (run by the benchmark itself).
    Relay {
        database_url: String,
        nats_url: String,
    },
}

const STREAM: &str = "EVENTS";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Mode::Relay {
        database_url,
        nats_url,
    }) = &args.mode
    {
        return relay(database_url, nats_url).await;
    }
    let certs = Certs::generate()?;
    let (cert, key) = certs.server();
    let mut pg = PgServer::builder()
        .tls(&cert, &key)
        .setting("fsync", &args.fsync)
        .setting("synchronous_commit", &args.fsync)
        .setting("shared_buffers", "256MB")
        .setting("max_wal_size", "4GB")
        .setting("checkpoint_timeout", "30min");
    for setting in &args.pg_settings {
        let (name, value) = setting
            .split_once('=')
            .ok_or("--pg-setting takes name=value")?;
        pg = pg.setting(name, value);
    }
    let pg = pg.start()?;
    // TLS offered, not required: a NATS URL without tls:// stays plaintext,
    // while PostgreSQL URLs without sslmode negotiate it (prefer), as they
    // would against a production server that offers TLS.
    let nats_conf = certs.dir().join("nats.conf");
    std::fs::write(
        &nats_conf,
        format!(
            "allow_non_tls: true\ntls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    )?;
    let nats = NatsServer::start_with(&["-c", &nats_conf.display().to_string()])?;
    let url = pg.create_database("chat").await?;
    alembic(&url, &["upgrade", "head"])?;
    let db = pg.connect("chat").await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let tls = Tls {
        url: format!(
            "postgresql://postgres@localhost:{}/chat?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            certs.ca().display()
        ),
        nats_url: format!("tls://localhost:{}", nats.port()),
        ca: certs.ca().display().to_string(),
    };
    let servers = [
        pg.pid().ok_or("postgres is not running")?,
        nats.pid().ok_or("nats-server is not running")?,
    ];
    let bench = Bench {
        url,
        nats_url: nats.url(),
        servers,
        tls,
        db,
        js,
        args: &args,
    };
    println!(
        "outbox-tailer benchmark: PostgreSQL {} (fsync={fsync}, synchronous_commit={fsync}), nats-server, {} cores",
        pg_version(&bench.db).await?,
        num_cores(),
        fsync = args.fsync,
    );
    let publishers: Vec<Publisher> = [Publisher::Tailer, Publisher::TailerTls, Publisher::Relay]
        .into_iter()
        .filter(|p| args.tls || *p != Publisher::TailerTls)
        .collect();
    let mut report = Vec::new();
    // Each line is printed as soon as it is measured (a later failure keeps
    // it), and the whole table again at the end.
    let mut record = |line: Line| {
        println!("result   {line}");
        report.push(line);
    };
    for phase in &args.phases {
        match phase.as_str() {
            "drain" => {
                for &publisher in &publishers {
                    record(bench.drain(publisher, 100).await?);
                }
            }
            "catchup" => {
                // The same events, written while the tailer was stopped, in
                // transactions of 100 and of 1: what a catch-up after
                // downtime costs per transaction (each is replay-checked).
                let batched = bench.drain(Publisher::Tailer, 100).await?;
                let rate = batched.rate;
                record(batched);
                let mut single = bench.drain(Publisher::Tailer, 1).await?;
                single.phase = "catchup";
                single.note = format!(
                    "{}; 1-row transactions at {:.2}x the 100-row rate",
                    single.note,
                    single.rate / rate
                );
                record(single);
            }
            "live" => {
                for &publisher in &publishers {
                    record(bench.live(publisher).await?);
                }
            }
            "paced" => {
                for &publisher in &publishers {
                    record(bench.paced(publisher).await?);
                }
            }
            "big" => record(bench.big().await?),
            "prune" => {
                for pruning in [false, true] {
                    record(bench.prune(pruning).await?);
                }
            }
            other => return Err(format!("unknown phase {other}").into()),
        }
    }
    println!(
        "\n{:<8} {:<12} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8}  note",
        "phase", "who", "events", "events/s", "p50 ms", "p99 ms", "cpu s", "rss MB"
    );
    for line in &report {
        println!("{line}");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Publisher {
    Tailer,
    /// The tailer with TLS on both connections.
    TailerTls,
    Relay,
}

impl Publisher {
    fn name(self) -> &'static str {
        match self {
            Publisher::Tailer => "tailer",
            Publisher::TailerTls => "tailer+tls",
            Publisher::Relay => "relay",
        }
    }

    /// Reads the replication slot (which must exist before a backlog).
    fn tails(self) -> bool {
        self != Publisher::Relay
    }
}

/// Where the TLS tailer connects: PostgreSQL by name with verify-full, NATS
/// over tls:// trusting the benchmark's CA.
struct Tls {
    url: String,
    nats_url: String,
    ca: String,
}

struct Line {
    phase: &'static str,
    who: &'static str,
    events: usize,
    rate: f64,
    latency: Option<(f64, f64)>,
    usage: Usage,
    note: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p50, p99) = self.latency.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{a:.2}"), format!("{b:.2}"))
        });
        write!(
            f,
            "{:<8} {:<12} {:>10} {:>10.0} {:>9} {:>9} {:>8.2} {:>8.1}  {}",
            self.phase,
            self.who,
            self.events,
            self.rate,
            p50,
            p99,
            self.usage.cpu_seconds,
            self.usage.peak_rss as f64 / 1048576.0,
            self.note
        )
    }
}

struct Bench<'a> {
    url: String,
    nats_url: String,
    /// The postmaster's and nats-server's pids: their CPU counts toward
    /// the machine's bound for this work.
    servers: [u32; 2],
    tls: Tls,
    db: Client,
    js: jetstream::Context,
    args: &'a Args,
}

/// A publisher process (the tailer binary, or this binary as the relay).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn usage(&self) -> Usage {
        procfs::usage(self.0.id())
    }

    fn rss(&self) -> u64 {
        procfs::usage(self.0.id()).rss
    }

    /// SIGTERM, then (after 10 s) SIGKILL by drop.
    fn stop(mut self) {
        procfs::terminate(self.0.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Bench<'_> {
    fn start(&self, publisher: Publisher) -> Result<Process> {
        let exe = std::env::current_exe()?;
        let mut command = match publisher {
            Publisher::Tailer => {
                let mut c = Command::new(tailer_bin()?);
                c.arg("run")
                    .env("DATABASE_URL", &self.url)
                    .env("NATS_URL", &self.nats_url)
                    .env("METRICS_ADDR", "127.0.0.1:0");
                c
            }
            Publisher::TailerTls => {
                let mut c = Command::new(tailer_bin()?);
                c.arg("run")
                    .env("DATABASE_URL", &self.tls.url)
                    .env("NATS_URL", &self.tls.nats_url)
                    .env("NATS_CA", &self.tls.ca)
                    .env("METRICS_ADDR", "127.0.0.1:0");
                c
            }
            Publisher::Relay => {
                let mut c = Command::new(exe);
                c.args(["relay", &self.url, &self.nats_url]);
                c
            }
        };
        let child = command
            .env("RUST_LOG", "warn")
            .env("X", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Process(child))
    }

    /// Empties the outbox and the stream between phases, and drops the slot
    /// so no phase replays the one before it.
    async fn reset(&self) -> Result<()> {
        self.db
            .batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
            .await?;
        self.db.batch_execute("TRUNCATE event_outbox").await?;
        self.db.batch_execute("VACUUM ANALYZE event_outbox").await?;
        self.js.get_stream(STREAM).await?.purge().await?;
        Ok(())
    }

    /// CPU seconds so far of PostgreSQL (every process of the server) and
    /// nats-server.
    fn servers_cpu(&self) -> f64 {
        self.servers
            .iter()
            .map(|&pid| procfs::tree_cpu_seconds(pid))
            .sum()
    }

    async fn pending(&self) -> Result<i64> {
        Ok(self
            .db
            .query_one(
                "SELECT count(*) FROM event_outbox WHERE status = 'pending'",
                &[],
            )
            .await?
            .get(0))
    }

    /// Whether any row is pending: an index probe that stops at the first
    /// one. (Polled every 20 ms, a `count(*)` ran as a parallel scan of the
    /// whole table and cost the servers about a quarter of a core, inside
    /// the measured span.)
    async fn any_pending(&self) -> Result<bool> {
        Ok(self
            .db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM event_outbox WHERE status = 'pending')",
                &[],
            )
            .await?
            .get(0))
    }

    async fn wait_drained(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.any_pending().await? {
            if Instant::now() > deadline {
                return Err("timed out waiting for the outbox to drain".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Drains `--events` events committed beforehand in transactions of
    /// `per_transaction` rows.
    async fn drain(&self, publisher: Publisher, per_transaction: usize) -> Result<Line> {
        self.reset().await?;
        if publisher.tails() {
            // The slot must exist before the backlog is written.
            let p = self.start(publisher)?;
            wait_slot_active(&self.db, true).await?;
            p.stop();
            wait_slot_active(&self.db, false).await?;
        }
        let producer = Producer::connect(&self.url).await?;
        if per_transaction < 100 {
            // Small transactions are many commits: not waiting for each
            // flush makes the backlog quick to write (it is not measured).
            producer
                .db
                .batch_execute("SET synchronous_commit = off")
                .await?;
        }
        let mut written = 0;
        while written < self.args.events {
            let n = per_transaction.min(self.args.events - written);
            producer.batch(n).await?;
            written += n;
        }
        println!(
            "drain  {:<6}: {} events committed in transactions of {per_transaction}; starting the publisher",
            publisher.name(),
            written
        );
        let servers_before = self.servers_cpu();
        let started = Instant::now();
        let process = self.start(publisher)?;
        self.wait_drained(Duration::from_secs(600)).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let usage = process.usage();
        let servers = self.servers_cpu() - servers_before;
        let walsender = walsender_cpu(&self.db).await?;
        process.stop();
        // The machine's bound for this work: all cores busy at the CPU cost
        // of one event (PostgreSQL's backends and walsender, nats-server and
        // the publisher together), and the drain as a share of it.
        let rate = written as f64 / elapsed;
        let cpu_per_event = (servers + usage.cpu_seconds) / written as f64;
        let bound = num_cores() as f64 / cpu_per_event;
        Ok(Line {
            phase: "drain",
            who: publisher.name(),
            events: written,
            rate,
            latency: None,
            usage,
            note: format!(
                "{elapsed:.1} s; servers {servers:.2} cpu s{}; bound {bound:.0}/s, drain = {:.2} of it",
                walsender.map_or(String::new(), |cpu| format!(
                    " (walsender {cpu:.2}: busy {:.0}%)",
                    100.0 * cpu / elapsed
                )),
                rate / bound
            ),
        })
    }

    async fn live(&self, publisher: Publisher) -> Result<Line> {
        self.reset().await?;
        let process = self.start(publisher)?;
        if publisher.tails() {
            wait_slot_active(&self.db, true).await?;
        }
        let first_seq = self
            .js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .last_sequence
            + 1;
        let running = Arc::new(AtomicBool::new(true));
        let mut producers = Vec::new();
        // Each producer commits 100-row transactions, paced to half the rate.
        let per_transaction = (self.args.live_rate > 0)
            .then(|| Duration::from_secs_f64(200.0 / self.args.live_rate as f64));
        for _ in 0..2 {
            let producer = Producer::connect(&self.url).await?;
            let running = running.clone();
            producers.push(tokio::spawn(async move {
                let mut commits = Vec::new();
                let mut tick = per_transaction.map(tokio::time::interval);
                while running.load(Ordering::Relaxed) {
                    if let Some(tick) = tick.as_mut() {
                        tick.tick().await;
                    }
                    commits.push(producer.rows(100).await?);
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(commits)
            }));
        }
        let window = Duration::from_secs(self.args.live_seconds);
        tokio::time::sleep(window).await;
        let in_stream_at_end = self
            .js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .last_sequence
            + 1
            - first_seq;
        running.store(false, Ordering::Relaxed);
        let mut commits = Vec::new();
        for p in producers {
            commits.extend(p.await??);
        }
        let produced: usize = commits.iter().map(|c| c.ids.len()).sum();
        let behind_at_end = self.pending().await?;
        self.wait_drained(Duration::from_secs(600)).await?;
        let usage = process.usage();
        process.stop();
        let latency = self.latency(&commits, first_seq).await?;
        Ok(Line {
            phase: "live",
            who: publisher.name(),
            events: produced,
            rate: in_stream_at_end as f64 / window.as_secs_f64(),
            latency: Some(latency),
            usage,
            note: format!(
                "producers {:.0}/s offered; {} pending when they stopped",
                produced as f64 / window.as_secs_f64(),
                behind_at_end
            ),
        })
    }

    async fn paced(&self, publisher: Publisher) -> Result<Line> {
        self.reset().await?;
        let process = self.start(publisher)?;
        if publisher.tails() {
            wait_slot_active(&self.db, true).await?;
        }
        let first_seq = self
            .js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .last_sequence
            + 1;
        let (commits, rate) = self.paced_load().await?;
        self.wait_drained(Duration::from_secs(120)).await?;
        let usage = process.usage();
        process.stop();
        let latency = self.latency(&commits, first_seq).await?;
        Ok(Line {
            phase: "paced",
            who: publisher.name(),
            events: commits.len(),
            rate,
            latency: Some(latency),
            usage,
            note: format!("{} single-row transactions/s offered", self.args.paced_rate),
        })
    }

    /// `--paced-rate` single-row transactions a second for `--paced-seconds`;
    /// the commits and the rate achieved.
    async fn paced_load(&self) -> Result<(Vec<Commit>, f64)> {
        let producer = Producer::connect(&self.url).await?;
        let total = self.args.paced_rate * self.args.paced_seconds;
        let mut tick =
            tokio::time::interval(Duration::from_secs_f64(1.0 / self.args.paced_rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commits = Vec::with_capacity(total as usize);
        let started = Instant::now();
        for _ in 0..total {
            tick.tick().await;
            commits.push(producer.single().await?);
        }
        Ok((commits, total as f64 / started.elapsed().as_secs_f64()))
    }

    /// The paced load on an outbox holding `--prune-rows` old published rows,
    /// without (`pruning` false) and with `outbox-tailer prune --older-than
    /// 7d` deleting them meanwhile: what retention costs the live stream.
    async fn prune(&self, pruning: bool) -> Result<Line> {
        self.reset().await?;
        self.db
            .batch_execute(&format!(
                "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
                 SELECT 'chat', 'old-' || (i % 1000), 'message.created', jsonb_build_object('n', i, 'text', repeat('x', 300)), \
                        'published', now() - interval '8 days' + make_interval(secs => i / 1000.0), now() - interval '8 days' \
                 FROM generate_series(1, {}) i",
                self.args.prune_rows
            ))
            .await?;
        self.db.batch_execute("VACUUM ANALYZE event_outbox").await?;
        let process = self.start(Publisher::Tailer)?;
        wait_slot_active(&self.db, true).await?;
        let first_seq = self
            .js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .last_sequence
            + 1;
        let pruner = if pruning {
            Some(
                tokio::process::Command::new(tailer_bin()?)
                    .args(["prune", "--older-than", "7d"])
                    .env("DATABASE_URL", &self.url)
                    .stdout(Stdio::piped())
                    .spawn()?,
            )
        } else {
            None
        };
        let (commits, rate) = self.paced_load().await?;
        let note = match pruner {
            Some(pruner) => {
                let output = pruner.wait_with_output().await?;
                format!(
                    "{} (prune running from the start of the load: {})",
                    self.args.paced_rate,
                    String::from_utf8_lossy(&output.stdout).trim()
                )
            }
            None => format!(
                "{} txn/s beside {} old published rows",
                self.args.paced_rate, self.args.prune_rows
            ),
        };
        self.wait_drained(Duration::from_secs(120)).await?;
        let usage = process.usage();
        process.stop();
        let latency = self.latency(&commits, first_seq).await?;
        Ok(Line {
            phase: "prune",
            who: if pruning { "tailer+prune" } else { "tailer" },
            events: commits.len(),
            rate,
            latency: Some(latency),
            usage,
            note,
        })
    }

    async fn big(&self) -> Result<Line> {
        self.reset().await?;
        let process = self.start(Publisher::Tailer)?;
        wait_slot_active(&self.db, true).await?;
        let baseline = process.rss();
        let producer = Producer::connect(&self.url).await?;
        let started = Instant::now();
        producer.big(self.args.big).await?;
        println!(
            "big    tailer: one transaction of {} inserts committed in {:.1} s",
            self.args.big,
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let mut peak_sampled = 0;
        while self.any_pending().await? {
            peak_sampled = peak_sampled.max(process.rss());
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(600) {
                return Err("the big transaction did not drain".into());
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let usage = process.usage();
        process.stop();
        Ok(Line {
            phase: "big",
            who: "tailer",
            events: self.args.big,
            rate: self.args.big as f64 / elapsed,
            latency: None,
            usage,
            note: format!(
                "RSS before {:.1} MB, highest sampled {:.1} MB (rss MB column = kernel's VmHWM)",
                baseline as f64 / 1048576.0,
                peak_sampled as f64 / 1048576.0
            ),
        })
    }

    /// Commit→stored latency (ms) p50 and p99 over `commits`.
    async fn latency(&self, commits: &[Commit], first_seq: u64) -> Result<(f64, f64)> {
        // Commit timestamps, one query for all transactions.
        let xids: Vec<String> = commits.iter().map(|c| c.xid.clone()).collect();
        let rows = self
            .db
            .query(
                "SELECT x, (extract(epoch FROM pg_xact_commit_timestamp(xid(x::xid8))) * 1e6)::bigint \
                 FROM unnest($1::text[]) x",
                &[&xids],
            )
            .await?;
        let committed: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let stored = stored_times(&self.js, first_seq).await?;
        let mut latencies: Vec<f64> = Vec::new();
        for commit in commits {
            let Some(at) = committed.get(&commit.xid) else {
                continue;
            };
            for id in &commit.ids {
                if let Some(stored_at) = stored.get(id) {
                    latencies.push((*stored_at - at) as f64 / 1000.0);
                }
            }
        }
        if let Some(path) = std::env::var_os("BENCH_LATENCY_CSV") {
            let mut csv = String::new();
            for commit in commits {
                let Some(at) = committed.get(&commit.xid) else {
                    continue;
                };
                for id in &commit.ids {
                    if let Some(stored_at) = stored.get(id) {
                        csv.push_str(&format!("{at},{}\n", stored_at - at));
                    }
                }
            }
            let mut path = std::path::PathBuf::from(path);
            path.set_extension(format!("{}.csv", commits.len()));
            std::fs::write(path, csv)?;
        }
        if latencies.is_empty() {
            return Err("no latency samples".into());
        }
        latencies.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        Ok((at(0.50), at(0.99)))
    }
}

/// When JetStream stored each message (µs since the epoch), by event id.
async fn stored_times(js: &jetstream::Context, first_seq: u64) -> Result<HashMap<Uuid, i64>> {
    let stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first_seq,
            },
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut info_stream = js.get_stream(STREAM).await?;
    let last = info_stream.info().await?.state.last_sequence;
    let mut times = HashMap::new();
    let mut seen_up_to = first_seq.saturating_sub(1);
    while seen_up_to < last {
        let mut batch = consumer
            .fetch()
            .max_messages(2000)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message?;
            let info = message.info()?;
            seen_up_to = info.stream_sequence;
            let published = (info.published.unix_timestamp_nanos() / 1000) as i64;
            if let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .and_then(|v| Uuid::parse_str(v.as_str()).ok())
            {
                times.insert(id, published);
            }
            got += 1;
        }
        if got == 0 {
            break;
        }
    }
    Ok(times)
}

/// One committed transaction: its id and the events it wrote.
struct Commit {
    xid: String,
    ids: Vec<Uuid>,
}

/// Writes chat events: batches of 100 with one multi-row INSERT, single rows,
/// or one huge transaction.
struct Producer {
    db: Client,
    insert: tokio_postgres::Statement,
    chat: String,
    user: Uuid,
    project: Uuid,
    counter: AtomicU64,
}

impl Producer {
    async fn connect(url: &str) -> Result<Producer> {
        let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let insert = db
            .prepare(
                "INSERT INTO event_outbox (id, aggregate_type, aggregate_id, user_id, project_id, event_type, payload) \
                 SELECT id, 'chat', $2, $3, $4, 'message.created', p::jsonb FROM unnest($1::uuid[], $5::text[]) AS t(id, p)",
            )
            .await?;
        Ok(Producer {
            db,
            insert,
            chat: Uuid::new_v4().to_string(),
            user: Uuid::new_v4(),
            project: Uuid::new_v4(),
            counter: AtomicU64::new(0),
        })
    }

    /// A ~400-byte chat message payload.
    fn payload(&self, id: Uuid) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        serde_json::json!({
            "message_id": id, "chat_id": self.chat, "project_id": self.project, "user_id": self.user, "role": "user",
            "content": format!("message {n}: the deploy finished, the dashboards look green, and the on-call rotation for next week is posted in the channel; ping me if the lag alert fires again."),
        })
        .to_string()
    }

    async fn write(&self, n: usize) -> Result<Commit> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let payloads: Vec<String> = ids.iter().map(|id| self.payload(*id)).collect();
        self.db.batch_execute("BEGIN").await?;
        self.db
            .execute(
                &self.insert,
                &[&ids, &self.chat, &self.user, &self.project, &payloads],
            )
            .await?;
        let xid: String = self
            .db
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await?
            .get(0);
        self.db.batch_execute("COMMIT").await?;
        Ok(Commit { xid, ids })
    }

    /// A transaction of `n` single-row INSERTs, one round trip each: how an
    /// application (the chat endpoint) writes, and the producer rate the
    /// targets are stated for.
    async fn rows(&self, n: usize) -> Result<Commit> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        self.db.batch_execute("BEGIN").await?;
        for id in &ids {
            let payload = vec![self.payload(*id)];
            self.db
                .execute(
                    &self.insert,
                    &[&vec![*id], &self.chat, &self.user, &self.project, &payload],
                )
                .await?;
        }
        let xid: String = self
            .db
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await?
            .get(0);
        self.db.batch_execute("COMMIT").await?;
        Ok(Commit { xid, ids })
    }

    /// A transaction of `n` rows in one multi-row INSERT (fast backlog loading).
    async fn batch(&self, n: usize) -> Result<Commit> {
        self.write(n).await
    }

    async fn single(&self) -> Result<Commit> {
        self.write(1).await
    }

    async fn big(&self, n: usize) -> Result<()> {
        self.db.batch_execute("BEGIN").await?;
        let mut written = 0;
        while written < n {
            let chunk = 5000.min(n - written);
            let ids: Vec<Uuid> = (0..chunk).map(|_| Uuid::new_v4()).collect();
            let payloads: Vec<String> = ids.iter().map(|id| self.payload(*id)).collect();
            self.db
                .execute(
                    &self.insert,
                    &[&ids, &self.chat, &self.user, &self.project, &payloads],
                )
                .await?;
            written += chunk;
        }
        self.db.batch_execute("COMMIT").await?;
        Ok(())
    }
}

async fn wait_slot_active(db: &Client, active: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'event_outbox_tailer'",
                &[],
            )
            .await?;
        if row.map(|r| r.get::<_, bool>(0)) == Some(active) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the slot did not become active={active}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds of the walsender streaming the tailer's slot (started with
/// the phase's publisher, so all of it is the phase's); None without one.
/// One process decodes the whole slot: busy near 100% it is the limit,
/// whatever the other core does.
async fn walsender_cpu(db: &Client) -> Result<Option<f64>> {
    let pid: Option<i32> = db
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots \
             WHERE slot_name = 'event_outbox_tailer' AND active",
            &[],
        )
        .await?
        .and_then(|row| row.get(0));
    Ok(pid
        .and_then(|pid| u32::try_from(pid).ok())
        .map(|pid| procfs::usage(pid).cpu_seconds))
}

async fn pg_version(db: &Client) -> Result<String> {
    Ok(db.query_one("SHOW server_version", &[]).await?.get(0))
}

fn num_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The polling relay baseline: poll, publish pipelined, mark, commit.
async fn relay(database_url: &str, nats_url: &str) -> Result<()> {
    let (mut db, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let select = db
        .prepare(
            &format!(
                "SELECT {ROW_COLUMNS} FROM event_outbox WHERE status = 'pending' AND next_retry_at <= now() \
                 ORDER BY next_retry_at, created_at LIMIT 500 FOR UPDATE SKIP LOCKED"
            ),
        )
        .await?;
    let mark = db
        .prepare(
            "UPDATE event_outbox SET status = 'published', published_at = now() WHERE id = ANY($1)",
        )
        .await?;
    loop {
        let tx = db.transaction().await?;
        let rows = tx.query(&select, &[]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        let mut acks = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let row = row_from(r)?;
            let message = Message::from_row("events", &row);
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.body)
                .headers(message.headers);
            acks.push(js.send_publish(message.subject, publish).await?);
            ids.push(row.id);
        }
        for ack in acks {
            ack.await?;
        }
        tx.execute(&mark, &[&ids]).await?;
        tx.commit().await?;
    }
}
