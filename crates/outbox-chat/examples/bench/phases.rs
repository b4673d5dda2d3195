//! The phases: each on a fresh outbox and a purged stream, each a [`crate::Line`] per publisher.

use crate::probes::{num_cores, wait_slot_active, walsender_cpu};
use crate::producer::{stored_times, Commit, Producer};
use crate::{Bench, Line, Process, Publisher, Result, STREAM};
use outbox_testkit::procfs;
use outbox_testkit::tailer_bin;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Bench<'_> {
    pub(crate) fn start(&self, publisher: Publisher) -> Result<Process> {
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

    /// `outbox-tailer <args>` on the bench's servers, its stdout (the
    /// closing line) piped.
    fn one_shot(&self, args: &[&str]) -> Result<tokio::process::Command> {
        let mut command = tokio::process::Command::new(tailer_bin()?);
        command
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("NATS_URL", &self.nats_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        Ok(command)
    }

    /// The stream's state now.
    async fn stream_state(&self) -> Result<async_nats::jetstream::stream::State> {
        Ok(self
            .js
            .get_stream(STREAM)
            .await?
            .info()
            .await?
            .state
            .clone())
    }

    /// Empties the outbox and the stream between phases, and drops the slot
    /// so no phase replays the one before it.
    pub(crate) async fn reset(&self) -> Result<()> {
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
    pub(crate) fn servers_cpu(&self) -> f64 {
        self.servers
            .iter()
            .map(|&pid| procfs::tree_cpu_seconds(pid))
            .sum()
    }

    pub(crate) async fn pending(&self) -> Result<i64> {
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
    pub(crate) async fn any_pending(&self) -> Result<bool> {
        Ok(self
            .db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM event_outbox WHERE status = 'pending')",
                &[],
            )
            .await?
            .get(0))
    }

    pub(crate) async fn wait_drained(&self, timeout: Duration) -> Result<()> {
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
    pub(crate) async fn drain(&self, publisher: Publisher, per_transaction: usize) -> Result<Line> {
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

    pub(crate) async fn live(&self, publisher: Publisher) -> Result<Line> {
        self.reset().await?;
        let process = self.start(publisher)?;
        if publisher.tails() {
            wait_slot_active(&self.db, true).await?;
        }
        let first_seq = self.stream_state().await?.last_sequence + 1;
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
        let in_stream_at_end = self.stream_state().await?.last_sequence + 1 - first_seq;
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

    pub(crate) async fn paced(&self, publisher: Publisher) -> Result<Line> {
        self.reset().await?;
        let process = self.start(publisher)?;
        if publisher.tails() {
            wait_slot_active(&self.db, true).await?;
        }
        let first_seq = self.stream_state().await?.last_sequence + 1;
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
    pub(crate) async fn paced_load(&self) -> Result<(Vec<Commit>, f64)> {
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
    /// with `side` running meanwhile: nothing, `outbox-tailer prune
    /// --older-than 7d` deleting them (what retention costs the live
    /// stream), or `outbox-tailer republish --until 1d` putting them back
    /// into the stream (what a republish costs it, with or without --rate).
    pub(crate) async fn beside(&self, side: Side) -> Result<Line> {
        self.reset().await?;
        self.db
            .batch_execute(&format!(
                "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
                 SELECT 'chat', 'old-' || (i % 1000), 'message.created', jsonb_build_object('n', i, 'text', repeat('x', 300)), \
                        'published', now() - interval '8 days' + make_interval(secs => i / 1000.0), \
                        now() - interval '8 days' + make_interval(secs => i / 1000.0) \
                 FROM generate_series(1, {}) i",
                self.args.prune_rows
            ))
            .await?;
        self.db.batch_execute("VACUUM ANALYZE event_outbox").await?;
        let process = self.start(Publisher::Tailer)?;
        wait_slot_active(&self.db, true).await?;
        let first_seq = self.stream_state().await?.last_sequence + 1;
        let rate_text;
        let args: Option<Vec<&str>> = match side {
            Side::Nothing => None,
            Side::Prune => Some(vec!["prune", "--older-than", "7d"]),
            Side::Republish(None) => Some(vec!["republish", "--until", "1d"]),
            Side::Republish(Some(rate)) => {
                rate_text = rate.to_string();
                Some(vec!["republish", "--until", "1d", "--rate", &rate_text])
            }
        };
        let job = match &args {
            Some(args) => Some(self.one_shot(args)?.spawn()?),
            None => None,
        };
        let (commits, rate) = self.paced_load().await?;
        let note = match (job, &args) {
            (Some(job), Some(args)) => {
                let output = job.wait_with_output().await?;
                format!(
                    "{} txn/s, `{}` running from the start of the load: {}",
                    self.args.paced_rate,
                    args.join(" "),
                    String::from_utf8_lossy(&output.stdout).trim()
                )
            }
            _ => format!(
                "{} txn/s beside {} old published rows",
                self.args.paced_rate, self.args.prune_rows
            ),
        };
        self.wait_drained(Duration::from_secs(120)).await?;
        let usage = process.usage();
        process.stop();
        let latency = self.latency(&commits, first_seq).await?;
        Ok(Line {
            phase: side.phase(),
            who: side.who(),
            events: commits.len(),
            rate,
            latency: Some(latency),
            usage,
            note,
        })
    }

    /// The drain's events put back by `outbox-tailer republish` into their
    /// stream, deleted (lost) after the drain: how fast a republish goes,
    /// beside how fast the same events drained. `drained`: the drain's line.
    /// The drain's events are all of one chat, the republish's worst case
    /// (one aggregate's events go one at a time); `chats` spreads them over
    /// that many first (the drain's rate does not depend on it).
    pub(crate) async fn republish_alone(&self, drained: &Line, chats: u32) -> Result<Line> {
        if chats > 1 {
            self.db
                .execute(
                    "UPDATE event_outbox SET aggregate_id = 'chat-' || (abs(hashtext(id::text)) % $1)",
                    &[&(chats as i32)],
                )
                .await?;
        }
        self.db.batch_execute("VACUUM ANALYZE event_outbox").await?;
        self.js.delete_stream(STREAM).await?;
        let cpu = |pid: u32| procfs::tree_cpu_seconds(pid);
        let before = self.servers.map(cpu);
        let started = Instant::now();
        let output = self
            .one_shot(&["republish", "--since", "1d"])?
            .spawn()?
            .wait_with_output()
            .await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = self.servers.map(cpu);
        let (postgres, nats) = (after[0] - before[0], after[1] - before[1]);
        let summary = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() {
            return Err(format!("republish failed: {summary}").into());
        }
        let stored = self.stream_state().await?.messages;
        if stored != drained.events as u64 {
            return Err(format!("republish stored {stored} of {} events", drained.events).into());
        }
        let rate = drained.events as f64 / elapsed;
        Ok(Line {
            phase: "repub",
            who: "republish",
            events: drained.events,
            rate,
            latency: None,
            usage: procfs::Usage::default(),
            note: format!(
                "{chats} chat(s): {summary}; cpu s: postgres {postgres:.2}, nats-server {nats:.2}; {:.2}x the drain's {:.0}/s",
                rate / drained.rate,
                drained.rate
            ),
        })
    }

    pub(crate) async fn big(&self) -> Result<Line> {
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
    pub(crate) async fn latency(&self, commits: &[Commit], first_seq: u64) -> Result<(f64, f64)> {
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

/// What runs beside the paced load in [`Bench::beside`].
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Nothing,
    Prune,
    /// `republish`, at most this many events a second when given.
    Republish(Option<u64>),
}

impl Side {
    fn phase(self) -> &'static str {
        match self {
            Side::Nothing => "alone",
            Side::Prune => "prune",
            Side::Republish(_) => "republish",
        }
    }

    fn who(self) -> &'static str {
        match self {
            Side::Nothing => "tailer",
            Side::Prune => "tailer+prune",
            Side::Republish(None) => "tailer+repub",
            Side::Republish(Some(_)) => "tailer+rate",
        }
    }
}
