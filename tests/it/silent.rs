//! Connections that die without closing (contract section 3): the tailer
//! reaches PostgreSQL and NATS through proxies whose open connections go
//! silent (no FIN, no RST) while new ones pass, as when a NAT or load
//! balancer forgets them. Producers write straight to PostgreSQL. The events
//! committed after the silence must be published within 60 s at default
//! settings, each once and in order, and the metrics must say meanwhile
//! that a connection was lost.

use crate::common::proxy::{Silence, SilentProxy, Which};
use crate::common::*;
use outbox_testkit::free_port;
use std::time::{Duration, Instant};

/// What the contract allows at default settings.
const BOUND: Duration = Duration::from_secs(60);

/// Streams through the proxies, silences `pg` and `nats`, commits 200
/// events, and measures until they are all published.
async fn silenced(case: &str, pg: Option<(Silence, Which)>, nats: Option<Silence>) {
    let env = Env::start().await;
    let db = env.db().await;
    let pg_proxy = SilentProxy::start(env.pg.port()).await;
    let nats_proxy = SilentProxy::start(env.nats.port()).await;
    let port = free_port().unwrap();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let tailer = Tailer::spawn(
        &pg_proxy.route(&env.tailer_url, env.pg.port()),
        &nats_proxy.route(&env.nats.url(), env.nats.port()),
        &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
        env.dir.path(),
    );
    wait_streaming(&db, SLOT, &tailer).await;
    let js = env.js().await;
    insert_events(&db, "before", 0, 100).await;
    wait_all_published(&db, &js, STREAM, 100, Duration::from_secs(30)).await;
    let (_, scrape) = http_get(&metrics).await;
    let sessions = metric_sum(&scrape, "outbox_replication_sessions_total");

    let silent_at = Instant::now();
    if let Some((how, which)) = pg {
        pg_proxy.silence(how, which);
    }
    if let Some(how) = nats {
        nats_proxy.silence(how, Which::All);
    }
    insert_events(&db, "after", 0, 200).await;

    // Until every event is out: when did the tailer say it lost a connection?
    let mut noticed = None;
    let published = loop {
        let (_, scrape) = http_get(&metrics).await;
        let replaced = metric_sum(&scrape, "outbox_replication_sessions_total") > sessions
            || metric_sum(&scrape, "outbox_replication_connected") == 0.0;
        let nats_lost = metric_sum(&scrape, "outbox_nats_connected") == 0.0
            || tailer.output().contains("NATS disconnected");
        if noticed.is_none() && ((pg.is_some() && replaced) || (nats.is_some() && nats_lost)) {
            noticed = Some(silent_at.elapsed());
        }
        let (pending, _, _) = status_counts(&db).await;
        if pending == 0 && stream_count(&js, STREAM).await >= 300 {
            break silent_at.elapsed();
        }
        assert!(
            silent_at.elapsed() < BOUND + Duration::from_secs(60),
            "{case}: {pending} still pending {:?} after the silence:\n{}",
            silent_at.elapsed(),
            tailer.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "[silent {case}] noticed after {:.1?}; the events committed meanwhile published after {published:.1?}",
        noticed.unwrap_or_default()
    );
    assert!(
        noticed.is_some(),
        "{case}: no lost connection shown in the metrics:\n{}",
        tailer.output()
    );
    assert!(
        published <= BOUND,
        "{case}: published after {published:?}:\n{}",
        tailer.output()
    );
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(30)).await;
    assert_eq!(
        order_breaks(&read_stream(&js, STREAM).await),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_connection_that_discards() {
    silenced(
        "replication, discard",
        Some((Silence::Discard, Which::Replication)),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_connection_that_stalls() {
    silenced(
        "replication, stall",
        Some((Silence::Stall, Which::Replication)),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_connections_that_discard() {
    silenced(
        "queries, discard",
        Some((Silence::Discard, Which::Queries)),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_connections_that_stall() {
    silenced(
        "queries, stall",
        Some((Silence::Stall, Which::Queries)),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_connection_that_discards() {
    silenced("NATS, discard", None, Some(Silence::Discard)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_connection_that_stalls() {
    silenced("NATS, stall", None, Some(Silence::Stall)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_at_once() {
    silenced(
        "everything, discard",
        Some((Silence::Discard, Which::All)),
        Some(Silence::Discard),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_at_once_stalling() {
    silenced(
        "everything, stall",
        Some((Silence::Stall, Which::All)),
        Some(Silence::Stall),
    )
    .await;
}

/// The heartbeat never takes a healthy idle connection for a silent one:
/// with the shortest timeout (2 s), an idle slot keeps its one session for
/// many timeouts, then still streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_healthy_session_outlives_many_timeouts() {
    let env = Env::start().await;
    let db = env.db().await;
    let port = free_port().unwrap();
    let tailer = env
        .streaming(
            &db,
            &[
                "run",
                "--replication-timeout",
                "2",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ],
        )
        .await;
    // Absence can only be watched for: five timeouts of an idle slot.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, scrape) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(
        metric_sum(&scrape, "outbox_replication_sessions_total"),
        1.0,
        "{}",
        tailer.output()
    );
    assert!(
        !tailer.output().contains("went silent"),
        "{}",
        tailer.output()
    );
    insert_events(&db, "after-idle", 0, 10).await;
    wait_all_published(&db, &env.js().await, STREAM, 10, Duration::from_secs(30)).await;
}
