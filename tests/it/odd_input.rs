//! Bad input at run time: odd names publish under valid subjects, huge and
//! deeply nested payloads publish intact, and nothing crashes the process.

use crate::common::*;
use outbox_tailer::internals::subject;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_names_and_payloads_publish_or_fail_cleanly() {
    let env = Env::start().await;
    let db = env.db().await;
    let tailer = env.tailer(&["run"]);
    wait_streaming(&db, "event_outbox_tailer", &tailer).await;
    let odd = [
        ("chat room", "message created"),
        ("*", ">"),
        ("", ""),
        ("chat.v2", "a..b."),
        ("чат", "créé.événement"),
        ("tab\there", "line\nbreak"),
        ("🙂", "x.🙂.y"),
    ];
    for (aggregate_type, event_type) in odd {
        db.execute(
            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ($1, 'odd', $2, '{\"n\": 1}')",
            &[&aggregate_type, &event_type],
        )
        .await
        .unwrap();
    }
    // ~900 KB (under the 1 MB max_payload), 1,000 levels deep, and big numbers.
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) VALUES \
           ('chat', 'huge', 'blob', jsonb_build_object('text', repeat('y', 900000))), \
           ('chat', 'deep', 'nested', (repeat('[', 1000) || '1' || repeat(']', 1000))::jsonb), \
           ('chat', 'numbers', 'exact', '{\"big\": 123456789012345678901234567890.000000000000000000001}')",
    )
    .await
    .unwrap();
    let js = env.js().await;
    wait_all_published(&db, &js, "EVENTS", 10, Duration::from_secs(60)).await;

    let stored: std::collections::HashMap<String, String> = db
        .query("SELECT id::text, payload::text FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let messages = read_stream(&js, "EVENTS").await;
    assert_eq!(messages.len(), 10);
    for m in &messages {
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            stored[&id],
            "payload intact"
        );
        for token in m.subject.split('.') {
            assert!(
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{}",
                m.subject
            );
        }
    }
    let subjects: Vec<String> = messages.iter().map(|m| m.subject.to_string()).collect();
    for (aggregate_type, event_type) in odd {
        assert!(
            subjects.contains(&subject("events", aggregate_type, event_type)),
            "{aggregate_type:?} {event_type:?}"
        );
    }
    assert!(!tailer.output().contains("panicked"));
}

/// Rows of odd timestamps, through the stream and through the sweeper: no
/// row content may panic a task (a panic would end the process, which is
/// what supervision does with one, and the test would see the exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_timestamps_publish_through_the_stream_and_the_sweeper() {
    let env = Env::start().await;
    let db = env.db().await;
    let insert = |aggregate: &'static str, at: &'static str| {
        let db = &db;
        async move {
            db.execute(
                "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
                 VALUES ('chat', $1, 'message.created', '{}', $2::text::timestamptz)",
                &[&aggregate, &at],
            )
            .await
            .unwrap();
        }
    };
    // Before the slot exists: only the sweeper can publish these. (Rows
    // stamped in the future are swept too: tests/it/sweeper.rs.)
    insert("swept-minus-infinity", "-infinity").await;
    insert("swept-year-1", "0001-01-01 00:00:00+00").await;
    let mut tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    for (aggregate, at) in [
        ("streamed-minus-infinity", "-infinity"),
        ("streamed-infinity", "infinity"),
        ("streamed-year-1", "0001-01-01 00:00:00+00"),
        ("streamed-year-9999", "9999-12-31 23:59:59.999999+00"),
    ] {
        insert(aggregate, at).await;
    }
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 6, Duration::from_secs(60)).await;
    let created: std::collections::HashMap<String, String> = read_stream(&js, STREAM)
        .await
        .iter()
        .map(|m| {
            let header = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            (header("Outbox-Aggregate-Id"), header("Outbox-Created-At"))
        })
        .collect();
    assert_eq!(created["streamed-infinity"], "infinity");
    assert_eq!(created["streamed-minus-infinity"], "-infinity");
    assert_eq!(created["swept-minus-infinity"], "-infinity");
    assert_eq!(created["streamed-year-1"], "0001-01-01T00:00:00Z");
    // Swept or streamed, the same text.
    assert_eq!(created["swept-year-1"], "0001-01-01T00:00:00Z");
    assert_eq!(created["streamed-year-9999"], "9999-12-31T23:59:59.999999Z");
    assert!(
        tailer.wait_exit(Duration::ZERO).is_none(),
        "still running:\n{}",
        tailer.output()
    );
}

/// A schema change mid-stream lets a NULL through where the contract has
/// none: that event fails alone, with the reason in `last_error`, and the
/// events around it flow (before, the tailer stopped and the slot held WAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_stream_cannot_decode_fails_alone_after_an_alter_table() {
    let env = Env::start().await;
    let db = env.db().await;
    let tailer = env.streaming(&db, &["run"]).await;
    insert_events(&db, "before", 0, 20).await;
    insert_undecodable(&db).await.unwrap();
    insert_events(&db, "after", 0, 20).await;
    let js = env.js().await;
    wait_settled(&db, &js, (0, 40, 1)).await;
    let error = last_error(&db, "no-type").await;
    assert!(error.contains("aggregate_type is NULL"), "{error}");
    assert!(tailer.output().contains("event failed (dead letter)"));
}
