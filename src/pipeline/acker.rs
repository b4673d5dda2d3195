//! The acker stage: awaits publish acks in stream order and hands the acked
//! ids to the marker in batches that grow with the load.

use super::{Batch, InFlight};
use crate::error::Error;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{Receiver, Sender};

/// Most ids in one UPDATE: large enough to amortise the round trip and the
/// statement, small enough to keep each transaction short.
const MAX_BATCH: usize = 2000;
/// While the marker is idle, a batch this large goes at once rather than
/// waiting for the acks behind it.
const MIN_BATCH: usize = 64;

pub(super) async fn run(
    mut inflight: Receiver<InFlight>,
    batches: Sender<Batch>,
) -> Result<(), Error> {
    let mut batch = Batch::default();
    loop {
        let item = match inflight.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Disconnected) => break,
            // Nothing more acked for now: hand over what there is, then wait.
            Err(TryRecvError::Empty) => {
                flush(&batches, &mut batch).await?;
                match inflight.recv().await {
                    Some(item) => item,
                    None => break,
                }
            }
        };
        match item {
            InFlight::Event { id, ack } => {
                let ack = ack
                    .await
                    .map_err(|e| Error::Nats(format!("publishing event {id}: {e}")))?;
                if ack.duplicate {
                    tracing::debug!(%id, "JetStream dropped a duplicate");
                }
                batch.ids.push(id);
                let marker_idle = batches.capacity() > 0;
                if batch.ids.len() >= MAX_BATCH || (marker_idle && batch.ids.len() >= MIN_BATCH) {
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
