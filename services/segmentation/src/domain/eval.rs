//! Evaluating a condition tree against one customer's facts, and finding the next moment at
//! which time alone could change the answer (for the sweeper).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::model::*;

/// One customer's daily aggregate of one event selector: per UTC day with matching events,
/// their number and the sum of the selector's value; plus the time of the latest one.
/// Days are sorted and unique.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub days: Vec<i32>,
    pub counts: Vec<i32>,
    pub sums: Vec<f64>,
    pub last_at: Option<DateTime<Utc>>,
}

impl Series {
    /// Adds one matching event.
    pub fn add(&mut self, at: DateTime<Utc>, value: f64) {
        let day = day_of(at);
        match self.days.binary_search(&day) {
            Ok(i) => {
                self.counts[i] += 1;
                self.sums[i] += value;
            }
            Err(i) => {
                self.days.insert(i, day);
                self.counts.insert(i, 1);
                self.sums.insert(i, value);
            }
        }
        if self.last_at.is_none_or(|last| at > last) {
            self.last_at = Some(at);
        }
    }

    /// Folds another customer's series into this one (identity merge).
    pub fn merge(&mut self, other: &Series) {
        for i in 0..other.days.len() {
            match self.days.binary_search(&other.days[i]) {
                Ok(j) => {
                    self.counts[j] += other.counts[i];
                    self.sums[j] += other.sums[i];
                }
                Err(j) => {
                    self.days.insert(j, other.days[i]);
                    self.counts.insert(j, other.counts[i]);
                    self.sums.insert(j, other.sums[i]);
                }
            }
        }
        if let Some(at) = other.last_at
            && self.last_at.is_none_or(|last| at > last)
        {
            self.last_at = Some(at);
        }
    }

    /// Number of events and sum of values over the days `first..=last`.
    pub fn totals(&self, first: i32, last: i32) -> (i64, f64) {
        let start = self.days.partition_point(|d| *d < first);
        let mut count = 0i64;
        let mut sum = 0.0;
        for i in start..self.days.len() {
            if self.days[i] > last {
                break;
            }
            count += i64::from(self.counts[i]);
            sum += self.sums[i];
        }
        (count, sum)
    }
}

/// Everything a condition can look at for one customer.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The profile's attributes and traits (any non-object value reads as empty).
    pub attributes: &'a serde_json::Value,
    pub traits: &'a serde_json::Value,
    /// Aggregates by selector id (see [`super::aggregate::selector_id`]).
    pub series: &'a HashMap<i64, Series>,
    /// Memberships already decided in this evaluation (dependencies first).
    pub memberships: &'a HashMap<String, bool>,
}

/// Whether the condition holds at `now`.
pub fn holds(condition: &Condition, facts: &Facts<'_>, now: DateTime<Utc>) -> bool {
    match condition {
        Condition::All(children) => {
            for child in children {
                if !holds(child, facts, now) {
                    return false;
                }
            }
            true
        }
        Condition::Any(children) => {
            for child in children {
                if holds(child, facts, now) {
                    return true;
                }
            }
            false
        }
        Condition::Not(child) => !holds(child, facts, now),
        Condition::InSegment(name) => facts.memberships.get(name).copied().unwrap_or(false),
        Condition::Attribute(attribute) => {
            let object = match attribute.source {
                Source::Attribute => facts.attributes,
                Source::Trait => facts.traits,
            };
            let values = values_at(object, &attribute.path);
            attribute
                .tests
                .iter()
                .all(|test| passes(test, &values, now))
        }
        Condition::Event(event) => event_holds(event, facts, now),
    }
}

fn event_holds(event: &EventCondition, facts: &Facts<'_>, now: DateTime<Utc>) -> bool {
    let series = facts
        .series
        .get(&super::aggregate::selector_id(&event.events));
    let (first, last) = event.window.days(day_of(now));
    let (count, sum) = series.map_or((0, 0.0), |s| s.totals(first, last));
    let count_bounds = match event.count {
        Some(bounds) => Some(bounds),
        None if event.sum.is_none() && event.avg.is_none() => Some(Bounds::at_least_one()),
        None => None,
    };
    if let Some(bounds) = count_bounds
        && !bounds.holds(count as f64)
    {
        return false;
    }
    if let Some(bounds) = event.sum
        && !bounds.holds(sum)
    {
        return false;
    }
    if let Some(bounds) = event.avg {
        // The average of nothing is not a number: no matching events never passes `avg`.
        if count == 0 || !bounds.holds(sum / count as f64) {
            return false;
        }
    }
    if let Some(follow_up) = &event.not_followed_by {
        let Some(last_at) = series.and_then(|s| s.last_at) else {
            return false;
        };
        if last_at + chrono::Duration::seconds(follow_up.within_secs) > now {
            return false;
        }
        let followed = facts
            .series
            .get(&super::aggregate::selector_id(&follow_up.events))
            .and_then(|s| s.last_at)
            .is_some_and(|at| at >= last_at);
        if followed {
            return false;
        }
    }
    true
}

