//! The NATS connection, the JetStream context and the stream.

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use async_nats::jetstream::{self, stream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Publishes in flight at once (acks not yet received): deep enough to keep
/// the connection busy, small enough that a stalled server holds little.
pub(crate) const PUBLISH_WINDOW: usize = 4096;
/// JetStream de-duplicates repeats of a `Nats-Msg-Id` within this window.
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Servers and credentials from `--nats-url`. The client ignores credentials
/// embedded in a URL, so they are taken out and passed as options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NatsTarget {
    pub servers: Vec<String>,
    pub user_password: Option<(String, String)>,
    pub token: Option<String>,
}

impl NatsTarget {
    pub(crate) fn parse(url: &str) -> NatsTarget {
        let mut target = NatsTarget {
            servers: Vec::new(),
            user_password: None,
            token: None,
        };
        for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (scheme, rest) = server.split_once("://").unwrap_or(("nats", server));
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((userinfo, host)) => (Some(userinfo), host),
                None => (None, rest),
            };
            match userinfo.map(|u| u.split_once(':')) {
                Some(Some((user, password))) => {
                    target.user_password = Some((user.to_owned(), password.to_owned()))
                }
                Some(None) => target.token = userinfo.map(str::to_owned),
                None => {}
            }
            target.servers.push(format!("{scheme}://{host}"));
        }
        target
    }
}

/// Connects in the background: an unreachable server is not fatal, the
/// client keeps trying, and publishing waits for it. The receiver counts
/// the connections made: each (re)connect bumps it.
pub(crate) async fn connect(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(async_nats::Client, watch::Receiver<u64>), Error> {
    let target = NatsTarget::parse(&config.nats_url);
    let (connects_tx, connects) = watch::channel(0u64);
    let connects_tx = Arc::new(connects_tx);
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-tailer")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let connects = connects_tx.clone();
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
    if let Some((user, password)) = target.user_password {
        options = options.user_and_password(user, password);
    }
    if let Some(token) = target.token {
        options = options.token(token);
    }
    let client = options
        .connect(target.servers)
        .await
        .map_err(|e| Error::Nats(format!("cannot connect: {e}")))?;
    Ok((client, connects))
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

/// Creates the stream if missing (subjects `<prefix>.>`, file storage, a
/// two-minute duplicate window). An existing stream is left as it is, with a
/// warning when it cannot serve the tailer well.
pub(crate) async fn ensure_stream(js: &jetstream::Context, config: &Config) -> Result<(), Error> {
    let subjects = format!("{}.>", config.subject_prefix);
    let wanted = stream::Config {
        name: config.stream.clone(),
        subjects: vec![subjects.clone()],
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(wanted).await.map_err(|e| {
        Error::Nats(format!(
            "cannot get or create stream {}: {e}",
            config.stream
        ))
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NatsTarget;

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        let t = NatsTarget::parse("nats://alice:s3cret@10.0.0.1:4222, nats://10.0.0.2:4222");
        assert_eq!(t.servers, ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]);
        assert_eq!(t.user_password, Some(("alice".into(), "s3cret".into())));
        assert_eq!(t.token, None);
        let t = NatsTarget::parse("tls://t0ken@nats.internal:4222");
        assert_eq!(
            (t.servers[0].as_str(), t.token.as_deref()),
            ("tls://nats.internal:4222", Some("t0ken"))
        );
        assert_eq!(
            NatsTarget::parse("127.0.0.1:4222").servers,
            ["nats://127.0.0.1:4222"]
        );
    }
}
