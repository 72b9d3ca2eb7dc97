//! Cron expressions and local times: recurring flows and broadcasts, and broadcasts sent at
//! the same local time in every timezone (in waves, the earliest timezone first).

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

/// How far [`Cron::next_after`] looks ahead: five years of local days.
const HORIZON_DAYS: u32 = 5 * 366;

/// A parsed 5-field cron expression: minute hour day-of-month month day-of-week.
///
/// Each field is kept as a bit set of the values it allows (bit `n` for value `n`; day of
/// week 0 = Sunday, 7 folded into 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    /// Day-of-month does not start with `*`: with a restricted day-of-week, either matches.
    dom_restricted: bool,
    /// Day-of-week does not start with `*`.
    dow_restricted: bool,
}

/// One field's name, bounds and accepted names (the names map to `low`, `low + 1`, …).
struct FieldSpec {
    name: &'static str,
    low: u32,
    high: u32,
    names: &'static [&'static str],
}

const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    low: 0,
    high: 59,
    names: &[],
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    low: 0,
    high: 23,
    names: &[],
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    low: 1,
    high: 31,
    names: &[],
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    low: 1,
    high: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    low: 0,
    high: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

impl FieldSpec {
    /// One value: a number in bounds, or a name.
    fn value(&self, text: &str) -> Result<u32, String> {
        for (index, name) in self.names.iter().enumerate() {
            if text.eq_ignore_ascii_case(name) {
                return Ok(self.low + index as u32);
            }
        }
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            let what = if self.names.is_empty() {
                "a number"
            } else {
                "a number or a name"
            };
            return Err(format!("{}: {text:?} is not {what}", self.name));
        }
        let value: u32 = text.parse().map_err(|_| {
            format!(
                "{}: {text} is out of range {}-{}",
                self.name, self.low, self.high
            )
        })?;
        if value < self.low || value > self.high {
            return Err(format!(
                "{}: {value} is out of range {}-{}",
                self.name, self.low, self.high
            ));
        }
        Ok(value)
    }

    /// A whole field (a comma-separated list of `*`, `n`, `a-b`, each with an optional
    /// `/step`) → the bit set of its values.
    fn parse(&self, field: &str) -> Result<u64, String> {
        let mut bits = 0u64;
        for item in field.split(',') {
            if item.is_empty() {
                return Err(format!("{}: empty item in {field:?}", self.name));
            }
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(format!("{}: step {step:?} is not a number", self.name));
                    }
                    let step: u32 = step
                        .parse()
                        .map_err(|_| format!("{}: step {step} is too large", self.name))?;
                    if step == 0 {
                        return Err(format!("{}: step must be at least 1", self.name));
                    }
                    (range, Some(step))
                }
                None => (item, None),
            };
            let (first, last) = if range == "*" {
                (self.low, self.high)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{}: range {range} runs backwards", self.name));
                }
                (a, b)
            } else {
                let a = self.value(range)?;
                // `a/n` is `a-high/n`; a lone `a` is just `a`.
                if step.is_some() {
                    (a, self.high)
                } else {
                    (a, a)
                }
            };
            let step = step.unwrap_or(1);
            let mut value = first;
            while value <= last {
                bits |= 1 << value;
                match value.checked_add(step) {
                    Some(next) => value = next,
                    None => break,
                }
            }
        }
        Ok(bits)
    }
}

