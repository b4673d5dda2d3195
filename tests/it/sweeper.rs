//! The catch-up sweeper and requeue: pending rows the stream will never
//! deliver get published, once, without racing the stream.

use crate::common::*;
use std::process::Command;
use std::time::Duration;

async fn committed(db: &tokio_postgres::Client) -> u64 {
    db.query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_the_slot_are_swept_without_racing_the_stream() {
    let env = Env::start().await;
    let db = env.db().await;
    // Written before any slot exists: the stream will never deliver them.
    for n in 0..6 {
        insert_events(&db, "before-slot", n * 100, 100).await;
    }
    let tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    // Live traffic while the sweeper works.
    let load = Load::start(&env.url, LoadOptions::new("live"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(load.stop().await > 0);

    let js = env.js().await;
    let total = committed(&db).await;
    wait_all_published(&db, &js, STREAM, total, Duration::from_secs(60)).await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        total,
        "every row once: nothing published by both"
    );
    assert!(
        tailer.output().contains("sweeper published"),
        "{}",
        tailer.output()
    );
}

/// Rows stamped in the future (a producer's clock ahead, up to `infinity`)
/// that the stream will never deliver are swept all the same, without
/// waiting for their time, and those the stream delivers are not published
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stamped_in_the_future_are_swept_and_published_once() {
    let env = Env::start().await;
    let db = env.db().await;
    const FUTURE: [&str; 3] = ["now() + interval '1 day'", "'3000-01-01'", "'infinity'"];
    let insert = |prefix: &'static str| {
        let db = &db;
        async move {
            for (n, at) in FUTURE.iter().enumerate() {
                db.execute(
                    &format!(
                        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
                         VALUES ('chat', '{prefix}-{n}', 'skewed', '{{\"n\": 0}}', {at})"
                    ),
                    &[],
                )
                .await
                .unwrap();
            }
        }
    };
    // Before the slot: only the sweeper can publish them. The default
    // --sweep-min-age (60 s) holds back every row by its created_at, so
    // these go out by the other rule or not at all.
    insert("before-slot").await;
    let port = outbox_testkit::free_port().unwrap();
    let tailer = env
        .streaming(
            &db,
            &["run", "--metrics-addr", &format!("127.0.0.1:{port}")],
        )
        .await;
    // While streaming: the stream publishes them; the sweeper must not.
    insert("streamed").await;
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 6, Duration::from_secs(30)).await;
    assert_eq!(stream_count(&js, STREAM).await, 6, "each once");
    // Not merely de-duplicated: the sweeper took exactly the three the
    // stream would never deliver, and sent nothing the stream sent too.
    let (_, scrape) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(
        metric_sum(&scrape, "outbox_sweeper_published_total"),
        3.0,
        "{scrape}"
    );
    assert_eq!(
        metric_sum(&scrape, "outbox_duplicates_total"),
        0.0,
        "{scrape}"
    );
    assert!(
        tailer.output().contains("sweeper published"),
        "{}",
        tailer.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_stopped_loses_nothing() {
    let env = Env::start().await;
    let db = env.db().await;
    let js = env.js().await;
    let mut tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    insert_events(&db, "first", 0, 100).await;
    wait_all_published(&db, &js, STREAM, 100, Duration::from_secs(30)).await;
    tailer.stop_cleanly();

    // Pending rows, then the slot is lost (dropped, or invalidated and recreated).
    insert_events(&db, "while-stopped", 0, 250).await;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
        .await
        .unwrap();

    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    insert_events(&db, "after", 0, 50).await;
    wait_all_published(&db, &js, STREAM, 400, Duration::from_secs(60)).await;
    assert_eq!(stream_count(&js, STREAM).await, 400);
}

/// The sweeper records failures on its rows as the stream does: an event no
/// retry can send becomes a dead letter at once, and the rest of its batch is
/// published (it used to fail the whole batch, sweep after sweep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swept_event_no_retry_can_send_is_a_dead_letter_and_holds_nothing_back() {
    let env = Env::start().await;
    let db = env.db().await;
    insert_events(&db, "before-a", 0, 10).await;
    insert_oversized(&db, "big").await;
    insert_events(&db, "before-b", 0, 10).await;
    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let js = env.js().await;
    wait_settled(&db, &js, (0, 20, 1)).await;
    let row = db
        .query_one(
            "SELECT status, retry_count, last_error FROM event_outbox WHERE aggregate_id = 'big'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, &str>(0), row.get::<_, i32>(1)), ("failed", 1));
    assert!(
        row.get::<_, Option<&str>>(2)
            .is_some_and(|e| e.contains("payload")),
        "{:?}",
        row.get::<_, Option<&str>>(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_events_are_published_again() {
    let env = Env::start().await;
    let db = env.db().await;
    // Dead letters that never reached the stream (written before the slot).
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, retry_count, last_error) \
         SELECT 'chat', 'dead-' || i, CASE WHEN i <= 3 THEN 'kept.type' ELSE 'other.type' END, '{}', 'failed', 10, 'rejected' \
         FROM generate_series(1, 6) i",
    )
    .await
    .unwrap();
    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let requeue = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
            .arg("requeue")
            .args(args)
            .env("DATABASE_URL", &env.tailer_url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let one: uuid::Uuid = db
        .query_one(
            "SELECT id FROM event_outbox WHERE aggregate_id = 'dead-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(requeue(&["--id", &one.to_string()]).contains("requeued 1 failed events"));
    assert!(requeue(&["--event-type", "kept.type"]).contains("requeued 2 failed events"));
    let js = env.js().await;
    wait_for(
        "the requeued events in the stream, and marked",
        Duration::from_secs(30),
        || async {
            let (_, published, _) = status_counts(&db).await;
            (stream_count(&js, STREAM).await == 3 && published == 3).then_some(())
        },
    )
    .await;
    let row = db
        .query_one(
            "SELECT status, retry_count, last_error FROM event_outbox WHERE id = $1",
            &[&one],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, &str>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<&str>>(2)
        ),
        ("published", 0, Some("rejected")),
        "published with a fresh retry budget; last_error kept for audit"
    );
    assert!(requeue(&["--all"]).contains("requeued 3 failed events"));
    wait_all_published(&db, &js, STREAM, 6, Duration::from_secs(30)).await;
    assert_eq!(stream_count(&js, STREAM).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_its_recovery_loses_nothing() {
    let env = Env::start_with(
        outbox_testkit::PgServer::builder()
            .setting("max_slot_wal_keep_size", "1MB")
            .setting("wal_keep_size", "0"),
    )
    .await;
    let db = env.db().await;
    let js = env.js().await;
    let mut tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    insert_events(&db, "first", 0, 100).await;
    wait_all_published(&db, &js, STREAM, 100, Duration::from_secs(30)).await;
    tailer.stop_cleanly();

    // While it is stopped: pending events, then WAL until the server gives up on the slot.
    insert_events(&db, "while-stopped", 0, 200).await;
    wait_for("the slot to be invalidated", Duration::from_secs(120), || async {
        db.batch_execute(
            "INSERT INTO messages (project_id, user_id, role, content) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'user', repeat(md5(i::text), 60) FROM generate_series(1, 5000) i; \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        let status: String = db
            .query_one("SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT])
            .await
            .unwrap()
            .get(0);
        (status == "lost").then_some(())
    })
    .await;

    let port = outbox_testkit::free_port().unwrap();
    let tailer = env.tailer(&[
        "run",
        "--sweep-min-age",
        "0",
        "--stats-interval",
        "0.2",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    wait_for(
        "the invalidation to be reported",
        Duration::from_secs(30),
        || async {
            let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (tailer.output().contains("was invalidated by the server")
                && scrape.contains("outbox_slot_lost 1"))
            .then_some(())
        },
    )
    .await;

    // The runbook: drop the slot; the tailer recreates it and sweeps.
    db.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
        .await
        .unwrap();
    wait_streaming(&db, SLOT, &tailer).await;
    wait_all_published(&db, &js, STREAM, 300, Duration::from_secs(60)).await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        300,
        "nothing lost, nothing twice"
    );
}

/// Swept events take the stream's mark path: with `--event-logs` they are
/// projected like streamed ones (they used to be marked by an UPDATE of the
/// sweeper's own and never reached `event_logs`), and the rows of one
/// transaction go in the order they were inserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swept_events_are_projected_and_keep_their_insert_order() {
    let env = Env::start().await;
    let db = env.db().await;
    // One transaction per aggregate: every row of it has the same times.
    for aggregate in ["one-tx-a", "one-tx-b", "one-tx-c"] {
        insert_events(&db, aggregate, 0, 700).await;
    }
    let _tailer = env
        .streaming(&db, &["run", "--sweep-min-age", "0", "--event-logs"])
        .await;
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 2100, Duration::from_secs(60)).await;
    let logged: i64 = db
        .query_one("SELECT count(*) FROM event_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 2100, "every swept event in event_logs");
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 2100);
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}

/// NATS stops in the middle of a sweep: the batch's failure is recorded on
/// its first unacked row, the rows behind it wait with it, and once NATS is
/// back everything is published once, each aggregate in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_mid_sweep_keeps_order_and_publishes_once() {
    let mut env = Env::start().await;
    let db = env.db().await;
    const TOTAL: i64 = 30_000;
    // Many small transactions on four aggregates, written before the slot.
    for chunk in 0..(TOTAL / 50) {
        insert_events(&db, &format!("agg-{}", chunk % 4), chunk * 50, 50).await;
    }
    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let published = || async {
        let (_, published, _) = status_counts(&db).await;
        published
    };
    let mid = wait_for("the sweep under way", Duration::from_secs(60), || async {
        let n = published().await;
        (n > 0).then_some(n)
    })
    .await;
    env.nats.stop(true);
    let at_stop = published().await;
    assert!(
        at_stop < TOTAL,
        "NATS must stop mid-sweep ({mid} then {at_stop} of {TOTAL} published)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.nats.start_again().unwrap();
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, TOTAL as u64, Duration::from_secs(120)).await;
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(
        messages.len() as i64,
        TOTAL,
        "nothing missing, nothing twice"
    );
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}

/// A sweep that stops inside a transaction (here the stream fills up after
/// 25 of its 60 rows) records the failure on the row it stopped at. That
/// write moves the row physically (a new tuple version after its
/// neighbours); once the limit is lifted it must still go first, before
/// the rest of its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_stopped_inside_a_transaction_resumes_in_order() {
    let env = Env::start().await;
    let db = env.db().await;
    let js = env.js().await;
    create_full_stream(&js, 25).await;
    insert_events(&db, "stopped", 0, 60).await;
    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let stopped_at: String = wait_for(
        "the failure recorded where the sweep stopped",
        Duration::from_secs(60),
        || async {
            db.query_opt(
                "SELECT payload->>'n' FROM event_outbox \
                 WHERE status = 'pending' AND last_error IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .map(|row| row.get(0))
        },
    )
    .await;
    assert_eq!(stopped_at, "25", "the first row the stream refused");
    lift_stream_limit(&js).await;
    wait_all_published(&db, &js, STREAM, 60, Duration::from_secs(60)).await;
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 60);
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}

/// A pending row that cannot become a message (a NULL after a schema
/// change) fails alone in the sweeper, as in the stream; it used to fail
/// every sweep, and catch-up stopped behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swept_row_that_cannot_be_a_message_is_a_dead_letter() {
    let env = Env::start().await;
    let db = env.db().await;
    insert_events(&db, "before", 0, 10).await;
    insert_undecodable(&db).await.unwrap();
    insert_events(&db, "after", 0, 10).await;
    let _tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    let js = env.js().await;
    wait_settled(&db, &js, (0, 20, 1)).await;
    let error = last_error(&db, "no-type").await;
    assert!(error.contains("cannot publish"), "{error}");
}
