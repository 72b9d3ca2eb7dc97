//! What a segment definition says, once parsed: a tree of conditions.

use chrono::{DateTime, NaiveDate, Utc};

/// A parsed, validated `kind: Segment` document.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    pub description: String,
    pub condition: Condition,
}

/// One node of the condition tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Every child holds (an empty `all` holds).
    All(Vec<Condition>),
    /// At least one child holds (an empty `any` does not).
    Any(Vec<Condition>),
    /// The child does not hold.
    Not(Box<Condition>),
    /// A test on a profile attribute or a computed trait.
    Attribute(AttributeCondition),
    /// A test on what the customer did (boxed: by far the largest variant).
    Event(Box<EventCondition>),
    /// Membership in another segment of the workspace.
    InSegment(String),
}

/// Where an attribute condition reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The profile's free-form attributes (set by the shop through Upsert).
    Attribute,
    /// The traits profiles computes (orders_count, revenue, rfm.recency, …).
    Trait,
}

/// `attribute: PATH` / `trait: PATH` with one or more tests, all of which must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeCondition {
    pub source: Source,
    /// Dotted path inside the JSON object; arrays on the way are searched item by item.
    pub path: Vec<String>,
    pub tests: Vec<Test>,
}

/// A test of a JSON value.
///
/// Paths that cross arrays yield several values: positive tests hold when any value passes,
/// negative ones (`neq`, `not_in`, `exists: false`) when none is equal / present.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Eq(serde_json::Value),
    Neq(serde_json::Value),
    In(Vec<serde_json::Value>),
    NotIn(Vec<serde_json::Value>),
    Contains(String),
    StartsWith(String),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    /// Both ends inclusive.
    Between(f64, f64),
    Exists(bool),
    /// The value is a timestamp before the instant.
    Before(Instant),
    /// The value is a timestamp after the instant.
    After(Instant),
}

/// A point in time in a definition: absolute, or a duration before "now".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instant {
    At(DateTime<Utc>),
    /// That many seconds before the moment of evaluation.
    Ago(i64),
}

impl Instant {
    pub fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Instant::At(at) => at,
            Instant::Ago(seconds) => now - chrono::Duration::seconds(seconds),
        }
    }
}

/// Filters on an event's properties (`where:` inside an event condition).
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Property { path: Vec<String>, tests: Vec<Test> },
}

/// Bounds on a number; every bound that is set must hold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bounds {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
    pub eq: Option<f64>,
}

impl Bounds {
    pub fn at_least_one() -> Bounds {
        Bounds {
            gte: Some(1.0),
            ..Bounds::default()
        }
    }

    pub fn holds(&self, value: f64) -> bool {
        self.gt.is_none_or(|b| value > b)
            && self.gte.is_none_or(|b| value >= b)
            && self.lt.is_none_or(|b| value < b)
            && self.lte.is_none_or(|b| value <= b)
            && self.eq.is_none_or(|b| value == b)
    }

    /// Whether zero satisfies the bounds: then customers with no matching events at all
    /// are members too (e.g. `count: { lt: 1 }`).
    pub fn admits_zero(&self) -> bool {
        self.holds(0.0)
    }
}

/// Which days a behavioural condition looks at (days are UTC calendar days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// All of history.
    Ever,
    /// `within: Nd`: today and the N previous days.
    Within { days: i32 },
    /// `between: [A, B]` ago, A > B: from A days ago (inclusive) up to B days ago (exclusive),
    /// so `between: [90d, 30d]` and `within: 30d` split `within: 90d` without overlap.
    Between { from_days: i32, to_days: i32 },
    /// `from:` / `to:` dates, both inclusive.
    Dates {
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
    },
}

impl Window {
    /// The window's days (as days since 1970-01-01) on `today`: `[first, last]`.
    pub fn days(&self, today: i32) -> (i32, i32) {
        match *self {
            Window::Ever => (i32::MIN, i32::MAX),
            Window::Within { days } => (today - days, i32::MAX),
            Window::Between { from_days, to_days } => (today - from_days, today - to_days - 1),
            Window::Dates { from, to } => (
                from.map_or(i32::MIN, day_number),
                to.map_or(i32::MAX, day_number),
            ),
        }
    }

    /// True when the window moves with time.
    pub fn is_relative(&self) -> bool {
        matches!(self, Window::Within { .. } | Window::Between { .. })
    }
}

/// Days since 1970-01-01.
pub fn day_number(date: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (date - epoch).num_days() as i32
}

/// The UTC day (since 1970-01-01) of an instant.
pub fn day_of(at: DateTime<Utc>) -> i32 {
    at.timestamp().div_euclid(86_400) as i32
}

/// Midnight UTC at the start of a day number.
pub fn start_of_day(day: i32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(day) * 86_400, 0).unwrap_or_default()
}

/// `event: NAME` with its filters, measures and window.
#[derive(Debug, Clone, PartialEq)]
pub struct EventCondition {
    /// The events it counts.
    pub events: EventSelector,
    /// Bounds on the number of matching events in the window (default: at least one,
    /// unless `sum`/`avg` are given).
    pub count: Option<Bounds>,
    /// Bounds on the sum of `selector.value` over the window.
    pub sum: Option<Bounds>,
    /// Bounds on the average of `selector.value` per matching event over the window.
    pub avg: Option<Bounds>,
    pub window: Window,
    /// `not_followed_by:`: the customer's last matching event is at least `within` old and
    /// no follow-up event happened since it (the abandoned cart).
    pub not_followed_by: Option<FollowUp>,
}

/// Which events an aggregate counts: one name, optional filters, optional numeric value.
/// Two conditions with the same selector share one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSelector {
    pub name: String,
    pub filter: Option<Filter>,
    /// The canonical JSON of `filter` (keys sorted), part of the aggregate's identity.
    pub filter_json: serde_json::Value,
    /// Dotted path of the numeric property summed (for `sum:`/`avg:`).
    pub value: Option<Vec<String>>,
    /// The stable id of the above (see [`super::aggregate::hash_selector`]), computed once.
    pub id: i64,
}

impl EventSelector {
    pub fn new(
        name: String,
        filter: Option<Filter>,
        filter_json: serde_json::Value,
        value: Option<Vec<String>>,
    ) -> EventSelector {
        let id = super::aggregate::hash_selector(&name, &filter_json, value.as_deref());
        EventSelector {
            name,
            filter,
            filter_json,
            value,
            id,
        }
    }
}

/// The follow-up event of `not_followed_by:`.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub events: EventSelector,
    /// Seconds to wait for it.
    pub within_secs: i64,
}
