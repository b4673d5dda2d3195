//! The command line as clap parses it: the subcommands and every flag with
//! its environment variable (docs/contract.md section 2). Each flag's doc
//! comment is its `--help` text; [`super::Config`] validates the values.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox-tailer",
    version,
    about = "Publishes event_outbox inserts from a logical replication slot to NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub options: Options,
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tail the slot and publish until SIGTERM/SIGINT (creates a missing publication, slot and stream).
    Run,
    /// Check wal_level and create the publication, slot and stream if missing, then exit.
    Setup,
    /// Print slot lag, pending/failed counts and the oldest pending age, then exit.
    Status {
        /// One JSON object instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Move failed events back to pending so they are published again.
    Requeue(RequeueArgs),
    /// Exit 0 when /healthz on --metrics-addr answers 200 (container health checks; needs no shell).
    Healthcheck,
    /// Publish `published` events again, as first published plus Outbox-Republished: true (after the stream lost them); a selector is required.
    Republish(RepublishArgs),
    /// Delete published rows published longer ago than --older-than, in small batches (never pending or failed rows).
    Prune {
        /// e.g. 7d, 12h, 30m.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
}

/// What `republish` selects: `published` rows, every given selector
/// together (at least one is required).
#[derive(Debug, Clone, Args)]
pub struct RepublishArgs {
    /// From this time on: RFC 3339 (2026-12-07T10:00:00Z), or a duration back from now (2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Before this time: RFC 3339, or a duration back from now.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only this aggregate type.
    #[arg(long, value_name = "TYPE")]
    pub aggregate_type: Option<String>,
    /// Only this aggregate.
    #[arg(long, value_name = "ID")]
    pub aggregate_id: Option<String>,
    /// Only this event type.
    #[arg(long, value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Only these event ids (with --id alone, at any time).
    #[arg(long = "id", value_name = "UUID", num_args = 1..)]
    pub ids: Vec<Uuid>,
    /// Say how many events would go; publish nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many events a second, so live consumers are not starved (0: no limit).
    #[arg(long, value_name = "EVENTS", default_value_t = 0)]
    pub rate: u64,
}

impl RepublishArgs {
    /// Whether any selector is given (`--dry-run` and `--rate` are not).
    pub fn selects(&self) -> bool {
        self.since.is_some()
            || self.until.is_some()
            || self.aggregate_type.is_some()
            || self.aggregate_id.is_some()
            || self.event_type.is_some()
            || !self.ids.is_empty()
    }
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RequeueArgs {
    /// Requeue these event ids.
    #[arg(long = "id", value_name = "UUID", num_args = 1..)]
    pub ids: Vec<Uuid>,
    /// Requeue every failed event of this event type.
    #[arg(long, value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Requeue every failed event.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The raw flags, as clap parses them. [`Config::from_options`] validates them.
/// No `Debug`: it would print secrets; the validated [`Config`] redacts them.
#[derive(Args, Clone)]
pub struct Options {
    /// PostgreSQL URL (libpq form, postgresql://user:pass@host:port/db?sslmode=verify-full&sslrootcert=ca.pem) of a role with REPLICATION; or DATABASE_URL_FILE.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS server URL(s), comma-separated; tls:// requires TLS.
    #[arg(
        long,
        env = "NATS_URL",
        global = true,
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// NATS user, with --nats-password (also accepted as nats://user:pass@host).
    #[arg(long, env = "NATS_USER", global = true)]
    pub nats_user: Option<String>,
    /// NATS password; or NATS_PASSWORD_FILE.
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token (also accepted as nats://token@host); or NATS_TOKEN_FILE.
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub nats_token: Option<String>,
    /// Path of a NATS .creds file (user JWT and nkey seed).
    #[arg(long, env = "NATS_CREDS", global = true, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// Path of a file holding an nkey seed.
    #[arg(long, env = "NATS_NKEY", global = true, value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM file of CAs to trust for NATS (default: the system's); implies TLS.
    #[arg(long, env = "NATS_CA", global = true, value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS to NATS, with --nats-tls-key.
    #[arg(long, env = "NATS_CERT", global = true, value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "NATS_KEY", global = true, value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
    /// Logical replication slot (pgoutput), created if missing.
    #[arg(
        long,
        env = "OUTBOX_SLOT",
        global = true,
        default_value = "event_outbox_tailer"
    )]
    pub slot: String,
    /// Create the slot with failover = true (PostgreSQL 17+), so that standbys with sync_replication_slots = on keep a copy a promoted standby can stream from.
    #[arg(long, env = "OUTBOX_SLOT_FAILOVER", global = true)]
    pub slot_failover: bool,
    /// Insert-only publication on event_outbox.
    #[arg(
        long,
        env = "OUTBOX_PUBLICATION",
        global = true,
        default_value = "event_outbox_pub"
    )]
    pub publication: String,
    /// JetStream stream, created if missing with subjects `<subject-prefix>.>`.
    #[arg(long, env = "OUTBOX_STREAM", global = true, default_value = "EVENTS")]
    pub stream: String,
    /// Replicas of a stream the tailer creates (1-5; 3 on a cluster). An existing stream keeps its own.
    #[arg(
        long,
        env = "OUTBOX_STREAM_REPLICAS",
        global = true,
        value_name = "N",
        default_value_t = 1
    )]
    pub stream_replicas: u32,
    /// First subject token: events go to `<prefix>.<aggregate_type>.<event_type>`.
    #[arg(
        long,
        env = "OUTBOX_SUBJECT_PREFIX",
        global = true,
        default_value = "events"
    )]
    pub subject_prefix: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "METRICS_ADDR",
        global = true,
        default_value = "0.0.0.0:9599"
    )]
    pub metrics_addr: String,
    /// Failures specific to an event before it becomes `failed`.
    #[arg(long, env = "OUTBOX_MAX_RETRIES", global = true, default_value_t = 10)]
    pub max_retries: u32,
    /// Project published events into event_logs.
    #[arg(long, env = "OUTBOX_EVENT_LOGS", global = true)]
    pub event_logs: bool,
    /// Seconds between polls of the outbox statistics (pending, failed, lag) for the gauges.
    #[arg(
        long,
        env = "OUTBOX_STATS_INTERVAL",
        global = true,
        default_value_t = 10.0
    )]
    pub stats_interval: f64,
    /// Seconds a pending row must be older than the stream's confirmed horizon before the sweeper publishes it.
    #[arg(
        long,
        env = "OUTBOX_SWEEP_MIN_AGE",
        global = true,
        default_value_t = 60.0
    )]
    pub sweep_min_age: f64,
    /// Seconds the replication connection may stay silent before it counts as dead and a new session starts; also the session's wal_sender_timeout (the server pings at half of it).
    #[arg(
        long,
        env = "OUTBOX_REPLICATION_TIMEOUT",
        global = true,
        default_value_t = 20.0
    )]
    pub replication_timeout: f64,
    /// Seconds a PostgreSQL query connection may leave a request unanswered before it counts as dead (the session, sweep or poll on it starts again).
    #[arg(
        long,
        env = "OUTBOX_STATEMENT_TIMEOUT",
        global = true,
        default_value_t = 30.0
    )]
    pub statement_timeout: f64,
    /// Payload bytes held in memory at once, decoded and not yet acked (e.g. 64MiB); one larger event still goes alone.
    #[arg(
        long,
        env = "OUTBOX_MAX_IN_FLIGHT_BYTES",
        global = true,
        value_name = "BYTES",
        default_value = "64MiB"
    )]
    pub max_in_flight_bytes: String,
    /// While running, delete published rows older than this (e.g. 7d); off by default.
    #[arg(long, env = "OUTBOX_RETENTION", global = true, value_name = "DURATION")]
    pub retention: Option<String>,
    /// Log lines as text or as one JSON object a line.
    #[arg(
        long,
        env = "LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}
