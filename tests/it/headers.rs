//! A row's own headers (contract section 3): published after the tailer's,
//! name and value as stored, by the stream and by the sweeper; a row whose
//! headers break the rules is a dead letter at once that names the header
//! and holds nothing up; a database without the column streams as before,
//! and one that adds it while the tailer streams publishes headers from then
//! on.

use crate::common::*;
use outbox_producer::{insert_event, NewEvent};
use std::time::Duration;

/// The row headers of the stream's messages for `aggregate`, each message's
/// sorted by name.
async fn headers_of(
    js: &async_nats::jetstream::Context,
    aggregate: &str,
) -> Vec<Vec<(String, String)>> {
    read_stream(js, STREAM)
        .await
        .into_iter()
        .filter(|m| {
            m.headers
                .get("Outbox-Aggregate-Id")
                .is_some_and(|a| a.as_str() == aggregate)
        })
        .map(|m| {
            sorted_headers(&m, |name| {
                name.starts_with("Nats-") || name.starts_with("Outbox-")
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_go_out_as_stored_and_bad_ones_fail_alone() {
    let env = Env::start().await;
    let mut db = env.db().await;
    // Before the slot: the sweeper publishes this one.
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ('chat', 'swept', 'message.created', '{}', '{\"tenant\": \"acme\"}')",
    )
    .await
    .unwrap();
    let tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;

    let payload = serde_json::json!({"text": "hello"});
    let tx = db.transaction().await.unwrap();
    let event = NewEvent::new("chat", "streamed", "message.created", &payload)
        .header("tenant", "acme")
        .unwrap()
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap()
        .header("content-type", "application/json")
        .unwrap();
    insert_event(&tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    // Headers the rules refuse (written by hand: the producer would refuse
    // them too), then a good event behind them on the same aggregate.
    for (n, headers) in [
        r#"{"Nats-Msg-Id": "forged"}"#,
        r#"{"bad name": "x"}"#,
        r#"{"line": "one\ntwo"}"#,
    ]
    .iter()
    .enumerate()
    {
        db.execute(
            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ('chat', 'bad', 'message.created', jsonb_build_object('n', $1::int), $2::text::jsonb)",
            &[&(n as i32), headers],
        )
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('chat', 'bad', 'message.created', '{\"n\": 9}')",
        &[],
    )
    .await
    .unwrap();

    let js = env.js().await;
    wait_for_seen("every event settled", Duration::from_secs(60), || async {
        match status_counts(&db).await {
            (0, published, failed) if published == 3 && failed == 3 => Ok(()),
            seen => Err(format!("{seen:?} (pending, published, failed)")),
        }
    })
    .await;
    assert_eq!(
        headers_of(&js, "streamed").await,
        [vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("tenant".to_owned(), "acme".to_owned()),
            (
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()
            ),
        ]]
    );
    assert_eq!(
        headers_of(&js, "swept").await,
        [vec![("tenant".to_owned(), "acme".to_owned())]]
    );
    // The refused ones: dead letters naming the header, none in the stream;
    // the event behind them went out.
    let errors: Vec<String> = db
        .query(
            "SELECT last_error FROM event_outbox WHERE status = 'failed' ORDER BY payload->>'n'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (error, names) in errors
        .iter()
        .zip(["\"Nats-Msg-Id\"", "\"bad name\"", "\"line\""])
    {
        assert!(error.contains(names), "{error}");
    }
    assert_eq!(headers_of(&js, "bad").await.len(), 1, "only the good one");
    drop(tailer);
}

/// A database that has not run the headers revision streams as before; the
/// revision applied while the tailer streams brings headers from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_schemas_and_the_column_added_while_streaming() {
    let env = Env::start().await;
    outbox_testkit::alembic(&env.url, &["downgrade", "0004_outbox_retention"]).unwrap();
    let db = env.db().await;
    let _tailer = env.streaming(&db, &["run"]).await;
    insert_events(&db, "old-schema", 0, 10).await;
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 10, Duration::from_secs(30)).await;

    outbox_testkit::alembic(&env.url, &["upgrade", "head"]).unwrap();
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ('chat', 'new-schema', 'message.created', '{\"n\": 0}', '{\"tenant\": \"acme\"}')",
    )
    .await
    .unwrap();
    wait_all_published(&db, &js, STREAM, 11, Duration::from_secs(30)).await;
    assert_eq!(
        headers_of(&js, "new-schema").await,
        [vec![("tenant".to_owned(), "acme".to_owned())]]
    );
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(30)).await;
}
