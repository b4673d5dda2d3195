//! The tailer end to end: the real binary against a real PostgreSQL and
//! nats-server. What reaches the stream is exactly the committed
//! `event_outbox` inserts, once each, with the contract's subject, headers and
//! body, in commit order per aggregate; and every row ends `published`.

use crate::common::*;
use outbox_tailer::internals::message;
use outbox_tailer::internals::subject;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// What the stream must hold for a row, read from the table.
struct Expected {
    subject: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    user_id: Option<String>,
    project_id: Option<String>,
    created_at: String,
    body: String,
}

async fn expected_rows(db: &Client) -> HashMap<String, Expected> {
    db.query(
        "SELECT id::text, aggregate_type, aggregate_id, event_type, user_id::text, project_id::text, \
                to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), payload::text, \
                status, published_at IS NOT NULL \
         FROM event_outbox",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        assert_eq!((r.get::<_, &str>(8), r.get::<_, bool>(9)), ("published", true), "row {}", r.get::<_, &str>(0));
        let (aggregate_type, event_type): (String, String) = (r.get(1), r.get(3));
        (
            r.get(0),
            Expected {
                subject: subject("events", &aggregate_type, &event_type),
                aggregate_type,
                aggregate_id: r.get(2),
                event_type,
                user_id: r.get(4),
                project_id: r.get(5),
                created_at: r.get(6),
                body: r.get(7),
            },
        )
    })
    .collect()
}

/// One producer: its own aggregates, written in program (= commit) order,
/// with single-row and 500-row transactions, rollbacks and rolled-back
/// savepoints. Returns the ids of events that were rolled back.
async fn produce(db: Client, producer: usize, rounds: i64) -> Vec<Uuid> {
    let mut db = db;
    let mut rolled_back = Vec::new();
    let user = Uuid::new_v4();
    let aggregates: Vec<String> = (0..3).map(|a| format!("p{producer}-chat{a}")).collect();
    let mut next: HashMap<&str, i64> = aggregates.iter().map(|a| (a.as_str(), 0)).collect();
    let insert = "INSERT INTO event_outbox (id, aggregate_type, aggregate_id, user_id, event_type, payload) \
                  VALUES ($1, $2, $3, $4, $5, jsonb_build_object('agg', $3::text, 'n', $6::bigint, 'big', 123456789012345678901234567890))";
    for round in 0..rounds {
        let aggregate = aggregates[(round as usize) % aggregates.len()].as_str();
        match round % 5 {
            // A single-row transaction.
            0 | 1 => {
                let n = next[aggregate];
                db.execute(
                    insert,
                    &[
                        &Uuid::new_v4(),
                        &"chat",
                        &aggregate,
                        &Some(user),
                        &"message.created",
                        &n,
                    ],
                )
                .await
                .unwrap();
                *next.get_mut(aggregate).unwrap() += 1;
            }
            // A 500-row transaction.
            2 => {
                let tx = db.transaction().await.unwrap();
                for _ in 0..500 {
                    let n = next[aggregate];
                    tx.execute(
                        insert,
                        &[
                            &Uuid::new_v4(),
                            &"chat",
                            &aggregate,
                            &None::<Uuid>,
                            &"message.edited",
                            &n,
                        ],
                    )
                    .await
                    .unwrap();
                    *next.get_mut(aggregate).unwrap() += 1;
                }
                tx.commit().await.unwrap();
            }
            // A rolled-back transaction.
            3 => {
                let tx = db.transaction().await.unwrap();
                for _ in 0..10 {
                    let id = Uuid::new_v4();
                    tx.execute(
                        insert,
                        &[
                            &id,
                            &"chat",
                            &aggregate,
                            &Some(user),
                            &"message.created",
                            &-1i64,
                        ],
                    )
                    .await
                    .unwrap();
                    rolled_back.push(id);
                }
                tx.rollback().await.unwrap();
            }
            // A rolled-back savepoint inside a committed transaction.
            _ => {
                let mut tx = db.transaction().await.unwrap();
                let n = next[aggregate];
                tx.execute(
                    insert,
                    &[
                        &Uuid::new_v4(),
                        &"chat",
                        &aggregate,
                        &Some(user),
                        &"message.created",
                        &n,
                    ],
                )
                .await
                .unwrap();
                *next.get_mut(aggregate).unwrap() += 1;
                {
                    let sp = tx.savepoint("undo").await.unwrap();
                    let id = Uuid::new_v4();
                    sp.execute(
                        insert,
                        &[
                            &id,
                            &"chat",
                            &aggregate,
                            &Some(user),
                            &"message.created",
                            &-1i64,
                        ],
                    )
                    .await
                    .unwrap();
                    rolled_back.push(id);
                    sp.rollback().await.unwrap();
                }
                let n = next[aggregate];
                tx.execute(
                    insert,
                    &[
                        &Uuid::new_v4(),
                        &"chat",
                        &aggregate,
                        &Some(user),
                        &"message.created",
                        &n,
                    ],
                )
                .await
                .unwrap();
                *next.get_mut(aggregate).unwrap() += 1;
                tx.commit().await.unwrap();
            }
        }
    }
    rolled_back
}

