//! A PostgreSQL primary change under load: a physical standby (pg_basebackup
//! on loopback) is promoted after the primary is killed. PostgreSQL 15 has
//! no failover slots, so the tailer, reaching the new primary through a
//! multi-host URL (or restarted with the standby's URL), creates the slot
//! there and the catch-up sweeper publishes what is still `pending`.
//!
//! Replication is asynchronous: rows the old primary committed and did not
//! send before it died are lost by PostgreSQL itself. The assertions are on
//! the rows the new primary has: every one ends `published` and is in the
//! stream; the repeats (the same event id stored twice) are counted.

use crate::common::*;
use outbox_testkit::{free_port, PgServer, StopMode};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;

/// `postgresql://<user>@127.0.0.1:<p1>,127.0.0.1:<p2>/chat?target_session_attrs=read-write`.
pub fn multi_host(user: &str, first: &PgServer, second: &PgServer) -> String {
    format!(
        "postgresql://{user}@127.0.0.1:{},127.0.0.1:{}/{DB}?target_session_attrs=read-write",
        first.port(),
        second.port()
    )
}

/// A primary (migrated, the tailer's role) and its physical standby.
async fn primary_and_standby() -> (Env, PgServer) {
    // Enough WAL kept for the standby (it has no physical slot).
    let env = Env::start_with(PgServer::builder().setting("wal_keep_size", "256MB")).await;
    let standby = PgServer::standby_of(&env.pg).expect("start a standby");
    let replica = standby.connect(DB).await.unwrap();
    let recovering: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(recovering, "the standby replays the primary's WAL");
    (env, standby)
}

pub async fn scrape(port: u16) -> String {
    http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .1
}

