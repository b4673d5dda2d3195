//! A seeded, bounded soak: faults mixed at random under load (kill -9,
//! SIGTERM, NATS stop, PostgreSQL fast and immediate restarts, a killed
//! walsender, bursts, oversized events, a stream full for a while, a stalled
//! synchronous standby, an oversized subject, an event that cannot be
//! decoded), with a standby tailer, then: nothing missing, nothing extra, no
//! duplicates, per-aggregate order kept, no row stuck pending. After each
//! fault it measures, from outside, how long until the slot's confirmed
//! position passes the server's WAL position at the fault's end (recovery),
//! and prints the distribution per fault kind. CI runs a short version (every
//! fault kind once); `SOAK_ROUNDS=100 SOAK_SEED=7 cargo test --release --test
//! it soak -- --nocapture` runs the long one. A second soak kills PostgreSQL
//! primaries in a row; a third runs on a three-node JetStream cluster (the
//! stream's leader killed, a rolling stop, a follower killed) with the
//! tailer's own faults, and reuses the recovery measure.

use crate::common::proxy::{Silence, SilentProxy, Which};
use crate::common::*;
use async_nats::jetstream::stream::DiscardPolicy;
use outbox_testkit::{PgServer, StopMode};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// The faults of the mixed soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill9Active,
    SigtermActive,
    NatsStop,
    PgFastRestart,
    PgImmediateRestart,
    WalsenderKilled,
    Burst,
    OversizedPayload,
    StreamFull,
    StalledSyncStandby,
    OversizedSubject,
    UndecodableEvent,
    /// Every open connection of the tailers goes silent (no FIN, no RST).
    SilentConnections,
}

impl Fault {
    const ALL: [Fault; 13] = [
        Fault::Kill9Active,
        Fault::SigtermActive,
        Fault::NatsStop,
        Fault::PgFastRestart,
        Fault::PgImmediateRestart,
        Fault::WalsenderKilled,
        Fault::Burst,
        Fault::OversizedPayload,
        Fault::StreamFull,
        Fault::StalledSyncStandby,
        Fault::OversizedSubject,
        Fault::UndecodableEvent,
        Fault::SilentConnections,
    ];
}

impl Named for Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill9Active => "kill -9 active",
            Fault::SigtermActive => "SIGTERM active",
            Fault::NatsStop => "NATS stop",
            Fault::PgFastRestart => "PG fast restart",
            Fault::PgImmediateRestart => "PG immediate restart",
            Fault::WalsenderKilled => "walsender killed",
            Fault::Burst => "burst of 2,000",
            Fault::OversizedPayload => "oversized payload",
            Fault::StreamFull => "stream full",
            Fault::StalledSyncStandby => "stalled sync standby",
            Fault::OversizedSubject => "oversized subject",
            Fault::UndecodableEvent => "undecodable event",
            Fault::SilentConnections => "silent connections",
        }
    }
}

/// A fault kind's name in the soak's output.
trait Named: Copy {
    fn name(self) -> &'static str;
}

