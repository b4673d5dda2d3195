//! The chat write path: one transaction, two pipelined inserts (the message
//! and its event), commit. Pooled connections and cached prepared statements
//! keep it to three round trips per message.

use super::request::ValidMessage;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use outbox_producer::{
    insert_event_with, NewEvent, TraceParent, INSERT_EVENT_SQL, INSERT_EVENT_WITH_HEADERS_SQL,
};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

const INSERT_MESSAGE_SQL: &str =
    "INSERT INTO messages (id, project_id, user_id, role, content) VALUES ($1, $2, $3, $4, $5)";

/// Called after both inserts and before the commit. Production leaves it
/// unset; tests use it to inject a failure at the worst moment and prove the
/// rollback leaves neither row.
pub type BeforeCommit = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What a successful post created.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Created {
    pub message_id: Uuid,
    pub event_id: Uuid,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("aborted before commit: {0}")]
    Aborted(String),
}

impl From<PoolError> for StoreError {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::Backend(error) => StoreError::Database(error),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

pub struct ChatStore {
    pool: Pool,
    before_commit: Option<BeforeCommit>,
}

impl ChatStore {
    /// A store with up to `pool_size` connections to `database`.
    pub fn new(
        database: tokio_postgres::Config,
        pool_size: usize,
    ) -> Result<ChatStore, StoreError> {
        let manager = Manager::from_config(
            database,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(ChatStore {
            pool,
            before_commit: None,
        })
    }

    /// Installs a hook run between the inserts and the commit (tests only).
    pub fn with_before_commit(mut self, hook: BeforeCommit) -> Self {
        self.before_commit = Some(hook);
        self
    }

    /// Writes the message and its `message.created` event atomically.
    pub async fn post(&self, message: &ValidMessage) -> Result<Created, StoreError> {
        self.post_traced(message, None).await
    }

    /// As [`ChatStore::post`], the event continuing the trace `span` (a
    /// `traceparent`, and the `tracestate` that came with it).
    pub async fn post_traced(
        &self,
        message: &ValidMessage,
        span: Option<(&TraceParent, Option<&str>)>,
    ) -> Result<Created, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let message_id = Uuid::new_v4();
        let chat_id = message.chat_id.to_string();
        let payload = serde_json::json!({
            "message_id": message_id,
            "chat_id": chat_id,
            "project_id": message.project_id,
            "user_id": message.user_id,
            "role": message.role,
            "content": message.content,
        });
        let mut event = NewEvent::new("chat", &chat_id, "message.created", &payload)
            .user(message.user_id)
            .project(message.project_id);
        if let Some((span, state)) = span {
            event = event.with_traceparent(span, state);
        }
        let insert_event_sql = if event.headers().next().is_some() {
            INSERT_EVENT_WITH_HEADERS_SQL
        } else {
            INSERT_EVENT_SQL
        };
        let (insert_message, insert_event) = tokio::try_join!(
            tx.prepare_cached(INSERT_MESSAGE_SQL),
            tx.prepare_cached(insert_event_sql)
        )?;
        // Both statements go out in one round trip; the server runs them in order.
        let message_params: [&(dyn ToSql + Sync); 5] = [
            &message_id,
            &message.project_id,
            &message.user_id,
            &message.role,
            &message.content,
        ];
        let (_, event_id) = tokio::try_join!(
            tx.execute(&insert_message, &message_params),
            insert_event_with(&*tx, &insert_event, &event),
        )?;
        if let Some(hook) = &self.before_commit {
            // Dropping `tx` without commit rolls both inserts back.
            hook().map_err(StoreError::Aborted)?;
        }
        tx.commit().await?;
        Ok(Created {
            message_id,
            event_id,
        })
    }
}
