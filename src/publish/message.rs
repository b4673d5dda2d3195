//! The JetStream message for an outbox row: subject, body and headers
//! (docs/contract.md section 3): the tailer's `Outbox-*` ones, then the
//! row's own, checked by the producer crate's rules (one implementation for
//! both sides). Pure code.

use super::subject::subject;
use crate::event::OutboxRow;
use crate::pgtime;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use outbox_producer::HeaderError;
use std::str::FromStr;

/// JetStream de-duplicates on this header within the stream's window.
pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EVENT_ID: &str = "Outbox-Event-Id";
pub const AGGREGATE_TYPE: &str = "Outbox-Aggregate-Type";
pub const AGGREGATE_ID: &str = "Outbox-Aggregate-Id";
pub const EVENT_TYPE: &str = "Outbox-Event-Type";
pub const USER_ID: &str = "Outbox-User-Id";
pub const PROJECT_ID: &str = "Outbox-Project-Id";
pub const CREATED_AT: &str = "Outbox-Created-At";

/// What gets published for one row.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub headers: HeaderMap,
    /// The payload exactly as PostgreSQL rendered the stored jsonb.
    pub body: Bytes,
}

impl Message {
    /// The message for `row`; an error when the row's own headers break the
    /// rules (the event can never be sent: a dead letter naming the header).
    pub fn from_row(prefix: &str, row: &OutboxRow) -> Result<Message, HeaderError> {
        let id = row.id.to_string();
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID, header_value(&id));
        headers.insert(EVENT_ID, header_value(&id));
        headers.insert(AGGREGATE_TYPE, header_value(&row.aggregate_type));
        headers.insert(AGGREGATE_ID, header_value(&row.aggregate_id));
        headers.insert(EVENT_TYPE, header_value(&row.event_type));
        if let Some(user_id) = &row.user_id {
            headers.insert(USER_ID, header_value(user_id));
        }
        if let Some(project_id) = &row.project_id {
            headers.insert(PROJECT_ID, header_value(project_id));
        }
        headers.insert(CREATED_AT, header_value(&pgtime::rfc3339(&row.created_at)));
        if let Some(stored) = &row.headers {
            for (name, value) in outbox_producer::headers::parse(stored)? {
                // The rules above are stricter than the client's; should
                // they ever disagree, the row fails rather than the process.
                let name =
                    HeaderName::from_str(&name).map_err(|_| HeaderError::Name(name.clone()))?;
                headers.insert(name, value.as_str());
            }
        }
        Ok(Message {
            subject: subject(prefix, &row.aggregate_type, &row.event_type),
            headers,
            body: row.payload.clone(),
        })
    }
}

/// NATS headers are lines: a CR or LF (or another control character) in a
/// value would end the header early, so each becomes a space.
fn header_value(text: &str) -> HeaderValue {
    if text.chars().any(char::is_control) {
        let clean: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        HeaderValue::from(clean.as_str())
    } else {
        HeaderValue::from(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row() -> OutboxRow {
        OutboxRow {
            id: Uuid::parse_str("5f0e6a4c-1b7d-4c2a-9e3f-8d6b2a1c0e99").unwrap(),
            aggregate_type: "chat".into(),
            aggregate_id: "c-1".into(),
            user_id: None,
            project_id: Some("0b0d2c8e-29f4-4b7e-8d2e-6e0f7d7d2a01".into()),
            event_type: "message.created".into(),
            payload: Bytes::from_static(br#"{"n": 123456789012345678901234567890}"#),
            created_at: "2026-11-26 18:28:37.123456+00".into(),
            headers: None,
        }
    }

    #[test]
    fn builds_subject_body_and_headers() {
        let message = Message::from_row("events", &row()).unwrap();
        assert_eq!(message.subject, "events.chat.message.created");
        assert_eq!(
            &message.body[..],
            br#"{"n": 123456789012345678901234567890}"#
        );
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            header(MSG_ID).as_deref(),
            Some("5f0e6a4c-1b7d-4c2a-9e3f-8d6b2a1c0e99")
        );
        assert_eq!(header(EVENT_ID), header(MSG_ID));
        assert_eq!(header(AGGREGATE_TYPE).as_deref(), Some("chat"));
        assert_eq!(header(AGGREGATE_ID).as_deref(), Some("c-1"));
        assert_eq!(header(EVENT_TYPE).as_deref(), Some("message.created"));
        assert_eq!(header(USER_ID), None, "absent when null");
        assert_eq!(
            header(PROJECT_ID).as_deref(),
            Some("0b0d2c8e-29f4-4b7e-8d2e-6e0f7d7d2a01")
        );
        assert_eq!(
            header(CREATED_AT).as_deref(),
            Some("2026-11-26T18:28:37.123456Z")
        );
    }

    #[test]
    fn control_characters_never_break_a_header() {
        let mut odd = row();
        odd.aggregate_id = "a\r\nNats-Msg-Id: forged".into();
        let message = Message::from_row("events", &odd).unwrap();
        assert_eq!(
            message.headers.get(AGGREGATE_ID).unwrap().as_str(),
            "a  Nats-Msg-Id: forged"
        );
        assert_eq!(
            message.headers.get(MSG_ID).unwrap().as_str(),
            "5f0e6a4c-1b7d-4c2a-9e3f-8d6b2a1c0e99"
        );
    }
}