/// Waits (at most `limit`) until the slot is active and confirmed past the
/// server's WAL position now; returns how long that took.
async fn recovery(pg: &PgServer, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut target: Option<String> = None;
    while started.elapsed() < limit {
        if let Ok(db) = pg.connect(DB).await {
            if target.is_none() {
                target = db
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .ok()
                    .map(|r| r.get(0));
            }
            if let Some(target) = &target {
                let caught_up = db
                    .query_opt(
                        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active \
                         AND confirmed_flush_lsn >= $2::text::pg_lsn",
                        &[&SLOT, target],
                    )
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                if caught_up {
                    return started.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    limit
}

/// Sets (or, with `None`, resets) a server setting and reloads.
async fn set_system(db: &tokio_postgres::Client, name: &str, value: Option<&str>) {
    let sql = match value {
        Some(value) => format!("ALTER SYSTEM SET {name} = '{value}'"),
        None => format!("ALTER SYSTEM RESET {name}"),
    };
    let _ = db.batch_execute(&sql).await;
    let _ = db.batch_execute("SELECT pg_reload_conf()").await;
}

/// Fault kinds in a seeded shuffle, each once per cycle, so a short run sees
/// them all.
struct Deck<T: 'static> {
    kinds: &'static [T],
    order: Vec<T>,
}

impl<T: Copy> Deck<T> {
    fn new(kinds: &'static [T]) -> Deck<T> {
        Deck {
            kinds,
            order: Vec::new(),
        }
    }

    /// Waits the pause between rounds (0.3–1.5 s), then draws the next kind.
    async fn next(&mut self, rng: &mut fastrand::Rng) -> T {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        if self.order.is_empty() {
            self.order = self.kinds.to_vec();
            rng.shuffle(&mut self.order);
        }
        self.order.pop().expect("a deck of at least one kind")
    }
}

/// Prints each fault kind's recovery times (median, p90, max) and returns
/// the slowest of all.
fn print_recoveries(tag: &str, recoveries: &mut BTreeMap<&'static str, Vec<Duration>>) -> Duration {
    eprintln!("[{tag}] recovery (fault's end to the slot confirmed past the WAL position then), per kind:");
    for (fault, times) in recoveries.iter_mut() {
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        eprintln!(
            "[{tag}]   {:<22} n={:<3} median {:>6.1?}  p90 {:>6.1?}  max {:>6.1?}",
            fault,
            times.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
    recoveries
        .values()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default()
}

/// Terminates the walsender of the active slot.
async fn kill_walsender(pg: &PgServer) {
    if let Ok(client) = pg.connect(DB).await {
        let _ = client
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
            )
            .await;
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_soak_of_mixed_faults_loses_and_duplicates_nothing() {
    let rounds = env_number("SOAK_ROUNDS", Fault::ALL.len() as u64);
    let seed = env_number("SOAK_SEED", 7);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut env = Env::start().await;
    let db = env.db().await;
    let args = ["run", "--max-retries", "2", "--sweep-min-age", "1"];
    // The tailers reach both servers through proxies that can make every
    // open connection go silent.
    let pg_proxy = SilentProxy::start(env.pg.port()).await;
    let nats_proxy = SilentProxy::start(env.nats.port()).await;
    let (pg_url, nats_url) = (
        pg_proxy.route(&env.tailer_url, env.pg.port()),
        nats_proxy.route(&env.nats.url(), env.nats.port()),
    );
    let dir = env.dir.path().to_owned();
    let spawn = || Tailer::spawn(&pg_url, &nats_url, &args, &dir);
    let mut active = spawn();
    wait_streaming(&db, SLOT, &active).await;
    let mut standby = spawn();
    // Single-row transactions on five aggregates, riding out restarts.
    let load = Load::start(
        &env.url,
        LoadOptions::new("soak")
            .producers(5)
            .pause(Duration::from_millis(15)),
    );
    let mut oversized = 0;
    let mut nats_stops = 0;
    let mut recoveries: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    let mut deck = Deck::new(&Fault::ALL);

    for round in 0..rounds {
        let fault = deck.next(&mut rng).await;
        // After a PostgreSQL restart either tailer may have won the slot:
        // the faults below are meant for the one that holds it.
        if let Ok(client) = env.pg.connect(DB).await {
            if !holds_slot(&client, &active).await && holds_slot(&client, &standby).await {
                std::mem::swap(&mut active, &mut standby);
            }
        }
        eprintln!("[soak seed {seed}] round {round}: {}", fault.name());
        match fault {
            // kill -9 the active tailer: the standby takes over; a new standby joins.
            Fault::Kill9Active => {
                active.kill9();
                active = standby;
                standby = spawn();
            }
            // SIGTERM, then the same.
            Fault::SigtermActive => {
                active.terminate();
                let _ = active.wait_exit(Duration::from_secs(15));
                active = standby;
                standby = spawn();
            }
            Fault::NatsStop => {
                nats_stops += 1;
                env.nats.stop(true);
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                env.nats.start_again().unwrap();
            }
            Fault::PgFastRestart => env.pg.restart(StopMode::Fast).unwrap(),
            Fault::PgImmediateRestart => env.pg.restart(StopMode::Immediate).unwrap(),
            Fault::WalsenderKilled => kill_walsender(&env.pg).await,
            // A burst: one transaction of 2,000 events on its own aggregate.
            Fault::Burst => {
                if let Ok(client) = env.pg.connect(DB).await {
                    let _ = try_insert_events(&client, &format!("burst-{round}"), 0, 2000).await;
                }
            }
            // The stream at its limit (discard new) for a while: publishing
            // stalls, nothing fails, and it resumes once the limit is lifted.
            Fault::StreamFull => {
                let js = env.js().await;
                if let Ok(mut stream) = js.get_stream(STREAM).await {
                    if let Ok(info) = stream.info().await {
                        let mut full = info.config.clone();
                        // A little room: a limit under the count the
                        // stream has by the time the update lands would make
                        // the server drop its oldest messages.
                        full.max_messages =
                            i64::try_from(info.state.messages + 200).unwrap_or(i64::MAX);
                        full.discard = DiscardPolicy::New;
                        let mut lifted = info.config.clone();
                        lifted.max_messages = -1;
                        if js.update_stream(full).await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                        }
                        js.update_stream(lifted)
                            .await
                            .expect("lifting the stream's limit");
                    }
                }
            }
            // A synchronous standby that does not exist: commits block and
            // stay invisible (the stream decodes them all the same), then
            // it is released.
            Fault::StalledSyncStandby => {
                if let Ok(client) = env.pg.connect(DB).await {
                    set_system(&client, "synchronous_standby_names", Some("nowhere")).await;
                    tokio::time::sleep(Duration::from_millis(rng.u64(1000..5000))).await;
                    set_system(&client, "synchronous_standby_names", None).await;
                }
            }
            // A subject nats-server cannot take: a dead letter at once.
            Fault::OversizedSubject => {
                if let Ok(client) = env.pg.connect(DB).await {
                    if client
                        .execute(
                            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
                             VALUES ('chat', 'long-subject', repeat('t', 5000), '{}')",
                            &[],
                        )
                        .await
                        .is_ok()
                    {
                        oversized += 1;
                    }
                }
            }
            // A NULL the contract has no room for, after a schema change:
            // the event fails alone, the stream goes on.
            Fault::UndecodableEvent => {
                if let Ok(client) = env.pg.connect(DB).await {
                    if insert_undecodable(&client).await.is_ok() {
                        oversized += 1;
                    }
                }
            }
            // Every connection the tailers have open goes silent, the
            // one way or the other; new ones pass.
            Fault::SilentConnections => {
                let how = if rng.bool() {
                    Silence::Discard
                } else {
                    Silence::Stall
                };
                pg_proxy.silence(how, Which::All);
                nats_proxy.silence(how, Which::All);
            }
            // An event over max_payload: a dead letter, not in the stream.
            Fault::OversizedPayload => {
                if let Ok(client) = env.pg.connect(DB).await {
                    if client
                        .execute(
                            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
                             VALUES ('chat', 'oversized', 'blob', jsonb_build_object('x', repeat('x', 2 * 1024 * 1024)))",
                            &[],
                        )
                        .await
                        .is_ok()
                    {
                        oversized += 1;
                    }
                }
            }
        }
        let took = recovery(&env.pg, Duration::from_secs(60)).await;
        eprintln!(
            "[soak seed {seed}] round {round}: {} recovered in {took:.1?}",
            fault.name()
        );
        recoveries.entry(fault.name()).or_default().push(took);
    }
    load.stop().await;

    // Settle: nothing pending, every published row in the stream once.
    let db = env.db().await;
    let js = env.js().await;
    wait_for("every row settled", Duration::from_secs(180), || async {
        let (pending, _, failed) = status_counts(&db).await;
        (pending == 0 && failed == oversized).then_some(())
    })
    .await;
    let published: HashSet<String> = db
        .query(
            "SELECT id::text FROM event_outbox WHERE status = 'published'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for(
        "the stream to hold every published row",
        Duration::from_secs(60),
        || async { (stream_count(&js, STREAM).await >= published.len() as u64).then_some(()) },
    )
    .await;
    let messages = read_stream(&js, STREAM).await;
    let mut seen = HashSet::new();
    for m in &messages {
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
        assert!(seen.insert(id.clone()), "duplicate {id}");
        assert!(
            published.contains(&id),
            "{id} is in the stream but not a published row"
        );
    }
    assert_eq!(seen.len(), published.len(), "nothing missing");
    let out_of_order = order_breaks(&messages);
    assert!(
        out_of_order.is_empty(),
        "[soak seed {seed}] order broken ({nats_stops} NATS stops): {out_of_order:?}"
    );
    eprintln!(
        "[soak seed {seed}] {rounds} rounds ({nats_stops} NATS stops) in {:.0?}: {} events published once each, {oversized} dead letters, {} order breaks",
        started.elapsed(),
        seen.len(),
        out_of_order.len()
    );
    let slowest = print_recoveries(&format!("soak seed {seed}"), &mut recoveries);
    assert!(
        slowest < Duration::from_secs(30),
        "[soak seed {seed}] a fault took {slowest:?} to recover from"
    );
    drop(standby);
}

/// What a round of the promotion soak adds to the primary's death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    NatsDown,
    WalsenderKilled,
    Nothing,
}

/// PostgreSQL primary changes in a row: each round makes a standby of the
/// current primary (pg_basebackup under load), restarts the tailer on a
/// multi-host URL of the two, kills the primary (immediate) at a random
/// moment, sometimes with NATS down or the walsender killed as well, and
/// promotes the standby, which is the next round's primary. Then every row
/// the last primary holds is published and in the stream. Rows the killed
/// primaries never sent are lost by PostgreSQL (asynchronous replication);
/// they are counted, as are repeats and order breaks (the catch-up sweeper
/// publishes the rows the new slot never streams after newer ones).
/// `SOAK_PROMOTIONS=10 SOAK_SEED=3 cargo test --release --test it
/// soak::a_seeded_soak_of_primary -- --nocapture` runs a longer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_soak_of_primary_changes_publishes_every_row_the_new_primary_has() {
    use crate::pg_failover::{multi_host, settle_and_tally, Tally};
    use outbox_testkit::PgServer;

    let promotions = env_number("SOAK_PROMOTIONS", 3);
    let seed = env_number("SOAK_SEED", 7);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut env = Env::start_with(PgServer::builder().setting("wal_keep_size", "256MB")).await;
    let args = ["run", "--sweep-min-age", "1"];
    let started = Instant::now();
    let mut primary: Option<PgServer> = None;
    let mut tailer: Option<Tailer> = None;
    let mut nats_stops = 0;
    for round in 0..promotions {
        let current = primary.as_ref().unwrap_or(&env.pg);
        let standby = PgServer::standby_of(current).expect("a standby");
        let url = multi_host("outbox_tailer", current, &standby);
        if let Some(mut old) = tailer.take() {
            old.stop_cleanly();
        }
        let running = Tailer::spawn(&url, &env.nats.url(), &args, env.dir.path());
        let db = current.connect(DB).await.unwrap();
        wait_streaming(&db, SLOT, &running).await;
        let load = Load::start(
            &multi_host("postgres", current, &standby),
            LoadOptions::new("promo")
                .producers(3)
                .pause(Duration::from_millis(5)),
        );
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
        let extra = [Extra::NatsDown, Extra::WalsenderKilled, Extra::Nothing][rng.usize(0..3)];
        eprintln!("[promotion soak seed {seed}] round {round}: extra fault {extra:?}");
        match extra {
            // NATS down across the promotion.
            Extra::NatsDown => {
                nats_stops += 1;
                env.nats.stop(true);
            }
            // The walsender killed just before the primary dies.
            Extra::WalsenderKilled => {
                let _ = db
                    .batch_execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active")
                    .await;
            }
            Extra::Nothing => {}
        }
        // The first round's primary is the Env's own server.
        primary
            .as_mut()
            .unwrap_or(&mut env.pg)
            .stop(StopMode::Immediate);
        standby.promote().expect("promote");
        if extra == Extra::NatsDown {
            tokio::time::sleep(Duration::from_millis(rng.u64(500..2000))).await;
            env.nats.start_again().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(500..1500))).await;
        load.stop().await;
        let timeline = format!(
            "PostgreSQL primary changed (timeline {} -> {})",
            round + 1,
            round + 2
        );
        let new = standby.connect(DB).await.unwrap();
        wait_streaming(&new, SLOT, &running).await;
        wait_for(
            "the change of primary logged",
            Duration::from_secs(30),
            || async { running.output().contains(&timeline).then_some(()) },
        )
        .await;
        tailer = Some(running);
        primary = Some(standby);
    }

    let last = primary.expect("at least one promotion");
    let db = last.connect(DB).await.unwrap();
    let running = tailer.expect("a tailer");
    let Tally {
        rows,
        messages,
        repeats,
        lost_by_postgres,
        ..
    } = settle_and_tally(&env, &db, &running, Duration::from_secs(180)).await;
    let breaks = order_breaks(&read_stream(&env.js().await, STREAM).await).len();
    eprintln!(
        "[promotion soak seed {seed}] {promotions} promotions ({nats_stops} with NATS down) in {:.0?}: \
         {} rows on the last primary, all published; stream messages {messages}, repeats {repeats}; \
         published then lost by PostgreSQL {lost_by_postgres}; order breaks {breaks}",
        started.elapsed(),
        rows.len(),
    );
    assert!(
        repeats <= rows.len() / 20,
        "{repeats} repeats of {} events",
        rows.len()
    );
}

/// The faults of the soak on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterFault {
    KillStreamLeader,
    RollingStop,
    KillNonLeader,
    KillActiveTailer,
    WalsenderKilled,
    PgFastRestart,
}

impl ClusterFault {
    const ALL: [ClusterFault; 6] = [
        ClusterFault::KillStreamLeader,
        ClusterFault::RollingStop,
        ClusterFault::KillNonLeader,
        ClusterFault::KillActiveTailer,
        ClusterFault::WalsenderKilled,
        ClusterFault::PgFastRestart,
    ];
}

impl Named for ClusterFault {
    fn name(self) -> &'static str {
        match self {
            ClusterFault::KillStreamLeader => "kill -9 stream leader",
            ClusterFault::RollingStop => "rolling stop of a node",
            ClusterFault::KillNonLeader => "kill -9 non-leader",
            ClusterFault::KillActiveTailer => "kill -9 active tailer",
            ClusterFault::WalsenderKilled => "walsender killed",
            ClusterFault::PgFastRestart => "PG fast restart",
        }
    }
}

