//! One trace from the HTTP request to the handled event, on real servers:
//! a POST to the chat endpoint with a `traceparent` writes an event that
//! carries a child of the caller's span; the tailer publishes it with that
//! header; the subscriber handles it as a span of the same trace.

use async_nats::jetstream;
use outbox_chat::subscriber::{Settings, Subscriber};
use outbox_chat::{self as chat, ChatStore};
use outbox_producer::TraceParent;
use outbox_testkit::{alembic, tailer_bin, NatsServer, PgServer};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The tailer, killed on drop.
struct Tailer(Child);

impl Drop for Tailer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_goes_from_the_request_through_the_event_to_the_subscriber() {
    let pg = PgServer::start().unwrap();
    let nats = NatsServer::start().unwrap();
    let url = pg.create_database("chat").await.unwrap();
    alembic(&url, &["upgrade", "head"]).unwrap();
    pg.create_database("consumer").await.unwrap();
    let _tailer = Tailer(
        Command::new(tailer_bin().unwrap())
            .arg("run")
            .env("DATABASE_URL", &url)
            .env("NATS_URL", nats.url())
            .env("METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream("EVENTS").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the tailer never made its stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settings = Settings {
        stream: "EVENTS".into(),
        durable: "traced".into(),
        filter_subject: "events.chat.message.created".into(),
        ack_wait: Duration::from_secs(5),
    };
    let mut subscriber = Subscriber::start(&js, pg.connect("consumer").await.unwrap(), &settings)
        .await
        .unwrap();
    let store = ChatStore::new(url.parse().unwrap(), 2).unwrap();
    let addr = chat::spawn("127.0.0.1:0".parse().unwrap(), Arc::new(store))
        .await
        .unwrap();

    let response = reqwest::Client::new()
        .post(format!("http://{addr}/chats/{}/messages", Uuid::new_v4()))
        .header("traceparent", CALLER)
        .header("tracestate", "vendor=x")
        .body(
            serde_json::json!({"project_id": Uuid::new_v4(), "user_id": Uuid::new_v4(),
                               "role": "user", "content": "traced"})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let processed = tokio::time::timeout(Duration::from_secs(60), subscriber.next())
        .await
        .expect("the event reached the subscriber")
        .unwrap();
    assert!(processed.result.is_ok(), "{processed:?}");
    let caller = TraceParent::parse(CALLER).unwrap();
    let handled = processed.span.expect("the subscriber continued a trace");
    assert_eq!(
        handled.trace_id(),
        caller.trace_id(),
        "one trace end to end"
    );

    // The message itself: the endpoint's span, a child of the caller's.
    let stream = js.get_stream("EVENTS").await.unwrap();
    let message = stream
        .get_raw_message(processed.stream_sequence)
        .await
        .unwrap();
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    let published = TraceParent::parse(&header("traceparent").unwrap()).unwrap();
    assert_eq!(published.trace_id(), caller.trace_id());
    assert_ne!(
        published.span_id(),
        caller.span_id(),
        "the endpoint's own span"
    );
    assert_ne!(
        handled.span_id(),
        published.span_id(),
        "the subscriber's own span"
    );
    assert_eq!(header("tracestate").as_deref(), Some("vendor=x"));
}
