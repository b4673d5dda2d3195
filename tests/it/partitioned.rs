//! A partitioned `event_outbox` (declarative partitioning by `created_at`,
//! so old partitions can be dropped) works like a plain one: the publication
//! publishes via the partition root, and events flow through the stream
//! within seconds, in order, marked.

use crate::common::*;
use std::time::Duration;

/// Replaces the migrated outbox with the root of the documented
/// partitioned layout (docs/producing.md), no partitions yet: primary key
/// (id, created_at), an index on id for marking, the sweeper's and
/// retention's indexes, and the publication (through the root or not).
/// Head's republish index comes with the revision that builds it.
pub(crate) async fn partitioned_root(db: &tokio_postgres::Client, via_root: bool) {
    db.batch_execute(&format!(
        "DROP PUBLICATION event_outbox_pub; \
         ALTER TABLE event_outbox RENAME TO event_outbox_plain; \
         CREATE TABLE event_outbox (LIKE event_outbox_plain INCLUDING DEFAULTS INCLUDING CONSTRAINTS) \
             PARTITION BY RANGE (created_at); \
         DROP TABLE event_outbox_plain; \
         ALTER TABLE event_outbox ADD PRIMARY KEY (id, created_at); \
         CREATE INDEX ix_event_outbox_id ON event_outbox (id); \
         CREATE INDEX ix_event_outbox_status_next_retry_at_created_at ON event_outbox (status, next_retry_at, created_at); \
         CREATE INDEX ix_event_outbox_published_at ON event_outbox (published_at) WHERE status = 'published'; \
         CREATE PUBLICATION event_outbox_pub FOR TABLE event_outbox \
             WITH (publish = 'insert', publish_via_partition_root = {via_root})"
    ))
    .await
    .unwrap();
}

/// [`partitioned_root`] with an old partition and a default one, the
/// tailer's role granted what it needs.
async fn partition(db: &tokio_postgres::Client, via_root: bool) {
    partitioned_root(db, via_root).await;
    db.batch_execute(
        "CREATE TABLE event_outbox_old PARTITION OF event_outbox FOR VALUES FROM ('2000-01-01') TO ('2020-01-01'); \
         CREATE TABLE event_outbox_default PARTITION OF event_outbox DEFAULT; \
         GRANT SELECT, UPDATE (status, retry_count, next_retry_at, published_at, last_error) ON event_outbox TO outbox_tailer",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_streams_through_its_root_in_order() {
    let env = Env::start().await;
    let db = env.db().await;
    partition(&db, true).await;
    let _tailer = env.streaming(&db, &["run"]).await;
    let js = env.js().await;
    let started = std::time::Instant::now();
    for n in 0..10 {
        insert_events(&db, "part", n * 50, 50).await;
    }
    // An event dated into the old partition too: every leaf publishes.
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
         VALUES ('chat', 'part-old', 'message.created', '{\"n\": 0}', '2010-01-01')",
        &[],
    )
    .await
    .unwrap();
    wait_all_published(&db, &js, STREAM, 501, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "through the stream, not the 60 s catch-up"
    );
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 501);
    let breaks = order_breaks(&messages);
    assert!(breaks.is_empty(), "{breaks:?}");
    assert!(messages
        .iter()
        .all(|m| m.subject.as_str() == "events.chat.message.created"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_the_root_is_fixed_or_refused_with_the_fix() {
    let env = Env::start().await;
    let db = env.db().await;
    partition(&db, false).await;
    // The tailer's own role does not own the publication: one line, the fix.
    let (code, output) = run_to_exit(&env.tailer_url, &env.nats.url(), &["run"]);
    assert_eq!(code, 1, "{output}");
    let line = last_line(&output);
    assert!(
        line.contains("publish_via_partition_root = true") && line.contains("is partitioned"),
        "{line}"
    );
    // Run by the owner (as `setup` in a deploy pipeline may be), it is fixed.
    let (code, output) = run_to_exit(&env.url, &env.nats.url(), &["setup"]);
    assert_eq!(code, 0, "{output}");
    let via_root: bool = db
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'event_outbox_pub'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(via_root);
}
