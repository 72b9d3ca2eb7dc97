//! The guardrails that keep customers from being tired out: frequency caps across every
//! flow and broadcast, and quiet hours — both in the customer's own timezone.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Days, Duration, LocalResult, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::model::ChannelName;
use super::schedule::local_instant;

/// The span a cap counts over, in the customer's timezone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapPeriod {
    /// A calendar day.
    Day,
    /// A calendar week, Monday to Sunday.
    Week,
}

/// At most `max` marketing messages per `period`, on `channel` (`None`: all channels).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapRule {
    pub channel: Option<ChannelName>,
    pub period: CapPeriod,
    pub max: u32,
}

/// What happens to a send that would break a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapPolicy {
    /// Held until the cap allows it, at most `max_defer_secs` after it was first due;
    /// then skipped.
    Defer { max_defer_secs: i64 },
    /// Skipped.
    Skip,
}

/// A workspace's caps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapSettings {
    pub rules: Vec<CapRule>,
    pub policy: CapPolicy,
}

impl Default for CapSettings {
    /// No caps, DEFER at most 24 h.
    fn default() -> CapSettings {
        CapSettings {
            rules: Vec::new(),
            policy: CapPolicy::Defer {
                max_defer_secs: 86_400,
            },
        }
    }
}

/// One counter a send increments: the scope (`all` or a channel's name) and the period's
/// key in the customer's timezone (`d2026-11-30` for a day, `w2026-11-30` for the week
/// starting that Monday).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub scope: String,
    pub period_key: String,
}

/// The counts a customer has so far, by counter.
pub type CapCounts = HashMap<CounterKey, u32>;

/// What the caps say about one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapDecision {
    /// Send it (and increment [`counter_keys`]).
    Allow,
    /// Try again at this time: when the periods of every broken cap have ended (the latest
    /// of their ends).
    Defer { until: DateTime<Utc> },
    /// Do not send it.
    Skip,
}

/// The counters a send on `channel` at `at` increments: for each period any rule uses
/// (days first, then weeks), the overall scope and the channel's scope. No rules: none.
pub fn counter_keys(
    settings: &CapSettings,
    channel: ChannelName,
    at: DateTime<Utc>,
    tz: Tz,
) -> Vec<CounterKey> {
    let mut keys = Vec::new();
    for period in [CapPeriod::Day, CapPeriod::Week] {
        if !settings.rules.iter().any(|rule| rule.period == period) {
            continue;
        }
        let period_key = period_key(period, at, tz);
        keys.push(CounterKey {
            scope: "all".to_owned(),
            period_key: period_key.clone(),
        });
        keys.push(CounterKey {
            scope: channel.as_str().to_owned(),
            period_key,
        });
    }
    keys
}

/// Decides a send on `channel` at `now` for a customer in `tz` with `counts`.
/// `first_due` is when the send was first due (for DEFER's `max_defer_secs`).
///
/// A rule applies when it is overall or on `channel`; it is broken when its counter for
/// the current period has reached `max`. DEFER waits until every broken cap's period has
/// ended, and skips when that is later than `max_defer_secs` after `first_due`.
pub fn cap_decision(
    settings: &CapSettings,
    channel: ChannelName,
    now: DateTime<Utc>,
    first_due: DateTime<Utc>,
    tz: Tz,
    counts: &CapCounts,
) -> CapDecision {
    let mut until: Option<DateTime<Utc>> = None;
    for rule in &settings.rules {
        let scope = match rule.channel {
            None => "all",
            Some(rule_channel) if rule_channel == channel => rule_channel.as_str(),
            Some(_) => continue,
        };
        let key = CounterKey {
            scope: scope.to_owned(),
            period_key: period_key(rule.period, now, tz),
        };
        let count = counts.get(&key).copied().unwrap_or(0);
        if count < rule.max {
            continue;
        }
        let end = period_end(rule.period, now, tz);
        if until.is_none_or(|latest| end > latest) {
            until = Some(end);
        }
    }
    let Some(until) = until else {
        return CapDecision::Allow;
    };
    match settings.policy {
        CapPolicy::Skip => CapDecision::Skip,
        CapPolicy::Defer { max_defer_secs } => {
            let deadline = first_due
                .checked_add_signed(Duration::seconds(max_defer_secs))
                .unwrap_or(first_due);
            if until > deadline {
                CapDecision::Skip
            } else {
                CapDecision::Defer { until }
            }
        }
    }
}

