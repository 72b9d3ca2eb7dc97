//! Send at the best time: the hour of the week when a customer is most likely to act,
//! learned from the local hours and weekdays of their own orders, opens and clicks.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Activity counted by local weekday (Monday = 0) and hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<[u32; 24]>,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![[0; 24]; 7],
        }
    }
}

impl Histogram {
    /// Counts one action at `at` (UTC) in the customer's `tz`, `weight` times.
    pub fn add(&mut self, at: DateTime<Utc>, tz: Tz, weight: u32) {
        let (weekday, hour) = local_slot(at, tz);
        if self.counts.len() < 7 {
            self.counts.resize(7, [0; 24]);
        }
        if let Some(row) = self.counts.get_mut(weekday) {
            row[hour] = row[hour].saturating_add(weight);
        }
    }

    /// Adds another histogram's counts (for the segment's and the workspace's).
    pub fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), [0; 24]);
        }
        for (row, other_row) in self.counts.iter_mut().zip(&other.counts) {
            for (count, other_count) in row.iter_mut().zip(other_row) {
                *count = count.saturating_add(*other_count);
            }
        }
    }

    /// Every count together.
    pub fn total(&self) -> u64 {
        let mut total = 0u64;
        for row in &self.counts {
            for count in row {
                total += u64::from(*count);
            }
        }
        total
    }

    /// The count of one local weekday and hour (0 when the histogram is short).
    fn count(&self, weekday: usize, hour: usize) -> u32 {
        self.counts.get(weekday).map_or(0, |row| row[hour])
    }

    /// A slot's score: its own count plus half the hour's average over the weekdays, so
    /// a habit at an hour carries over to weekdays without data.
    fn score(&self, weekday: usize, hour: usize) -> f64 {
        let mut hour_total = 0u64;
        for row in &self.counts {
            hour_total += u64::from(row[hour]);
        }
        f64::from(self.count(weekday, hour)) + 0.5 * hour_total as f64 / 7.0
    }
}

/// Local weekday (Monday = 0) and hour of `at` in `tz`.
fn local_slot(at: DateTime<Utc>, tz: Tz) -> (usize, usize) {
    let local = at.with_timezone(&tz);
    (
        local.weekday().num_days_from_monday() as usize,
        local.hour() as usize,
    )
}

/// The most hours [`best_send_time`] looks at: scores repeat weekly, so a week and a day
/// covers every slot (even around a DST change).
const MAX_SLOTS: i64 = 8 * 24;

