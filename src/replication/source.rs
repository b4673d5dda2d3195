//! Opening the replication stream on the slot with pgwire-replication.

use crate::config::Config;
use crate::error::Error;
use crate::tls::postgres::{replication_bridge, PgTlsError, SslMode};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use std::time::Duration;
use tokio_postgres::config::Host;

/// How often the confirmed position is reported to the server. Short, so the
/// slot (and the lag an operator sees) follows the tailer closely.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// The replication connection's settings, derived from `--database-url`.
///
/// The session pins `DateStyle=ISO` and `TimeZone=UTC`, so timestamps in the
/// stream are `2026-11-26 18:28:37.123456+00` whatever the server's defaults
/// (they become RFC 3339 headers).
/// `bridge`: the loopback address that forwards to the server over TLS,
/// when TLS is in use (see `tls::postgres`).
pub(crate) fn replication_config(
    config: &Config,
    bridge: Option<std::net::SocketAddr>,
) -> ReplicationConfig {
    let pg = &config.database;
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg
        .get_dbname()
        .map(str::to_owned)
        .unwrap_or_else(|| user.clone());
    let base = match pg.get_hosts().first() {
        Some(Host::Unix(dir)) => ReplicationConfig::unix(
            dir.display().to_string(),
            port,
            user,
            password,
            database,
            config.slot.clone(),
            config.publication.clone(),
        ),
        tcp => {
            let (host, port) = match (bridge, tcp) {
                (Some(local), _) => (local.ip().to_string(), local.port()),
                (None, Some(Host::Tcp(host))) => (host.clone(), port),
                (None, _) => ("localhost".to_owned(), port),
            };
            ReplicationConfig::new(
                host,
                user,
                password,
                database,
                config.slot.clone(),
                config.publication.clone(),
            )
            .with_port(port)
        }
    };
    base.with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn::ZERO)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(5))
        // Events decoded ahead of the reader: a few, since each may carry a
        // payload near NATS's 1 MB limit (the byte budget starts after them).
        .with_buffer_size(REPLICATION_BUFFER)
        .with_application_name("outbox-tailer")
        .with_options("-c datestyle=ISO -c timezone=UTC")
}

/// Connects (over TLS as `sslmode` says) and starts streaming from the
/// slot's confirmed position. Fails with SQLSTATE 55006 while another tailer
/// holds the slot.
pub(crate) async fn open(config: &Config) -> Result<ReplicationClient, Error> {
    let pg = &config.database;
    let bridge = match (pg.get_hosts().first(), config.pg_tls.mode) {
        // TLS does not apply to Unix sockets (libpq ignores sslmode there).
        (Some(Host::Tcp(host)), mode) if mode != SslMode::Disable => {
            let port = pg.get_ports().first().copied().unwrap_or(5432);
            let local = replication_bridge(host, port, &config.pg_tls, CONNECT_TIMEOUT)
                .await
                .map_err(|error| match error {
                    PgTlsError::Io(io) => {
                        Error::Unavailable(format!("replication connection to {host}:{port}: {io}"))
                    }
                    refused => Error::PostgresTls(format!(
                        "replication connection to {host}:{port}: {refused}"
                    )),
                })?;
            Some(local)
        }
        _ => None,
    };
    let mut client = ReplicationClient::connect(replication_config(config, bridge)).await?;
    client.wait_started().await?;
    Ok(client)
}

/// Replication messages buffered between pgwire-replication's socket reader
/// and ours: at most this many payloads sit outside the byte budget.
const REPLICATION_BUFFER: usize = 32;

/// How long connecting and the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
