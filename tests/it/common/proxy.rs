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
