//! PostgreSQL's time, in one place: its unit (the replication stream and the
//! sweeper's samples count microseconds since 2000-01-01, PostgreSQL's
//! epoch) and its text (`timestamptz` as the replication session renders
//! it), read as that unit and written as RFC 3339.

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

/// PostgreSQL's ISO UTC text (`2026-11-26 18:28:37.123456+00`) as
/// microseconds since 2000-01-01; None for anything else.
pub(crate) fn parse_utc_micros(text: &str) -> Option<i64> {
    let text = text.strip_suffix("+00")?;
    let (date, clock) = text.split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i32>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<u8>().ok());
    let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
    // Up to six digits of fraction, right-padded with zeros: no allocation,
    // this runs per event while the sweeper is active.
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(6)
        .fold(0u32, |n, b| n * 10 + u32::from(b - b'0'));
    let date = time::Date::from_calendar_date(
        year,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let at = date
        .with_hms_micro(hour, minute, second, micros)
        .ok()?
        .assume_utc();
    let unix_micros = i64::try_from(at.unix_timestamp_nanos() / 1000).ok()?;
    Some(unix_micros - PG_EPOCH_UNIX_MICROS)
}

/// PostgreSQL's ISO `timestamptz` text (`2026-11-26 18:28:37.123456+00`, as
/// the replication session renders it with `DateStyle=ISO`, `TimeZone=UTC`)
/// as RFC 3339 (`2026-11-26T18:28:37.123456Z`). Anything else (`infinity`,
/// years past 9999, offsets with seconds) is passed through unchanged.
pub(crate) fn rfc3339(text: &str) -> String {
    let bytes = text.as_bytes();
    let shaped = bytes.len() >= 22
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b' '
        && bytes[13] == b':'
        && bytes[16] == b':'
        && bytes[..4].iter().all(u8::is_ascii_digit);
    if !shaped {
        return text.to_owned();
    }
    let Some(sign_at) = text
        .get(19..)
        .and_then(|rest| rest.find(['+', '-']))
        .map(|i| i + 19)
    else {
        return text.to_owned();
    };
    let (datetime, offset) = text.split_at(sign_at);
    let offset = match offset.len() {
        3 if offset == "+00" || offset == "-00" => "Z".to_owned(),
        3 => format!("{offset}:00"),
        6 => offset.to_owned(),
        _ => return text.to_owned(),
    };
    format!("{}T{}{}", &datetime[..10], &datetime[11..], offset)
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

    #[test]
    fn parses_the_stream_timestamps() {
        assert_eq!(parse_utc_micros("2000-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            parse_utc_micros("2000-01-01 00:00:01.5+00"),
            Some(1_500_000)
        );
        assert_eq!(
            parse_utc_micros("2000-01-02 00:00:00.000001+00"),
            Some(86_400_000_001)
        );
        assert_eq!(parse_utc_micros("infinity"), None);
        assert_eq!(parse_utc_micros("2000-01-01 00:00:00+05:30"), None);
        assert_eq!(parse_utc_micros("2000-01-01 00:00:00.1234567+00"), None);
        assert_eq!(parse_utc_micros("2000-01-01 00:00:00.12a+00"), None);
    }

    #[test]
    fn timestamps_become_rfc3339() {
        let cases = [
            (
                "2026-11-26 18:28:37.123456+00",
                "2026-11-26T18:28:37.123456Z",
            ),
            ("2026-11-26 18:28:37+00", "2026-11-26T18:28:37Z"),
            ("2026-11-26 18:28:37.5+05:30", "2026-11-26T18:28:37.5+05:30"),
            ("2026-11-26 18:28:37.5-03", "2026-11-26T18:28:37.5-03:00"),
            ("infinity", "infinity"),
            (
                "1890-01-01 00:00:00+00:53:28",
                "1890-01-01 00:00:00+00:53:28",
            ),
            ("garbage", "garbage"),
        ];
        for (pg, want) in cases {
            assert_eq!(rfc3339(pg), want, "{pg}");
        }
    }
}
