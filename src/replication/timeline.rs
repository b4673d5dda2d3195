//! Which PostgreSQL the tailer streams from: the cluster's system identifier
//! and the server's timeline, read when each session starts, and what the
//! process remembers of the last one (a change of primary is logged and
//! counted).
//!
//! A promoted standby starts a new timeline. Before PostgreSQL 17 it has no
//! copy of the logical slot, so the session creates one at the new
//! primary's current position: transactions that committed before it (on
//! the old primary, replicated) are never streamed, and the catch-up
//! sweeper publishes those still `pending`. Positions of the old timeline
//! mean nothing to the new slot, so the sweeper's boundary is tied to a
//! server (`outbox::boundary::Boundary`).

use std::fmt;
use tokio_postgres::Client;

/// The cluster's system identifier (shared by a primary and its physical
/// standbys) and the timeline its WAL is written on now (a promotion starts
/// the next one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ServerId {
    pub(crate) system: u64,
    pub(crate) timeline: u32,
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system {} timeline {}", self.system, self.timeline)
    }
}

/// The system identifier and the WAL file being written (whose first eight
/// hex digits are the insert timeline; `pg_control_checkpoint()` would lag
/// a promotion until its checkpoint ends). Any role may run it; it fails on
/// a standby (`pg_walfile_name` refuses during recovery), which is right:
/// the tailer streams from a primary.
pub(crate) const IDENTITY_SQL: &str =
    "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
            pg_walfile_name(pg_current_wal_insert_lsn())";

/// Reads the [`ServerId`] over a query connection.
pub(crate) async fn query(db: &Client) -> Result<ServerId, tokio_postgres::Error> {
    let row = db.query_one(IDENTITY_SQL, &[]).await?;
    Ok(parse(row.get(0), row.get(1)))
}

/// The identity from [`IDENTITY_SQL`]'s two texts. Unparsable text (never
/// seen) gives 0s: two such servers look alike, which only delays sweeping.
pub(crate) fn parse(system: &str, walfile: &str) -> ServerId {
    ServerId {
        system: parse_system(system),
        timeline: walfile
            .get(..8)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .unwrap_or(0),
    }
}

/// A system identifier as text: IDENTIFY_SYSTEM prints it unsigned,
/// `pg_control_system()` as a signed bigint.
pub(crate) fn parse_system(text: &str) -> u64 {
    text.parse::<u64>()
        .or_else(|_| text.parse::<i64>().map(|signed| signed as u64))
        .unwrap_or(0)
}

/// What a session start tells about the server, compared with the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// The process's first session.
    First,
    /// The same server (or a restart of it).
    Same,
    /// Another primary of the same cluster (a promoted standby), or another
    /// cluster altogether.
    Primary { from: ServerId, to: ServerId },
}

/// The server of the last session, for the process's lifetime.
#[derive(Debug, Default)]
pub(crate) struct PrimaryWatch {
    last: Option<ServerId>,
}

impl PrimaryWatch {
    pub(crate) fn observe(&mut self, now: ServerId) -> Change {
        match self.last.replace(now) {
            None => Change::First,
            Some(before) if before == now => Change::Same,
            Some(before) => Change::Primary {
                from: before,
                to: now,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_is_the_walfile_prefix() {
        let id = parse("7714690223493633029", "000000020000000000000003");
        assert_eq!(
            id,
            ServerId {
                system: 7714690223493633029,
                timeline: 2
            }
        );
        assert_eq!(parse("1", "0000001A0000000000000003").timeline, 26);
        assert_eq!(parse_system("-1"), u64::MAX, "a signed bigint");
        assert_eq!(
            parse("x", "short"),
            ServerId {
                system: 0,
                timeline: 0
            }
        );
    }

    #[test]
    fn a_new_timeline_or_system_is_a_change_of_primary() {
        let mut watch = PrimaryWatch::default();
        let one = ServerId {
            system: 7,
            timeline: 1,
        };
        let two = ServerId { timeline: 2, ..one };
        assert_eq!(watch.observe(one), Change::First);
        assert_eq!(watch.observe(one), Change::Same, "a restart");
        assert_eq!(watch.observe(two), Change::Primary { from: one, to: two });
        let other = ServerId {
            system: 8,
            timeline: 2,
        };
        assert_eq!(
            watch.observe(other),
            Change::Primary {
                from: two,
                to: other
            }
        );
    }
}
