//! Memory is bounded in bytes, not only in events (contract section 4): a
//! burst of events near NATS's 1 MB limit keeps the tailer's resident memory
//! under 256 MB at default settings, and every event is published once, in
//! order.

use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_events_of_900_kb_stay_under_256_mb_once_and_in_order() {
    let mut env = Env::start().await;
    let db = env.db().await;
    // The hard case: NATS is down while a burst of big events streams in,
    // so nothing leaves, and whatever the tailer reads ahead stays in memory
    // until NATS returns. 20 transactions of 20 events of ~900 KB.
    let tailer = env.streaming(&db, &["run"]).await;
    let pid = tailer.child.id();
    env.nats.stop(true);
    for tx in 0..20i64 {
        db.execute(
            "INSERT INTO event_outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'chat', 'big-' || ($1::int8 % 2), 'blob.stored', \
                    jsonb_build_object('n', $1::int8 * 20 + i, 'blob', repeat(md5(i::text), 28000)) \
             FROM generate_series(0, 19) i",
            &[&tx],
        )
        .await
        .unwrap();
    }
    let mut rss = Vec::new();
    wait_for(
        "the tailer to stop reading ahead",
        Duration::from_secs(60),
        || {
            rss.push(outbox_testkit::procfs::usage(pid).rss);
            let settled = rss.len() >= 40
                && rss[rss.len() - 40..]
                    .iter()
                    .all(|r| *r == rss[rss.len() - 1]);
            async move { settled.then_some(()) }
        },
    )
    .await;
    env.nats.start_again().unwrap();
    let js = env.js().await;
    wait_all_published(&db, &js, STREAM, 400, Duration::from_secs(180)).await;
    let peak = outbox_testkit::procfs::usage(pid).peak_rss;
    assert!(
        peak < 256 << 20,
        "peak RSS {} MB (limit 256 MB)",
        peak >> 20
    );
    eprintln!("peak RSS with 400 x 900 KB events: {} MB", peak >> 20);

    // Once each, in order per aggregate; read one message at a time.
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 400);
    let mut last: [i64; 2] = [-1, -1];
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.unwrap();
        assert!(message.payload.len() > 890_000, "{}", message.payload.len());
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let n = body["n"].as_i64().unwrap();
        let aggregate = usize::from(n / 20 % 2 == 1);
        assert!(
            n > last[aggregate],
            "aggregate big-{aggregate}: {n} after {}",
            last[aggregate]
        );
        last[aggregate] = n;
    }
}
