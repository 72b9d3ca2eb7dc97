//! What makes an event acceptable, and how a batch is cut into what to store: pure rules,
//! no I/O.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Datelike as _, Duration, NaiveDate, TimeZone as _, Utc};
use serde::Deserialize;

/// Limits applied to every event.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// How far in the future a timestamp may be (clients' clocks drift).
    pub max_future_secs: i64,
    /// Largest properties object, encoded as JSON.
    pub max_properties_bytes: usize,
    /// Deepest nesting of properties.
    pub max_depth: usize,
    /// Most events in one TrackBatch or Import chunk.
    pub max_batch: usize,
    /// Most context entries.
    pub max_context_entries: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_future_secs: 24 * 3600,
            // Real orders run to hundreds of lines (one Online Retail invoice has 1,100).
            max_properties_bytes: 512 * 1024,
            max_depth: 8,
            max_batch: 1000,
            max_context_entries: 32,
        }
    }
}

/// An event that passed validation, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub message_id: String,
    pub name: String,
    pub customer_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub timestamp: DateTime<Utc>,
    /// Properties as a JSON object, already encoded (for Postgres).
    pub properties: String,
    /// Context as a JSON object of strings, already encoded (for Postgres).
    pub context: String,
    /// The same two, decoded (for publishing without reading the rows back).
    pub properties_value: serde_json::Value,
    pub context_value: serde_json::Value,
}

/// An event as received, before validation (the API layer fills it from the proto).
#[derive(Debug, Clone, Default)]
pub struct RawEvent {
    pub message_id: String,
    pub name: String,
    pub customer_id: String,
    pub anonymous_id: String,
    /// `None` when the sender did not say; `Some(None)` when it sent an out-of-range value.
    pub timestamp: Option<Option<DateTime<Utc>>>,
    pub properties: serde_json::Value,
    pub context: Vec<(String, String)>,
}

/// A field of an event that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field inside the event (`name`, `properties.items[2]`, …).
    pub field: String,
    /// Why.
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The earliest acceptable event time.
fn earliest() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Checks one event; `now` is the receipt time; `new_id` makes a message id when it is empty.
pub fn validate(
    raw: RawEvent,
    now: DateTime<Utc>,
    limits: &Limits,
    new_id: impl FnOnce() -> String,
) -> Result<NewEvent, FieldError> {
    if !is_event_name(&raw.name) {
        return Err(refuse(
            "name",
            format!(
                "{:?} is not a snake_case name of 1-64 characters starting with a letter",
                truncate(&raw.name)
            ),
        ));
    }
    check_id("message_id", &raw.message_id)?;
    check_id("customer_id", &raw.customer_id)?;
    check_id("anonymous_id", &raw.anonymous_id)?;
    if raw.customer_id.is_empty() && raw.anonymous_id.is_empty() {
        return Err(refuse(
            "customer_id",
            "one of customer_id and anonymous_id is required",
        ));
    }
    let timestamp = match raw.timestamp {
        None => now,
        Some(None) => return Err(refuse("timestamp", "out of range")),
        Some(Some(ts)) if ts > now + Duration::seconds(limits.max_future_secs) => {
            return Err(refuse(
                "timestamp",
                format!(
                    "{ts} is more than {}s in the future",
                    limits.max_future_secs
                ),
            ));
        }
        Some(Some(ts)) if ts < earliest() => {
            return Err(refuse("timestamp", format!("{ts} is before 2000-01-01")));
        }
        Some(Some(ts)) => ts,
    };
    let properties = match raw.properties {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        object @ serde_json::Value::Object(_) => object,
        _ => return Err(refuse("properties", "must be an object")),
    };
    if let Some(path) = too_deep(&properties, limits.max_depth, "properties") {
        return Err(refuse(
            path,
            format!("nested deeper than {} levels", limits.max_depth),
        ));
    }
    let properties_value = properties;
    let properties = properties_value.to_string();
    if properties.len() > limits.max_properties_bytes {
        return Err(refuse(
            "properties",
            format!(
                "{} bytes as JSON, more than {}",
                properties.len(),
                limits.max_properties_bytes
            ),
        ));
    }
    if raw.context.len() > limits.max_context_entries {
        return Err(refuse(
            "context",
            format!(
                "{} entries, more than {}",
                raw.context.len(),
                limits.max_context_entries
            ),
        ));
    }
    let mut context = serde_json::Map::new();
    for (key, value) in raw.context {
        if key.is_empty() || key.len() > 64 {
            return Err(refuse(
                "context",
                format!("key {:?} must have 1-64 characters", truncate(&key)),
            ));
        }
        if value.len() > 1024 {
            return Err(refuse(format!("context.{key}"), "longer than 1024 bytes"));
        }
        context.insert(key, serde_json::Value::String(value));
    }
    let message_id = if raw.message_id.is_empty() {
        new_id()
    } else {
        raw.message_id
    };
    let context_value = serde_json::Value::Object(context);
    Ok(NewEvent {
        message_id,
        name: raw.name,
        customer_id: non_empty(raw.customer_id),
        anonymous_id: non_empty(raw.anonymous_id),
        timestamp,
        properties,
        properties_value,
        context: context_value.to_string(),
        context_value,
    })
}

