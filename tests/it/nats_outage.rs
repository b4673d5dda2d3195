//! NATS failing: an outage under load is retried (recorded on the rows and in
//! the metrics) and loses or duplicates nothing; an event no retry can fix
//! becomes a dead letter without blocking the events behind it, and
//! `requeue` publishes it once the cause is fixed. A connection that breaks
//! mid-stream (publishes lost, later ones sent after reconnecting) keeps
//! every aggregate's commit order.

use crate::common::proxy::CuttingProxy;
use crate::common::*;
use outbox_testkit::{free_port, NatsServer, StopMode};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_under_load_is_retried_and_loses_nothing() {
    let mut env = Env::start().await;
    let db = env.db().await;
    let port = free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let _tailer = env
        .streaming(
            &db,
            &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
        )
        .await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("outage").pause(Duration::from_millis(5)),
    );
    let js = env.js().await;
    wait_for("events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 100).then_some(())
    })
    .await;

    env.nats.stop(true);
    let stopped = Instant::now();
    let mut saw_not_ready = false;
    while stopped.elapsed() < Duration::from_secs(10) {
        saw_not_ready |= http_get(&format!("{base}/readyz")).await.0 == 503;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_not_ready, "/readyz must answer 503 while NATS is down");
    env.nats.start_again().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop().await;

    let js = env.js().await;
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(120)).await;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE last_error IS NOT NULL), max(retry_count) FROM event_outbox",
            &[],
        )
        .await
        .unwrap();
    let (recorded, most_counted): (i64, i32) = (row.get(0), row.get(1));
    assert!(recorded > 0, "the outage is recorded on the rows");
    assert_eq!(
        most_counted, 0,
        "an outage never counts toward --max-retries"
    );
    assert_eq!(
        status_counts(&db).await.2,
        0,
        "an outage never makes a dead letter"
    );
    let (_, scrape) = http_get(&format!("{base}/metrics")).await;
    assert!(
        metric_sum(&scrape, "outbox_publish_retries_total") > 0.0,
        "retries are counted"
    );
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
}

/// A session that ends with publishes in flight (PostgreSQL restarted while
/// NATS is down) takes its share of `outbox_publish_in_flight` with it: the
/// gauge is 0 again once everything is published, not stuck at what the
/// aborted session had sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_mid_outage_leaves_no_publishes_in_flight_behind() {
    let mut env = Env::start().await;
    let db = env.db().await;
    let port = free_port().unwrap();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let _tailer = env
        .streaming(
            &db,
            &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
        )
        .await;
    env.nats.stop(true);
    let load = Load::start(
        &env.url,
        LoadOptions::new("aborted").pause(Duration::from_millis(5)),
    );
    let in_flight = || async {
        let (_, scrape) = http_get(&metrics).await;
        metric_sum(&scrape, "outbox_publish_in_flight")
    };
    wait_for_seen(
        "publishes in flight while NATS is down",
        Duration::from_secs(30),
        || async {
            let n = in_flight().await;
            if n > 0.0 {
                Ok(())
            } else {
                Err(format!("{n} in flight"))
            }
        },
    )
    .await;
    load.stop().await;
    env.pg.restart(StopMode::Fast).unwrap();
    env.nats.start_again().unwrap();

    let db = env.db().await;
    let js = env.js().await;
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(120)).await;
    wait_for_seen(
        "no publishes in flight once all are acked",
        Duration::from_secs(10),
        || async {
            let n = in_flight().await;
            if n == 0.0 {
                Ok(())
            } else {
                Err(format!("{n} in flight"))
            }
        },
    )
    .await;
}

/// The overtaking a broken connection invites: publishes written just before
/// the break are lost, those the client still had queued go out after it
/// reconnects, and the lost ones are retried only when their acks time out.
/// Chained publishes are refused until the lost ones are stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_stream_keeps_every_aggregates_order() {
    let env = Env::start().await;
    let db = env.db().await;
    let proxy = CuttingProxy::start(env.nats.port()).await;
    let tailer = Tailer::spawn(&env.tailer_url, &proxy.url(), &["run"], env.dir.path());
    wait_streaming(&db, SLOT, &tailer).await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("cut")
            .producers(4)
            .pause(Duration::from_millis(1)),
    );
    let js = env.js().await;
    for cut in 1..=2 {
        let before = stream_count(&js, STREAM).await;
        wait_for("events flowing", Duration::from_secs(30), || async {
            (stream_count(&js, STREAM).await > before + 500).then_some(())
        })
        .await;
        proxy.cut(Duration::from_millis(300));
        let cut_at: i64 = db
            .query_one("SELECT count(*) FROM event_outbox", &[])
            .await
            .unwrap()
            .get(0);
        wait_for(
            &format!("publishing to recover after cut {cut}"),
            Duration::from_secs(60),
            || async { (stream_count(&js, STREAM).await > cut_at as u64).then_some(()) },
        )
        .await;
    }
    load.stop().await;
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(60)).await;
    let breaks = order_breaks(&read_stream(&js, STREAM).await);
    assert!(breaks.is_empty(), "order broken: {breaks:?}");
    let output = tailer.output();
    assert!(
        output.contains("NATS disconnected") && output.contains("sending what was in flight again"),
        "the cuts were real faults, with publishes in flight: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_a_dead_letter_that_blocks_nothing_and_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::start().await;
    let db = env.db().await;
    let tailer = env
        .streaming(&db, &["run", "--max-retries", "2", "--sweep-min-age", "0"])
        .await;
    insert_oversized(&db, "big").await;
    insert_events(&db, "after-big", 0, 20).await;
    let js = env.js().await;
    wait_for("the events after it", Duration::from_secs(20), || async {
        (stream_count(&js, STREAM).await == 20).then_some(())
    })
    .await;
    let row = db
        .query_one(
            "SELECT status, last_error FROM event_outbox WHERE aggregate_id = 'big'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "failed");
    assert!(
        row.get::<_, Option<&str>>(1)
            .is_some_and(|e| e.contains("payload")),
        "{:?}",
        row.get::<_, Option<&str>>(1)
    );
    assert!(
        tailer.output().contains("dead letter"),
        "{}",
        tailer.output()
    );

    // Raise the server's limit (a new server with max_payload 4 MB on the
    // same port would do; here the tailer is pointed at one), then requeue.
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, "max_payload: 4194304\n").unwrap();
    let bigger = NatsServer::start_with(&["-c", config.to_str().unwrap()]).unwrap();
    drop(tailer);
    let tailer = Tailer::spawn(
        &env.tailer_url,
        &bigger.url(),
        &["run", "--max-retries", "2", "--sweep-min-age", "0"],
        dir.path(),
    );
    wait_streaming(&db, SLOT, &tailer).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .args(["requeue", "--all"])
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("requeued 1 failed events"));
    let big_js = async_nats::jetstream::new(async_nats::connect(bigger.url()).await.unwrap());
    wait_for(
        "the requeued event published",
        Duration::from_secs(30),
        || async {
            let published: Option<String> = db
                .query_one(
                    "SELECT status FROM event_outbox WHERE aggregate_id = 'big'",
                    &[],
                )
                .await
                .ok()
                .map(|r| r.get(0));
            (published.as_deref() == Some("published") && stream_count(&big_js, STREAM).await == 1)
                .then_some(())
        },
    )
    .await;
}