impl Cron {
    /// Reads an expression: `*`, numbers, `a-b`, `a,b`, `*/n`, `a-b/n` (and `a/n`, from `a`
    /// to the field's end); months `JAN`–`DEC` and days `SUN`–`SAT` by name; day of week
    /// 0–7 (0 and 7 are Sunday); the usual rule that day-of-month and day-of-week are OR-ed
    /// when both are restricted (neither starts with `*`). Errors say which field is wrong
    /// and why (`hour: 24 is out of range 0-23`).
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
        let minutes = MINUTE.parse(fields[0])?;
        let hours = HOUR.parse(fields[1])?;
        let days_of_month = DAY_OF_MONTH.parse(fields[2])?;
        let months = MONTH.parse(fields[3])?;
        let mut days_of_week = DAY_OF_WEEK.parse(fields[4])?;
        // 7 is Sunday too.
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & 0x7f) | 1;
        }
        Ok(Cron {
            text: text.to_owned(),
            minutes,
            hours: hours as u32,
            days_of_month: days_of_month as u32,
            months: months as u16,
            days_of_week: days_of_week as u8,
            dom_restricted: !fields[2].starts_with('*'),
            dow_restricted: !fields[4].starts_with('*'),
        })
    }

    /// The first occurrence strictly after `after`, read in `tz`; `None` if there is none
    /// within five years. Local times skipped by a DST change do not occur; a repeated local
    /// time occurs once, at the earlier instant.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&tz).naive_local();
        // The next whole local minute.
        let start = local
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(Duration::minutes(1))?;
        let mut date = start.date();
        let mut first_day = true;
        for _ in 0..=HORIZON_DAYS {
            if self.day_matches(date) {
                let (from_hour, from_minute) = if first_day {
                    (start.hour(), start.minute())
                } else {
                    (0, 0)
                };
                if let Some(found) = self.first_on_day(date, from_hour, from_minute, after, tz) {
                    return Some(found);
                }
            }
            date = date.succ_opt()?;
            first_day = false;
        }
        None
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The month and the day fields allow `date`.
    fn day_matches(&self, date: NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.dom_restricted && self.dow_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first matching minute of `date` at or after `from_hour:from_minute` whose instant
    /// exists and is after `after`.
    fn first_on_day(
        &self,
        date: NaiveDate,
        from_hour: u32,
        from_minute: u32,
        after: DateTime<Utc>,
        tz: Tz,
    ) -> Option<DateTime<Utc>> {
        for hour in from_hour..24 {
            if self.hours & (1 << hour) == 0 {
                continue;
            }
            let first_minute = if hour == from_hour { from_minute } else { 0 };
            for minute in first_minute..60 {
                if self.minutes & (1 << minute) == 0 {
                    continue;
                }
                let naive = date.and_hms_opt(hour, minute, 0)?;
                let instant = match tz.from_local_datetime(&naive) {
                    LocalResult::Single(at) => at.with_timezone(&Utc),
                    LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
                    // Skipped by a DST change: it does not occur.
                    LocalResult::None => continue,
                };
                // A repeated local time whose earlier instant has passed already occurred.
                if instant > after {
                    return Some(instant);
                }
            }
        }
        None
    }
}

/// The instant of a local date and time in `tz` (a time skipped by a DST change: the first
/// instant after the gap; a repeated time: the earlier one). `hour` and `minute` past their
/// range roll over (24:00 is the next day's midnight).
pub fn local_instant(date: NaiveDate, hour: u32, minute: u32, tz: Tz) -> DateTime<Utc> {
    let naive = naive_at(date, hour, minute);
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(at) => at.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => after_gap(naive, tz),
    }
}

/// The first instant at which a local date and time occurs anywhere (UTC+14).
pub fn earliest_wave(date: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    let naive = naive_at(date, hour, minute);
    let at = naive
        .checked_sub_signed(Duration::hours(14))
        .unwrap_or(naive);
    at.and_utc()
}

/// The last instant at which a local date and time occurs anywhere (UTC−12).
pub fn latest_wave(date: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    let naive = naive_at(date, hour, minute);
    let at = naive
        .checked_add_signed(Duration::hours(12))
        .unwrap_or(naive);
    at.and_utc()
}

/// `date` at `hour:minute`, rolling over out-of-range values.
fn naive_at(date: NaiveDate, hour: u32, minute: u32) -> NaiveDateTime {
    let midnight = date.and_time(NaiveTime::MIN);
    let offset = Duration::hours(i64::from(hour)) + Duration::minutes(i64::from(minute));
    midnight.checked_add_signed(offset).unwrap_or(midnight)
}

