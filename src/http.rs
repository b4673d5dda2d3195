//! The operations endpoints on `--metrics-addr`: `GET /metrics` (Prometheus
//! text), `GET /healthz` (200 while the process runs), `GET /readyz` (200
//! only while both the replication stream and NATS are connected).

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

/// Binds `addr` (failing at once if it cannot) and serves in the background.
pub(crate) async fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(metrics)).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    let replication = metrics.replication_connected.get() == 1;
    let nats = metrics.nats_connected.get() == 1;
    let status = if replication && nats {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!("replication {}\nnats {}\n", up(replication), up(nats));
    (status, body)
}

fn up(connected: bool) -> &'static str {
    if connected {
        "connected"
    } else {
        "disconnected"
    }
}