/// A tailer of the cluster soak and the port its metrics answer on.
struct Metered {
    tailer: Tailer,
    metrics: u16,
}

/// What re-sending cost, summed over every tailer the soak ran.
#[derive(Debug, Default)]
struct Resends {
    /// `outbox_publish_resent_total`: events sent again after a failure.
    resent: f64,
    /// `outbox_duplicates_total`: re-sends JetStream dropped by `Nats-Msg-Id`.
    duplicates: f64,
    /// `outbox_publish_retries_total`.
    retries: f64,
}

impl Resends {
    /// Adds what `tailer` counted (a scrape that fails adds nothing).
    async fn add(&mut self, tailer: &Metered) {
        let (_, scrape) = http_get(&format!("http://127.0.0.1:{}/metrics", tailer.metrics)).await;
        self.resent += metric_sum(&scrape, "outbox_publish_resent_total");
        self.duplicates += metric_sum(&scrape, "outbox_duplicates_total");
        self.retries += metric_sum(&scrape, "outbox_publish_retries_total");
    }
}

/// Keeps the tailers' logs of a failed soak: the temp dir goes with the
/// test, so on a panic they are copied to `$TMPDIR/outbox-cluster-soak-<seed>`.
struct KeepLogsOnPanic {
    from: std::path::PathBuf,
    seed: u64,
}

