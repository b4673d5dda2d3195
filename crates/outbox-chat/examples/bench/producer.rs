//! Producers that commit chat events at a pace, and when JetStream stored them.

use crate::{Result, STREAM};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// When JetStream stored each message (µs since the epoch), by event id.
pub(crate) async fn stored_times(
    js: &jetstream::Context,
    first_seq: u64,
) -> Result<HashMap<Uuid, i64>> {
    let stream = js.get_stream(STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first_seq,
            },
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut info_stream = js.get_stream(STREAM).await?;
    let last = info_stream.info().await?.state.last_sequence;
    let mut times = HashMap::new();
    let mut seen_up_to = first_seq.saturating_sub(1);
    while seen_up_to < last {
        let mut batch = consumer
            .fetch()
            .max_messages(2000)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message?;
            let info = message.info()?;
            seen_up_to = info.stream_sequence;
            let published = (info.published.unix_timestamp_nanos() / 1000) as i64;
            if let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .and_then(|v| Uuid::parse_str(v.as_str()).ok())
            {
                times.insert(id, published);
            }
            got += 1;
        }
        if got == 0 {
            break;
        }
    }
    Ok(times)
}

/// One committed transaction: its id and the events it wrote.
pub(crate) struct Commit {
    pub(crate) xid: String,
    pub(crate) ids: Vec<Uuid>,
}

/// Writes chat events: batches of 100 with one multi-row INSERT, single rows,
/// or one huge transaction.
pub(crate) struct Producer {
    pub(crate) db: Client,
    pub(crate) insert: tokio_postgres::Statement,
    pub(crate) chat: String,
    pub(crate) user: Uuid,
    pub(crate) project: Uuid,
    pub(crate) counter: AtomicU64,
}

impl Producer {
    pub(crate) async fn connect(url: &str) -> Result<Producer> {
        let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let insert = db
            .prepare(
                "INSERT INTO event_outbox (id, aggregate_type, aggregate_id, user_id, project_id, event_type, payload) \
                 SELECT id, 'chat', $2, $3, $4, 'message.created', p::jsonb FROM unnest($1::uuid[], $5::text[]) AS t(id, p)",
            )
            .await?;
        Ok(Producer {
            db,
            insert,
            chat: Uuid::new_v4().to_string(),
            user: Uuid::new_v4(),
            project: Uuid::new_v4(),
            counter: AtomicU64::new(0),
        })
    }

    /// A ~400-byte chat message payload.
    pub(crate) fn payload(&self, id: Uuid) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        serde_json::json!({
            "message_id": id, "chat_id": self.chat, "project_id": self.project, "user_id": self.user, "role": "user",
            "content": format!("message {n}: the deploy finished, the dashboards look green, and the on-call rotation for next week is posted in the channel; ping me if the lag alert fires again."),
        })
        .to_string()
    }

    pub(crate) async fn write(&self, n: usize) -> Result<Commit> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let payloads: Vec<String> = ids.iter().map(|id| self.payload(*id)).collect();
        self.db.batch_execute("BEGIN").await?;
        self.db
            .execute(
                &self.insert,
                &[&ids, &self.chat, &self.user, &self.project, &payloads],
            )
            .await?;
        self.commit(ids).await
    }

    /// A transaction of `n` single-row INSERTs, one round trip each: how an
    /// application (the chat endpoint) writes, and the producer rate the
    /// targets are stated for.
    pub(crate) async fn rows(&self, n: usize) -> Result<Commit> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        self.db.batch_execute("BEGIN").await?;
        for id in &ids {
            let payload = vec![self.payload(*id)];
            self.db
                .execute(
                    &self.insert,
                    &[&vec![*id], &self.chat, &self.user, &self.project, &payload],
                )
                .await?;
        }
        self.commit(ids).await
    }

    /// Commits the open transaction that wrote `ids`.
    async fn commit(&self, ids: Vec<Uuid>) -> Result<Commit> {
        let xid: String = self
            .db
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await?
            .get(0);
        self.db.batch_execute("COMMIT").await?;
        Ok(Commit { xid, ids })
    }

    /// A transaction of `n` rows in one multi-row INSERT (fast backlog loading).
    pub(crate) async fn batch(&self, n: usize) -> Result<Commit> {
        self.write(n).await
    }

    pub(crate) async fn single(&self) -> Result<Commit> {
        self.write(1).await
    }

    pub(crate) async fn big(&self, n: usize) -> Result<()> {
        self.db.batch_execute("BEGIN").await?;
        let mut written = 0;
        while written < n {
            let chunk = 5000.min(n - written);
            let ids: Vec<Uuid> = (0..chunk).map(|_| Uuid::new_v4()).collect();
            let payloads: Vec<String> = ids.iter().map(|id| self.payload(*id)).collect();
            self.db
                .execute(
                    &self.insert,
                    &[&ids, &self.chat, &self.user, &self.project, &payloads],
                )
                .await?;
            written += chunk;
        }
        self.db.batch_execute("COMMIT").await?;
        Ok(())
    }
}
