//! Failover: a hot standby takes over when the active tailer dies, and a
//! PostgreSQL restart under load needs no restart of the tailer. Nothing is
//! lost or duplicated either way.

use crate::common::*;
use outbox_testkit::{free_port, StopMode};
use std::time::{Duration, Instant};

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
    let mut active = env
        .streaming(
            &db,
            &["run", "--metrics-addr", &format!("127.0.0.1:{port_a}")],
        )
        .await;
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

    let load = Load::start(
        &env.url,
        LoadOptions::new("failover").pause(Duration::from_millis(2)),
    );
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
    assert!(load.stop().await > 0);
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
    let load = Load::start(
        &env.url,
        LoadOptions::new("restart").pause(Duration::from_millis(2)),
    );
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

    assert!(load.stop().await > 0);
    assert_every_row_published_once(&db, &js, "EVENTS", Duration::from_secs(60)).await;
    assert!(
        tailer.output().contains("reconnecting"),
        "{}",
        tailer.output()
    );
}
