//! The NATS connection, the JetStream context and the stream.

use crate::config::{Config, NatsAuth};
use crate::metrics::Metrics;
use async_nats::jetstream::{self, stream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What went wrong with NATS, by kind: [`NatsError::refused`] says whether
/// retrying with the same settings can help.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The first connection attempt failed; see [`refusal`] for which
    /// failures are the settings' (credentials, TLS) and not the network's.
    #[error("{}", describe_connect(.0))]
    Connect(#[source] async_nats::ConnectError),
    /// A credential file named by a flag cannot be read.
    #[error("cannot read --{flag} {}: {error}", .path.display())]
    CredentialFile {
        flag: &'static str,
        path: std::path::PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("cannot get or create stream {stream}: {error}{hint}")]
    Stream {
        stream: String,
        /// What the operator may have got wrong, or nothing.
        hint: String,
        #[source]
        error: jetstream::context::CreateStreamError,
    },
    #[error("no answer from JetStream at {url} within {within:?}")]
    NoAnswer { url: String, within: Duration },
    /// `republish` gave up on an event after its tries.
    #[error("republishing {id}: {error}")]
    Republish {
        id: uuid::Uuid,
        #[source]
        error: jetstream::context::PublishError,
    },
}

impl NatsError {
    /// True when NATS refused the settings (credentials, TLS verification,
    /// an unreadable credential file): retrying cannot help.
    pub(crate) fn refused(&self) -> bool {
        match self {
            NatsError::Connect(error) => refusal(error).is_some(),
            NatsError::CredentialFile { .. } => true,
            NatsError::Stream { .. } | NatsError::NoAnswer { .. } | NatsError::Republish { .. } => {
                false
            }
        }
    }
}

fn describe_connect(error: &async_nats::ConnectError) -> String {
    refusal(error).unwrap_or_else(|| format!("cannot connect: {error}"))
}

/// Publishes in flight at once (acks not yet received): deep enough to keep
/// the connection busy, small enough that a stalled server holds little.
pub(crate) const PUBLISH_WINDOW: usize = 4096;
/// JetStream de-duplicates repeats of a `Nats-Msg-Id` within this window.
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How often the client pings the server. async-nats gives a connection up
/// when a ping is due with two still unanswered, so a silent connection (a
/// NAT or proxy that dropped it without closing) is replaced 10-15 s after
/// it went silent (the client's default, 60 s, makes that three minutes).
/// The cost: one PING and one PONG, a few bytes, every 5 s.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connects. The first attempt settles what retrying cannot fix: refused
/// credentials or a failed TLS verification are an error (the caller stops
/// with one line). An unreachable server is not: the client then connects in
/// the background, keeps trying, and publishing waits for it. The receiver
/// counts the connections made: each (re)connect bumps it.
pub(crate) async fn connect(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(async_nats::Client, watch::Receiver<u64>), NatsError> {
    let (connects_tx, connects) = watch::channel(0u64);
    let connects_tx = Arc::new(connects_tx);
    let servers = config.nats.servers.clone();
    let first = options(config, metrics.clone(), connects_tx.clone())
        .await?
        .connect(servers.clone())
        .await;
    let error = match first {
        Ok(client) => return Ok((client, connects)),
        Err(error) => error,
    };
    if refusal(&error).is_some() {
        return Err(NatsError::Connect(error));
    }
    tracing::warn!(%error, "NATS unreachable; connecting in the background, publishing waits for it");
    let client = options(config, metrics, connects_tx)
        .await?
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(NatsError::Connect)?;
    Ok((client, connects))
}

/// Why NATS refused us for good, or `None` when the failure is the network's.
fn refusal(error: &async_nats::ConnectError) -> Option<String> {
    use async_nats::ConnectErrorKind as Kind;
    match error.kind() {
        Kind::AuthorizationViolation => Some(format!(
            "the server refused the credentials ({error}): check --nats-user/--nats-password, --nats-token, --nats-creds or --nats-nkey"
        )),
        Kind::Authentication => Some(format!("cannot authenticate: {error}")),
        Kind::Tls => Some(format!("TLS: {}", crate::tls::describe(error).unwrap_or_else(|| error.to_string()))),
        _ => crate::tls::describe(error).map(|refused| format!("TLS: {refused}")),
    }
}

/// The client's options: name, reconnecting for ever, the credential and
/// TLS of the configuration, and the state-change callback.
async fn options(
    config: &Config,
    metrics: Arc<Metrics>,
    connects: Arc<watch::Sender<u64>>,
) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-tailer")
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let connects = connects.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics.nats_connected.set(1);
                        connects.send_modify(|n| *n += 1);
                        tracing::info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        metrics.nats_connected.set(0);
                        tracing::warn!("NATS disconnected; publishing waits for it");
                    }
                    async_nats::Event::Closed => metrics.nats_connected.set(0),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    options = match &config.nats.auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::Creds(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|error| NatsError::CredentialFile {
                    flag: "nats-creds",
                    path: path.clone(),
                    error,
                })?
        }
        NatsAuth::Nkey(path) => {
            let seed =
                std::fs::read_to_string(path).map_err(|error| NatsError::CredentialFile {
                    flag: "nats-nkey",
                    path: path.clone(),
                    error,
                })?;
            options.nkey(seed.trim().to_owned())
        }
    };
    let tls = &config.nats.tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// How long a publish waits for its ack.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Acks awaited at once: a window re-sent after a failure (see the
