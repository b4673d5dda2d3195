//! The command line and environment (docs/contract.md section 2) and their
//! validation into one [`Config`]. Every flag has an environment variable and
//! flags win; flags may stand before or after the subcommand. The flags are
//! [`flags`]'s, the NATS settings [`nats`]'s, and redaction [`redact`]'s.

mod flags;
mod nats;
mod redact;

pub use flags::{Cli, Command, LogFormat, Options, RepublishArgs, RequeueArgs};
use nats::nats_config;
pub(crate) use nats::{NatsAuth, NatsConfig};
pub use redact::redact_url;

use crate::tls::postgres::{split_tls_params, PgTls};
use std::net::SocketAddr;
use std::str::FromStr;

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

/// The validated configuration. Every field is safe to print: the parsed
/// configurations redact their own secrets, and the URLs are kept only as
/// redacted text, so `Debug` is derived.
#[derive(Debug, Clone)]
pub struct Config {
    /// Parsed as libpq would (TLS parameters taken out into `pg_tls`).
    pub database: tokio_postgres::Config,
    /// `--database-url`, redacted, for messages.
    pub database_url: String,
    pub(crate) pg_tls: PgTls,
    /// `--nats-url`, redacted, for messages.
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
            database_url: redact_url(&database_url),
            pg_tls,
            nats_url: redact_url(&options.nats_url),
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
pub(super) fn secret(
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
    fn the_nats_url_is_read_once_and_each_server_checked() {
        let servers = |url: &str| config_with(&["--nats-url", url], &[]).map(|c| c.nats.servers);
        assert_eq!(
            servers("127.0.0.1:4222, tls://b:4222").unwrap(),
            ["nats://127.0.0.1:4222", "tls://b:4222"]
        );
        for bad in [
            "foo://a:4222",
            "nats://a:4222,",
            "nats://",
            "nats://a:4222/x",
            "nats://a b:1",
        ] {
            assert!(
                matches!(servers(bad), Err(ConfigError::MalformedNatsUrl { .. })),
                "{bad}"
            );
        }
        // The error never shows a credential.
        let error = servers("nats://u:secret@a/b").unwrap_err().to_string();
        assert!(!error.contains("secret"), "{error}");
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