/// Checks the stream against the table: exactly the rows, once each, with
/// the contract's subject, headers and body, in order per aggregate.
async fn assert_stream_matches_table(env: &Env, db: &Client) {
    let expected = expected_rows(db).await;
    let messages = read_stream(&env.js().await, STREAM).await;
    assert_eq!(
        messages.len(),
        expected.len(),
        "one message per committed event"
    );
    let mut seen = HashSet::new();
    let mut last_n: HashMap<String, i64> = HashMap::new();
    for m in &messages {
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        let id = header(message::MSG_ID).expect("Nats-Msg-Id");
        assert!(
            seen.insert(id.clone()),
            "duplicate event {id} in the stream"
        );
        let want = expected
            .get(&id)
            .unwrap_or_else(|| panic!("event {id} is not a committed row"));
        assert_eq!(m.subject.as_str(), want.subject);
        assert_eq!(header(message::EVENT_ID).as_deref(), Some(id.as_str()));
        assert_eq!(
            header(message::AGGREGATE_TYPE).as_deref(),
            Some(want.aggregate_type.as_str())
        );
        assert_eq!(
            header(message::AGGREGATE_ID).as_deref(),
            Some(want.aggregate_id.as_str())
        );
        assert_eq!(
            header(message::EVENT_TYPE).as_deref(),
            Some(want.event_type.as_str())
        );
        assert_eq!(header(message::USER_ID), want.user_id);
        assert_eq!(header(message::PROJECT_ID), want.project_id);
        // The table's microseconds, with trailing zeros trimmed as PostgreSQL prints them.
        let created = header(message::CREATED_AT).unwrap();
        let trimmed = want
            .created_at
            .trim_end_matches('Z')
            .trim_end_matches('0')
            .trim_end_matches('.');
        assert_eq!(created.trim_end_matches('Z'), trimmed, "Outbox-Created-At");
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            want.body,
            "body is the stored jsonb text"
        );
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if let (Some(agg), Some(n)) = (body["agg"].as_str(), body["n"].as_i64()) {
            let previous = last_n.insert(agg.to_owned(), n);
            assert!(
                previous.is_none_or(|p| p < n),
                "aggregate {agg}: {n} after {previous:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_reaches_the_stream_exactly_once_in_order() {
    let env = Env::start().await;
    let db = env.db().await;
    let tailer = env.streaming(&db, &["run"]).await;

    let mut producers = Vec::new();
    for p in 0..4 {
        producers.push(tokio::spawn(produce(env.db().await, p, 40)));
    }
    let mut rolled_back = Vec::new();
    for p in producers {
        rolled_back.extend(p.await.unwrap());
    }
    let committed: i64 = db
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        committed > 4 * 4000,
        "the load is as large as intended: {committed}"
    );
    wait_all_published(
        &db,
        &env.js().await,
        STREAM,
        committed as u64,
        Duration::from_secs(120),
    )
    .await;

    assert_stream_matches_table(&env, &db).await;
    let ids: HashSet<String> = expected_rows(&db).await.into_keys().collect();
    assert!(
        rolled_back.iter().all(|id| !ids.contains(&id.to_string())),
        "no rolled-back event has a row"
    );
    let in_stream: HashSet<String> = read_stream(&env.js().await, STREAM)
        .await
        .iter()
        .filter_map(|m| {
            m.headers
                .get(message::MSG_ID)
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    assert!(
        rolled_back
            .iter()
            .all(|id| !in_stream.contains(&id.to_string())),
        "no rolled-back event was published"
    );
    assert!(!tailer.output().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_deletes_and_domain_writes_publish_nothing() {
    let env = Env::start().await;
    let db = env.db().await;
    let _tailer = env.streaming(&db, &["run", "--event-logs"]).await;
    let js = env.js().await;
    insert_events(&db, "chat-a", 0, 20).await;
    wait_all_published(&db, &js, STREAM, 20, Duration::from_secs(30)).await;
    let logged: i64 = db
        .query_one("SELECT count(*) FROM event_logs l JOIN event_outbox o ON o.id = l.event_id AND o.published_at = l.published_at", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        logged, 20,
        "--event-logs projects every published event with its published_at"
    );

    db.batch_execute(
        "UPDATE event_outbox SET last_error = 'touched', retry_count = retry_count + 1; \
         UPDATE event_outbox SET payload = '{\"edited\": true}' WHERE aggregate_id = 'chat-a'; \
         DELETE FROM event_outbox WHERE (payload->>'n')::int < 5; \
         INSERT INTO messages (project_id, user_id, role, content) \
           SELECT gen_random_uuid(), gen_random_uuid(), 'user', 'domain only' FROM generate_series(1, 100)",
    )
    .await
    .unwrap();
    // A sentinel after them: once it is in the stream, everything before it was decoded.
    insert_events(&db, "sentinel", 0, 1).await;
    wait_for("the sentinel", Duration::from_secs(30), || async {
        let messages = read_stream(&js, STREAM).await;
        messages
            .iter()
            .any(|m| m.headers.get(message::AGGREGATE_ID).map(|v| v.as_str()) == Some("sentinel"))
            .then_some(())
    })
    .await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        21,
        "20 inserts and the sentinel, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_row_transactions_never_leave_a_row_pending() {
    // The visibility hazard: a transaction can be decoded a moment before its
    // rows are visible to other sessions. Many concurrent single-row commits
    // make it happen; the marker must retry until every row is marked.
    let env = Env::start().await;
    let db = env.db().await;
    let _tailer = env.streaming(&db, &["run"]).await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("single").producers(4).limit(1500),
    );
    assert_eq!(load.finish().await, 6000);
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 6000, Duration::from_secs(120)).await;
    assert_stream_matches_table(&env, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_zero_within_ten_seconds() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut tailer = env.streaming(&db, &["run"]).await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("busy").rows(|_| 500).limit(20_000),
    );
    // Stop it mid-load.
    let js = env.js().await;
    wait_for("some events published", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 1000).then_some(())
    })
    .await;
    tailer.stop_cleanly();
    assert_eq!(load.finish().await, 20_000);

    // Every published-and-marked row is in the stream; a restart publishes the rest, once.
    let (_, published, _) = status_counts(&db).await;
    assert!(stream_count(&js, STREAM).await >= published as u64);
    let restarted = env.tailer(&["run"]);
    wait_all_published(&db, &js, STREAM, 20_000, Duration::from_secs(120)).await;
    assert_stream_matches_table(&env, &db).await;
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_three_times_under_load_loses_and_duplicates_nothing() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut tailer = env.streaming(&db, &["run"]).await;
    let js = env.js().await;
    // Transactions of 200 and of 1, mixed.
    let load = Load::start(
        &env.url,
        LoadOptions::new("crash")
            .producers(2)
            .rows(|n| if n % 3 == 0 { 200 } else { 1 }),
    );
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..3 {
        // Let it run a random while under load, then kill -9 it.
        let target = stream_count(&js, STREAM).await + rng.u64(200..3000);
        wait_for(
            "progress before a kill",
            Duration::from_secs(60),
            || async { (stream_count(&js, STREAM).await >= target).then_some(()) },
        )
        .await;
        tailer.kill9();
        tracing_line(&format!("killed tailer in round {round}"));
        tailer = env.tailer(&["run"]);
        wait_streaming(&db, SLOT, &tailer).await;
    }
    load.stop().await;
    let committed: i64 = db
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    wait_all_published(&db, &js, STREAM, committed as u64, Duration::from_secs(120)).await;
    assert_stream_matches_table(&env, &db).await;
}

fn tracing_line(text: &str) {
    eprintln!("[test] {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_beyond_the_duplicate_window_publishes_nothing_again() {
    let env = Env::start().await;
    let db = env.db().await;
    let js = env.js().await;
    // A stream whose duplicate window is far shorter than the replay below:
    // JetStream alone would let every repeat through.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        duplicate_window: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    // A second slot, created before the events: streaming from it later
    // re-delivers all of them, as a server resuming from an old position would.
    db.execute(
        "SELECT pg_create_logical_replication_slot('old_position', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();

    let mut tailer = env.streaming(&db, &["run"]).await;
    insert_events(&db, "replayed", 0, 300).await;
    for n in 300..320 {
        insert_events(&db, "replayed", n, 1).await;
    }
    wait_all_published(&db, &js, STREAM, 320, Duration::from_secs(60)).await;
    tailer.stop_cleanly();
    tokio::time::sleep(Duration::from_millis(600)).await; // outlast the duplicate window

    let replay = env.tailer(&["run", "--slot", "old_position"]);
    wait_streaming(&db, "old_position", &replay).await;
    insert_events(&db, "after-replay", 0, 5).await;
    wait_all_published(&db, &js, STREAM, 325, Duration::from_secs(60)).await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        325,
        "the replayed 320 were not published again"
    );
    assert_stream_matches_table(&env, &db).await;
}

async fn wal_position(db: &Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_does_not_hold_back_wal() {
    let env = Env::start().await;
    let db = env.db().await;
    let _tailer = env.streaming(&db, &["run"]).await;
    // 64 MB of WAL from another table, none from the outbox.
    let start: i64 = wal_position(&db).await;
    loop {
        db.batch_execute(
            "INSERT INTO messages (project_id, user_id, role, content) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'user', repeat(md5(i::text), 60) FROM generate_series(1, 5000) i",
        )
        .await
        .unwrap();
        let now: i64 = wal_position(&db).await;
        if now - start >= 64 << 20 {
            break;
        }
    }
    let lag = wait_for("the slot to catch up within 16 MB", Duration::from_secs(30), || async {
        let lag: i64 = db
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap()
            .get(0);
        (lag < 16 << 20).then_some(lag)
    })
    .await;
    assert!(lag < 16 << 20);
    assert_eq!(stream_count(&env.js().await, STREAM).await, 0);
}
