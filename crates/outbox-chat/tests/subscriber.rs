//! The subscriber pattern (`outbox_chat::subscriber`, run by
//! `examples/subscriber.rs`) against a real nats-server and PostgreSQL: events
//! published with the tailer's headers, duplicates the stream cannot drop
//! (same `Outbox-Event-Id`, another `Nats-Msg-Id`, as a replay beyond the
//! duplicate window publishes them), a consumer restart, a crash between the
//! commit and the ack, and a failed transaction. Each event's effect must
//! happen exactly once.

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use outbox_chat::subscriber::{self, Event, Outcome, Processed, Settings, Subscriber};
use outbox_testkit::{NatsServer, PgServer};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

const STREAM: &str = "EVENTS";
const SUBJECT: &str = "events.chat.message.created";

struct Env {
    pg: PgServer,
    nats: NatsServer,
    js: jetstream::Context,
    settings: Settings,
}

async fn env() -> Env {
    let pg = PgServer::start().unwrap();
    let nats = NatsServer::start().unwrap();
    // The subscriber's own database, not the producer's: it needs no outbox schema.
    pg.create_database("consumer").await.unwrap();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // The stream as the tailer creates it (docs/contract.md section 3).
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let settings = Settings {
        stream: STREAM.into(),
        durable: "chat-message-counter".into(),
        filter_subject: SUBJECT.into(),
        // Short, so a message delivered and never acked comes back quickly.
        ack_wait: Duration::from_secs(2),
    };
    Env {
        pg,
        nats,
        js,
        settings,
    }
}

impl Env {
    async fn db(&self) -> Client {
        self.pg.connect("consumer").await.unwrap()
    }

    /// A subscriber as a fresh process would start: its own NATS connection
    /// and database session.
    async fn subscriber(&self) -> Subscriber {
        let js = jetstream::new(async_nats::connect(self.nats.url()).await.unwrap());
        Subscriber::start(&js, self.db().await, &self.settings)
            .await
            .unwrap()
    }

    /// Publishes event `id` of `chat` with the tailer's headers under the
    /// de-duplication id `msg_id`; returns the stream sequence, or None when
    /// the stream dropped it as a duplicate.
    async fn publish(&self, id: Uuid, chat: &str, msg_id: &str) -> Option<u64> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert("Outbox-Event-Id", id.to_string().as_str());
        headers.insert("Outbox-Aggregate-Type", "chat");
        headers.insert("Outbox-Aggregate-Id", chat);
        headers.insert("Outbox-Event-Type", "message.created");
        headers.insert("Outbox-Created-At", "2026-12-01T12:00:00.000000Z");
        let payload = serde_json::json!({"chat_id": chat, "content": format!("message {id}")});
        let ack = self
            .js
            .publish_with_headers(SUBJECT, headers, payload.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        (!ack.duplicate).then_some(ack.sequence)
    }

    /// Publishes `n` new events round-robin over `chats`; returns them.
    async fn publish_new(&self, chats: &[String], n: usize) -> Vec<(Uuid, String)> {
        let mut events = Vec::new();
        for i in 0..n {
            let (id, chat) = (Uuid::new_v4(), chats[i % chats.len()].clone());
            assert!(self.publish(id, &chat, &id.to_string()).await.is_some());
            events.push((id, chat));
        }
        events
    }

    /// The consumer's (pending, ack pending) counts on the server.
    async fn backlog(&self) -> (u64, usize) {
        let info = self
            .js
            .get_stream(STREAM)
            .await
            .unwrap()
            .consumer_info(&self.settings.durable)
            .await
            .unwrap();
        (info.num_pending, info.num_ack_pending)
    }

    /// Runs `subscriber` until the server has nothing left for it: nothing
    /// undelivered, nothing delivered and unacked. At most 30 s.
    async fn drain(&self, subscriber: &mut Subscriber) -> Vec<Processed> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut processed = Vec::new();
        while self.backlog().await != (0, 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, subscriber.next()).await {
                Ok(p) => processed.push(p.unwrap()),
                Err(_) => panic!(
                    "the consumer still has {:?} (pending, ack pending) after 30 s; processed {processed:?}",
                    self.backlog().await
                ),
            }
        }
        processed
    }
}