/// The earliest instant after `now` at which the answer could change with no new event
/// or profile change: a day leaving or entering a relative window, a follow-up deadline
/// passing, a timestamp attribute crossing `older_than`. `None` when time alone changes
/// nothing. Waking early is harmless (the customer is evaluated and nothing changes).
pub fn next_change(
    condition: &Condition,
    facts: &Facts<'_>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut earliest: Option<DateTime<Utc>> = None;
    collect_changes(condition, facts, now, &mut earliest);
    earliest
}

fn consider(candidate: DateTime<Utc>, now: DateTime<Utc>, earliest: &mut Option<DateTime<Utc>>) {
    if candidate > now && earliest.is_none_or(|e| candidate < e) {
        *earliest = Some(candidate);
    }
}

fn collect_changes(
    condition: &Condition,
    facts: &Facts<'_>,
    now: DateTime<Utc>,
    earliest: &mut Option<DateTime<Utc>>,
) {
    match condition {
        Condition::All(children) | Condition::Any(children) => {
            for child in children {
                collect_changes(child, facts, now, earliest);
            }
        }
        Condition::Not(child) => collect_changes(child, facts, now, earliest),
        Condition::InSegment(_) => {}
        Condition::Attribute(attribute) => {
            let object = match attribute.source {
                Source::Attribute => facts.attributes,
                Source::Trait => facts.traits,
            };
            for test in &attribute.tests {
                let (Test::Before(Instant::Ago(seconds)) | Test::After(Instant::Ago(seconds))) =
                    test
                else {
                    continue;
                };
                for value in values_at(object, &attribute.path) {
                    if let Some(at) = value.as_str().and_then(parse_time) {
                        consider(at + chrono::Duration::seconds(*seconds), now, earliest);
                    }
                }
            }
        }
        Condition::Event(event) => {
            let series = facts
                .series
                .get(&super::aggregate::selector_id(&event.events));
            if let Some(series) = series {
                let today = day_of(now);
                // A day d is in `within: N` until day d+N, in `between: [A, B]` from day
                // d+B+1 to day d+A: the day after each edge is when the answer may flip.
                let edges: &[i32] = match event.window {
                    Window::Within { days } => &[days + 1],
                    Window::Between { from_days, to_days } => &[to_days + 1, from_days + 1],
                    Window::Ever | Window::Dates { .. } => &[],
                };
                for edge in edges {
                    // The first day whose edge is still ahead is the only one that matters.
                    let start = series.days.partition_point(|d| d + edge <= today);
                    if let Some(day) = series.days.get(start) {
                        consider(start_of_day(day + edge), now, earliest);
                    }
                }
                if let (Some(follow_up), Some(last_at)) = (&event.not_followed_by, series.last_at) {
                    consider(
                        last_at + chrono::Duration::seconds(follow_up.within_secs),
                        now,
                        earliest,
                    );
                }
            }
        }
    }
}

/// Every value at `path`, searching arrays met on the way (and at the end) item by item.
pub fn values_at<'a>(object: &'a serde_json::Value, path: &[String]) -> Vec<&'a serde_json::Value> {
    // Paths start in an object (a profile, an event's properties); anything else has none.
    if !object.is_object() {
        return Vec::new();
    }
    let mut current = vec![object];
    for key in path {
        let mut next = Vec::with_capacity(current.len());
        for value in current {
            collect_key(value, key, &mut next);
        }
        current = next;
    }
    let mut flat = Vec::with_capacity(current.len());
    for value in current {
        match value {
            serde_json::Value::Array(items) => flat.extend(items.iter()),
            serde_json::Value::Null => {}
            other => flat.push(other),
        }
    }
    flat
}

fn collect_key<'a>(value: &'a serde_json::Value, key: &str, out: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(v) = map.get(key) {
                out.push(v);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_key(item, key, out);
            }
        }
        _ => {}
    }
}