/// The local date of `at` in `tz`, and the Monday of its week.
fn local_day_and_monday(at: DateTime<Utc>, tz: Tz) -> (NaiveDate, NaiveDate) {
    let day = at.with_timezone(&tz).date_naive();
    let back = Days::new(u64::from(day.weekday().num_days_from_monday()));
    let monday = day.checked_sub_days(back).unwrap_or(day);
    (day, monday)
}

/// The key of the period holding `at` in `tz`: `d2026-11-30`, or `w` and its week's Monday.
fn period_key(period: CapPeriod, at: DateTime<Utc>, tz: Tz) -> String {
    let (day, monday) = local_day_and_monday(at, tz);
    match period {
        CapPeriod::Day => format!("d{day}"),
        CapPeriod::Week => format!("w{monday}"),
    }
}

/// When the period holding `at` ends: the next local midnight, or the next Monday's.
fn period_end(period: CapPeriod, at: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let (day, monday) = local_day_and_monday(at, tz);
    let next = match period {
        CapPeriod::Day => day.checked_add_days(Days::new(1)),
        CapPeriod::Week => monday.checked_add_days(Days::new(7)),
    };
    local_instant(next.unwrap_or(day), 0, 0, tz)
}

/// A workspace's quiet hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuietHoursRule {
    pub enabled: bool,
    /// (hour, minute) local.
    pub start: (u32, u32),
    /// (hour, minute) local; before `start` means the next day.
    pub end: (u32, u32),
    /// Empty: every channel.
    pub channels: Vec<ChannelName>,
    /// IANA name of the timezone for customers without one.
    pub default_timezone: String,
}

impl Default for QuietHoursRule {
    /// On, 22:00 to 08:00, every channel, UTC for customers without a timezone.
    fn default() -> QuietHoursRule {
        QuietHoursRule {
            enabled: true,
            start: (22, 0),
            end: (8, 0),
            channels: Vec::new(),
            default_timezone: "UTC".to_owned(),
        }
    }
}

/// When `now` falls in the quiet window for `channel` in `tz`: the instant it ends (the
/// send waits until then). `None` when the send may go now: the rule is off, does not cover
/// the channel, or has an empty window (start = end).
///
/// The window is `[start, end)` in local time; an `end` at or before `start` wraps past
/// midnight. Its end is the next local `end` after `now` (a time skipped by DST: the first
/// instant after the gap).
pub fn quiet_until(
    rule: &QuietHoursRule,
    channel: ChannelName,
    now: DateTime<Utc>,
    tz: Tz,
) -> Option<DateTime<Utc>> {
    if !rule.enabled || rule.start == rule.end {
        return None;
    }
    if !rule.channels.is_empty() && !rule.channels.contains(&channel) {
        return None;
    }
    let local = now.with_timezone(&tz).naive_local();
    let second = local.time().num_seconds_from_midnight();
    let start = rule.start.0 * 3600 + rule.start.1 * 60;
    let end = rule.end.0 * 3600 + rule.end.1 * 60;
    let quiet = if start < end {
        second >= start && second < end
    } else {
        second >= start || second < end
    };
    if !quiet {
        return None;
    }
    // Before `end`: today's; otherwise (the evening part of a wrapping window) tomorrow's.
    let date = if second < end {
        local.date()
    } else {
        local.date().succ_opt()?
    };
    let until = local_instant(date, rule.end.0, rule.end.1, tz);
    if until > now {
        return Some(until);
    }
    // `now` is in the second pass of a repeated hour and `end` falls in it too: its later
    // instant.
    let naive = date.and_hms_opt(rule.end.0, rule.end.1, 0)?;
    match tz.from_local_datetime(&naive) {
        LocalResult::Ambiguous(_, later) => Some(later.with_timezone(&Utc)),
        _ => Some(until),
    }
}

/// `HH:MM` (24-hour clock, the hour may have one digit) → (hour, minute).
pub fn parse_hhmm(text: &str) -> Result<(u32, u32), String> {
    let text = text.trim();
    let Some((hour, minute)) = text.split_once(':') else {
        return Err(format!("expected HH:MM, got {text:?}"));
    };
    let digits = |part: &str, widths: &[usize]| {
        widths.contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hour, &[1, 2]) || !digits(minute, &[2]) {
        return Err(format!("expected HH:MM, got {text:?}"));
    }
    let hour: u32 = hour
        .parse()
        .map_err(|_| format!("expected HH:MM, got {text:?}"))?;
    let minute: u32 = minute
        .parse()
        .map_err(|_| format!("expected HH:MM, got {text:?}"))?;
    if hour > 23 {
        return Err(format!("hour {hour} is out of range 0-23 in {text:?}"));
    }
    if minute > 59 {
        return Err(format!("minute {minute} is out of range 0-59 in {text:?}"));
    }
    Ok((hour, minute))
}