async fn counts(db: &Client) -> BTreeMap<String, i64> {
    db.query("SELECT chat_id, messages FROM chat_message_counts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn processed_ids(db: &Client) -> BTreeSet<Uuid> {
    db.query("SELECT event_id FROM processed_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn expected_counts(events: &[(Uuid, String)]) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for (_, chat) in events {
        *counts.entry(chat.clone()).or_insert(0) += 1;
    }
    counts
}

/// The ids of the events applied, in order; every other message must have
/// been recognised as a duplicate.
fn applied(processed: &[Processed]) -> Vec<Uuid> {
    for p in processed {
        assert!(
            matches!(p.result, Ok(Outcome::Applied | Outcome::Duplicate)),
            "every message applied or recognised: {p:?}"
        );
    }
    processed
        .iter()
        .filter(|p| p.result == Ok(Outcome::Applied))
        .map(|p| p.event_id.unwrap())
        .collect()
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_takes_effect_once_across_duplicates_and_a_restart() {
    let env = env().await;
    let db = env.db().await;
    let chats: Vec<String> = (0..3).map(|_| Uuid::new_v4().to_string()).collect();

    // 20 events, then 5 of them again under other Nats-Msg-Ids: the stream
    // keeps those (as it does a replay beyond its duplicate window), so the
    // consumer really receives each of the 5 twice. One more copy under its
    // original Nats-Msg-Id is dropped by the stream itself.
    let mut events = env.publish_new(&chats, 20).await;
    for (id, chat) in &events[..5] {
        assert!(env
            .publish(*id, chat, &format!("replay-{id}"))
            .await
            .is_some());
    }
    let (id, chat) = &events[5];
    assert_eq!(env.publish(*id, chat, &id.to_string()).await, None);

    let mut first = env.subscriber().await;
    let processed = env.drain(&mut first).await;
    let sequences: BTreeSet<u64> = processed.iter().map(|p| p.stream_sequence).collect();
    assert_eq!(sequences, (1..=25).collect::<BTreeSet<u64>>());
    // A message whose ack was late may come again too; it must not count.
    assert!(processed.len() >= 25, "{processed:?}");
    let ids = |events: &[(Uuid, String)]| sorted(events.iter().map(|(id, _)| *id).collect());
    assert_eq!(
        sorted(applied(&processed)),
        ids(&events),
        "each event applied once"
    );
    assert_eq!(counts(&db).await, expected_counts(&events));
    assert_eq!(processed_ids(&db).await.len(), 20);

    // Restart: the durable consumer resumes after the last acked message.
    // New events and two more replays arrive while no subscriber runs.
    drop(first);
    let new = env.publish_new(&chats, 10).await;
    for (id, chat) in &events[10..12] {
        assert!(env
            .publish(*id, chat, &format!("replay-{id}"))
            .await
            .is_some());
    }
    let mut second = env.subscriber().await;
    let processed = env.drain(&mut second).await;
    let sequences: BTreeSet<u64> = processed.iter().map(|p| p.stream_sequence).collect();
    assert_eq!(
        sequences,
        (26..=37).collect::<BTreeSet<u64>>(),
        "only what came after the last ack: {processed:?}"
    );
    assert_eq!(
        sorted(applied(&processed)),
        ids(&new),
        "the new events, once each"
    );
    events.extend(new);
    assert_eq!(counts(&db).await, expected_counts(&events));
    assert_eq!(
        processed_ids(&db).await,
        events.iter().map(|(id, _)| *id).collect::<BTreeSet<Uuid>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_ack_and_a_failed_transaction_apply_nothing_twice() {
    let env = env().await;
    let mut db = env.db().await;
    subscriber::setup(&db).await.unwrap();
    let chat = Uuid::new_v4().to_string();

    // A consumer that commits the effect and dies before its ack: the
    // message stays unacked and the server delivers it again after ack_wait.
    let crashed = Uuid::new_v4();
    env.publish(crashed, &chat, &crashed.to_string())
        .await
        .unwrap();
    {
        let consumer = subscriber::consumer(&env.js, &env.settings).await.unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the event is delivered within 10 s")
            .unwrap()
            .unwrap();
        let event = Event::from_message(&message).unwrap();
        assert_eq!(event.id, crashed);
        assert_eq!(
            subscriber::apply(&mut db, &event).await.unwrap(),
            Outcome::Applied
        );
        // Dropped without an ack: the crash.
    }
    let mut subscriber = env.subscriber().await;
    let redelivered = tokio::time::timeout(Duration::from_secs(15), subscriber.next())
        .await
        .expect("redelivered after ack_wait (2 s)")
        .unwrap();
    assert_eq!(redelivered.event_id, Some(crashed));
    assert!(redelivered.delivered >= 2, "{redelivered:?}");
    assert_eq!(redelivered.result, Ok(Outcome::Duplicate));
    assert_eq!(counts(&db).await, BTreeMap::from([(chat.clone(), 1)]));

    // A transaction that fails after the id was inserted commits neither the
    // id nor the effect; the nak brings the message back, and once the
    // database works again it is applied, once.
    db.batch_execute("ALTER TABLE chat_message_counts RENAME TO chat_message_counts_away")
        .await
        .unwrap();
    let failing = Uuid::new_v4();
    env.publish(failing, &chat, &failing.to_string())
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.event_id, Some(failing));
    let error = failed.result.unwrap_err();
    assert!(error.contains("chat_message_counts"), "{error}");
    assert!(
        !processed_ids(&db).await.contains(&failing),
        "the id was rolled back with the failed effect"
    );
    db.batch_execute("ALTER TABLE chat_message_counts_away RENAME TO chat_message_counts")
        .await
        .unwrap();
    let retried = tokio::time::timeout(Duration::from_secs(15), subscriber.next())
        .await
        .expect("delivered again after the nak")
        .unwrap();
    assert_eq!(
        (retried.event_id, retried.result),
        (Some(failing), Ok(Outcome::Applied))
    );
    assert_eq!(env.drain(&mut subscriber).await, vec![]);
    assert_eq!(counts(&db).await, BTreeMap::from([(chat, 2)]));
    assert_eq!(processed_ids(&db).await, BTreeSet::from([crashed, failing]));
}
