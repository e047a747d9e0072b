//! Budget periods and their UTC boundaries.
//!
//! Invariant: every instant belongs to exactly one period of a kind, `[start, end)`, so a usage
//! settled against the period its request was admitted in is counted once.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Monthly,
    Weekly,
    Daily,
    Total,
}

impl Period {
    pub const NAMES: &'static str = "monthly, weekly, daily, total";

    pub fn parse(name: &str) -> Option<Period> {
        match name {
            "monthly" => Some(Period::Monthly),
            "weekly" => Some(Period::Weekly),
            "daily" => Some(Period::Daily),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Monthly => "monthly",
            Period::Weekly => "weekly",
            Period::Daily => "daily",
            Period::Total => "total",
        }
    }

    /// The period that holds `now`: `(start, end)` in Unix seconds. `Total` never ends and is
    /// reported with `end = None`.
    pub fn bounds(self, now: DateTime<Utc>) -> (i64, Option<i64>) {
        let date = now.date_naive();
        let (start, end) = match self {
            Period::Total => return (0, None),
            Period::Daily => (date, date + Duration::days(1)),
            Period::Weekly => {
                // ISO weeks: they start on Monday.
                let start = date - Duration::days(i64::from(date.weekday().num_days_from_monday()));
                (start, start + Duration::days(7))
            }
            Period::Monthly => {
                let start = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                let end = NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(start + Duration::days(31));
                (start, end)
            }
        };
        (midnight(start), Some(midnight(end)))
    }
}

fn midnight(date: NaiveDate) -> i64 {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
        .timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn bounds_follow_utc_calendar() {
        let now = at("2026-12-31T23:59:59Z");
        let (s, e) = Period::Monthly.bounds(now);
        assert_eq!(s, at("2026-12-01T00:00:00Z").timestamp());
        assert_eq!(e, Some(at("2027-01-01T00:00:00Z").timestamp()));
        let (s, e) = Period::Weekly.bounds(at("2026-11-26T12:00:00Z")); // a Thursday
        assert_eq!(s, at("2026-11-23T00:00:00Z").timestamp());
        assert_eq!(e, Some(at("2026-11-30T00:00:00Z").timestamp()));
        let (s, e) = Period::Daily.bounds(now);
        assert_eq!(s, at("2026-12-31T00:00:00Z").timestamp());
        assert_eq!(e, Some(at("2027-01-01T00:00:00Z").timestamp()));
        assert_eq!(Period::Total.bounds(now), (0, None));
    }

    #[test]
    fn an_instant_at_a_boundary_starts_the_next_period() {
        let (s, _) = Period::Daily.bounds(at("2026-11-27T00:00:00Z"));
        assert_eq!(s, at("2026-11-27T00:00:00Z").timestamp());
    }
}
