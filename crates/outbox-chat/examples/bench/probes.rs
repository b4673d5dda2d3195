//! What the benchmark reads off the servers: the slot, the walsender's CPU, the version, the cores.

use crate::Result;
use outbox_testkit::procfs::{self};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

pub(crate) async fn wait_slot_active(db: &Client, active: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'event_outbox_tailer'",
                &[],
            )
            .await?;
        if row.map(|r| r.get::<_, bool>(0)) == Some(active) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the slot did not become active={active}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds of the walsender streaming the tailer's slot (started with
/// the phase's publisher, so all of it is the phase's); None without one.
/// One process decodes the whole slot: busy near 100% it is the limit,
/// whatever the other core does.
pub(crate) async fn walsender_cpu(db: &Client) -> Result<Option<f64>> {
    let pid: Option<i32> = db
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots \
             WHERE slot_name = 'event_outbox_tailer' AND active",
            &[],
        )
        .await?
        .and_then(|row| row.get(0));
    Ok(pid
        .and_then(|pid| u32::try_from(pid).ok())
        .map(|pid| procfs::usage(pid).cpu_seconds))
}

pub(crate) async fn pg_version(db: &Client) -> Result<String> {
    Ok(db.query_one("SHOW server_version", &[]).await?.get(0))
}

pub(crate) fn num_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