/// `[a-z][a-z0-9_]{0,63}`.
pub fn is_event_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 64
        && first.is_ascii_lowercase()
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.len() > 128 {
        return Err(refuse(field, "longer than 128 characters"));
    }
    if id.chars().any(char::is_control) {
        return Err(refuse(field, "contains control characters"));
    }
    if !id.is_empty() && id.trim() != id {
        return Err(refuse(field, "has leading or trailing spaces"));
    }
    Ok(())
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The path of the first value nested deeper than `max` levels, if any.
///
/// Measures first and builds the path only for a value that fails: this runs on every
/// ingested event, and formatting a path per node was a large share of ingestion's CPU.
fn too_deep(value: &serde_json::Value, max: usize, path: &str) -> Option<String> {
    if depth(value) <= max {
        return None;
    }
    if max == 0 {
        return Some(path.to_owned());
    }
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                if depth(child) > max - 1 {
                    return too_deep(child, max - 1, &format!("{path}.{key}"));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                if depth(child) > max - 1 {
                    return too_deep(child, max - 1, &format!("{path}[{index}]"));
                }
            }
        }
        _ => {}
    }
    None
}

/// Levels of nesting: 0 for a scalar, 1 for an object of scalars, …
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Splits a validated batch into the events to store and the positions of repeats of a
/// message id earlier in the same batch (stored once, the rest counted as duplicates).
pub fn first_of_each_id(events: Vec<(usize, NewEvent)>) -> (Vec<(usize, NewEvent)>, usize) {
    let mut seen = HashSet::with_capacity(events.len());
    let mut unique = Vec::with_capacity(events.len());
    let mut repeats = 0;
    for (index, event) in events {
        if seen.insert(event.message_id.clone()) {
            unique.push((index, event));
        } else {
            repeats += 1;
        }
    }
    (unique, repeats)
}

/// The first day of each month the events fall in: the partitions they need.
pub fn months_of<'a>(times: impl IntoIterator<Item = &'a DateTime<Utc>>) -> BTreeSet<NaiveDate> {
    let mut months = BTreeSet::new();
    for time in times {
        if let Some(first) = NaiveDate::from_ymd_opt(time.year(), time.month(), 1) {
            months.insert(first);
        }
    }
    months
}

/// The first day of the month after `month`.
pub fn next_month(month: NaiveDate) -> NaiveDate {
    let (year, next) = if month.month() == 12 {
        (month.year() + 1, 1)
    } else {
        (month.year(), month.month() + 1)
    };
    NaiveDate::from_ymd_opt(year, next, 1).unwrap_or(month)
}

/// The bucket of the identity lock an anonymous id falls in. Ingestion of anonymous events
/// takes the buckets it touches in shared mode and a merge takes its bucket exclusively,
/// so an event is either stored before a merge (and re-attributed by it) or after it (and
/// attributed at insert): it can never keep the old id.
pub fn identity_bucket(workspace_id: &str, anonymous_id: &str) -> i32 {
    // FNV-1a: stable across processes and versions, unlike the std hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in workspace_id
        .bytes()
        .chain([0u8])
        .chain(anonymous_id.bytes())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % IDENTITY_BUCKETS) as i32
}

