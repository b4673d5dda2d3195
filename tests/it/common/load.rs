//! Load for the integration tests: producers that write numbered events
//! until they are stopped or reach a limit, riding out database restarts.
//!
//! Producer `p` writes aggregate `<prefix>-<p>`; each event's payload is
//! `{"agg": <aggregate>, "n": <number>}`, numbered per aggregate in commit
//! order, so [`super::order_breaks`] can check the stream's order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// How the producers write.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Aggregate id prefix; producer `p` writes `<prefix>-<p>`.
    pub prefix: &'static str,
    /// Concurrent producers, each on its own connection.
    pub producers: usize,
    /// Events in the transaction that starts at event number `n`.
    pub rows: fn(i64) -> i64,
    /// Pause after each transaction.
    pub pause: Duration,
    /// Each producer stops after this many events (None: until stopped).
    pub limit: Option<i64>,
}

impl LoadOptions {
    /// One producer, single-row transactions, no pause, until stopped.
    pub fn new(prefix: &'static str) -> LoadOptions {
        LoadOptions {
            prefix,
            producers: 1,
            rows: |_| 1,
            pause: Duration::ZERO,
            limit: None,
        }
    }

    pub fn producers(mut self, producers: usize) -> Self {
        self.producers = producers;
        self
    }

    pub fn rows(mut self, rows: fn(i64) -> i64) -> Self {
        self.rows = rows;
        self
    }

    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    pub fn limit(mut self, events: i64) -> Self {
        self.limit = Some(events);
        self
    }
}

/// Producers at work.
pub struct Load {
    running: Arc<AtomicBool>,
    producers: Vec<JoinHandle<i64>>,
}

impl Load {
    pub fn start(url: &str, options: LoadOptions) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let producers = (0..options.producers)
            .map(|p| {
                let aggregate = format!("{}-{p}", options.prefix);
                tokio::spawn(produce(
                    url.to_owned(),
                    aggregate,
                    options.clone(),
                    running.clone(),
                ))
            })
            .collect();
        Load { running, producers }
    }

    /// Stops the producers; returns how many events they saw commit.
    pub async fn stop(self) -> i64 {
        self.running.store(false, Ordering::Relaxed);
        self.finish().await
    }

    /// Waits for producers with a limit to reach it; returns the events.
    pub async fn finish(self) -> i64 {
        let mut total = 0;
        for producer in self.producers {
            total += producer.await.expect("a producer panicked");
        }
        total
    }
}

async fn produce(
    url: String,
    aggregate: String,
    options: LoadOptions,
    running: Arc<AtomicBool>,
) -> i64 {
    let mut db: Option<Client> = None;
    let mut n = 0;
    let mut committed = 0;
    while running.load(Ordering::Relaxed) && options.limit.is_none_or(|limit| n < limit) {
        if db.as_ref().is_none_or(Client::is_closed) {
            db = reconnect(&url, &aggregate, &mut n).await;
            if db.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let Some(client) = db.as_ref() else { continue };
        let rows = (options.rows)(n).max(1);
        let rows = options.limit.map_or(rows, |limit| rows.min(limit - n));
        match super::try_insert_events(client, &aggregate, n, rows).await {
            Ok(()) => {
                n += rows;
                committed += rows;
            }
            // The server went away: reconnect, and number on from the table.
            Err(_) => db = None,
        }
        if !options.pause.is_zero() {
            tokio::time::sleep(options.pause).await;
        }
    }
    committed
}

/// A new connection, and the aggregate's next number from what committed (an
/// insert whose reply was lost may have committed all the same).
async fn reconnect(url: &str, aggregate: &str, n: &mut i64) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let next: Option<i64> = client
        .query_one(
            "SELECT max((payload->>'n')::bigint) + 1 FROM event_outbox WHERE aggregate_id = $1",
            &[&aggregate],
        )
        .await
        .ok()?
        .get(0);
    *n = (*n).max(next.unwrap_or(0));
    Some(client)
}
