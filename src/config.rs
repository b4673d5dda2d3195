//! The command line and environment (docs/contract.md section 2) and their
//! validation into one [`Config`]. Every flag has an environment variable and
//! flags win; flags may stand before or after the subcommand.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::fmt;
use std::net::SocketAddr;
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
    /// PostgreSQL URL (libpq form, postgresql://user:pass@host:port/db) of a role with REPLICATION.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS server URL.
    #[arg(
        long,
        env = "NATS_URL",
        global = true,
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// Logical replication slot (pgoutput), created if missing.
    #[arg(
        long,
        env = "OUTBOX_SLOT",
        global = true,
        default_value = "event_outbox_tailer"
    )]
    pub slot: String,
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
}

/// The validated configuration. Its `Debug` never shows passwords.
#[derive(Clone)]
pub struct Config {
    /// Parsed as libpq would; the original text is kept for messages (redacted).
    pub database: tokio_postgres::Config,
    pub database_url: String,
    pub nats_url: String,
    pub slot: String,
    pub publication: String,
    pub stream: String,
    pub subject_prefix: String,
    pub metrics_addr: SocketAddr,
    pub max_retries: u32,
    pub event_logs: bool,
    pub stats_interval: std::time::Duration,
    pub sweep_min_age: std::time::Duration,
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("nats_url", &redact_url(&self.nats_url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("metrics_addr", &self.metrics_addr)
            .field("max_retries", &self.max_retries)
            .field("event_logs", &self.event_logs)
            .field("stats_interval", &self.stats_interval)
            .field("sweep_min_age", &self.sweep_min_age)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl Config {
    pub fn from_options(options: &Options) -> Result<Config, ConfigError> {
        let database_url = options
            .database_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingDatabaseUrl)?;
        let database = parse_database_url(&database_url)?;
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
        let metrics_addr = options
            .metrics_addr
            .parse()
            .map_err(|_| ConfigError::BadMetricsAddr(options.metrics_addr.clone()))?;
        Ok(Config {
            database,
            database_url,
            nats_url: options.nats_url.clone(),
            slot: options.slot.clone(),
            publication: options.publication.clone(),
            stream: options.stream.clone(),
            subject_prefix: options.subject_prefix.clone(),
            metrics_addr,
            max_retries: options.max_retries,
            event_logs: options.event_logs,
            stats_interval: std::time::Duration::from_secs_f64(options.stats_interval),
            sweep_min_age: std::time::Duration::from_secs_f64(options.sweep_min_age),
            log_format: options.log_format,
        })
    }
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
/// `password=secret` → `password=***`, for anything that gets printed.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = out[authority_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| authority_start + i);
        if let Some(at) = out[authority_start..authority_end].rfind('@') {
            let userinfo = &out[authority_start..authority_start + at];
            let redacted = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                // A lone token (nats://token@host) is a secret too.
                None if out.starts_with("nats") || out.starts_with("tls") => "***".to_owned(),
                None => userinfo.to_owned(),
            };
            out.replace_range(authority_start..authority_start + at, &redacted);
        }
    }
    if let Some(start) = out.find("password=") {
        let value_start = start + "password=".len();
        let value_end = out[value_start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..value_end, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("outbox-tailer").chain(args.iter().copied()))
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
        assert_eq!(config.subject_prefix, "events");
        assert_eq!(config.metrics_addr, "0.0.0.0:9599".parse().unwrap());
        assert_eq!(config.max_retries, 10);
        assert!(!config.event_logs);
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
