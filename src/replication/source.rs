//! Opening the replication stream on the slot with pgwire-replication, on
//! the server the query connection chose.

use crate::config::Config;
use crate::db::hosts::Endpoint;
use crate::replication::bridge::{replication_bridge, BridgeAddr};
use crate::replication::timeline::{self, ServerId};
use crate::tls::postgres::{PgTlsError, SslMode};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use std::time::Duration;
use tokio_postgres::config::Host;

/// How often the confirmed position is reported to the server. Short, so the
/// slot (and the lag an operator sees) follows the tailer closely.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// The replication connection's settings, derived from `--database-url`, to
/// `server` (one of its hosts).
///
/// The session pins `DateStyle=ISO` and `TimeZone=UTC`, so timestamps in the
/// stream are `2026-11-26 18:28:37.123456+00` whatever the server's defaults
/// (they become RFC 3339 headers).
/// `bridge`: the local address that forwards to the server over TLS,
/// when TLS is in use (see `tls::postgres`).
pub(crate) fn replication_config(
    config: &Config,
    server: &Endpoint,
    bridge: Option<BridgeAddr>,
) -> ReplicationConfig {
    let pg = &config.database;
    let port = server.port;
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg
        .get_dbname()
        .map(str::to_owned)
        .unwrap_or_else(|| user.clone());
    let unix = |dir: &std::path::Path, port| {
        ReplicationConfig::unix(
            dir.display().to_string(),
            port,
            user.clone(),
            password.clone(),
            database.clone(),
            config.slot.clone(),
            config.publication.clone(),
        )
    };
    let tcp = |host: String, port| {
        ReplicationConfig::new(
            host,
            user.clone(),
            password.clone(),
            database.clone(),
            config.slot.clone(),
            config.publication.clone(),
        )
        .with_port(port)
    };
    let base = match (&server.host, bridge) {
        (Host::Unix(dir), _) => unix(dir, port),
        (Host::Tcp(_), Some(BridgeAddr::Unix { dir, port })) => unix(&dir, port),
        (Host::Tcp(_), Some(BridgeAddr::Tcp(local))) => tcp(local.ip().to_string(), local.port()),
        (Host::Tcp(_), None) => tcp(
            server.dial().unwrap_or_else(|| "localhost".to_owned()),
            port,
        ),
    };
    // The heartbeat (see [`silence_options`]): with nothing to say, the
    // client writes only every `replication_timeout`, so the server, which
    // pings after half of it without a word, pings first.
    base.with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn::ZERO)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(config.replication_timeout)
        // Events decoded ahead of the reader: a few, since each may carry a
        // payload near NATS's 1 MB limit (the byte budget starts after them).
        .with_buffer_size(REPLICATION_BUFFER)
        .with_application_name("outbox-tailer")
        .with_options(format!(
            "-c datestyle=ISO -c timezone=UTC {}",
            silence_options(config.replication_timeout)
        ))
}

/// The replication connection's heartbeat, from the server's side.
///
/// A connection can die without closing (a NAT or load balancer that drops
/// its state, a paused host): no FIN, no RST, and a socket that only reads
/// waits forever. So the session sets its own `wal_sender_timeout` to
/// `--replication-timeout`: the walsender then asks for a reply after half
/// of it without hearing from the client (a keepalive with the reply flag;
/// the client answers at once), and drops the client after all of it, which
/// frees the slot for the next session. The client writes only every
/// `replication_timeout` when it has nothing to confirm, so on an idle slot
/// the server's ping comes first: a healthy connection carries a message
/// from the server at least every half timeout, and the session loop ends a
/// session that has heard nothing for a whole one. Both sides give up on a
/// silent connection at about the same time, well inside the minute the
/// contract allows (the server's default `wal_sender_timeout` alone is 60 s).
fn silence_options(timeout: Duration) -> String {
    format!("-c wal_sender_timeout={}", timeout.as_millis())
}

/// Connects to `server` (over TLS as `sslmode` says), checks that it is
/// `expected` (the server the query connection reached: the slot was checked
/// there), and starts streaming from the slot's confirmed position. Fails
/// with SQLSTATE 55006 while another tailer holds the slot.
pub(crate) async fn open(
    config: &Config,
    server: &Endpoint,
    expected: ServerId,
) -> Result<ReplicationClient, OpenError> {
    let bridge = match (server.dial(), server.tls_name(), config.pg_tls.mode) {
        // TLS does not apply to Unix sockets (libpq ignores sslmode there).
        (Some(dial), Some(name), mode) if mode != SslMode::Disable => {
            let port = server.port;
            let local = replication_bridge(
                &dial,
                name,
                port,
                &config.pg_tls,
                CONNECT_TIMEOUT,
                config.replication_timeout,
            )
            .await
            .map_err(|error| OpenError::Tls {
                server: server.to_string(),
                error,
            })?;
            Some(local)
        }
        _ => None,
    };
    let mut client =
        ReplicationClient::connect_gated(replication_config(config, server, bridge)).await?;
    let identified = client.identify_system().await?;
    let reached = ServerId {
        system: timeline::parse_system(&identified.system_id),
        timeline: identified.timeline,
    };
    if reached != expected {
        // The primary changed between the two connections (a promotion in
        // progress): the next session looks again.
        client.abort();
        return Err(OpenError::PrimaryChanging {
            first: format!("the query connection's ({expected})"),
            second: format!("the replication connection's to {server} ({reached})"),
        });
    }
    client.start().await?;
    client.wait_started().await?;
    Ok(client)
}

/// Why the stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The replication connection's own TLS (the bridge): the network's
    /// failure, or the certificates'.
    #[error("replication connection to {server}: {error}")]
    Tls {
        server: String,
        #[source]
        error: PgTlsError,
    },
    /// The two connections of the session reached different servers.
    #[error("{first} and {second} are different servers: the primary is changing")]
    PrimaryChanging { first: String, second: String },
    #[error(transparent)]
    Stream(#[from] pgwire_replication::PgWireError),
}

/// Replication messages buffered between pgwire-replication's socket reader
/// and ours: at most this many payloads sit outside the byte budget.
const REPLICATION_BUFFER: usize = 32;

/// How long connecting and the TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
