//! A throwaway PostgreSQL: `initdb` into a temp dir, `postgres` on a free
//! loopback port with `wal_level=logical`, stopped and removed on drop.

use super::process::{die_with_parent, find_binary, ready_or_kill, signal, user_ids, wait_or_kill};
use super::{start_on_free_port, HarnessError};
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How to stop the server, as `pg_ctl stop -m <mode>` would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: disconnect every client, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once; the next start runs crash recovery.
    Immediate,
}

/// Settings for a throwaway server, on top of the harness defaults
/// (`wal_level=logical`, `track_commit_timestamp=on`, `fsync=off`, ...).
#[derive(Debug, Default, Clone)]
pub struct PgBuilder {
    settings: Vec<(String, String)>,
    /// Server certificate and key: `ssl = on` with them.
    tls: Option<(PathBuf, PathBuf)>,
}

impl PgBuilder {
    /// Serves TLS (as well as plaintext) with this certificate and key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_owned(), key.to_owned()));
        self
    }

    /// Adds `-c name=value`; a later setting of the same name wins.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn start(self) -> Result<PgServer, HarnessError> {
        PgServer::init(self.settings, self.tls)
    }
}

/// A running (or deliberately stopped) throwaway PostgreSQL.
///
/// Start it from the test's own thread: the server is also killed when the
/// thread that started it exits (so a killed test run leaves no server behind).
pub struct PgServer {
    // Field order matters for Drop: the server stops (Drop body) before the
    // directory holding its data is removed (field drop).
    child: Option<Child>,
    port: u16,
    bindir: PathBuf,
    /// uid/gid to run as: initdb and postgres refuse to run as root.
    run_as: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// Starts a server with the harness defaults.
    pub fn start() -> Result<PgServer, HarnessError> {
        PgBuilder::default().start()
    }

    pub fn builder() -> PgBuilder {
        PgBuilder::default()
    }

