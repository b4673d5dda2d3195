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
//!
//! Headers of your own (a tenant, a schema version, W3C trace context) go
//! out on the event's message after the tailer's, checked here by the same
//! rules the tailer applies ([`headers`]):
//!
//! ```no_run
//! # async fn example(tx: &tokio_postgres::Transaction<'_>) -> Result<(), Box<dyn std::error::Error>> {
//! # use outbox_producer::{insert_event, NewEvent};
//! let payload = serde_json::json!({"text": "hello"});
//! let event = NewEvent::new("chat", "7f0c...", "message.created", &payload)
//!     .header("tenant", "acme")?
//!     .header("schema-version", "2")?;
//! insert_event(tx, &event).await?;
//! # Ok(()) }
//! ```

pub mod headers;
#[cfg(feature = "trace-context")]
mod trace;
pub mod w3c;

pub use headers::HeaderError;
pub use w3c::TraceParent;

use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, ToStatement};
use uuid::Uuid;

/// Inserts one event; everything else (id, status, timestamps) takes the
/// table's defaults. Prepare it once per connection for the fast path.
pub const INSERT_EVENT_SQL: &str = "INSERT INTO event_outbox \
     (aggregate_type, aggregate_id, user_id, project_id, event_type, payload) \
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";

/// As [`INSERT_EVENT_SQL`], with the event's headers (`$7`, a JSON object of
/// strings). Needs the `headers` column (Alembic revision
/// `0005_outbox_headers`).
pub const INSERT_EVENT_WITH_HEADERS_SQL: &str = "INSERT INTO event_outbox \
     (aggregate_type, aggregate_id, user_id, project_id, event_type, payload, headers) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

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
    /// Headers of the event's own, checked as they are added ([`NewEvent::header`]).
    headers: Vec<(String, String)>,
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
            headers: Vec::new(),
        }
    }

    /// Adds a header for the event's message, checked by the contract's
    /// rules ([`headers::check`], and the total size): the error names it.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, HeaderError> {
        let (name, value) = (name.into(), value.into());
        headers::check(&name, &value)?;
        let mut with = self.headers.clone();
        with.retain(|(n, _)| *n != name);
        with.push((name, value));
        headers::check_all(with.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
        self.headers = with;
        Ok(self)
    }

    /// Adds a header when it keeps to the rules; false (and nothing added)
    /// otherwise.
    fn add_header(&mut self, name: String, value: String) -> bool {
        match self.clone().header(name, value) {
            Ok(with) => {
                self.headers = with.headers;
                true
            }
            Err(_) => false,
        }
    }

    /// Continues the trace `parent` (and its `tracestate`, when given) on
    /// the event: a service that received a `traceparent` passes a child of
    /// it ([`TraceParent::child`]). A `tracestate` that would break the rules
    /// is left out.
    pub fn with_traceparent(mut self, parent: &TraceParent, tracestate: Option<&str>) -> Self {
        self.add_header("traceparent".into(), parent.to_string());
        if let Some(state) = tracestate.filter(|s| !s.is_empty()) {
            self.add_header("tracestate".into(), state.to_owned());
        }
        self
    }

    /// The event's own headers, in the order they were added.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The headers as the column stores them; `None` when there are none.
    fn headers_json(&self) -> Option<serde_json::Value> {
        (!self.headers.is_empty()).then(|| {
            serde_json::Value::Object(
                self.headers
                    .iter()
                    .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            )
        })
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
/// An event without headers needs no `headers` column.
pub async fn insert_event<C: GenericClient + Sync>(
    client: &C,
    event: &NewEvent<'_>,
) -> Result<Uuid, tokio_postgres::Error> {
    let sql = if event.headers.is_empty() {
        INSERT_EVENT_SQL
    } else {
        INSERT_EVENT_WITH_HEADERS_SQL
    };
    insert_event_with(client, sql, event).await
}

/// As [`insert_event`], with a statement the caller prepared (and cached) from
/// [`INSERT_EVENT_SQL`] (events without headers) or
/// [`INSERT_EVENT_WITH_HEADERS_SQL`] (events with): one round trip instead of
/// a parse and an execute.
pub async fn insert_event_with<C, S>(
    client: &C,
    statement: &S,
    event: &NewEvent<'_>,
) -> Result<Uuid, tokio_postgres::Error>
where
    C: GenericClient + Sync,
    S: ToStatement + Sync + Send + ?Sized,
{
    let headers = event.headers_json();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &event.aggregate_type,
        &event.aggregate_id,
        &event.user_id,
        &event.project_id,
        &event.event_type,
        event.payload,
    ];
    if let Some(headers) = &headers {
        params.push(headers);
    }
    let row = client.query_one(statement, &params).await?;
    row.try_get(0)
}
