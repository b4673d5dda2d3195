//! The tailer's top level: `setup`, and `run` (the outer loop that starts a
//! replication session, and another after a retryable failure, until shutdown).

use crate::backoff::Backoff;
use crate::config::{Config, RequeueArgs};
use crate::error::{Action, Error, Internal};
use crate::metrics::Metrics;
use crate::outbox::boundary::Boundary;
use crate::outbox::retention;
use crate::outbox::sweeper::{Sweeper, Swept};
use crate::publish::jetstream;
use crate::publish::turn::PublishTurn;
use crate::replication::setup::{self, SetupError};
use crate::replication::timeline::PrimaryWatch;
use crate::shutdown::Shutdown;
use crate::supervise::Supervised;
use crate::{db, http, pipeline, stats};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A session that streamed this long counts as healthy: the next failure
/// starts the backoff from the beginning.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often a standby tries to take the slot.
const STANDBY_POLL: Duration = Duration::from_secs(2);

/// `outbox-tailer setup`: checks, then publication, slot and stream.
pub async fn setup(config: &Config) -> Result<(), Error> {
    let db = db::connect(config).await?;
    setup::prepare(&db, config).await?;
    let (client, _) = jetstream::connect(config, Arc::new(Metrics::new())).await?;
    let js = jetstream::context(client);
    jetstream::ensure_stream_within(&js, config, Duration::from_secs(30)).await?;
    tracing::info!(slot = %config.slot, publication = %config.publication, stream = %config.stream, "setup complete");
    Ok(())
}

/// `outbox-tailer run`: fails fast on what an operator must fix, then
/// streams until `shutdown`, reconnecting (with backoff) after failures.
pub async fn run(config: &Config, mut shutdown: Shutdown) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    let addr = http::spawn(config.metrics_addr, metrics.clone())
        .await
        .map_err(|e| SetupError::MetricsAddr {
            addr: config.metrics_addr,
            reason: e.to_string(),
        })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    // Start-up waits on servers (a slot's creation waits for running
    // transactions): shutdown is heard meanwhile.
    let checked = async {
        let db = db::connect(config).await?;
        match setup::prepare(&db, config).await {
            // Not fatal: reported (log, outbox_slot_lost) until the operator
            // drops the slot, then recreated by the next session.
            Err(SetupError::SlotLost(slot)) => {
                tracing::error!("{}", SetupError::SlotLost(slot));
                Ok(())
            }
            other => other,
        }
    };
    let Some(checked) = shutdown.unless(checked).await else {
        return Ok(());
    };
    checked?;
    let mut tasks = Supervised::new(shutdown.clone(), metrics.clone());
    tasks.spawn(
        "statistics poller",
        stats::poll(
            config.clone(),
            metrics.clone(),
            config.stats_interval,
            shutdown.clone(),
        ),
    );
    let Some(connected) = shutdown
        .unless(jetstream::connect(config, metrics.clone()))
        .await
    else {
        return Ok(());
    };
    let (client, connects) = connected?;
    let js = jetstream::context(client);
    let sweep = Arc::new(Boundary::default());
    let turn = Arc::new(PublishTurn::default());
    let nats = pipeline::Nats {
        js: js.clone(),
        turn: turn.clone(),
        connects,
    };
    let sweeper = Sweeper::new(js.clone(), turn.clone(), sweep.clone(), config);
    tasks.spawn(
        "sweeper",
        run_sweeper(config.clone(), sweeper, metrics.clone(), shutdown.clone()),
    );
    if let Some(retention) = config.retention {
        tasks.spawn(
            "retention",
            run_retention(config.clone(), retention, metrics.clone(), shutdown.clone()),
        );
    }
    // A background task that ends before shutdown (a panic, a bug) ends the
    // process: exit non-zero, and the container restarts it, rather than
    // run on without catch-up or statistics.
    tokio::select! {
        biased;
        error = tasks.first_death() => Err(error),
        result = sessions(config, &js, &nats, &metrics, &sweep, &mut shutdown) => result,
    }
}

