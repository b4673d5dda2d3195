//! The command line and environment (docs/contract.md section 2) and their
//! validation into one [`Config`]. Every flag has an environment variable and
//! flags win; flags may stand before or after the subcommand.

use crate::tls::postgres::{split_tls_params, PgTls};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
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
    /// Delete published rows published longer ago than --older-than, in small batches (never pending or failed rows).
    Prune {
        /// e.g. 7d, 12h, 30m.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
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

/// A flag value that cannot work; the message says which and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--database-url (or DATABASE_URL) is required, e.g. postgresql://outbox_tailer@127.0.0.1:5432/chat")]
    MissingDatabaseUrl,
    #[error("--database-url {url} is malformed: {reason}")]
    MalformedDatabaseUrl { url: String, reason: String },
    #[error("--nats-url {url} is malformed: expected nats://host:port (or tls://, several separated by commas)")]
    MalformedNatsUrl { url: String },
    #[error("--{flag} {value:?} is not a valid name: use 1-63 characters of a-z, 0-9 and _")]
    BadIdentifier { flag: &'static str, value: String },
    #[error("--stream {0:?} is not a valid JetStream stream name: use letters, digits, - and _")]
    BadStream(String),
    #[error("--stream-replicas {0} is not between 1 and 5 (JetStream's limit; 3 on a three-node cluster)")]
    BadStreamReplicas(u32),
    #[error(
        "--subject-prefix {0:?} is not valid: use dot-separated tokens of letters, digits, - and _"
    )]
    BadSubjectPrefix(String),
    #[error("--metrics-addr {0:?} is not a socket address such as 0.0.0.0:9599")]
    BadMetricsAddr(String),
    #[error("--stats-interval {0} is not a number of seconds between 0.1 and 3600")]
    BadStatsInterval(f64),
    #[error("--sweep-min-age {0} is not a number of seconds between 0 and 86400")]
    BadSweepMinAge(f64),
    #[error("--{flag} {value} is not a number of seconds between 2 and 3600")]
    BadTimeout { flag: &'static str, value: f64 },
    #[error("--database-url: {0}")]
    DatabaseTls(String),
    #[error("cannot read {var} {path}: {reason}")]
    SecretFile {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error("give one NATS credential: --nats-user with --nats-password, --nats-token, --nats-creds or --nats-nkey (given: {0})")]
    NatsCredentials(String),
    #[error("--nats-tls-cert and --nats-tls-key go together: give both, or neither")]
    NatsClientCert,
    #[error("--{flag} {value:?} is not a duration such as 7d, 12h or 30m")]
    BadDuration { flag: &'static str, value: String },
    #[error("--max-in-flight-bytes {0:?} is not a size between 1MiB and 4GiB such as 64MiB")]
    BadSize(String),
}

/// How the tailer authenticates to NATS. Its `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum NatsAuth {
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file: the user's JWT and nkey seed.
    Creds(PathBuf),
    /// A file holding an nkey seed.
    Nkey(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::Creds(path) => write!(f, "Creds({})", path.display()),
            NatsAuth::Nkey(path) => write!(f, "Nkey({})", path.display()),
        }
    }
}

/// TLS to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NatsTls {
    /// A `tls://` URL or any TLS flag: plaintext is refused.
    pub(crate) required: bool,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

/// Servers and credentials from `--nats-url` and the `--nats-*` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatsConfig {
    /// Seed URLs without credentials (the client ignores embedded ones).
    pub(crate) servers: Vec<String>,
    pub(crate) auth: NatsAuth,
    pub(crate) tls: NatsTls,
}

