//! Whether a decoded transaction's rows can be seen yet. Logical decoding may
//! hand a transaction over before other sessions see its rows (the commit
//! record is flushed, the transaction is not yet visible: a synchronous
//! standby that stalls holds it there for as long as it stalls). A row
//! missing from the table is *gone* only once its transaction is visible;
//! until then it is *not visible yet*, and is waited for.
//!
//! The stream's transaction ids are 32 bits; PostgreSQL's visibility
//! functions take 64-bit ones. Each check widens against the server's
//! counter read at that moment ([`widen`]), never a stale one.

use crate::backoff::Backoff;
use std::collections::HashSet;
use tokio_postgres::GenericClient;

/// The wait between two looks at transactions not visible yet: the one
/// pause of the reader, the marker and the replay check, growing by
/// [`Backoff::VISIBILITY`] from one look to the next.
#[derive(Debug, Default)]
pub(crate) struct NotYetVisible {
    looks: u32,
}

impl NotYetVisible {
    /// Waits before the next look.
    pub(crate) async fn pause(&mut self) {
        tokio::time::sleep(Backoff::VISIBILITY.delay(self.looks)).await;
        self.looks += 1;
    }
}

const CURRENT_XID_SQL: &str = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text";
const VISIBLE_SQL: &str = "SELECT x FROM unnest($1::text[]) AS x \
     WHERE pg_visible_in_snapshot(x::xid8, pg_current_snapshot())";

/// Of the transactions `xids`, those whose effects every new snapshot sees.
pub(crate) async fn visible(
    db: &impl GenericClient,
    xids: &[u32],
) -> Result<HashSet<u32>, tokio_postgres::Error> {
    let current: String = db.query_one(CURRENT_XID_SQL, &[]).await?.get(0);
    let current: u64 = current.parse().unwrap_or(u64::MAX);
    let wide: Vec<String> = xids
        .iter()
        .map(|&x| widen(x, current).to_string())
        .collect();
    let seen = db.query(VISIBLE_SQL, &[&wide]).await?;
    let seen: HashSet<u64> = seen
        .iter()
        .filter_map(|row| row.get::<_, String>(0).parse().ok())
        .collect();
    Ok(xids
        .iter()
        .copied()
        .filter(|&x| seen.contains(&widen(x, current)))
        .collect())
}

/// The 64-bit id of 32-bit `xid`, a transaction already assigned when the
/// server's next id was `current` (so `current` must be read after `xid`
/// was assigned: then `xid` is the newest id below it with those low bits).
pub(crate) fn widen(xid: u32, current: u64) -> u64 {
    let candidate = (current & !0xFFFF_FFFF) | u64::from(xid);
    if candidate > current && candidate >= 1 << 32 {
        candidate - (1 << 32)
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::widen;

    #[test]
    fn widens_within_and_across_an_epoch() {
        assert_eq!(widen(700, 1000), 700);
        assert_eq!(widen(700, (3 << 32) | 1000), (3 << 32) | 700);
        // An older transaction from before the counter wrapped.
        assert_eq!(widen(0xFFFF_FF00, (3 << 32) | 5), (2 << 32) | 0xFFFF_FF00);
    }

    #[test]
    fn at_the_wrap_the_counter_read_after_the_transaction_decides() {
        let before_wrap = (3u64 << 32) | 0xFFFF_FFF0;
        let after_wrap = (4u64 << 32) | 20;
        // Begun just after the wrap, widened against a counter read later:
        // the new epoch (judged against a counter read before the wrap it
        // would land 2^32 ids in the past, and look long committed).
        assert_eq!(widen(5, after_wrap), (4 << 32) | 5);
        assert_ne!(
            widen(5, before_wrap),
            (4 << 32) | 5,
            "why the counter is read fresh"
        );
        // Begun just before the wrap: still the old epoch.
        assert_eq!(widen(0xFFFF_FFF8, after_wrap), (3 << 32) | 0xFFFF_FFF8);
        assert_eq!(widen(0xFFFF_FFF8, before_wrap + 9), (3 << 32) | 0xFFFF_FFF8);
        // The first epoch has nothing before it.
        assert_eq!(widen(0xFFFF_FFF8, 20), 0xFFFF_FFF8);
        assert_eq!(widen(19, 20), 19);
    }
}
