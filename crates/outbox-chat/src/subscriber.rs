//! A subscriber to the events outbox-tailer publishes: a durable JetStream
//! pull consumer that applies each event's effect exactly once.
//!
//! The tailer delivers every committed event at least once: a replay after a
//! crash can reach further back than the stream's duplicate window, and a
//! consumer that dies between its work and its ack gets the message again.
//! So the effect is made idempotent by the event id, in the consumer's own
//! database:
//!
//! 1. in **one** transaction, `INSERT INTO processed_events (event_id) ... ON
//!    CONFLICT DO NOTHING`, and only if that inserted a row, apply the effect;
//! 2. commit;
//! 3. then ack the message.
//!
//! A crash before the commit leaves nothing behind and the message comes back;
//! a crash after the commit and before the ack brings the message back too, and
//! the insert finds its id, so the effect is skipped and the message acked.
//! Two replicas racing on the same event serialise on the primary key: the
//! second insert waits for the first transaction and then inserts nothing.
//!
//! The effect here is deliberately not idempotent by itself (a per-chat message
//! counter), so a test can see a double application. Copy the pattern, replace
//! [`effect`]. `examples/subscriber.rs` runs it; `tests/subscriber.rs` proves it.

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, PullConsumer},
    AckKind,
};
use futures_util::StreamExt;
use outbox_producer::TraceParent;
use std::time::Duration;
use tokio_postgres::{Client, Transaction};
use tracing::Instrument;
use uuid::Uuid;

/// The header carrying `event_outbox.id` (also `Nats-Msg-Id`): the idempotency key.
pub const EVENT_ID_HEADER: &str = "Outbox-Event-Id";
/// The header carrying `event_outbox.aggregate_id` (the chat id for chat events).
pub const AGGREGATE_ID_HEADER: &str = "Outbox-Aggregate-Id";

/// The subscriber's own tables, in its own database: the ids it has processed,
/// and its effect (messages counted per chat).
pub const SCHEMA_SQL: &str = "\
CREATE TABLE IF NOT EXISTS processed_events (
    event_id uuid PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS chat_message_counts (
    chat_id text PRIMARY KEY,
    messages bigint NOT NULL
);";

/// Where to consume from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The stream outbox-tailer publishes to (`--stream`, default `EVENTS`).
    pub stream: String,
    /// The durable consumer's name: a restarted subscriber with the same name
    /// resumes after the last message it acked.
    pub durable: String,
    /// Subjects this consumer wants, e.g. `events.chat.message.created`.
    pub filter_subject: String,
    /// How long the server waits for an ack before delivering again.
    pub ack_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stream: "EVENTS".into(),
            durable: "chat-message-counter".into(),
            filter_subject: "events.chat.message.created".into(),
            ack_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("the consumer's message stream ended")]
    StreamEnded,
}

/// tokio-postgres says only "db error"; the server's message is the useful part.
fn describe(error: &tokio_postgres::Error) -> String {
    match (error.as_db_error(), std::error::Error::source(error)) {
        (Some(db), _) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

fn nats(error: impl std::fmt::Display) -> Error {
    Error::Nats(error.to_string())
}

/// An event as the tailer publishes it (docs/contract.md section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Uuid,
    pub aggregate_id: String,
    pub subject: String,
    /// The body as it came: the stored jsonb, byte for byte.
    pub payload: Vec<u8>,
    /// The producer's trace context (a `traceparent` header), if any: the
    /// handling continues that trace.
    pub trace: Option<TraceParent>,
}

impl Event {
    /// Reads the outbox headers of a message; `Err` names what is missing.
    pub fn from_message(message: &async_nats::Message) -> Result<Event, String> {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .ok_or_else(|| format!("no {name} header"))
        };
        let raw_id = header(EVENT_ID_HEADER)?;
        let id = raw_id
            .parse()
            .map_err(|_| format!("{EVENT_ID_HEADER} is not a UUID: {raw_id:?}"))?;
        Ok(Event {
            id,
            aggregate_id: header(AGGREGATE_ID_HEADER)?,
            subject: message.subject.to_string(),
            payload: message.payload.to_vec(),
            trace: header("traceparent")
                .ok()
                .and_then(|h| TraceParent::parse(&h)),
        })
    }
}

/// What [`apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// First time seen: the effect was applied and committed.
    Applied,
    /// Already processed before: nothing was done again.
    Duplicate,
}

/// Creates the subscriber's tables if missing.
pub async fn setup(db: &Client) -> Result<(), Error> {
    db.batch_execute(SCHEMA_SQL).await?;
    Ok(())
}

/// Records the event and applies its effect in one transaction, at most once
/// per event id. On an error nothing is committed: neither the id nor the effect.
pub async fn apply(db: &mut Client, event: &Event) -> Result<Outcome, Error> {
    let tx = db.transaction().await?;
    let first = tx
        .execute(
            "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING",
            &[&event.id],
        )
        .await?
        == 1;
    if first {
        effect(&tx, event).await?;
    }
    tx.commit().await?;
    Ok(if first {
        Outcome::Applied
    } else {
        Outcome::Duplicate
    })
}