/// For a local time inside a DST gap: the instant the gap ends (the first instant whose
/// local time is past `naive`), found by bisection over the UTC seconds around it.
fn after_gap(naive: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let target = naive.and_utc().timestamp();
    let local_secs = |utc_secs: i64| -> i64 {
        match DateTime::from_timestamp(utc_secs, 0) {
            Some(at) => {
                let offset = tz.offset_from_utc_datetime(&at.naive_utc()).fix();
                utc_secs + i64::from(offset.local_minus_utc())
            }
            None => utc_secs,
        }
    };
    // Every UTC offset is within ±16 h: local time is before `naive` at `low` and after
    // it at `high`.
    let mut low = target - 16 * 3600;
    let mut high = target + 16 * 3600;
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if local_secs(middle) > target {
            high = middle;
        } else {
            low = middle;
        }
    }
    DateTime::from_timestamp(high, 0).unwrap_or_else(|| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("a UTC instant")
    }

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("a date")
    }

    fn cron(text: &str) -> Cron {
        Cron::parse(text).expect("a valid expression")
    }

    #[test]
    fn monthly_at_18_local_in_algiers() {
        let c = cron("0 18 1 * *");
        let tz = chrono_tz::Africa::Algiers;
        // 18:00 in Algiers (UTC+1) is 17:00 UTC.
        assert_eq!(
            c.next_after(utc("2026-11-15T12:00:00Z"), tz),
            Some(utc("2026-12-01T17:00:00Z"))
        );
        // Strictly after: the occurrence itself is not returned again.
        assert_eq!(
            c.next_after(utc("2026-12-01T17:00:00Z"), tz),
            Some(utc("2027-01-01T17:00:00Z"))
        );
        // One second before it, it is.
        assert_eq!(
            c.next_after(utc("2026-12-01T16:59:59Z"), tz),
            Some(utc("2026-12-01T17:00:00Z"))
        );
        assert_eq!(c.as_str(), "0 18 1 * *");
    }

    #[test]
    fn every_quarter_hour() {
        let c = cron("*/15 * * * *");
        let tz = chrono_tz::UTC;
        assert_eq!(
            c.next_after(utc("2026-06-10T10:07:30Z"), tz),
            Some(utc("2026-06-10T10:15:00Z"))
        );
        assert_eq!(
            c.next_after(utc("2026-06-10T10:15:00Z"), tz),
            Some(utc("2026-06-10T10:30:00Z"))
        );
        assert_eq!(
            c.next_after(utc("2026-06-10T23:50:00Z"), tz),
            Some(utc("2026-06-11T00:00:00Z"))
        );
    }

    #[test]
    fn weekdays_at_nine() {
        let c = cron("0 9 * * 1-5");
        let tz = chrono_tz::UTC;
        // Friday 2026-12-04 09:00 → Monday 2026-12-07 09:00.
        assert_eq!(
            c.next_after(utc("2026-12-04T09:00:00Z"), tz),
            Some(utc("2026-12-07T09:00:00Z"))
        );
        // Monday 08:59 → the same day.
        assert_eq!(
            c.next_after(utc("2026-12-07T08:59:00Z"), tz),
            Some(utc("2026-12-07T09:00:00Z"))
        );
        // Names are the same.
        let named = cron("0 9 * * MON-FRI");
        assert_eq!(
            named.next_after(utc("2026-12-04T09:00:00Z"), tz),
            Some(utc("2026-12-07T09:00:00Z"))
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        // The 13th or any Friday.
        let c = cron("0 0 13 * 5");
        let tz = chrono_tz::UTC;
        // From Sunday 2026-11-01: Friday the 6th, then the 13th (a Friday too), then
        // Friday the 20th, then Friday the 27th, then Friday 4 Dec, then Friday 11 Dec,
        // then Sunday the 13th of December.
        let mut at = utc("2026-11-01T00:00:00Z");
        let mut seen = Vec::new();
        for _ in 0..7 {
            at = c.next_after(at, tz).expect("an occurrence");
            seen.push(at.date_naive().to_string());
        }
        assert_eq!(
            seen,
            [
                "2026-11-06",
                "2026-11-13",
                "2026-11-20",
                "2026-11-27",
                "2026-12-04",
                "2026-12-11",
                "2026-12-13"
            ]
        );
        // With day-of-week `*`, only the 13th.
        let only_13th = cron("0 0 13 * *");
        assert_eq!(
            only_13th.next_after(utc("2026-11-14T00:00:00Z"), tz),
            Some(utc("2026-12-13T00:00:00Z"))
        );
        // With a `*/2` day-of-week (starts with `*`): both must hold (AND).
        let and_rule = cron("0 0 13 * */2");
        // Days of week 0,2,4,6: the next 13th on a Sunday/Tuesday/Thursday/Saturday.
        // 2026-12-13 is a Sunday.
        assert_eq!(
            and_rule.next_after(utc("2026-11-01T00:00:00Z"), tz),
            Some(utc("2026-12-13T00:00:00Z"))
        );
    }

    #[test]
    fn seven_is_sunday() {
        let c = cron("0 0 * * 7");
        // From Monday 2026-11-30 → Sunday 2026-12-06.
        assert_eq!(
            c.next_after(utc("2026-11-30T00:00:00Z"), chrono_tz::UTC),
            Some(utc("2026-12-06T00:00:00Z"))
        );
        // 0, 7 and SUN are the same day (the text aside).
        assert_eq!(c.days_of_week, cron("0 0 * * 0").days_of_week);
        assert_eq!(c.days_of_week, cron("0 0 * * SUN").days_of_week);
        assert_eq!(c.days_of_week, 1);
        // 5-7 is Friday, Saturday and Sunday.
        assert_eq!(cron("0 0 * * 5-7").days_of_week, 0b110_0001);
    }

    #[test]
    fn months_by_name() {
        let c = cron("0 12 1 jan,Jul *");
        assert_eq!(
            c.next_after(utc("2026-02-01T00:00:00Z"), chrono_tz::UTC),
            Some(utc("2026-07-01T12:00:00Z"))
        );
    }

    #[test]
    fn paris_spring_forward_skips_the_missing_time() {
        // 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 does not exist that day.
        let c = cron("30 2 * * *");
        let tz = chrono_tz::Europe::Paris;
        assert_eq!(
            c.next_after(utc("2026-03-28T12:00:00Z"), tz),
            Some(utc("2026-03-30T00:30:00Z"))
        );
        // The day before, 02:30 CET is 01:30 UTC.
        assert_eq!(
            c.next_after(utc("2026-03-27T12:00:00Z"), tz),
            Some(utc("2026-03-28T01:30:00Z"))
        );
    }

    #[test]
    fn paris_fall_back_fires_the_repeated_time_once() {
        // 2026-10-25: 03:00 CEST → 02:00 CET; 02:00–02:59 happens twice.
        let c = cron("30 2 * * *");
        let tz = chrono_tz::Europe::Paris;
        // The earlier 02:30 (CEST) is 00:30 UTC.
        assert_eq!(
            c.next_after(utc("2026-10-24T12:00:00Z"), tz),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        // Not again at 02:30 CET (01:30 UTC): the next day's, 02:30 CET.
        assert_eq!(
            c.next_after(utc("2026-10-25T00:30:00Z"), tz),
            Some(utc("2026-10-26T01:30:00Z"))
        );
        // Half-hourly: after 02:30 CEST, the repeated 02:00 and 02:30 CET are skipped;
        // next is 03:00 CET = 02:00 UTC.
        let half_hourly = cron("*/30 * * * *");
        assert_eq!(
            half_hourly.next_after(utc("2026-10-25T00:30:00Z"), tz),
            Some(utc("2026-10-25T02:00:00Z"))
        );
    }

    #[test]
    fn never_within_five_years() {
        let c = cron("0 0 30 2 *");
        assert_eq!(
            c.next_after(utc("2026-01-01T00:00:00Z"), chrono_tz::UTC),
            None
        );
        // 29 February comes within five years.
        let leap = cron("0 0 29 2 *");
        assert_eq!(
            leap.next_after(utc("2026-01-01T00:00:00Z"), chrono_tz::UTC),
            Some(utc("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn parse_errors_name_the_field() {
        let cases = [
            ("0 24 * * *", "hour: 24 is out of range 0-23"),
            ("60 0 * * *", "minute: 60 is out of range 0-59"),
            ("0 0 0 * *", "day-of-month: 0 is out of range 1-31"),
            ("0 0 * 13 *", "month: 13 is out of range 1-12"),
            ("0 0 * * 8", "day-of-week: 8 is out of range 0-7"),
            ("*/0 * * * *", "minute: step must be at least 1"),
            ("a * * * *", "minute: \"a\" is not a number"),
            ("0 5-3 * * *", "hour: range 5-3 runs backwards"),
            ("0 1,,2 * * *", "hour: empty item in \"1,,2\""),
            ("0 0 * FOO *", "month: \"FOO\" is not a number or a name"),
            ("0 0 * * 1/0x", "day-of-week: step \"0x\" is not a number"),
            (
                "* * * *",
                "expected 5 fields (minute hour day-of-month month day-of-week), got 4",
            ),
            (
                "* * * * * *",
                "expected 5 fields (minute hour day-of-month month day-of-week), got 6",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(Cron::parse(text), Err(expected.to_owned()), "{text}");
        }
    }

    #[test]
    fn lists_ranges_and_steps() {
        let c = cron("5,10-12,40-50/5 */6 * * *");
        let tz = chrono_tz::UTC;
        let mut at = utc("2026-06-10T00:00:00Z");
        let mut minutes = Vec::new();
        for _ in 0..8 {
            at = c.next_after(at, tz).expect("an occurrence");
            minutes.push(at.format("%H:%M").to_string());
        }
        assert_eq!(
            minutes,
            [
                "00:05", "00:10", "00:11", "00:12", "00:40", "00:45", "00:50", "06:05"
            ]
        );
    }

    #[test]
    fn local_instant_in_and_around_dst() {
        let paris = chrono_tz::Europe::Paris;
        // Ordinary: 18:00 in Algiers is 17:00 UTC.
        assert_eq!(
            local_instant(date(2026, 12, 1), 18, 0, chrono_tz::Africa::Algiers),
            utc("2026-12-01T17:00:00Z")
        );
        // In the spring gap: the first instant after it (03:00 CEST = 01:00 UTC).
        assert_eq!(
            local_instant(date(2026, 3, 29), 2, 30, paris),
            utc("2026-03-29T01:00:00Z")
        );
        // Repeated in the fall: the earlier (CEST).
        assert_eq!(
            local_instant(date(2026, 10, 25), 2, 30, paris),
            utc("2026-10-25T00:30:00Z")
        );
        // 24:00 is the next midnight.
        assert_eq!(
            local_instant(date(2026, 12, 1), 24, 0, chrono_tz::UTC),
            utc("2026-12-02T00:00:00Z")
        );
    }

    #[test]
    fn waves_span_utc_plus_14_to_minus_12() {
        assert_eq!(
            earliest_wave(date(2026, 12, 1), 9, 0),
            utc("2026-11-30T19:00:00Z")
        );
        assert_eq!(
            latest_wave(date(2026, 12, 1), 9, 0),
            utc("2026-12-01T21:00:00Z")
        );
        // Kiritimati (UTC+14) is the first wave, Algiers somewhere between.
        let kiritimati = local_instant(date(2026, 12, 1), 9, 0, chrono_tz::Pacific::Kiritimati);
        assert_eq!(kiritimati, earliest_wave(date(2026, 12, 1), 9, 0));
        let algiers = local_instant(date(2026, 12, 1), 9, 0, chrono_tz::Africa::Algiers);
        assert!(algiers > kiritimati && algiers < latest_wave(date(2026, 12, 1), 9, 0));
    }
}
