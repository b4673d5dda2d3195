//! The acker stage: awaits publish acks in stream order and hands the acked
//! ids to the marker in batches.
//!
//! A batch goes to the marker when it is full, or when its oldest id has
//! lingered long enough. Marking late costs nothing the consumer sees (the
//! event is already in the stream); marking in few, large statements saves
//! the database a statement and a commit per handful of events, which under
//! live load is most of what the status writes cost.

use super::retry::Retrier;
use super::{Batch, InFlight};
use crate::error::Error;
use crate::replication::progress::seconds_since;
use std::time::Duration;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{Receiver, Sender};
use tokio::time::Instant;

/// Most ids in one UPDATE: large enough to amortise the round trip and the
/// statement, small enough to keep each transaction short.
const MAX_BATCH: usize = 2000;
/// How long an acked id may wait for others to share its UPDATE.
const LINGER: Duration = Duration::from_millis(20);

pub(super) async fn run(
    mut inflight: Receiver<InFlight>,
    batches: Sender<Batch>,
    mut retrier: Retrier,
) -> Result<(), Error> {
    let metrics = retrier.metrics.clone();
    let mut batch = Batch::default();
    // When the oldest item of the current batch arrived.
    let mut since = Instant::now();
    loop {
        let item = match inflight.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) if batch.is_empty() => match inflight.recv().await {
                Some(item) => item,
                None => break,
            },
            Err(TryRecvError::Empty) => {
                match tokio::time::timeout_at(since + LINGER, inflight.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(_) => {
                        flush(&batches, &mut batch).await?;
                        continue;
                    }
                }
            }
        };
        if batch.is_empty() {
            since = Instant::now();
        }
        match item {
            InFlight::Event {
                row,
                sent,
                committed_at,
                published,
            } => {
                let first = match sent {
                    Ok(ack) => ack.await,
                    Err(error) => Err(error),
                };
                metrics.in_flight.dec();
                let id = row.id;
                let Some(ack) = retrier.settle(&row, first).await? else {
                    // A dead letter: its row is `failed`, nothing to mark.
                    continue;
                };
                if ack.duplicate {
                    metrics.duplicates.inc();
                    tracing::debug!(%id, "JetStream dropped a duplicate");
                } else {
                    published.inc();
                    metrics.publish_latency.observe(seconds_since(committed_at));
                }
                metrics.last_publish_timestamp.set(unix_now());
                batch.ids.push(id);
                if batch.ids.len() >= MAX_BATCH {
                    flush(&batches, &mut batch).await?;
                }
            }
            InFlight::Confirm(lsn) => batch.confirm = Some(lsn),
        }
    }
    flush(&batches, &mut batch).await
}

async fn flush(batches: &Sender<Batch>, batch: &mut Batch) -> Result<(), Error> {
    if batch.is_empty() {
        return Ok(());
    }
    batches
        .send(std::mem::take(batch))
        .await
        .map_err(|_| Error::PipelineClosed)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
