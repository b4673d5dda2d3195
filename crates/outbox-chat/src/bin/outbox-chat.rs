//! `outbox-chat`: the reference chat endpoint as a service (the image's `chat`
//! target). Serves `POST /chats/{chat_id}/messages` and `GET /healthz` on
//! `--listen` against `DATABASE_URL`; with `--demo-rate N` it also posts N demo
//! messages a second to itself, so a compose stack has traffic to watch.
//! Stops on SIGTERM or Ctrl-C.

use clap::Parser;
use outbox_chat::ChatStore;
use serde_json::json;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox-chat",
    version,
    about = "The reference chat endpoint for outbox-tailer"
)]
struct Args {
    /// PostgreSQL URL of the migrated database (libpq form).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Address to serve on.
    #[arg(long, env = "CHAT_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Demo messages posted to this endpoint per second (0: none).
    #[arg(long, env = "CHAT_DEMO_RATE", default_value_t = 0.0)]
    demo_rate: f64,
    /// Database connections in the pool.
    #[arg(long, env = "CHAT_POOL_SIZE", default_value_t = 8)]
    pool_size: usize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let store = ChatStore::new(args.database_url.parse()?, args.pool_size)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "chat endpoint listening: POST /chats/{{chat_id}}/messages");
    if args.demo_rate > 0.0 {
        tokio::spawn(demo_traffic(reachable(local), args.demo_rate));
    }
    outbox_chat::serve(listener, Arc::new(store), shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Where this process can reach its own listener (a wildcard means loopback).
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Posts `rate` messages a second over HTTP, as a client would, round-robin
/// over three chats. Failures are logged and the next tick tries again.
async fn demo_traffic(addr: SocketAddr, rate: f64) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client without TLS builds");
    let project = Uuid::new_v4();
    let users = [Uuid::new_v4(), Uuid::new_v4()];
    let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.min(10_000.0)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(rate, "posting demo messages");
    for n in 0usize.. {
        tick.tick().await;
        let (role, content) = outbox_chat::DEMO_LINES[n % outbox_chat::DEMO_LINES.len()];
        let chat = chats[n % chats.len()];
        let body = json!({"project_id": project, "user_id": users[n % 2], "role": role, "content": content});
        let result = http
            .post(format!("http://{addr}/chats/{chat}/messages"))
            .json(&body)
            .send()
            .await
            .and_then(|r| r.error_for_status());
        if let Err(error) = result {
            tracing::warn!(%error, "a demo message was not posted");
        }
    }
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
