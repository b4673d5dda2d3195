//! `outbox-tailer republish` (contract section 2), on real servers: a
//! deleted stream restored (every event back once, in per-aggregate order,
//! headers as first published, rows untouched); a republish inside the
//! duplicate window stores nothing twice; filters and `--until`; usage
//! errors and `--dry-run`; live traffic while it runs; SIGTERM in the middle
//! and a resumed run.

use crate::common::*;
use async_nats::jetstream;
use std::collections::HashMap;
use std::time::Duration;

/// The stream's messages by event id: (subject, headers without the
/// republish mark, payload).
async fn by_id(
    js: &jetstream::Context,
) -> HashMap<String, (String, Vec<(String, String)>, Vec<u8>)> {
    read_stream(js, STREAM)
        .await
        .into_iter()
        .map(|m| {
            // The mark, and the live stream's chain (the transport's).
            let headers = sorted_headers(&m, |name| {
                name == "Outbox-Republished" || name == "Nats-Expected-Last-Msg-Id"
            });
            let id = m.headers.get("Nats-Msg-Id").unwrap().to_string();
            (id, (m.subject.to_string(), headers, m.payload.to_vec()))
        })
        .collect()
}

/// `published_at` of every row, to show a republish leaves rows alone.
async fn published_at(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT id::text || ' ' || status || ' ' || published_at::text FROM event_outbox ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Rows written as `published` before the slot exists: in no stream, never
/// delivered by the tailer (as after a stream lost them). Aggregate
/// `archive-<i % 4>`, payload `n` increasing with `created_at`.
async fn archived(db: &tokio_postgres::Client, rows: i64) {
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
         SELECT 'archive', 'archive-' || (i % 4), 'message.created', jsonb_build_object('n', i), \
                'published', now() - interval '1 hour', now() - interval '1 hour' + make_interval(secs => i / 1000.0) \
         FROM generate_series(1, $1::int8) i",
        &[&rows],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_restored_once_in_order_with_headers() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut tailer = env.streaming(&db, &["run"]).await;
    let load = Load::start(&env.url, LoadOptions::new("restore").limit(600));
    db.batch_execute(
        // One transaction: its rows share now(), and a republish orders
        // them by (created_at, id); clock_timestamp() gives each its own.
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, headers, created_at) \
         SELECT 'chat', 'with-headers', 'message.created', jsonb_build_object('n', i), \
                jsonb_build_object('tenant', 'acme', 'traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'), \
                clock_timestamp() \
         FROM generate_series(1, 20) i",
    )
    .await
    .unwrap();
    let total = load.finish().await as u64 + 20;
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, total, Duration::from_secs(60)).await;
    tailer.stop_cleanly();
    let first = by_id(&js).await;
    let rows_before = published_at(&db).await;

    // The stream is lost.
    js.delete_stream(STREAM).await.unwrap();
    let (code, output) = run_to_exit(
        &env.tailer_url,
        &env.nats.url(),
        &["republish", "--since", "2h"],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        last_line(&output).rsplit_once(" in ").unwrap().0,
        format!("republished {total} events (0 already in the stream)"),
        "{output}"
    );
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len() as u64, total, "every event once");
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
    assert!(messages
        .iter()
        .all(|m| m.headers.get("Outbox-Republished").map(|v| v.as_str()) == Some("true")));
    assert_eq!(by_id(&js).await, first, "each as its first publish made it");
    assert_eq!(published_at(&db).await, rows_before, "rows untouched");

    // Again at once: every copy is still in the stream, none stored twice.
    let (code, output) = run_to_exit(
        &env.tailer_url,
        &env.nats.url(),
        &["republish", "--since", "2h"],
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        last_line(&output).starts_with(&format!(
            "republished {total} events ({total} already in the stream)"
        )),
        "{output}"
    );
    assert_eq!(stream_count(&js, STREAM).await, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_filters_until_dry_run_and_usage_errors() {
    let env = Env::start().await;
    let db = env.db().await;
    archived(&db, 400).await;
    let nats = env.nats.url();
    for bare in [&["republish"][..], &["republish", "--dry-run"][..]] {
        let (code, output) = run_to_exit(&env.tailer_url, &nats, bare);
        assert_eq!(code, 2, "{bare:?}: {output}");
        assert!(output.contains("republish needs a selector"), "{output}");
    }
    // archive-1 holds every fourth row; --until cuts before the 201st row.
    let until: String = db
        .query_one(
            "SELECT (created_at)::text FROM event_outbox WHERE payload->>'n' = '201'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let filters = ["--aggregate-id", "archive-1", "--until", until.as_str()];
    let dry: Vec<&str> = ["republish", "--dry-run"]
        .into_iter()
        .chain(filters)
        .collect();
    let (code, output) = run_to_exit(&env.tailer_url, &nats, &dry);
    assert_eq!(
        (code, last_line(&output)),
        (0, "would republish 50 events (dry run: nothing sent)"),
        "{output}"
    );
    let js = env.js().await;
    assert_eq!(
        stream_count(&js, STREAM).await,
        0,
        "a dry run publishes nothing"
    );

    let run: Vec<&str> = ["republish"].into_iter().chain(filters).collect();
    let (code, output) = run_to_exit(&env.tailer_url, &nats, &run);
    assert_eq!(code, 0, "{output}");
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 50);
    assert!(messages
        .iter()
        .all(|m| m.headers.get("Outbox-Aggregate-Id").unwrap().as_str() == "archive-1"));
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}

/// Live events keep flowing, once and in order, while a republish writes
/// into the same stream (it breaks the live chain, which goes back and
/// sends again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_during_a_republish_is_neither_lost_nor_repeated() {
    let env = Env::start().await;
    let db = env.db().await;
    archived(&db, 3000).await;
    let _tailer = env.streaming(&db, &["run"]).await;
    let load = Load::start(
        &env.url,
        LoadOptions::new("live").pause(Duration::from_millis(2)),
    );
    let js = env.js().await;
    wait_for("live events flowing", Duration::from_secs(30), || async {
        (stream_count(&js, STREAM).await > 100).then_some(())
    })
    .await;
    let (code, output) = run_to_exit(
        &env.tailer_url,
        &env.nats.url(),
        &["republish", "--aggregate-type", "archive"],
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        last_line(&output).starts_with("republished 3000 events (0 already"),
        "{output}"
    );
    let live = load.stop().await as u64;
    assert!(live > 0);
    wait_all_published(&db, &js, STREAM, 3000 + live, Duration::from_secs(60)).await;
    assert_every_row_published_once(&db, &js, STREAM, Duration::from_secs(30)).await;
    assert_eq!(
        order_breaks(&read_stream(&js, STREAM).await),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_where_it_says_and_a_rerun_goes_on() {
    let env = Env::start().await;
    let db = env.db().await;
    archived(&db, 4000).await;
    let js = env.js().await;
    // Slowed, so the signal finds it in the middle.
    let mut republish = Tailer::spawn(
        &env.tailer_url,
        &env.nats.url(),
        &["republish", "--aggregate-type", "archive", "--rate", "1000"],
        env.dir.path(),
    );
    wait_for(
        "the republish under way",
        Duration::from_secs(30),
        || async { (stream_count(&js, STREAM).await > 300).then_some(()) },
    )
    .await;
    republish.terminate();
    let status = republish
        .wait_exit(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    let output = republish.output();
    assert!(status.success(), "{output}");
    let since = output
        .split("run again with --since '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no resume point:\n{output}"))
        .to_owned();
    let stopped = stream_count(&js, STREAM).await;
    assert!(stopped < 4000, "stopped in the middle: {stopped}");

    let (code, output) = run_to_exit(
        &env.tailer_url,
        &env.nats.url(),
        &[
            "republish",
            "--aggregate-type",
            "archive",
            "--since",
            &since,
        ],
    );
    assert_eq!(code, 0, "{output}");
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 4000, "every event once: {output}");
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}

/// Progress: a bar redrawn in place on a terminal (run under `script`,
/// which gives it a pseudo-terminal), with the selection's total once
/// counted; a log line every 5 s otherwise. Both runs take about 6 s
/// (`--rate`), side by side; the second's copies are dropped as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_a_bar_on_a_terminal_and_lines_in_a_log() {
    let env = Env::start().await;
    let db = env.db().await;
    archived(&db, 6000).await;
    let bin = outbox_testkit::tailer_bin().unwrap();
    let args = "republish --aggregate-type archive --rate 1000";
    let on_terminal = std::process::Command::new("script")
        .args(["-qfec", &format!("{} {args}", bin.display()), "/dev/null"])
        .env("DATABASE_URL", &env.tailer_url)
        .env("NATS_URL", env.nats.url())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let args: Vec<&str> = args.split(' ').collect();
    let logged = run_to_exit(&env.tailer_url, &env.nats.url(), &args);
    let on_terminal = on_terminal.wait_with_output().unwrap();
    let terminal = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{terminal}");
    // Redrawn in place: a carriage return and a cleared line before each.
    let frames: Vec<&str> = terminal
        .split("\r\x1b[2K")
        .filter(|frame| frame.contains(" of 6,000 events, "))
        .collect();
    assert!(
        frames.len() >= 5,
        "a bar redrawn every 250 ms:\n{terminal:?}"
    );
    assert!(
        frames.iter().any(|frame| frame.starts_with("[###")),
        "{terminal:?}"
    );
    // The bar gives way to the closing line.
    assert!(
        terminal.contains("\r\x1b[2Krepublished 6000 events ("),
        "{terminal:?}"
    );

    let (code, output) = logged;
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains('\r'), "no bar in a log: {output}");
    let line = output
        .lines()
        .find(|line| line.contains("republishing"))
        .unwrap_or_else(|| panic!("no progress line in 6 s:\n{output}"));
    assert!(line.contains("total=6000"), "{line}");
    assert!(line.contains("reached="), "{line}");
}

