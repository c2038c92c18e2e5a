//! Rendering of timestamps for the API.

use std::time::{Duration, UNIX_EPOCH};

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const RFC3339_MS_MAX: u64 = 253_402_300_799_999;

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T10:04:33.120Z`. Timestamps come from
/// agents too: one before 1970 is written as the epoch, one after year 9999 as its last
/// millisecond (the formatter would panic on it; found by the `metrics_ingest` fuzz target).
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let ms = u64::try_from(unix_ms).unwrap_or(0).min(RFC3339_MS_MAX);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `d` in whole milliseconds, saturating (for adding to Unix-millisecond timestamps).
/// A time given as RFC 3339 or Unix milliseconds (query parameters); the error names `field`.
pub fn parse_ms(field: &str, v: &str) -> Result<i64, String> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| format!("{field}: {v:?} is not an RFC 3339 time or Unix milliseconds"))
}

pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// The UTC civil date of day number `day` (days since 1970-01-01) as `(year, month, day)`.
pub fn civil_from_days(day: i64) -> (i64, u32, u32) {
    // Gregorian calendar in 400-year eras starting on March 1 (H. Hinnant's derivation).
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Day number of a UTC civil date; the inverse of [`civil_from_days`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_outside_what_rfc3339_writes_are_clamped_not_a_panic() {
        assert_eq!(
            super::rfc3339_ms(340_000_000_400_400),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(super::rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(super::rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339_ms(1_000), "1970-01-01T00:00:01.000Z");
    }

    use super::{DAY_MS, civil_from_days, days_from_civil};

    #[test]
    fn civil_days_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(1_795_341_873_120 / DAY_MS), (2026, 11, 22));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn formats_utc_with_millis() {
        assert_eq!(
            super::rfc3339_ms(1_795_341_873_120),
            "2026-11-22T10:04:33.120Z"
        );
        assert_eq!(super::rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
    }
}
