//! The replication connection's TLS. pgwire-replication's own TLS would
//! compile a second crypto provider and a C library (its tokio-rustls takes
//! default features), and verify by rules of its own. So the tailer
//! negotiates TLS itself ([`replication_bridge`]): it connects, sends the
//! SSLRequest, completes the handshake with the query connections' rustls
//! configuration (`tls::postgres`), and hands pgwire-replication a local
//! address that forwards to that stream: a Unix socket in a directory only
//! this user can enter, made for the one connection and removed once it is
//! taken, or, where no directory can be made (a read-only file system), a
//! loopback port. The Unix socket costs less per message (measured in
//! docs/benchmarks.md, "The replication session's TLS and bridge").
//! Handshake failures are reported exactly as on the query connections.

use crate::tls::describe;
use crate::tls::postgres::{PgTls, PgTlsError, SslMode};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Connects to `host:port`, negotiates TLS as `tls` says (verifying the
/// certificate against `name`, libpq's `host`, which differs from the
/// address dialled when `hostaddr` is given), and returns a
/// local address whose first connection is forwarded to that session
/// (the listener closes after it). With `prefer` and a server that declines,
/// the forwarded session is plaintext. The socket to the server gets
/// keepalives and `TCP_USER_TIMEOUT` = `silence` (see `crate::db`).
pub(crate) async fn replication_bridge(
    host: &str,
    name: &str,
    port: u16,
    tls: &PgTls,
    timeout: Duration,
    silence: Duration,
) -> Result<BridgeAddr, PgTlsError> {
    let config = tls.client_config()?;
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|_| PgTlsError::Handshake(format!("{name:?} is not a valid host name for TLS")))?;
    let negotiate = async {
        let mut tcp = crate::db::dial_tcp(host, port, silence).await?;
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return match tls.mode {
                SslMode::Prefer => Ok(Upstream::Plain(tcp)),
                mode => Err(PgTlsError::NotOffered(mode.name())),
            };
        }
        tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map(|stream| Upstream::Tls(Box::new(stream)))
            .map_err(|e| match describe(&e) {
                Some(refused) => PgTlsError::Handshake(refused),
                // Not a verdict on certificates: the connection broke.
                None => PgTlsError::Io(e),
            })
    };
    let upstream = tokio::time::timeout(timeout, negotiate)
        .await
        .map_err(|_| {
            PgTlsError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no session with {host}:{port} within {timeout:?}"),
            ))
        })??;
    let (listener, local) = BridgeListener::bind(&std::env::temp_dir(), port).await?;
    tokio::spawn(async move {
        let accepted = tokio::time::timeout(timeout, listener.accept_own()).await;
        let copied = match accepted {
            Ok(Ok(Inner::Unix(inner))) => forward(inner, upstream).await,
            Ok(Ok(Inner::Tcp(inner))) => {
                let _ = inner.set_nodelay(true);
                forward(inner, upstream).await
            }
            _ => return,
        };
        if let Err(error) = copied {
            tracing::debug!(%error, "replication connection closed");
        }
    });
    Ok(local)
}

/// Where pgwire-replication connects to reach a bridged session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BridgeAddr {
    /// The socket `{dir}/.s.PGSQL.{port}`, as libpq names one.
    Unix { dir: PathBuf, port: u16 },
    /// A loopback port: no directory could be made for a socket.
    Tcp(SocketAddr),
}

/// The bridge's listener, for one connection.
enum BridgeListener {
    /// Removes its directory (and the socket in it) when dropped.
    Unix {
        listener: UnixListener,
        _dir: PrivateDir,
    },
    Tcp(TcpListener),
}

enum Inner {
    Unix(tokio::net::UnixStream),
    Tcp(TcpStream),
}

impl BridgeListener {
    /// A Unix socket in a new directory under `base` that only this user
    /// can enter; a loopback port where that cannot be made.
    async fn bind(base: &Path, port: u16) -> std::io::Result<(BridgeListener, BridgeAddr)> {
        match Self::bind_unix(base, port) {
            Ok(bound) => Ok(bound),
            Err(error) => {
                tracing::debug!(%error, "no Unix socket for the replication bridge; using a loopback port");
                let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
                let local = listener.local_addr()?;
                Ok((BridgeListener::Tcp(listener), BridgeAddr::Tcp(local)))
            }
        }
    }

    /// Fails on a read-only file system, a path too long for a socket, or
    /// one pgwire-replication would not take for a socket directory
    /// (relative, or not UTF-8).
    fn bind_unix(base: &Path, port: u16) -> std::io::Result<(BridgeListener, BridgeAddr)> {
        if !base.is_absolute() || base.to_str().is_none() {
            return Err(std::io::Error::other(format!(
                "{} is not an absolute UTF-8 path",
                base.display()
            )));
        }
        let dir = PrivateDir::create(base)?;
        let listener = UnixListener::bind(dir.0.join(format!(".s.PGSQL.{port}")))?;
        let local = BridgeAddr::Unix {
            dir: dir.0.clone(),
            port,
        };
        Ok((
            BridgeListener::Unix {
                listener,
                _dir: dir,
            },
            local,
        ))
    }

    /// The first connection from this process itself (pgwire-replication's):
    /// another local process that races for the socket is turned away, it
    /// must not inherit a session authenticated as the tailer.
    async fn accept_own(self) -> std::io::Result<Inner> {
        loop {
            let peer = match &self {
                BridgeListener::Unix { listener, .. } => {
                    let (inner, _) = listener.accept().await?;
                    // Where the system gives no pid it cannot tell, and the
                    // directory already keeps other users out.
                    let pid = inner.peer_cred()?.pid();
                    let own = i32::try_from(std::process::id()).ok();
                    if pid.is_none_or(|pid| Some(pid) == own) {
                        return Ok(Inner::Unix(inner));
                    }
                    format!("pid {pid:?}")
                }
                BridgeListener::Tcp(listener) => {
                    let (inner, peer) = listener.accept().await?;
                    if is_own_socket(peer) {
                        return Ok(Inner::Tcp(inner));
                    }
                    peer.to_string()
                }
            };
            tracing::warn!(%peer, "refused a connection to the replication bridge from another process");
        }
    }
}

