//! `where:` conditions on event properties and profile attributes.
//!
//! A path walks into JSON objects key by key; an array met on the way is searched item by
//! item (`items.category` looks at every item's category), and so is an array at the end
//! (`tags: sale` holds when one of the tags is `sale`). Positive tests hold when one value
//! found passes; `neq`, `not_in` and `exists: false` hold when none does. Numbers compare
//! by value (`1` equals `1.0`), and a string is never a number (`"1"` is not `1`).

use serde_json::Value;

use super::model::{EventMatch, PropertyCondition, PropertyTest};

/// True when the event has the match's name and every condition holds on its properties.
pub fn matches(event: &EventMatch, name: &str, properties: &Value) -> bool {
    if event.event != name {
        return false;
    }
    for condition in &event.conditions {
        if !passes(condition, properties) {
            return false;
        }
    }
    true
}

/// True when the condition holds on the JSON object (properties, attributes or traits).
pub fn passes(condition: &PropertyCondition, object: &Value) -> bool {
    let values = values_at(object, &condition.path);
    match &condition.test {
        PropertyTest::Exists(wanted) => {
            let present = values.iter().any(|value| !value.is_null());
            present == *wanted
        }
        PropertyTest::Neq(expected) => !values
            .iter()
            .any(|value| any_item(value, &|item| same(item, expected))),
        PropertyTest::NotIn(list) => !values
            .iter()
            .any(|value| any_item(value, &|item| list.iter().any(|e| same(item, e)))),
        PropertyTest::Contains(part) => values.iter().any(|value| contains(value, part)),
        positive => values
            .iter()
            .any(|value| any_item(value, &|item| holds(positive, item))),
    }
}

/// Every value at `path` (absent keys give none), searching arrays on the way item by item.
/// Arrays at the end are returned whole: the tests decide how to look inside them.
fn values_at<'a>(object: &'a Value, path: &[String]) -> Vec<&'a Value> {
    let mut current = vec![object];
    for key in path {
        let mut next = Vec::with_capacity(current.len());
        for value in current {
            collect_key(value, key, &mut next);
        }
        if next.is_empty() {
            return next;
        }
        current = next;
    }
    current
}

fn collect_key<'a>(value: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if let Some(found) = map.get(key) {
                out.push(found);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_key(item, key, out);
            }
        }
        _ => {}
    }
}

/// The test on the value itself or, when it is an array, on any of its items.
fn any_item(value: &Value, test: &dyn Fn(&Value) -> bool) -> bool {
    if test(value) {
        return true;
    }
    match value {
        Value::Array(items) => items.iter().any(test),
        _ => false,
    }
}

/// A positive test on one value (`neq`, `not_in`, `exists` and `contains` are handled by
/// [`passes`]).
fn holds(test: &PropertyTest, value: &Value) -> bool {
    let number = value.as_f64();
    match test {
        PropertyTest::Eq(expected) => same(value, expected),
        PropertyTest::In(list) => list.iter().any(|expected| same(value, expected)),
        PropertyTest::Gt(bound) => number.is_some_and(|n| n > *bound),
        PropertyTest::Gte(bound) => number.is_some_and(|n| n >= *bound),
        PropertyTest::Lt(bound) => number.is_some_and(|n| n < *bound),
        PropertyTest::Lte(bound) => number.is_some_and(|n| n <= *bound),
        PropertyTest::Neq(_)
        | PropertyTest::NotIn(_)
        | PropertyTest::Exists(_)
        | PropertyTest::Contains(_) => false,
    }
}

/// The string contains the text, or the array holds the value.
fn contains(value: &Value, part: &Value) -> bool {
    match (value, part) {
        (Value::String(text), Value::String(part)) => text.contains(part.as_str()),
        (Value::Array(items), _) => items.iter().any(|item| same(item, part)),
        _ => false,
    }
}