impl Drop for KeepLogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let to = std::env::temp_dir().join(format!("outbox-cluster-soak-{}", self.seed));
        let _ = std::fs::create_dir_all(&to);
        for entry in std::fs::read_dir(&self.from)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
        }
        eprintln!(
            "[cluster soak seed {}] tailer logs kept in {}",
            self.seed,
            to.display()
        );
    }
}

/// The soak on a three-node JetStream cluster (issue 14): the tailer and a
/// standby on every seed URL with an R3 stream, single-row transactions on
/// five aggregates, and faults drawn from a seeded shuffle (every kind once
/// per cycle): kill -9 of the stream's leader, a graceful stop of any node
/// (one step of a rolling restart), kill -9 of a follower, kill -9 of the
/// tailer that holds the slot, a killed walsender, a PostgreSQL fast
/// restart. A stopped or killed node is started again and caught up before
/// the next fault, so the cluster never loses its quorum. Recovery is
/// measured as in the soak above, from the kill (with the node still down).
/// Then, with the cluster whole: every row published, each exactly once in
/// the stream, nothing else there, every aggregate in commit order, nothing
/// pending. `SOAK_ROUNDS=60 SOAK_SEED=1 cargo test --release --test it
/// soak::a_seeded_soak_on -- --nocapture` runs a long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_soak_on_a_nats_cluster_loses_and_duplicates_nothing() {
    use crate::cluster::{ClusterEnv, ELECTION};
    use outbox_testkit::free_port;

    let rounds = env_number("SOAK_ROUNDS", ClusterFault::ALL.len() as u64);
    let seed = env_number("SOAK_SEED", 7);
    let tag = format!("cluster soak seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut env = ClusterEnv::start().await;
    let _keep = KeepLogsOnPanic {
        from: env.dir.path().to_owned(),
        seed,
    };
    let spawn = |env: &ClusterEnv| {
        let metrics = free_port().unwrap();
        let addr = format!("127.0.0.1:{metrics}");
        let args = [
            "run",
            "--max-retries",
            "2",
            "--sweep-min-age",
            "1",
            "--stream-replicas",
            "3",
            "--metrics-addr",
            &addr,
        ];
        Metered {
            tailer: env.tailer(&args),
            metrics,
        }
    };
    let db = env.pg.connect(DB).await.unwrap();
    let mut active = spawn(&env);
    wait_streaming(&db, SLOT, &active.tailer).await;
    let mut standby = spawn(&env);
    env.cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
        .expect("the tailer created an R3 stream");
    let load = Load::start(
        &env.url,
        LoadOptions::new("csoak")
            .producers(5)
            .pause(Duration::from_millis(15)),
    );
    let mut resends = Resends::default();
    let mut recoveries: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    let mut deck = Deck::new(&ClusterFault::ALL);

    for round in 0..rounds {
        let fault = deck.next(&mut rng).await;
        if let Ok(client) = env.pg.connect(DB).await {
            if !holds_slot(&client, &active.tailer).await
                && holds_slot(&client, &standby.tailer).await
            {
                std::mem::swap(&mut active, &mut standby);
            }
        }
        let leader = env
            .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
            .unwrap();
        // The node a fault took down, started again after the recovery.
        let mut down = None;
        let what = match fault {
            ClusterFault::KillStreamLeader => {
                env.cluster(|c| c.kill(leader));
                down = Some(leader);
                format!("{} n{leader}", fault.name())
            }
            ClusterFault::RollingStop => {
                let node = rng.usize(..env.nats.len());
                env.cluster(|c| c.stop(node));
                down = Some(node);
                format!("{} n{node} (leader n{leader})", fault.name())
            }
            ClusterFault::KillNonLeader => {
                let followers: Vec<usize> = (0..env.nats.len()).filter(|&i| i != leader).collect();
                let node = followers[rng.usize(..followers.len())];
                env.cluster(|c| c.kill(node));
                down = Some(node);
                format!("{} n{node} (leader n{leader})", fault.name())
            }
            ClusterFault::KillActiveTailer => {
                resends.add(&active).await;
                active.tailer.kill9();
                active = standby;
                standby = spawn(&env);
                fault.name().to_owned()
            }
            ClusterFault::WalsenderKilled => {
                kill_walsender(&env.pg).await;
                fault.name().to_owned()
            }
            ClusterFault::PgFastRestart => {
                env.pg.restart(StopMode::Fast).unwrap();
                fault.name().to_owned()
            }
        };
        eprintln!("[{tag}] round {round}: {what}");
        let took = recovery(&env.pg, Duration::from_secs(60)).await;
        eprintln!("[{tag}] round {round}: recovered in {took:.1?}");
        recoveries.entry(fault.name()).or_default().push(took);
        if let Some(node) = down {
            env.cluster(|c| c.start_again(node)).unwrap();
            env.cluster(|c| c.wait_current(STREAM, node, ELECTION))
                .unwrap_or_else(|e| panic!("[{tag}] n{node} did not catch up: {e}"));
        }
    }
    load.stop().await;

    // The cluster whole, then: nothing pending, every published row in the
    // stream once, nothing else there, every aggregate in order.
    for node in 0..env.nats.len() {
        env.cluster(|c| c.wait_current(STREAM, node, ELECTION))
            .unwrap_or_else(|e| panic!("[{tag}] the cluster is not whole: {e}"));
    }
    let db = env.pg.connect(DB).await.unwrap();
    let js = env.js().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut pending, _, mut failed) = status_counts(&db).await;
    while pending > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (pending, _, failed) = status_counts(&db).await;
    }
    let rows = table_ids(&db).await;
    // The last acks may still be replicating: wait (bounded) for the count.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_count(&js, STREAM).await < rows.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = read_stream(&js, STREAM).await;
    let mut seen = HashSet::new();
    let (mut duplicates, mut extra) = (0, 0);
    for m in &messages {
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
        if !rows.contains(&id) {
            extra += 1;
        } else if !seen.insert(id) {
            duplicates += 1;
        }
    }
    let missing = rows.len() - seen.len();
    let breaks = order_breaks(&messages);
    resends.add(&active).await;
    resends.add(&standby).await;
    eprintln!(
        "[{tag}] {rounds} rounds in {:.0?}: {} events; missing {missing}, extra {extra}, \
         duplicates {duplicates}, order breaks {}, stuck pending {pending}, failed {failed}; \
         tailers: {resends:?}",
        started.elapsed(),
        rows.len(),
        breaks.len(),
    );
    let slowest = print_recoveries(&tag, &mut recoveries);
    assert_eq!(
        (missing, extra, duplicates, pending, failed),
        (0, 0, 0, 0, 0),
        "[{tag}] (missing, extra, duplicates, stuck pending, failed)"
    );
    assert!(breaks.is_empty(), "[{tag}] order broken: {breaks:?}");
    for tailer in [&active, &standby] {
        let output = tailer.tailer.output();
        assert!(!output.contains("panicked"), "{output}");
    }
    assert!(
        slowest < Duration::from_secs(30),
        "[{tag}] a fault took {slowest:?} to recover from"
    );
}
