//! Failed publishes, settled in place: each attempt is recorded on the row
//! and counted, then the event is published again after a backoff, until it
//! is acked or becomes a dead letter. Retrying here, in the acker, keeps the
//! events behind it waiting (in order, in bounded memory) rather than
//! letting them overtake it; a dead letter no longer blocks them.

use crate::backoff::Backoff;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::failures;
use crate::publish::failure::{classify, Failure};
use crate::publish::message::Message;
use crate::replication::pgoutput::OutboxRow;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

pub(super) struct Retrier {
    pub(super) db: Arc<Client>,
    pub(super) js: jetstream::Context,
    pub(super) subject_prefix: String,
    pub(super) max_retries: u32,
    pub(super) metrics: Arc<Metrics>,
    /// Whether the last publish failed: state changes are logged once, the
    /// attempts of each event only at debug level.
    pub(super) failing: bool,
}

impl Retrier {
    /// Publishes `row` until it is acked (`Some`) or fails for good (`None`).
    pub(super) async fn settle(
        &mut self,
        row: &OutboxRow,
        mut result: Result<PublishAck, PublishError>,
    ) -> Result<Option<PublishAck>, Error> {
        let mut attempt = 0;
        loop {
            let error = match result {
                Ok(ack) => {
                    if self.failing {
                        self.failing = false;
                        tracing::info!(id = %row.id, attempts = attempt + 1, "publishing recovered");
                    }
                    return Ok(Some(ack));
                }
                Err(error) => error,
            };
            let failure = classify(&error);
            // The first retry goes at once: after an outage, the events that
            // timed out behind the first one are sent again without waiting
            // a backoff each. Only repeated failures of one event back off.
            let delay = if attempt == 0 {
                Duration::ZERO
            } else {
                Backoff::PUBLISH.delay(attempt - 1)
            };
            let text = error.to_string();
            let limit = if failure == Failure::Permanent {
                0
            } else {
                self.max_retries
            };
            let counts = failure != Failure::Transient;
            let dead = failures::record(&self.db, row.id, &text, delay, counts, limit).await?;
            if dead == Some(true) {
                self.metrics.events_failed.inc();
                tracing::warn!(id = %row.id, error = %text, "event failed (dead letter); `outbox-tailer requeue` retries it");
                return Ok(None);
            }
            self.metrics.publish_retries.inc();
            if !self.failing {
                self.failing = true;
                tracing::warn!(id = %row.id, error = %text, "publishing failed; retrying (recorded on each row)");
            } else {
                tracing::debug!(id = %row.id, error = %text, attempt, retry_in = ?delay, "publish failed again");
            }
            attempt += 1;
            tokio::time::sleep(delay).await;
            result = self.publish(row).await;
        }
    }

    async fn publish(&self, row: &OutboxRow) -> Result<PublishAck, PublishError> {
        let message = Message::from_row(&self.subject_prefix, row);
        let publish = PublishMessage::build()
            .payload(message.body)
            .headers(message.headers);
        self.js.send_publish(message.subject, publish).await?.await
    }
}
