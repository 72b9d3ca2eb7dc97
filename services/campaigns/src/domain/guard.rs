//! The guardrails that keep customers from being tired out: frequency caps across every
//! flow and broadcast, and quiet hours — both in the customer's own timezone.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::model::ChannelName;

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
    /// Try again at this time (the earliest end of a full period among the broken caps).
    Defer { until: DateTime<Utc> },
    /// Do not send it.
    Skip,
}

/// The counters a send on `channel` at `at` increments: for each period any rule uses,
/// the overall scope and the channel's scope.
pub fn counter_keys(
    settings: &CapSettings,
    channel: ChannelName,
    at: DateTime<Utc>,
    tz: Tz,
) -> Vec<CounterKey> {
    let _ = (settings, channel, at, tz);
    unimplemented!()
}

/// Decides a send on `channel` at `now` for a customer in `tz` with `counts`.
/// `first_due` is when the send was first due (for DEFER's `max_defer_secs`).
pub fn cap_decision(
    settings: &CapSettings,
    channel: ChannelName,
    now: DateTime<Utc>,
    first_due: DateTime<Utc>,
    tz: Tz,
    counts: &CapCounts,
) -> CapDecision {
    let _ = (settings, channel, now, first_due, tz, counts);
    unimplemented!()
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
/// send waits until then). `None` when the send may go now.
pub fn quiet_until(
    rule: &QuietHoursRule,
    channel: ChannelName,
    now: DateTime<Utc>,
    tz: Tz,
) -> Option<DateTime<Utc>> {
    let _ = (rule, channel, now, tz);
    unimplemented!()
}

/// `HH:MM` (24-hour clock) → (hour, minute).
pub fn parse_hhmm(text: &str) -> Result<(u32, u32), String> {
    let _ = text;
    unimplemented!()
}

/// The customer's timezone by IANA name, or `default` when absent or unknown.
pub fn resolve_tz(name: Option<&str>, default: Tz) -> Tz {
    let _ = (name, default);
    unimplemented!()
}
