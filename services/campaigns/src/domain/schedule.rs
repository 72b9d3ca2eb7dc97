//! Cron expressions and local times: recurring flows and broadcasts, and broadcasts sent at
//! the same local time in every timezone (in waves, the earliest timezone first).

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

/// A parsed 5-field cron expression: minute hour day-of-month month day-of-week.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
}

impl Cron {
    /// Reads an expression: `*`, numbers, `a-b`, `a,b`, `*/n`, `a-b/n`; day of week 0–7 (0
    /// and 7 are Sunday); the usual rule that day-of-month and day-of-week are OR-ed when
    /// both are restricted. Errors say which field is wrong and why.
    pub fn parse(text: &str) -> Result<Cron, String> {
        Ok(Cron {
            text: text.to_owned(),
        })
    }

    /// The first occurrence strictly after `after`, read in `tz`; `None` if there is none
    /// within five years.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let _ = (after, tz);
        unimplemented!()
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The instant of a local date and time in `tz` (a time skipped by a DST change: the first
/// instant after the gap; a repeated time: the earlier one).
pub fn local_instant(date: NaiveDate, hour: u32, minute: u32, tz: Tz) -> DateTime<Utc> {
    let _ = (date, hour, minute, tz);
    unimplemented!()
}

/// The first instant at which a local date and time occurs anywhere (UTC+14).
pub fn earliest_wave(date: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    let _ = (date, hour, minute);
    unimplemented!()
}

/// The last instant at which a local date and time occurs anywhere (UTC−12).
pub fn latest_wave(date: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    let _ = (date, hour, minute);
    unimplemented!()
}
