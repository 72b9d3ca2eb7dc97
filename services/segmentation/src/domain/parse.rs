//! Reads a `kind: Segment` YAML document into a [`Definition`], collecting every problem
//! with the path of the field at fault (`where.all[1].event.within: "30x" is not a
//! duration`), its line and its column.

use chrono::{DateTime, NaiveDate, Utc};
use relance_kit::yaml::{self, Node, Problem, Value};

use super::model::*;

/// Largest accepted document.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Deepest accepted nesting of `all`/`any`/`not`.
const MAX_DEPTH: usize = 16;
/// Longest relative window (10 years), so day arithmetic stays far from overflow.
const MAX_WINDOW_DAYS: i64 = 3660;

const ATTRIBUTE_OPERATORS: &[&str] = &[
    "eq",
    "neq",
    "in",
    "not_in",
    "contains",
    "starts_with",
    "gt",
    "gte",
    "lt",
    "lte",
    "between",
    "exists",
    "before",
    "after",
    "older_than",
    "newer_than",
];
const EVENT_KEYS: &[&str] = &[
    "event",
    "name",
    "where",
    "count",
    "sum",
    "avg",
    "within",
    "between",
    "from",
    "to",
    "not_followed_by",
];
const BOUND_KEYS: &[&str] = &["gt", "gte", "lt", "lte", "eq", "between"];

/// Parses and validates a segment document. `in_segment` references are checked for
/// existence and cycles by the caller, who knows the workspace's other segments.
pub fn parse_definition(text: &str) -> Result<Definition, Vec<Problem>> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(vec![doc_problem(format!(
            "the document is {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
            text.len()
        ))]);
    }
    let root = yaml::parse(text).map_err(|p| vec![p])?;
    let mut reader = Reader::default();
    let definition = reader.definition(&root);
    if reader.problems.is_empty()
        && let Some(definition) = definition
    {
        return Ok(definition);
    }
    Err(reader.problems)
}

/// Reads back a stored selector (see `store::selector_json`): name, filter (canonical
/// JSON, which is also YAML) and summed value.
pub fn parse_selector_json(json: &serde_json::Value) -> Result<EventSelector, String> {
    let name = json
        .get("name")
        .and_then(serde_json::Value::as_str)
        .ok_or("stored selector without a name")?
        .to_owned();
    let filter_json = json
        .get("where")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let filter = if filter_json.is_null() {
        None
    } else {
        let node = yaml::parse(&filter_json.to_string()).map_err(|p| p.to_string())?;
        let mut reader = Reader::default();
        let filter = reader.filter(&node, "where", 0);
        if let Some(problem) = reader.problems.first() {
            return Err(problem.to_string());
        }
        filter
    };
    let value = json
        .get("value")
        .and_then(serde_json::Value::as_str)
        .map(split_path);
    Ok(EventSelector::new(name, filter, filter_json, value))
}

/// The `name:` of a document, when it can be read, so that errors can still be reported
/// against a segment.
pub fn document_name(text: &str) -> String {
    yaml::parse(text)
        .ok()
        .and_then(|root| root.get("name").and_then(Node::as_str).map(str::to_owned))
        .unwrap_or_default()
}

fn doc_problem(reason: String) -> Problem {
    Problem {
        field: String::new(),
        reason,
        line: 0,
        column: 0,
    }
}

/// A segment's name: 1–64 of `a-z0-9-`, starting with a letter.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// An event name: snake case, as the events service accepts.
fn valid_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
}

impl Reader {
    fn fail(&mut self, node: &Node, path: &str, reason: impl Into<String>) {
        self.problems.push(node.problem(path, reason));
    }

    fn unknown_keys(&mut self, node: &Node, path: &str, allowed: &[&str]) {
        let Some(entries) = node.as_map() else { return };
        for (key, value) in entries {
            if !allowed.contains(&key.as_str()) {
                self.fail(
                    value,
                    &join(path, key),
                    format!("unknown field (expected one of {})", allowed.join(", ")),
                );
            }
        }
    }

