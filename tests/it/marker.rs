//! The marker against a real PostgreSQL: it proves every id was marked,
//! waits for rows a commit has not made visible yet, skips rows already
//! settled, and writes the event_logs projection in the same statement.

use crate::common::*;
use outbox_tailer::internals::Marker;
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn insert(db: &impl tokio_postgres::GenericClient, id: Uuid) {
    db.execute(
        "INSERT INTO event_outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES ($1, 'chat', 'c', 'x', '{\"k\": 1}')",
        &[&id],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_row_its_commit_has_not_made_visible_yet() {
    let env = Env::start().await;
    let (db, mut producer) = (env.db().await, env.db().await);
    let (visible, late) = (Uuid::new_v4(), Uuid::new_v4());
    insert(&db, visible).await;
    // `late` is inserted but not committed: invisible to the marker, as a
    // just-decoded transaction can be for a moment.
    let tx = producer.transaction().await.unwrap();
    insert(&tx, late).await;

    let marker = Marker::prepare(&db, false).await.unwrap();
    let marking = tokio::spawn(async move {
        let outcome = marker.mark(&db, &[visible, late], &[]).await.unwrap();
        (outcome, db)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !marking.is_finished(),
        "the marker must not give up on an invisible row"
    );
    tx.commit().await.unwrap();
    let (outcome, db) = tokio::time::timeout(Duration::from_secs(10), marking)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((outcome.marked, outcome.vanished), (2, 0));
    assert!(outcome.retries > 0, "{outcome:?}");
    let (pending, published, _) = status_counts(&db).await;
    assert_eq!((pending, published), (0, 2));
}

#[tokio::test]
async fn rows_already_settled_need_nothing_and_vanished_rows_do_not_block() {
    let env = Env::start().await;
    let db = env.db().await;
    let (settled, gone, fresh) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    insert(&db, settled).await;
    insert(&db, fresh).await;
    db.execute(
        "UPDATE event_outbox SET status = 'published', published_at = now() WHERE id = $1",
        &[&settled],
    )
    .await
    .unwrap();
    let marker = Marker::prepare(&db, false).await.unwrap();

    let outcome = marker.mark(&db, &[settled], &[]).await.unwrap();
    assert_eq!((outcome.marked, outcome.vanished), (0, 0));
    assert_eq!(
        marker
            .settled(&db, &[settled, fresh, gone])
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [settled]
    );

    let started = Instant::now();
    let outcome = marker.mark(&db, &[fresh, gone], &[]).await.unwrap();
    assert_eq!((outcome.marked, outcome.vanished), (1, 1), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a vanished row is given up on in bounded time"
    );
}

#[tokio::test]
async fn event_logs_are_written_in_the_same_statement() {
    let env = Env::start().await;
    let db = env.db().await;
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        insert(&db, *id).await;
    }
    let marker = Marker::prepare(&db, true).await.unwrap();
    assert_eq!(marker.mark(&db, &ids, &[]).await.unwrap().marked, 50);
    let mismatched: i64 = db
        .query_one(
            "SELECT count(*) FROM event_outbox o FULL JOIN event_logs l ON l.event_id = o.id \
             WHERE l.event_id IS NULL OR o.id IS NULL OR l.published_at <> o.published_at \
                OR l.payload <> o.payload OR l.created_at <> o.created_at OR l.aggregate_id <> o.aggregate_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
    // Marking again (a replay) changes nothing and conflicts with nothing.
    assert_eq!(marker.mark(&db, &ids, &[]).await.unwrap().marked, 0);
    let logs: i64 = db
        .query_one("SELECT count(*) FROM event_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logs, 50);
}

/// A synchronous standby that stalls: every commit's WAL is flushed (the
/// stream decodes it and the tailer publishes it), but the transaction stays
/// invisible until the standby answers. The marker must wait for it, longer
/// than its old 3 s give-up, and mark it: not confirm past it and leave it
/// `pending` for the sweeper to publish a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_invisible_for_seconds_is_marked_when_it_appears_not_left_pending() {
    let env = Env::start().await;
    let db = env.db().await;
    let tailer = env.streaming(&db, &["run"]).await;
    db.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'nowhere'")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let producer = env.db().await;
    wait_for("the setting to apply", Duration::from_secs(10), || async {
        let value: String = producer
            .query_one("SELECT current_setting('synchronous_standby_names')", &[])
            .await
            .unwrap()
            .get(0);
        (value == "nowhere").then_some(())
    })
    .await;
    // Blocks in its commit, waiting for the standby.
    let stalled = tokio::spawn(async move { insert_events(&producer, "stalled", 0, 1).await });
    let js = env.js().await;
    wait_for(
        "the stalled event in the stream",
        Duration::from_secs(30),
        || async { (stream_count(&js, STREAM).await == 1).then_some(()) },
    )
    .await;
    wait_for(
        "the marker to say it waits",
        Duration::from_secs(30),
        || async { tailer.output().contains("not visible yet").then_some(()) },
    )
    .await;
    assert_eq!(status_counts(&db).await, (0, 0, 0), "still invisible");
    db.batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    stalled.await.unwrap();
    // Marked by the stream's marker within seconds (the sweeper would take
    // a minute), and published once.
    wait_for("the row marked", Duration::from_secs(10), || async {
        (status_counts(&db).await == (0, 1, 0)).then_some(())
    })
    .await;
    assert_eq!(stream_count(&js, STREAM).await, 1);
}
