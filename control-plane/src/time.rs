//! Rendering of timestamps for the API.

use std::time::{Duration, UNIX_EPOCH};

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T10:04:33.120Z`.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let ms = u64::try_from(unix_ms).unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_with_millis() {
        assert_eq!(
            super::rfc3339_ms(1_795_341_873_120),
            "2026-11-22T10:04:33.120Z"
        );
        assert_eq!(super::rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
    }
}
