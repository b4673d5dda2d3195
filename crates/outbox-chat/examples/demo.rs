//! The end-to-end demo behind `scripts/demo`: a throwaway PostgreSQL and NATS,
//! the migrations, the chat endpoint, the tailer, and a stream of chat
//! messages posted over HTTP, with each event printed as it arrives from NATS
//! and the outbox's state every few seconds. Ctrl-C (or `--seconds N`) stops
//! it and removes everything.

use clap::Parser;
use futures_util::StreamExt;
use outbox_chat::ChatStore;
use outbox_testkit::{alembic, free_port, tailer_bin, NatsServer, PgServer};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Messages posted per second.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let pg = PgServer::start()?;
    let nats = NatsServer::start()?;
    let url = pg.create_database("chat").await?;
    alembic(&url, &["upgrade", "head"])?;
    let store = ChatStore::new(url.parse()?, 4)?;
    let api = outbox_chat::spawn("127.0.0.1:0".parse()?, Arc::new(store)).await?;
    let db = pg.connect("chat").await?;
    tracing_subscriber::fmt()
        .with_env_filter("info,async_nats=warn")
        .with_writer(std::io::stderr)
        .init();

    // The tailer binary, exactly as a user runs it. It creates the slot, so
    // no traffic is posted before it is ready: the first event then flows
    // through the stream at once instead of waiting for the catch-up path.
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let mut tailer = tokio::process::Command::new(tailer_bin()?)
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("NATS_URL", nats.url())
        .env("METRICS_ADDR", &metrics_addr)
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    wait_ready(&http, &metrics_addr, &mut tailer).await?;

    // A NATS subscriber, as the product's consumers would be.
    let subscriber = async_nats::connect(nats.url()).await?;
    let mut events = subscriber.subscribe("events.>").await?;

    println!("outbox-tailer demo (throwaway servers; Ctrl-C stops and removes them)");
    println!("  PostgreSQL  {url}  (wal_level=logical)");
    println!("  NATS        {}  (JetStream)", nats.url());
    println!("  migrations  alembic upgrade head: messages, event_outbox (+ publication event_outbox_pub), event_logs");
    println!("  chat API    POST http://{api}/chats/{{chat_id}}/messages");
    println!("  try it:     curl -s -XPOST http://{api}/chats/{}/messages -d '{{\"project_id\":\"{}\",\"user_id\":\"{}\",\"content\":\"hello\"}}'",
        Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    println!("  tailer      slot event_outbox_tailer -> stream EVENTS (events.<aggregate_type>.<event_type>)\n");

    let (project, users) = (Uuid::new_v4(), [Uuid::new_v4(), Uuid::new_v4()]);
    let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.1)));
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let deadline = args
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let stop = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut n = 0usize;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(event) = events.next() => {
                let header = |name: &str| event.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned()).unwrap_or_default();
                println!("  NATS  {}  event {}  chat={}", event.subject, header("Nats-Msg-Id"), &header("Outbox-Aggregate-Id")[..8.min(header("Outbox-Aggregate-Id").len())]);
            }
            _ = report.tick() => {
                let row = db.query_one(
                    "SELECT (SELECT count(*) FROM messages), count(*) FILTER (WHERE status = 'pending'), \
                            count(*) FILTER (WHERE status = 'published') FROM event_outbox", &[]).await?;
                let (m, p, d): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
                println!("[{:>4}s] messages={m}  event_outbox: pending={p} published={d}", started.elapsed().as_secs());
            }
            _ = tick.tick() => {
                let (role, content) = outbox_chat::DEMO_LINES[n % outbox_chat::DEMO_LINES.len()];
                let chat = chats[n % chats.len()];
                let body = json!({"project_id": project, "user_id": users[n % 2], "role": role, "content": content});
                let response = http.post(format!("http://{api}/chats/{chat}/messages")).json(&body).send().await?;
                let status = response.status();
                let created: serde_json::Value = response.json().await?;
                println!("posted      chat={}  {role:>9}: {content:<56} -> {status} event {}",
                    &chat.to_string()[..8], created["event_id"].as_str().unwrap_or("?"));
                n += 1;
            }
        }
    }
    stop_tailer(&mut tailer).await?;
    println!("\nstopped: {n} messages posted; removing the throwaway servers");
    Ok(())
}

/// Waits (at most 30 s) until the tailer answers 200 on `/readyz`: the slot
/// is held and NATS is connected.
async fn wait_ready(
    http: &reqwest::Client,
    metrics_addr: &str,
    tailer: &mut tokio::process::Child,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = tailer.try_wait()? {
            return Err(format!("outbox-tailer exited before it was ready: {status}").into());
        }
        let ready = http
            .get(format!("http://{metrics_addr}/readyz"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("outbox-tailer was not ready within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, as a container runtime stops it, then waits for its exit.
async fn stop_tailer(tailer: &mut tokio::process::Child) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(pid) = tailer.id() {
        outbox_testkit::procfs::terminate(pid);
    }
    let status = tokio::time::timeout(Duration::from_secs(15), tailer.wait()).await??;
    if !status.success() {
        return Err(format!("outbox-tailer exited with {status}").into());
    }
    Ok(())
}