/// publisher) need not wait for the acks of the copies it replaced.
pub(crate) fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .ack_timeout(ACK_TIMEOUT)
        .max_ack_inflight(2 * PUBLISH_WINDOW)
        .backpressure_on_inflight(true)
        .build(client)
}

/// [`ensure_stream`], for a one-shot command: an error when JetStream has
/// not answered within `within` (a session retries instead).
pub(crate) async fn ensure_stream_within(
    js: &jetstream::Context,
    config: &Config,
    within: Duration,
) -> Result<(), NatsError> {
    tokio::time::timeout(within, ensure_stream(js, config))
        .await
        .map_err(|_| NatsError::NoAnswer {
            url: config.nats_url.clone(),
            within,
        })?
}

/// Creates the stream if missing (subjects `<prefix>.>`, file storage, a
/// two-minute duplicate window, `--stream-replicas` replicas). An existing
/// stream is left as it is, with a warning when it cannot serve the tailer
/// well or differs from what the tailer would have made.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<(), NatsError> {
    let subjects = format!("{}.>", config.subject_prefix);
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subjects.clone()],
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: config.stream_replicas,
        ..Default::default()
    };
    let stream = js
        .get_or_create_stream(wanted)
        .await
        .map_err(|error| NatsError::Stream {
            stream: config.stream.clone(),
            hint: if config.stream_replicas > 1 {
                format!(
                    " (--stream-replicas {} needs a JetStream cluster of at least that many servers)",
                    config.stream_replicas
                )
            } else {
                String::new()
            },
            error,
        })?;
    let info = stream.cached_info();
    if !info
        .config
        .subjects
        .iter()
        .any(|s| s == &subjects || s == ">")
    {
        tracing::warn!(stream = %config.stream, have = ?info.config.subjects, want = %subjects,
            "existing stream does not list the tailer's subjects; publishes may find no stream");
    }
    if info.config.duplicate_window < DUPLICATE_WINDOW {
        tracing::warn!(stream = %config.stream, window = ?info.config.duplicate_window,
            "existing stream's duplicate window is under 2 minutes; repeats after a crash may get through");
    }
    // Changing replicas moves the stream's data between servers: the
    // operator's decision (`nats stream edit --replicas`), never a side effect
    // of starting the tailer.
    if info.config.num_replicas != config.stream_replicas {
        tracing::warn!(stream = %config.stream, replicas = info.config.num_replicas, wanted = config.stream_replicas,
            "existing stream has {} replica(s), --stream-replicas asks for {}; left as it is",
            info.config.num_replicas, config.stream_replicas);
    }
    Ok(())
}