/// Every event id in the stream, with how often it is stored.
pub async fn stream_ids(env: &Env) -> HashMap<String, u32> {
    let mut seen = HashMap::new();
    for message in read_stream(&env.js().await, STREAM).await {
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .expect("every message has Nats-Msg-Id")
            .as_str()
            .to_owned();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// What reached the stream of the rows a primary holds.
pub struct Tally {
    /// The rows of the primary, by id.
    pub rows: HashSet<String>,
    /// Distinct event ids stored.
    pub distinct: usize,
    /// Messages stored, repeats included.
    pub messages: u32,
    /// Stored beyond one per id.
    pub repeats: usize,
    /// Published, then lost with the old primary (never replicated).
    pub lost_by_postgres: usize,
}

/// Waits (at most `settle`) until no row of `db` is pending and none failed,
/// then until every row is in the stream, and counts what is there.
pub async fn settle_and_tally(env: &Env, db: &Client, tailer: &Tailer, settle: Duration) -> Tally {
    wait_for("every row settled", settle, || async {
        let (pending, _, failed) = status_counts(db).await;
        assert_eq!(failed, 0, "nothing dead-lettered:\n{}", tailer.output());
        (pending == 0).then_some(())
    })
    .await;
    let rows = table_ids(db).await;
    // The last marks land before the last messages are counted.
    let stored = wait_for(
        "every row in the stream",
        Duration::from_secs(60),
        || async {
            let stored = stream_ids(env).await;
            rows.iter()
                .all(|id| stored.contains_key(id))
                .then_some(stored)
        },
    )
    .await;
    let messages: u32 = stored.values().sum();
    Tally {
        distinct: stored.len(),
        messages,
        repeats: messages as usize - stored.len(),
        lost_by_postgres: stored.keys().filter(|id| !rows.contains(*id)).count(),
        rows,
    }
}

/// How the tailer reaches the new primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// One process, a multi-host URL: it reconnects by itself.
    MultiHost,
    /// The operator restarts it with the new primary's URL.
    Restart,
}

/// The fault and the checks, for either way of reaching the new primary.
async fn primary_change_under_load(reach: Reach) {
    let (mut env, standby) = primary_and_standby().await;
    let old = env.db().await;
    let metrics_port = free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let args = [
        "run",
        "--sweep-min-age",
        "1",
        "--metrics-addr",
        metrics_addr.as_str(),
    ];
    let first_url = match reach {
        Reach::MultiHost => multi_host("outbox_tailer", &env.pg, &standby),
        Reach::Restart => env.tailer_url.clone(),
    };
    let mut tailer = Tailer::spawn(&first_url, &env.nats.url(), &args, env.dir.path());
    wait_streaming(&old, SLOT, &tailer).await;

    // Producers follow the primary through the multi-host URL too.
    let producers_url = multi_host("postgres", &env.pg, &standby);
    let load = Load::start(
        &producers_url,
        LoadOptions::new("pgfo")
            .producers(2)
            .rows(|n| 1 + n % 3)
            .pause(Duration::from_millis(2)),
    );
    let js = env.js().await;
    wait_for(
        "events flowing from the old primary",
        Duration::from_secs(60),
        || async { (stream_count(&js, STREAM).await >= 400).then_some(()) },
    )
    .await;

    // The primary dies mid-stream; the standby is promoted.
    env.pg.stop(StopMode::Immediate);
    standby.promote().expect("promote the standby");
    let new = standby.connect(DB).await.unwrap();
    let at_promotion: i64 = new
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    let pending_at_promotion = status_counts(&new).await.0;

    if reach == Reach::Restart {
        // It retries the dead primary until restarted with the new URL.
        tailer.kill9();
        let url = format!(
            "postgresql://outbox_tailer@127.0.0.1:{}/{DB}",
            standby.port()
        );
        tailer = Tailer::spawn(&url, &env.nats.url(), &args, env.dir.path());
    }
    // Load goes on on the new primary, while the tailer moves over.
    wait_for(
        "events written to the new primary",
        Duration::from_secs(60),
        || async {
            let now: i64 = new
                .query_one("SELECT count(*) FROM event_outbox", &[])
                .await
                .unwrap()
                .get(0);
            (now >= at_promotion + 300).then_some(())
        },
    )
    .await;
    let committed_seen = load.stop().await;
    wait_streaming(&new, SLOT, &tailer).await;

    let Tally {
        rows,
        distinct,
        messages,
        repeats,
        lost_by_postgres,
    } = settle_and_tally(&env, &new, &tailer, Duration::from_secs(120)).await;
    let scraped = scrape(metrics_port).await;
    let output = tailer.output();
    eprintln!(
        "pg failover ({reach:?}): rows on the new primary {}, of which committed before promotion {at_promotion} \
         (pending then {pending_at_promotion}); producers saw {committed_seen} commit; stream messages {messages}, \
         distinct ids {}, repeats {repeats}; published then lost by PostgreSQL (not replicated) {lost_by_postgres}; \
         sweeper published {} (this process), JetStream-dropped duplicates {}",
        rows.len(),
        distinct,
        metric_sum(&scraped, "outbox_sweeper_published_total"),
        metric_sum(&scraped, "outbox_duplicates_total"),
    );
    // Repeats are bounded: the status check (and JetStream's duplicate
    // window) stop nearly all; a handful may pass when a mark was lost with
    // the old primary and the window passed.
    assert!(
        repeats <= rows.len() / 20,
        "{repeats} repeats of {} events",
        rows.len()
    );
    assert!(
        output.contains("created replication slot"),
        "the slot is created on the new primary:\n{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    match reach {
        Reach::MultiHost => {
            assert!(
                output.contains("PostgreSQL primary changed (timeline 1 -> 2)"),
                "the change is logged:\n{output}"
            );
            assert_eq!(
                metric_sum(&scraped, "outbox_primary_changes_total"),
                1.0,
                "and counted"
            );
        }
        Reach::Restart => assert!(
            output.contains("created on timeline 2"),
            "a new slot on a later timeline is said:\n{output}"
        ),
    }
    tailer.stop_cleanly();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_behind_a_multi_host_url_gets_every_pending_row() {
    primary_change_under_load(Reach::MultiHost).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_promoted_standbys_url_gets_every_pending_row() {
    primary_change_under_load(Reach::Restart).await;
}

#[tokio::test]
async fn the_stream_follows_the_read_write_server_whatever_the_order() {
    // The standby first: the tailer must skip it (read-only) for the query
    // connection and open the stream on the primary, not the first host.
    let (env, standby) = primary_and_standby().await;
    let db = env.db().await;
    let url = multi_host("outbox_tailer", &standby, &env.pg);
    let tailer = Tailer::spawn(&url, &env.nats.url(), &["run"], env.dir.path());
    wait_streaming(&db, SLOT, &tailer).await;
    insert_events(&db, "order", 0, 20).await;
    assert_every_row_published_once(&db, &env.js().await, STREAM, Duration::from_secs(30)).await;
    assert!(
        tailer
            .output()
            .contains(&format!("server=127.0.0.1:{}", env.pg.port())),
        "{}",
        tailer.output()
    );
}

#[tokio::test]
async fn slot_failover_is_refused_before_postgresql_17_with_the_fix() {
    let env = Env::start().await;
    let version: String = env
        .db()
        .await
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    for command in ["run", "setup"] {
        let (code, output) = run_to_exit_env(
            &env.tailer_url,
            &env.nats.url(),
            &[command],
            &[("OUTBOX_SLOT_FAILOVER", "true")],
        );
        assert_eq!(code, 1, "{command}: {output}");
        let line = last_line(&output);
        assert!(
            line.contains("--slot-failover needs PostgreSQL 17")
                && line.contains(&format!("PostgreSQL {version}"))
                && line.contains("drop --slot-failover"),
            "{command}: {output}"
        );
    }
    let slots: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot was created");
}
