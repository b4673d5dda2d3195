//! Query connections to PostgreSQL that notice when the server goes silent.
//!
//! A connection can die without closing: a NAT or load balancer drops its
//! state, a proxy loses its backend but keeps the client's socket, a host is
//! paused. No FIN or RST arrives, and a client waiting for an answer waits
//! forever: the marker's UPDATE, and with it the whole session, or the
//! sweeper while it holds the publish turn. Two defences, both here, so every
//! query connection (marker, replay check, sweeper, statistics, retention,
//! setup) has them:
//!
//! - **The socket** gets TCP keepalives and `TCP_USER_TIMEOUT`: when the path
//!   itself is gone (nothing acknowledges), the kernel fails the socket.
//! - **The watchdog** ([`Watched`]): a request written and not answered
//!   within `--statement-timeout` fails the connection, even when something
//!   on the path still acknowledges the bytes (a proxy that reads and
//!   discards them). Every statement on the connection then fails with a
//!   connection error, which the callers treat as an outage: the session,
//!   sweep or poll starts again on a new connection; nothing is marked twice
//!   or lost (a mark whose answer never came is re-delivered and checked).
//!
//! The watchdog knows only bytes, not statements (under TLS it sees
//! ciphertext): it runs from the first write after the last read, and a
//! read stops it. So a request pipelined behind another is not watched once
//! the first is answered: the tailer does not pipeline on a watched
//! connection (statistics are read one query at a time), and where two
//! tasks share one (the publisher records failures on the marker's) the
//! rarer caller bounds its own statements.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Sleep;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::hosts::Endpoint;

/// How long an idle socket waits before the kernel probes its peer, and
/// between probes; after [`KEEPALIVE_PROBES`] unanswered the socket fails.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The socket: no route, refused, timed out, no such socket file.
    #[error("{0}")]
    Socket(#[from] io::Error),
    /// The startup exchange: TLS, authentication, the server's refusal.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// `target_session_attrs=read-write`, and this server is read-only.
    #[error("database does not allow writes")]
    ReadOnly,
}

/// Connects to `endpoint` with `pg`'s settings, its socket watched: a
/// request unanswered for `deadline` ends the connection. Checks
/// `target_session_attrs=read-write` itself (tokio-postgres checks it only
/// on connections it dials). The connection runs in the background.
pub(crate) async fn connect(
    pg: &tokio_postgres::Config,
    endpoint: &Endpoint,
    mut tls: MakeRustlsConnect,
    deadline: Duration,
) -> Result<Client, DialError> {
    let connect_timeout = pg.get_connect_timeout().copied();
    let client = match &endpoint.host {
        Host::Unix(dir) => {
            // As libpq: sslmode does not apply to a Unix socket.
            let mut pg = pg.clone();
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let pg = &pg;
            let path = dir.join(format!(".s.PGSQL.{}", endpoint.port));
            let socket = within(connect_timeout, UnixStream::connect(path)).await?;
            let tls = MakeTlsConnect::<Watched<UnixStream>>::make_tls_connect(&mut tls, "")
                .map_err(io::Error::other)?;
            handshake(pg, Watched::new(socket, deadline), tls).await?
        }
        Host::Tcp(host) => {
            let dial = endpoint.dial().unwrap_or_else(|| host.clone());
            let socket = within(connect_timeout, dial_tcp(&dial, endpoint.port, deadline)).await?;
            let tls = MakeTlsConnect::<Watched<TcpStream>>::make_tls_connect(&mut tls, host)
                .map_err(io::Error::other)?;
            handshake(pg, Watched::new(socket, deadline), tls).await?
        }
    };
    if pg.get_target_session_attrs() == TargetSessionAttrs::ReadWrite {
        let read_only: String = client
            .query_one("SHOW transaction_read_only", &[])
            .await?
            .get(0);
        if read_only == "on" {
            return Err(DialError::ReadOnly);
        }
    }
    Ok(client)
}

/// The startup exchange on `socket`; the connection then runs in the
/// background until it closes or fails.
async fn handshake<S, T>(
    pg: &tokio_postgres::Config,
    socket: S,
    tls: T,
) -> Result<Client, tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsConnect<S> + Send,
    T::Stream: Send + 'static,
    T::Future: Send,
{
    let (client, connection) = pg.connect_raw(socket, tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "query connection closed");
        }
    });
    Ok(client)
}

/// The first address of `host` that accepts, with keepalives and
/// `TCP_USER_TIMEOUT` set (written data unacknowledged for `deadline` fails
/// the socket).
pub(crate) async fn dial_tcp(host: &str, port: u16, deadline: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                let socket = socket2::SockRef::from(&stream);
                socket.set_tcp_keepalive(
                    &socket2::TcpKeepalive::new()
                        .with_time(KEEPALIVE_IDLE)
                        .with_interval(KEEPALIVE_INTERVAL)
                        .with_retries(KEEPALIVE_PROBES),
                )?;
                socket.set_tcp_user_timeout(Some(deadline))?;
                return Ok(stream);
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
    }))
}

async fn within<T>(
    timeout: Option<Duration>,
    dial: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, dial)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ))
            }),
        None => dial.await,
    }
}

/// A socket whose peer must answer: after a write, if nothing is read for
/// `deadline`, reads fail with `TimedOut` (see the module's doc).
pub(crate) struct Watched<S> {
    inner: S,
    deadline: Duration,
    /// Armed by the first write after the last read: the server owes an answer.
    owed: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, deadline: Duration) -> Watched<S> {
        Watched {
            inner,
            deadline,
            owed: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.owed = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match this.owed.as_mut().map(|owed| owed.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer from PostgreSQL for {:?} (--statement-timeout): the connection went silent",
                        this.deadline
                    ),
                ))),
                _ => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 && this.owed.is_none() {
                let mut owed = Box::pin(tokio::time::sleep(this.deadline));
                // Registers this task with the timer now: tokio-postgres
                // polls the read side before it writes, so the next read
                // poll may only come when the timer wakes it.
                let _ = owed.as_mut().poll(cx);
                this.owed = Some(owed);
            }
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DEADLINE: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_fails_the_read_after_the_deadline() {
        let (ours, _server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(ours, DEADLINE);
        watched.write_all(b"SELECT 1").await.unwrap();
        let started = tokio::time::Instant::now();
        let error = watched.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), DEADLINE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_disarms_it_and_an_idle_connection_never_times_out() {
        let (ours, mut server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(ours, DEADLINE);
        watched.write_all(b"SELECT 1").await.unwrap();
        server.write_all(b"1").await.unwrap();
        let mut answer = [0u8; 1];
        watched.read_exact(&mut answer).await.unwrap();
        // Nothing owed now: a read waits as long as the server is quiet.
        let idle = tokio::time::timeout(10 * DEADLINE, watched.read(&mut answer)).await;
        assert!(idle.is_err(), "an idle connection timed out: {idle:?}");
    }
}
