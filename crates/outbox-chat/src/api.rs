//! HTTP routing and error responses for the chat endpoint.

use super::request::{MessageRequest, RequestError, MAX_BODY_BYTES};
use super::store::{ChatStore, Created, StoreError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox_producer::TraceParent;
use std::sync::Arc;

/// `POST /chats/{chat_id}/messages` and `GET /healthz`.
pub fn router(store: Arc<ChatStore>) -> Router {
    Router::new()
        .route("/chats/{chat_id}/messages", post(post_message))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(store)
}

/// Stores the message and its event. A request that carries W3C trace
/// context (`traceparent`, `tracestate`) has its trace continued on the
/// event: the event carries a child of the caller's span, so the subscriber
/// that handles it joins the same trace.
async fn post_message(
    State(store): State<Arc<ChatStore>>,
    headers: HeaderMap,
    chat_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let Path(chat_id) = chat_id.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let message = MessageRequest::parse(&chat_id, &body)?;
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = text("traceparent")
        .and_then(TraceParent::parse)
        .map(|caller| (caller.child(), text("tracestate")));
    let created = store
        .post_traced(&message, trace.as_ref().map(|(span, state)| (span, *state)))
        .await?;
    tracing::info!(
        message_id = %created.message_id,
        event_id = %created.event_id,
        trace_id = trace.as_ref().map(|(span, _)| span.trace_id()),
        "message stored"
    );
    Ok((StatusCode::CREATED, Json(created)))
}

/// An error response: `{"error": "..."}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let status = match error {
            RequestError::ContentTooLong(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "posting a message failed; nothing was written");
        let status = match error {
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Database(_) | StoreError::Aborted(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Database details stay in the log, not in the response.
        ApiError::new(
            status,
            "the message could not be stored; nothing was written, retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}