/// The validated configuration. Its `Debug` never shows passwords.
#[derive(Clone)]
pub struct Config {
    /// Parsed as libpq would (TLS parameters taken out into `pg_tls`); the
    /// original text is kept for messages (redacted).
    pub database: tokio_postgres::Config,
    pub database_url: String,
    pub(crate) pg_tls: PgTls,
    pub nats_url: String,
    pub(crate) nats: NatsConfig,
    pub slot: String,
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub slot_failover: bool,
    pub publication: String,
    pub stream: String,
    /// Replicas of the stream when the tailer creates it (1..=5).
    pub stream_replicas: usize,
    pub subject_prefix: String,
    pub metrics_addr: SocketAddr,
    pub max_retries: u32,
    pub event_logs: bool,
    pub stats_interval: std::time::Duration,
    pub sweep_min_age: std::time::Duration,
    /// Silence on the replication connection that ends the session.
    pub(crate) replication_timeout: std::time::Duration,
    /// An unanswered request on a query connection that ends it.
    pub(crate) statement_timeout: std::time::Duration,
    /// Payload bytes held in memory at once (the byte budget).
    pub(crate) max_in_flight_bytes: usize,
    /// Published rows older than this are pruned while running (None: kept).
    pub(crate) retention: Option<std::time::Duration>,
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("pg_tls", &self.pg_tls)
            .field("nats_url", &redact_url(&self.nats_url))
            .field("nats", &self.nats)
            .field("slot", &self.slot)
            .field("slot_failover", &self.slot_failover)
            .field("publication", &self.publication)
            .field("stream", &self.stream)
            .field("stream_replicas", &self.stream_replicas)
            .field("subject_prefix", &self.subject_prefix)
            .field("metrics_addr", &self.metrics_addr)
            .field("max_retries", &self.max_retries)
            .field("event_logs", &self.event_logs)
            .field("stats_interval", &self.stats_interval)
            .field("sweep_min_age", &self.sweep_min_age)
            .field("replication_timeout", &self.replication_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("retention", &self.retention)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl Config {
    pub fn from_options(options: &Options) -> Result<Config, ConfigError> {
        Config::from_options_and_env(options, |name| std::env::var(name).ok())
    }

    /// As [`Config::from_options`], with the environment given (for the
    /// `*_FILE` secret variables).
    fn from_options_and_env(
        options: &Options,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let database_url = secret(options.database_url.clone(), "DATABASE_URL_FILE", &env)?
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingDatabaseUrl)?;
        let (libpq_rest, pg_tls) =
            split_tls_params(&database_url).map_err(ConfigError::DatabaseTls)?;
        let mut database = parse_database_url(&libpq_rest).map_err(|error| match error {
            ConfigError::MalformedDatabaseUrl { reason, .. } => ConfigError::MalformedDatabaseUrl {
                url: redact_url(&database_url),
                reason,
            },
            other => other,
        })?;
        database.ssl_mode(pg_tls.mode.for_tokio_postgres());
        if !valid_nats_url(&options.nats_url) {
            return Err(ConfigError::MalformedNatsUrl {
                url: redact_url(&options.nats_url),
            });
        }
        for (flag, value) in [
            ("slot", &options.slot),
            ("publication", &options.publication),
        ] {
            if !valid_identifier(value) {
                return Err(ConfigError::BadIdentifier {
                    flag,
                    value: value.clone(),
                });
            }
        }
        if !valid_token(&options.stream) {
            return Err(ConfigError::BadStream(options.stream.clone()));
        }
        if !(1..=5).contains(&options.stream_replicas) {
            return Err(ConfigError::BadStreamReplicas(options.stream_replicas));
        }
        if !options.subject_prefix.split('.').all(valid_token) {
            return Err(ConfigError::BadSubjectPrefix(
                options.subject_prefix.clone(),
            ));
        }
        if !(0.0..=86400.0).contains(&options.sweep_min_age) {
            return Err(ConfigError::BadSweepMinAge(options.sweep_min_age));
        }
        if !(0.1..=3600.0).contains(&options.stats_interval) {
            return Err(ConfigError::BadStatsInterval(options.stats_interval));
        }
        for (flag, value) in [
            ("replication-timeout", options.replication_timeout),
            ("statement-timeout", options.statement_timeout),
        ] {
            if !(2.0..=3600.0).contains(&value) {
                return Err(ConfigError::BadTimeout { flag, value });
            }
        }
        let metrics_addr = options
            .metrics_addr
            .parse()
            .map_err(|_| ConfigError::BadMetricsAddr(options.metrics_addr.clone()))?;
        let nats = nats_config(options, &env)?;
        let retention = options
            .retention
            .as_deref()
            .filter(|r| !r.is_empty() && *r != "off")
            .map(|r| parse_duration("retention", r))
            .transpose()?;
        let max_in_flight_bytes = parse_size(&options.max_in_flight_bytes)
            .filter(|n| (1 << 20..=1 << 32).contains(n))
            .ok_or_else(|| ConfigError::BadSize(options.max_in_flight_bytes.clone()))?;
        Ok(Config {
            max_in_flight_bytes,
            retention,
            database,
            database_url,
            pg_tls,
            nats_url: options.nats_url.clone(),
            nats,
            slot: options.slot.clone(),
            slot_failover: options.slot_failover,
            publication: options.publication.clone(),
            stream: options.stream.clone(),
            stream_replicas: options.stream_replicas as usize,
            subject_prefix: options.subject_prefix.clone(),
            metrics_addr,
            max_retries: options.max_retries,
            event_logs: options.event_logs,
            stats_interval: std::time::Duration::from_secs_f64(options.stats_interval),
            sweep_min_age: std::time::Duration::from_secs_f64(options.sweep_min_age),
            replication_timeout: std::time::Duration::from_secs_f64(options.replication_timeout),
            statement_timeout: std::time::Duration::from_secs_f64(options.statement_timeout),
            log_format: options.log_format,
        })
    }
}

/// A secret from its flag or variable, else from the file `file_var` names
/// (the container convention), without its trailing newline.
fn secret(
    value: Option<String>,
    file_var: &'static str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    if value.as_deref().is_some_and(|v| !v.is_empty()) {
        return Ok(value);
    }
    let Some(path) = env(file_var).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::SecretFile {
        var: file_var,
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(Some(text.strip_suffix('\r').unwrap_or(text).to_owned()))
}

/// Seed servers, one credential and TLS for NATS. Credentials in the URL
/// count only when no flag gives one.
fn nats_config(
    options: &Options,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<NatsConfig, ConfigError> {
    let password = secret(options.nats_password.clone(), "NATS_PASSWORD_FILE", env)?;
    let token = secret(options.nats_token.clone(), "NATS_TOKEN_FILE", env)?;
    let mut given = Vec::new();
    let mut auth = NatsAuth::None;
    if options.nats_user.is_some() || password.is_some() {
        given.push("user/password");
        auth = NatsAuth::UserPassword {
            user: options.nats_user.clone().unwrap_or_default(),
            password: password.unwrap_or_default(),
        };
    }
    if let Some(token) = token {
        given.push("token");
        auth = NatsAuth::Token(token);
    }
    if let Some(path) = &options.nats_creds {
        given.push("creds");
        auth = NatsAuth::Creds(path.clone());
    }
    if let Some(path) = &options.nats_nkey {
        given.push("nkey");
        auth = NatsAuth::Nkey(path.clone());
    }
    if given.len() > 1 {
        return Err(ConfigError::NatsCredentials(given.join(", ")));
    }
    let mut servers = Vec::new();
    let mut tls_url = false;
    for server in options
        .nats_url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (scheme, rest) = server.split_once("://").unwrap_or(("nats", server));
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, rest),
        };
        if given.is_empty() {
            match userinfo.map(|u| u.split_once(':')) {
                Some(Some((user, password))) => {
                    auth = NatsAuth::UserPassword {
                        user: user.to_owned(),
                        password: password.to_owned(),
                    }
                }
                Some(None) => auth = NatsAuth::Token(userinfo.unwrap_or_default().to_owned()),
                None => {}
            }
        }
        tls_url |= scheme == "tls";
        servers.push(format!("{scheme}://{host}"));
    }
    let client_cert = match (&options.nats_tls_cert, &options.nats_tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => return Err(ConfigError::NatsClientCert),
    };
    let tls = NatsTls {
        required: tls_url || options.nats_tls_ca.is_some() || client_cert.is_some(),
        ca: options.nats_tls_ca.clone(),
        client_cert,
    };
    Ok(NatsConfig { servers, auth, tls })
}