/// Memory: pages and publishes under way stay within
/// `--max-in-flight-bytes` (half each), even with events near NATS's 1 MB
/// limit: 300 of ~900 KB (270 MB in all) with a budget of 8 MB, every one
/// back once and in order. Before pages were cut by bytes, one page of 100
/// such rows alone held 90 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_events_stay_within_the_byte_budget() {
    let env = Env::start().await;
    let db = env.db().await;
    db.execute(
        "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload, status, published_at, created_at) \
         SELECT 'archive', 'big-' || (i % 2), 'blob.stored', \
                jsonb_build_object('n', i, 'blob', repeat(md5(i::text), 28000)), \
                'published', now(), now() - interval '1 hour' + make_interval(secs => i / 1000.0) \
         FROM generate_series(1, 300) i",
        &[],
    )
    .await
    .unwrap();
    // As autovacuum would: without statistics the planner may sort the
    // whole selection (each page then reads all 300 payloads).
    db.batch_execute("ANALYZE event_outbox").await.unwrap();
    let mut republish = Tailer::spawn(
        &env.tailer_url,
        &env.nats.url(),
        &[
            "republish",
            "--aggregate-type",
            "archive",
            "--max-in-flight-bytes",
            "8MiB",
            "--rate",
            "100",
        ],
        env.dir.path(),
    );
    let pid = republish.child.id();
    // The peak so far, read until the process is gone (it only grows).
    let mut peak = 0;
    let started = std::time::Instant::now();
    while republish.wait_exit(Duration::from_millis(20)).is_none() {
        peak = peak.max(outbox_testkit::procfs::usage(pid).peak_rss);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit:\n{}",
            republish.output()
        );
    }
    let output = republish.output();
    assert!(
        last_line(&output).starts_with("republished 300 events (0 already"),
        "{output}"
    );
    eprintln!(
        "peak RSS republishing 300 x 900 KB within 8 MB: {} MB ({})",
        peak >> 20,
        last_line(&output)
    );
    assert!(peak > 0);
    assert!(peak < 64 << 20, "peak RSS {} MB", peak >> 20);
    let js = env.js().await;
    let messages = read_stream(&js, STREAM).await;
    assert_eq!(messages.len(), 300);
    assert_eq!(order_breaks(&messages), Vec::<String>::new());
}
