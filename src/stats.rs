//! The outbox's and the slot's state, read from the database: for the
//! gauges (polled every `--stats-interval`, never per event) and for
//! `outbox-tailer status`. Every query stays cheap on a large table: counts
//! and the oldest pending row come from one index-only range scan of the
//! `(status, next_retry_at, created_at)` index over the pending (or failed)
//! rows; the last publish from one backward step of the same index.

use crate::config::Config;
use crate::db;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// Pending rows: their count and the oldest one's age.
pub const PENDING_SQL: &str =
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 \
     FROM event_outbox WHERE status = 'pending'";
pub const FAILED_SQL: &str = "SELECT count(*) FROM event_outbox WHERE status = 'failed'";
/// The slot, and who holds it: the walsender's backend and its client (the
/// client's address is visible to the slot's own role and to superusers).
const SLOT_SQL: &str = "SELECT s.active, (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint, s.confirmed_flush_lsn::text, \
            coalesce(s.wal_status, ''), s.active_pid, host(r.client_addr), r.client_port, r.application_name \
     FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
     WHERE s.slot_name = $1";
/// The most recently created published row (an approximation of the last
/// publish that needs no index on published_at).
const LAST_PUBLISHED_SQL: &str = "SELECT to_char(published_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
     FROM event_outbox WHERE status = 'published' ORDER BY next_retry_at DESC, created_at DESC LIMIT 1";

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct Stats {
    pub slot: String,
    /// None when the slot does not exist.
    pub slot_active: Option<bool>,
    pub lag_bytes: Option<i64>,
    pub confirmed_lsn: Option<String>,
    /// The server's view of the slot's WAL: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// Who streams from the slot, when someone does.
    pub slot_holder: Option<SlotHolder>,
    pub pending: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: f64,
    pub last_published_at: Option<String>,
}

/// The walsender that holds the slot, and its client.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct SlotHolder {
    /// The walsender's backend pid.
    pub pid: i32,
    /// The client's address; None over a Unix socket, or when the server
    /// hides it from this role.
    pub client_addr: Option<String>,
    pub client_port: Option<i32>,
    pub application_name: Option<String>,
}

impl SlotHolder {
    fn from_row(row: &tokio_postgres::Row) -> Option<SlotHolder> {
        Some(SlotHolder {
            pid: row.get::<_, Option<i32>>(4)?,
            client_addr: row.get(5),
            client_port: row.get(6),
            application_name: row.get(7),
        })
    }
}

impl std::fmt::Display for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "held by backend {}", self.pid)?;
        match (&self.client_addr, self.client_port) {
            (Some(addr), Some(port)) if port > 0 => write!(f, " for {addr} port {port}")?,
            (Some(addr), _) => write!(f, " for {addr}")?,
            // client_port is -1 over a Unix socket; NULL when hidden.
            (None, Some(-1)) => write!(f, " for a local (Unix socket) client")?,
            (None, _) => {}
        }
        match self.application_name.as_deref() {
            Some(name) if !name.is_empty() => write!(f, ", application {name}"),
            _ => Ok(()),
        }
    }
}

pub(crate) async fn query(db: &Client, slot: &str) -> Result<Stats, tokio_postgres::Error> {
    let slot_param: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    // One at a time, not pipelined: each answer then proves the connection
    // alive for the next, and a silent one is noticed (`db::watched`).
    let pending = db.query_one(PENDING_SQL, &[]).await?;
    let slot_row = db.query_opt(SLOT_SQL, &slot_param).await?;
    let failed = db.query_one(FAILED_SQL, &[]).await?;
    Ok(Stats {
        slot: slot.to_owned(),
        slot_active: slot_row.as_ref().map(|r| r.get(0)),
        lag_bytes: slot_row.as_ref().and_then(|r| r.get(1)),
        confirmed_lsn: slot_row.as_ref().and_then(|r| r.get(2)),
        wal_status: slot_row.as_ref().map(|r| r.get(3)),
        slot_holder: slot_row.as_ref().and_then(SlotHolder::from_row),
        pending: pending.get(0),
        failed: failed.get(0),
        oldest_pending_age_seconds: pending.get(1),
        last_published_at: None,
    })
}

/// [`query`] plus the last publish, for `status`.
pub(crate) async fn query_full(db: &Client, slot: &str) -> Result<Stats, tokio_postgres::Error> {
    let mut stats = query(db, slot).await?;
    stats.last_published_at = db
        .query_opt(LAST_PUBLISHED_SQL, &[])
        .await?
        .and_then(|r| r.get(0));
    Ok(stats)
}

impl Stats {
    pub(crate) fn to_text(&self) -> String {
        let slot = match self.slot_active {
            _ if self.wal_status.as_deref() == Some("lost") => {
                "INVALIDATED (wal_status lost): drop it; the tailer recreates it".to_owned()
            }
            None => "missing".to_owned(),
            Some(true) => match &self.slot_holder {
                Some(holder) => format!("active: {holder}"),
                None => "active".to_owned(),
            },
            Some(false) => "inactive (no tailer streams from it)".to_owned(),
        };
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "slot                {} ({slot})\n\
             confirmed position  {}\n\
             lag                 {} bytes\n\
             pending events      {}\n\
             failed events       {}\n\
             oldest pending age  {:.1} s\n\
             last published      {}\n",
            self.slot,
            or_dash(self.confirmed_lsn.clone()),
            or_dash(self.lag_bytes.map(|b| b.to_string())),
            self.pending,
            self.failed,
            self.oldest_pending_age_seconds,
            or_dash(self.last_published_at.clone()),
        )
    }

    /// Sets the gauges this poll feeds.
    fn record(&self, metrics: &Metrics) {
        metrics.pending_events.set(self.pending);
        metrics.failed_events.set(self.failed);
        metrics
            .oldest_pending_age_seconds
            .set(self.oldest_pending_age_seconds);
        metrics
            .slot_active
            .set(i64::from(self.slot_active == Some(true)));
        metrics
            .slot_missing
            .set(i64::from(self.slot_active.is_none()));
        metrics
            .slot_lost
            .set(i64::from(self.wal_status.as_deref() == Some("lost")));
        if let Some(lag) = self.lag_bytes {
            metrics.replication_lag_bytes.set(lag.max(0));
        }
    }
}

/// Polls [`query`] every `interval` into the gauges until shutdown, on its
/// own connection (re-opened after an error).
pub(crate) async fn poll(
    config: Config,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    let mut db: Option<Client> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.fired() => return,
            _ = tick.tick() => {}
        }
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            db = db::connect(&config).await.ok();
        }
        let Some(client) = db.as_ref() else {
            metrics.stats_poll_errors.inc();
            continue;
        };
        match query(client, &config.slot).await {
            Ok(stats) => stats.record(&metrics),
            Err(error) => {
                metrics.stats_poll_errors.inc();
                tracing::debug!(%error, "polling outbox statistics");
                db = None;
            }
        }
    }
}
