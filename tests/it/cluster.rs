//! A three-node JetStream cluster (issue 14): the tailer creates an R3 stream
//! (`--stream-replicas 3`), follows the cluster through its seed URLs, and
//! under load rides out a kill -9 of the stream's leader and a rolling
//! restart of every node: nothing missing, nothing twice, every aggregate in
//! commit order. Each test prints what the faults cost (re-sends, duplicates,
//! retries, chain refusals, time to recover); docs/operations.md has figures.

use crate::common::*;
use async_nats::jetstream;
use async_nats::ServerAddr;
use outbox_testkit::{free_port, NatsCluster, PgServer};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How long the cluster may take to elect a leader or catch a node up.
pub const ELECTION: Duration = Duration::from_secs(30);

/// A migrated database and a three-node NATS cluster (the soak on a
/// cluster, in `soak.rs`, uses it too).
pub struct ClusterEnv {
    pub pg: PgServer,
    pub nats: NatsCluster,
    pub url: String,
    pub tailer_url: String,
    pub dir: tempfile::TempDir,
}

impl ClusterEnv {
    pub async fn start() -> ClusterEnv {
        let pg = PgServer::builder().start().expect("start postgres");
        let nats = NatsCluster::start().expect("start a nats cluster");
        let (url, tailer_url) = migrate(&pg).await;
        ClusterEnv {
            pg,
            nats,
            url,
            tailer_url,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The tailer on every seed URL, creating an R3 stream, its metrics on
    /// `metrics`; once it holds the slot.
    async fn streaming(&self, metrics: u16) -> Tailer {
        let addr = format!("127.0.0.1:{metrics}");
        let tailer = Tailer::spawn_env(
            &self.tailer_url,
            &self.nats.urls(),
            &["run", "--metrics-addr", &addr],
            self.dir.path(),
            &[("OUTBOX_STREAM_REPLICAS", "3")],
        );
        let db = self.pg.connect(DB).await.unwrap();
        wait_streaming(&db, SLOT, &tailer).await;
        tailer
    }

    /// The tailer on every seed URL with `args`, not waiting for anything.
    pub fn tailer(&self, args: &[&str]) -> Tailer {
        Tailer::spawn(&self.tailer_url, &self.nats.urls(), args, self.dir.path())
    }

    /// A JetStream client on every seed, as the tests' own reader.
    pub async fn js(&self) -> jetstream::Context {
        let seeds: Vec<ServerAddr> = self
            .nats
            .urls()
            .split(',')
            .map(|u| u.parse().unwrap())
            .collect();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(seeds)
            .await
            .unwrap();
        jetstream::new(client)
    }

    /// Blocking cluster calls off the runtime's workers, so the producers
    /// keep writing while a test waits for an election.
    pub fn cluster<T>(&mut self, f: impl FnOnce(&mut NatsCluster) -> T) -> T {
        tokio::task::block_in_place(|| f(&mut self.nats))
    }
}

/// What a fault cost, read from the tailer's metrics and log.
#[derive(Debug)]
struct Cost {
    resent: f64,
    duplicates: f64,
    retries: f64,
    /// Chained publishes the stream refused (`wrong last msg ID`) at the
    /// front of the window.
    chain_refusals: usize,
    /// Publishes that waited out their ack timeout (lost with a leader).
    ack_timeouts: usize,
    reconnects: usize,
}

async fn cost(metrics: u16, tailer: &Tailer) -> Cost {
    let (_, scrape) = http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
    let output = tailer.output();
    Cost {
        resent: metric_sum(&scrape, "outbox_publish_resent_total"),
        duplicates: metric_sum(&scrape, "outbox_duplicates_total"),
        retries: metric_sum(&scrape, "outbox_publish_retries_total"),
        chain_refusals: output.matches("chain broken").count(),
        ack_timeouts: output.matches("didn't receive ack in time").count(),
        reconnects: output.matches("NATS disconnected").count(),
    }
}

/// Waits until `more` events beyond `since` are in the stream: publishing
/// goes on. Returns how long that took.
async fn progress(js: &jetstream::Context, since: u64, more: u64, what: &str) -> Duration {
    let started = Instant::now();
    wait_for(what, Duration::from_secs(60), || async {
        (stream_count(js, STREAM).await >= since + more).then_some(())
    })
    .await;
    started.elapsed()
}

/// Every row published, each exactly once in the stream (by `Nats-Msg-Id`),
/// nothing else in it, every aggregate in commit order.
async fn assert_exactly_once_in_order(env: &ClusterEnv) -> usize {
    let db = env.pg.connect(DB).await.unwrap();
    let js = env.js().await;
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(120)).await;
    let rows = table_ids(&db).await;
    let messages = read_stream(&js, STREAM).await;
    let mut seen = HashSet::new();
    for m in &messages {
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
        assert!(rows.contains(&id), "{id} is in the stream but not a row");
        assert!(seen.insert(id.clone()), "{id} is in the stream twice");
    }
    assert_eq!(seen.len(), rows.len(), "nothing missing");
    let breaks = order_breaks(&messages);
    assert!(breaks.is_empty(), "order broken: {breaks:?}");
    messages.len()
}

fn load(prefix: &'static str, url: &str) -> Load {
    Load::start(
        url,
        LoadOptions::new(prefix)
            .producers(4)
            .rows(|n| 1 + n % 3)
            .pause(Duration::from_millis(10)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_gets_every_event_once_in_order() {
    let mut env = ClusterEnv::start().await;
    let metrics = free_port().unwrap();
    let tailer = env.streaming(metrics).await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("r3")
            .producers(4)
            .rows(|n| 1 + n % 5)
            .limit(600),
    );
    let js = env.js().await;
    let events = load.finish().await;
    let published = assert_exactly_once_in_order(&env).await;
    assert_eq!(published as i64, events);

    let info = stream_info(&js).await;
    assert_eq!(info.config.num_replicas, 3, "the tailer created it R3");
    let cluster = info.cluster.expect("a clustered stream");
    assert_eq!(
        cluster.replicas.len(),
        2,
        "a leader and two replicas: {cluster:?}"
    );
    let leader = env
        .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
        .unwrap();
    assert_eq!(
        cluster.leader.as_deref(),
        Some(env.nats.name(leader).as_str())
    );
    let cost = cost(metrics, &tailer).await;
    assert_eq!(
        (cost.resent, cost.duplicates, cost.retries),
        (0.0, 0.0, 0.0),
        "no fault, nothing sent twice: {cost:?}"
    );
    assert_eq!((cost.chain_refusals, cost.ack_timeouts), (0, 0), "{cost:?}");
    eprintln!("[cluster] {published} events through an R3 stream led by n{leader}: {cost:?}");

    // The stream exists: `setup` with the default of 1 replica leaves it R3
    // and says so once, naming both numbers.
    let (code, output) = run_to_exit(&env.tailer_url, &env.nats.urls(), &["setup"]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        output
            .matches(
                "existing stream has 3 replica(s), --stream-replicas asks for 1; left as it is"
            )
            .count(),
        1,
        "{output}"
    );
    let info = stream_info(&js).await;
    assert_eq!(info.config.num_replicas, 3, "left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_streams_leader_under_load_loses_and_duplicates_nothing() {
    let mut env = ClusterEnv::start().await;
    let metrics = free_port().unwrap();
    let tailer = env.streaming(metrics).await;
    let load = load("kill", &env.url);
    let js = env.js().await;
    progress(&js, 0, 500, "events flowing").await;

    let leader = env
        .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
        .unwrap();
    let before = cost(metrics, &tailer).await;
    // Bursts, and the kill as soon as publishes await their acks: those
    // the leader took are lost with it.
    let db = env.pg.connect(DB).await.unwrap();
    let scrape = format!("http://127.0.0.1:{metrics}/metrics");
    let mut in_flight = 0.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    'bursts: for burst in 0.. {
        assert!(Instant::now() < deadline, "no publishes in flight for 30 s");
        insert_events(&db, "kill-burst", burst * 2000, 2000).await;
        for _ in 0..200 {
            let (_, text) = http_get(&scrape).await;
            in_flight = metric_sum(&text, "outbox_publish_in_flight");
            if in_flight >= 10.0 {
                break 'bursts;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let at_kill = stream_count(&js, STREAM).await;
    let killed = Instant::now();
    env.cluster(|c| c.kill(leader));
    let successor = env
        .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
        .unwrap();
    let elected = killed.elapsed();
    assert_ne!(successor, leader);
    progress(&js, at_kill, 1000, "publishing after the leader's kill").await;
    let recovered = killed.elapsed();

    env.cluster(|c| c.start_again(leader)).unwrap();
    env.cluster(|c| c.wait_current(STREAM, leader, ELECTION))
        .unwrap();
    let at_return = stream_count(&js, STREAM).await;
    progress(&js, at_return, 300, "publishing with the old leader back").await;
    load.stop().await;
    let published = assert_exactly_once_in_order(&env).await;
    let after = cost(metrics, &tailer).await;
    assert!(
        !tailer.output().contains("starting a new session"),
        "an election is waited out in the session, not taken for a deleted stream"
    );
    eprintln!(
        "[cluster] kill -9 of leader n{leader} with {:.0} in flight: n{successor} elected in {elected:.1?}, \
         1000 more events {recovered:.1?} after the kill; {published} events once each; \
         before {before:?}, after {after:?}",
        in_flight
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_under_load_loses_and_duplicates_nothing() {
    let mut env = ClusterEnv::start().await;
    let metrics = free_port().unwrap();
    let tailer = env.streaming(metrics).await;
    let load = load("roll", &env.url);
    let js = env.js().await;
    progress(&js, 0, 500, "events flowing").await;

    for node in 0..env.nats.len() {
        let leader = env
            .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
            .unwrap();
        let at_stop = stream_count(&js, STREAM).await;
        let stopped = Instant::now();
        env.cluster(|c| c.stop(node));
        env.cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
            .unwrap();
        let recovered = progress(&js, at_stop, 300, &format!("publishing with n{node} down")).await;
        env.cluster(|c| c.start_again(node)).unwrap();
        env.cluster(|c| c.wait_current(STREAM, node, ELECTION))
            .unwrap();
        eprintln!(
            "[cluster] n{node} (leader n{leader}) restarted in {:.1?}; 300 events in {recovered:.1?} while it was down; {:?}",
            stopped.elapsed(),
            cost(metrics, &tailer).await
        );
    }
    let at_end = stream_count(&js, STREAM).await;
    progress(&js, at_end, 300, "publishing after the rolling restart").await;
    load.stop().await;
    let published = assert_exactly_once_in_order(&env).await;
    let after = cost(metrics, &tailer).await;
    assert!(
        after.reconnects >= 1,
        "the tailer's own server went down once, and it followed the cluster to another seed"
    );
    eprintln!("[cluster] rolling restart: {published} events once each; {after:?}");
}

/// What nats-server does with `Nats-Expected-Last-Msg-Id` and `Nats-Msg-Id`
/// when a stream's leader changes: the chain the publisher sends and the
/// de-duplication its re-sends rely on, measured on the server itself.
/// Each step publishes once, chained to the event before it, then re-sends
/// that predecessor (it must be dropped as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_and_dedupe_across_leader_changes() {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::{message::PublishMessage, stream};

    let mut env = ClusterEnv::start().await;
    let js = env.js().await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        num_replicas: 3,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |id: String, last: Option<String>| {
        let js = js.clone();
        async move {
            let mut message = PublishMessage::build().payload("{}".into()).message_id(id);
            if let Some(last) = last {
                message = message.expected_last_message_id(last);
            }
            // Retried while the stream has no leader (no responders or no answer).
            let deadline = Instant::now() + ELECTION;
            loop {
                let result = match js.send_publish("events.x.y", message.clone()).await {
                    Ok(ack) => ack.await,
                    Err(error) => Err(error),
                };
                match result {
                    Err(e)
                        if matches!(
                            e.kind(),
                            PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
                        ) && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => break other,
                }
            }
        }
    };
    let step = |n: usize| format!("event-{n}");
    publish(step(0), None).await.unwrap();
    let mut results = Vec::new();
    // 1: steady state; 2: after a kill -9 of the leader; 3: after the old
    // leader rejoined; 4: after a rolling restart of all three.
    for (n, fault) in [
        "none",
        "leader killed",
        "old leader back",
        "rolling restart",
    ]
    .into_iter()
    .enumerate()
    .map(|(i, f)| (i + 1, f))
    {
        let leader = env
            .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
            .unwrap();
        match fault {
            "leader killed" => {
                env.cluster(|c| c.kill(leader));
            }
            "old leader back" => {
                let down = (0..3).find(|&i| !env.nats.is_running(i)).unwrap();
                env.cluster(|c| c.start_again(down)).unwrap();
                env.cluster(|c| c.wait_current(STREAM, down, ELECTION))
                    .unwrap();
            }
            "rolling restart" => {
                for i in 0..3 {
                    env.cluster(|c| c.stop(i));
                    env.cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
                        .unwrap();
                    env.cluster(|c| c.start_again(i)).unwrap();
                    env.cluster(|c| c.wait_current(STREAM, i, ELECTION))
                        .unwrap();
                }
            }
            _ => {}
        }
        let now_leader = env
            .cluster(|c| c.wait_stream_leader(STREAM, ELECTION))
            .unwrap();
        let chained = publish(step(n), Some(step(n - 1))).await;
        let chain = match &chained {
            Ok(ack) => format!("stored at {}", ack.sequence),
            Err(e) => format!("refused: {e} ({:?})", e.kind()),
        };
        if chained.is_err() {
            // The tailer's answer to a refused chain: the head again, unchained.
            publish(step(n), None).await.unwrap();
        }
        let again = publish(step(n - 1), None).await.unwrap();
        assert!(
            again.duplicate,
            "{fault}: a re-send of a stored event must be dropped as a duplicate"
        );
        let wrong = publish(step(99), Some(step(n - 1))).await;
        assert_eq!(
            wrong.map_err(|e| e.kind()).err(),
            Some(PublishErrorKind::WrongLastMessageId),
            "{fault}: a publish chained to an older event must be refused"
        );
        results.push(format!(
            "{fault} (leader n{leader} -> n{now_leader}): chained publish {chain}"
        ));
    }
    eprintln!(
        "[cluster] chain header across leader changes:\n  {}",
        results.join("\n  ")
    );
    assert_eq!(stream_count(&js, STREAM).await, 5, "events 0-4, each once");
}

/// A single server cannot hold an R3 stream: `setup` says so in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_a_single_server_cannot_hold_are_one_clear_line() {
    let env = Env::start().await;
    let (code, output) = run_to_exit(
        &env.tailer_url,
        &env.nats.url(),
        &["setup", "--stream-replicas", "3"],
    );
    assert_ne!(code, 0, "{output}");
    let line = last_line(&output);
    assert!(
        line.contains("replicas > 1 not supported")
            && line.contains("--stream-replicas 3 needs a JetStream cluster"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
}

/// The stream's configuration and state, as the server answers now.
async fn stream_info(js: &async_nats::jetstream::Context) -> async_nats::jetstream::stream::Info {
    js.get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}
