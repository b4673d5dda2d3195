//! Failover: a hot standby takes over when the active tailer dies, and a
//! PostgreSQL restart under load needs no restart of the tailer. Nothing is
//! lost or duplicated either way.

mod common;

use common::*;
use outbox_tailer::testkit::{free_port, StopMode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLOT: &str = "event_outbox_tailer";

/// Writes events until told to stop, riding out a database restart by
/// reconnecting. Returns how many inserts it saw succeed.
fn spawn_producer(
    url: String,
    aggregate: &'static str,
    running: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let mut n = 0;
        let mut db = None;
        while running.load(Ordering::Relaxed) {
            if db.is_none() {
                db = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()
                    .map(|(client, connection)| {
                        tokio::spawn(connection);
                        client
                    });
            }
            let Some(client) = db.as_ref() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let insert = client
                .execute(
                    "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'chat', $1, 'message.created', jsonb_build_object('agg', $1::text, 'n', $2::bigint)",
                    &[&aggregate, &n],
                )
                .await;
            match insert {
                Ok(_) => n += 1,
                // The server went away: the insert did not commit; reconnect.
                Err(_) => db = None,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    })
}

async fn ready(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_30_seconds_of_a_kill() {
    let env = Env::start().await;
    let db = env.db().await;
    let (port_a, port_b) = (free_port().unwrap(), free_port().unwrap());
    let mut active = env.tailer(&["run", "--metrics-addr", &format!("127.0.0.1:{port_a}")]);
    wait_streaming(&db, SLOT, &active).await;
    let standby = env.tailer(&["run", "--metrics-addr", &format!("127.0.0.1:{port_b}")]);
    wait_for(
        "the standby to say it waits",
        Duration::from_secs(30),
        || async {
            standby
                .output()
                .contains("standby: another tailer holds the slot")
                .then_some(())
        },
    )
    .await;
    assert!(ready(port_a).await, "the active tailer is ready");
    assert!(!ready(port_b).await, "the standby reports not-ready");

    let running = Arc::new(AtomicBool::new(true));
    let producer = spawn_producer(env.url.clone(), "failover", running.clone());
    let js = env.js().await;
    wait_for("events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, "EVENTS").await > 200).then_some(())
    })
    .await;

    active.kill9();
    let killed = Instant::now();
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { ready(port_b).await.then_some(()) },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(30), "took over after {took:?}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);
    assert_every_row_published_once(&db, &js, "EVENTS", Duration::from_secs(60)).await;
    eprintln!("standby took over {took:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_fast_restart_under_load_needs_no_tailer_restart() {
    let mut env = Env::start().await;
    let tailer = env.tailer(&["run"]);
    {
        let db = env.db().await;
        wait_streaming(&db, SLOT, &tailer).await;
    }
    let running = Arc::new(AtomicBool::new(true));
    let producer = spawn_producer(env.url.clone(), "restart", running.clone());
    let js = env.js().await;
    wait_for("events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, "EVENTS").await > 200).then_some(())
    })
    .await;

    env.pg
        .restart(StopMode::Fast)
        .expect("pg_ctl restart -m fast");
    let db = env.db().await;
    wait_streaming(&db, SLOT, &tailer).await;
    let before = stream_count(&js, "EVENTS").await;
    wait_for("publishing to resume", Duration::from_secs(60), || async {
        (stream_count(&js, "EVENTS").await > before + 100).then_some(())
    })
    .await;

    running.store(false, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);
    assert_every_row_published_once(&db, &js, "EVENTS", Duration::from_secs(60)).await;
    assert!(
        tailer.output().contains("reconnecting"),
        "{}",
        tailer.output()
    );
}