/// The consumer's work, inside [`apply`]'s transaction: count the chat's messages.
pub async fn effect(tx: &Transaction<'_>, event: &Event) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO chat_message_counts (chat_id, messages) VALUES ($1, 1) \
         ON CONFLICT (chat_id) DO UPDATE SET messages = chat_message_counts.messages + 1",
        &[&event.aggregate_id],
    )
    .await?;
    Ok(())
}

/// The durable pull consumer on `settings.stream` (created if missing, with
/// explicit acks). The stream itself is the tailer's: it must exist.
pub async fn consumer(js: &jetstream::Context, settings: &Settings) -> Result<PullConsumer, Error> {
    let stream = js.get_stream(&settings.stream).await.map_err(|e| {
        Error::Nats(format!(
            "stream {}: {e} (outbox-tailer creates it on start)",
            settings.stream
        ))
    })?;
    stream
        .get_or_create_consumer(
            &settings.durable,
            pull::Config {
                durable_name: Some(settings.durable.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: settings.ack_wait,
                filter_subject: settings.filter_subject.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(nats)
}

/// What one turn of [`Subscriber::next`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The message's position in the stream.
    pub stream_sequence: u64,
    /// How often the server has delivered it (1 the first time).
    pub delivered: i64,
    pub event_id: Option<Uuid>,
    /// The span the handling ran as, a child of the producer's, when the
    /// event carried trace context: its trace id is the producer's.
    pub span: Option<TraceParent>,
    pub result: Result<Outcome, String>,
}

/// Takes messages from a durable consumer one at a time: apply, commit, ack.
pub struct Subscriber {
    messages: pull::Stream,
    db: Client,
}

impl Subscriber {
    /// Creates the tables and the consumer if missing and starts pulling.
    pub async fn start(
        js: &jetstream::Context,
        db: Client,
        settings: &Settings,
    ) -> Result<Subscriber, Error> {
        setup(&db).await?;
        let messages = consumer(js, settings)
            .await?
            .messages()
            .await
            .map_err(nats)?;
        Ok(Subscriber { messages, db })
    }

    /// Waits for the next message and handles it:
    /// - a new event: effect committed, then acked;
    /// - an event processed before: acked, nothing applied again;
    /// - a message without a usable `Outbox-Event-Id`: terminated (never
    ///   delivered again) and reported, since no retry can fix it;
    /// - the transaction failed: nothing committed, the message is nak'd to
    ///   come back in a second, and reported.
    ///
    /// `Err` only when the subscriber cannot go on (the stream ended, the
    /// database connection is gone, an ack was not confirmed); restart it.
    pub async fn next(&mut self) -> Result<Processed, Error> {
        let message = loop {
            match self.messages.next().await {
                Some(Ok(message)) => break message,
                // Missed heartbeats and the like: the stream carries on.
                Some(Err(error)) => tracing::warn!(%error, "pulling from the consumer"),
                None => return Err(Error::StreamEnded),
            }
        };
        let (stream_sequence, delivered) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .map_err(nats)?;
        let event = match Event::from_message(&message) {
            Ok(event) => event,
            Err(reason) => {
                tracing::error!(stream_sequence, %reason, "not an outbox event; terminated");
                message.ack_with(AckKind::Term).await.map_err(nats)?;
                return Ok(Processed {
                    stream_sequence,
                    delivered,
                    event_id: None,
                    span: None,
                    result: Err(reason),
                });
            }
        };
        // The handling is a span of the producer's trace: its log lines
        // carry the trace id (and this span's id), so a trace runs from the
        // HTTP request that wrote the event to here.
        let span = event.trace.as_ref().map(TraceParent::child);
        let log_span = tracing::info_span!(
            "event",
            event_id = %event.id,
            trace_id = span.as_ref().map(|s| s.trace_id()),
            span_id = span.as_ref().map(|s| s.span_id()),
        );
        let result = match apply(&mut self.db, &event)
            .instrument(log_span.clone())
            .await
        {
            Ok(outcome) => {
                // Only now: the effect is committed. A crash before this ack
                // makes the server deliver again, and `apply` skips it.
                message.double_ack().await.map_err(nats)?;
                log_span.in_scope(|| tracing::info!(?outcome, "event handled"));
                Ok(outcome)
            }
            Err(error) => {
                if self.db.is_closed() {
                    return Err(error);
                }
                tracing::warn!(event_id = %event.id, %error, "not applied; delivered again in 1 s");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
                    .map_err(nats)?;
                Err(error.to_string())
            }
        };
        Ok(Processed {
            stream_sequence,
            delivered,
            event_id: Some(event.id),
            span,
            result,
        })
    }
}
