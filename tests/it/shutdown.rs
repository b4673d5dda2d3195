//! SIGTERM in every state: the tailer exits 0 within 10 s whether NATS is
//! down, PostgreSQL is down, it is a standby, mid-transaction, sweeping or
//! replaying, and what it confirmed is only what it marked (a restart then
//! publishes every row exactly once).

use crate::common::*;
use outbox_testkit::StopMode;
use std::time::Duration;

/// SIGTERM, then: exit 0 within 10 s.
fn stops_cleanly(tailer: &mut Tailer, state: &str) {
    tailer.terminate();
    let status = tailer
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "{state}: no exit within 10 s of SIGTERM:\n{}",
                tailer.output()
            )
        });
    assert!(
        status.success(),
        "{state}: exit {status}:\n{}",
        tailer.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_nats_is_down_and_the_reader_waits_for_room() {
    let mut env = Env::start().await;
    let db = env.db().await;
    // A small byte budget, so that a few big events fill it behind the outage
    // and the reader waits for room that only NATS's return would make.
    let mut tailer = env
        .streaming(&db, &["run", "--max-in-flight-bytes", "1MiB"])
        .await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("down").pause(Duration::from_millis(1)),
    );
    let js = env.js().await;
    wait_for("events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 100).then_some(())
    })
    .await;
    env.nats.stop(true);
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'chat', 'big', 'blob', jsonb_build_object('n', i, 'blob', repeat('x', 600000)) \
         FROM generate_series(1, 4) i",
    )
    .await
    .unwrap();
    wait_for("publishing to fail", Duration::from_secs(30), || async {
        tailer.output().contains("publishing failed").then_some(())
    })
    .await;
    stops_cleanly(&mut tailer, "NATS down");
    load.stop().await;
    env.nats.start_again().unwrap();
    let _restarted = env.streaming(&db, &["run"]).await;
    assert_every_row_published_once(&db, &env.js().await, STREAM, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_postgres_is_down() {
    let mut env = Env::start().await;
    let db = env.db().await;
    let mut tailer = env.streaming(&db, &["run"]).await;
    env.pg.stop(StopMode::Immediate);
    wait_for_seen("the session to end", Duration::from_secs(30), || async {
        let output = tailer.output();
        match output.contains("reconnecting") {
            true => Ok(()),
            false => Err(format!("\n{output}")),
        }
    })
    .await;
    stops_cleanly(&mut tailer, "PostgreSQL down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_a_standby_and_mid_transaction() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut active = env.streaming(&db, &["run"]).await;
    let mut standby = env.tailer(&["run"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !standby.output().contains("standby") {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never said it waits:\n{}",
            standby.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stops_cleanly(&mut standby, "standby");

    // One transaction of 200,000 events: SIGTERM while it streams.
    let big = {
        let url = env.url.clone();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            insert_events(&client, "big", 0, 200_000).await;
        })
    };
    big.await.unwrap();
    let js = env.js().await;
    wait_for(
        "the big transaction streaming",
        Duration::from_secs(60),
        || async { (stream_count(&js, STREAM).await > 1000).then_some(()) },
    )
    .await;
    stops_cleanly(&mut active, "mid-transaction");
    let (_, published, _) = status_counts(&db).await;
    assert!(
        published < 200_000,
        "stopped mid-transaction ({published} marked)"
    );
    let restarted_at = std::time::Instant::now();
    let _restarted = env.streaming(&db, &["run"]).await;
    // A debug build replays the rest at 1,500 events/s on two busy cores
    // (CI ran it beside the prune test and timed out at 120 s, progressing).
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(300)).await;
    eprintln!(
        "[mid-transaction] {published} marked at the stop; the rest done {:.1?} after the restart",
        restarted_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_sweeping_and_while_replaying() {
    let env = Env::start().await;
    let db = env.db().await;
    // Sweeping: a backlog from before the slot, which only the sweeper takes.
    for n in 0..20 {
        insert_events(&db, "backlog", n * 1000, 1000).await;
    }
    let mut tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let js = env.js().await;
    wait_for("the sweeper at work", Duration::from_secs(60), || async {
        (stream_count(&js, STREAM).await > 0).then_some(())
    })
    .await;
    stops_cleanly(&mut tailer, "sweeping");

    // Replaying: rows published by an earlier run, re-delivered from an old
    // slot position (a slot made before them), checked before publishing.
    db.execute(
        "SELECT pg_create_logical_replication_slot('old_position', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let sweeping_done = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    for n in 0..20 {
        insert_events(&db, "replayed", n * 1000, 1000).await;
    }
    wait_for("every row published", Duration::from_secs(120), || async {
        (status_counts(&db).await.0 == 0).then_some(())
    })
    .await;
    drop(sweeping_done);
    let mut replaying = env.tailer(&["run", "--slot", "old_position"]);
    wait_streaming(&db, "old_position", &replaying).await;
    stops_cleanly(&mut replaying, "replaying");
    let committed: i64 = db
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stream_count(&js, STREAM).await,
        committed as u64,
        "nothing published twice"
    );
}
