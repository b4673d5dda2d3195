//! Operations: /metrics, /healthz, /readyz and `status` on a running tailer.

use crate::common::*;
use outbox_testkit::free_port;
use std::time::Duration;

/// The value of every series of `name` in a scrape, summed.
/// `promtool check metrics` (Debian's prometheus package) must accept the scrape.
fn promtool_check_metrics(scrape: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; scripts/setup does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_readiness_and_status_follow_the_tailer() {
    let mut env = Env::start().await;
    let db = env.db().await;
    let port = free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let addr = format!("127.0.0.1:{port}");
    let tailer = env.tailer(&["run", "--metrics-addr", &addr, "--stats-interval", "0.2"]);
    wait_streaming(&db, "event_outbox_tailer", &tailer).await;
    wait_for("ready", Duration::from_secs(20), || async {
        (http_get(&format!("{base}/readyz")).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    // The container health check: the same answer from the binary, with no
    // database settings at all, and the wildcard address asked on loopback.
    let healthcheck = |addr: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
            .args(["healthcheck", "--metrics-addr", &addr])
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let healthy = healthcheck(format!("0.0.0.0:{port}"));
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let nobody = healthcheck(format!("127.0.0.1:{}", free_port().unwrap()));
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stderr)
        .starts_with("outbox-tailer: healthcheck: no answer"));

    insert_events(&db, "chat-1", 0, 300).await;
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'billing', 'inv-' || i, 'invoice.paid', '{}' FROM generate_series(1, 200) i",
        &[],
    )
    .await
    .unwrap();
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 500, Duration::from_secs(60)).await;

    // Counters add up to what was published; the histogram saw every event.
    let scrape = wait_for(
        "the counters to reach 500",
        Duration::from_secs(20),
        || async {
            let (_, scrape) = http_get(&format!("{base}/metrics")).await;
            (metric_sum(&scrape, "outbox_events_published_total") == 500.0).then_some(scrape)
        },
    )
    .await;
    assert!(
        scrape.contains("outbox_events_published_total{aggregate_type=\"chat\"} 300"),
        "{scrape}"
    );
    assert!(
        scrape.contains("outbox_events_published_total{aggregate_type=\"billing\"} 200"),
        "{scrape}"
    );
    assert_eq!(
        metric_sum(&scrape, "outbox_publish_latency_seconds_count"),
        500.0
    );
    assert_eq!(metric_sum(&scrape, "outbox_replication_connected"), 1.0);
    promtool_check_metrics(&scrape);
    assert_eq!(metric_sum(&scrape, "outbox_nats_connected"), 1.0);

    // Caught up: lag gauges return to ~0, nothing pending.
    wait_for("lag to return to ~0", Duration::from_secs(30), || async {
        let (_, scrape) = http_get(&format!("{base}/metrics")).await;
        let caught_up = metric_sum(&scrape, "outbox_replication_lag_seconds") == 0.0
            && metric_sum(&scrape, "outbox_replication_lag_bytes") < 1_048_576.0
            && metric_sum(&scrape, "outbox_pending_events") == 0.0
            && metric_sum(&scrape, "outbox_slot_active") == 1.0;
        caught_up.then_some(())
    })
    .await;

    // Readiness follows NATS.
    env.nats.stop(true);
    wait_for(
        "/readyz 503 while NATS is down",
        Duration::from_secs(30),
        || async {
            let (status, body) = http_get(&format!("{base}/readyz")).await;
            (status == 503 && body.contains("nats: disconnected")).then_some(())
        },
    )
    .await;
    assert_eq!(
        http_get(&format!("{base}/healthz")).await.0,
        200,
        "alive while not ready"
    );
    env.nats.start_again().unwrap();
    wait_for(
        "/readyz 200 after NATS returns",
        Duration::from_secs(60),
        || async {
            let (status, body) = http_get(&format!("{base}/readyz")).await;
            (status == 200 && body == "active\n").then_some(())
        },
    )
    .await;

    // status, for people and for scripts.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .args(["status", "--json"])
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["slot"], "event_outbox_tailer");
    assert_eq!(json["slot_active"], true);
    // Who holds it: this tailer's walsender, its client on loopback.
    let holder = &json["slot_holder"];
    assert!(holder["pid"].as_i64().is_some_and(|pid| pid > 0), "{json}");
    assert_eq!(holder["client_addr"], "127.0.0.1", "{json}");
    assert_eq!(holder["application_name"], "outbox-tailer", "{json}");
    assert_eq!(json["pending"], 0);
    assert_eq!(json["failed"], 0);
    assert!(
        json["last_published_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{json}"
    );
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-tailer"))
        .arg("status")
        .env("DATABASE_URL", &env.tailer_url)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    for line in [
        "slot                event_outbox_tailer (active: held by backend ",
        "for 127.0.0.1 port ",
        ", application outbox-tailer)",
        "pending events      0",
        "last published",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
}

#[tokio::test]
async fn metrics_addr_in_use_is_one_clear_line() {
    let env = Env::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut tailer = env.tailer(&["run", "--metrics-addr", &addr]);
    let status = tailer.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(1));
    let output = tailer.output();
    assert!(
        output
            .lines()
            .last()
            .unwrap()
            .contains(&format!("cannot listen on --metrics-addr {addr}")),
        "{output}"
    );
}

#[tokio::test]
async fn the_statistics_queries_and_the_sweep_probe_use_the_status_index_on_a_large_table() {
    let env = Env::start().await;
    let db = env.db().await;
    // 300,000 rows, nearly all published: the shape of a long-lived outbox.
    db.batch_execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
         SELECT 'chat', 'c' || (i % 5000), 'message.created', '{}', \
                CASE WHEN i % 1000 = 0 THEN 'pending' WHEN i % 1000 = 1 THEN 'failed' ELSE 'published' END, \
                CASE WHEN i % 1000 > 1 THEN now() END, now() - make_interval(secs => 300000 - i) \
         FROM generate_series(1, 300000) i",
    )
    .await
    .unwrap();
    db.batch_execute("VACUUM ANALYZE event_outbox")
        .await
        .unwrap();
    // The sweeper's probe (every 5 s) too, with its cutoff as now().
    let probe = outbox_tailer::internals::PROBE_SQL
        .replace("$1", "now()")
        .replace("$2", "'3'");
    for sql in [
        outbox_tailer::internals::PENDING_SQL,
        outbox_tailer::internals::FAILED_SQL,
        &probe,
    ] {
        let plan: Vec<String> = db
            .query(&format!("EXPLAIN {sql}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Only Scan using ix_event_outbox_status_next_retry_at_created_at"),
            "{sql}\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{plan}");
        // The probe's second half (rows stamped in the future) reads the
        // heap only for index entries after now(): its range is an index
        // condition, not a filter.
        if sql == probe {
            assert!(
                plan.lines()
                    .any(|l| l.contains("Index Cond") && l.contains("created_at > now()")),
                "{plan}"
            );
        }
    }
}