/// The customer's timezone by IANA name, or `default` when absent or unknown.
pub fn resolve_tz(name: Option<&str>, default: Tz) -> Tz {
    match name {
        Some(name) => name.trim().parse().unwrap_or(default),
        None => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGIERS: Tz = chrono_tz::Africa::Algiers;
    const NEW_YORK: Tz = chrono_tz::America::New_York;
    const TOKYO: Tz = chrono_tz::Asia::Tokyo;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("a UTC instant")
    }

    fn key(scope: &str, period_key: &str) -> CounterKey {
        CounterKey {
            scope: scope.to_owned(),
            period_key: period_key.to_owned(),
        }
    }

    fn rule(channel: Option<ChannelName>, period: CapPeriod, max: u32) -> CapRule {
        CapRule {
            channel,
            period,
            max,
        }
    }

    fn settings(rules: Vec<CapRule>, policy: CapPolicy) -> CapSettings {
        CapSettings { rules, policy }
    }

    const DEFER_24H: CapPolicy = CapPolicy::Defer {
        max_defer_secs: 86_400,
    };

    #[test]
    fn counter_keys_in_the_customers_day_and_week() {
        let caps = settings(
            vec![
                rule(None, CapPeriod::Day, 2),
                rule(Some(ChannelName::Push), CapPeriod::Week, 5),
            ],
            DEFER_24H,
        );
        // 23:30 UTC on Sunday 29 November is 00:30 on Monday 30 November in Algiers (UTC+1)
        // but 18:30 on Sunday in New York (UTC−5).
        let at = utc("2026-11-29T23:30:00Z");
        assert_eq!(
            counter_keys(&caps, ChannelName::Email, at, ALGIERS),
            [
                key("all", "d2026-11-30"),
                key("email", "d2026-11-30"),
                key("all", "w2026-11-30"),
                key("email", "w2026-11-30"),
            ]
        );
        assert_eq!(
            counter_keys(&caps, ChannelName::Email, at, NEW_YORK),
            [
                key("all", "d2026-11-29"),
                key("email", "d2026-11-29"),
                key("all", "w2026-11-23"),
                key("email", "w2026-11-23"),
            ]
        );
        // Two day rules: the day's keys once.
        let two_days = settings(
            vec![
                rule(None, CapPeriod::Day, 3),
                rule(Some(ChannelName::Sms), CapPeriod::Day, 1),
            ],
            DEFER_24H,
        );
        assert_eq!(
            counter_keys(&two_days, ChannelName::Sms, at, ALGIERS),
            [key("all", "d2026-11-30"), key("sms", "d2026-11-30")]
        );
    }

    #[test]
    fn no_rules_no_counters_and_allow() {
        let caps = CapSettings::default();
        let now = utc("2026-11-30T10:00:00Z");
        assert!(counter_keys(&caps, ChannelName::Push, now, ALGIERS).is_empty());
        let counts = CapCounts::from([(key("all", "d2026-11-30"), 100)]);
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &counts),
            CapDecision::Allow
        );
    }

    #[test]
    fn day_boundary_differs_by_timezone() {
        let caps = settings(vec![rule(None, CapPeriod::Day, 3)], CapPolicy::Skip);
        // Three sends counted on 29 November (local).
        let counts = CapCounts::from([(key("all", "d2026-11-29"), 3)]);
        let now = utc("2026-11-29T23:30:00Z");
        // Already 30 November in Algiers: a fresh day.
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &counts),
            CapDecision::Allow
        );
        // Still 29 November in New York: the cap is reached.
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, NEW_YORK, &counts),
            CapDecision::Skip
        );
        // Below the cap: allowed.
        let two = CapCounts::from([(key("all", "d2026-11-29"), 2)]);
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, NEW_YORK, &two),
            CapDecision::Allow
        );
    }

    #[test]
    fn per_channel_and_overall_rules() {
        let caps = settings(
            vec![
                rule(Some(ChannelName::Email), CapPeriod::Day, 1),
                rule(None, CapPeriod::Week, 4),
            ],
            CapPolicy::Skip,
        );
        // Wednesday 2 December, 11:00 in Algiers.
        let now = utc("2026-12-02T10:00:00Z");
        let counts = CapCounts::from([
            (key("email", "d2026-12-02"), 1),
            (key("all", "d2026-12-02"), 1),
            (key("all", "w2026-11-30"), 3),
        ]);
        // The email cap stops email, not push.
        assert_eq!(
            cap_decision(&caps, ChannelName::Email, now, now, ALGIERS, &counts),
            CapDecision::Skip
        );
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &counts),
            CapDecision::Allow
        );
        // A push counter does not count for the email rule.
        let push_only = CapCounts::from([(key("push", "d2026-12-02"), 5)]);
        assert_eq!(
            cap_decision(&caps, ChannelName::Email, now, now, ALGIERS, &push_only),
            CapDecision::Allow
        );
        // The overall weekly cap stops every channel.
        let week_full = CapCounts::from([(key("all", "w2026-11-30"), 4)]);
        for channel in [ChannelName::Email, ChannelName::Push, ChannelName::Sms] {
            assert_eq!(
                cap_decision(&caps, channel, now, now, ALGIERS, &week_full),
                CapDecision::Skip
            );
        }
    }

    #[test]
    fn defer_until_the_period_ends_in_algiers() {
        let day = rule(None, CapPeriod::Day, 2);
        let week = rule(Some(ChannelName::Push), CapPeriod::Week, 5);
        let policy = CapPolicy::Defer {
            max_defer_secs: 7 * 86_400,
        };
        // Wednesday 2 December, 11:00 local.
        let now = utc("2026-12-02T10:00:00Z");
        let day_full = CapCounts::from([(key("all", "d2026-12-02"), 2)]);
        let week_full = CapCounts::from([(key("push", "w2026-11-30"), 5)]);
        let both = CapCounts::from([
            (key("all", "d2026-12-02"), 2),
            (key("push", "w2026-11-30"), 5),
        ]);
        let caps = settings(vec![day.clone(), week.clone()], policy);
        // Local midnight of Thursday 3 December = 23:00 UTC on the 2nd.
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &day_full),
            CapDecision::Defer {
                until: utc("2026-12-02T23:00:00Z")
            }
        );
        // Monday 7 December 00:00 local = 23:00 UTC on the 6th.
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &week_full),
            CapDecision::Defer {
                until: utc("2026-12-06T23:00:00Z")
            }
        );
        // Both broken: the later end, whatever the rules' order.
        let reversed = settings(vec![week, day], policy);
        for caps in [&caps, &reversed] {
            assert_eq!(
                cap_decision(caps, ChannelName::Push, now, now, ALGIERS, &both),
                CapDecision::Defer {
                    until: utc("2026-12-06T23:00:00Z")
                }
            );
        }
    }

    #[test]
    fn defer_across_dst_in_new_york() {
        let policy = CapPolicy::Defer {
            max_defer_secs: 7 * 86_400,
        };
        let day = settings(vec![rule(None, CapPeriod::Day, 1)], policy);
        let week = settings(vec![rule(None, CapPeriod::Week, 1)], policy);

        // Saturday 7 March, 15:00 EST: the day ends at midnight EST (05:00 UTC).
        let now = utc("2026-03-07T20:00:00Z");
        let counts = CapCounts::from([(key("all", "d2026-03-07"), 1)]);
        assert_eq!(
            cap_decision(&day, ChannelName::Push, now, now, NEW_YORK, &counts),
            CapDecision::Defer {
                until: utc("2026-03-08T05:00:00Z")
            }
        );
        // Sunday 8 March (clocks go forward at 02:00), 08:00 EDT: the day ends at midnight
        // EDT (04:00 UTC), an hour earlier in UTC than the day before.
        let now = utc("2026-03-08T12:00:00Z");
        let counts = CapCounts::from([(key("all", "d2026-03-08"), 1)]);
        assert_eq!(
            cap_decision(&day, ChannelName::Push, now, now, NEW_YORK, &counts),
            CapDecision::Defer {
                until: utc("2026-03-09T04:00:00Z")
            }
        );
        // Wednesday 28 October (EDT), the week of Monday 26: it ends on Monday 2 November
        // at 00:00 EST (clocks went back on the 1st) = 05:00 UTC, not 04:00.
        let now = utc("2026-10-28T16:00:00Z");
        let counts = CapCounts::from([(key("all", "w2026-10-26"), 1)]);
        assert_eq!(
            cap_decision(&week, ChannelName::Push, now, now, NEW_YORK, &counts),
            CapDecision::Defer {
                until: utc("2026-11-02T05:00:00Z")
            }
        );
        assert_eq!(
            counter_keys(&week, ChannelName::Push, now, NEW_YORK),
            [key("all", "w2026-10-26"), key("push", "w2026-10-26")]
        );
    }

    #[test]
    fn defer_beyond_max_defer_is_skip() {
        let caps = settings(vec![rule(None, CapPeriod::Day, 1)], DEFER_24H);
        // 11:00 in Algiers; the day ends at 23:00 UTC, 13 h later.
        let now = utc("2026-12-02T10:00:00Z");
        let counts = CapCounts::from([(key("all", "d2026-12-02"), 1)]);
        // First due 11 h ago: 23:00 is exactly 24 h after it — still allowed to wait.
        let first_due = utc("2026-12-01T23:00:00Z");
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, first_due, ALGIERS, &counts),
            CapDecision::Defer {
                until: utc("2026-12-02T23:00:00Z")
            }
        );
        // First due 20 h ago: 23:00 is 33 h after it — skipped.
        let first_due = utc("2026-12-01T14:00:00Z");
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, first_due, ALGIERS, &counts),
            CapDecision::Skip
        );
        // A weekly cap broken on Wednesday: the week ends in more than 24 h — skipped.
        let weekly = settings(vec![rule(None, CapPeriod::Week, 1)], DEFER_24H);
        let counts = CapCounts::from([(key("all", "w2026-11-30"), 1)]);
        assert_eq!(
            cap_decision(&weekly, ChannelName::Push, now, now, ALGIERS, &counts),
            CapDecision::Skip
        );
    }

    #[test]
    fn max_zero_blocks_the_channel() {
        let caps = settings(
            vec![rule(Some(ChannelName::Sms), CapPeriod::Day, 0)],
            CapPolicy::Skip,
        );
        let now = utc("2026-12-02T10:00:00Z");
        let counts = CapCounts::new();
        assert_eq!(
            cap_decision(&caps, ChannelName::Sms, now, now, ALGIERS, &counts),
            CapDecision::Skip
        );
        assert_eq!(
            cap_decision(&caps, ChannelName::Push, now, now, ALGIERS, &counts),
            CapDecision::Allow
        );
    }

    fn quiet(start: (u32, u32), end: (u32, u32)) -> QuietHoursRule {
        QuietHoursRule {
            start,
            end,
            ..QuietHoursRule::default()
        }
    }

    #[test]
    fn the_same_instant_is_quiet_in_tokyo_not_in_algiers() {
        let rule = QuietHoursRule::default();
        // 13:30 UTC: 14:30 in Algiers, 22:30 in Tokyo.
        let now = utc("2026-06-10T13:30:00Z");
        assert_eq!(quiet_until(&rule, ChannelName::Push, now, ALGIERS), None);
        // Until 08:00 JST on the 11th = 23:00 UTC on the 10th.
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, now, TOKYO),
            Some(utc("2026-06-10T23:00:00Z"))
        );
        // 21:30 UTC: 22:30 in Algiers (quiet until 08:00 local = 07:00 UTC), 06:30 on the
        // 11th in Tokyo (quiet until 08:00 JST = 23:00 UTC on the 10th).
        let now = utc("2026-06-10T21:30:00Z");
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, now, ALGIERS),
            Some(utc("2026-06-11T07:00:00Z"))
        );
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, now, TOKYO),
            Some(utc("2026-06-10T23:00:00Z"))
        );
    }

    #[test]
    fn wrapping_window_edges() {
        let rule = quiet((22, 0), (8, 0));
        // 21:59 local: not yet.
        assert_eq!(
            quiet_until(
                &rule,
                ChannelName::Push,
                utc("2026-06-10T20:59:00Z"),
                ALGIERS
            ),
            None
        );
        // 22:00 local: quiet until 08:00 tomorrow.
        assert_eq!(
            quiet_until(
                &rule,
                ChannelName::Push,
                utc("2026-06-10T21:00:00Z"),
                ALGIERS
            ),
            Some(utc("2026-06-11T07:00:00Z"))
        );
        // 00:00 local on the 11th: the same end.
        assert_eq!(
            quiet_until(
                &rule,
                ChannelName::Push,
                utc("2026-06-10T23:00:00Z"),
                ALGIERS
            ),
            Some(utc("2026-06-11T07:00:00Z"))
        );
        // 07:59 local: a minute left.
        assert_eq!(
            quiet_until(
                &rule,
                ChannelName::Push,
                utc("2026-06-11T06:59:00Z"),
                ALGIERS
            ),
            Some(utc("2026-06-11T07:00:00Z"))
        );
        // 08:00 local: over.
        assert_eq!(
            quiet_until(
                &rule,
                ChannelName::Push,
                utc("2026-06-11T07:00:00Z"),
                ALGIERS
            ),
            None
        );
    }

    #[test]
    fn non_wrapping_window() {
        // A midday pause, 12:00–14:00 in Tokyo (UTC+9).
        let rule = quiet((12, 0), (14, 0));
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-06-10T02:59:00Z"), TOKYO),
            None
        );
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-06-10T03:00:00Z"), TOKYO),
            Some(utc("2026-06-10T05:00:00Z"))
        );
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-06-10T04:30:00Z"), TOKYO),
            Some(utc("2026-06-10T05:00:00Z"))
        );
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-06-10T05:00:00Z"), TOKYO),
            None
        );
        // 23:00 in Tokyo is outside a non-wrapping window.
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-06-10T14:00:00Z"), TOKYO),
            None
        );
    }

    #[test]
    fn channel_filter_disabled_and_empty_window() {
        // 23:00 in Algiers.
        let now = utc("2026-06-10T22:00:00Z");
        let sms_only = QuietHoursRule {
            channels: vec![ChannelName::Sms],
            ..QuietHoursRule::default()
        };
        assert_eq!(
            quiet_until(&sms_only, ChannelName::Push, now, ALGIERS),
            None
        );
        assert_eq!(
            quiet_until(&sms_only, ChannelName::Sms, now, ALGIERS),
            Some(utc("2026-06-11T07:00:00Z"))
        );
        let disabled = QuietHoursRule {
            enabled: false,
            ..QuietHoursRule::default()
        };
        assert_eq!(quiet_until(&disabled, ChannelName::Sms, now, ALGIERS), None);
        let empty = quiet((22, 0), (22, 0));
        assert_eq!(quiet_until(&empty, ChannelName::Push, now, ALGIERS), None);
        assert_eq!(
            quiet_until(
                &empty,
                ChannelName::Push,
                utc("2026-06-10T21:00:00Z"),
                ALGIERS
            ),
            None
        );
    }

    #[test]
    fn quiet_end_in_a_dst_gap() {
        // 23:00–02:30 in Paris; 02:30 does not exist on 29 March 2026 (02:00 CET → 03:00
        // CEST at 01:00 UTC): the window ends when the gap does.
        let rule = quiet((23, 0), (2, 30));
        let paris = chrono_tz::Europe::Paris;
        // 00:00 CET on the 29th.
        assert_eq!(
            quiet_until(&rule, ChannelName::Push, utc("2026-03-28T23:00:00Z"), paris),
            Some(utc("2026-03-29T01:00:00Z"))
        );
    }

    #[test]
    fn parse_hhmm_accepts_and_explains() {
        assert_eq!(parse_hhmm("08:00"), Ok((8, 0)));
        assert_eq!(parse_hhmm("8:05"), Ok((8, 5)));
        assert_eq!(parse_hhmm("23:59"), Ok((23, 59)));
        assert_eq!(parse_hhmm(" 00:00 "), Ok((0, 0)));
        assert_eq!(
            parse_hhmm("24:00"),
            Err("hour 24 is out of range 0-23 in \"24:00\"".to_owned())
        );
        assert_eq!(
            parse_hhmm("12:60"),
            Err("minute 60 is out of range 0-59 in \"12:60\"".to_owned())
        );
        assert_eq!(parse_hhmm("7"), Err("expected HH:MM, got \"7\"".to_owned()));
        for bad in ["", "8:5", "+8:00", "08:00:00", "ab:cd", "123:00", ":30"] {
            assert!(parse_hhmm(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolve_tz_falls_back() {
        assert_eq!(resolve_tz(Some("Africa/Algiers"), TOKYO), ALGIERS);
        assert_eq!(resolve_tz(Some("Mars/Olympus"), TOKYO), TOKYO);
        assert_eq!(resolve_tz(Some(""), TOKYO), TOKYO);
        assert_eq!(resolve_tz(None, NEW_YORK), NEW_YORK);
    }
}
