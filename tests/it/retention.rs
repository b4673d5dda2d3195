//! Retention: `prune --older-than` and `--retention` delete old published
//! rows in small batches, never pending or failed ones, while the stream
//! keeps flowing.

use crate::common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Rows by kind: old published, old failed, old pending (backing off, so the
/// sweeper leaves them alone).
async fn old_rows(db: &tokio_postgres::Client, published: i64) {
    db.batch_execute(&format!(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
         SELECT 'chat', 'old-' || (i % 1000), 'message.created', jsonb_build_object('n', i), 'published', \
                now() - interval '8 days' + make_interval(secs => i / 1000.0), now() - interval '8 days' \
         FROM generate_series(1, {published}) i; \
         INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, created_at, last_error) \
         SELECT 'chat', 'dead-' || i, 'message.created', '{{}}', 'failed', now() - interval '9 days', 'rejected' \
         FROM generate_series(1, 100) i; \
         INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, created_at, next_retry_at) \
         SELECT 'chat', 'waiting-' || i, 'message.created', '{{}}', now() - interval '9 days', now() + interval '1 day' \
         FROM generate_series(1, 100) i; \
         ANALYZE event_outbox"
    ))
    .await
    .unwrap();
}

async fn count(db: &tokio_postgres::Client, filter: &str) -> i64 {
    db.query_one(
        &format!("SELECT count(*) FROM event_outbox WHERE {filter}"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_half_a_million_old_published_rows_under_live_load_and_nothing_else() {
    let env = Env::start().await;
    let db = env.db().await;
    old_rows(&db, 500_000).await;
    let _tailer = env.streaming(&db, &["run"]).await;
    let js = env.js().await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("live")
            .producers(2)
            .pause(Duration::from_millis(2)),
    );
    wait_for("live events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 200).then_some(())
    })
    .await;

    let before = stream_count(&js, STREAM).await;
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .args(["prune", "--older-than", "7d"])
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "pruned 500000 published events");
    assert!(
        stream_count(&js, STREAM).await > before,
        "the stream kept flowing during the {took:?} prune"
    );
    let live = load.stop().await;

    assert_eq!(
        count(&db, "aggregate_id LIKE 'old-%'").await,
        0,
        "every old published row is gone"
    );
    assert_eq!(
        count(&db, "status = 'failed'").await,
        100,
        "failed rows are never pruned"
    );
    assert_eq!(
        count(&db, "aggregate_id LIKE 'waiting-%' AND status = 'pending'").await,
        100,
        "pending rows are never pruned"
    );
    wait_for(
        "every live event published",
        Duration::from_secs(60),
        || async {
            let published = count(&db, "aggregate_id LIKE 'live-%' AND status = 'published'").await;
            (published == live).then_some(())
        },
    )
    .await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        live as u64,
        "each live event once"
    );

    // A second prune finds nothing; a bad duration is a usage error.
    let again = Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .args(["prune", "--older-than", "7d"])
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "pruned 0 published events"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .args(["prune", "--older-than", "soon"])
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim(),
        "outbox-tailer: --older-than \"soon\" is not a duration such as 7d, 12h or 30m"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_while_running() {
    let env = Env::start().await;
    let db = env.db().await;
    old_rows(&db, 5_000).await;
    let tailer = env.streaming(&db, &["run", "--retention", "3s"]).await;
    insert_events(&db, "fresh", 0, 50).await;
    let js = env.js().await;
    wait_for(
        "the fresh events in the stream",
        Duration::from_secs(30),
        || async { (stream_count(&js, STREAM).await == 50).then_some(()) },
    )
    .await;
    // The old rows go at the first pass, the fresh ones once 3 s old.
    wait_for(
        "retention to prune everything published",
        Duration::from_secs(60),
        || async { (count(&db, "status = 'published'").await == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        count(&db, "status <> 'published'").await,
        200,
        "failed and pending rows stay"
    );
    assert_eq!(stream_count(&js, STREAM).await, 50);
    assert!(
        tailer.output().contains("pruned published events"),
        "{}",
        tailer.output()
    );
}
