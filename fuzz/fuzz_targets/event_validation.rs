//! Event validation: the input is what Track/TrackBatch receive, either as the wire bytes of
//! a `TrackBatchRequest` or as a JSON event (or list of events) in the proto's JSON shape.
//! Each event goes through the API's proto → domain conversion and `domain::validate`, then
//! the batch rules. A refusal must name its field; an accepted event must meet the limits.
#![no_main]

use chrono::{DateTime, TimeZone as _, Utc};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use relance_events::api::raw_event;
use relance_events::domain::{self, Limits};
use relance_proto::convert::{chrono_to_timestamp, json_to_struct};
use relance_proto::v1 as pb;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = pb::TrackBatchRequest::decode(data) {
        check(batch.events);
    }
    if let Ok(json) = serde_json::from_slice::<Value>(data) {
        let events = match &json {
            Value::Array(items) => items.iter().map(event_from_json).collect(),
            other => vec![event_from_json(other)],
        };
        check(events);
    }
});

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0)
        .single()
        .expect("a valid date")
}

fn check(events: Vec<pb::Event>) {
    let limits = Limits::default();
    let now = now();
    let mut valid = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        match domain::validate(raw_event(event), now, &limits, || "generated".to_owned()) {
            Ok(event) => {
                assert!(domain::is_event_name(&event.name), "{:?}", event.name);
                assert!(event.customer_id.is_some() || event.anonymous_id.is_some());
                assert!(!event.message_id.is_empty());
                assert!(event.message_id.len() <= 128);
                assert!(event.properties.len() <= limits.max_properties_bytes);
                assert!(event.properties_value.is_object());
                assert!(event.timestamp <= now + chrono::Duration::seconds(limits.max_future_secs));
                let decoded: Value =
                    serde_json::from_str(&event.properties).expect("properties are JSON");
                assert!(decoded.is_object());
                let context: Value = serde_json::from_str(&event.context).expect("context is JSON");
                assert!(context.is_object());
                valid.push((index, event));
            }
            Err(error) => {
                assert!(!error.field.is_empty(), "a refusal names its field");
                assert!(!error.reason.is_empty());
            }
        }
    }
    let (unique, _repeats) = domain::first_of_each_id(valid);
    let months = domain::months_of(unique.iter().map(|(_, event)| &event.timestamp));
    for month in months {
        assert!(domain::next_month(month) > month);
    }
    for (_, event) in &unique {
        let _ = domain::dedup_key("fuzz", &event.message_id);
        if let Some(anonymous_id) = &event.anonymous_id {
            let bucket = domain::identity_bucket("fuzz", anonymous_id);
            assert!((0..domain::IDENTITY_BUCKETS as i32).contains(&bucket));
        }
    }
}

fn text(json: &Value, key: &str) -> String {
    match json.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The proto3 JSON mapping of `Event`: timestamps as RFC 3339 text (or, to reach values no
/// text can say, `{"seconds": …, "nanos": …}`), properties as an object, context as an
/// object of strings.
fn event_from_json(json: &Value) -> pb::Event {
    let timestamp = match json.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(match DateTime::parse_from_rfc3339(text) {
            Ok(time) => chrono_to_timestamp(time.with_timezone(&Utc)),
            Err(_) => prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
        }),
        Some(other) => Some(prost_types::Timestamp {
            seconds: other.get("seconds").and_then(Value::as_i64).unwrap_or(0),
            nanos: other
                .get("nanos")
                .and_then(Value::as_i64)
                .map_or(0, |n| n as i32),
        }),
    };
    let properties = match json.get("properties") {
        None | Some(Value::Null) => None,
        Some(value @ Value::Object(_)) => Some(json_to_struct(value)),
        // A non-object cannot be a Struct on the wire; an empty one is the closest.
        Some(_) => Some(prost_types::Struct::default()),
    };
    let context = match json.get("context") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (key.clone(), value)
            })
            .collect(),
        _ => Default::default(),
    };
    pb::Event {
        message_id: text(json, "message_id"),
        name: text(json, "name"),
        customer_id: text(json, "customer_id"),
        anonymous_id: text(json, "anonymous_id"),
        timestamp,
        properties,
        context,
    }
}