/// The start of the local hour, in `[now, now + within_secs]`, when the customer is most
/// likely to act (`now` itself when that hour is the current one). The first histogram
/// with at least `min_samples` actions decides (the customer's own, then the fallbacks in
/// order); with none, `now`.
///
/// Each slot scores its weekday-and-hour count plus half that hour's average over the
/// weekdays; the highest wins, the earliest on ties. The following hours are walked in
/// UTC from the start of the next local hour, each read in `tz` (DST-correct).
pub fn best_send_time(
    now: DateTime<Utc>,
    within_secs: i64,
    tz: Tz,
    histograms: &[&Histogram],
    min_samples: u64,
) -> DateTime<Utc> {
    let Some(histogram) = histograms
        .iter()
        .find(|histogram| histogram.total() >= min_samples)
    else {
        return now;
    };
    let (weekday, hour) = local_slot(now, tz);
    let mut best = now;
    let mut best_score = histogram.score(weekday, hour);

    let Some(last) = now.checked_add_signed(Duration::seconds(within_secs)) else {
        return now;
    };
    // The start of the next local hour: `now` less the time into its local hour, plus 1 h.
    let local = now.with_timezone(&tz);
    let into_hour = i64::from(local.minute()) * 60 + i64::from(local.second());
    let mut slot = now
        .with_nanosecond(0)
        .unwrap_or(now)
        .checked_sub_signed(Duration::seconds(into_hour - 3600));
    for _ in 0..MAX_SLOTS {
        let Some(at) = slot else {
            break;
        };
        if at > last {
            break;
        }
        let (weekday, hour) = local_slot(at, tz);
        let score = histogram.score(weekday, hour);
        if score > best_score {
            best = at;
            best_score = score;
        }
        slot = at.checked_add_signed(Duration::hours(1));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGIERS: Tz = chrono_tz::Africa::Algiers;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("a UTC instant")
    }

    /// Orders at 20:00 in Algiers (19:00 UTC) on Monday, Tuesday and Wednesday of two
    /// weeks, and one at 09:00 on a Sunday.
    fn evening_customer() -> Histogram {
        let mut histogram = Histogram::default();
        for day in [
            "2026-11-23",
            "2026-11-24",
            "2026-11-25",
            "2026-11-30",
            "2026-12-01",
            "2026-12-02",
        ] {
            histogram.add(utc(&format!("{day}T19:00:00Z")), ALGIERS, 1);
        }
        histogram.add(utc("2026-11-29T08:00:00Z"), ALGIERS, 1);
        histogram
    }

    #[test]
    fn add_merge_total() {
        let histogram = evening_customer();
        assert_eq!(histogram.total(), 7);
        // Monday, Tuesday, Wednesday at 20:00; Sunday at 09:00.
        assert_eq!(histogram.counts[0][20], 2);
        assert_eq!(histogram.counts[1][20], 2);
        assert_eq!(histogram.counts[2][20], 2);
        assert_eq!(histogram.counts[6][9], 1);
        // 00:30 UTC on Monday 30 November is 19:30 on Sunday in New York.
        let mut other = Histogram::default();
        other.add(utc("2026-11-30T00:30:00Z"), chrono_tz::America::New_York, 3);
        assert_eq!(other.counts[6][19], 3);
        let mut merged = histogram.clone();
        merged.merge(&other);
        assert_eq!(merged.total(), 10);
        assert_eq!(merged.counts[6][19], 3);
        assert_eq!(merged.counts[0][20], 2);
    }

    #[test]
    fn picks_the_learned_evening_hour_on_a_new_weekday() {
        let histogram = evening_customer();
        // Thursday 10 December, 10:15 in Algiers: no Thursday data, but the 20:00 habit
        // (score 0.5 × 6 / 7) beats everything else: 20:00 local = 19:00 UTC.
        let now = utc("2026-12-10T09:15:00Z");
        assert_eq!(
            best_send_time(now, 86_400, ALGIERS, &[&histogram], 5),
            utc("2026-12-10T19:00:00Z")
        );
    }

    #[test]
    fn respects_within() {
        let histogram = evening_customer();
        let now = utc("2026-12-10T09:15:00Z");
        // 19:00 UTC is 9 h 45 min away: exactly within reach.
        assert_eq!(
            best_send_time(now, 9 * 3600 + 45 * 60, ALGIERS, &[&histogram], 5),
            utc("2026-12-10T19:00:00Z")
        );
        // A minute short: nothing scores above the current hour's 0 → now.
        assert_eq!(
            best_send_time(now, 9 * 3600 + 44 * 60, ALGIERS, &[&histogram], 5),
            now
        );
        // No time at all → now.
        assert_eq!(best_send_time(now, 0, ALGIERS, &[&histogram], 5), now);
    }

    #[test]
    fn own_weekday_beats_the_habit_elsewhere() {
        let mut histogram = evening_customer();
        // One Thursday order at 12:00 local: 1 + 0.5 × 1 / 7 ≈ 1.07 > 0.5 × 6 / 7 ≈ 0.43 at
        // 20:00.
        histogram.add(utc("2026-12-03T11:00:00Z"), ALGIERS, 1);
        let now = utc("2026-12-10T09:15:00Z");
        assert_eq!(
            best_send_time(now, 86_400, ALGIERS, &[&histogram], 5),
            utc("2026-12-10T11:00:00Z")
        );
    }

    #[test]
    fn the_current_hour_returns_now() {
        let histogram = evening_customer();
        // Wednesday 9 December, 20:10 local: this hour is the best one.
        let now = utc("2026-12-09T19:10:00Z");
        assert_eq!(best_send_time(now, 86_400, ALGIERS, &[&histogram], 5), now);
    }

    #[test]
    fn falls_back_to_the_next_histogram() {
        let mut own = Histogram::default();
        own.add(utc("2026-12-01T19:00:00Z"), ALGIERS, 2);
        // The workspace's: mornings at 09:00 local (08:00 UTC), every day of a week.
        let mut workspace = Histogram::default();
        for day in 23..30 {
            workspace.add(utc(&format!("2026-11-{day}T08:00:00Z")), ALGIERS, 10);
        }
        // Thursday 10 December, 00:15 local.
        let now = utc("2026-12-09T23:15:00Z");
        // The customer's 2 actions are too few: the workspace's 09:00 wins.
        assert_eq!(
            best_send_time(now, 86_400, ALGIERS, &[&own, &workspace], 5),
            utc("2026-12-10T08:00:00Z")
        );
        // With a lower threshold, the customer's own 20:00.
        assert_eq!(
            best_send_time(now, 86_400, ALGIERS, &[&own, &workspace], 2),
            utc("2026-12-10T19:00:00Z")
        );
    }

    #[test]
    fn no_data_returns_now() {
        let now = utc("2026-12-10T09:15:00Z");
        let empty = Histogram::default();
        assert_eq!(best_send_time(now, 86_400, ALGIERS, &[], 1), now);
        assert_eq!(best_send_time(now, 86_400, ALGIERS, &[&empty], 1), now);
        // Data, but below the threshold.
        let histogram = evening_customer();
        assert_eq!(best_send_time(now, 86_400, ALGIERS, &[&histogram], 8), now);
    }

    #[test]
    fn local_hours_across_spring_forward() {
        let new_york = chrono_tz::America::New_York;
        // Sunday evenings at 20:00 local.
        let mut histogram = Histogram::default();
        histogram.add(utc("2026-02-23T01:00:00Z"), new_york, 5);
        assert_eq!(histogram.counts[6][20], 5);
        // Saturday 7 March, 22:00 EST; clocks go forward early on Sunday: Sunday 20:00 EDT
        // is 00:00 UTC on Monday, not 01:00.
        let now = utc("2026-03-08T03:00:00Z");
        assert_eq!(
            best_send_time(now, 2 * 86_400, new_york, &[&histogram], 1),
            utc("2026-03-09T00:00:00Z")
        );
    }

    #[test]
    fn half_hour_offsets_use_local_hour_starts() {
        // India is UTC+5:30: 20:00 IST is 14:30 UTC.
        let kolkata = chrono_tz::Asia::Kolkata;
        let mut histogram = Histogram::default();
        histogram.add(utc("2026-12-01T14:30:00Z"), kolkata, 3);
        // 10:40 IST on Thursday 3 December.
        let now = utc("2026-12-03T05:10:00Z");
        assert_eq!(
            best_send_time(now, 86_400, kolkata, &[&histogram], 1),
            utc("2026-12-03T14:30:00Z")
        );
    }
}