/// The key under which an accepted message id is remembered for dedup: the first 16 bytes
/// of SHA-256(`<workspace_id>:<message_id>`), written as a UUID. A fixed-size key keeps the
/// dedup index small (migration 0003 computes the same for ids stored before it).
pub fn dedup_key(workspace_id: &str, message_id: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(format!("{workspace_id}:{message_id}").as_bytes());
    let hex = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Number of identity lock buckets: few enough that a batch never holds more than this many
/// locks, enough that merges rarely wait on ingestion.
pub const IDENTITY_BUCKETS: u32 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0)
            .single()
            .expect("date")
    }

    fn raw(name: &str) -> RawEvent {
        RawEvent {
            name: name.into(),
            customer_id: "c1".into(),
            message_id: "m1".into(),
            ..RawEvent::default()
        }
    }

    fn check(raw: RawEvent) -> Result<NewEvent, FieldError> {
        validate(raw, now(), &Limits::default(), || "generated".into())
    }

    #[test]
    fn a_plain_event_is_accepted_with_receipt_time() {
        let event = check(raw("order_completed")).expect("valid");
        assert_eq!(event.timestamp, now());
        assert_eq!(event.properties, "{}");
        assert_eq!(event.customer_id.as_deref(), Some("c1"));
        assert_eq!(event.anonymous_id, None);
    }

    #[test]
    fn names_must_be_snake_case() {
        for bad in [
            "",
            "Order",
            "order-completed",
            "1st",
            "a b",
            &"x".repeat(65),
        ] {
            let error = check(raw(bad)).expect_err(bad);
            assert_eq!(error.field, "name", "{bad}");
        }
        assert!(is_event_name("message_clicked"));
    }

    #[test]
    fn someone_must_have_done_it() {
        let mut event = raw("app_opened");
        event.customer_id.clear();
        assert_eq!(check(event).expect_err("no id").field, "customer_id");
    }

    #[test]
    fn far_future_and_ancient_times_are_refused() {
        let mut event = raw("app_opened");
        event.timestamp = Some(Some(now() + Duration::hours(25)));
        assert_eq!(check(event).expect_err("future").field, "timestamp");
        let mut event = raw("app_opened");
        event.timestamp = Some(Some(
            Utc.with_ymd_and_hms(1999, 12, 31, 0, 0, 0)
                .single()
                .expect("date"),
        ));
        assert_eq!(check(event).expect_err("past").field, "timestamp");
        let mut event = raw("app_opened");
        event.timestamp = Some(Some(now() + Duration::hours(23)));
        assert!(check(event).is_ok());
    }

    #[test]
    fn properties_have_size_and_depth_limits() {
        let mut event = raw("app_opened");
        event.properties =
            serde_json::json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}});
        let error = check(event).expect_err("deep");
        assert_eq!(error.field, "properties.a.b.c.d.e.f.g.h");
        let mut event = raw("app_opened");
        event.properties =
            serde_json::json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": [], "ok": 1}}}}}}}});
        assert_eq!(
            check(event).expect_err("deep").field,
            "properties.a.b.c.d.e.f.g.h"
        );
        let mut event = raw("app_opened");
        event.properties = serde_json::json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}, "list": [[1]]});
        assert!(check(event).is_ok(), "eight levels are allowed");
        let mut event = raw("app_opened");
        event.properties = serde_json::json!({"blob": "x".repeat(600_000)});
        assert_eq!(check(event).expect_err("big").field, "properties");
        let mut event = raw("app_opened");
        event.properties = serde_json::json!([1, 2]);
        assert_eq!(check(event).expect_err("array").field, "properties");
    }

    #[test]
    fn an_empty_message_id_is_generated() {
        let mut event = raw("app_opened");
        event.message_id.clear();
        assert_eq!(check(event).expect("valid").message_id, "generated");
    }

    #[test]
    fn repeats_within_a_batch_are_kept_once() {
        let a = check(raw("app_opened")).expect("valid");
        let (unique, repeats) = first_of_each_id(vec![(0, a.clone()), (1, a.clone()), (2, a)]);
        assert_eq!(unique.len(), 1);
        assert_eq!(unique[0].0, 0);
        assert_eq!(repeats, 2);
    }

    #[test]
    fn months_and_their_ends() {
        let times = [now(), now() + Duration::days(40), now()];
        let months: Vec<_> = months_of(times.iter()).into_iter().collect();
        assert_eq!(months.len(), 2);
        assert_eq!(
            next_month(NaiveDate::from_ymd_opt(2026, 12, 1).expect("d")),
            NaiveDate::from_ymd_opt(2027, 1, 1).expect("d")
        );
    }

    #[test]
    fn dedup_keys_match_the_migration_s_sql() {
        // SELECT encode(substring(sha256(convert_to('ws:m1', 'UTF8')) FROM 1 FOR 16), 'hex')::uuid
        assert_eq!(
            dedup_key("ws", "m1"),
            "5a48ee8e-615d-f5d2-53f9-c8d35c4d49ae"
        );
        assert_ne!(dedup_key("ws", "m1"), dedup_key("other", "m1"));
    }

    #[test]
    fn identity_buckets_are_stable_and_bounded() {
        let a = identity_bucket("shop", "anon-1");
        assert_eq!(a, identity_bucket("shop", "anon-1"));
        assert!((0..IDENTITY_BUCKETS as i32).contains(&a));
    }
}