/// Starts sessions until shutdown, or an error an operator must fix.
async fn sessions(
    config: &Config,
    js: &async_nats::jetstream::Context,
    nats: &pipeline::Nats,
    metrics: &Arc<Metrics>,
    sweep: &Arc<Boundary>,
    shutdown: &mut Shutdown,
) -> Result<(), Error> {
    let mut attempt = 0;
    // Logged once on becoming a standby, not on every poll.
    let mut standby = false;
    // The primary of the last session: a change is logged and counted.
    let mut primary = PrimaryWatch::default();
    loop {
        // Every session checks the stream: one deleted meanwhile is recreated.
        if !ensure_stream(js, config, shutdown).await {
            return Ok(());
        }
        let started = Instant::now();
        let error =
            match pipeline::run_session(config, nats, metrics, sweep, &mut primary, shutdown).await
            {
                Ok(drained) => {
                    tracing::info!(confirmed = %drained.confirmed, "stopped");
                    return Ok(());
                }
                Err(error) => error,
            };
        if error.action() == Action::Stop {
            return Err(error);
        }
        if started.elapsed() >= HEALTHY_SESSION {
            attempt = 0;
        }
        // A standby polls the slot at a steady pace so it takes over soon
        // after the active tailer dies; anything else backs off. Only the
        // server's own "slot in use" answer makes a standby: it proves
        // PostgreSQL reachable, so /readyz may say `standby`.
        let in_use = error.slot_in_use();
        metrics.tailer_standby.set(i64::from(in_use));
        if in_use {
            *metrics
                .standby_answered
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        let delay = if in_use {
            if !standby {
                tracing::info!(slot = %config.slot, "standby: another tailer holds the slot; waiting to take over");
            }
            standby = true;
            STANDBY_POLL
        } else {
            standby = false;
            let delay = Backoff::RECONNECT.delay(attempt);
            attempt += 1;
            tracing::warn!(%error, retry_in = ?delay, "replication session ended; reconnecting");
            delay
        };
        if sleep_or_shutdown(delay, shutdown).await {
            return Ok(());
        }
    }
}

/// `outbox-tailer requeue`: moves `failed` events back to `pending` (with a
/// fresh retry budget; `last_error` is kept for audit). The stream will not
/// deliver them again, so the sweeper publishes them.
pub async fn requeue(config: &Config, which: &RequeueArgs) -> Result<u64, Error> {
    const SET: &str =
        "UPDATE event_outbox SET status = 'pending', retry_count = 0, next_retry_at = now() \
                       WHERE status = 'failed'";
    let db = db::connect(config).await?;
    let count = if !which.ids.is_empty() {
        db.execute(&format!("{SET} AND id = ANY($1)"), &[&which.ids])
            .await?
    } else if let Some(event_type) = &which.event_type {
        db.execute(&format!("{SET} AND event_type = $1"), &[event_type])
            .await?
    } else {
        db.execute(SET, &[]).await?
    };
    Ok(count)
}

/// `outbox-tailer prune --older-than <duration>`: deletes published rows
/// published longer ago than that; returns how many.
pub async fn prune(config: &Config, older_than: Duration) -> Result<u64, Error> {
    let db = db::connect(config).await?;
    retention::prune(&db, older_than, &Metrics::new())
        .await
        .map_err(Error::Prune)
}

/// `--retention`: prunes every [`retention::interval`] until shutdown, on
/// its own connection (re-opened after an error). A failure is logged and
/// tried again at the next interval; retention never blocks publishing.
async fn run_retention(
    config: Config,
    retention: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let mut db: Option<tokio_postgres::Client> = None;
    loop {
        if sleep_or_shutdown(retention::interval(retention), &mut shutdown).await {
            return;
        }
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            db = db::connect(&config).await.ok();
        }
        let Some(client) = db.as_ref() else { continue };
        match retention::prune(client, retention, &metrics).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(pruned, older_than = ?retention, "pruned published events")
            }
            Err(error) => tracing::warn!(%error, "retention: prune failed; trying again later"),
        }
    }
}

/// How often the sweeper looks for pending rows the stream will not deliver.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The catch-up sweeper's loop, on its own connection (re-opened after an
/// error), until shutdown.
async fn run_sweeper(
    config: Config,
    mut sweeper: Sweeper,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let mut db = None;
    loop {
        if sleep_or_shutdown(SWEEP_INTERVAL, &mut shutdown).await {
            return;
        }
        if db
            .as_ref()
            .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
        {
            db = db::connect(&config).await.ok();
        }
        let Some(client) = db.as_mut() else { continue };
        match sweeper.sweep(client).await {
            Ok(swept) => {
                metrics.swept.inc_by(swept.published);
                metrics.publish_retries.inc_by(swept.retried);
                metrics.events_failed.inc_by(swept.dead);
                if swept != Swept::default() {
                    tracing::info!(
                        published = swept.published,
                        retried = swept.retried,
                        failed = swept.dead,
                        "sweeper published pending rows the stream will not deliver"
                    );
                }
            }
            Err(error) => {
                metrics.sweep_errors.inc();
                tracing::warn!(%error, "sweep failed; trying again");
                db = None;
            }
        }
    }
}

/// `outbox-tailer status`: the slot and the outbox, as text or one JSON object.
pub async fn status(config: &Config, json: bool) -> Result<String, Error> {
    let db = db::connect(config).await?;
    let stats = stats::query_full(&db, &config.slot).await?;
    if json {
        serde_json::to_string(&stats).map_err(|e| Internal::Json(e).into())
    } else {
        Ok(stats.to_text())
    }
}

/// Retries creating the stream until it exists (NATS may be down at start,
/// which is not fatal). False when shutdown came first.
async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: &Config,
    shutdown: &mut Shutdown,
) -> bool {
    let mut attempt = 0;
    loop {
        // A JetStream request waits up to its timeout while NATS is down:
        // shutdown must not wait for it.
        let Some(ensured) = shutdown.unless(jetstream::ensure_stream(js, config)).await else {
            return false;
        };
        match ensured {
            Ok(()) => return true,
            Err(error) => {
                let delay = Backoff::RECONNECT.delay(attempt);
                attempt += 1;
                tracing::warn!(%error, retry_in = ?delay, "JetStream not available yet");
                if sleep_or_shutdown(delay, shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// Sleeps for `delay`; true when shutdown came first.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut Shutdown) -> bool {
    shutdown.unless(tokio::time::sleep(delay)).await.is_none()
}
