//! The producer API: write an event into `event_outbox` inside the caller's
//! transaction, so the event commits (or rolls back) with the domain change.
//!
//! ```no_run
//! # async fn example(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
//! use outbox_producer::{insert_event, NewEvent};
//! let tx = client.transaction().await?;
//! // ... the domain change, on `tx` ...
//! let payload = serde_json::json!({"text": "hello"});
//! let event = NewEvent::new("chat", "7f0c...", "message.created", &payload);
//! insert_event(&tx, &event).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, ToStatement};
use uuid::Uuid;

/// Inserts one event; everything else (id, status, timestamps) takes the
/// table's defaults. Prepare it once per connection for the fast path.
pub const INSERT_EVENT_SQL: &str = "INSERT INTO event_outbox \
     (aggregate_type, aggregate_id, user_id, project_id, event_type, payload) \
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";

/// An event to be published once its transaction commits.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// The kind of aggregate (`chat`): the first subject token after the prefix.
    pub aggregate_type: &'a str,
    /// The aggregate instance (the chat id): events of one aggregate keep
    /// their commit order in the stream.
    pub aggregate_id: &'a str,
    pub user_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    /// `message.created`: its dots stay subject hierarchy.
    pub event_type: &'a str,
    /// Published byte for byte as PostgreSQL renders the stored jsonb.
    pub payload: &'a serde_json::Value,
}

impl<'a> NewEvent<'a> {
    pub fn new(
        aggregate_type: &'a str,
        aggregate_id: &'a str,
        event_type: &'a str,
        payload: &'a serde_json::Value,
    ) -> Self {
        NewEvent {
            aggregate_type,
            aggregate_id,
            user_id: None,
            project_id: None,
            event_type,
            payload,
        }
    }

    pub fn user(mut self, user_id: Uuid) -> Self {
        self.user_id = Some(user_id);
        self
    }

    pub fn project(mut self, project_id: Uuid) -> Self {
        self.project_id = Some(project_id);
        self
    }
}

/// Inserts `event` on `client` (a transaction, normally) and returns its id.
pub async fn insert_event<C: GenericClient + Sync>(
    client: &C,
    event: &NewEvent<'_>,
) -> Result<Uuid, tokio_postgres::Error> {
    insert_event_with(client, INSERT_EVENT_SQL, event).await
}

/// As [`insert_event`], with a statement the caller prepared (and cached) from
/// [`INSERT_EVENT_SQL`]: one round trip instead of a parse and an execute.
pub async fn insert_event_with<C, S>(
    client: &C,
    statement: &S,
    event: &NewEvent<'_>,
) -> Result<Uuid, tokio_postgres::Error>
where
    C: GenericClient + Sync,
    S: ToStatement + Sync + Send + ?Sized,
{
    let params: [&(dyn ToSql + Sync); 6] = [
        &event.aggregate_type,
        &event.aggregate_id,
        &event.user_id,
        &event.project_id,
        &event.event_type,
        event.payload,
    ];
    let row = client.query_one(statement, &params).await?;
    row.try_get(0)
}
