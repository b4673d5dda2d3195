//! Throwaway servers for tests, the demo and the benchmarks: a PostgreSQL with
//! `wal_level=logical`, a `nats-server -js` (or a cluster of three) and a
//! Prometheus, each on a free loopback port in a temp dir of its own, stopped
//! (and its files removed) when the handle drops, also when a test panics.
//!
//! Nothing here ever talks to the machine's own services on 5432/4222: every
//! server is started from the installed binaries on a port the kernel hands out.
//! A test can stop and start either server again on the same port and data
//! directory, which is how later tests inject faults.

mod certs;
mod nats;
mod nats_cluster;
mod pg;
mod process;
pub mod procfs;
mod prometheus;

pub use certs::Certs;
pub use nats::NatsServer;
pub use nats_cluster::NatsCluster;
pub use pg::{PgBuilder, PgServer, StopMode};
pub use prometheus::PrometheusServer;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a throwaway server could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} not found: {hint}")]
    NotFound { what: String, hint: String },
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {timeout:?}; last lines of its log:\n{log}")]
    NotReady {
        what: String,
        timeout: Duration,
        log: String,
    },
    #[error("{what} exited with {status}: {output}")]
    Failed {
        what: String,
        status: String,
        output: String,
    },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl HarnessError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}

/// Asks the kernel for a free loopback port. The port is released before it is
/// used, so another process could take it in between; the servers' start-up
/// checks turn that (rare) race into a clear error rather than a wrong server.
pub fn free_port() -> Result<u16, HarnessError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(HarnessError::io("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(HarnessError::io("reading a bound port"))?
        .port();
    Ok(port)
}

/// Starts a server on a free port, trying another port (three in all) when
/// one was taken between [`free_port`] and the server binding it.
fn start_on_free_port<S>(
    server: &mut S,
    mut start: impl FnMut(&mut S, u16) -> Result<(), HarnessError>,
) -> Result<(), HarnessError> {
    let mut last_error = None;
    for _ in 0..3 {
        match start(server, free_port()?) {
            Ok(()) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.expect("three attempts were made"))
}

/// The repository root (where `alembic.ini` lives): this crate sits in
/// `crates/outbox-testkit` under it.
pub fn repo_root() -> &'static Path {
    let here: &'static Path = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().and_then(Path::parent).unwrap_or(here)
}

/// The `outbox-tailer` binary for programs outside its package (the demo and
/// the benchmark): `$OUTBOX_TAILER_BIN` if set, else the one built beside the
/// running example (`target/<profile>/examples/x` → `target/<profile>/outbox-tailer`).
pub fn tailer_bin() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("OUTBOX_TAILER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("outbox-tailer")));
    match beside {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(HarnessError::NotFound {
            what: "outbox-tailer binary".into(),
            hint: "cargo build --bin outbox-tailer (same profile), or set OUTBOX_TAILER_BIN".into(),
        }),
    }
}

/// The Alembic executable: `$ALEMBIC` if set, else the project's venv
/// (`.venv/bin/alembic`, made by `scripts/setup`).
pub fn alembic_bin() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("ALEMBIC") {
        return Ok(PathBuf::from(path));
    }
    let venv = repo_root().join(".venv/bin/alembic");
    if venv.exists() {
        return Ok(venv);
    }
    Err(HarnessError::NotFound {
        what: "alembic".into(),
        hint: "run scripts/setup (it makes .venv with alembic/requirements.txt) or set ALEMBIC"
            .into(),
    })
}

/// Runs `alembic <args>` from the repository root against `database_url`, as
/// the deploy pipeline does, and returns its combined output.
pub fn alembic(database_url: &str, args: &[&str]) -> Result<String, HarnessError> {
    let output = std::process::Command::new(alembic_bin()?)
        .args(args)
        .current_dir(repo_root())
        .env("DATABASE_URL", database_url)
        .output()
        .map_err(HarnessError::io("running alembic"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(HarnessError::Failed {
            what: format!("alembic {}", args.join(" ")),
            status: output.status.to_string(),
            output: text,
        })
    }
}
