//! Start-up checks and the database side of `setup`: wal_level, the role's
//! REPLICATION attribute, the insert-only publication and the pgoutput slot.
//! Each failure is one line that says what to do.

use crate::config::Config;
use crate::db::hosts::Endpoint;
use crate::db::{self, error_text};
use crate::event::OUTBOX_TABLE;
use crate::replication::timeline;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Unreachable(#[from] db::Unreachable),
    #[error("wal_level is {0:?}, but logical decoding needs wal_level = logical: set it in postgresql.conf and restart PostgreSQL")]
    WalLevel(String),
    #[error("role {0:?} lacks the REPLICATION attribute: ALTER ROLE {0} REPLICATION (or use sql/roles.sql)")]
    NotReplicationRole(String),
    #[error("publication {name:?} is missing and cannot be created ({reason}): run `alembic upgrade head`, or CREATE PUBLICATION {name} FOR TABLE {OUTBOX_TABLE} WITH (publish = 'insert') as the table's owner")]
    Publication { name: String, reason: String },
    #[error("{OUTBOX_TABLE} is partitioned but publication {name:?} publishes its partitions under their own names, so the stream would miss every event; cannot fix it ({reason}): run `alembic upgrade head`, or ALTER PUBLICATION {name} SET (publish_via_partition_root = true) as its owner")]
    PartitionRoot { name: String, reason: String },
    #[error("table {OUTBOX_TABLE} does not exist: run `alembic upgrade head` (or psql -f sql/schema.sql)")]
    NoOutboxTable,
    #[error("replication slot {name:?} uses plugin {plugin:?} on database {database:?}; outbox-tailer needs a pgoutput slot on {expected:?}: drop it or choose another --slot")]
    WrongSlot {
        name: String,
        plugin: String,
        database: String,
        expected: String,
    },
    #[error("replication slot {0:?} was invalidated by the server (wal_status lost, e.g. max_slot_wal_keep_size): drop it with SELECT pg_drop_replication_slot('{0}'); the tailer recreates it and its sweeper publishes the rows still pending")]
    SlotLost(String),
    #[error("--slot-failover needs PostgreSQL 17 or later (failover slots), but the server is PostgreSQL {version}: drop --slot-failover (OUTBOX_SLOT_FAILOVER), or upgrade PostgreSQL")]
    SlotFailoverUnsupported { version: String },
    #[error("cannot create replication slot {name:?}: {}", error_text(.error))]
    Slot {
        name: String,
        #[source]
        error: tokio_postgres::Error,
    },
    #[error("cannot listen on --metrics-addr {addr}: {reason}")]
    MetricsAddr {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Everything the tailer needs from the database before it streams, created
/// when missing: the checks of `run` and `setup`.
pub(crate) async fn prepare(db: &Client, config: &Config) -> Result<(), SetupError> {
    check_server(db, config).await?;
    ensure_publication(db, &config.publication).await?;
    ensure_slot(db, config, None).await.map(drop)
}

/// `wal_level = logical`, a role that may replicate, and failover slots
/// when `--slot-failover` asks for them.
pub(crate) async fn check_server(db: &Client, config: &Config) -> Result<(), SetupError> {
    let wal_level: String = db.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }
    if config.slot_failover {
        let row = db
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
                &[],
            )
            .await?;
        if row.get::<_, i32>(0) < FAILOVER_SLOTS {
            return Err(SetupError::SlotFailoverUnsupported {
                version: row.get(1),
            });
        }
    }
    let row = db
        .query_one("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await?;
    if !row.get::<_, bool>(1) {
        return Err(SetupError::NotReplicationRole(row.get(0)));
    }
    Ok(())
}

async fn ensure_publication(db: &Client, name: &str) -> Result<(), SetupError> {
    let existing = db
        .query_opt(
            "SELECT pubupdate OR pubdelete OR pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    if let Some(row) = existing {
        if row.get::<_, bool>(0) {
            tracing::warn!(publication = name, "publication also publishes updates/deletes/truncates; they are skipped, but cost decoding work: ALTER PUBLICATION {name} SET (publish = 'insert')");
        }
        if !row.get::<_, bool>(1) && outbox_is_partitioned(db).await? {
            return via_partition_root(db, name).await;
        }
        return Ok(());
    }
    let table: Option<String> = db
        .query_one("SELECT to_regclass($1)::text", &[&OUTBOX_TABLE])
        .await?
        .get(0);
    if table.is_none() {
        return Err(SetupError::NoOutboxTable);
    }
    // The name passed validation ([a-z_][a-z0-9_]*), so it needs no quoting.
    let create = format!(
        "CREATE PUBLICATION {name} FOR TABLE {OUTBOX_TABLE} \
         WITH (publish = 'insert', publish_via_partition_root = true)"
    );
    match db.batch_execute(&create).await {
        Ok(()) => {
            tracing::info!(publication = name, "created publication");
            Ok(())
        }
        // Another tailer created it a moment ago.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(SetupError::Publication {
            name: name.to_owned(),
            reason: error_text(&e),
        }),
    }
}

