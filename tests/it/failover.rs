//! Failover: a hot standby takes over when the active tailer dies, and a
//! PostgreSQL restart under load needs no restart of the tailer. Nothing is
//! lost or duplicated either way.

use crate::common::*;
use outbox_testkit::{free_port, StopMode};
use std::time::{Duration, Instant};

/// The role `/readyz` answers with 200 (`active`, `standby`); None on 503.
async fn role(port: u16) -> Option<String> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/readyz")).await;
    (status == 200).then(|| body.trim().to_owned())
}

/// Waits until the instance on `port` answers `/readyz` with `role`.
async fn wait_role(port: u16, want: &str, timeout: Duration) {
    wait_for_seen(&format!("/readyz {want}"), timeout, || async {
        match role(port).await {
            Some(role) if role == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// The gauges of the instance on `port`: (outbox_tailer_active, outbox_tailer_standby).
async fn role_gauges(port: u16) -> (f64, f64) {
    let (_, scrape) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    (
        metric_sum(&scrape, "outbox_tailer_active"),
        metric_sum(&scrape, "outbox_tailer_standby"),
    )
}

/// Two tailers on the default slot, each with its metrics port: the first
/// streaming, the second started after it.
struct Pair {
    active: Tailer,
    standby: Tailer,
    port_a: u16,
    port_b: u16,
}

impl Pair {
    async fn start(env: &Env, db: &tokio_postgres::Client) -> Pair {
        let (port_a, port_b) = (free_port().unwrap(), free_port().unwrap());
        let metrics = |port: u16| format!("127.0.0.1:{port}");
        let active = env
            .streaming(db, &["run", "--metrics-addr", &metrics(port_a)])
            .await;
        let standby = env.tailer(&["run", "--metrics-addr", &metrics(port_b)]);
        Pair {
            active,
            standby,
            port_a,
            port_b,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_30_seconds_of_a_kill() {
    let env = Env::start().await;
    let db = env.db().await;
    let Pair {
        mut active,
        standby,
        port_a,
        port_b,
    } = Pair::start(&env, &db).await;
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
    // Both are ready, each in its role: a Deployment of two is Available.
    wait_role(port_b, "standby", Duration::from_secs(10)).await;
    assert_eq!(role(port_a).await.as_deref(), Some("active"));
    assert_eq!(role_gauges(port_a).await, (1.0, 0.0));
    assert_eq!(role_gauges(port_b).await, (0.0, 1.0));

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
    wait_role(port_b, "active", Duration::from_secs(30)).await;
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

/// A rolling update's handover: SIGTERM to the active instance under load;
/// the standby streams within 5 s of its exit (contract section 4), and
/// nothing is lost, duplicated or reordered. Prints the gap and the worst
/// commit-to-ack latency of the events committed around it
/// (docs/operations.md, "Handover").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_hands_over_to_the_standby_within_5_seconds() {
    let env = Env::start().await;
    let db = env.db().await;
    let Pair {
        mut active,
        standby: _standby,
        port_b,
        ..
    } = Pair::start(&env, &db).await;
    wait_role(port_b, "standby", Duration::from_secs(30)).await;

    let load = Load::start(
        &env.url,
        LoadOptions::new("handover").pause(Duration::from_millis(2)),
    );
    let js = env.js().await;
    wait_for("events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 500).then_some(())
    })
    .await;

    let signalled = Instant::now();
    active.stop_cleanly();
    let exited = Instant::now();
    wait_role(port_b, "active", Duration::from_secs(30)).await;
    let gap = exited.elapsed();
    let from_signal = signalled.elapsed();
    // Events committed after the takeover flow through the new active one.
    let at_takeover = stream_count(&js, STREAM).await;
    wait_for(
        "publishing after the takeover",
        Duration::from_secs(30),
        || async { (stream_count(&js, STREAM).await > at_takeover + 200).then_some(()) },
    )
    .await;
    assert!(load.stop().await > 0);
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(60)).await;
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
    assert_eq!(role_gauges(port_b).await, (1.0, 0.0));

    // Commit (created_at: the producers' transactions are one statement) to
    // the JetStream ack (the message's stored time), worst case.
    let created: std::collections::HashMap<String, f64> = db
        .query(
            "SELECT id::text, extract(epoch FROM created_at)::float8 FROM event_outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let worst = messages
        .iter()
        .filter_map(|m| {
            let id = m.headers.get("Nats-Msg-Id")?.as_str();
            let stored = m.time.unix_timestamp_nanos() as f64 / 1e9;
            Some(stored - created.get(id)?)
        })
        .fold(0.0_f64, f64::max);
    eprintln!(
        "[handover] standby streaming {gap:.2?} after the active one exited \
         ({from_signal:.2?} after SIGTERM); worst commit-to-ack {worst:.2} s over {} events",
        messages.len()
    );
    assert!(
        gap < Duration::from_secs(5),
        "the standby took {gap:?} after the exit"
    );
}

/// A transient failure inside a session's slot set-up (here the connection
/// creating the slot is terminated, as a restarting server or a cut
/// connection would end it) is retried like any outage: the tailer does
/// not exit, recreates the slot, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_while_the_slot_is_created_is_retried() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut tailer = env.streaming(&db, &["run", "--sweep-min-age", "0"]).await;
    insert_events(&db, "before", 0, 10).await;

    // A transaction with an id, left open: creating a slot waits for it.
    let (holder, connection) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    // The slot goes away under the tailer: its next session creates it.
    wait_for("the slot dropped", Duration::from_secs(30), || async {
        let _ = db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
            )
            .await;
        db.batch_execute(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
            .await
            .ok()
    })
    .await;
    // Cut the connection exactly while it creates the slot.
    let pid: i32 = wait_for("the tailer creating the slot", Duration::from_secs(30), || async {
        db.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_create_logical_replication_slot%' \
             AND pid <> pg_backend_pid() AND application_name = 'outbox-tailer'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
    })
    .await;
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    holder.batch_execute("COMMIT").await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while !holds_slot(&db, &tailer).await {
        if let Some(status) = tailer.child.try_wait().unwrap() {
            panic!(
                "the tailer exited ({status}) instead of retrying:\n{}",
                tailer.output()
            );
        }
        assert!(Instant::now() < deadline, "{}", tailer.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    insert_events(&db, "after", 0, 10).await;
    assert_every_row_published_once(&db, &env.js().await, STREAM, Duration::from_secs(60)).await;
}
