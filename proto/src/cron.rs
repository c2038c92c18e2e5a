//! Five-field cron expressions (`minute hour day-of-month month day-of-week`) evaluated in
//! an IANA time zone (read from the system's zoneinfo). Fields take `*`, numbers, ranges
//! `a-b`, lists `a,b` and steps `*/n` / `a-b/n`; day-of-week 0 or 7 is Sunday. When both
//! day fields are restricted, either may match (classic cron).
//!
//! Daylight saving: times are local. A time skipped by a change (02:30 on the night clocks go
//! forward) moves to the first valid instant after the gap (03:00); a time that occurs twice
//! (02:30 on the night clocks go back) counts once, at its first occurrence. The agent's
//! schedules and the control plane's maintenance windows share these rules.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
    tz: TimeZone,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CronError {
    #[error("cron expression {0:?} must have 5 fields: minute hour day-of-month month day-of-week")]
    FieldCount(String),
    #[error("cron field {field} {value:?}: {reason}")]
    Field {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("unknown time zone {0:?} (use an IANA name such as UTC or Europe/Berlin)")]
    TimeZone(String),
    #[error("cron expression {0:?} never fires")]
    Never(String),
}

fn parse_field(
    field: &'static str,
    text: &str,
    lo: u64,
    hi: u64,
) -> Result<(u64, bool), CronError> {
    let err = |reason: &str| CronError::Field {
        field,
        value: text.to_string(),
        reason: reason.to_string(),
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u64>().map_err(|_| err("step must be a number"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(err("step must be at least 1"));
        }
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = a.parse::<u64>().map_err(|_| err("not a number"))?;
            let b = b.parse::<u64>().map_err(|_| err("not a number"))?;
            (a, b)
        } else {
            let a = range.parse::<u64>().map_err(|_| err("not a number"))?;
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(err(&format!("values must lie in {lo}-{hi}")));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, text != "*"))
}

