//! A subscriber to outbox-tailer's events, the pattern to copy: a durable
//! JetStream pull consumer that counts chat messages per chat in its own
//! PostgreSQL database, exactly once per event even though delivery is at least
//! once. Each event's effect and its id in `processed_events` commit in one
//! transaction, and the message is acked only after that commit
//! (`outbox_chat::subscriber` has the logic, `tests/subscriber.rs` the proof).
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 SUBSCRIBER_DATABASE_URL=postgresql://... \
//!     cargo run -p outbox-chat --example subscriber
//! ```
//!
//! Stop it with Ctrl-C and start it again: the durable consumer resumes after
//! the last event it acked.

use clap::Parser;
use outbox_chat::subscriber::{Settings, Subscriber};
use std::time::Duration;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The subscriber's own database (its tables are created if missing).
    #[arg(long, env = "SUBSCRIBER_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The stream outbox-tailer publishes to.
    #[arg(long, default_value = "EVENTS")]
    stream: String,
    /// The durable consumer's name: one name per subscribing service.
    #[arg(long, default_value = "chat-message-counter")]
    durable: String,
    #[arg(long, default_value = "events.chat.message.created")]
    subject: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter("info,async_nats=warn")
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (db, connection) =
        tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(%error, "database connection lost");
        }
    });
    let js = async_nats::jetstream::new(async_nats::connect(&args.nats_url).await?);
    let settings = Settings {
        stream: args.stream,
        durable: args.durable,
        filter_subject: args.subject,
        ack_wait: Duration::from_secs(30),
    };
    let mut subscriber = Subscriber::start(&js, db, &settings).await?;
    println!(
        "consuming {} from stream {} as durable {}",
        settings.filter_subject, settings.stream, settings.durable
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            processed = subscriber.next() => {
                let p = processed?;
                let id = p.event_id.map(|id| id.to_string()).unwrap_or_default();
                match p.result {
                    Ok(outcome) => println!("#{} event {id}: {outcome:?} (delivery {})", p.stream_sequence, p.delivered),
                    Err(reason) => println!("#{} event {id}: not applied: {reason}", p.stream_sequence),
                }
            }
        }
    }
    Ok(())
}
