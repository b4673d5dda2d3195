//! Opening the replication stream on the slot with pgwire-replication.

use crate::config::Config;
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
pub(crate) fn replication_config(config: &Config) -> ReplicationConfig {
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
            let host = match tcp {
                Some(Host::Tcp(host)) => host.clone(),
                _ => "localhost".to_owned(),
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
        .with_buffer_size(4096)
        .with_application_name("outbox-tailer")
        .with_options("-c datestyle=ISO -c timezone=UTC")
}

/// Connects and starts streaming from the slot's confirmed position. Fails
/// with SQLSTATE 55006 while another tailer holds the slot.
pub(crate) async fn open(
    config: &Config,
) -> Result<ReplicationClient, pgwire_replication::PgWireError> {
    let mut client = ReplicationClient::connect(replication_config(config)).await?;
    client.wait_started().await?;
    Ok(client)
}
