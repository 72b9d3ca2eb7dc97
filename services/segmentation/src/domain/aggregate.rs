//! Which events feed which aggregate: an event selector (name, property filters, summed
//! value) has a stable id, so conditions of different segments that look at the same
//! events share one per-customer daily series.

use sha2::{Digest, Sha256};

use super::eval::{passes, values_at};
use super::model::{EventSelector, Filter};

/// The selector's stable id (computed when it was built).
pub fn selector_id(selector: &EventSelector) -> i64 {
    selector.id
}

/// A selector's identity: the first 8 bytes of SHA-256 over its canonical form (name,
/// filter JSON with sorted keys, summed property).
pub fn hash_selector(name: &str, filter_json: &serde_json::Value, value: Option<&[String]>) -> i64 {
    let mut canonical = String::new();
    canonical.push_str(name);
    canonical.push('\u{1f}');
    write_canonical(filter_json, &mut canonical);
    canonical.push('\u{1f}');
    if let Some(value) = value {
        canonical.push_str(&value.join("."));
    }
    let digest = Sha256::digest(canonical.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// JSON with object keys sorted, whatever the map implementation keeps.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*key).clone()).to_string());
                out.push(':');
                write_canonical(&map[*key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Whether an event's properties pass a selector's filter.
pub fn filter_passes(
    filter: &Filter,
    properties: &serde_json::Value,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    match filter {
        Filter::All(parts) => parts.iter().all(|p| filter_passes(p, properties, now)),
        Filter::Any(parts) => parts.iter().any(|p| filter_passes(p, properties, now)),
        Filter::Not(part) => !filter_passes(part, properties, now),
        Filter::Property { path, tests } => {
            let values = values_at(properties, path);
            tests.iter().all(|t| passes(t, &values, now))
        }
    }
}

/// What one event adds to a selector's series: `None` when it does not match, else the
/// value to sum (0 when the selector sums nothing or the property is not a number; a path
/// through arrays adds up every number found, e.g. `items.quantity`).
pub fn contribution(
    selector: &EventSelector,
    name: &str,
    properties: &serde_json::Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<f64> {
    if selector.name != name {
        return None;
    }
    if let Some(filter) = &selector.filter
        && !filter_passes(filter, properties, now)
    {
        return None;
    }
    let Some(path) = &selector.value else {
        return Some(0.0);
    };
    let mut total = 0.0;
    for value in values_at(properties, path) {
        if let Some(n) = value.as_f64() {
            total += n;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(filter: serde_json::Value) -> EventSelector {
        EventSelector::new(
            "order_completed".into(),
            None,
            filter,
            Some(vec!["revenue".into()]),
        )
    }

    #[test]
    fn ids_ignore_key_order_and_differ_by_content() {
        let a = selector(serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}}));
        let b = selector(serde_json::json!({"b": {"d": 3, "c": 2}, "a": 1}));
        let c = selector(serde_json::json!({"a": 2}));
        assert_eq!(selector_id(&a), selector_id(&b));
        assert_ne!(selector_id(&a), selector_id(&c));
    }

    #[test]
    fn contributions_follow_name_filter_and_value() {
        let now = chrono::DateTime::from_timestamp(0, 0).unwrap_or_default();
        let s = EventSelector::new(
            "order_completed".into(),
            Some(Filter::Property {
                path: vec!["items".into(), "category".into()],
                tests: vec![super::super::model::Test::Eq(serde_json::json!("Home"))],
            }),
            serde_json::Value::Null,
            Some(vec!["revenue".into()]),
        );
        let home = serde_json::json!({"revenue": 30.5, "items": [{"category": "Home"}]});
        let toys = serde_json::json!({"revenue": 12, "items": [{"category": "Toys"}]});
        assert_eq!(contribution(&s, "order_completed", &home, now), Some(30.5));
        assert_eq!(contribution(&s, "order_completed", &toys, now), None);
        assert_eq!(contribution(&s, "cart_updated", &home, now), None);
    }
}
