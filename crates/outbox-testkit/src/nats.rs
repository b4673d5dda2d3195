//! A throwaway `nats-server -js` on a free loopback port with its JetStream
//! store in a temp dir; stopped on drop, restartable on the same port and store.

use super::process::{die_with_parent, find_binary, ready_or_kill, signal, wait_or_kill};
use super::{start_on_free_port, HarnessError};
use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running (or deliberately stopped) throwaway nats-server with JetStream.
///
/// Start it from the test's own thread: the server is also killed when the
/// thread that started it exits.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    /// Extra command-line arguments (e.g. `--max_payload`), kept for restarts.
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer, HarnessError> {
        NatsServer::start_with(&[])
    }

    /// Starts with extra `nats-server` arguments.
    pub fn start_with(args: &[&str]) -> Result<NatsServer, HarnessError> {
        let mut server = NatsServer::unstarted(0, args.iter().map(|s| s.to_string()).collect())?;
        start_on_free_port(&mut server, |server, port| {
            server.port = port;
            server.start_again()
        })?;
        Ok(server)
    }

    /// A server to be started (with [`NatsServer::start_again`]) on `port`
    /// with `args`, its store in a temp dir of its own.
    pub(crate) fn unstarted(port: u16, args: Vec<String>) -> Result<NatsServer, HarnessError> {
        let binary = find_binary(
            "nats-server",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")],
        )
        .ok_or_else(|| HarnessError::NotFound {
            what: "nats-server".into(),
            hint: "apt-get install -y nats-server".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-tailer-nats-")
            .tempdir()
            .map_err(HarnessError::io("creating a temp dir"))?;
        Ok(NatsServer {
            child: None,
            port,
            binary,
            args,
            dir,
        })
    }

    /// Starts the stopped server again on the same port and JetStream store.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self.dir.path().join("nats.log");
        // A restart appends to the log: only what this start writes counts.
        let written = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut command = Command::new(&self.binary);
        command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(HarnessError::io("starting nats-server"))?;
        let port = self.port;
        // Ready once it greets a client with INFO; the log confirms it is ours
        // (and JetStream is up) rather than a stranger that took the port.
        let child = ready_or_kill(
            child,
            &format!("nats-server on port {port}"),
            START_TIMEOUT,
            &log,
            || {
                greets(port)
                    && std::fs::read(&log).is_ok_and(|text| {
                        text.get(written..)
                            .is_some_and(|new| contains(new, b"Server is ready"))
                    })
            },
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server: gracefully (SIGTERM) or as a crash (SIGKILL).
    pub fn stop(&mut self, graceful: bool) {
        if let Some(mut child) = self.child.take() {
            signal(
                &child,
                if graceful {
                    libc::SIGTERM
                } else {
                    libc::SIGKILL
                },
            );
            wait_or_kill(&mut child, STOP_TIMEOUT);
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop(false);
    }
}

fn greets(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"INFO"
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
