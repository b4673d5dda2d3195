//! Every metric the tailer exports, in one place (docs/contract.md section 4 and
//! what an operator needs beyond it). Names follow Prometheus conventions;
//! labels come from small, fixed sets: the only data-derived label,
//! `aggregate_type`, is capped at [`MAX_AGGREGATE_TYPES`] values (then `_other`).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;

/// Distinct `aggregate_type` label values kept before the rest become `_other`.
pub(crate) const MAX_AGGREGATE_TYPES: usize = 64;

pub(crate) struct Metrics {
    registry: Registry,
    /// Events stored in JetStream (a de-duplicated repeat is not counted).
    published: IntCounterVec,
    published_by_type: Mutex<HashMap<String, IntCounter>>,
    pub publish_retries: IntCounter,
    pub events_failed: IntCounter,
    pub duplicates: IntCounter,
    pub resent: IntCounter,
    pub replication_lag_bytes: IntGauge,
    pub replication_lag_seconds: Gauge,
    pub pending_events: IntGauge,
    pub failed_events: IntGauge,
    pub oldest_pending_age_seconds: Gauge,
    pub publish_latency: Histogram,
    pub replication_connected: IntGauge,
    pub nats_connected: IntGauge,
    /// 1 while this instance streams from the slot: its role is `active`.
    pub tailer_active: IntGauge,
    /// 1 while this instance stands by: another one holds the slot, and
    /// PostgreSQL answered this one's last attempt to take it.
    pub tailer_standby: IntGauge,
    /// When PostgreSQL last said the slot is held by another (not exported):
    /// /readyz counts a standby ready only while that is recent.
    pub standby_answered: Mutex<Option<std::time::Instant>>,
    /// 1 while publishing stalls on a stream or account limit (stream full
    /// with discard `new`, storage exhausted): /readyz says so.
    pub stream_limit_reached: IntGauge,
    /// Published rows deleted by retention (`prune`, `--retention`).
    pub pruned: IntCounter,
    /// Mark batches that waited for rows whose transaction was not visible yet.
    pub mark_invisible_waits: IntCounter,
    /// Background tasks that ended before shutdown (the process then exits).
    pub task_failures: IntCounter,
    pub slot_active: IntGauge,
    pub in_flight: IntGauge,
    pub mark_batch_size: Histogram,
    pub mark_retries: IntCounter,
    pub marked_vanished: IntCounter,
    pub replay_skipped: IntCounter,
    pub sessions: IntCounter,
    pub session_failures: IntCounter,
    pub primary_changes: IntCounter,
    pub confirmed_lsn: IntGauge,
    pub last_publish_timestamp: Gauge,
    pub stats_poll_errors: IntCounter,
    pub swept: IntCounter,
    pub slot_missing: IntGauge,
    pub slot_lost: IntGauge,
    pub sweep_errors: IntCounter,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let published = IntCounterVec::new(
            Opts::new(
                "outbox_events_published_total",
                "Events stored in JetStream, by aggregate type.",
            ),
            &["aggregate_type"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(published.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "outbox_build_info",
                "Always 1; labels say which build runs.",
            ),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        Metrics {
            published,
            published_by_type: Mutex::new(HashMap::new()),
            publish_retries: counter("outbox_publish_retries_total", "Publishes that failed and will be retried."),
            events_failed: counter("outbox_events_failed_total", "Events that became `failed` (dead letters)."),
            duplicates: counter("outbox_duplicates_total", "Re-deliveries JetStream dropped as duplicates (Nats-Msg-Id)."),
            resent: counter(
                "outbox_publish_resent_total",
                "Publishes sent again because one before them failed (or another publisher wrote to the stream), to keep commit order.",
            ),
            replication_lag_bytes: int_gauge(
                "outbox_replication_lag_bytes",
                "Server WAL position minus the slot's confirmed position.",
            ),
            replication_lag_seconds: gauge(
                "outbox_replication_lag_seconds",
                "Age of the oldest received commit not yet acknowledged to the server; 0 when caught up.",
            ),
            pending_events: int_gauge("outbox_pending_events", "Rows with status pending."),
            failed_events: int_gauge("outbox_failed_events", "Rows with status failed."),
            oldest_pending_age_seconds: gauge(
                "outbox_oldest_pending_age_seconds",
                "Age of the oldest pending row (0 when none).",
            ),
            publish_latency: histogram(
                "outbox_publish_latency_seconds",
                "From the transaction's commit to the JetStream ack.",
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            replication_connected: int_gauge("outbox_replication_connected", "1 while the replication stream is open."),
            nats_connected: int_gauge("outbox_nats_connected", "1 while connected to NATS."),
            tailer_active: int_gauge("outbox_tailer_active", "1 while this instance streams from the slot (its role is active)."),
            standby_answered: Mutex::new(None),
            tailer_standby: int_gauge(
                "outbox_tailer_standby",
                "1 while this instance stands by: another instance holds the slot and PostgreSQL answers this one.",
            ),
            mark_invisible_waits: counter(
                "outbox_mark_invisible_waits_total",
                "Mark batches that waited for rows whose transaction was decoded but not yet visible (e.g. a stalled synchronous standby).",
            ),
            task_failures: counter(
                "outbox_task_failures_total",
                "Background tasks (sweeper, statistics, retention) that ended before shutdown; the process exits after one.",
            ),
            pruned: counter(
                "outbox_pruned_events_total",
                "Published rows deleted by retention (prune, --retention).",
            ),
            stream_limit_reached: int_gauge(
                "outbox_stream_limit_reached",
                "1 while publishing stalls on a stream or account limit (stream full, storage exhausted).",
            ),
            slot_active: int_gauge("outbox_slot_active", "1 while some walsender holds the slot (this tailer or another)."),
            in_flight: int_gauge("outbox_publish_in_flight", "Publishes sent and not yet acknowledged."),
            mark_batch_size: histogram(
                "outbox_mark_batch_size",
                "Rows per status UPDATE.",
                vec![1.0, 4.0, 16.0, 64.0, 256.0, 1000.0, 2000.0],
            ),
            mark_retries: counter(
                "outbox_mark_retries_total",
                "Status UPDATEs repeated for rows not yet visible (the decode/visibility gap).",
            ),
            marked_vanished: counter(
                "outbox_marked_vanished_total",
                "Published events whose rows no longer existed to be marked.",
            ),
            replay_skipped: counter(
                "outbox_replay_skipped_total",
                "Re-delivered events not published again (already published, or deleted).",
            ),
            sessions: counter("outbox_replication_sessions_total", "Replication sessions started."),
            primary_changes: counter(
                "outbox_primary_changes_total",
                "Sessions that found another PostgreSQL primary than the last session (a new timeline or system identifier).",
            ),
            session_failures: counter("outbox_replication_session_failures_total", "Sessions that ended in an error."),
            confirmed_lsn: int_gauge("outbox_confirmed_lsn", "The last position confirmed to the server, as a number."),
            last_publish_timestamp: gauge(
                "outbox_last_publish_timestamp_seconds",
                "Unix time of the last JetStream ack.",
            ),
            stats_poll_errors: counter("outbox_stats_poll_errors_total", "Failed polls of the outbox statistics."),
            swept: counter(
                "outbox_sweeper_published_total",
                "Pending rows the catch-up sweeper published (rows the stream will not deliver).",
            ),
            slot_missing: int_gauge("outbox_slot_missing", "1 while the replication slot does not exist (polled)."),
            slot_lost: int_gauge(
                "outbox_slot_lost",
                "1 while the server has invalidated the slot (wal_status lost, e.g. max_slot_wal_keep_size).",
            ),
            sweep_errors: counter("outbox_sweeper_errors_total", "Sweeps that failed (retried at the next interval)."),
            registry,
        }
    }

    /// The published counter for an aggregate type (sanitised, capped).
    pub(crate) fn published(&self, aggregate_type: &str) -> IntCounter {
        let mut by_type = self
            .published_by_type
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = by_type.get(aggregate_type) {
            return counter.clone();
        }
        let label = if by_type.len() >= MAX_AGGREGATE_TYPES {
            "_other".to_owned()
        } else {
            label_value(aggregate_type)
        };
        let counter = self.published.with_label_values(&[&label]);
        if by_type.len() < MAX_AGGREGATE_TYPES {
            by_type.insert(aggregate_type.to_owned(), counter.clone());
        }
        counter
    }

    /// The text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A label value that stays short and printable, whatever the row held.
fn label_value(text: &str) -> String {
    let clean: String = text
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "_".to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_metrics() {
        let metrics = Metrics::new();
        metrics.published("chat").inc();
        metrics.publish_latency.observe(0.002);
        let text = metrics.render();
        for name in [
            "outbox_events_published_total{aggregate_type=\"chat\"} 1",
            "outbox_publish_retries_total 0",
            "outbox_events_failed_total 0",
            "outbox_replication_lag_bytes 0",
            "outbox_replication_lag_seconds 0",
            "outbox_pending_events 0",
            "outbox_failed_events 0",
            "outbox_oldest_pending_age_seconds 0",
            "outbox_publish_latency_seconds_bucket",
            "outbox_replication_connected 0",
            "outbox_nats_connected 0",
            "outbox_tailer_active 0",
            "outbox_tailer_standby 0",
            "outbox_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn aggregate_type_labels_are_bounded_and_clean() {
        let metrics = Metrics::new();
        for i in 0..200 {
            metrics.published(&format!("type {i} *")).inc();
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("outbox_events_published_total{"))
            .count();
        assert_eq!(series, MAX_AGGREGATE_TYPES + 1, "64 types and _other");
        assert!(text.contains("aggregate_type=\"type_0__\""));
        assert!(text.contains("aggregate_type=\"_other\"} 136"));
    }
}