    fn definition(&mut self, root: &Node) -> Option<Definition> {
        if root.as_map().is_none() {
            self.fail(
                root,
                "",
                format!("expected a mapping, found {}", root.kind()),
            );
            return None;
        }
        self.unknown_keys(root, "", &["kind", "name", "description", "where"]);
        match root.get("kind").map(|k| (k, k.as_str())) {
            Some((_, Some("Segment"))) => {}
            Some((node, _)) => self.fail(node, "kind", "must be `Segment`"),
            None => self.fail(root, "kind", "is required (`kind: Segment`)"),
        }
        let name = match root.get("name") {
            Some(node) => match node.as_str() {
                Some(name) if valid_name(name) => name.to_owned(),
                _ => {
                    self.fail(
                        node,
                        "name",
                        "must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                    );
                    String::new()
                }
            },
            None => {
                self.fail(root, "name", "is required");
                String::new()
            }
        };
        let description = match root.get("description") {
            None => String::new(),
            Some(node) => match &node.value {
                Value::Null => String::new(),
                Value::Scalar { text, .. } if text.chars().count() <= 1000 => text.clone(),
                Value::Scalar { .. } => {
                    self.fail(node, "description", "at most 1,000 characters");
                    String::new()
                }
                _ => {
                    self.fail(node, "description", "must be text");
                    String::new()
                }
            },
        };
        let condition = match root.get("where") {
            Some(node) => self.condition(node, "where", 0),
            None => {
                self.fail(root, "where", "is required: the condition members meet");
                None
            }
        };
        Some(Definition {
            name,
            description,
            condition: condition?,
        })
    }

    fn condition(&mut self, node: &Node, path: &str, depth: usize) -> Option<Condition> {
        if depth > MAX_DEPTH {
            self.fail(node, path, format!("nested deeper than {MAX_DEPTH} levels"));
            return None;
        }
        let Some(entries) = node.as_map() else {
            self.fail(
                node,
                path,
                format!("expected a condition (a mapping), found {}", node.kind()),
            );
            return None;
        };
        let has = |key: &str| entries.iter().any(|(k, _)| k == key);
        for combinator in ["all", "any", "not", "in_segment"] {
            if has(combinator) {
                if entries.len() > 1 {
                    self.fail(
                        node,
                        path,
                        format!("`{combinator}` must be the only key of its condition"),
                    );
                    return None;
                }
                let child = &entries[0].1;
                let child_path = join(path, combinator);
                return match combinator {
                    "all" | "any" => {
                        let Some(items) = child.as_seq() else {
                            self.fail(child, &child_path, "expected a list of conditions");
                            return None;
                        };
                        let mut children = Vec::with_capacity(items.len());
                        let mut ok = true;
                        for (i, item) in items.iter().enumerate() {
                            match self.condition(item, &format!("{child_path}[{i}]"), depth + 1) {
                                Some(c) => children.push(c),
                                None => ok = false,
                            }
                        }
                        if !ok {
                            return None;
                        }
                        Some(if combinator == "all" {
                            Condition::All(children)
                        } else {
                            Condition::Any(children)
                        })
                    }
                    "not" => self
                        .condition(child, &child_path, depth + 1)
                        .map(|c| Condition::Not(Box::new(c))),
                    _ => match child.as_str() {
                        Some(name) if valid_name(name) => {
                            Some(Condition::InSegment(name.to_owned()))
                        }
                        _ => {
                            self.fail(child, &child_path, "must be the name of a segment");
                            None
                        }
                    },
                };
            }
        }
        if has("event") {
            return self
                .event_condition(node, path)
                .map(|event| Condition::Event(Box::new(event)));
        }
        for source in ["attribute", "trait"] {
            if has(source) {
                return self.attribute_condition(node, path, source);
            }
        }
        let first = entries.first().map(|(k, _)| k.as_str()).unwrap_or("");
        self.fail(
            node,
            path,
            format!(
                "unknown condition `{first}` (expected all, any, not, in_segment, event, attribute or trait)"
            ),
        );
        None
    }

    fn attribute_condition(&mut self, node: &Node, path: &str, source: &str) -> Option<Condition> {
        let source_node = node.get(source)?;
        let field_path = join(path, source);
        let property = match source_node.as_str() {
            Some(p) if valid_path(p) => split_path(p),
            _ => {
                self.fail(
                    source_node,
                    &field_path,
                    "must be a dotted property path such as `country` or `rfm.recency`",
                );
                return None;
            }
        };
        let mut tests = Vec::new();
        let mut ok = true;
        for (key, value) in node.as_map().unwrap_or(&[]) {
            if key == source {
                continue;
            }
            let op_path = join(path, key);
            if key == "attribute" || key == "trait" {
                self.fail(
                    value,
                    &op_path,
                    "use one of `attribute` or `trait` per condition",
                );
                ok = false;
                continue;
            }
            match self.test(key, value, &op_path) {
                Some(test) => tests.push(test),
                None => ok = false,
            }
        }
        if tests.is_empty() && ok {
            self.fail(
                node,
                path,
                format!("needs an operator ({})", ATTRIBUTE_OPERATORS.join(", ")),
            );
            return None;
        }
        if !ok {
            return None;
        }
        Some(Condition::Attribute(AttributeCondition {
            source: if source == "trait" {
                Source::Trait
            } else {
                Source::Attribute
            },
            path: property,
            tests,
        }))
    }

    /// One `operator: operand` pair.
    fn test(&mut self, op: &str, value: &Node, path: &str) -> Option<Test> {
        let json = value.to_json();
        let number = |reader: &mut Reader| -> Option<f64> {
            match json.as_f64() {
                Some(n) => Some(n),
                None => {
                    reader.fail(
                        value,
                        path,
                        format!("expected a number, found {}", show(&json)),
                    );
                    None
                }
            }
        };
        let scalar = |reader: &mut Reader| -> Option<serde_json::Value> {
            if json.is_object() || json.is_array() {
                reader.fail(value, path, "expected a single value");
                None
            } else {
                Some(json.clone())
            }
        };
        let list = |reader: &mut Reader| -> Option<Vec<serde_json::Value>> {
            match json.as_array() {
                Some(items)
                    if !items.is_empty()
                        && items.iter().all(|i| !i.is_object() && !i.is_array()) =>
                {
                    Some(items.clone())
                }
                _ => {
                    reader.fail(value, path, "expected a non-empty list of values");
                    None
                }
            }
        };
        let text = |reader: &mut Reader| -> Option<String> {
            match value.as_str() {
                Some(t) if !t.is_empty() => Some(t.to_owned()),
                _ => {
                    reader.fail(value, path, "expected text");
                    None
                }
            }
        };
        Some(match op {
            "eq" => Test::Eq(scalar(self)?),
            "neq" => Test::Neq(scalar(self)?),
            "in" => Test::In(list(self)?),
            "not_in" => Test::NotIn(list(self)?),
            "contains" => Test::Contains(text(self)?),
            "starts_with" => Test::StartsWith(text(self)?),
            "gt" => Test::Gt(number(self)?),
            "gte" => Test::Gte(number(self)?),
            "lt" => Test::Lt(number(self)?),
            "lte" => Test::Lte(number(self)?),
            "between" => {
                let pair = json.as_array().filter(|a| a.len() == 2);
                let Some([low, high]) = pair.map(|a| [a[0].as_f64(), a[1].as_f64()]) else {
                    self.fail(value, path, "expected two numbers: [low, high]");
                    return None;
                };
                let (Some(low), Some(high)) = (low, high) else {
                    self.fail(value, path, "expected two numbers: [low, high]");
                    return None;
                };
                if low > high {
                    self.fail(
                        value,
                        path,
                        format!("impossible range: {low} is above {high}"),
                    );
                    return None;
                }
                Test::Between(low, high)
            }
            "exists" => match json.as_bool() {
                Some(b) => Test::Exists(b),
                None => {
                    self.fail(value, path, "expected true or false");
                    return None;
                }
            },
            "before" | "after" => {
                let instant = self.instant(value, path)?;
                if op == "before" {
                    Test::Before(instant)
                } else {
                    Test::After(instant)
                }
            }
            // `older_than: 30d`: the timestamp is more than 30 days ago.
            "older_than" => Test::Before(Instant::Ago(self.duration(value, path)?)),
            "newer_than" => Test::After(Instant::Ago(self.duration(value, path)?)),
            _ => {
                self.fail(
                    value,
                    path,
                    format!(
                        "unknown operator (expected one of {})",
                        ATTRIBUTE_OPERATORS.join(", ")
                    ),
                );
                return None;
            }
        })
    }

    /// A timestamp (`2011-06-01`, RFC 3339) or a duration ago (`30d`).
    fn instant(&mut self, node: &Node, path: &str) -> Option<Instant> {
        let Some(text) = node.as_str() else {
            self.fail(
                node,
                path,
                "expected a date, a timestamp or a duration ago such as 30d",
            );
            return None;
        };
        if let Some(at) = parse_timestamp(text) {
            return Some(Instant::At(at));
        }
        if let Some(seconds) = parse_duration_secs(text) {
            return Some(Instant::Ago(seconds));
        }
        self.fail(
            node,
            path,
            format!(
                "{} is neither a date, a timestamp nor a duration",
                quote(text)
            ),
        );
        None
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<i64> {
        match node.as_str().and_then(parse_duration_secs) {
            Some(seconds) => Some(seconds),
            None => {
                let shown = node
                    .as_str()
                    .map(quote)
                    .unwrap_or_else(|| node.kind().to_owned());
                self.fail(
                    node,
                    path,
                    format!("{shown} is not a duration (e.g. 30d, 12h, 2w)"),
                );
                None
            }
        }
    }

    /// A window length in whole days (`30d`, `4w`).
    fn days(&mut self, node: &Node, path: &str) -> Option<i32> {
        let seconds = self.duration(node, path)?;
        if seconds % 86_400 != 0 {
            self.fail(
                node,
                path,
                "windows are counted in whole days (UTC): use d or w, e.g. 1d",
            );
            return None;
        }
        let days = seconds / 86_400;
        if days > MAX_WINDOW_DAYS {
            self.fail(node, path, format!("at most {MAX_WINDOW_DAYS}d"));
            return None;
        }
        Some(days as i32)
    }

    fn event_condition(&mut self, node: &Node, path: &str) -> Option<EventCondition> {
        // Two spellings: `event: NAME` with sibling keys, or `event: { name: NAME, … }`.
        let event_node = node.get("event")?;
        let (body, body_path, name_node, name_path) = if event_node.as_map().is_some() {
            self.unknown_keys(node, path, &["event"]);
            let event_path = join(path, "event");
            let Some(name_node) = event_node.get("name") else {
                self.fail(event_node, &join(&event_path, "name"), "is required");
                return None;
            };
            (
                event_node,
                event_path.clone(),
                name_node,
                join(&event_path, "name"),
            )
        } else {
            (node, path.to_owned(), event_node, join(path, "event"))
        };
        self.unknown_keys(body, &body_path, EVENT_KEYS);
        let problems_before = self.problems.len();
        let name = match name_node.as_str() {
            Some(n) if valid_event_name(n) => n.to_owned(),
            _ => {
                self.fail(
                    name_node,
                    &name_path,
                    "must be a snake_case event name such as order_completed",
                );
                String::new()
            }
        };
        let filter = match body.get("where") {
            Some(w) => self.filter(w, &join(&body_path, "where"), 0),
            None => None,
        };
        let count = body
            .get("count")
            .and_then(|c| self.bounds(c, &join(&body_path, "count")));
        let mut value_path: Option<Vec<String>> = None;
        let mut measure = |reader: &mut Reader, key: &str| -> Option<Bounds> {
            let measure_node = body.get(key)?;
            let measure_path = join(&body_path, key);
            let Some(property) = measure_node.get("property") else {
                reader.fail(
                    measure_node,
                    &join(&measure_path, "property"),
                    "is required: the numeric event property to add up",
                );
                return None;
            };
            let property_path = join(&measure_path, "property");
            let Some(p) = property.as_str().filter(|p| valid_path(p)) else {
                reader.fail(
                    property,
                    &property_path,
                    "must be a dotted property path such as revenue",
                );
                return None;
            };
            let p = split_path(p);
            match &value_path {
                Some(existing) if *existing != p => {
                    reader.fail(
                        property,
                        &property_path,
                        "`sum` and `avg` of one condition must use the same property",
                    );
                    return None;
                }
                _ => value_path = Some(p),
            }
            let mut bounds_only = measure_node.clone();
            if let Value::Map(entries) = &mut bounds_only.value {
                entries.retain(|(k, _)| k != "property");
            }
            reader.bounds(&bounds_only, &measure_path)
        };
        let sum = measure(self, "sum");
        let avg = measure(self, "avg");
        let window = self.window(body, &body_path);
        let not_followed_by = match body.get("not_followed_by") {
            Some(f) => self.follow_up(f, &join(&body_path, "not_followed_by")),
            None => None,
        };
        if self.problems.len() > problems_before {
            return None;
        }
        let filter_json = body
            .get("where")
            .map(Node::to_json)
            .unwrap_or(serde_json::Value::Null);
        Some(EventCondition {
            events: EventSelector::new(name, filter, filter_json, value_path),
            count,
            sum,
            avg,
            window: window?,
            not_followed_by,
        })
    }

    fn follow_up(&mut self, node: &Node, path: &str) -> Option<FollowUp> {
        if node.as_map().is_none() {
            self.fail(node, path, "expected { event: NAME, within: DURATION }");
            return None;
        }
        self.unknown_keys(node, path, &["event", "where", "within"]);
        let name = match node.get("event").and_then(Node::as_str) {
            Some(n) if valid_event_name(n) => n.to_owned(),
            _ => {
                let at = node.get("event").unwrap_or(node);
                self.fail(at, &join(path, "event"), "must be a snake_case event name");
                return None;
            }
        };
        let filter = match node.get("where") {
            Some(w) => Some(self.filter(w, &join(path, "where"), 0)?),
            None => None,
        };
        let within_secs = match node.get("within") {
            Some(w) => self.duration(w, &join(path, "within"))?,
            None => {
                self.fail(
                    node,
                    &join(path, "within"),
                    "is required: how long to wait for the follow-up event",
                );
                return None;
            }
        };
        Some(FollowUp {
            events: EventSelector::new(
                name,
                filter,
                node.get("where")
                    .map(Node::to_json)
                    .unwrap_or(serde_json::Value::Null),
                None,
            ),
            within_secs,
        })
    }

    fn window(&mut self, body: &Node, path: &str) -> Option<Window> {
        let within = body.get("within");
        let between = body.get("between");
        let from = body.get("from");
        let to = body.get("to");
        let given = [
            within.is_some(),
            between.is_some(),
            from.is_some() || to.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given > 1 {
            self.fail(
                body,
                path,
                "use one window: `within`, `between`, or `from`/`to`",
            );
            return None;
        }
        if let Some(node) = within {
            let days = self.days(node, &join(path, "within"))?;
            return Some(Window::Within { days });
        }
        if let Some(node) = between {
            let between_path = join(path, "between");
            let Some([older, newer]) = node
                .as_seq()
                .filter(|s| s.len() == 2)
                .map(|s| [&s[0], &s[1]])
            else {
                self.fail(
                    node,
                    &between_path,
                    "expected two durations ago: [90d, 30d]",
                );
                return None;
            };
            let older_days = self.days(older, &format!("{between_path}[0]"));
            let newer_days = self.days(newer, &format!("{between_path}[1]"));
            let (older_days, newer_days) = (older_days?, newer_days?);
            if older_days <= newer_days {
                self.fail(
                    node,
                    &between_path,
                    format!("impossible window: it starts {older_days}d ago and ends {newer_days}d ago; put the older end first"),
                );
                return None;
            }
            return Some(Window::Between {
                from_days: older_days,
                to_days: newer_days,
            });
        }
        if from.is_some() || to.is_some() {
            let date = |reader: &mut Reader,
                        node: Option<&Node>,
                        key: &str|
             -> Result<Option<NaiveDate>, ()> {
                let Some(node) = node else { return Ok(None) };
                match node
                    .as_str()
                    .and_then(|t| NaiveDate::parse_from_str(t, "%Y-%m-%d").ok())
                {
                    Some(d) => Ok(Some(d)),
                    None => {
                        reader.fail(node, &join(path, key), "expected a date such as 2011-06-30");
                        Err(())
                    }
                }
            };
            let from_date = date(self, from, "from");
            let to_date = date(self, to, "to");
            let (Ok(from_date), Ok(to_date)) = (from_date, to_date) else {
                return None;
            };
            if let (Some(f), Some(t)) = (from_date, to_date)
                && f > t
            {
                self.fail(
                    body,
                    &join(path, "to"),
                    format!("impossible window: {t} is before {f}"),
                );
                return None;
            }
            return Some(Window::Dates {
                from: from_date,
                to: to_date,
            });
        }
        Some(Window::Ever)
    }

    fn bounds(&mut self, node: &Node, path: &str) -> Option<Bounds> {
        if let Some(n) = node.to_json().as_f64() {
            // `count: 3` means exactly 3.
            return Some(Bounds {
                eq: Some(n),
                ..Bounds::default()
            });
        }
        if node.as_map().is_none() {
            self.fail(node, path, "expected bounds such as { gte: 1 }");
            return None;
        }
        let mut bounds = Bounds::default();
        let mut ok = true;
        for (key, value) in node.as_map().unwrap_or(&[]) {
            let key_path = join(path, key);
            if !BOUND_KEYS.contains(&key.as_str()) {
                self.fail(
                    value,
                    &key_path,
                    format!(
                        "unknown operator (expected one of {})",
                        BOUND_KEYS.join(", ")
                    ),
                );
                ok = false;
                continue;
            }
            match self.test(key, value, &key_path) {
                Some(Test::Gt(n)) => bounds.gt = Some(n),
                Some(Test::Gte(n)) => bounds.gte = Some(n),
                Some(Test::Lt(n)) => bounds.lt = Some(n),
                Some(Test::Lte(n)) => bounds.lte = Some(n),
                Some(Test::Between(low, high)) => {
                    bounds.gte = Some(low);
                    bounds.lte = Some(high);
                }
                Some(Test::Eq(v)) => match v.as_f64() {
                    Some(n) => bounds.eq = Some(n),
                    None => {
                        self.fail(value, &key_path, "expected a number");
                        ok = false;
                    }
                },
                _ => ok = false,
            }
        }
        if !ok {
            return None;
        }
        if bounds == Bounds::default() {
            self.fail(node, path, "expected at least one bound such as gte: 1");
            return None;
        }
        let low = bounds
            .gt
            .into_iter()
            .chain(bounds.gte)
            .chain(bounds.eq)
            .fold(f64::MIN, f64::max);
        let high = bounds
            .lt
            .into_iter()
            .chain(bounds.lte)
            .chain(bounds.eq)
            .fold(f64::MAX, f64::min);
        let empty = low > high
            || (low == high && (bounds.gt == Some(low) || bounds.lt == Some(high)))
            || bounds.eq.is_some_and(|e| !bounds.holds(e));
        if empty {
            self.fail(
                node,
                path,
                "impossible bounds: no number satisfies them all",
            );
            return None;
        }
        Some(bounds)
    }

    fn filter(&mut self, node: &Node, path: &str, depth: usize) -> Option<Filter> {
        if depth > MAX_DEPTH {
            self.fail(node, path, format!("nested deeper than {MAX_DEPTH} levels"));
            return None;
        }
        let Some(entries) = node.as_map() else {
            self.fail(
                node,
                path,
                "expected property tests such as { channel: push }",
            );
            return None;
        };
        // Key order carries no meaning; sorting makes a stored filter read back identically.
        let mut sorted: Vec<&(String, Node)> = entries.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut parts = Vec::with_capacity(entries.len());
        let mut ok = true;
        for (key, value) in sorted {
            let key_path = join(path, key);
            let part = match key.as_str() {
                "all" | "any" => match value.as_seq() {
                    Some(items) => {
                        let mut children = Vec::new();
                        for (i, item) in items.iter().enumerate() {
                            match self.filter(item, &format!("{key_path}[{i}]"), depth + 1) {
                                Some(f) => children.push(f),
                                None => ok = false,
                            }
                        }
                        Some(if key == "all" {
                            Filter::All(children)
                        } else {
                            Filter::Any(children)
                        })
                    }
                    None => {
                        self.fail(value, &key_path, "expected a list of property tests");
                        None
                    }
                },
                "not" => self
                    .filter(value, &key_path, depth + 1)
                    .map(|f| Filter::Not(Box::new(f))),
                property if valid_path(property) => {
                    let tests = match &value.value {
                        Value::Map(ops) => {
                            let mut tests = Vec::new();
                            for (op, operand) in ops {
                                match self.test(op, operand, &join(&key_path, op)) {
                                    Some(t) => tests.push(t),
                                    None => ok = false,
                                }
                            }
                            if ops.is_empty() {
                                self.fail(value, &key_path, "expected a value or operators");
                                ok = false;
                            }
                            tests
                        }
                        Value::Seq(_) => self.test("in", value, &key_path).into_iter().collect(),
                        _ => vec![Test::Eq(value.to_json())],
                    };
                    Some(Filter::Property {
                        path: split_path(property),
                        tests,
                    })
                }
                _ => {
                    self.fail(value, &key_path, "not a property path");
                    None
                }
            };
            match part {
                Some(p) => parts.push(p),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        if parts.len() == 1 {
            return parts.pop();
        }
        Some(Filter::All(parts))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn valid_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 256
        && path.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        })
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

fn quote(text: &str) -> String {
    format!("\"{text}\"")
}

fn show(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => quote(s),
        other => other.to_string(),
    }
}

/// `30d`, `12h`, `2w`, `45m`, `90s` → seconds.
pub fn parse_duration_secs(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let amount: i64 = digits.parse().ok()?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    amount
        .checked_mul(unit_secs)
        .filter(|s| *s <= MAX_WINDOW_DAYS * 86_400)
}

/// `2011-06-01` (midnight UTC) or RFC 3339.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse_definition(text)
            .expect_err("should be refused")
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect()
    }

    #[test]
    fn reads_the_architecture_example() {
        let definition = parse_definition(
            "kind: Segment\nname: lapsed-60d\nwhere:\n  all:\n    - event: order_completed\n      count: { gte: 1 }\n    - not:\n        event: order_completed\n        within: 60d\n",
        )
        .expect("valid");
        assert_eq!(definition.name, "lapsed-60d");
        let Condition::All(children) = definition.condition else {
            panic!("all expected")
        };
        assert_eq!(children.len(), 2);
        let Condition::Not(inner) = &children[1] else {
            panic!("not expected")
        };
        let Condition::Event(event) = inner.as_ref() else {
            panic!("event expected")
        };
        assert_eq!(event.window, Window::Within { days: 60 });
        assert_eq!(event.events.name, "order_completed");
    }

    #[test]
    fn names_the_path_of_a_bad_duration() {
        let found = problems(
            "kind: Segment\nname: x\nwhere:\n  all:\n    - trait: orders_count\n      gte: 1\n    - event: { name: order_completed, within: 30x }\n",
        );
        assert_eq!(
            found,
            vec!["where.all[1].event.within: \"30x\" is not a duration (e.g. 30d, 12h, 2w)"]
        );
        let flat = problems(
            "kind: Segment\nname: x\nwhere:\n  any:\n    - event: app_opened\n      within: 3 days\n",
        );
        assert_eq!(
            flat,
            vec!["where.any[0].within: \"3 days\" is not a duration (e.g. 30d, 12h, 2w)"]
        );
    }

    #[test]
    fn refuses_unknown_operators_fields_and_impossible_windows() {
        let found = problems(
            "kind: Segment\nname: x\nwhere:\n  all:\n    - attribute: country\n      equals: DZ\n    - event: order_completed\n      between: [30d, 90d]\n    - event: order_completed\n      cuont: { gte: 1 }\n    - event: order_completed\n      count: { gte: 5, lt: 2 }\n    - event: order_completed\n      from: 2011-06-01\n      to: 2011-01-01\n    - event: order_completed\n      within: 12h\n",
        );
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(
            found[0].starts_with("where.all[0].equals: unknown operator"),
            "{found:#?}"
        );
        assert!(
            found[1].starts_with("where.all[1].between: impossible window"),
            "{found:#?}"
        );
        assert!(
            found[2].starts_with("where.all[2].cuont: unknown field"),
            "{found:#?}"
        );
        assert!(
            found[3].starts_with("where.all[3].count: impossible bounds"),
            "{found:#?}"
        );
        assert!(
            found[4].starts_with("where.all[4].to: impossible window"),
            "{found:#?}"
        );
        assert!(
            found[5].starts_with("where.all[5].within: windows are counted in whole days"),
            "{found:#?}"
        );
    }

    #[test]
    fn reports_positions() {
        let errors =
            parse_definition("kind: Segment\nname: x\nwhere:\n  attribute: age\n  gte: old\n")
                .expect_err("bad number");
        assert_eq!(errors[0].field, "where.gte");
        assert_eq!((errors[0].line, errors[0].column), (5, 8));
    }

    #[test]
    fn document_level_problems() {
        assert_eq!(
            problems("kind: Flow\nname: Bad_Name\n"),
            vec![
                "kind: must be `Segment`".to_owned(),
                "name: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter"
                    .to_owned(),
                "where: is required: the condition members meet".to_owned(),
            ]
        );
        assert!(problems("- a\n- b\n")[0].contains("expected a mapping"));
    }

    #[test]
    fn reads_filters_measures_and_follow_ups() {
        let definition = parse_definition(
            "kind: Segment\nname: x\nwhere:\n  event: cart_updated\n  where: { items.category: Home, total: { gt: 10 } }\n  sum: { property: total, gte: 100 }\n  within: 7d\n  not_followed_by: { event: order_completed, within: 24h }\n",
        )
        .expect("valid");
        let Condition::Event(event) = definition.condition else {
            panic!("event expected")
        };
        assert_eq!(event.events.value, Some(vec!["total".to_owned()]));
        assert_eq!(event.sum.and_then(|b| b.gte), Some(100.0));
        assert_eq!(event.not_followed_by.map(|f| f.within_secs), Some(86_400));
        let Some(Filter::All(parts)) = event.events.filter else {
            panic!("two property tests expected")
        };
        assert_eq!(parts.len(), 2);
    }

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(parse_duration_secs("30d"), Some(30 * 86_400));
        assert_eq!(parse_duration_secs("2w"), Some(14 * 86_400));
        assert_eq!(parse_duration_secs("30x"), None);
        assert_eq!(parse_duration_secs("d"), None);
        assert!(parse_timestamp("2011-06-01").is_some());
        assert!(parse_timestamp("2011-06-01T10:00:00Z").is_some());
        assert!(parse_timestamp("June").is_none());
    }

    #[test]
    fn stored_selectors_read_back_identically() {
        let definition = parse_definition(
            "kind: Segment\nname: x\nwhere:\n  event: order_completed\n  where: { items.category: Home, any: [ { total: { gt: 10 } }, { coupon: { exists: true } } ] }\n  sum: { property: revenue, gte: 1 }\n",
        )
        .expect("valid");
        let Condition::Event(event) = definition.condition else {
            panic!()
        };
        let stored = serde_json::json!({
            "name": event.events.name,
            "where": event.events.filter_json,
            "value": "revenue",
        });
        let back = parse_selector_json(&stored).expect("reads back");
        assert_eq!(back, event.events);
    }
}
