//! The marker stage: acked ids become `published` on a few sessions at
//! once, and each batch's position is confirmed in the order the batches
//! came, whichever finishes first.

use super::Batch;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::marker::Marker;
use futures_util::stream::{FuturesOrdered, StreamExt};
use pgwire_replication::Lsn;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

/// Sessions that mark at once, each with one batch in flight. One session
/// waits for each batch's commit (a WAL flush) before it sends the next; two
/// overlap those waits (docs/design.md, "What two marking connections buy").
pub(super) const MARKING_SESSIONS: usize = 2;

/// A session that marks, and its statements.
pub(super) struct Marking {
    pub(super) db: Arc<Client>,
    pub(super) marker: Marker,
}

/// The marker stage: marks batches on its sessions, one batch in flight on
/// each, and publishes each batch's confirm position once it and every batch
/// before it are marked: a batch that finishes first (or waits for rows not
/// visible yet) never lets a position past an unmarked one.
pub(super) async fn mark_batches(
    sessions: Vec<Arc<Marking>>,
    mut batches: mpsc::Receiver<Batch>,
    confirmed: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
) -> Result<(), Error> {
    let mut marking = FuturesOrdered::new();
    // Batch k goes to session k mod n: the session the oldest batch in
    // flight used is the one that is free when it is done.
    let mut taken = 0;
    let mut open = true;
    while open || !marking.is_empty() {
        tokio::select! {
            biased;
            Some(done) = marking.next() => {
                if let Some(lsn) = done? {
                    confirmed.send_replace(lsn);
                }
            }
            batch = batches.recv(), if open && marking.len() < sessions.len() => match batch {
                Some(batch) => {
                    let session = sessions[taken % sessions.len()].clone();
                    taken += 1;
                    marking.push_back(mark_one(session, batch, metrics.clone()));
                }
                None => open = false,
            },
        }
    }
    Ok(())
}

/// Marks one batch; its position to confirm.
async fn mark_one(
    session: Arc<Marking>,
    batch: Batch,
    metrics: Arc<Metrics>,
) -> Result<Option<Lsn>, Error> {
    if !batch.ids.is_empty() {
        metrics.mark_batch_size.observe(batch.ids.len() as f64);
        let outcome = session
            .marker
            .mark(&*session.db, &batch.ids, &batch.xids)
            .await?;
        if outcome.waited_invisible {
            metrics.mark_invisible_waits.inc();
        }
        metrics.mark_retries.inc_by(outcome.retries as u64);
        metrics.marked_vanished.inc_by(outcome.vanished as u64);
        if outcome.retries > 0 || outcome.vanished > 0 {
            tracing::debug!(?outcome, "marking needed retries");
        }
    }
    Ok(batch.confirm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_testkit::PgServer;
    use std::time::Duration;
    use uuid::Uuid;

    const INSERT_SQL: &str =
        "INSERT INTO event_outbox (id, aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, 'chat', 'c', 'x', '{}') RETURNING xmin::text::bigint";

    async fn status(db: &Client, id: Uuid) -> String {
        db.query_one("SELECT status FROM event_outbox WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    fn batch(id: Uuid, xid: i64, confirm: u64) -> Batch {
        Batch {
            ids: vec![id],
            xids: vec![xid as u32],
            confirm: Some(Lsn(confirm)),
        }
    }

    /// A batch whose transaction is not visible yet waits; the batch behind
    /// it is marked meanwhile on the other session, but its position is
    /// confirmed only once the first batch is marked too.
    #[tokio::test]
    async fn a_later_batch_marks_meanwhile_but_confirms_after_the_earlier_one() {
        let pg = PgServer::start().unwrap();
        pg.create_database("marking").await.unwrap();
        let db = pg.connect("marking").await.unwrap();
        db.batch_execute(include_str!("../../sql/schema.sql"))
            .await
            .unwrap();
        let mut sessions = Vec::new();
        for _ in 0..MARKING_SESSIONS {
            let db = pg.connect("marking").await.unwrap();
            let marker = Marker::prepare(&db, false).await.unwrap();
            sessions.push(Arc::new(Marking {
                db: Arc::new(db),
                marker,
            }));
        }
        let (late, visible) = (Uuid::new_v4(), Uuid::new_v4());
        // `late`'s transaction is open: the marker waits for it to commit.
        let mut producer = pg.connect("marking").await.unwrap();
        let open = producer.transaction().await.unwrap();
        let late_xid: i64 = open.query_one(INSERT_SQL, &[&late]).await.unwrap().get(0);
        let visible_xid: i64 = db.query_one(INSERT_SQL, &[&visible]).await.unwrap().get(0);

        let (batches, batch_rx) = mpsc::channel(1);
        let (confirmed_tx, mut confirmed) = watch::channel(Lsn::ZERO);
        let stage = tokio::spawn(mark_batches(
            sessions,
            batch_rx,
            confirmed_tx,
            Arc::new(Metrics::new()),
        ));
        batches.send(batch(late, late_xid, 100)).await.unwrap();
        batches
            .send(batch(visible, visible_xid, 200))
            .await
            .unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while status(&db, visible).await != "published" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second batch waited behind the first"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let early = tokio::time::timeout(Duration::from_millis(500), confirmed.changed()).await;
        assert!(
            early.is_err(),
            "confirmed {:?} while an earlier batch was unmarked",
            *confirmed.borrow()
        );

        open.commit().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            confirmed.wait_for(|lsn| *lsn == Lsn(200)),
        )
        .await
        .expect("the positions confirmed once both batches are marked")
        .unwrap();
        assert_eq!(status(&db, late).await, "published");
        drop(batches);
        tokio::time::timeout(Duration::from_secs(10), stage)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