/// A directory of this process's, mode 0700, removed with what is in it when
/// dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create(base: &Path) -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        // 64 random bits: short, since a socket's path has 107 bytes at most.
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        let path = base.join(format!("outbox-tailer-{random:016x}"));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(PrivateDir(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies both ways between pgwire-replication's connection and the
/// server's until either side closes.
async fn forward<I: AsyncRead + AsyncWrite + Unpin>(
    mut inner: I,
    upstream: Upstream,
) -> std::io::Result<(u64, u64)> {
    match upstream {
        Upstream::Tls(mut tls) => tokio::io::copy_bidirectional(&mut inner, &mut *tls).await,
        Upstream::Plain(mut tcp) => tokio::io::copy_bidirectional(&mut inner, &mut tcp).await,
    }
}

/// Whether the connection from `peer` (on loopback) is a socket this process
/// holds: its inode, from `/proc/net/tcp`, among our file descriptors.
/// Without `/proc` (not Linux) it cannot tell and says yes.
fn is_own_socket(peer: SocketAddr) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let wanted = format!(":{:04X}", peer.port());
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = fields.get(1)?;
        local
            .ends_with(&wanted)
            .then(|| fields.get(9).map(|i| i.to_string()))?
    });
    let Some(inode) = inode else {
        return false;
    };
    let link = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd").is_ok_and(|fds| {
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link.as_str())
        })
    })
}

enum Upstream {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of the test's own under the system's temporary one.
    fn test_base(name: &str) -> PathBuf {
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        let base = std::env::temp_dir().join(format!("ot-{name}-{random:016x}"));
        std::fs::create_dir(&base).unwrap();
        base
    }

    #[tokio::test]
    async fn the_bridge_is_a_unix_socket_in_a_private_directory_gone_once_taken() {
        use std::os::unix::fs::PermissionsExt;
        let base = test_base("unix");
        let (listener, local) = BridgeListener::bind(&base, 5432).await.unwrap();
        let BridgeAddr::Unix { dir, port } = local else {
            panic!("expected a Unix socket, got {local:?}");
        };
        assert_eq!((dir.parent(), port), (Some(base.as_path()), 5432));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "only this user may enter {dir:?}");
        let path = dir.join(".s.PGSQL.5432");
        let (accepted, connected) = tokio::join!(
            listener.accept_own(),
            tokio::net::UnixStream::connect(&path)
        );
        assert!(matches!(accepted.unwrap(), Inner::Unix(_)));
        connected.unwrap();
        assert!(
            !dir.exists(),
            "{dir:?} stays behind once its connection is taken"
        );
        std::fs::remove_dir(&base).unwrap();
    }

    #[tokio::test]
    async fn another_process_is_turned_away_from_the_unix_bridge() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let base = test_base("peer");
        let (listener, local) = BridgeListener::bind(&base, 5432).await.unwrap();
        let BridgeAddr::Unix { dir, .. } = local else {
            panic!("expected a Unix socket, got {local:?}");
        };
        let path = dir.join(".s.PGSQL.5432");
        // Another process connects first and holds its connection.
        let mut other = tokio::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys, time\n\
                 s = socket.socket(socket.AF_UNIX)\n\
                 s.connect(sys.argv[1])\n\
                 print('connected', flush=True)\n\
                 time.sleep(30)",
            ])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut said = [0u8; 9];
        let stdout = other.stdout.as_mut().unwrap();
        tokio::time::timeout(Duration::from_secs(10), stdout.read_exact(&mut said))
            .await
            .expect("the other process connects within 10 s")
            .unwrap();
        let accepting = tokio::spawn(listener.accept_own());
        let mut ours = tokio::net::UnixStream::connect(&path).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("our own connection is accepted within 10 s")
            .unwrap()
            .unwrap();
        let Inner::Unix(mut accepted) = accepted else {
            panic!("a Unix socket was listening");
        };
        accepted.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), ours.read_exact(&mut got))
            .await
            .expect("the accepted connection is ours")
            .unwrap();
        std::fs::remove_dir(&base).unwrap();
    }

    #[tokio::test]
    async fn a_relative_temporary_directory_gives_a_loopback_port() {
        // pgwire-replication takes only an absolute host for a socket
        // directory; a relative one would be dialled as a host name.
        let (_, local) = BridgeListener::bind(Path::new("."), 5432).await.unwrap();
        assert!(matches!(local, BridgeAddr::Tcp(_)), "{local:?}");
    }

    #[tokio::test]
    async fn without_a_directory_the_bridge_takes_a_loopback_port() {
        let missing = std::env::temp_dir().join(format!(
            "outbox-tailer-test-missing-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let (listener, local) = BridgeListener::bind(&missing, 5432).await.unwrap();
        let BridgeAddr::Tcp(addr) = local else {
            panic!("expected a loopback port, got {local:?}");
        };
        assert!(addr.ip().is_loopback());
        let (accepted, connected) =
            tokio::join!(listener.accept_own(), tokio::net::TcpStream::connect(addr));
        assert!(matches!(accepted.unwrap(), Inner::Tcp(_)));
        connected.unwrap();
    }

    #[test]
    fn a_socket_of_this_process_is_its_own_and_another_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(is_own_socket(ours.local_addr().unwrap()));
        // A port no socket of ours uses.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!is_own_socket(free));
    }
}
