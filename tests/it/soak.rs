//! A seeded, bounded soak: faults mixed at random under load (kill -9,
//! SIGTERM, NATS stop, PostgreSQL fast and immediate restarts, a killed
//! walsender, bursts, oversized events, a standby), then: nothing missing,
//! nothing extra, no duplicates, per-aggregate order kept, no row stuck
//! pending. CI runs a short version; `SOAK_ROUNDS=100 SOAK_SEED=7 cargo test
//! --release --test soak -- --nocapture` runs the long one.

use crate::common::*;
use outbox_testkit::StopMode;
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_soak_of_mixed_faults_loses_and_duplicates_nothing() {
    let rounds = env_number("SOAK_ROUNDS", 8);
    let seed = env_number("SOAK_SEED", 7);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut env = Env::start().await;
    let db = env.db().await;
    let args = ["run", "--max-retries", "2", "--sweep-min-age", "1"];
    let mut active = env.streaming(&db, &args).await;
    let mut standby = env.tailer(&args);
    // Single-row transactions on five aggregates, riding out restarts.
    let load = Load::start(
        &env.url,
        LoadOptions::new("soak")
            .producers(5)
            .pause(Duration::from_millis(15)),
    );
    let mut oversized = 0;
    let mut nats_stops = 0;
    let started = Instant::now();

    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        let fault = rng.u32(0..8);
        eprintln!("[soak seed {seed}] round {round}: fault {fault}");
        match fault {
            // kill -9 the active tailer: the standby takes over; a new standby joins.
            0 => {
                active.kill9();
                active = standby;
                standby = env.tailer(&args);
            }
            // SIGTERM, then the same.
            1 => {
                active.terminate();
                let _ = active.wait_exit(Duration::from_secs(15));
                active = standby;
                standby = env.tailer(&args);
            }
            2 => {
                nats_stops += 1;
                env.nats.stop(true);
                tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
                env.nats.start_again().unwrap();
            }
            3 => env.pg.restart(StopMode::Fast).unwrap(),
            4 => env.pg.restart(StopMode::Immediate).unwrap(),
            5 => {
                if let Ok(client) = env.pg.connect(DB).await {
                    let _ = client
                        .batch_execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active")
                        .await;
                }
            }
            // A burst: one transaction of 2,000 events on its own aggregate.
            6 => {
                if let Ok(client) = env.pg.connect(DB).await {
                    let _ = try_insert_events(&client, &format!("burst-{round}"), 0, 2000).await;
                }
            }
            // An event over max_payload: a dead letter, not in the stream.
            _ => {
                if let Ok(client) = env.pg.connect(DB).await {
                    if client
                        .execute(
                            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
                             VALUES ('chat', 'oversized', 'blob', jsonb_build_object('x', repeat('x', 2 * 1024 * 1024)))",
                            &[],
                        )
                        .await
                        .is_ok()
                    {
                        oversized += 1;
                    }
                }
            }
        }
    }
    load.stop().await;

    // Settle: nothing pending, every published row in the stream once.
    let db = env.db().await;
    let js = env.js().await;
    wait_for("every row settled", Duration::from_secs(180), || async {
        let (pending, _, failed) = status_counts(&db).await;
        (pending == 0 && failed == oversized).then_some(())
    })
    .await;
    let published: HashSet<String> = db
        .query(
            "SELECT id::text FROM event_outbox WHERE status = 'published'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for(
        "the stream to hold every published row",
        Duration::from_secs(60),
        || async { (stream_count(&js, STREAM).await >= published.len() as u64).then_some(()) },
    )
    .await;
    let messages = read_stream(&js, STREAM).await;
    let mut seen = HashSet::new();
    for m in &messages {
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_owned();
        assert!(seen.insert(id.clone()), "duplicate {id}");
        assert!(
            published.contains(&id),
            "{id} is in the stream but not a published row"
        );
    }
    assert_eq!(seen.len(), published.len(), "nothing missing");
    let out_of_order = order_breaks(&messages);
    assert!(
        out_of_order.is_empty(),
        "[soak seed {seed}] order broken ({nats_stops} NATS stops): {out_of_order:?}"
    );
    eprintln!(
        "[soak seed {seed}] {rounds} rounds ({nats_stops} NATS stops) in {:.0?}: {} events published once each, {oversized} dead letters, {} order breaks",
        started.elapsed(),
        seen.len(),
        out_of_order.len()
    );
    drop(standby);
}
