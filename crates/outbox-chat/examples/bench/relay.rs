//! The polling relay baseline, run as `bench relay`.

use crate::Result;
use async_nats::jetstream::{self};
use outbox_tailer::internals::{row_from, Message, ROW_COLUMNS};
use std::time::Duration;

/// The polling relay baseline: poll, publish pipelined, mark, commit.
pub(crate) async fn relay(database_url: &str, nats_url: &str) -> Result<()> {
    let (mut db, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let select = db
        .prepare(
            &format!(
                "SELECT {ROW_COLUMNS} FROM event_outbox WHERE status = 'pending' AND next_retry_at <= now() \
                 ORDER BY next_retry_at, created_at LIMIT 500 FOR UPDATE SKIP LOCKED"
            ),
        )
        .await?;
    let mark = db
        .prepare(
            "UPDATE event_outbox SET status = 'published', published_at = now() WHERE id = ANY($1)",
        )
        .await?;
    loop {
        let tx = db.transaction().await?;
        let rows = tx.query(&select, &[]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        let mut acks = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let row = row_from(r)?;
            let message = Message::from_row("events", &row)?;
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.body)
                .headers(message.headers);
            acks.push(js.send_publish(message.subject, publish).await?);
            ids.push(row.id);
        }
        for ack in acks {
            ack.await?;
        }
        tx.execute(&mark, &[&ids]).await?;
        tx.commit().await?;
    }
}