/// Bytes as people write them: `67108864`, `64MiB`, `64M` (binary units).
fn parse_size(value: &str) -> Option<usize> {
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    number.parse::<usize>().ok()?.checked_mul(scale)
}

/// A positive duration as people write it: `7d`, `12h`, `30m`, `1h 30m`.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<std::time::Duration, ConfigError> {
    humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::BadDuration {
            flag,
            value: value.to_owned(),
        })
}

/// Parses a libpq URL or key=value string; the error never echoes a password.
pub fn parse_database_url(url: &str) -> Result<tokio_postgres::Config, ConfigError> {
    let malformed = |reason: String| ConfigError::MalformedDatabaseUrl {
        url: redact_url(url),
        reason,
    };
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://") || url.contains('=')) {
        return Err(malformed(
            "expected postgresql://user:password@host:port/database".into(),
        ));
    }
    let config = tokio_postgres::Config::from_str(url).map_err(|e| malformed(e.to_string()))?;
    if config.get_hosts().is_empty() {
        return Err(malformed("no host given".into()));
    }
    if config.get_user().is_none() {
        return Err(malformed("no user given".into()));
    }
    Ok(config)
}

/// Replication slot and publication names go into replication commands
/// unquoted, so they are held to what needs no quoting.
fn valid_identifier(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// A NATS subject token (or stream name) that needs no sanitising.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_nats_url(url: &str) -> bool {
    url.split(',').all(|one| {
        let one = one.trim();
        let rest = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .find_map(|scheme| one.strip_prefix(scheme))
            .unwrap_or(one);
        let host_port = rest.rsplit('@').next().unwrap_or(rest);
        !host_port.is_empty()
            && !host_port.contains('/')
            && !host_port.contains(char::is_whitespace)
    })
}

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`, and
/// `password=secret` → `password=***`, for anything that gets printed. Each
/// of several comma-separated servers is redacted on its own; credentials run
/// to the last `@` (a password may hold `/`, `?` or `:`); a quoted
/// `password='a b'` is redacted whole.
pub fn redact_url(url: &str) -> String {
    let mut out: String = url
        .split(',')
        .map(redact_userinfo)
        .collect::<Vec<_>>()
        .join(",");
    let mut from = 0;
    while let Some(found) = out[from..].find("password=") {
        let value_start = from + found + "password=".len();
        let rest = &out[value_start..];
        let value_len = match rest.strip_prefix('\'') {
            Some(quoted) => quoted.find('\'').map_or(rest.len(), |end| end + 2),
            None => rest.find(['&', ' ']).unwrap_or(rest.len()),
        };
        out.replace_range(value_start..value_start + value_len, "***");
        from = value_start + 3;
    }
    out
}

/// The userinfo of one `scheme://userinfo@host…`, redacted.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let Some(at) = url[start..].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &url[start..start + at];
    let redacted = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        // A lone token (nats://token@host) is a secret too.
        None if url.starts_with("nats") || url.starts_with("tls") => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    format!("{}{redacted}{}", &url[..start], &url[start + at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("outbox-tailer").chain(args.iter().copied()))
    }

    fn config_with(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec!["--database-url", "postgresql://u@h/db"];
        all.extend_from_slice(args);
        let cli = options(&all).unwrap();
        Config::from_options_and_env(&cli.options, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn nats_credentials_come_out_of_the_url_unless_a_flag_gives_one() {
        let config = config_with(
            &[
                "--nats-url",
                "nats://alice:s3cret@10.0.0.1:4222, nats://10.0.0.2:4222",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            config.nats.servers,
            ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
        );
        assert_eq!(
            config.nats.auth,
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: "s3cret".into()
            }
        );
        assert!(!config.nats.tls.required);
        let config = config_with(&["--nats-url", "tls://t0ken@nats.internal:4222"], &[]).unwrap();
        assert_eq!(config.nats.servers, ["tls://nats.internal:4222"]);
        assert_eq!(config.nats.auth, NatsAuth::Token("t0ken".into()));
        assert!(config.nats.tls.required, "tls:// requires TLS");
        let config = config_with(
            &[
                "--nats-url",
                "nats://old@h:4222",
                "--nats-nkey",
                "/run/secrets/seed",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.nats.auth, NatsAuth::Nkey("/run/secrets/seed".into()));
        assert_eq!(
            config_with(&["--nats-url", "127.0.0.1:4222"], &[])
                .unwrap()
                .nats
                .servers,
            ["nats://127.0.0.1:4222"]
        );
    }

    #[test]
    fn one_nats_credential_at_a_time_and_a_client_cert_with_its_key() {
        let error =
            config_with(&["--nats-token", "t", "--nats-creds", "/c.creds"], &[]).unwrap_err();
        assert!(error.to_string().contains("given: token, creds"), "{error}");
        let error = config_with(&["--nats-tls-cert", "/c.pem"], &[]).unwrap_err();
        assert!(matches!(error, ConfigError::NatsClientCert), "{error}");
        let config = config_with(&["--nats-tls-ca", "/ca.pem"], &[]).unwrap();
        assert!(config.nats.tls.required, "a CA implies TLS");
    }

    #[test]
    fn secrets_come_from_files_without_their_newline() {
        let dir = std::env::temp_dir().join(format!("secret-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("password");
        std::fs::write(&password, "pa55word\n").unwrap();
        let url = dir.join("url");
        std::fs::write(&url, "postgresql://u:pw@db:5433/chat\n").unwrap();
        let cli = options(&["--nats-user", "alice"]).unwrap();
        let config = Config::from_options_and_env(&cli.options, |name| match name {
            "DATABASE_URL_FILE" => Some(url.display().to_string()),
            "NATS_PASSWORD_FILE" => Some(password.display().to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.database.get_ports(), [5433]);
        assert_eq!(
            config.nats.auth,
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: "pa55word".into()
            }
        );
        let error = config_with(&[], &[("NATS_TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot read NATS_TOKEN_FILE /nonexistent/token"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn libpq_tls_parameters_reach_both_connections() {
        let cli = options(&[
            "--database-url",
            "postgresql://u@db/chat?sslmode=verify-full&sslrootcert=/ca.pem",
        ])
        .unwrap();
        let config = Config::from_options(&cli.options).unwrap();
        assert_eq!(
            config.pg_tls.mode,
            crate::tls::postgres::SslMode::VerifyFull
        );
        assert_eq!(
            config.database.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let cli = options(&["--database-url", "postgresql://u@db/chat?sslmode=sometimes"]).unwrap();
        let error = Config::from_options(&cli.options).unwrap_err().to_string();
        assert!(
            error.starts_with("--database-url: sslmode=sometimes"),
            "{error}"
        );
    }

    #[test]
    fn the_byte_budget_takes_sizes_as_people_write_them() {
        assert_eq!(config_with(&[], &[]).unwrap().max_in_flight_bytes, 64 << 20);
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("lots"), None);
        for bad in ["12", "8GiB", "64 parsecs"] {
            let error = config_with(&["--max-in-flight-bytes", bad], &[])
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("--max-in-flight-bytes"), "{error}");
        }
    }

    #[test]
    fn retention_takes_durations_as_people_write_them() {
        let config = config_with(&["--retention", "7d"], &[]).unwrap();
        assert_eq!(
            config.retention,
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        assert_eq!(config_with(&[], &[]).unwrap().retention, None);
        assert_eq!(
            config_with(&["--retention", "off"], &[]).unwrap().retention,
            None
        );
        assert_eq!(
            parse_duration("older-than", "1h 30m").unwrap().as_secs(),
            5400
        );
        for bad in ["7", "soon", "0s", "-1d"] {
            let error = parse_duration("older-than", bad).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("--older-than {bad:?} is not a duration")),
                "{error}"
            );
        }
    }

    #[test]
    fn debug_never_shows_nats_secrets() {
        for args in [
            &["--nats-password", "pw-s3cret", "--nats-user", "u"][..],
            &["--nats-token", "tok-s3cret"],
        ] {
            let text = format!("{:?}", config_with(args, &[]).unwrap());
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn redacts_passwords_and_tokens() {
        assert_eq!(
            redact_url("postgresql://u:s3cret@h:5432/db"),
            "postgresql://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("postgresql://u@h/db?password=s3cret&x=1"),
            "postgresql://u@h/db?password=***&x=1"
        );
        assert_eq!(redact_url("nats://tok3n@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("host=h user=u password=s3cret"),
            "host=h user=u password=***"
        );
        assert_eq!(redact_url("postgresql://u@h/db"), "postgresql://u@h/db");
        // Every server of a list, passwords holding / ? : @, quoted values.
        assert_eq!(
            redact_url("nats://a:s1@h1:4222,nats://b:s2@h2:4222,tls://t0k@h3"),
            "nats://a:***@h1:4222,nats://b:***@h2:4222,tls://***@h3"
        );
        assert_eq!(
            redact_url("postgresql://u:pa/s?s@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgresql://u:p@ss:w@h,h2/db"),
            "postgresql://u:***@h,h2/db"
        );
        assert_eq!(
            redact_url("host=h password='a b c' user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_url("postgresql://u@h/db?password=x1&sslmode=require&password=x2"),
            "postgresql://u@h/db?password=***&sslmode=require&password=***"
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let cli = options(&[
            "--database-url",
            "postgresql://u:s3cret@h/db",
            "--nats-url",
            "nats://a:b3@h:1",
        ])
        .unwrap();
        let config = Config::from_options(&cli.options).unwrap();
        let text = format!("{config:?}");
        assert!(!text.contains("s3cret") && !text.contains("b3@"), "{text}");
        assert!(text.contains("u:***@h"), "{text}");
    }

    #[test]
    fn flags_stand_before_or_after_the_subcommand() {
        let before = options(&["--slot", "s1", "setup"]).unwrap();
        let after = options(&["setup", "--slot", "s1"]).unwrap();
        assert_eq!(before.options.slot, "s1");
        assert_eq!(after.options.slot, "s1");
        assert!(matches!(after.command, Some(Command::Setup)));
        assert!(options(&[]).unwrap().command.is_none());
    }

    #[test]
    fn defaults_are_the_contracts() {
        let cli = options(&["--database-url", "postgresql://u@h/db"]).unwrap();
        let config = Config::from_options(&cli.options).unwrap();
        assert_eq!(config.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(config.slot, "event_outbox_tailer");
        assert_eq!(config.publication, "event_outbox_pub");
        assert_eq!(config.stream, "EVENTS");
        assert_eq!(config.stream_replicas, 1);
        assert_eq!(config.subject_prefix, "events");
        assert_eq!(config.metrics_addr, "0.0.0.0:9599".parse().unwrap());
        assert_eq!(config.max_retries, 10);
        assert!(!config.event_logs);
        assert!(!config.slot_failover);
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn rejects_bad_values_with_the_flag_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--database-url"),
            (&["--database-url", "mysql://h/db"], "--database-url"),
            (
                &["--database-url", "postgresql://u@h:notaport/db"],
                "--database-url",
            ),
            (
                &[
                    "--database-url",
                    "postgresql://u@h/db",
                    "--slot",
                    "Bad-Slot",
                ],
                "--slot",
            ),
            (
                &[
                    "--database-url",
                    "postgresql://u@h/db",
                    "--publication",
                    "x; drop",
                ],
                "--publication",
            ),
            (
                &["--database-url", "postgresql://u@h/db", "--stream", "a.b"],
                "--stream",
            ),
            (
                &[
                    "--database-url",
                    "postgresql://u@h/db",
                    "--subject-prefix",
                    "a.>",
                ],
                "--subject-prefix",
            ),
            (
                &[
                    "--database-url",
                    "postgresql://u@h/db",
                    "--metrics-addr",
                    "nowhere",
                ],
                "--metrics-addr",
            ),
            (
                &[
                    "--database-url",
                    "postgresql://u@h/db",
                    "--nats-url",
                    "nats://h /x",
                ],
                "--nats-url",
            ),
        ];
        for (args, flag) in cases {
            let cli = options(args).unwrap();
            let error = Config::from_options(&cli.options).unwrap_err().to_string();
            assert!(error.contains(flag), "{args:?}: {error}");
        }
    }

    #[test]
    fn stream_replicas_are_one_to_five() {
        let config = config_with(&["--stream-replicas", "3"], &[]).unwrap();
        assert_eq!(config.stream_replicas, 3);
        for bad in ["0", "6"] {
            let error = config_with(&["--stream-replicas", bad], &[])
                .unwrap_err()
                .to_string();
            assert!(
                error.starts_with(&format!("--stream-replicas {bad} is not between 1 and 5")),
                "{error}"
            );
        }
        assert!(
            options(&["--stream-replicas", "three"]).is_err(),
            "clap refuses a non-number"
        );
    }

    #[test]
    fn requeue_takes_exactly_one_selector() {
        assert!(options(&["requeue"]).is_err());
        assert!(options(&["requeue", "--all", "--event-type", "x"]).is_err());
        let cli = options(&["requeue", "--event-type", "message.created"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Requeue(RequeueArgs {
                event_type: Some(_),
                ..
            }))
        ));
    }
}
