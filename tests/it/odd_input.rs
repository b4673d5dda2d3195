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
