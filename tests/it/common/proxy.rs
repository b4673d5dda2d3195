//! A TCP proxy between the tailer and nats-server that can break the
//! connection the way networks do: for a while it swallows what the client
//! sends (the client believes it sent it), then closes. What the client wrote
//! meanwhile is lost; what it still had queued goes out after it reconnects.
//! A real fault on a real connection, not a stand-in for the server.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct CuttingProxy {
    port: u16,
    cuts: Arc<watch::Sender<Duration>>,
    accept: JoinHandle<()>,
}

impl CuttingProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(watch::Sender::new(Duration::ZERO));
        let accept = {
            let cuts = cuts.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let cuts = cuts.subscribe();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await {
                            forward(client, server, cuts).await;
                        }
                    });
                }
            })
        };
        CuttingProxy { port, cuts, accept }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Every open connection swallows what the client sends for `swallow`,
    /// then closes.
    pub fn cut(&self, swallow: Duration) {
        self.cuts.send_replace(swallow);
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, mut cuts: watch::Receiver<Duration>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => match read {
                Ok(n) if n > 0 => if to_server.write_all(&up[..n]).await.is_err() { return },
                _ => return,
            },
            read = from_server.read(&mut down) => match read {
                Ok(n) if n > 0 => if to_client.write_all(&down[..n]).await.is_err() { return },
                _ => return,
            },
            changed = cuts.changed() => {
                if changed.is_err() {
                    return;
                }
                let swallow = *cuts.borrow_and_update();
                let until = tokio::time::Instant::now() + swallow;
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, from_client.read(&mut up)).await {
                    if n == 0 {
                        break;
                    }
                }
                // Dropping both halves of both sockets closes them.
                return;
            }
        }
    }
}

/// How a [`SilentProxy`] lets its connections die: without closing (no FIN,
/// no RST), as a NAT or load balancer that dropped its state, or a proxy
/// that lost its backend, does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Keeps reading what each side sends, and passes nothing on: every
    /// byte is acknowledged by the proxy's kernel and goes nowhere.
    Discard,
    /// Stops reading altogether: the sockets' buffers fill, then nothing
    /// more is acknowledged.
    Stall,
}

/// Which of a PostgreSQL proxy's connections go silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The replication connection (its startup asks for `replication`).
    Replication,
    /// Every other connection: the query sessions.
    Queries,
    All,
}

/// A TCP proxy to `127.0.0.1:target` whose open connections can be made to
/// go silent while new ones pass: the fault of a network that forgot a
/// connection, on real sockets.
pub struct SilentProxy {
    port: u16,
    silence: Arc<watch::Sender<Option<(Silence, Which)>>>,
    accept: JoinHandle<()>,
}

impl SilentProxy {
    pub async fn start(target: u16) -> SilentProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silence = Arc::new(watch::Sender::new(None));
        let accept = {
            let silence = silence.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    // A connection made after a silence is a new one: it
                    // passes until the next.
                    let mut silence = silence.subscribe();
                    silence.mark_unchanged();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await {
                            relay(client, server, silence).await;
                        }
                    });
                }
            })
        };
        SilentProxy {
            port,
            silence,
            accept,
        }
    }

    /// `url` (naming `127.0.0.1:<target>`) through the proxy instead.
    pub fn route(&self, url: &str, target: u16) -> String {
        let routed = url.replace(
            &format!("127.0.0.1:{target}"),
            &format!("127.0.0.1:{}", self.port),
        );
        assert_ne!(routed, url, "{url} does not name 127.0.0.1:{target}");
        routed
    }

    /// The open connections that `which` selects go silent, the `how` way,
    /// and stay so (never closed while the proxy runs).
    pub fn silence(&self, how: Silence, which: Which) {
        self.silence.send_replace(Some((how, which)));
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    mut silence: watch::Receiver<Option<(Silence, Which)>>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    // Whether the client's startup packet asked for a replication session;
    // it is in the first chunk, or the second after an SSLRequest.
    let mut replication = false;
    let mut chunks = 0;
    let how = loop {
        tokio::select! {
            read = from_client.read(&mut up) => match read {
                Ok(n) if n > 0 => {
                    if chunks < 2 {
                        replication |= up[..n].windows(12).any(|w| w == b"replication\0");
                        chunks += 1;
                    }
                    if to_server.write_all(&up[..n]).await.is_err() { return }
                }
                _ => return,
            },
            read = from_server.read(&mut down) => match read {
                Ok(n) if n > 0 => if to_client.write_all(&down[..n]).await.is_err() { return },
                _ => return,
            },
            changed = silence.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some((how, which)) = *silence.borrow_and_update() else { continue };
                let selected = match which {
                    Which::All => true,
                    Which::Replication => replication,
                    Which::Queries => !replication,
                };
                if selected {
                    break how;
                }
            }
        }
    };
    match how {
        // Read both sides for as long as they send, pass nothing on.
        Silence::Discard => {
            let discard = |mut from: tokio::net::tcp::OwnedReadHalf| async move {
                let mut sink = vec![0u8; 64 * 1024];
                while matches!(from.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::join!(discard(from_client), discard(from_server));
            // Keep the write halves open: no FIN either way.
            std::future::pending::<()>().await;
            drop((to_client, to_server));
        }
        // Hold every socket open, read nothing.
        Silence::Stall => {
            std::future::pending::<()>().await;
            drop((from_client, to_client, from_server, to_server));
        }
    }
}
