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

use async_nats::jetstream::{self, stream};
use clap::{Parser, Subcommand};
use outbox_testkit::procfs::{self, Usage};
use outbox_testkit::{alembic, Certs, NatsServer, PgServer};
use std::process::Child;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

mod phases;
mod probes;
mod producer;
mod relay;

use phases::Side;
use probes::*;

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
    /// Run only these phases (drain, live, paced, big, prune, catchup, republish, repub).
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
    /// `--rate` of the rated run in the republish phase.
    #[arg(long, default_value_t = 5000)]
    republish_rate: u64,
    /// Leave the polling relay out (the tailer's figures only).
    #[arg(long)]
    no_relay: bool,
    /// Headers of their own on every event (0 to 3: tenant, schema-version,
    /// traceparent), for what publishing them costs.
    #[arg(long, default_value_t = 0)]
    headers: usize,
    /// Migrate to this Alembic revision instead of head (what a later
    /// revision costs: `0005_outbox_headers` is head without republish's
    /// index).
    #[arg(long, default_value = "head")]
    revision: String,
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
        return relay::relay(database_url, nats_url).await;
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
    alembic(&url, &["upgrade", &args.revision])?;
    let db = pg.connect("chat").await?;
    if args.headers > 0 {
        // Every event the phases write gets them, whoever inserts it.
        let all = [
            ("tenant", "acme"),
            ("schema-version", "2"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ];
        let headers: serde_json::Map<String, serde_json::Value> = all
            .iter()
            .take(args.headers)
            .map(|(n, v)| ((*n).to_owned(), serde_json::Value::from(*v)))
            .collect();
        db.batch_execute(&format!(
            "ALTER TABLE event_outbox ALTER COLUMN headers SET DEFAULT '{}'::jsonb",
            serde_json::Value::Object(headers)
        ))
        .await?;
    }
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
        .filter(|p| !(args.no_relay && *p == Publisher::Relay))
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
                for side in [Side::Nothing, Side::Prune] {
                    record(bench.beside(side).await?);
                }
            }
            "repub" => {
                // The same events drained, then republished into a new stream.
                let drained = bench.drain(Publisher::Tailer, 100).await?;
                let one_chat = bench.republish_alone(&drained, 1).await?;
                let chats = bench.republish_alone(&drained, 1000).await?;
                record(drained);
                record(one_chat);
                record(chats);
            }
            "republish" => {
                let rated = Side::Republish(Some(args.republish_rate));
                for side in [Side::Nothing, Side::Republish(None), rated] {
                    record(bench.beside(side).await?);
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
