//! Validation of a "post a message" request: pure, so every rule is unit-tested.

use serde::Deserialize;
use uuid::Uuid;

/// Larger request bodies get 413 before any parsing.
pub const MAX_BODY_BYTES: usize = 128 * 1024;
/// Longest message content, in UTF-8 bytes.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
const ROLES: [&str; 4] = ["user", "assistant", "system", "tool"];

/// The JSON body, as sent. Ids are strings here so that a malformed one gets
/// an error naming the field rather than a generic parse error.
#[derive(Debug, Deserialize)]
pub struct MessageRequest {
    pub project_id: String,
    pub user_id: String,
    #[serde(default = "default_role")]
    pub role: String,
    pub content: String,
}

fn default_role() -> String {
    "user".to_owned()
}

/// A request that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidMessage {
    pub chat_id: Uuid,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("{field} must be a UUID, got {value:?}")]
    MalformedId { field: &'static str, value: String },
    #[error("content must not be empty")]
    EmptyContent,
    #[error("content is {0} bytes; the limit is {MAX_CONTENT_BYTES}")]
    ContentTooLong(usize),
    #[error("content must not contain NUL characters")]
    NulInContent,
    #[error("role must be one of user, assistant, system, tool; got {0:?}")]
    BadRole(String),
    #[error("invalid JSON body: {0}")]
    BadJson(String),
}

impl MessageRequest {
    /// Parses and validates a body for the chat `chat_id` (from the path).
    pub fn parse(chat_id: &str, body: &[u8]) -> Result<ValidMessage, RequestError> {
        let request: MessageRequest =
            serde_json::from_slice(body).map_err(|e| RequestError::BadJson(e.to_string()))?;
        request.validate(chat_id)
    }

    pub fn validate(self, chat_id: &str) -> Result<ValidMessage, RequestError> {
        let chat_id = parse_id("chat_id", chat_id)?;
        let project_id = parse_id("project_id", &self.project_id)?;
        let user_id = parse_id("user_id", &self.user_id)?;
        if !ROLES.contains(&self.role.as_str()) {
            return Err(RequestError::BadRole(self.role));
        }
        if self.content.trim().is_empty() {
            return Err(RequestError::EmptyContent);
        }
        if self.content.len() > MAX_CONTENT_BYTES {
            return Err(RequestError::ContentTooLong(self.content.len()));
        }
        // PostgreSQL text cannot hold NUL: refuse it here, not with a 500 later.
        if self.content.contains('\0') {
            return Err(RequestError::NulInContent);
        }
        Ok(ValidMessage {
            chat_id,
            project_id,
            user_id,
            role: self.role,
            content: self.content,
        })
    }
}

fn parse_id(field: &'static str, value: &str) -> Result<Uuid, RequestError> {
    // Only the hyphenated form: braces, URNs and bare hex are not ids we hand out.
    if value.len() != 36 {
        return Err(RequestError::MalformedId {
            field,
            value: truncate(value),
        });
    }
    Uuid::parse_str(value).map_err(|_| RequestError::MalformedId {
        field,
        value: truncate(value),
    })
}

fn truncate(value: &str) -> String {
    value.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "6f1c1a52-4a43-4c4e-9a59-1c3f2c6f0b11";
    const P: &str = "0b0d2c8e-29f4-4b7e-8d2e-6e0f7d7d2a01";
    const U: &str = "9a3e0f4c-6c57-4c1e-bb0e-2f5d6f1c3a02";

    fn body(project: &str, user: &str, role: &str, content: &str) -> Vec<u8> {
        serde_json::json!({"project_id": project, "user_id": user, "role": role, "content": content}).to_string().into_bytes()
    }

    #[test]
    fn accepts_a_good_message() {
        let message = MessageRequest::parse(CHAT, &body(P, U, "assistant", "hi ✓")).unwrap();
        assert_eq!(message.chat_id.to_string(), CHAT);
        assert_eq!(message.project_id.to_string(), P);
        assert_eq!(message.role, "assistant");
        assert_eq!(message.content, "hi ✓");
    }

    #[test]
    fn role_defaults_to_user() {
        let raw = serde_json::json!({"project_id": P, "user_id": U, "content": "x"}).to_string();
        assert_eq!(
            MessageRequest::parse(CHAT, raw.as_bytes()).unwrap().role,
            "user"
        );
    }

    #[test]
    fn rejects_each_bad_input_with_its_reason() {
        let long = "x".repeat(MAX_CONTENT_BYTES + 1);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not-a-uuid", body(P, U, "user", "x"), "chat_id"),
            (CHAT, body("123", U, "user", "x"), "project_id"),
            (
                CHAT,
                body(P, "{9a3e0f4c-6c57-4c1e-bb0e-2f5d6f1c3a02}", "user", "x"),
                "user_id",
            ),
            (CHAT, body(P, U, "user", "   "), "empty"),
            (CHAT, body(P, U, "user", &long), "limit"),
            (CHAT, body(P, U, "user", "a\0b"), "NUL"),
            (CHAT, body(P, U, "admin", "x"), "role"),
            (CHAT, b"{not json".to_vec(), "invalid JSON"),
            (
                CHAT,
                br#"{"project_id": 1, "user_id": "u", "content": "x"}"#.to_vec(),
                "invalid JSON",
            ),
        ];
        for (chat, raw, expected) in cases {
            let error = MessageRequest::parse(chat, &raw).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}