/// Whether a property test holds for the values found at its path.
pub fn passes(test: &Test, values: &[&serde_json::Value], now: DateTime<Utc>) -> bool {
    match test {
        Test::Neq(expected) => !values.iter().any(|v| same(v, expected)),
        Test::NotIn(list) => !values.iter().any(|v| list.iter().any(|e| same(v, e))),
        Test::Exists(wanted) => values.is_empty() != *wanted,
        positive => values.iter().any(|v| passes_one(positive, v, now)),
    }
}

fn passes_one(test: &Test, value: &serde_json::Value, now: DateTime<Utc>) -> bool {
    let number = || value.as_f64();
    match test {
        Test::Eq(expected) => same(value, expected),
        Test::In(list) => list.iter().any(|e| same(value, e)),
        Test::Contains(part) => value.as_str().is_some_and(|s| s.contains(part.as_str())),
        Test::StartsWith(prefix) => value
            .as_str()
            .is_some_and(|s| s.starts_with(prefix.as_str())),
        Test::Gt(b) => number().is_some_and(|n| n > *b),
        Test::Gte(b) => number().is_some_and(|n| n >= *b),
        Test::Lt(b) => number().is_some_and(|n| n < *b),
        Test::Lte(b) => number().is_some_and(|n| n <= *b),
        Test::Between(low, high) => number().is_some_and(|n| n >= *low && n <= *high),
        Test::Before(instant) => value
            .as_str()
            .and_then(parse_time)
            .is_some_and(|at| at < instant.resolve(now)),
        Test::After(instant) => value
            .as_str()
            .and_then(parse_time)
            .is_some_and(|at| at > instant.resolve(now)),
        Test::Neq(_) | Test::NotIn(_) | Test::Exists(_) => false,
    }
}

/// Equality across JSON types as a person means it: numbers by value (1 = 1.0).
fn same(value: &serde_json::Value, expected: &serde_json::Value) -> bool {
    match (value.as_f64(), expected.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => value == expected,
    }
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    super::parse::parse_timestamp(text)
}

/// Names of the segments a condition refers to through `in_segment`.
pub fn dependencies(condition: &Condition) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![condition];
    while let Some(node) = stack.pop() {
        match node {
            Condition::All(children) | Condition::Any(children) => stack.extend(children.iter()),
            Condition::Not(child) => stack.push(child),
            Condition::InSegment(name) => {
                if !found.contains(name) {
                    found.push(name.clone());
                }
            }
            Condition::Attribute(_) | Condition::Event(_) => {}
        }
    }
    found.sort();
    found
}

/// Orders segments so that each comes after those it refers to; `Err` names a cycle
/// (`a → b → a`). Unknown references are the caller's concern and are ignored here.
pub fn dependency_order(graph: &HashMap<String, Vec<String>>) -> Result<Vec<String>, String> {
    let mut order = Vec::with_capacity(graph.len());
    let mut done: HashSet<&str> = HashSet::new();
    let mut names: Vec<&String> = graph.keys().collect();
    names.sort();
    for name in names {
        let mut path: Vec<&str> = Vec::new();
        visit(name, graph, &mut done, &mut path, &mut order)?;
    }
    Ok(order)
}

fn visit<'a>(
    name: &'a str,
    graph: &'a HashMap<String, Vec<String>>,
    done: &mut HashSet<&'a str>,
    path: &mut Vec<&'a str>,
    order: &mut Vec<String>,
) -> Result<(), String> {
    if done.contains(name) {
        return Ok(());
    }
    if let Some(start) = path.iter().position(|n| *n == name) {
        let mut cycle: Vec<&str> = path[start..].to_vec();
        cycle.push(name);
        return Err(cycle.join(" → "));
    }
    path.push(name);
    if let Some(deps) = graph.get(name) {
        for dep in deps {
            if graph.contains_key(dep) {
                visit(dep, graph, done, path, order)?;
            }
        }
    }
    path.pop();
    done.insert(name);
    order.push(name.to_owned());
    Ok(())
}

