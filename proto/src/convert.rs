//! Conversions between protobuf well-known types and the types services compute with.

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};

/// A `Struct` as a JSON object.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    let mut map = serde_json::Map::with_capacity(s.fields.len());
    for (key, value) in &s.fields {
        map.insert(key.clone(), value_to_json(value));
    }
    serde_json::Value::Object(map)
}

/// A protobuf `Value` as JSON. Numbers that are whole stay integers in JSON.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
    }
}

fn number_to_json(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// A JSON object as a `Struct`; anything else gives an empty `Struct`.
pub fn json_to_struct(json: &serde_json::Value) -> Struct {
    let mut out = Struct::default();
    if let serde_json::Value::Object(map) = json {
        for (key, value) in map {
            out.fields.insert(key.clone(), json_to_value(value));
        }
    }
    out
}

/// JSON as a protobuf `Value`.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(json_to_struct(json)),
    };
    Value { kind: Some(kind) }
}

/// A `Timestamp` as UTC time; `None` when out of range.
pub fn timestamp_to_chrono(ts: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

/// UTC time as a `Timestamp`.
pub fn chrono_to_timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({"revenue": 12.5, "qty": 3, "items": [{"id": "A"}], "gift": false, "note": null});
        assert_eq!(struct_to_json(&json_to_struct(&json)), json);
    }

    #[test]
    fn timestamps_round_trip() {
        let now = DateTime::from_timestamp(1_700_000_000, 123_000_000).expect("valid");
        assert_eq!(timestamp_to_chrono(&chrono_to_timestamp(now)), Some(now));
        assert_eq!(
            timestamp_to_chrono(&Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }
}