/// Whether `event_outbox` is a partitioned table (declarative partitioning).
async fn outbox_is_partitioned(db: &Client) -> Result<bool, SetupError> {
    let kind: Option<i8> = db
        .query_opt(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass($1)",
            &[&OUTBOX_TABLE],
        )
        .await?
        .map(|row| row.get(0));
    Ok(kind == Some(b'p' as i8))
}

/// A partitioned outbox must be published via its root: otherwise pgoutput
/// names each leaf partition, the stream sees no `event_outbox` insert and
/// only the slow catch-up path would publish them, out of order. Fixed when
/// the role may (the publication's owner), refused with the fix otherwise.
async fn via_partition_root(db: &Client, name: &str) -> Result<(), SetupError> {
    let alter = format!("ALTER PUBLICATION {name} SET (publish_via_partition_root = true)");
    match db.batch_execute(&alter).await {
        Ok(()) => {
            tracing::warn!(publication = name, "event_outbox is partitioned: set publish_via_partition_root = true on the publication");
            Ok(())
        }
        Err(e) => Err(SetupError::PartitionRoot {
            name: name.to_owned(),
            reason: error_text(&e),
        }),
    }
}

/// The first `server_version_num` with failover slots (PostgreSQL 17).
const FAILOVER_SLOTS: i32 = 170_000;

/// Whether [`ensure_slot`] found the slot or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Existed,
    Created,
}

/// Creates the slot when missing (every session checks: a slot dropped
/// while the tailer runs is recreated, and so is the slot a promoted
/// standby lacks before PostgreSQL 17; the sweeper publishes the rows the
/// stream will not deliver). With `failover` (PostgreSQL 17+, checked at
/// start) the slot is created with `failover = true`. A slot the server
/// invalidated is an error that says how to recover. The slot is created on
/// a session of its own to `endpoint` (the session's server; the URL's
/// first at start-up), whose deadline allows for the wait creating a slot
/// may take (`db::connect_for_slot`).
pub(crate) async fn ensure_slot(
    db: &Client,
    config: &Config,
    endpoint: Option<&Endpoint>,
) -> Result<Slot, SetupError> {
    let (name, failover) = (config.slot.as_str(), config.slot_failover);
    let existing = db
        .query_opt(
            "SELECT coalesce(plugin, ''), coalesce(database, ''), current_database()::text, \
                    coalesce(wal_status, '') = 'lost' \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    if let Some(row) = existing {
        let (plugin, database, expected): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        if row.get::<_, bool>(3) {
            return Err(SetupError::SlotLost(name.to_owned()));
        }
        if plugin != "pgoutput" || database != expected {
            return Err(SetupError::WrongSlot {
                name: name.to_owned(),
                plugin,
                database,
                expected,
            });
        }
        if failover {
            warn_unless_failover(db, name).await?;
        }
        return Ok(Slot::Existed);
    }
    // (name, plugin, temporary, two_phase, failover): the five-argument
    // form exists from PostgreSQL 17 on.
    let create = if failover {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let creator = db::connect_for_slot(config, endpoint).await?;
    match creator.execute(create, &[&name]).await {
        Ok(_) => {
            tracing::info!(slot = name, failover, "created replication slot");
            // A restarted tailer cannot know the previous primary, but a
            // new slot on a later timeline is the sign of a promotion.
            if let Ok(server) = timeline::query(db).await {
                if server.timeline > 1 {
                    tracing::info!("slot {name} created on timeline {} ({server}): if this server was promoted, rows still pending are published by the catch-up sweeper", server.timeline);
                }
            }
            Ok(Slot::Created)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
            Ok(Slot::Existed)
        }
        Err(error) => Err(SetupError::Slot {
            name: name.to_owned(),
            error,
        }),
    }
}

/// A slot made before `--slot-failover` was given is not synchronised to
/// standbys: said once per session (the tailer does not alter a slot it
/// holds no session on).
async fn warn_unless_failover(db: &Client, name: &str) -> Result<(), SetupError> {
    let failover: Option<bool> = db
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .map(|row| row.get(0));
    if failover == Some(false) {
        tracing::warn!(slot = name, "--slot-failover is set but slot {name} was created without failover, so standbys do not synchronise it: run ALTER_REPLICATION_SLOT {name} (FAILOVER true) on a replication connection while no tailer streams, or drop the slot (the tailer recreates it; the sweeper publishes what is pending)");
    }
    Ok(())
}
