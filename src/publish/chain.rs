//! Chained publishing, shared by the stream's publisher and the sweeper.
//!
//! Every publish is chained to the one sent before it
//! (`Nats-Expected-Last-Msg-Id`): the server stores it only right after that
//! one and refuses it otherwise, so a publish lost with a connection is never
//! overtaken by those sent after it. When the oldest publish in flight fails,
//! it and everything sent after it are sent again ([`Chain::resend`],
//! go-back-N): the first unchained, since everything before it is acked, the
//! rest chained anew. JetStream checks duplicates before the chain, so a
//! re-sent event that was stored after all is acked as a duplicate.

use crate::event::OutboxRow;
use crate::publish::message::Message;
use crate::publish::policy::{never_sent, refuse, unsendable};
use crate::publish::window::Window;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, message::PublishMessage};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use uuid::Uuid;

/// What answers one publish: the JetStream ack, or the error of a send that
/// failed (or was refused before sending).
pub(crate) type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// Sends events, each chained to the one sent before it.
pub(crate) struct Chain {
    js: jetstream::Context,
    subject_prefix: String,
    /// The last event sent: the next is stored only right after it.
    last: Option<Uuid>,
}

impl Chain {
    pub(crate) fn new(js: jetstream::Context, subject_prefix: String) -> Chain {
        Chain {
            js,
            subject_prefix,
            last: None,
        }
    }

    /// The NATS client under the stream (to replace a silent connection).
    pub(crate) fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// Sends `row`; a send that fails yields its error as the ack.
    pub(crate) async fn send(&mut self, row: &OutboxRow) -> AckFuture {
        let message = match Message::from_row(&self.subject_prefix, row) {
            Ok(message) => message,
            // Never sent: it fails alone, and nothing waits for it.
            Err(error) => return Box::pin(std::future::ready(Err(unsendable(error.into())))),
        };
        if let Some(error) = refuse(&message.subject) {
            // The server would drop the connection on it, for ever: refused
            // here, unsent, it fails alone.
            return Box::pin(std::future::ready(Err(error)));
        }
        let mut publish = PublishMessage::build()
            .payload(message.body)
            .headers(message.headers);
        if let Some(last) = self.last {
            let mut text = Uuid::encode_buffer();
            publish = publish.expected_last_message_id(last.hyphenated().encode_lower(&mut text));
        }
        match self.js.send_publish(message.subject, publish).await {
            Ok(ack) => {
                self.last = Some(row.id);
                ack.into_future()
            }
            Err(error) => {
                // Perhaps not sent. Unless the client refused it outright,
                // the next event waits for it: chained to it, the server
                // refuses the next until this one is stored.
                if !never_sent(&error) {
                    self.last = Some(row.id);
                }
                Box::pin(std::future::ready(Err(error)))
            }
        }
    }

    /// Nothing is in flight: the next event sent starts a new chain.
    pub(crate) fn restart(&mut self) {
        self.last = None;
    }

    /// Go-back-N: sends every event in the window again, oldest first, the
    /// first unchained (everything before it is acked). Returns how many.
    pub(crate) async fn resend<H>(&mut self, window: &mut Window<AckFuture, H>) -> usize {
        self.restart();
        let mut sent = 0;
        for event in window.events_mut() {
            event.ack = self.send(&event.row).await;
            sent += 1;
        }
        sent
    }
}
