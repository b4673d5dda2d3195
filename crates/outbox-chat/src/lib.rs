//! The reference chat endpoint: `POST /chats/{chat_id}/messages` writes the
//! `messages` row and its `message.created` event in one transaction (the
//! specification's first requirement), so the event exists exactly when the
//! message does. The demo and the benchmarks use it to produce load.
//!
//! Errors are JSON (`{"error": "..."}`) with a 4xx for anything the client
//! sent wrong, and nothing is written for them.

mod api;
mod request;
mod store;
pub mod subscriber;

pub use api::router;
pub use request::{MessageRequest, RequestError, ValidMessage, MAX_BODY_BYTES, MAX_CONTENT_BYTES};
pub use store::{BeforeCommit, ChatStore, Created, StoreError};

use std::net::SocketAddr;
use std::sync::Arc;

/// Starts serving on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<ChatStore>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(store))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn spawn(addr: SocketAddr, store: Arc<ChatStore>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = serve(listener, store, std::future::pending()).await {
            tracing::error!(%error, "chat endpoint stopped");
        }
    });
    Ok(local)
}

/// A short chat, posted round and round by the demo and by `outbox-chat
/// --demo-rate`: (role, content).
pub const DEMO_LINES: [(&str, &str); 6] = [
    ("user", "Hi! Can you summarise yesterday's incident?"),
    (
        "assistant",
        "Sure: the outbox relay fell behind for 12 minutes.",
    ),
    ("user", "Why did it fall behind?"),
    (
        "assistant",
        "It polled the table every second and the index bloated.",
    ),
    ("user", "And with outbox-tailer?"),
    (
        "assistant",
        "It reads the WAL: no polling, nothing to bloat.",
    ),
];
