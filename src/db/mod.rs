//! Query connections to PostgreSQL: to the servers of `--database-url` in
//! its order ([`hosts`]), each connection dialled by the tailer itself and
//! watched for a server gone silent ([`watched`]), and the text of their
//! errors.

pub(crate) mod hosts;
pub(crate) mod watched;

use crate::config::Config;
use crate::event::{ROW_COLUMNS, ROW_COLUMNS_WITH_HEADERS};
use hosts::Endpoint;
use std::time::Duration;
use tokio_postgres::Client;
use watched::DialError;

pub(crate) use watched::dial_tcp;

/// No server of the URL accepted a connection; `reason` says why, per server.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}: {reason}")]
pub struct Unreachable {
    pub(crate) target: String,
    pub(crate) reason: String,
}

/// Connects an ordinary (query) session, failing fast with one clear line.
pub(crate) async fn connect(config: &Config) -> Result<Client, Unreachable> {
    connect_endpoint(config).await.map(|(client, _)| client)
}

/// As [`connect`], and says which server of the URL accepted: the first, in
/// the URL's order, that suits `target_session_attrs` (a multi-host URL with
/// `target_session_attrs=read-write` finds the primary). The replication
/// stream is opened to that same server.
pub(crate) async fn connect_endpoint(config: &Config) -> Result<(Client, Endpoint), Unreachable> {
    connect_first(config, config.statement_timeout).await
}

/// How long the statement that creates a slot may take: it waits for the
/// transactions running at that moment to end, which may be long on a busy
/// primary (a prepared transaction holds it until it is resolved).
const SLOT_CREATION: Duration = Duration::from_secs(600);

/// A session for creating the slot, on `endpoint` (or the URL's first
/// server that accepts): watched with a deadline long enough for
/// [`SLOT_CREATION`], not `--statement-timeout`.
pub(crate) async fn connect_for_slot(
    config: &Config,
    endpoint: Option<&Endpoint>,
) -> Result<Client, Unreachable> {
    match endpoint {
        Some(endpoint) => connect_on(config, endpoint, SLOT_CREATION).await,
        None => connect_first(config, SLOT_CREATION)
            .await
            .map(|(client, _)| client),
    }
}

/// The first server of the URL that accepts, its connection watched with
/// `deadline`.
async fn connect_first(
    config: &Config,
    deadline: Duration,
) -> Result<(Client, Endpoint), Unreachable> {
    let endpoints = hosts::endpoints(&config.database);
    let mut refusals = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        match connect_one(config, &endpoint, deadline).await {
            Ok(client) => return Ok((client, endpoint)),
            Err(reason) => refusals.push((endpoint, reason)),
        }
    }
    let reason = match refusals.as_slice() {
        [(_, reason)] => reason.clone(),
        several => several
            .iter()
            .map(|(endpoint, reason)| format!("{endpoint}: {reason}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    Err(Unreachable {
        target: target(config),
        reason,
    })
}

/// Another query session on `endpoint`, a server [`connect_endpoint`] found.
pub(crate) async fn connect_to(
    config: &Config,
    endpoint: &Endpoint,
) -> Result<Client, Unreachable> {
    connect_on(config, endpoint, config.statement_timeout).await
}

/// [`connect_one`], its failure said as which server refused.
async fn connect_on(
    config: &Config,
    endpoint: &Endpoint,
    deadline: Duration,
) -> Result<Client, Unreachable> {
    connect_one(config, endpoint, deadline)
        .await
        .map_err(|reason| Unreachable {
            target: endpoint.to_string(),
            reason,
        })
}

/// One server: the client, or why it could not be had. The connection is
/// watched: a request unanswered for `deadline` (`--statement-timeout`, for
/// all but the slot's creation) ends it ([`watched`]).
async fn connect_one(
    config: &Config,
    endpoint: &Endpoint,
    deadline: Duration,
) -> Result<Client, String> {
    let mut pg = hosts::only(&config.database, endpoint);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    pg.application_name("outbox-tailer");
    let tls = config.pg_tls.connector().map_err(|e| e.to_string())?;
    watched::connect(&pg, endpoint, tls, deadline)
        .await
        .map_err(|error| {
            let reason = match &error {
                DialError::Postgres(e) => match crate::tls::describe(e) {
                    Some(tls) => tls,
                    None => error_text(e),
                },
                other => other.to_string(),
            };
            let mode = config.pg_tls.mode.name();
            if reason.contains("server does not support TLS") {
                format!("the server does not accept TLS, and sslmode={mode} requires it")
            } else {
                reason
            }
        })
}

/// `host:port/db` of the configured database (every server of a
/// multi-host URL, comma-separated), for messages (no password).
pub(crate) fn target(config: &Config) -> String {
    let servers = hosts::list(&hosts::endpoints(&config.database));
    let db = config
        .database
        .get_dbname()
        .or(config.database.get_user())
        .unwrap_or("");
    format!("{servers}/{db}")
}

/// The most useful text of a tokio-postgres error: the server's message, or
/// the underlying I/O cause (tokio-postgres' own Display is often just "db error").
pub(crate) fn error_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The column list for the table as it is: with `headers` once a migration
/// added it.
pub(crate) async fn outbox_row_columns(db: &Client) -> Result<&'static str, tokio_postgres::Error> {
    let has_headers: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'event_outbox'::regclass \
             AND attname = 'headers' AND NOT attisdropped)",
            &[],
        )
        .await?
        .get(0);
    Ok(if has_headers {
        ROW_COLUMNS_WITH_HEADERS
    } else {
        ROW_COLUMNS
    })
}