/// Whether a condition's answer can change with time alone.
pub fn time_dependent(condition: &Condition) -> bool {
    match condition {
        Condition::All(children) | Condition::Any(children) => children.iter().any(time_dependent),
        Condition::Not(child) => time_dependent(child),
        Condition::InSegment(_) => false,
        Condition::Attribute(attribute) => attribute.tests.iter().any(|t| {
            matches!(
                t,
                Test::Before(Instant::Ago(_)) | Test::After(Instant::Ago(_))
            )
        }),
        Condition::Event(event) => event.window.is_relative() || event.not_followed_by.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse_definition;
    use super::*;
    use crate::domain::aggregate::selector_id;

    fn at(text: &str) -> DateTime<Utc> {
        super::super::parse::parse_timestamp(text).expect("timestamp")
    }

    fn condition(where_yaml: &str) -> Condition {
        let text = format!("kind: Segment\nname: t\nwhere:\n{where_yaml}");
        parse_definition(&text).expect("valid").condition
    }

    fn selector_of(condition: &Condition) -> i64 {
        let mut stack = vec![condition];
        while let Some(c) = stack.pop() {
            match c {
                Condition::Event(e) => return selector_id(&e.events),
                Condition::All(cs) | Condition::Any(cs) => stack.extend(cs.iter()),
                Condition::Not(c) => stack.push(c),
                _ => {}
            }
        }
        panic!("no event condition")
    }

    struct Person {
        attributes: serde_json::Value,
        traits: serde_json::Value,
        series: HashMap<i64, Series>,
        memberships: HashMap<String, bool>,
    }

    impl Person {
        fn new() -> Person {
            Person {
                attributes: serde_json::json!({}),
                traits: serde_json::json!({}),
                series: HashMap::new(),
                memberships: HashMap::new(),
            }
        }
        fn facts(&self) -> Facts<'_> {
            Facts {
                attributes: &self.attributes,
                traits: &self.traits,
                series: &self.series,
                memberships: &self.memberships,
            }
        }
    }

    #[test]
    fn lapsed_60_days_flips_on_day_61_and_the_sweeper_knows_when() {
        let lapsed = condition(
            "  all:\n    - event: order_completed\n    - not:\n        event: order_completed\n        within: 60d\n",
        );
        let mut person = Person::new();
        let order_at = at("2024-01-01T15:00:00Z");
        person
            .series
            .entry(selector_of(&lapsed))
            .or_default()
            .add(order_at, 0.0);
        let day_60 = at("2024-03-01T12:00:00Z"); // 60 days after Jan 1 (leap year)
        assert!(!holds(&lapsed, &person.facts(), day_60));
        let wake = next_change(&lapsed, &person.facts(), day_60).expect("a boundary ahead");
        assert_eq!(wake, at("2024-03-02T00:00:00Z"));
        assert!(holds(&lapsed, &person.facts(), wake));
        assert_eq!(next_change(&lapsed, &person.facts(), wake), None);
    }

    #[test]
    fn between_windows_do_not_overlap_within() {
        let older = condition("  event: order_completed\n  between: [90d, 30d]\n");
        let recent = condition("  event: order_completed\n  within: 30d\n");
        let mut person = Person::new();
        let now = at("2024-06-01T10:00:00Z");
        let id = selector_of(&older);
        assert_eq!(id, selector_of(&recent));
        person
            .series
            .entry(id)
            .or_default()
            .add(now - chrono::Duration::days(30), 0.0);
        assert!(!holds(&older, &person.facts(), now));
        assert!(holds(&recent, &person.facts(), now));
        let wake = next_change(&older, &person.facts(), now).expect("enters the older window");
        assert!(holds(&older, &person.facts(), wake));
        assert!(!holds(&recent, &person.facts(), wake));
    }

    #[test]
    fn nested_all_any_not_and_in_segment() {
        let c = condition(
            "  any:\n    - all:\n        - trait: rfm.recency\n          gte: 4\n        - not: { attribute: country, in: [FR, BE] }\n    - in_segment: vip\n",
        );
        let mut person = Person::new();
        let now = at("2024-06-01T10:00:00Z");
        person.traits = serde_json::json!({"rfm": {"recency": 5}});
        person.attributes = serde_json::json!({"country": "DZ"});
        assert!(holds(&c, &person.facts(), now));
        person.attributes = serde_json::json!({"country": "FR"});
        assert!(!holds(&c, &person.facts(), now));
        person.memberships.insert("vip".into(), true);
        assert!(holds(&c, &person.facts(), now));
        person.memberships.insert("vip".into(), false);
        person.traits = serde_json::json!({"rfm": {"recency": 3}});
        person.attributes = serde_json::json!({});
        assert!(!holds(&c, &person.facts(), now));
    }

    #[test]
    fn sums_averages_and_counts() {
        let c = condition(
            "  event: order_completed\n  count: { gte: 2 }\n  avg: { property: revenue, gte: 50 }\n  within: 30d\n",
        );
        let mut person = Person::new();
        let now = at("2024-06-30T10:00:00Z");
        let series = person.series.entry(selector_of(&c)).or_default();
        series.add(at("2024-06-10T10:00:00Z"), 40.0);
        assert!(!holds(&c, &person.facts(), now), "one order only");
        person
            .series
            .get_mut(&selector_of(&c))
            .expect("series")
            .add(at("2024-06-11T10:00:00Z"), 70.0);
        assert!(holds(&c, &person.facts(), now), "avg 55 over two orders");
        let zero = condition("  event: order_completed\n  count: { lt: 1 }\n  within: 7d\n");
        assert!(
            holds(&zero, &Person::new().facts(), now),
            "no orders at all passes lt 1"
        );
    }

    #[test]
    fn abandoned_cart_waits_for_the_deadline_and_clears_on_order() {
        let c = condition(
            "  event: cart_updated\n  within: 7d\n  not_followed_by: { event: order_completed, within: 24h }\n",
        );
        let Condition::Event(event) = &c else {
            panic!()
        };
        let order_id = selector_id(&event.not_followed_by.as_ref().expect("follow-up").events);
        let mut person = Person::new();
        let cart_at = at("2024-06-01T10:00:00Z");
        person
            .series
            .entry(selector_of(&c))
            .or_default()
            .add(cart_at, 0.0);
        let now = at("2024-06-01T20:00:00Z");
        assert!(!holds(&c, &person.facts(), now));
        assert_eq!(
            next_change(&c, &person.facts(), now),
            Some(at("2024-06-02T10:00:00Z"))
        );
        assert!(holds(&c, &person.facts(), at("2024-06-02T10:00:00Z")));
        person
            .series
            .entry(order_id)
            .or_default()
            .add(at("2024-06-02T11:00:00Z"), 0.0);
        assert!(!holds(&c, &person.facts(), at("2024-06-02T12:00:00Z")));
    }

    #[test]
    fn property_paths_search_arrays() {
        let items = serde_json::json!({"items": [{"category": "Home", "price": 5}, {"category": "Toys", "price": 50}]});
        let path = vec!["items".to_owned(), "category".to_owned()];
        let values = values_at(&items, &path);
        let now = at("2024-01-01T00:00:00Z");
        assert!(passes(&Test::Eq(serde_json::json!("Toys")), &values, now));
        assert!(!passes(&Test::Neq(serde_json::json!("Toys")), &values, now));
        assert!(passes(&Test::Exists(true), &values, now));
        let prices = values_at(&items, &["items".to_owned(), "price".to_owned()]);
        assert!(passes(&Test::Gt(10.0), &prices, now));
        assert!(!passes(&Test::Gt(60.0), &prices, now));
    }

    #[test]
    fn older_than_on_a_timestamp_attribute() {
        let c = condition("  attribute: signed_up_at\n  older_than: 30d\n");
        let mut person = Person::new();
        person.attributes = serde_json::json!({"signed_up_at": "2024-01-01T00:00:00Z"});
        let now = at("2024-01-20T00:00:00Z");
        assert!(!holds(&c, &person.facts(), now));
        let wake = next_change(&c, &person.facts(), now).expect("boundary");
        assert_eq!(wake, at("2024-01-31T00:00:00Z"));
        assert!(holds(
            &c,
            &person.facts(),
            wake + chrono::Duration::seconds(1)
        ));
    }

    #[test]
    fn cycles_are_named() {
        let mut graph = HashMap::new();
        graph.insert("a".to_owned(), vec!["b".to_owned()]);
        graph.insert("b".to_owned(), vec!["c".to_owned()]);
        graph.insert("c".to_owned(), vec!["a".to_owned()]);
        assert_eq!(dependency_order(&graph), Err("a → b → c → a".to_owned()));
        graph.insert("c".to_owned(), vec![]);
        assert_eq!(
            dependency_order(&graph),
            Ok(vec!["c".to_owned(), "b".to_owned(), "a".to_owned()])
        );
    }

    #[test]
    fn series_merge_and_totals() {
        let mut a = Series::default();
        a.add(at("2024-01-02T10:00:00Z"), 1.0);
        let mut b = Series::default();
        b.add(at("2024-01-01T10:00:00Z"), 2.0);
        b.add(at("2024-01-02T11:00:00Z"), 3.0);
        a.merge(&b);
        assert_eq!(a.counts, vec![1, 2]);
        assert_eq!(a.totals(i32::MIN, i32::MAX), (3, 6.0));
        assert_eq!(a.last_at, Some(at("2024-01-02T11:00:00Z")));
    }
}