/// JSON equality as a person means it: numbers by value (`1` = `1.0`), at any depth.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(key, x)| ys.get(key).is_some_and(|y| same(x, y)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn condition(path: &str, test: PropertyTest) -> PropertyCondition {
        PropertyCondition {
            path: path.split('.').map(str::to_owned).collect(),
            test,
        }
    }

    #[test]
    fn matches_the_name_and_every_condition() {
        let clicked = EventMatch {
            event: "message_clicked".to_owned(),
            conditions: vec![
                condition("channel", PropertyTest::Eq(json!("push"))),
                condition("flow", PropertyTest::Exists(true)),
            ],
        };
        let properties = json!({"channel": "push", "flow": "abandoned-cart"});
        assert!(matches(&clicked, "message_clicked", &properties));
        assert!(!matches(&clicked, "message_opened", &properties));
        assert!(!matches(
            &clicked,
            "message_clicked",
            &json!({"channel": "email", "flow": "abandoned-cart"})
        ));
        assert!(!matches(
            &clicked,
            "message_clicked",
            &json!({"channel": "push"})
        ));
        let any = EventMatch {
            event: "app_opened".to_owned(),
            conditions: Vec::new(),
        };
        assert!(matches(&any, "app_opened", &Value::Null));
    }

    #[test]
    fn numbers_compare_by_value_and_strings_are_not_numbers() {
        let one = condition("count", PropertyTest::Eq(json!(1)));
        assert!(passes(&one, &json!({"count": 1})));
        assert!(passes(&one, &json!({"count": 1.0})));
        assert!(!passes(&one, &json!({"count": "1"})));
        assert!(!passes(&one, &json!({"count": 2})));
        let text = condition("code", PropertyTest::Eq(json!("1")));
        assert!(passes(&text, &json!({"code": "1"})));
        assert!(!passes(&text, &json!({"code": 1})));
        let gte = condition("revenue", PropertyTest::Gte(20.0));
        assert!(passes(&gte, &json!({"revenue": 20})));
        assert!(passes(&gte, &json!({"revenue": 20.5})));
        assert!(!passes(&gte, &json!({"revenue": 19.99})));
        assert!(!passes(&gte, &json!({"revenue": "25"})));
        assert!(!passes(&gte, &json!({})));
        assert!(passes(
            &condition("revenue", PropertyTest::Gt(20.0)),
            &json!({"revenue": 21})
        ));
        assert!(!passes(
            &condition("revenue", PropertyTest::Gt(20.0)),
            &json!({"revenue": 20})
        ));
        assert!(passes(
            &condition("revenue", PropertyTest::Lt(20.0)),
            &json!({"revenue": 19})
        ));
        assert!(passes(
            &condition("revenue", PropertyTest::Lte(20.0)),
            &json!({"revenue": 20.0})
        ));
    }

    #[test]
    fn dotted_paths_search_arrays_item_by_item() {
        let order = json!({
            "items": [
                {"category": "Home", "price": 12.5, "tags": ["sale"]},
                {"category": "Garden", "price": 40, "tags": []}
            ],
            "shipping": {"country": "DZ"}
        });
        assert!(passes(
            &condition("items.category", PropertyTest::Eq(json!("Garden"))),
            &order
        ));
        assert!(passes(
            &condition("items.price", PropertyTest::Gt(30.0)),
            &order
        ));
        assert!(!passes(
            &condition("items.price", PropertyTest::Gt(50.0)),
            &order
        ));
        assert!(passes(
            &condition(
                "shipping.country",
                PropertyTest::In(vec![json!("DZ"), json!("MA")])
            ),
            &order
        ));
        assert!(passes(
            &condition("items.tags", PropertyTest::Eq(json!("sale"))),
            &order
        ));
        assert!(!passes(
            &condition("shipping.country.code", PropertyTest::Exists(true)),
            &order
        ));
        // Nested arrays on the way are searched too.
        let nested = json!({"boxes": [[{"kind": "gift"}], [{"kind": "plain"}]]});
        assert!(passes(
            &condition("boxes.kind", PropertyTest::Eq(json!("gift"))),
            &nested
        ));
        // A path into something that is not an object finds nothing.
        assert!(!passes(
            &condition("a", PropertyTest::Exists(true)),
            &json!("text")
        ));
    }

    #[test]
    fn negative_tests_hold_when_no_value_matches() {
        let order = json!({"items": [{"category": "Home"}, {"category": "Garden"}]});
        let neq_home = condition("items.category", PropertyTest::Neq(json!("Home")));
        assert!(!passes(&neq_home, &order));
        let neq_toys = condition("items.category", PropertyTest::Neq(json!("Toys")));
        assert!(passes(&neq_toys, &order));
        assert!(passes(&neq_toys, &json!({})), "absent is not equal");
        let not_in = condition(
            "items.category",
            PropertyTest::NotIn(vec![json!("Toys"), json!("Garden")]),
        );
        assert!(!passes(&not_in, &order));
        let not_in_toys = condition("items.category", PropertyTest::NotIn(vec![json!("Toys")]));
        assert!(passes(&not_in_toys, &order));
        let tags = json!({"tags": ["sale", "new"]});
        assert!(!passes(
            &condition("tags", PropertyTest::Neq(json!("sale"))),
            &tags
        ));
        assert!(!passes(
            &condition("tags", PropertyTest::NotIn(vec![json!("new")])),
            &tags
        ));
    }

    #[test]
    fn exists_means_present_and_not_null() {
        let present = condition("coupon", PropertyTest::Exists(true));
        let absent = condition("coupon", PropertyTest::Exists(false));
        assert!(passes(&present, &json!({"coupon": "RAMADAN"})));
        assert!(passes(&present, &json!({"coupon": false})));
        assert!(!passes(&present, &json!({"coupon": null})));
        assert!(!passes(&present, &json!({})));
        assert!(passes(&absent, &json!({"coupon": null})));
        assert!(passes(&absent, &json!({})));
        assert!(!passes(&absent, &json!({"coupon": 0})));
        let items = json!({"items": [{"coupon": null}, {"coupon": "X"}]});
        assert!(passes(
            &condition("items.coupon", PropertyTest::Exists(true)),
            &items
        ));
        assert!(!passes(
            &condition("items.coupon", PropertyTest::Exists(false)),
            &items
        ));
    }

    #[test]
    fn contains_reads_text_or_arrays() {
        let text = condition("title", PropertyTest::Contains(json!("cart")));
        assert!(passes(&text, &json!({"title": "your cart is waiting"})));
        assert!(!passes(&text, &json!({"title": "welcome"})));
        assert!(!passes(&text, &json!({"title": 3})));
        let tag = condition("tags", PropertyTest::Contains(json!("sale")));
        assert!(passes(&tag, &json!({"tags": ["new", "sale"]})));
        assert!(
            !passes(&tag, &json!({"tags": ["new", "wholesale"]})),
            "items are compared whole"
        );
        let number = condition("sizes", PropertyTest::Contains(json!(42)));
        assert!(passes(&number, &json!({"sizes": [40, 42.0]})));
        let deep = condition("items.skus", PropertyTest::Contains(json!("A1")));
        assert!(passes(
            &deep,
            &json!({"items": [{"skus": ["B2"]}, {"skus": ["A1"]}]})
        ));
    }

    #[test]
    fn equality_reaches_into_arrays_and_objects() {
        assert!(same(&json!([1, {"a": 2}]), &json!([1.0, {"a": 2.0}])));
        assert!(!same(&json!([1, 2]), &json!([1])));
        assert!(!same(&json!({"a": 1}), &json!({"b": 1})));
        assert!(same(&Value::Null, &Value::Null));
        let null = condition("coupon", PropertyTest::Eq(Value::Null));
        assert!(passes(&null, &json!({"coupon": null})));
        assert!(!passes(&null, &json!({})));
    }
}
