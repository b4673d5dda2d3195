//! PostgreSQL's time unit, in one place: the replication stream and the
//! sweeper's samples count microseconds since 2000-01-01 (PostgreSQL's epoch).

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
pub(crate) const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Now, in microseconds since 2000-01-01.
pub(crate) fn now_micros() -> i64 {
    unix_micros(std::time::SystemTime::now()) - PG_EPOCH_UNIX_MICROS
}

/// Seconds from a PostgreSQL timestamp (µs since 2000-01-01) until now,
/// never negative.
pub(crate) fn seconds_since(pg_micros: i64) -> f64 {
    (now_micros() - pg_micros).max(0) as f64 / 1e6
}

/// Now, in (fractional) Unix seconds, for timestamp gauges.
pub(crate) fn unix_seconds() -> f64 {
    unix_micros(std::time::SystemTime::now()) as f64 / 1e6
}

fn unix_micros(at: std::time::SystemTime) -> i64 {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_2000_01_01() {
        let epoch = time::Date::from_calendar_date(2000, time::Month::January, 1)
            .unwrap()
            .midnight()
            .assume_utc();
        assert_eq!(epoch.unix_timestamp() * 1_000_000, PG_EPOCH_UNIX_MICROS);
    }

    #[test]
    fn a_time_in_the_future_is_zero_seconds_ago() {
        assert_eq!(seconds_since(now_micros() + 10_000_000), 0.0);
        let ago = seconds_since(now_micros() - 2_000_000);
        assert!((2.0..3.0).contains(&ago), "{ago}");
    }
}
