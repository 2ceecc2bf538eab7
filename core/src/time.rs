//! Time as an input: timestamps in milliseconds, the clock trait and RFC 3339 formatting.
//!
//! Decisions about leases and retention never read the wall clock themselves; they take a
//! [`Timestamp`] from a [`Clock`], so tests step time instead of sleeping.

use std::fmt;
use std::time::Duration;

use crate::sync::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// This instant moved forward by `duration`, saturating at the end of time.
    pub fn plus(self, duration: Duration) -> Timestamp {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// How long from `self` until `later`; zero when `later` is not later.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-12-04T10:00:00.000Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let (year, month, day) = civil_from_days(secs / 86_400);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{ms:03}Z"
        )
    }
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Uses the era arithmetic of the well-known days-from-civil inverse: a 400-year era has a fixed
/// number of days, and counting years from March puts the leap day last.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

#[cfg(not(loom))]
impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when a test tells it to.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            now_ms: AtomicU64::new(start.0),
        }
    }

    /// Moves the clock forward by `duration`.
    pub fn advance(&self, duration: Duration) {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now_ms.load(Ordering::SeqCst))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn formats_the_epoch_and_a_leap_day_in_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(951_782_400_123).to_string(),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            Timestamp(1_796_378_400_000).to_string(),
            "2026-12-04T10:00:00.000Z"
        );
    }

    #[test]
    fn until_is_zero_for_an_instant_in_the_past() {
        assert_eq!(Timestamp(10).until(Timestamp(5)), Duration::ZERO);
        assert_eq!(Timestamp(5).until(Timestamp(10)), Duration::from_millis(5));
    }
}

/// Parses the RFC 3339 form that [`Timestamp`]'s `Display` writes (`...T10:00:00.000Z`).
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let bytes = text.as_bytes();
    if bytes.len() != 24 || !text.is_ascii() || &text[23..] != "Z" {
        return None;
    }
    let separators = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ];
    if separators.iter().any(|&(i, c)| bytes[i] != c) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text[range].parse::<u64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 59 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(Timestamp(secs * 1000 + ms))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of `civil_from_days`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year % 400;
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(all(test, not(loom)))]
mod parse_tests {
    use super::*;

    #[test]
    fn parsing_inverts_formatting() {
        for ms in [0, 951_782_400_123, 1_796_378_400_000, 4_102_444_799_999] {
            assert_eq!(
                parse_rfc3339(&Timestamp(ms).to_string()),
                Some(Timestamp(ms))
            );
        }
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00Z"), None);
    }
}

#[cfg(all(test, not(loom)))]
mod boundary_tests {
    use super::*;

    #[test]
    fn every_field_of_a_timestamp_is_written_in_its_place() {
        let t = Timestamp(((((19_723 * 24) + 13) * 60 + 14) * 60 + 15) * 1000 + 16);
        assert_eq!(t.to_string(), "2024-01-01T13:14:15.016Z");
        assert_eq!(
            Timestamp(4_107_542_399_999).to_string(),
            "2100-02-28T23:59:59.999Z"
        );
        // Century boundaries and the last day of a 400-year era (a leap day) are where the era
        // arithmetic is easiest to get wrong.
        for (text, ms) in [
            ("2400-02-29T00:00:00.000Z", 13_574_563_200_000),
            ("2100-03-01T00:00:00.000Z", 4_107_542_400_000),
            ("2300-06-01T00:00:00.000Z", 10_426_838_400_000),
            ("2000-02-29T00:00:00.000Z", 951_782_400_000),
        ] {
            assert_eq!(Timestamp(ms).to_string(), text);
            assert_eq!(parse_rfc3339(text), Some(Timestamp(ms)));
        }
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for bad in [
            "2026-12-04T10:00:00.000",
            "2026-12-04T10:00:00.000X",
            "2026/12-04T10:00:00.000Z",
            "2026-12/04T10:00:00.000Z",
            "2026-12-04 10:00:00.000Z",
            "2026-12-04T10-00:00.000Z",
            "2026-12-04T10:00-00.000Z",
            "2026-12-04T10:00:00,000Z",
            "2026-13-04T10:00:00.000Z",
            "2026-00-04T10:00:00.000Z",
            "2026-12-32T10:00:00.000Z",
            "2026-12-00T10:00:00.000Z",
            "2026-12-04T24:00:00.000Z",
            "2026-12-04T10:60:00.000Z",
            "2026-12-04T10:00:60.000Z",
            "1969-12-31T23:59:59.999Z",
            "2026-12-04T10:00:00.00éZ",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_system_clock_reads_the_present() {
        let after_2025 = Timestamp(1_735_689_600_000);
        assert!(SystemClock.now() > after_2025);
    }
}