impl Cron {
    pub fn parse(expr: &str, tz: &str) -> Result<Cron, CronError> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError::FieldCount(expr.to_string()));
        }
        let tz = TimeZone::get(tz).map_err(|_| CronError::TimeZone(tz.to_string()))?;
        let (minutes, _) = parse_field("minute", fields[0], 0, 59)?;
        let (hours, _) = parse_field("hour", fields[1], 0, 23)?;
        let (days, days_restricted) = parse_field("day-of-month", fields[2], 1, 31)?;
        let (months, _) = parse_field("month", fields[3], 1, 12)?;
        let (mut weekdays, weekdays_restricted) = parse_field("day-of-week", fields[4], 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        let cron = Cron {
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted,
            weekdays_restricted,
            tz,
        };
        if cron.next_after_ms(0).is_none() {
            return Err(CronError::Never(expr.to_string()));
        }
        Ok(cron)
    }

    fn day_matches(&self, dt: DateTime) -> bool {
        let dom = self.days & (1 << dt.day()) != 0;
        let dow = self.weekdays & (1 << dt.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first firing strictly after `after_ms` (Unix ms), within the next 5 years.
    pub fn next_after_ms(&self, after_ms: i64) -> Option<i64> {
        let start = Timestamp::from_millisecond(after_ms).ok()?;
        let zoned = start.to_zoned(self.tz.clone());
        // Next whole minute in local wall time.
        let mut dt = zoned.datetime().round(jiff::Unit::Minute).ok()?;
        if dt <= zoned.datetime() {
            dt = dt.checked_add(1.minute()).ok()?;
        }
        let limit = dt.checked_add(5.years()).ok()?;
        while dt < limit {
            if self.months & (1 << dt.month()) == 0 {
                dt = dt
                    .first_of_month()
                    .checked_add(1.month())
                    .ok()?
                    .with()
                    .hour(0)
                    .minute(0)
                    .build()
                    .ok()?;
                continue;
            }
            if !self.day_matches(dt) {
                dt = dt
                    .date()
                    .checked_add(1.day())
                    .ok()?
                    .to_datetime(jiff::civil::time(0, 0, 0, 0));
                continue;
            }
            if self.hours & (1 << dt.hour()) == 0 {
                dt = dt
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if self.minutes & (1 << dt.minute()) == 0 {
                dt = dt.checked_add(1.minute()).ok()?;
                continue;
            }
            let ambiguous = self.tz.to_ambiguous_timestamp(dt);
            let ts = match ambiguous.offset() {
                // Skipped by a DST gap: the first instant after the gap.
                jiff::tz::AmbiguousOffset::Gap { .. } => {
                    let before = ambiguous.earlier().ok()?;
                    self.tz.following(before).next()?.timestamp()
                }
                // Repeated by a fold: its first occurrence (the wall time is visited once).
                _ => ambiguous.compatible().ok()?,
            };
            if ts > start {
                return Some(ts.as_millisecond());
            }
            dt = dt.checked_add(1.minute()).ok()?;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{Cron, CronError};

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>()
            .expect("timestamp")
            .as_millisecond()
    }

    #[test]
    fn daylight_saving_in_berlin_2027_a_skipped_start_moves_to_the_gap_end_a_repeated_one_counts_once()
     {
        // 2027-03-28: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
        let c = Cron::parse("30 2 * * *", "Europe/Berlin").expect("parse");
        let spring = c.next_after_ms(ms("2027-03-26T12:00:00Z")).expect("next");
        assert_eq!(
            spring,
            ms("2027-03-27T01:30:00Z"),
            "the day before, as usual"
        );
        let gap = c.next_after_ms(spring).expect("next");
        assert_eq!(
            gap,
            ms("2027-03-28T01:00:00Z"),
            "03:00 CEST, the first valid instant"
        );
        assert_eq!(
            c.next_after_ms(gap),
            Some(ms("2027-03-29T00:30:00Z")),
            "02:30 CEST the day after"
        );
        // 2027-10-31: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        let fall = c.next_after_ms(ms("2027-10-30T12:00:00Z")).expect("next");
        assert_eq!(fall, ms("2027-10-31T00:30:00Z"), "the first 02:30 (CEST)");
        assert_eq!(
            c.next_after_ms(fall),
            Some(ms("2027-11-01T01:30:00Z")),
            "not the second 02:30 (CET): it counts once"
        );
        // Every 15 minutes through the gap: one start at 03:00, none twice.
        let q = Cron::parse("*/15 2-3 * * *", "Europe/Berlin").expect("parse");
        let mut t = ms("2027-03-28T00:50:00Z");
        let mut starts = Vec::new();
        for _ in 0..4 {
            t = q.next_after_ms(t).expect("next");
            starts.push(
                jiff::Timestamp::from_millisecond(t)
                    .expect("ts")
                    .to_string(),
            );
        }
        assert_eq!(
            starts,
            [
                "2027-03-28T01:00:00Z",
                "2027-03-28T01:15:00Z",
                "2027-03-28T01:30:00Z",
                "2027-03-28T01:45:00Z"
            ]
        );
    }

    #[test]
    fn every_six_hours_in_utc() {
        let c = Cron::parse("0 */6 * * *", "UTC").expect("parse");
        assert_eq!(
            c.next_after_ms(ms("2026-11-22T03:10:00Z")),
            Some(ms("2026-11-22T06:00:00Z"))
        );
        assert_eq!(
            c.next_after_ms(ms("2026-11-22T06:00:00Z")),
            Some(ms("2026-11-22T12:00:00Z"))
        );
    }

    #[test]
    fn three_am_in_a_time_zone_across_dst() {
        let c = Cron::parse("0 3 * * *", "Europe/Berlin").expect("parse");
        // Winter: UTC+1.
        assert_eq!(
            c.next_after_ms(ms("2026-11-22T00:00:00Z")),
            Some(ms("2026-11-22T02:00:00Z"))
        );
        // Summer: UTC+2.
        assert_eq!(
            c.next_after_ms(ms("2026-07-01T00:00:00Z")),
            Some(ms("2026-07-01T01:00:00Z"))
        );
    }

    #[test]
    fn weekdays_and_month_days() {
        // 09:30 on Mondays (2026-11-23 is a Monday).
        let c = Cron::parse("30 9 * * 1", "UTC").expect("parse");
        assert_eq!(
            c.next_after_ms(ms("2026-11-22T12:00:00Z")),
            Some(ms("2026-11-23T09:30:00Z"))
        );
        let c = Cron::parse("0 0 1 1 *", "UTC").expect("parse");
        assert_eq!(
            c.next_after_ms(ms("2026-11-22T12:00:00Z")),
            Some(ms("2027-01-01T00:00:00Z"))
        );
        let sunday = Cron::parse("0 0 * * 7", "UTC").expect("7 is Sunday");
        assert_eq!(
            sunday.next_after_ms(ms("2026-11-22T12:00:00Z")),
            Some(ms("2026-11-29T00:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        assert!(matches!(
            Cron::parse("* * *", "UTC"),
            Err(CronError::FieldCount(_))
        ));
        assert!(matches!(
            Cron::parse("61 * * * *", "UTC"),
            Err(CronError::Field {
                field: "minute",
                ..
            })
        ));
        assert!(matches!(
            Cron::parse("* * * * mon", "UTC"),
            Err(CronError::Field {
                field: "day-of-week",
                ..
            })
        ));
        assert!(matches!(
            Cron::parse("*/0 * * * *", "UTC"),
            Err(CronError::Field { .. })
        ));
        assert!(matches!(
            Cron::parse("* * * * *", "Mars/Olympus"),
            Err(CronError::TimeZone(_))
        ));
        assert!(matches!(
            Cron::parse("0 0 31 2 *", "UTC"),
            Err(CronError::Never(_))
        ));
    }
}