    fn init(
        mut settings: Vec<(String, String)>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<PgServer, HarnessError> {
        let bindir = bindir()?;
        let run_as = if running_as_root() {
            Some(user_ids("postgres")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("outbox-tailer-pg-")
            .tempdir()
            .map_err(HarnessError::io("creating a temp dir"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(
                HarnessError::io("handing the temp dir to the postgres user"),
            )?;
        }
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run_to_end(as_user(&mut initdb, run_as, dir.path()), "initdb")?;
        if let Some((cert, key)) = tls {
            // The key must belong to the server's user, readable by it alone.
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                let to = dir.path().join(name);
                std::fs::copy(&from, &to).map_err(HarnessError::io("copying the TLS files"))?;
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(HarnessError::io("protecting the TLS files"))?;
                if let Some((uid, gid)) = run_as {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                        .map_err(HarnessError::io("handing the TLS files to postgres"))?;
                }
                let setting = if name.ends_with(".crt") {
                    "ssl_cert_file"
                } else {
                    "ssl_key_file"
                };
                settings.push((setting.into(), to.display().to_string()));
            }
            settings.push(("ssl".into(), "on".into()));
        }

        let mut server = PgServer {
            child: None,
            port: 0,
            bindir,
            run_as,
            settings,
            dir,
        };
        start_on_free_port(&mut server, |server, port| {
            server.port = port;
            server.start_again()
        })?;
        Ok(server)
    }

    /// A physical standby of `primary`: `pg_basebackup -R` over loopback
    /// into a temp dir of its own, started on a free port with the primary's
    /// settings. It streams from the primary (hot standby, read-only) until
    /// [`PgServer::promote`]. The primary's defaults allow it (`wal_level`,
    /// `max_wal_senders`, and initdb's `host replication all 127.0.0.1/32
    /// trust`). Before PostgreSQL 17 it has no copy of any logical slot.
    pub fn standby_of(primary: &PgServer) -> Result<PgServer, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("outbox-tailer-pg-standby-")
            .tempdir()
            .map_err(HarnessError::io("creating a temp dir"))?;
        if let Some((uid, gid)) = primary.run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(
                HarnessError::io("handing the temp dir to the postgres user"),
            )?;
        }
        let mut backup = Command::new(primary.bindir.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast"])
            .arg("--no-sync");
        run_to_end(
            as_user(&mut backup, primary.run_as, dir.path()),
            "pg_basebackup",
        )?;
        let mut standby = PgServer {
            child: None,
            port: 0,
            bindir: primary.bindir.clone(),
            run_as: primary.run_as,
            settings: primary.settings.clone(),
            dir,
        };
        start_on_free_port(&mut standby, |server, port| {
            server.port = port;
            server.start_again()
        })?;
        Ok(standby)
    }

    /// Promotes a standby (`pg_ctl promote`, which waits until the server
    /// is out of recovery and accepts writes, at most 60 s).
    pub fn promote(&self) -> Result<(), HarnessError> {
        let mut promote = Command::new(self.bindir.join("pg_ctl"));
        promote
            .arg("promote")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60"]);
        run_to_end(
            as_user(&mut promote, self.run_as, self.dir.path()),
            "pg_ctl promote",
        )
    }

    /// Starts the stopped server again, on the same port and data directory.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self.log_file()?;
        let mut command = Command::new(self.bindir.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ));
        let defaults = [
            ("listen_addresses", "127.0.0.1"),
            ("wal_level", "logical"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("track_commit_timestamp", "on"),
            ("fsync", "off"),
            ("shared_buffers", "64MB"),
            ("max_connections", "100"),
        ];
        let settings = defaults
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(self.settings.iter().cloned());
        for (name, value) in settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .stdout(Stdio::from(
                log.try_clone()
                    .map_err(HarnessError::io("cloning the log fd"))?,
            ))
            .stderr(Stdio::from(log));
        as_user(&mut command, self.run_as, self.dir.path());
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(HarnessError::io("starting postgres"))?;

        let pid_file = self.data_dir().join("postmaster.pid");
        let expected_pid = child.id().to_string();
        let child = ready_or_kill(
            child,
            &format!("postgres on port {}", self.port),
            START_TIMEOUT,
            &self.log_path(),
            || {
                // postmaster.pid: line 1 the pid, line 8 the state ("ready" once it
                // accepts connections).
                let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines.first() == Some(&expected_pid.as_str())
                    && lines.get(7).map(|s| s.trim()) == Some("ready")
            },
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server; `start_again` brings it back with its data.
    pub fn stop(&mut self, mode: StopMode) {
        if let Some(mut child) = self.child.take() {
            signal(
                &child,
                if mode == StopMode::Fast {
                    libc::SIGINT
                } else {
                    libc::SIGQUIT
                },
            );
            wait_or_kill(&mut child, STOP_TIMEOUT);
        }
    }

    /// `pg_ctl restart -m <mode>`: stop, then start on the same port.
    pub fn restart(&mut self, mode: StopMode) -> Result<(), HarnessError> {
        self.stop(mode);
        self.start_again()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The postmaster's pid, while it runs (its backends are its children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq URL for `database` as the superuser `postgres` (trust auth).
    pub fn url(&self, database: &str) -> String {
        self.url_as("postgres", database)
    }

    pub fn url_as(&self, user: &str, database: &str) -> String {
        format!("postgresql://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// One of the server's own binaries (`pg_dump`, `psql`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// Connects as `postgres` to `database`; the connection runs on a spawned task.
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, HarnessError> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, HarnessError> {
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(self.url(name))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn log_file(&self) -> Result<File, HarnessError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(HarnessError::io("opening the postgres log"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate: nothing here is worth a checkpoint, and it never hangs on
        // a client (a walsender waiting for its peer can hold up a fast stop).
        self.stop(StopMode::Immediate);
    }
}

/// The directory with `initdb` and `postgres`: `$PG_BINDIR`, else `PATH`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin` (Debian
/// does not put the server binaries on PATH).
fn bindir() -> Result<PathBuf, HarnessError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.extend(versioned.into_iter().rev());
    find_binary("initdb", &candidates)
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("postgres").is_file())
        .ok_or_else(|| HarnessError::NotFound {
            what: "initdb and postgres".into(),
            hint: "apt-get install -y postgresql (or set PG_BINDIR)".into(),
        })
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn as_user<'a>(
    command: &'a mut Command,
    run_as: Option<(u32, u32)>,
    cwd: &Path,
) -> &'a mut Command {
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid).env("HOME", cwd);
    }
    command.current_dir(cwd)
}

fn run_to_end(command: &mut Command, what: &str) -> Result<(), HarnessError> {
    let output = command
        .output()
        .map_err(HarnessError::io(format!("running {what}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Failed {
            what: what.into(),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}
