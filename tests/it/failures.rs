//! Failure paths that must keep the contract (section 3): a stream at its
//! limit stalls publishing and fails no event; a subject the server cannot
//! take fails alone, at once, and holds nothing back.

use crate::common::*;
use outbox_testkit::free_port;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_stalls_publishing_fails_nothing_and_resumes_when_lifted() {
    let env = Env::start().await;
    let db = env.db().await;
    let js = env.js().await;
    // The operator's stream, created beforehand: 50 messages, then refuse.
    create_full_stream(&js, 50).await;
    let port = free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let _tailer = env
        .streaming(
            &db,
            &[
                "run",
                "--max-retries",
                "2",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ],
        )
        .await;
    for aggregate in ["full-0", "full-1"] {
        insert_events(&db, aggregate, 0, 60).await;
    }
    let (status, body) = wait_for(
        "/readyz to report the limit",
        Duration::from_secs(60),
        || async {
            let (status, body) = http_get(&format!("{base}/readyz")).await;
            body.contains("stream at a limit").then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let scrape = http_get(&format!("{base}/metrics")).await.1;
    assert!(scrape.contains("outbox_stream_limit_reached 1"), "{scrape}");
    // Several retries later (more than --max-retries), nothing has failed.
    wait_for(
        "retries past --max-retries",
        Duration::from_secs(60),
        || async {
            let scrape = http_get(&format!("{base}/metrics")).await.1;
            (metric_sum(&scrape, "outbox_publish_retries_total") >= 4.0).then_some(())
        },
    )
    .await;
    let (pending, published, failed) = status_counts(&db).await;
    assert_eq!(failed, 0, "a full stream fails no event");
    assert_eq!((pending + published, published), (120, 50));
    assert_eq!(stream_count(&js, STREAM).await, 50);

    // The operator lifts the limit: publishing resumes by itself, in order.
    lift_stream_limit(&js).await;
    wait_all_published(&db, &js, STREAM, 120, Duration::from_secs(60)).await;
    assert_eq!(stream_count(&js, STREAM).await, 120);
    let breaks = order_breaks(&read_stream(&js, STREAM).await);
    assert!(breaks.is_empty(), "{breaks:?}");
    wait_for("/readyz to recover", Duration::from_secs(30), || async {
        (http_get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    let failed: i64 = db
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE retry_count > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 0, "stream limits never count toward --max-retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_too_long_for_the_server_fails_alone_and_holds_nothing_back() {
    let env = Env::start().await;
    let db = env.db().await;
    let _tailer = env.streaming(&db, &["run"]).await;
    insert_events(&db, "before", 0, 10).await;
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('chat', 'long', repeat('x', 5000), '{}')",
        &[],
    )
    .await
    .unwrap();
    insert_events(&db, "after", 0, 10).await;
    let js = env.js().await;
    wait_for(
        "the events around it published",
        Duration::from_secs(60),
        || async {
            let (pending, published, failed) = status_counts(&db).await;
            (pending == 0 && published == 20 && failed == 1).then_some(())
        },
    )
    .await;
    assert_eq!(stream_count(&js, STREAM).await, 20);
    let error: String = db
        .query_one(
            "SELECT last_error FROM event_outbox WHERE status = 'failed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("subject is 5012 bytes"), "{error}");
}
