//! Reads `kind: Flow` and `kind: Broadcast` YAML documents into the model, collecting every
//! problem with the path of the field at fault, its line and its column.
//!
//! Two layers. The reader turns nodes into model values and reports what cannot be read (a
//! wrong type, an unknown key, `3 days` for a duration). The rules a send, a conversion goal
//! or a broadcast must follow (name formats, weights, limits) are checked on the model
//! values, by the functions [`check_broadcast`] uses too, so a document and a structured
//! spec meet the same rules; a [`Spots`] table points each model field back at the node it
//! was read from. Problems come back in document order.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use relance_kit::yaml::{self, Node, Problem, Value};

use super::model::{
    Audience, BranchCondition, BroadcastDef, BroadcastSchedule, ChannelName, Conversion,
    DEFAULT_ATTRIBUTION_SECS, DEFAULT_CONVERSION_EVENT, DEFAULT_TOPIC, EventMatch, FlowDef,
    MAX_ATTRIBUTION_SECS, PropertyCondition, PropertyTest, ReEntry, Send, Step, StepKind, Trigger,
    Variant, Wait,
};
use super::schedule::Cron;

/// Largest accepted flow document.
pub const MAX_FLOW_BYTES: usize = 256 * 1024;
/// Largest accepted broadcast document.
pub const MAX_BROADCAST_BYTES: usize = 64 * 1024;

const MAX_NAME_CHARS: usize = 64;
const MAX_DESCRIPTION_CHARS: usize = 1000;
const MAX_EXCLUDE_SEGMENTS: usize = 20;
const MAX_CHANNELS: usize = ChannelName::ALL.len();
const MAX_VARIANTS: usize = 10;
const MAX_VARIANT_NAME_CHARS: usize = 32;
const MAX_WEIGHT: u32 = 1000;
const MAX_TEMPLATE_CHARS: usize = 128;
const MAX_DATA_BYTES: usize = 32 * 1024;
const MAX_CONTROL_PERCENT: f64 = 50.0;
const MAX_PATH_CHARS: usize = 256;
/// Deepest nesting of step lists (`then`, `else`, `on_timeout`).
const MAX_DEPTH: usize = 16;
/// Longest duration read (10 years), so time arithmetic stays far from overflow.
const MAX_DURATION_SECS: i64 = 3660 * DAY;
const DEFAULT_BEST_TIME_SECS: i64 = DAY;
const MIN_BEST_TIME_SECS: i64 = HOUR;
const MAX_BEST_TIME_SECS: i64 = 7 * DAY;

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;

const FLOW_KEYS: &[&str] = &[
    "kind",
    "name",
    "description",
    "trigger",
    "exit_when",
    "conversion",
    "re_entry",
    "audience",
    "control_group",
    "topic",
    "steps",
];
const BROADCAST_KEYS: &[&str] = &[
    "kind",
    "name",
    "description",
    "segment",
    "exclude_segments",
    "exclude",
    "channel",
    "channels",
    "template",
    "variants",
    "topic",
    "schedule",
    "control_group",
    "max_sends_per_second",
    "conversion",
    "ignore_frequency_caps",
    "ignore_quiet_hours",
    "data",
];
const SEND_KEYS: &[&str] = &[
    "channel", "channels", "template", "variants", "topic", "data",
];
const VARIANT_KEYS: &[&str] = &["name", "weight", "template", "channel", "channels"];
const STEP_KEYS: &[&str] = &["wait", "send", "branch", "update", "exit", "goto"];
const OPERATORS: &[&str] = &[
    "eq", "neq", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "contains",
];

/// Parses and validates a flow document (everything but the existence of the segments and
/// templates it names, which the caller checks against the other services).
pub fn parse_flow(text: &str) -> Result<FlowDef, Vec<Problem>> {
    if text.len() > MAX_FLOW_BYTES {
        return Err(vec![too_large(text.len(), MAX_FLOW_BYTES)]);
    }
    let root = yaml::parse(text).map_err(|problem| vec![problem])?;
    let mut reader = Reader::default();
    let flow = reader.flow(&root);
    reader.finish(flow)
}

/// Parses and validates a broadcast document.
pub fn parse_broadcast(text: &str) -> Result<BroadcastDef, Vec<Problem>> {
    if text.len() > MAX_BROADCAST_BYTES {
        return Err(vec![too_large(text.len(), MAX_BROADCAST_BYTES)]);
    }
    let root = yaml::parse(text).map_err(|problem| vec![problem])?;
    let mut reader = Reader::default();
    let broadcast = reader.broadcast(&root);
    reader.finish(broadcast)
}

/// Checks a broadcast built from a structured spec; each problem's field starts with
/// `prefix` (e.g. `spec.`), as in `spec.variants[1].weight`. The caller fills the spec's
/// defaults first (an empty topic is `marketing`, an unset conversion the default one).
pub fn check_broadcast(def: &BroadcastDef, prefix: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    for issue in broadcast_issues(def) {
        let field = if issue.field.is_empty() {
            prefix.trim_end_matches('.').to_owned()
        } else {
            format!("{prefix}{}", issue.field)
        };
        problems.push(Problem {
            field,
            reason: issue.reason,
            line: 0,
            column: 0,
        });
    }
    problems
}

/// Checks a flow or broadcast name: 1 to 64 characters, lowercase letters, digits and `-`,
/// starting with a letter. Segment names follow the same rule.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".to_owned());
    }
    let valid = name.len() <= MAX_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(
            "must be 1 to 64 lowercase letters, digits or `-`, starting with a letter".to_owned(),
        );
    }
    Ok(())
}

/// `90s`, `15m`, `1h`, `7d`, `2w`, `1h30m` → seconds; `None` when unreadable or not positive.
/// Units are required, each at most once and largest first; at most 10 years.
pub fn parse_duration_secs(text: &str) -> Option<i64> {
    let text = text.trim();
    let mut total: i64 = 0;
    let mut amount: Option<i64> = None;
    let mut previous_unit = i64::MAX;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            let so_far = amount.unwrap_or(0);
            amount = Some(so_far.checked_mul(10)?.checked_add(i64::from(digit))?);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => MINUTE,
            'h' => HOUR,
            'd' => DAY,
            'w' => WEEK,
            _ => return None,
        };
        if unit >= previous_unit {
            return None;
        }
        previous_unit = unit;
        total = total.checked_add(amount?.checked_mul(unit)?)?;
        amount = None;
    }
    if amount.is_some() || total <= 0 || total > MAX_DURATION_SECS {
        return None;
    }
    Some(total)
}

/// Seconds → the shortest document form (`72h` stays `3d`, `5400` is `1h30m`): whole weeks
/// as `2w`, else days, hours, minutes and seconds, largest first, leaving out zeros.
pub fn format_duration(secs: i64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let sign = if secs < 0 { "-" } else { "" };
    let mut rest = secs.unsigned_abs();
    let week = WEEK.unsigned_abs();
    if rest.is_multiple_of(week) {
        return format!("{sign}{}w", rest / week);
    }
    let mut text = sign.to_owned();
    for (unit, letter) in [(DAY, 'd'), (HOUR, 'h'), (MINUTE, 'm'), (1, 's')] {
        let unit = unit.unsigned_abs();
        if rest >= unit {
            text.push_str(&(rest / unit).to_string());
            text.push(letter);
            rest %= unit;
        }
    }
    text
}

/// Reads `where:` conditions given as JSON (a structured spec's `conditions`), with the
/// document's rules; each problem's field starts with `prefix` (e.g. `spec.conversion.conditions`).
pub fn parse_conditions(
    json: &serde_json::Value,
    prefix: &str,
) -> Result<Vec<PropertyCondition>, Vec<Problem>> {
    if json.is_null() {
        return Ok(Vec::new());
    }
    let node = node_of_json(json);
    let mut reader = Reader::default();
    let conditions = reader.conditions(&node, prefix);
    reader.finish(Some(conditions))
}

/// Writes conditions back in the `where:` form, one operator map per path
/// (`{"revenue": {"gte": 20}}`), e.g. for a structured spec's `conditions`.
pub fn conditions_json(conditions: &[PropertyCondition]) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for condition in conditions {
        let (op, operand) = match &condition.test {
            PropertyTest::Eq(value) => ("eq", value.clone()),
            PropertyTest::Neq(value) => ("neq", value.clone()),
            PropertyTest::In(values) => ("in", serde_json::Value::Array(values.clone())),
            PropertyTest::NotIn(values) => ("not_in", serde_json::Value::Array(values.clone())),
            PropertyTest::Gt(n) => ("gt", serde_json::Value::from(*n)),
            PropertyTest::Gte(n) => ("gte", serde_json::Value::from(*n)),
            PropertyTest::Lt(n) => ("lt", serde_json::Value::from(*n)),
            PropertyTest::Lte(n) => ("lte", serde_json::Value::from(*n)),
            PropertyTest::Exists(b) => ("exists", serde_json::Value::Bool(*b)),
            PropertyTest::Contains(value) => ("contains", value.clone()),
        };
        let entry = object
            .entry(condition.path.join("."))
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(ops) = entry {
            ops.insert(op.to_owned(), operand);
        }
    }
    serde_json::Value::Object(object)
}

// ---------------------------------------------------------------------------------------
// Rules on values, shared by documents and structured specs.

/// A rule broken by a model value: the model field (`variants[1].weight`) and why.
struct Issue {
    field: String,
    reason: String,
}

fn note(out: &mut Vec<Issue>, field: impl Into<String>, result: Result<(), String>) {
    if let Err(reason) = result {
        out.push(Issue {
            field: field.into(),
            reason,
        });
    }
}

fn check_event_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(
            "must be a snake_case event name such as order_completed (at most 64 characters)"
                .to_owned(),
        );
    }
    Ok(())
}

fn check_template(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".to_owned());
    }
    let valid = name.len() <= MAX_TEMPLATE_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err("must be a template name: up to 128 lowercase letters, digits, `_`, `.` or `-`, starting with a letter or digit".to_owned());
    }
    Ok(())
}

fn check_topic(topic: &str) -> Result<(), String> {
    let valid = !topic.is_empty()
        && topic.len() <= MAX_NAME_CHARS
        && topic
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err("must be 1 to 64 lowercase letters, digits, `_`, `.` or `-`".to_owned());
    }
    Ok(())
}

fn check_step_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= MAX_NAME_CHARS
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if !valid {
        return Err("must be up to 64 lowercase letters, digits, `_` or `-`, starting with a letter or digit".to_owned());
    }
    Ok(())
}

fn check_variant_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".to_owned());
    }
    if name.eq_ignore_ascii_case("control") {
        return Err("`control` is reserved for the control group".to_owned());
    }
    let valid = name.chars().count() <= MAX_VARIANT_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err("must be 1 to 32 letters, digits, `_`, `.` or `-`".to_owned());
    }
    Ok(())
}

fn check_attribute_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= MAX_NAME_CHARS
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(
            "attribute names are up to 64 letters, digits or `_`, not starting with a digit"
                .to_owned(),
        );
    }
    Ok(())
}

fn check_description(text: &str) -> Result<(), String> {
    if text.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(format!("at most {MAX_DESCRIPTION_CHARS} characters"));
    }
    Ok(())
}

fn check_control_percent(percent: f64) -> Result<(), String> {
    if !(0.0..=MAX_CONTROL_PERCENT).contains(&percent) {
        return Err(format!(
            "must be from 0 to {MAX_CONTROL_PERCENT} % (a control group above half the audience leaves too few to treat)"
        ));
    }
    Ok(())
}

fn check_channels(channels: &[ChannelName]) -> Result<(), String> {
    if channels.len() > MAX_CHANNELS {
        return Err(format!("at most {MAX_CHANNELS} channels"));
    }
    for (i, channel) in channels.iter().enumerate() {
        if channels[..i].contains(channel) {
            return Err(format!("`{}` is listed twice", channel.as_str()));
        }
    }
    Ok(())
}

fn check_data(data: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    let bytes = serde_json::to_string(data).map_or(usize::MAX, |json| json.len());
    if bytes > MAX_DATA_BYTES {
        return Err(format!(
            "at most {MAX_DATA_BYTES} bytes once encoded as JSON (found {bytes})"
        ));
    }
    Ok(())
}

/// What a send says, in a flow step or a broadcast.
struct SendFields<'a> {
    channels: &'a [ChannelName],
    template: Option<&'a str>,
    variants: &'a [Variant],
    topic: Option<&'a str>,
    data: &'a serde_json::Map<String, serde_json::Value>,
}

fn send_issues(send: &SendFields<'_>, out: &mut Vec<Issue>) {
    if send.channels.is_empty() {
        note(
            out,
            "channels",
            Err("needs at least one channel".to_owned()),
        );
    }
    note(out, "channels", check_channels(send.channels));
    match (send.template, send.variants.is_empty()) {
        (Some(_), false) => note(
            out,
            "variants",
            Err("use either `template` or `variants`, not both".to_owned()),
        ),
        (None, true) => note(
            out,
            "template",
            Err("is required (or `variants`, to test several templates)".to_owned()),
        ),
        _ => {}
    }
    if let Some(template) = send.template {
        note(out, "template", check_template(template));
    }
    if send.variants.len() > MAX_VARIANTS {
        note(
            out,
            "variants",
            Err(format!("at most {MAX_VARIANTS} variants")),
        );
    }
    for (i, variant) in send.variants.iter().enumerate() {
        let at = format!("variants[{i}]");
        note(out, format!("{at}.name"), check_variant_name(&variant.name));
        let earlier = send.variants[..i]
            .iter()
            .position(|other| other.name == variant.name);
        if let Some(first) = earlier
            && !variant.name.is_empty()
        {
            note(
                out,
                format!("{at}.name"),
                Err(format!(
                    "`{}` is already the name of variants[{first}]",
                    variant.name
                )),
            );
        }
        if !(1..=MAX_WEIGHT).contains(&variant.weight) {
            note(
                out,
                format!("{at}.weight"),
                Err(format!("must be a whole number from 1 to {MAX_WEIGHT}")),
            );
        }
        note(
            out,
            format!("{at}.template"),
            check_template(&variant.template),
        );
        note(
            out,
            format!("{at}.channels"),
            check_channels(&variant.channels),
        );
    }
    if let Some(topic) = send.topic {
        note(out, "topic", check_topic(topic));
    }
    note(out, "data", check_data(send.data));
}

fn conversion_issues(conversion: &Conversion, out: &mut Vec<Issue>) {
    note(
        out,
        "conversion.event",
        check_event_name(&conversion.goal.event),
    );
    if !(1..=MAX_ATTRIBUTION_SECS).contains(&conversion.within_secs) {
        note(
            out,
            "conversion.within",
            Err(format!(
                "must be a positive duration of at most {} (the attribution window)",
                format_duration(MAX_ATTRIBUTION_SECS)
            )),
        );
    }
}

fn broadcast_issues(def: &BroadcastDef) -> Vec<Issue> {
    let mut out = Vec::new();
    note(&mut out, "name", check_name(&def.name));
    note(&mut out, "description", check_description(&def.description));
    note(&mut out, "segment", check_name(&def.segment));
    if def.exclude_segments.len() > MAX_EXCLUDE_SEGMENTS {
        note(
            &mut out,
            "exclude_segments",
            Err(format!("at most {MAX_EXCLUDE_SEGMENTS} segments")),
        );
    }
    for (i, segment) in def.exclude_segments.iter().enumerate() {
        note(
            &mut out,
            format!("exclude_segments[{i}]"),
            check_name(segment),
        );
    }
    send_issues(
        &SendFields {
            channels: &def.channels,
            template: def.template.as_deref(),
            variants: &def.variants,
            topic: Some(&def.topic),
            data: &def.data,
        },
        &mut out,
    );
    match &def.schedule {
        BroadcastSchedule::Now | BroadcastSchedule::At(_) => {}
        BroadcastSchedule::LocalTime { hour, minute, .. } => {
            if *hour > 23 || *minute > 59 {
                note(
                    &mut out,
                    "schedule.local_time.time",
                    Err("must be a time of day from 00:00 to 23:59".to_owned()),
                );
            }
        }
        BroadcastSchedule::Recurring {
            cron,
            starts_at,
            ends_at,
            ..
        } => {
            note(
                &mut out,
                "schedule.recurring.cron",
                Cron::parse(cron).map(|_| ()),
            );
            if let (Some(starts_at), Some(ends_at)) = (starts_at, ends_at)
                && ends_at <= starts_at
            {
                note(
                    &mut out,
                    "schedule.recurring.ends_at",
                    Err("must be after starts_at".to_owned()),
                );
            }
        }
    }
    note(
        &mut out,
        "control_group_percent",
        check_control_percent(def.control_group_percent),
    );
    conversion_issues(&def.conversion, &mut out);
    out
}

// ---------------------------------------------------------------------------------------
// Positions.

/// A document path with the position of its node.
#[derive(Debug)]
struct Spot {
    path: String,
    line: u32,
    column: u32,
}

impl Spot {
    fn of(path: &str, node: &Node) -> Spot {
        Spot {
            path: path.to_owned(),
            line: node.line,
            column: node.column,
        }
    }

    fn problem(&self, reason: impl Into<String>) -> Problem {
        Problem {
            field: self.path.clone(),
            reason: reason.into(),
            line: self.line,
            column: self.column,
        }
    }
}

/// Where each field of a model value was read from: model field (`variants[1].weight`) →
/// document path and position, so a rule checked on the model points at the document. A
/// field not noted (absent from the document) is named under its nearest noted ancestor.
struct Spots {
    base: Spot,
    fields: Vec<(String, Spot)>,
}

impl Spots {
    fn new(path: &str, node: &Node) -> Spots {
        Spots {
            base: Spot::of(path, node),
            fields: Vec::new(),
        }
    }

    fn note(&mut self, field: impl Into<String>, path: &str, node: &Node) {
        self.fields.push((field.into(), Spot::of(path, node)));
    }

    fn problem(&self, issue: Issue) -> Problem {
        let mut known = issue.field.as_str();
        loop {
            if let Some((_, spot)) = self.fields.iter().rev().find(|(f, _)| f == known) {
                let rest = &issue.field[known.len()..];
                return Problem {
                    field: attach(&spot.path, rest),
                    ..spot.problem(issue.reason)
                };
            }
            match known.rfind(['.', '[']) {
                Some(cut) => known = &known[..cut],
                None => break,
            }
        }
        let rest = if issue.field.is_empty() || issue.field.starts_with('[') {
            issue.field.clone()
        } else {
            format!(".{}", issue.field)
        };
        Problem {
            field: attach(&self.base.path, &rest),
            ..self.base.problem(issue.reason)
        }
    }
}

/// `path` followed by `rest` (empty, `.key…` or `[i]…`).
fn attach(path: &str, rest: &str) -> String {
    if path.is_empty() {
        return rest.trim_start_matches('.').to_owned();
    }
    format!("{path}{rest}")
}

// ---------------------------------------------------------------------------------------
// Steps as written, before they are flattened.

/// One step as written, with its nested step lists.
struct Draft<'n> {
    /// `steps[5].branch.then[0]`.
    path: String,
    node: &'n Node,
    id: Option<String>,
    summary: String,
    shape: Shape<'n>,
}

/// What a written step is; unreadable parts are `None` (the document is refused anyway,
/// but the step keeps its place so later paths and gotos stay right).
enum Shape<'n> {
    /// A timed wait, a send, an update or an exit; `None` when it could not be read.
    Leaf(Option<StepKind>),
    WaitEvent {
        wait: Option<(EventMatch, i64)>,
        on_timeout: Vec<Draft<'n>>,
    },
    Branch {
        condition: Option<BranchCondition>,
        then: Vec<Draft<'n>>,
        otherwise: Vec<Draft<'n>>,
    },
    Goto {
        target: String,
        node: &'n Node,
    },
}

impl Draft<'_> {
    /// How many flattened steps this one becomes (itself and every nested step).
    fn size(&self) -> usize {
        let nested: &[&[Draft<'_>]] = match &self.shape {
            Shape::Leaf(_) | Shape::Goto { .. } => &[],
            Shape::WaitEvent { on_timeout, .. } => &[on_timeout],
            Shape::Branch {
                then, otherwise, ..
            } => &[then, otherwise],
        };
        let mut size = 1;
        for list in nested {
            size += list_size(list);
        }
        size
    }
}

fn list_size(drafts: &[Draft<'_>]) -> usize {
    let mut size = 0;
    for draft in drafts {
        size += draft.size();
    }
    size
}

/// The flattened steps, where each was written, and the gotos to resolve.
#[derive(Default)]
struct Flat<'n> {
    steps: Vec<Step>,
    spots: Vec<Spot>,
    gotos: Vec<(usize, &'n str, Spot)>,
}

/// Flattens depth first: a step, then its nested steps, then the step after it. The last
/// step of a list goes on to `continuation` (the enclosing list's next step).
fn flatten<'n>(drafts: &'n [Draft<'n>], continuation: Option<usize>, flat: &mut Flat<'n>) {
    let mut index = flat.steps.len();
    for (i, draft) in drafts.iter().enumerate() {
        let after = index + draft.size();
        let next = if i + 1 < drafts.len() {
            Some(after)
        } else {
            continuation
        };
        let first_nested = index + 1;
        let (kind, step_next) = match &draft.shape {
            Shape::Leaf(Some(StepKind::Exit)) | Shape::Leaf(None) => (StepKind::Exit, None),
            Shape::Leaf(Some(kind)) => (kind.clone(), next),
            Shape::WaitEvent { wait, on_timeout } => match wait {
                Some((event, timeout_secs)) => (
                    StepKind::Wait(Wait::Event {
                        event: event.clone(),
                        timeout_secs: *timeout_secs,
                        on_timeout: (!on_timeout.is_empty()).then_some(first_nested),
                    }),
                    next,
                ),
                None => (StepKind::Exit, None),
            },
            Shape::Branch {
                condition,
                then,
                otherwise,
            } => match condition {
                Some(condition) => (
                    StepKind::Branch {
                        condition: condition.clone(),
                        then_to: (!then.is_empty()).then_some(first_nested),
                        else_to: (!otherwise.is_empty()).then_some(first_nested + list_size(then)),
                    },
                    next,
                ),
                None => (StepKind::Exit, None),
            },
            Shape::Goto { target, node } => {
                flat.gotos.push((
                    index,
                    target.as_str(),
                    Spot::of(&format!("{}.goto", draft.path), node),
                ));
                (StepKind::Goto { target: index }, None)
            }
        };
        flat.steps.push(Step {
            id: draft.id.clone().unwrap_or_else(|| draft.path.clone()),
            summary: draft.summary.clone(),
            kind,
            next: step_next,
        });
        flat.spots.push(Spot::of(&draft.path, draft.node));
        match &draft.shape {
            Shape::WaitEvent { on_timeout, .. } => flatten(on_timeout, next, flat),
            Shape::Branch {
                then, otherwise, ..
            } => {
                flatten(then, next, flat);
                flatten(otherwise, next, flat);
            }
            Shape::Leaf(_) | Shape::Goto { .. } => {}
        }
        index = after;
    }
}

// ---------------------------------------------------------------------------------------
// Steps that can never end.

/// Where a journey may go after each step: a step's index, or `None` for the end.
fn exits(step: &Step) -> Vec<Option<usize>> {
    match &step.kind {
        StepKind::Exit => vec![None],
        StepKind::Goto { target } => vec![Some(*target)],
        StepKind::Branch {
            then_to, else_to, ..
        } => vec![then_to.or(step.next), else_to.or(step.next)],
        StepKind::Wait(Wait::Event { on_timeout, .. }) => {
            vec![step.next, on_timeout.or(step.next)]
        }
        StepKind::Wait(_) | StepKind::Send(_) | StepKind::Update { .. } => vec![step.next],
    }
}

/// Steps that refuse the flow: a loop without a timed wait (it would spin), and a loop the
/// journey can enter but never leave. Each comes as (step index, reason), at the step that
/// jumps back.
fn endless(steps: &[Step]) -> Vec<(usize, String)> {
    let count = steps.len();
    let mut successors: Vec<Vec<usize>> = Vec::with_capacity(count);
    let mut ends = vec![false; count];
    for (i, step) in steps.iter().enumerate() {
        let mut targets = Vec::new();
        for exit in exits(step) {
            match exit {
                Some(target) => targets.push(target),
                None => ends[i] = true,
            }
        }
        successors.push(targets);
    }
    let timed: Vec<bool> = steps
        .iter()
        .map(|step| matches!(step.kind, StepKind::Wait(_)))
        .collect();
    let mut found = Vec::new();

    // (a) Loops among steps that take no time.
    let mut untimed: Vec<Vec<usize>> = Vec::with_capacity(count);
    for (i, targets) in successors.iter().enumerate() {
        let mut kept = Vec::new();
        if !timed[i] {
            for &target in targets {
                if !timed[target] {
                    kept.push(target);
                }
            }
        }
        untimed.push(kept);
    }
    let groups = components(&untimed);
    for members in loops(&untimed, &groups) {
        let (from, to) = jump_back(steps, &groups, &members);
        found.push((
            from,
            format!(
                "the steps can never end: {} loops back to {} without a wait",
                steps[from].id, steps[to].id
            ),
        ));
    }

    // (b) Loops that a journey can reach and never leave, waits or not.
    let mut can_end = ends.clone();
    let mut predecessors: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, targets) in successors.iter().enumerate() {
        for &target in targets {
            predecessors[target].push(i);
        }
    }
    let mut queue: Vec<usize> = (0..count).filter(|&i| ends[i]).collect();
    while let Some(i) = queue.pop() {
        for &before in &predecessors[i] {
            if !can_end[before] {
                can_end[before] = true;
                queue.push(before);
            }
        }
    }
    let mut reached = vec![false; count];
    let mut queue = Vec::new();
    if count > 0 {
        reached[0] = true;
        queue.push(0);
    }
    while let Some(i) = queue.pop() {
        for &target in &successors[i] {
            if !reached[target] {
                reached[target] = true;
                queue.push(target);
            }
        }
    }
    let groups = components(&successors);
    for members in loops(&successors, &groups) {
        let group = groups[members[0]];
        let trapped = members.iter().all(|&i| reached[i] && !can_end[i]);
        let closed = members
            .iter()
            .all(|&i| successors[i].iter().all(|&t| groups[t] == group));
        let has_wait = members.iter().any(|&i| timed[i]);
        // A trap without a wait is a loop without a wait, reported above.
        if !(trapped && closed && has_wait) {
            continue;
        }
        let (from, to) = jump_back(steps, &groups, &members);
        found.push((
            from,
            format!(
                "the steps can never end: {} loops back to {} and no step on the way leads to the end",
                steps[from].id, steps[to].id
            ),
        ));
    }
    found.sort_by_key(|(step, _)| *step);
    found
}

/// The groups that hold a loop (more than one step, or a step that goes to itself), each
/// as its steps in index order.
fn loops(successors: &[Vec<usize>], groups: &[usize]) -> Vec<Vec<usize>> {
    let count = groups.iter().map(|&group| group + 1).max().unwrap_or(0);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, &group) in groups.iter().enumerate() {
        members[group].push(i);
    }
    let mut found = Vec::new();
    for group in members {
        let looping = match group.as_slice() {
            [] => false,
            [only] => successors[*only].contains(only),
            _ => true,
        };
        if looping {
            found.push(group);
        }
    }
    found
}

/// The jump that closes a loop: every other move goes forward in the flattened order, so
/// it is a `goto` to an earlier (or the same) step of the group; the last such one is named.
fn jump_back(steps: &[Step], groups: &[usize], members: &[usize]) -> (usize, usize) {
    let first = members.first().copied().unwrap_or(0);
    let mut found = (first, first);
    for &i in members {
        if let StepKind::Goto { target } = steps[i].kind
            && groups[target] == groups[i]
        {
            found = (i, target);
        }
    }
    found
}

/// Strongly connected components (Kosaraju, without recursion): each node's group number.
fn components(successors: &[Vec<usize>]) -> Vec<usize> {
    let count = successors.len();
    let mut order = Vec::with_capacity(count);
    let mut seen = vec![false; count];
    for start in 0..count {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![(start, 0usize)];
        while let Some(&(node, edge)) = stack.last() {
            match successors[node].get(edge) {
                Some(&target) => {
                    let top = stack.len() - 1;
                    stack[top].1 += 1;
                    if !seen[target] {
                        seen[target] = true;
                        stack.push((target, 0));
                    }
                }
                None => {
                    order.push(node);
                    stack.pop();
                }
            }
        }
    }
    let mut predecessors: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (node, targets) in successors.iter().enumerate() {
        for &target in targets {
            predecessors[target].push(node);
        }
    }
    let mut groups = vec![usize::MAX; count];
    let mut next_group = 0;
    for &root in order.iter().rev() {
        if groups[root] != usize::MAX {
            continue;
        }
        groups[root] = next_group;
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            for &before in &predecessors[node] {
                if groups[before] == usize::MAX {
                    groups[before] = next_group;
                    stack.push(before);
                }
            }
        }
        next_group += 1;
    }
    groups
}

// ---------------------------------------------------------------------------------------
// The reader.

/// Reads nodes into model values, collecting every problem instead of stopping at the first.
#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
}

impl Reader {
    fn fail(&mut self, node: &Node, path: &str, reason: impl Into<String>) {
        self.problems.push(node.problem(path, reason));
    }

    /// The value, or every problem in document order.
    fn finish<T>(mut self, value: Option<T>) -> Result<T, Vec<Problem>> {
        if self.problems.is_empty()
            && let Some(value) = value
        {
            return Ok(value);
        }
        if self.problems.is_empty() {
            self.problems
                .push(document_problem("the document could not be read"));
        }
        self.problems
            .sort_by_key(|problem| (problem.line, problem.column));
        Err(self.problems)
    }

    /// Reports the issues found by a rule check, unless the field (or one holding it) was
    /// already found unreadable while reading the part (the problems from `since` on).
    fn report(&mut self, spots: &Spots, issues: Vec<Issue>, since: usize) {
        let reading = self.problems.len();
        for issue in issues {
            let problem = spots.problem(issue);
            let known = self.problems[since.min(reading)..reading].iter().any(|p| {
                problem.field == p.field
                    || problem
                        .field
                        .strip_prefix(p.field.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            });
            if !known {
                self.problems.push(problem);
            }
        }
    }

    fn unknown_keys(&mut self, node: &Node, path: &str, allowed: &[&str]) {
        let Some(entries) = node.as_map() else { return };
        for (key, value) in entries {
            if !allowed.contains(&key.as_str()) {
                self.fail(
                    value,
                    &join(path, key),
                    format!("unknown key; expected one of {}", allowed.join(", ")),
                );
            }
        }
    }

    /// The node's entries, or a problem naming what was expected.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        expected: &str,
    ) -> Option<&'n [(String, Node)]> {
        match node.as_map() {
            Some(entries) => Some(entries),
            None => {
                self.fail(
                    node,
                    path,
                    format!("expected {expected}, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn required<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        key: &str,
        why: &str,
    ) -> Option<&'n Node> {
        let found = node.get(key);
        if found.is_none() {
            self.fail(node, &join(path, key), format!("is required{why}"));
        }
        found
    }

    /// Which of `keys` the mapping holds: exactly one is expected.
    fn one_of<'k>(&mut self, node: &Node, path: &str, keys: &[&'k str]) -> Option<&'k str> {
        let present: Vec<&'k str> = keys
            .iter()
            .copied()
            .filter(|k| node.get(k).is_some())
            .collect();
        match present.as_slice() {
            [one] => Some(*one),
            [] => {
                self.fail(node, path, format!("expected one of {}", keys.join(", ")));
                None
            }
            [first, second, ..] => {
                self.fail(
                    node,
                    path,
                    format!("use one of `{first}` and `{second}`, not both"),
                );
                None
            }
        }
    }

    fn text(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.fail(node, path, format!("expected text, found {}", node.kind()));
                None
            }
        }
    }

    /// Text that must follow `rule`.
    fn checked(
        &mut self,
        node: &Node,
        path: &str,
        rule: fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let text = self.text(node, path)?;
        if let Err(reason) = rule(&text) {
            self.fail(node, path, reason);
            return None;
        }
        Some(text)
    }

    fn flag(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.to_json() {
            serde_json::Value::Bool(flag) => Some(flag),
            _ => {
                self.fail(node, path, "expected true or false");
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<i64> {
        if let Some(secs) = node.as_str().and_then(parse_duration_secs) {
            return Some(secs);
        }
        let shown = match node.as_str() {
            Some(text) => format!("`{text}`"),
            None => node.kind().to_owned(),
        };
        self.fail(
            node,
            path,
            format!("{shown} is not a duration (e.g. 90s, 15m, 24h, 7d, 2w, 1h30m)"),
        );
        None
    }

    /// `10%`, `0.5%` or `10`.
    fn percent(&mut self, node: &Node, path: &str) -> Option<f64> {
        let read = match node.to_json() {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(text) => text
                .trim()
                .strip_suffix('%')
                .and_then(|number| number.trim().parse::<f64>().ok()),
            _ => None,
        };
        match read {
            Some(percent) if percent.is_finite() => Some(percent),
            _ => {
                self.fail(node, path, "expected a percentage such as 10%");
                None
            }
        }
    }

    /// A time of day, `HH:MM`.
    fn clock(&mut self, node: &Node, path: &str) -> Option<(u32, u32)> {
        let read = node.as_str().and_then(parse_clock);
        if read.is_none() {
            self.fail(node, path, "expected a time of day such as \"18:00\"");
        }
        read
    }

    fn timestamp(&mut self, node: &Node, path: &str) -> Option<DateTime<Utc>> {
        let read = node
            .as_str()
            .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
            .map(|at| at.with_timezone(&Utc));
        if read.is_none() {
            self.fail(
                node,
                path,
                "expected an RFC 3339 timestamp such as 2026-03-01T18:00:00Z",
            );
        }
        read
    }

    fn kind(&mut self, root: &Node, expected: &str) -> bool {
        match root.get("kind") {
            Some(node) if node.as_str() == Some(expected) => true,
            Some(node) => {
                self.fail(node, "kind", format!("must be `{expected}`"));
                false
            }
            None => {
                self.fail(root, "kind", format!("is required (`kind: {expected}`)"));
                true
            }
        }
    }

    fn description(&mut self, root: &Node) -> String {
        let Some(node) = root.get("description") else {
            return String::new();
        };
        if matches!(node.value, Value::Null) {
            return String::new();
        }
        self.checked(node, "description", check_description)
            .unwrap_or_default()
    }

    // -- conditions --------------------------------------------------------------------

    /// `where:` — path → value (equal), list (one of) or operators.
    fn conditions(&mut self, node: &Node, path: &str) -> Vec<PropertyCondition> {
        let mut conditions = Vec::new();
        let Some(entries) = self.map(node, path, "property tests such as { channel: push }") else {
            return conditions;
        };
        for (key, value) in entries {
            let key_path = join(path, key);
            if !valid_path(key) {
                self.fail(
                    value,
                    &key_path,
                    "not a property path (letters, digits, `_` or `-`, dotted: items.category)",
                );
                continue;
            }
            let property: Vec<String> = key.split('.').map(str::to_owned).collect();
            match &value.value {
                Value::Map(ops) => {
                    if ops.is_empty() {
                        self.fail(value, &key_path, "expected a value or operators");
                    }
                    for (op, operand) in ops {
                        if let Some(test) = self.test(op, operand, &join(&key_path, op)) {
                            conditions.push(PropertyCondition {
                                path: property.clone(),
                                test,
                            });
                        }
                    }
                }
                Value::Seq(_) => {
                    if let Some(test) = self.test("in", value, &key_path) {
                        conditions.push(PropertyCondition {
                            path: property,
                            test,
                        });
                    }
                }
                _ => conditions.push(PropertyCondition {
                    path: property,
                    test: PropertyTest::Eq(value.to_json()),
                }),
            }
        }
        conditions
    }

    /// One `operator: operand` pair.
    fn test(&mut self, op: &str, node: &Node, path: &str) -> Option<PropertyTest> {
        let json = node.to_json();
        let single = json.is_object() || json.is_array();
        match op {
            "eq" | "neq" | "contains" => {
                if single {
                    self.fail(node, path, "expected a single value");
                    return None;
                }
                Some(match op {
                    "eq" => PropertyTest::Eq(json),
                    "neq" => PropertyTest::Neq(json),
                    _ => PropertyTest::Contains(json),
                })
            }
            "in" | "not_in" => {
                let list = match json {
                    serde_json::Value::Array(items)
                        if !items.is_empty()
                            && items.iter().all(|i| !i.is_object() && !i.is_array()) =>
                    {
                        items
                    }
                    _ => {
                        self.fail(node, path, "expected a non-empty list of values");
                        return None;
                    }
                };
                Some(if op == "in" {
                    PropertyTest::In(list)
                } else {
                    PropertyTest::NotIn(list)
                })
            }
            "gt" | "gte" | "lt" | "lte" => {
                let Some(number) = json.as_f64().filter(|n| json.is_number() && n.is_finite())
                else {
                    self.fail(node, path, "expected a number");
                    return None;
                };
                Some(match op {
                    "gt" => PropertyTest::Gt(number),
                    "gte" => PropertyTest::Gte(number),
                    "lt" => PropertyTest::Lt(number),
                    _ => PropertyTest::Lte(number),
                })
            }
            "exists" => match json {
                serde_json::Value::Bool(flag) => Some(PropertyTest::Exists(flag)),
                _ => {
                    self.fail(node, path, "expected true or false");
                    None
                }
            },
            _ => {
                self.fail(
                    node,
                    path,
                    format!("unknown operator; expected one of {}", OPERATORS.join(", ")),
                );
                None
            }
        }
    }

    /// `event:` and `where:` of a mapping (the caller checks the other keys).
    fn event_match(&mut self, node: &Node, path: &str) -> Option<EventMatch> {
        let name_node = self.required(node, path, "event", ": the event's name")?;
        let event = self.checked(name_node, &join(path, "event"), check_event_name);
        let conditions = match node.get("where") {
            Some(filter) => self.conditions(filter, &join(path, "where")),
            None => Vec::new(),
        };
        Some(EventMatch {
            event: event?,
            conditions,
        })
    }

    /// `conversion:` — its rules are checked by [`conversion_issues`], through `spots`.
    fn conversion(&mut self, node: &Node, path: &str, spots: &mut Spots) -> Option<Conversion> {
        self.map(node, path, "{ event: NAME, where: {...}, within: 72h }")?;
        self.unknown_keys(node, path, &["event", "where", "within"]);
        spots.note("conversion", path, node);
        let event = match node.get("event") {
            Some(name) => {
                spots.note("conversion.event", &join(path, "event"), name);
                self.text(name, &join(path, "event"))
            }
            None => Some(DEFAULT_CONVERSION_EVENT.to_owned()),
        };
        let conditions = match node.get("where") {
            Some(filter) => self.conditions(filter, &join(path, "where")),
            None => Vec::new(),
        };
        let within_secs = match node.get("within") {
            Some(within) => {
                spots.note("conversion.within", &join(path, "within"), within);
                self.duration(within, &join(path, "within"))
            }
            None => Some(DEFAULT_ATTRIBUTION_SECS),
        };
        Some(Conversion {
            goal: EventMatch {
                event: event?,
                conditions,
            },
            within_secs: within_secs?,
        })
    }

    // -- flows -------------------------------------------------------------------------

    fn flow(&mut self, root: &Node) -> Option<FlowDef> {
        self.map(
            root,
            "",
            "a flow document (a mapping starting with `kind: Flow`)",
        )?;
        if !self.kind(root, "Flow") {
            return None;
        }
        self.unknown_keys(root, "", FLOW_KEYS);
        let name = self
            .required(root, "", "name", "")
            .and_then(|node| self.checked(node, "name", check_name));
        let description = self.description(root);
        let trigger = self
            .required(
                root,
                "",
                "trigger",
                ": what starts a journey, e.g. { event: cart_updated }",
            )
            .and_then(|node| self.trigger(node, "trigger"));
        let exit_when = match root.get("exit_when") {
            Some(node) => self
                .map(node, "exit_when", "{ event: NAME, where: {...} }")
                .and_then(|_| {
                    self.unknown_keys(node, "exit_when", &["event", "where"]);
                    self.event_match(node, "exit_when")
                })
                .map(Some),
            None => Some(None),
        };
        let mut spots = Spots::new("", root);
        let before = self.problems.len();
        let conversion = match root.get("conversion") {
            Some(node) => self.conversion(node, "conversion", &mut spots),
            None => Some(Conversion::default()),
        };
        if let Some(conversion) = &conversion {
            let mut issues = Vec::new();
            conversion_issues(conversion, &mut issues);
            self.report(&spots, issues, before);
        }
        let re_entry = match root.get("re_entry") {
            Some(node) => self.re_entry(node, "re_entry"),
            None => Some(ReEntry::Never),
        };
        let audience = match root.get("audience") {
            Some(node) => self.audience(node, "audience"),
            None => Some(Audience::default()),
        };
        let control_group_percent = match root.get("control_group") {
            Some(node) => {
                self.percent(node, "control_group")
                    .and_then(|percent| match check_control_percent(percent) {
                        Ok(()) => Some(percent),
                        Err(reason) => {
                            self.fail(node, "control_group", reason);
                            None
                        }
                    })
            }
            None => Some(0.0),
        };
        let topic = match root.get("topic") {
            Some(node) => self.checked(node, "topic", check_topic),
            None => Some(DEFAULT_TOPIC.to_owned()),
        };
        let steps = self
            .required(root, "", "steps", ": the list of what the flow does")
            .and_then(|node| self.flow_steps(node));
        Some(FlowDef {
            name: name?,
            description,
            trigger: trigger?,
            exit_when: exit_when?,
            conversion: conversion?,
            re_entry: re_entry?,
            audience: audience?,
            control_group_percent: control_group_percent?,
            topic: topic?,
            steps: steps?,
        })
    }

    fn trigger(&mut self, node: &Node, path: &str) -> Option<Trigger> {
        self.map(
            node,
            path,
            "{ event: NAME }, { segment_entered: SEGMENT } or { schedule: CRON, segment: SEGMENT }",
        )?;
        match self.one_of(node, path, &["event", "segment_entered", "schedule"])? {
            "event" => {
                self.unknown_keys(node, path, &["event", "where"]);
                self.event_match(node, path).map(Trigger::Event)
            }
            "segment_entered" => {
                self.unknown_keys(node, path, &["segment_entered"]);
                let segment = node.get("segment_entered")?;
                let segment = self.checked(segment, &join(path, "segment_entered"), check_name)?;
                Some(Trigger::SegmentEntered { segment })
            }
            _ => {
                self.unknown_keys(node, path, &["schedule", "segment", "local_time"]);
                let cron_path = join(path, "schedule");
                let cron_node = node.get("schedule")?;
                let cron =
                    self.text(cron_node, &cron_path)
                        .and_then(|cron| match Cron::parse(&cron) {
                            Ok(_) => Some(cron),
                            Err(reason) => {
                                self.fail(cron_node, &cron_path, reason);
                                None
                            }
                        });
                let segment = self
                    .required(
                        node,
                        path,
                        "segment",
                        ": whose journeys start at each occurrence",
                    )
                    .and_then(|segment| self.checked(segment, &join(path, "segment"), check_name));
                let local_time = match node.get("local_time") {
                    Some(flag) => self.flag(flag, &join(path, "local_time")),
                    None => Some(false),
                };
                Some(Trigger::Schedule {
                    cron: cron?,
                    segment: segment?,
                    local_time: local_time?,
                })
            }
        }
    }

    fn re_entry(&mut self, node: &Node, path: &str) -> Option<ReEntry> {
        const EXPECTED: &str = "expected `never`, `always` or { after: 7d }";
        match &node.value {
            Value::Scalar { text, .. } if text == "never" => Some(ReEntry::Never),
            Value::Scalar { text, .. } if text == "always" => Some(ReEntry::Always),
            Value::Map(_) => {
                self.unknown_keys(node, path, &["after", "always"]);
                match self.one_of(node, path, &["after", "always"])? {
                    "after" => {
                        let after = node.get("after")?;
                        let secs = self.duration(after, &join(path, "after"))?;
                        Some(ReEntry::After { secs })
                    }
                    _ => {
                        let always = node.get("always")?;
                        let always = self.flag(always, &join(path, "always"))?;
                        Some(if always {
                            ReEntry::Always
                        } else {
                            ReEntry::Never
                        })
                    }
                }
            }
            _ => {
                self.fail(node, path, EXPECTED);
                None
            }
        }
    }

    fn audience(&mut self, node: &Node, path: &str) -> Option<Audience> {
        self.map(node, path, "{ segment: SEGMENT, exclude: [SEGMENT, …] }")?;
        self.unknown_keys(node, path, &["segment", "exclude", "exclude_segments"]);
        let segment = match node.get("segment") {
            Some(segment) => self
                .checked(segment, &join(path, "segment"), check_name)
                .map(Some),
            None => Some(None),
        };
        let mut exclude_segments = Some(Vec::new());
        if node.get("exclude").is_some() && node.get("exclude_segments").is_some() {
            self.fail(
                node,
                path,
                "use one of `exclude` and `exclude_segments`, not both",
            );
            exclude_segments = None;
        }
        for key in ["exclude", "exclude_segments"] {
            let Some(list) = node.get(key) else { continue };
            let list_path = join(path, key);
            let names = self.names(list, &list_path);
            if names.len() > MAX_EXCLUDE_SEGMENTS {
                self.fail(
                    list,
                    &list_path,
                    format!("at most {MAX_EXCLUDE_SEGMENTS} segments"),
                );
            }
            let mut checked = Vec::new();
            for (name, item, item_path) in names {
                match check_name(&name) {
                    Ok(()) => checked.push(name),
                    Err(reason) => self.fail(item, &item_path, reason),
                }
            }
            if let Some(all) = &mut exclude_segments {
                *all = checked;
            }
        }
        Some(Audience {
            segment: segment?,
            exclude_segments: exclude_segments?,
        })
    }

    /// A list of names (or a single one), each with its node and path.
    fn names<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(String, &'n Node, String)> {
        let mut names = Vec::new();
        let items: Vec<(&Node, String)> = match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (item, format!("{path}[{i}]")))
                .collect(),
            Value::Scalar { .. } => vec![(node, path.to_owned())],
            _ => {
                self.fail(
                    node,
                    path,
                    format!("expected a list of names, found {}", node.kind()),
                );
                return names;
            }
        };
        for (item, item_path) in items {
            if let Some(name) = self.text(item, &item_path) {
                names.push((name, item, item_path));
            }
        }
        names
    }

    fn flow_steps(&mut self, node: &Node) -> Option<Vec<Step>> {
        let before = self.problems.len();
        let mut ids = HashMap::new();
        let drafts = self.steps(node, "steps", 0, &mut ids);
        if drafts.is_empty() && node.as_seq().is_some() && self.problems.len() == before {
            self.fail(node, "steps", "needs at least one step");
            return None;
        }
        let mut flat = Flat::default();
        flatten(&drafts, None, &mut flat);
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in flat.steps.iter().enumerate() {
            index.entry(step.id.as_str()).or_insert(i);
        }
        let mut targets = Vec::new();
        for (at, target, spot) in &flat.gotos {
            match index.get(target) {
                Some(&to) => targets.push((*at, to)),
                None => self
                    .problems
                    .push(spot.problem(format!("no step has the id `{target}`"))),
            }
        }
        let mut steps = flat.steps;
        for (at, to) in targets {
            steps[at].kind = StepKind::Goto { target: to };
        }
        if self.problems.len() > before {
            return None;
        }
        for (at, reason) in endless(&steps) {
            self.problems.push(flat.spots[at].problem(reason));
        }
        if self.problems.len() > before {
            return None;
        }
        Some(steps)
    }

    /// A list of steps (`steps`, `then`, `else`, `on_timeout`).
    fn steps<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        depth: usize,
        ids: &mut HashMap<String, String>,
    ) -> Vec<Draft<'n>> {
        let mut drafts = Vec::new();
        if depth > MAX_DEPTH {
            self.fail(
                node,
                path,
                format!("steps nested deeper than {MAX_DEPTH} levels"),
            );
            return drafts;
        }
        let Some(items) = node.as_seq() else {
            self.fail(
                node,
                path,
                format!("expected a list of steps, found {}", node.kind()),
            );
            return drafts;
        };
        for (i, item) in items.iter().enumerate() {
            if let Some(draft) = self.step(item, format!("{path}[{i}]"), depth, ids) {
                drafts.push(draft);
            }
        }
        drafts
    }

    fn step<'n>(
        &mut self,
        item: &'n Node,
        path: String,
        depth: usize,
        ids: &mut HashMap<String, String>,
    ) -> Option<Draft<'n>> {
        if item.as_str() == Some("exit") {
            return Some(Draft {
                path,
                node: item,
                id: None,
                summary: "exit".to_owned(),
                shape: Shape::Leaf(Some(StepKind::Exit)),
            });
        }
        if item.as_map().is_none() {
            self.fail(
                item,
                &path,
                format!(
                    "expected a step such as `wait: 24h`, `send: {{ … }}` or `exit`, found {}",
                    item.kind()
                ),
            );
            return None;
        }
        let mut allowed = STEP_KEYS.to_vec();
        allowed.push("id");
        self.unknown_keys(item, &path, &allowed);
        let id = match item.get("id") {
            Some(node) => {
                let id_path = join(&path, "id");
                let id = self.checked(node, &id_path, check_step_id);
                if let Some(id) = &id {
                    match ids.get(id) {
                        Some(first) => {
                            let reason = format!("the id `{id}` is already used by {first}");
                            self.fail(node, &id_path, reason);
                        }
                        None => {
                            ids.insert(id.clone(), path.clone());
                        }
                    }
                }
                id
            }
            None => None,
        };
        // A step that cannot be read keeps its place (and its id, for gotos).
        let unreadable = |path: String, id: Option<String>| Draft {
            path,
            node: item,
            id,
            summary: String::new(),
            shape: Shape::Leaf(None),
        };
        let Some(key) = self.one_of(item, &path, STEP_KEYS) else {
            return Some(unreadable(path, id));
        };
        let Some(body) = item.get(key) else {
            return Some(unreadable(path, id));
        };
        let body_path = join(&path, key);
        let (summary, shape) = match key {
            "wait" => self.wait(body, &body_path, depth, ids),
            "send" => {
                let send = self.send(body, &body_path);
                let summary = send.as_ref().map(send_summary).unwrap_or_default();
                (summary, Shape::Leaf(send.map(StepKind::Send)))
            }
            "branch" => self.branch(body, &body_path, depth, ids),
            "update" => {
                let set = self.update(body, &body_path);
                // The attributes in document order (the map sorts them).
                let keys: Vec<&str> = body
                    .get("set")
                    .and_then(Node::as_map)
                    .unwrap_or(&[])
                    .iter()
                    .map(|(key, _)| key.as_str())
                    .collect();
                let summary = format!("update {}", keys.join(", "));
                (
                    summary,
                    Shape::Leaf(set.map(|set| StepKind::Update { set })),
                )
            }
            "exit" => {
                let empty = match &body.value {
                    Value::Null => true,
                    Value::Map(entries) => entries.is_empty(),
                    _ => false,
                };
                if !empty {
                    self.fail(body, &body_path, "takes no settings: write `- exit`");
                }
                (
                    "exit".to_owned(),
                    Shape::Leaf(empty.then_some(StepKind::Exit)),
                )
            }
            _ => match self.text(body, &body_path) {
                Some(target) => (format!("goto {target}"), Shape::Goto { target, node: body }),
                None => (String::new(), Shape::Leaf(None)),
            },
        };
        Some(Draft {
            path,
            node: item,
            id,
            summary,
            shape,
        })
    }

    fn wait<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        depth: usize,
        ids: &mut HashMap<String, String>,
    ) -> (String, Shape<'n>) {
        const EXPECTED: &str = "expected a duration such as 24h, { until: \"18:00\" }, { until: best_time } or { event: NAME, timeout: 48h }";
        let failed = (String::new(), Shape::Leaf(None));
        if let Value::Scalar { .. } = node.value {
            return match self.duration(node, path) {
                Some(secs) => (
                    format!("wait {}", format_duration(secs)),
                    Shape::Leaf(Some(StepKind::Wait(Wait::For { secs }))),
                ),
                None => failed,
            };
        }
        if node.as_map().is_none() {
            self.fail(node, path, EXPECTED);
            return failed;
        }
        if node.get("event").is_some() {
            self.unknown_keys(node, path, &["event", "where", "timeout", "on_timeout"]);
            let event = self.event_match(node, path);
            let timeout = match node.get("timeout") {
                Some(timeout) => self.duration(timeout, &join(path, "timeout")),
                None => {
                    self.fail(
                        node,
                        &join(path, "timeout"),
                        "a wait for an event must have a timeout, or the journey could never end",
                    );
                    None
                }
            };
            let on_timeout = match node.get("on_timeout") {
                Some(list) => self.steps(list, &join(path, "on_timeout"), depth + 1, ids),
                None => Vec::new(),
            };
            let summary = match (&event, timeout) {
                (Some(event), Some(secs)) => {
                    format!(
                        "wait for {} (timeout {})",
                        event.event,
                        format_duration(secs)
                    )
                }
                _ => String::new(),
            };
            let wait = match (event, timeout) {
                (Some(event), Some(secs)) => Some((event, secs)),
                _ => None,
            };
            return (summary, Shape::WaitEvent { wait, on_timeout });
        }
        if let Some(until) = node.get("until") {
            let until_path = join(path, "until");
            if until.as_str() == Some("best_time") {
                self.unknown_keys(node, path, &["until", "within"]);
                let within = match node.get("within") {
                    Some(within) => {
                        let within_path = join(path, "within");
                        self.duration(within, &within_path).and_then(|secs| {
                            if (MIN_BEST_TIME_SECS..=MAX_BEST_TIME_SECS).contains(&secs) {
                                Some(secs)
                            } else {
                                self.fail(within, &within_path, "must be from 1h to 7d");
                                None
                            }
                        })
                    }
                    None => Some(DEFAULT_BEST_TIME_SECS),
                };
                return match within {
                    Some(within_secs) => (
                        format!(
                            "wait until best time within {}",
                            format_duration(within_secs)
                        ),
                        Shape::Leaf(Some(StepKind::Wait(Wait::BestTime { within_secs }))),
                    ),
                    None => failed,
                };
            }
            self.unknown_keys(node, path, &["until"]);
            let Some((hour, minute)) = until.as_str().and_then(parse_clock) else {
                self.fail(
                    until,
                    &until_path,
                    "expected a time of day such as \"18:00\", or best_time",
                );
                return failed;
            };
            return (
                format!("wait until {hour:02}:{minute:02} local"),
                Shape::Leaf(Some(StepKind::Wait(Wait::UntilLocalTime { hour, minute }))),
            );
        }
        if let Some(duration) = node.get("for") {
            self.unknown_keys(node, path, &["for"]);
            return match self.duration(duration, &join(path, "for")) {
                Some(secs) => (
                    format!("wait {}", format_duration(secs)),
                    Shape::Leaf(Some(StepKind::Wait(Wait::For { secs }))),
                ),
                None => failed,
            };
        }
        self.fail(node, path, EXPECTED);
        failed
    }

    fn send(&mut self, node: &Node, path: &str) -> Option<Send> {
        self.map(node, path, "{ channel: CHANNEL, template: NAME }")?;
        let before = self.problems.len();
        self.unknown_keys(node, path, SEND_KEYS);
        let mut spots = Spots::new(path, node);
        let parts = self.send_parts(node, path, &mut spots);
        let topic = match node.get("topic") {
            Some(topic) => {
                spots.note("topic", &join(path, "topic"), topic);
                self.text(topic, &join(path, "topic"))
            }
            None => None,
        };
        let send = Send {
            channels: parts.channels,
            template: parts.template,
            variants: parts.variants,
            topic,
            data: parts.data,
        };
        let mut issues = Vec::new();
        send_issues(
            &SendFields {
                channels: &send.channels,
                template: send.template.as_deref(),
                variants: &send.variants,
                topic: send.topic.as_deref(),
                data: &send.data,
            },
            &mut issues,
        );
        self.report(&spots, issues, before);
        Some(send)
    }

    /// The channels, template, variants and data of a send step or a broadcast, read as
    /// written; their rules are checked on the result ([`send_issues`]).
    fn send_parts(&mut self, node: &Node, path: &str, spots: &mut Spots) -> SendParts {
        let mut parts = SendParts::default();
        let channel_key = match (node.get("channel"), node.get("channels")) {
            (Some(_), Some(channels)) => {
                let reason = "use one of `channel` and `channels`, not both";
                self.fail(channels, &join(path, "channels"), reason);
                None
            }
            (Some(_), None) => Some("channel"),
            (None, Some(_)) => Some("channels"),
            (None, None) => {
                spots.note("channels", &join(path, "channel"), node);
                None
            }
        };
        if let Some(key) = channel_key
            && let Some(channels) = node.get(key)
        {
            let channels_path = join(path, key);
            spots.note("channels", &channels_path, channels);
            parts.channels = self.channels(channels, &channels_path);
        }
        if let Some(template) = node.get("template") {
            let template_path = join(path, "template");
            spots.note("template", &template_path, template);
            parts.template = self.text(template, &template_path);
        }
        if let Some(variants) = node.get("variants") {
            let variants_path = join(path, "variants");
            spots.note("variants", &variants_path, variants);
            match variants.as_seq() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let variant =
                            self.variant(item, &format!("{variants_path}[{i}]"), i, spots);
                        parts.variants.push(variant);
                    }
                }
                None => self.fail(
                    variants,
                    &variants_path,
                    "expected a list such as [ { name: A, weight: 50, template: … }, … ]",
                ),
            }
        }
        if let Some(data) = node.get("data") {
            let data_path = join(path, "data");
            spots.note("data", &data_path, data);
            match data.to_json() {
                serde_json::Value::Object(map) => parts.data = map,
                serde_json::Value::Null => {}
                _ => self.fail(data, &data_path, "expected a mapping of template variables"),
            }
        }
        parts
    }

    /// One variant, as far as it can be read (the list keeps its indices either way).
    fn variant(&mut self, node: &Node, path: &str, i: usize, spots: &mut Spots) -> Variant {
        let field = format!("variants[{i}]");
        spots.note(field.clone(), path, node);
        let mut variant = Variant {
            name: String::new(),
            weight: 0,
            template: String::new(),
            channels: Vec::new(),
        };
        if self
            .map(node, path, "{ name: A, weight: 50, template: NAME }")
            .is_none()
        {
            return variant;
        }
        self.unknown_keys(node, path, VARIANT_KEYS);
        match node.get("name") {
            Some(name) => {
                spots.note(format!("{field}.name"), &join(path, "name"), name);
                variant.name = self.text(name, &join(path, "name")).unwrap_or_default();
            }
            None => self.fail(node, &join(path, "name"), "is required (e.g. A)"),
        }
        match node.get("weight") {
            Some(weight) => {
                let weight_path = join(path, "weight");
                spots.note(format!("{field}.weight"), &weight_path, weight);
                match weight.to_json().as_i64() {
                    // Out of range is a rule, checked with the others.
                    Some(n) => variant.weight = u32::try_from(n).unwrap_or(0),
                    None => self.fail(
                        weight,
                        &weight_path,
                        format!("must be a whole number from 1 to {MAX_WEIGHT}"),
                    ),
                }
            }
            None => self.fail(
                node,
                &join(path, "weight"),
                format!("is required: a whole number from 1 to {MAX_WEIGHT}"),
            ),
        }
        match node.get("template") {
            Some(template) => {
                spots.note(
                    format!("{field}.template"),
                    &join(path, "template"),
                    template,
                );
                variant.template = self
                    .text(template, &join(path, "template"))
                    .unwrap_or_default();
            }
            None => self.fail(node, &join(path, "template"), "is required"),
        }
        for key in ["channel", "channels"] {
            if let Some(channels) = node.get(key) {
                let channels_path = join(path, key);
                spots.note(format!("{field}.channels"), &channels_path, channels);
                variant.channels = self.channels(channels, &channels_path);
            }
        }
        variant
    }

    /// `push` or `[push, email]`.
    fn channels(&mut self, node: &Node, path: &str) -> Vec<ChannelName> {
        let mut channels = Vec::new();
        for (name, item, item_path) in self.names(node, path) {
            match ChannelName::parse(&name) {
                Some(channel) => channels.push(channel),
                None => {
                    let known: Vec<&str> = ChannelName::ALL.iter().map(|c| c.as_str()).collect();
                    self.fail(
                        item,
                        &item_path,
                        format!(
                            "unknown channel `{name}`; expected one of {}",
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        channels
    }

    fn branch<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        depth: usize,
        ids: &mut HashMap<String, String>,
    ) -> (String, Shape<'n>) {
        let failed = (String::new(), Shape::Leaf(None));
        if self
            .map(
                node,
                path,
                "{ if: CONDITION, then: [steps], else: [steps] }",
            )
            .is_none()
        {
            return failed;
        }
        self.unknown_keys(node, path, &["if", "then", "else"]);
        let condition = self
            .required(node, path, "if", ": the condition, e.g. { segment: vip }")
            .and_then(|condition| self.condition(condition, &join(path, "if")));
        let then = match node.get("then") {
            Some(list) => self.steps(list, &join(path, "then"), depth + 1, ids),
            None => Vec::new(),
        };
        let otherwise = match node.get("else") {
            Some(list) => self.steps(list, &join(path, "else"), depth + 1, ids),
            None => Vec::new(),
        };
        let no_steps = |key: &str| {
            node.get(key)
                .and_then(Node::as_seq)
                .is_none_or(|items| items.is_empty())
        };
        if no_steps("then") && no_steps("else") {
            self.fail(node, path, "needs steps in `then` or `else`");
        }
        let summary = condition
            .as_ref()
            .map(|(_, summary)| summary.clone())
            .unwrap_or_default();
        (
            summary,
            Shape::Branch {
                condition: condition.map(|(condition, _)| condition),
                then,
                otherwise,
            },
        )
    }

    /// A branch's `if:`, with its summary.
    fn condition(&mut self, node: &Node, path: &str) -> Option<(BranchCondition, String)> {
        self.map(node, path, "a condition such as { segment: vip }")?;
        let kinds = ["event", "attribute", "trait", "segment", "random"];
        match self.one_of(node, path, &kinds)? {
            "event" => {
                self.unknown_keys(node, path, &["event", "where", "within"]);
                let event = self.event_match(node, path);
                let within = self
                    .required(node, path, "within", ": how far back to look, e.g. 72h")
                    .and_then(|within| self.duration(within, &join(path, "within")));
                let (event, within_secs) = (event?, within?);
                let summary = format!(
                    "branch: {} within {}",
                    event.event,
                    format_duration(within_secs)
                );
                Some((BranchCondition::Event { event, within_secs }, summary))
            }
            "segment" => {
                self.unknown_keys(node, path, &["segment"]);
                let segment = node.get("segment")?;
                let segment = self.checked(segment, &join(path, "segment"), check_name)?;
                let summary = format!("branch: segment {segment}");
                Some((BranchCondition::Segment { segment }, summary))
            }
            "random" => {
                self.unknown_keys(node, path, &["random"]);
                let random = node.get("random")?;
                let random_path = join(path, "random");
                let percent = self.percent(random, &random_path)?;
                if percent <= 0.0 || percent >= 100.0 {
                    self.fail(
                        random,
                        &random_path,
                        "must be between 0 and 100 %, both excluded",
                    );
                    return None;
                }
                let summary = format!("branch: random {percent}%");
                Some((BranchCondition::Random { percent }, summary))
            }
            source => {
                let source_node = node.get(source)?;
                let source_path = join(path, source);
                let property = self.text(source_node, &source_path)?;
                if !valid_path(&property) {
                    self.fail(
                        source_node,
                        &source_path,
                        "must be a dotted property path such as city or address.city",
                    );
                    return None;
                }
                let mut tests = Vec::new();
                for (key, value) in node.as_map().unwrap_or(&[]) {
                    if key == source {
                        continue;
                    }
                    if let Some(test) = self.test(key, value, &join(path, key)) {
                        tests.push(test);
                    }
                }
                let operators = node.as_map().map_or(0, |entries| entries.len() - 1);
                if operators != 1 {
                    self.fail(
                        node,
                        path,
                        format!(
                            "needs exactly one operator ({}), e.g. {{ {source}: city, eq: Oran }}",
                            OPERATORS.join(", ")
                        ),
                    );
                    return None;
                }
                let test = tests.pop()?;
                let summary = format!("branch: {source} {property}");
                let condition = PropertyCondition {
                    path: property.split('.').map(str::to_owned).collect(),
                    test,
                };
                Some(if source == "trait" {
                    (BranchCondition::Trait(condition), summary)
                } else {
                    (BranchCondition::Attribute(condition), summary)
                })
            }
        }
    }

    fn update(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        self.map(node, path, "{ set: { attribute: value } }")?;
        self.unknown_keys(node, path, &["set"]);
        let set_node = self.required(node, path, "set", ": the attributes to set")?;
        let set_path = join(path, "set");
        let entries = self.map(set_node, &set_path, "a mapping of attributes to values")?;
        if entries.is_empty() {
            self.fail(set_node, &set_path, "needs at least one attribute");
            return None;
        }
        let mut set = serde_json::Map::new();
        let mut ok = true;
        for (key, value) in entries {
            if let Err(reason) = check_attribute_key(key) {
                self.fail(value, &join(&set_path, key), reason);
                ok = false;
                continue;
            }
            set.insert(key.clone(), value.to_json());
        }
        ok.then_some(set)
    }

    // -- broadcasts --------------------------------------------------------------------

    fn broadcast(&mut self, root: &Node) -> Option<BroadcastDef> {
        self.map(
            root,
            "",
            "a broadcast document (a mapping starting with `kind: Broadcast`)",
        )?;
        if !self.kind(root, "Broadcast") {
            return None;
        }
        self.unknown_keys(root, "", BROADCAST_KEYS);
        // Read as written; the rules are checked on the result, as for a structured spec.
        let mut spots = Spots::new("", root);
        let text_at = |reader: &mut Reader, key: &str, spots: &mut Spots| -> String {
            match root.get(key) {
                Some(node) if !matches!(node.value, Value::Null) => {
                    spots.note(key, key, node);
                    reader.text(node, key).unwrap_or_default()
                }
                _ => String::new(),
            }
        };
        let name = text_at(self, "name", &mut spots);
        let description = text_at(self, "description", &mut spots);
        let segment = text_at(self, "segment", &mut spots);
        let mut exclude_segments = Vec::new();
        if root.get("exclude").is_some() && root.get("exclude_segments").is_some() {
            self.fail(
                root,
                "exclude",
                "use one of `exclude` and `exclude_segments`, not both",
            );
        }
        for key in ["exclude", "exclude_segments"] {
            let Some(list) = root.get(key) else { continue };
            spots.note("exclude_segments", key, list);
            exclude_segments.clear();
            for (i, (name, item, item_path)) in self.names(list, key).into_iter().enumerate() {
                spots.note(format!("exclude_segments[{i}]"), &item_path, item);
                exclude_segments.push(name);
            }
        }
        let parts = self.send_parts(root, "", &mut spots);
        let topic = match root.get("topic") {
            Some(node) => {
                spots.note("topic", "topic", node);
                self.text(node, "topic").unwrap_or_default()
            }
            None => DEFAULT_TOPIC.to_owned(),
        };
        let schedule = match root.get("schedule") {
            Some(node) => self.broadcast_schedule(node, "schedule", &mut spots),
            None => Some(BroadcastSchedule::Now),
        };
        let control_group_percent = match root.get("control_group") {
            Some(node) => {
                spots.note("control_group_percent", "control_group", node);
                self.percent(node, "control_group").unwrap_or(0.0)
            }
            None => 0.0,
        };
        let max_sends_per_second = match root.get("max_sends_per_second") {
            Some(node) => {
                let rate = node
                    .to_json()
                    .as_u64()
                    .and_then(|rate| u32::try_from(rate).ok());
                if rate.is_none() {
                    self.fail(
                        node,
                        "max_sends_per_second",
                        "expected a whole number of sends per second (0: only the channel's limit)",
                    );
                }
                rate.unwrap_or(0)
            }
            None => 0,
        };
        let conversion = match root.get("conversion") {
            Some(node) => self.conversion(node, "conversion", &mut spots),
            None => Some(Conversion::default()),
        };
        let flag_at = |reader: &mut Reader, key: &str| -> bool {
            match root.get(key) {
                Some(node) => reader.flag(node, key).unwrap_or(false),
                None => false,
            }
        };
        let ignore_frequency_caps = flag_at(self, "ignore_frequency_caps");
        let ignore_quiet_hours = flag_at(self, "ignore_quiet_hours");
        let def = BroadcastDef {
            name,
            description,
            segment,
            exclude_segments,
            channels: parts.channels,
            template: parts.template,
            variants: parts.variants,
            topic,
            schedule: schedule.unwrap_or(BroadcastSchedule::Now),
            control_group_percent,
            max_sends_per_second,
            conversion: conversion.unwrap_or_default(),
            ignore_frequency_caps,
            ignore_quiet_hours,
            data: parts.data,
        };
        let issues = broadcast_issues(&def);
        self.report(&spots, issues, 0);
        Some(def)
    }

    fn broadcast_schedule(
        &mut self,
        node: &Node,
        path: &str,
        spots: &mut Spots,
    ) -> Option<BroadcastSchedule> {
        const EXPECTED: &str = "expected `now`, { at: TIMESTAMP }, { local_time: \"2026-03-01 18:00\" } or { cron: \"0 18 1 * *\" }";
        spots.note("schedule", path, node);
        if node.as_str() == Some("now") {
            return Some(BroadcastSchedule::Now);
        }
        if node.as_map().is_none() {
            self.fail(node, path, EXPECTED);
            return None;
        }
        if let Some(cron) = node.get("cron") {
            self.unknown_keys(node, path, &["cron", "local_time", "starts_at", "ends_at"]);
            spots.note("schedule.recurring.cron", &join(path, "cron"), cron);
            let cron = self.text(cron, &join(path, "cron"));
            let local_time = match node.get("local_time") {
                Some(flag) => self.flag(flag, &join(path, "local_time")),
                None => Some(false),
            };
            let mut instant = |reader: &mut Reader, key: &str| -> Option<Option<DateTime<Utc>>> {
                let Some(at) = node.get(key) else {
                    return Some(None);
                };
                spots.note(format!("schedule.recurring.{key}"), &join(path, key), at);
                reader.timestamp(at, &join(path, key)).map(Some)
            };
            let starts_at = instant(self, "starts_at");
            let ends_at = instant(self, "ends_at");
            return Some(BroadcastSchedule::Recurring {
                cron: cron?,
                local_time: local_time?,
                starts_at: starts_at?,
                ends_at: ends_at?,
            });
        }
        if let Some(at) = node.get("at") {
            self.unknown_keys(node, path, &["at"]);
            spots.note("schedule.send_at", &join(path, "at"), at);
            return self
                .timestamp(at, &join(path, "at"))
                .map(BroadcastSchedule::At);
        }
        if ["local_time", "date", "time"]
            .iter()
            .any(|key| node.get(key).is_some())
        {
            self.unknown_keys(node, path, &["local_time", "date", "time", "skip_if_past"]);
            let skip_if_past = match node.get("skip_if_past") {
                Some(flag) => self.flag(flag, &join(path, "skip_if_past")),
                None => Some(false),
            };
            let when = match (node.get("local_time"), node.get("date"), node.get("time")) {
                (Some(local), None, None) => {
                    let local_path = join(path, "local_time");
                    spots.note("schedule.local_time.time", &local_path, local);
                    let read = local.as_str().and_then(|text| {
                        let (date, time) = text.trim().split_once([' ', 'T'])?;
                        let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
                        Some((date, parse_clock(time.trim())?))
                    });
                    if read.is_none() {
                        self.fail(
                            local,
                            &local_path,
                            "expected a local date and time such as \"2026-03-01 18:00\"",
                        );
                    }
                    read
                }
                (None, Some(date), Some(time)) => {
                    spots.note("schedule.local_time.date", &join(path, "date"), date);
                    spots.note("schedule.local_time.time", &join(path, "time"), time);
                    let day = date
                        .as_str()
                        .and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok());
                    if day.is_none() {
                        self.fail(
                            date,
                            &join(path, "date"),
                            "expected a date such as 2026-03-01",
                        );
                    }
                    let clock = self.clock(time, &join(path, "time"));
                    day.zip(clock)
                }
                _ => {
                    self.fail(
                        node,
                        path,
                        "give `local_time: \"2026-03-01 18:00\"`, or both `date` and `time`",
                    );
                    None
                }
            };
            let ((date, (hour, minute)), skip_if_past) = (when?, skip_if_past?);
            return Some(BroadcastSchedule::LocalTime {
                date,
                hour,
                minute,
                skip_if_past,
            });
        }
        self.fail(node, path, EXPECTED);
        None
    }
}

/// Channels, template, variants and data as read from a document.
#[derive(Default)]
struct SendParts {
    channels: Vec<ChannelName>,
    template: Option<String>,
    variants: Vec<Variant>,
    data: serde_json::Map<String, serde_json::Value>,
}

/// One line for people: `send push→email: cart-3`, `send push: A cart-2a 50 / B cart-2b 50`.
fn send_summary(send: &Send) -> String {
    let channels: Vec<&str> = send.channels.iter().map(|c| c.as_str()).collect();
    let what = match &send.template {
        Some(template) => template.clone(),
        None => {
            let arms: Vec<String> = send
                .variants
                .iter()
                .map(|v| format!("{} {} {}", v.name, v.template, v.weight))
                .collect();
            arms.join(" / ")
        }
    };
    format!("send {}: {what}", channels.join("→"))
}

/// `18:00` or `9:30` → (hour, minute).
fn parse_clock(text: &str) -> Option<(u32, u32)> {
    let (hour, minute) = text.split_once(':')?;
    let digits = |part: &str, max_len: usize| {
        !part.is_empty() && part.len() <= max_len && part.chars().all(|c| c.is_ascii_digit())
    };
    if !digits(hour, 2) || !digits(minute, 2) || minute.len() != 2 {
        return None;
    }
    let (hour, minute) = (hour.parse::<u32>().ok()?, minute.parse::<u32>().ok()?);
    if hour > 23 || minute > 59 {
        return None;
    }
    Some((hour, minute))
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
        && path.len() <= MAX_PATH_CHARS
        && path.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        })
}

fn document_problem(reason: impl Into<String>) -> Problem {
    Problem {
        field: String::new(),
        reason: reason.into(),
        line: 0,
        column: 0,
    }
}

fn too_large(bytes: usize, max: usize) -> Problem {
    document_problem(format!(
        "the document is {bytes} bytes; at most {max} are accepted"
    ))
}

/// A JSON value as a document node without a position (line and column 0).
fn node_of_json(json: &serde_json::Value) -> Node {
    let value = match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Value::Scalar {
            text: json.to_string(),
            plain: true,
        },
        serde_json::Value::String(text) => Value::Scalar {
            text: text.clone(),
            plain: false,
        },
        serde_json::Value::Array(items) => Value::Seq(items.iter().map(node_of_json).collect()),
        serde_json::Value::Object(map) => Value::Map(
            map.iter()
                .map(|(key, value)| (key.clone(), node_of_json(value)))
                .collect(),
        ),
    };
    Node {
        value,
        line: 0,
        column: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A flow document with the given steps (indented as list items under `steps:`).
    fn flow_with(steps: &str) -> String {
        format!("kind: Flow\nname: test-flow\ntrigger: {{ event: cart_updated }}\nsteps:\n{steps}")
    }

    fn flow(text: &str) -> FlowDef {
        match parse_flow(text) {
            Ok(flow) => flow,
            Err(problems) => panic!("should parse:\n{}", yaml::describe(&problems)),
        }
    }

    /// Every problem as `field: reason`.
    fn problems(text: &str) -> Vec<String> {
        parse_flow(text)
            .expect_err("should be refused")
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect()
    }

    fn broadcast_problems(text: &str) -> Vec<String> {
        parse_broadcast(text)
            .expect_err("should be refused")
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect()
    }

    fn one_problem(text: &str) -> Problem {
        let mut found = parse_flow(text).expect_err("should be refused");
        assert_eq!(found.len(), 1, "{}", yaml::describe(&found));
        found.remove(0)
    }

    const ARCHITECTURE_EXAMPLE: &str =
        include_str!("../../../../examples/flows/abandoned-cart.yaml");

    #[test]
    fn durations_read_and_write() {
        assert_eq!(parse_duration_secs("90s"), Some(90));
        assert_eq!(parse_duration_secs("15m"), Some(900));
        assert_eq!(parse_duration_secs("1h"), Some(3600));
        assert_eq!(parse_duration_secs("7d"), Some(7 * 86_400));
        assert_eq!(parse_duration_secs("2w"), Some(14 * 86_400));
        assert_eq!(parse_duration_secs("1h30m"), Some(5400));
        assert_eq!(parse_duration_secs("1d12h"), Some(129_600));
        assert_eq!(parse_duration_secs(" 72h "), Some(259_200));
        for bad in [
            "",
            "90",
            "0s",
            "0h0m",
            "-1h",
            "1x",
            "h",
            "1h30",
            "30m1h",
            "1h1h",
            "1.5h",
            "1 h",
            "99999999999999999999d",
            "5000w",
        ] {
            assert_eq!(parse_duration_secs(bad), None, "{bad:?}");
        }
        assert_eq!(format_duration(86_400), "1d");
        assert_eq!(format_duration(259_200), "3d");
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(90), "1m30s");
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(129_600), "1d12h");
        assert_eq!(format_duration(604_800), "1w");
        assert_eq!(format_duration(30 * 86_400), "30d");
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(-90), "-1m30s");
        for secs in [
            1,
            59,
            61,
            3599,
            3661,
            86_401,
            90_061,
            30 * 86_400,
            14 * 86_400,
        ] {
            assert_eq!(parse_duration_secs(&format_duration(secs)), Some(secs));
        }
    }

    #[test]
    fn names() {
        assert!(check_name("abandoned-cart").is_ok());
        assert!(check_name("a").is_ok());
        assert!(check_name("lapsed-30d").is_ok());
        assert_eq!(check_name(""), Err("is required".to_owned()));
        for bad in [
            "Cart",
            "1cart",
            "-cart",
            "cart_1",
            "cart 1",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn reads_the_architecture_example() {
        let flow = flow(ARCHITECTURE_EXAMPLE);
        assert_eq!(flow.name, "abandoned-cart");
        assert_eq!(
            flow.trigger,
            Trigger::Event(EventMatch {
                event: "cart_updated".to_owned(),
                conditions: Vec::new()
            })
        );
        assert_eq!(
            flow.exit_when.as_ref().map(|e| e.event.as_str()),
            Some("order_completed")
        );
        assert_eq!(flow.conversion, Conversion::default());
        assert_eq!(flow.re_entry, ReEntry::After { secs: 7 * 86_400 });
        assert_eq!(flow.control_group_percent, 10.0);
        assert_eq!(flow.topic, "marketing");
        assert_eq!(flow.audience, Audience::default());
        let summaries: Vec<(&str, &str, Option<usize>)> = flow
            .steps
            .iter()
            .map(|s| (s.id.as_str(), s.summary.as_str(), s.next))
            .collect();
        assert_eq!(
            summaries,
            vec![
                ("steps[0]", "wait 1h", Some(1)),
                ("steps[1]", "send push: cart-1", Some(2)),
                ("steps[2]", "wait 1d", Some(3)),
                (
                    "steps[3]",
                    "send push: A cart-2a 50 / B cart-2b 50",
                    Some(4)
                ),
                ("steps[4]", "wait 2d", Some(5)),
                ("steps[5]", "branch: message_clicked within 3d", None),
                (
                    "steps[5].branch.then[0]",
                    "send whatsapp: cart-3-whatsapp",
                    None
                ),
                ("steps[5].branch.else[0]", "send push→email: cart-3", None),
            ]
        );
        let StepKind::Branch {
            condition,
            then_to,
            else_to,
        } = &flow.steps[5].kind
        else {
            panic!("a branch expected")
        };
        assert_eq!((*then_to, *else_to), (Some(6), Some(7)));
        assert_eq!(
            condition,
            &BranchCondition::Event {
                event: EventMatch {
                    event: "message_clicked".to_owned(),
                    conditions: vec![PropertyCondition {
                        path: vec!["channel".to_owned()],
                        test: PropertyTest::Eq(json!("push")),
                    }],
                },
                within_secs: 72 * 3600,
            }
        );
        let StepKind::Send(send) = &flow.steps[3].kind else {
            panic!("a send expected")
        };
        assert_eq!(send.channels, vec![ChannelName::Push]);
        assert_eq!(send.template, None);
        assert_eq!(send.variants.len(), 2);
        assert_eq!(send.variants[1].name, "B");
        assert_eq!(send.variants[1].weight, 50);
        assert_eq!(send.variants[1].template, "cart-2b");
        assert!(send.variants[1].channels.is_empty());
        let StepKind::Send(last) = &flow.steps[7].kind else {
            panic!("a send expected")
        };
        assert_eq!(last.channels, vec![ChannelName::Push, ChannelName::Email]);
        assert_eq!(
            flow.templates(),
            vec!["cart-1", "cart-2a", "cart-2b", "cart-3", "cart-3-whatsapp"]
        );
        assert_eq!(
            flow.event_names(),
            vec!["cart_updated", "message_clicked", "order_completed"]
        );
        assert_eq!(flow.longest_event_window_secs(), 72 * 3600);
        // The model round-trips through its stored JSON.
        let stored = serde_json::to_string(&flow).expect("serializes");
        let back: FlowDef = serde_json::from_str(&stored).expect("reads back");
        assert_eq!(back, flow);
    }

    #[test]
    fn flattens_depth_first_with_continuations() {
        let flow = flow(&flow_with(
            "  - send: { channel: push, template: a }\n\
             \x20 - branch:\n\
             \x20     if: { segment: vip }\n\
             \x20     then:\n\
             \x20       - send: { channel: push, template: b }\n\
             \x20       - branch:\n\
             \x20           if: { random: 50% }\n\
             \x20           then: [ { send: { channel: push, template: c } } ]\n\
             \x20     else:\n\
             \x20       - wait:\n\
             \x20           event: order_completed\n\
             \x20           timeout: 48h\n\
             \x20           on_timeout: [ { send: { channel: email, template: d } } ]\n\
             \x20       - send: { channel: push, template: e }\n\
             \x20 - id: last\n\
             \x20   send: { channel: push, template: f }\n",
        ));
        let ids: Vec<&str> = flow.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "steps[0]",
                "steps[1]",
                "steps[1].branch.then[0]",
                "steps[1].branch.then[1]",
                "steps[1].branch.then[1].branch.then[0]",
                "steps[1].branch.else[0]",
                "steps[1].branch.else[0].wait.on_timeout[0]",
                "steps[1].branch.else[1]",
                "last",
            ]
        );
        let nexts: Vec<Option<usize>> = flow.steps.iter().map(|s| s.next).collect();
        assert_eq!(
            nexts,
            vec![
                Some(1),
                Some(8),
                Some(3),
                Some(8),
                Some(8),
                Some(7),
                Some(7),
                Some(8),
                None
            ]
        );
        let StepKind::Branch {
            then_to, else_to, ..
        } = &flow.steps[1].kind
        else {
            panic!("a branch expected")
        };
        assert_eq!((*then_to, *else_to), (Some(2), Some(5)));
        let StepKind::Branch {
            then_to, else_to, ..
        } = &flow.steps[3].kind
        else {
            panic!("a branch expected")
        };
        assert_eq!((*then_to, *else_to), (Some(4), None));
        assert_eq!(flow.steps[3].summary, "branch: random 50%");
        assert_eq!(
            flow.steps[5].kind,
            StepKind::Wait(Wait::Event {
                event: EventMatch {
                    event: "order_completed".to_owned(),
                    conditions: Vec::new()
                },
                timeout_secs: 48 * 3600,
                on_timeout: Some(6),
            })
        );
        assert_eq!(
            flow.steps[5].summary,
            "wait for order_completed (timeout 2d)"
        );
        assert_eq!(flow.step_index("last"), Some(8));
        assert_eq!(flow.segments(), vec!["vip"]);
        // Every index is inside the vector.
        for step in &flow.steps {
            for exit in exits(step).into_iter().flatten() {
                assert!(exit < flow.steps.len());
            }
        }
    }

    #[test]
    fn steps_of_every_kind() {
        let flow = flow(&flow_with(
            "  - wait: 24h\n\
             \x20 - wait: { for: 90m }\n\
             \x20 - wait: { until: \"18:00\" }\n\
             \x20 - wait: { until: 9:05 }\n\
             \x20 - wait: { until: best_time }\n\
             \x20 - wait: { until: best_time, within: 2d }\n\
             \x20 - send: { channel: in-app, template: inbox.v2, topic: order_updates, data: { voucher: RAMADAN, percent: 10 } }\n\
             \x20 - update: { set: { voucher_sent: true, Last_Voucher: RAMADAN } }\n\
             \x20 - branch: { if: { attribute: city, eq: Oran }, then: [ exit ] }\n\
             \x20 - branch: { if: { trait: orders_count, gte: 3 }, else: [ { exit: ~ } ] }\n\
             \x20 - branch: { if: { random: 12.5 }, then: [ { exit: {} } ] }\n\
             \x20 - exit\n",
        ));
        let summaries: Vec<&str> = flow.steps.iter().map(|s| s.summary.as_str()).collect();
        assert_eq!(
            summaries,
            vec![
                "wait 1d",
                "wait 1h30m",
                "wait until 18:00 local",
                "wait until 09:05 local",
                "wait until best time within 1d",
                "wait until best time within 2d",
                "send in_app: inbox.v2",
                "update voucher_sent, Last_Voucher",
                "branch: attribute city",
                "exit",
                "branch: trait orders_count",
                "exit",
                "branch: random 12.5%",
                "exit",
                "exit",
            ]
        );
        assert_eq!(
            flow.steps[0].kind,
            StepKind::Wait(Wait::For { secs: 86_400 })
        );
        assert_eq!(flow.steps[1].kind, StepKind::Wait(Wait::For { secs: 5400 }));
        assert_eq!(
            flow.steps[3].kind,
            StepKind::Wait(Wait::UntilLocalTime { hour: 9, minute: 5 })
        );
        assert_eq!(
            flow.steps[5].kind,
            StepKind::Wait(Wait::BestTime {
                within_secs: 2 * 86_400
            })
        );
        let StepKind::Send(send) = &flow.steps[6].kind else {
            panic!("a send expected")
        };
        assert_eq!(send.channels, vec![ChannelName::InApp]);
        assert_eq!(send.topic.as_deref(), Some("order_updates"));
        assert_eq!(
            serde_json::Value::Object(send.data.clone()),
            json!({"voucher": "RAMADAN", "percent": 10})
        );
        assert_eq!(
            flow.steps[7].kind,
            StepKind::Update {
                set: json!({"voucher_sent": true, "Last_Voucher": "RAMADAN"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            }
        );
        assert_eq!(
            flow.steps[8].kind,
            StepKind::Branch {
                condition: BranchCondition::Attribute(PropertyCondition {
                    path: vec!["city".to_owned()],
                    test: PropertyTest::Eq(json!("Oran")),
                }),
                then_to: Some(9),
                else_to: None,
            }
        );
        assert_eq!(flow.steps[9].next, None, "an exit ends the journey");
        assert_eq!(flow.steps[8].next, Some(10));
        let StepKind::Branch { condition, .. } = &flow.steps[10].kind else {
            panic!("a branch expected")
        };
        assert_eq!(
            condition,
            &BranchCondition::Trait(PropertyCondition {
                path: vec!["orders_count".to_owned()],
                test: PropertyTest::Gte(3.0),
            })
        );
        assert_eq!(
            flow.steps[12].kind,
            StepKind::Branch {
                condition: BranchCondition::Random { percent: 12.5 },
                then_to: Some(13),
                else_to: None,
            }
        );
    }

    #[test]
    fn triggers_and_where_conditions() {
        let flow = flow(
            "kind: Flow\nname: big-orders\ntrigger:\n  event: order_completed\n  where:\n    revenue: { gte: 20, lt: 1000 }\n    currency: EUR\n    items.category: [Home, Garden]\n    coupon: { exists: false }\n    tags: { contains: gift }\n    country: { not_in: [FR], neq: DZ }\n    code: \"1\"\n    count: 1\nsteps:\n  - exit\n",
        );
        let Trigger::Event(event) = &flow.trigger else {
            panic!("an event trigger expected")
        };
        let conditions: Vec<(String, PropertyTest)> = event
            .conditions
            .iter()
            .map(|c| (c.path.join("."), c.test.clone()))
            .collect();
        assert_eq!(
            conditions,
            vec![
                ("revenue".to_owned(), PropertyTest::Gte(20.0)),
                ("revenue".to_owned(), PropertyTest::Lt(1000.0)),
                ("currency".to_owned(), PropertyTest::Eq(json!("EUR"))),
                (
                    "items.category".to_owned(),
                    PropertyTest::In(vec![json!("Home"), json!("Garden")])
                ),
                ("coupon".to_owned(), PropertyTest::Exists(false)),
                ("tags".to_owned(), PropertyTest::Contains(json!("gift"))),
                ("country".to_owned(), PropertyTest::NotIn(vec![json!("FR")])),
                ("country".to_owned(), PropertyTest::Neq(json!("DZ"))),
                ("code".to_owned(), PropertyTest::Eq(json!("1"))),
                ("count".to_owned(), PropertyTest::Eq(json!(1))),
            ]
        );
        let entered = self::flow(
            "kind: Flow\nname: x\ntrigger: { segment_entered: lapsed-60d }\nsteps: [ exit ]\n",
        );
        assert_eq!(
            entered.trigger,
            Trigger::SegmentEntered {
                segment: "lapsed-60d".to_owned()
            }
        );
        assert_eq!(entered.segments(), vec!["lapsed-60d"]);
        let scheduled = self::flow(
            "kind: Flow\nname: x\ntrigger: { schedule: \"0 18 1 * *\", segment: vip, local_time: true }\nsteps: [ exit ]\n",
        );
        assert_eq!(
            scheduled.trigger,
            Trigger::Schedule {
                cron: "0 18 1 * *".to_owned(),
                segment: "vip".to_owned(),
                local_time: true
            }
        );
        let utc = self::flow(
            "kind: Flow\nname: x\ntrigger: { schedule: \"0 9 * * 1\", segment: vip }\nsteps: [ exit ]\n",
        );
        assert!(matches!(
            utc.trigger,
            Trigger::Schedule {
                local_time: false,
                ..
            }
        ));
    }

    #[test]
    fn refuses_bad_triggers_and_conditions() {
        let found = problems(
            "kind: Flow\nname: x\ntrigger:\n  event: Order-Completed\n  where:\n    revenue: { gte: lots }\n    items.: 1\n    tags: { has: a }\n    coupon: { exists: maybe }\n    country: { in: [] }\n    city: { eq: [Oran] }\n    note: {}\nsteps: [ exit ]\n",
        );
        assert_eq!(
            found,
            vec![
                "trigger.event: must be a snake_case event name such as order_completed (at most 64 characters)",
                "trigger.where.revenue.gte: expected a number",
                "trigger.where.items.: not a property path (letters, digits, `_` or `-`, dotted: items.category)",
                "trigger.where.tags.has: unknown operator; expected one of eq, neq, in, not_in, gt, gte, lt, lte, exists, contains",
                "trigger.where.coupon.exists: expected true or false",
                "trigger.where.country.in: expected a non-empty list of values",
                "trigger.where.city.eq: expected a single value",
                "trigger.where.note: expected a value or operators",
            ]
        );
        assert_eq!(
            problems(
                "kind: Flow\nname: x\ntrigger: { segment_entered: vip, event: a }\nsteps: [ exit ]\n"
            ),
            vec!["trigger: use one of `event` and `segment_entered`, not both"]
        );
        assert_eq!(
            problems("kind: Flow\nname: x\ntrigger: { segment: vip }\nsteps: [ exit ]\n"),
            vec!["trigger: expected one of event, segment_entered, schedule"]
        );
        assert_eq!(
            problems(
                "kind: Flow\nname: x\ntrigger: { schedule: \"0 18 1 * *\", local_time: yes }\nsteps: [ exit ]\n"
            ),
            vec![
                "trigger.segment: is required: whose journeys start at each occurrence",
                "trigger.local_time: expected true or false",
            ]
        );
        assert_eq!(
            problems("kind: Flow\nname: x\ntrigger: { event: a, within: 1d }\nsteps: [ exit ]\n"),
            vec!["trigger.within: unknown key; expected one of event, where"]
        );
    }

    #[test]
    fn flow_settings() {
        let flow = flow(
            "kind: Flow\nname: x\ndescription: A test.\ntrigger: { event: a }\nexit_when: { event: order_completed, where: { revenue: { gt: 0 } } }\nconversion: { event: order_completed, where: { revenue: { gte: 20 } }, within: 7d }\nre_entry: always\naudience: { segment: active, exclude: [vip, staff] }\ncontrol_group: 0.5%\ntopic: promotions.daily\nsteps: [ exit ]\n",
        );
        assert_eq!(flow.description, "A test.");
        assert_eq!(flow.exit_when.map(|e| e.conditions.len()), Some(1));
        assert_eq!(flow.conversion.within_secs, 7 * 86_400);
        assert_eq!(flow.conversion.goal.conditions.len(), 1);
        assert_eq!(flow.re_entry, ReEntry::Always);
        assert_eq!(
            flow.audience,
            Audience {
                segment: Some("active".to_owned()),
                exclude_segments: vec!["vip".to_owned(), "staff".to_owned()],
            }
        );
        assert_eq!(flow.control_group_percent, 0.5);
        assert_eq!(flow.topic, "promotions.daily");
        let read = |settings: &str| {
            self::flow(&format!(
                "kind: Flow\nname: x\ntrigger: {{ event: a }}\n{settings}\nsteps: [ exit ]\n"
            ))
        };
        assert_eq!(read("re_entry: never").re_entry, ReEntry::Never);
        assert_eq!(read("re_entry: { always: true }").re_entry, ReEntry::Always);
        assert_eq!(read("re_entry: { always: false }").re_entry, ReEntry::Never);
        assert_eq!(
            read("re_entry: { after: 1d12h }").re_entry,
            ReEntry::After { secs: 129_600 }
        );
        assert_eq!(read("control_group: 10").control_group_percent, 10.0);
        assert_eq!(read("control_group: 50%").control_group_percent, 50.0);
        assert_eq!(
            read("conversion: { within: 30d }").conversion.goal.event,
            "order_completed"
        );
        assert_eq!(
            read("audience: { exclude_segments: [vip] }")
                .audience
                .exclude_segments,
            vec!["vip".to_owned()]
        );
        assert_eq!(read("description: ~").description, "");
    }

    #[test]
    fn refuses_bad_settings() {
        let found = problems(&format!(
            "kind: Flow\nname: Bad_Name\ndescription: {}\ntrigger: {{ event: a }}\nconversion: {{ event: order_completed, within: 31d }}\nre_entry: sometimes\naudience: {{ segment: VIP, exclude: [ok, Not-Ok], exclude_segments: [a] }}\ncontrol_group: 51%\ntopic: Marketing!\nsteps: [ exit ]\nowner: me\n",
            "x".repeat(1001)
        ));
        assert_eq!(
            found,
            vec![
                "name: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "description: at most 1000 characters",
                "conversion.within: must be a positive duration of at most 30d (the attribution window)",
                "re_entry: expected `never`, `always` or { after: 7d }",
                "audience: use one of `exclude` and `exclude_segments`, not both",
                "audience.segment: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "audience.exclude[1]: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "control_group: must be from 0 to 50 % (a control group above half the audience leaves too few to treat)",
                "topic: must be 1 to 64 lowercase letters, digits, `_`, `.` or `-`",
                "owner: unknown key; expected one of kind, name, description, trigger, exit_when, conversion, re_entry, audience, control_group, topic, steps",
            ]
        );
        let many: Vec<String> = (0..21).map(|i| format!("s{i}")).collect();
        assert_eq!(
            problems(&format!(
                "kind: Flow\nname: x\ntrigger: {{ event: a }}\naudience: {{ exclude: [{}] }}\nsteps: [ exit ]\n",
                many.join(", ")
            )),
            vec!["audience.exclude: at most 20 segments"]
        );
        assert_eq!(
            problems(
                "kind: Flow\nname: x\ntrigger: { event: a }\ncontrol_group: ten\nsteps: [ exit ]\n"
            ),
            vec!["control_group: expected a percentage such as 10%"]
        );
        assert_eq!(
            problems(
                "kind: Flow\nname: x\ntrigger: { event: a }\nconversion: { event: Bad }\nsteps: [ exit ]\n"
            ),
            vec![
                "conversion.event: must be a snake_case event name such as order_completed (at most 64 characters)"
            ]
        );
    }

    #[test]
    fn document_level_problems() {
        assert_eq!(
            problems("kind: Broadcast\nname: x\nsegment: vip\n"),
            vec!["kind: must be `Flow`"]
        );
        assert_eq!(
            problems("name: x\n"),
            vec![
                "kind: is required (`kind: Flow`)",
                "trigger: is required: what starts a journey, e.g. { event: cart_updated }",
                "steps: is required: the list of what the flow does",
            ]
        );
        assert!(problems("- a\n- b\n")[0].starts_with(": expected a flow document"));
        let broken = parse_flow("kind: Flow\nname: [x\n").expect_err("not YAML");
        assert!(broken[0].reason.starts_with("not valid YAML"));
        let huge = format!("kind: Flow\n# {}\n", "x".repeat(MAX_FLOW_BYTES));
        let too_large = parse_flow(&huge).expect_err("too large");
        assert_eq!(too_large.len(), 1);
        assert!(too_large[0].reason.contains("at most 262144"));
        assert_eq!(
            problems("kind: Flow\nname: x\ntrigger: { event: a }\nsteps: []\n"),
            vec!["steps: needs at least one step"]
        );
        assert_eq!(
            problems("kind: Flow\nname: x\ntrigger: { event: a }\nsteps: { wait: 1h }\n"),
            vec!["steps: expected a list of steps, found a mapping"]
        );
    }

    #[test]
    fn problems_name_the_path_and_position_in_document_order() {
        let text = flow_with(
            "  - wait: 1h\n\
             \x20 - send: { channel: push, template: cart-1 }\n\
             \x20 - wait: 3 days\n\
             \x20 - send:\n\
             \x20     channel: push\n\
             \x20     variants:\n\
             \x20       - { name: A, weight: 50, template: cart-2a }\n\
             \x20       - { name: B, weight: 0, template: cart-2b }\n",
        );
        let found = parse_flow(&text).expect_err("two problems");
        let shown: Vec<String> = found
            .iter()
            .map(|p| format!("{}: {} ({}:{})", p.field, p.reason, p.line, p.column))
            .collect();
        assert_eq!(
            shown,
            vec![
                "steps[2].wait: `3 days` is not a duration (e.g. 90s, 15m, 24h, 7d, 2w, 1h30m) (7:11)",
                "steps[3].send.variants[1].weight: must be a whole number from 1 to 1000 (12:30)",
            ]
        );
        assert_eq!(
            found[1].to_string(),
            "steps[3].send.variants[1].weight: must be a whole number from 1 to 1000 (line 12, column 30)"
        );
    }

    #[test]
    fn a_wait_for_an_event_needs_a_timeout() {
        let problem = one_problem(&flow_with(
            "  - wait: 1h\n  - wait:\n      event: order_completed\n      on_timeout: [ exit ]\n",
        ));
        assert_eq!(problem.field, "steps[1].wait.timeout");
        assert_eq!(
            problem.reason,
            "a wait for an event must have a timeout, or the journey could never end"
        );
        assert_eq!(problem.line, 7, "at the wait's mapping");
    }

    #[test]
    fn refuses_bad_waits() {
        assert_eq!(
            problems(&flow_with(
                "  - wait: { until: \"25:00\" }\n\
                 \x20 - wait: { until: best_time, within: 30m }\n\
                 \x20 - wait: { until: best_time, within: 8d }\n\
                 \x20 - wait: { until: \"18:00\", within: 1h }\n\
                 \x20 - wait: { for: 0s }\n\
                 \x20 - wait: { sleep: 1h }\n\
                 \x20 - wait: [1h]\n\
                 \x20 - wait: { event: order_completed, timeout: 1h, else: [] }\n"
            )),
            vec![
                "steps[0].wait.until: expected a time of day such as \"18:00\", or best_time",
                "steps[1].wait.within: must be from 1h to 7d",
                "steps[2].wait.within: must be from 1h to 7d",
                "steps[3].wait.within: unknown key; expected one of until",
                "steps[4].wait.for: `0s` is not a duration (e.g. 90s, 15m, 24h, 7d, 2w, 1h30m)",
                "steps[5].wait: expected a duration such as 24h, { until: \"18:00\" }, { until: best_time } or { event: NAME, timeout: 48h }",
                "steps[6].wait: expected a duration such as 24h, { until: \"18:00\" }, { until: best_time } or { event: NAME, timeout: 48h }",
                "steps[7].wait.else: unknown key; expected one of event, where, timeout, on_timeout",
            ]
        );
    }

    #[test]
    fn refuses_bad_sends() {
        let variants: Vec<String> = (0..11)
            .map(|i| format!("{{ name: v{i}, weight: 1, template: t{i} }}"))
            .collect();
        let found = problems(&flow_with(&format!(
            "  - send: {{ channel: pigeon, template: a }}\n\
             \x20 - send: {{ channel: [push, email, push], template: a }}\n\
             \x20 - send: {{ channel: push }}\n\
             \x20 - send: {{ template: a }}\n\
             \x20 - send: {{ channel: push, template: a, variants: [ {{ name: A, weight: 1, template: b }} ] }}\n\
             \x20 - send:\n\
             \x20     channel: push\n\
             \x20     variants:\n\
             \x20       - {{ name: A, weight: 1001, template: a }}\n\
             \x20       - {{ name: A, weight: 1, template: Bad }}\n\
             \x20       - {{ name: control, weight: 1.5, template: c, channel: [sms, sms] }}\n\
             \x20       - {{ name: \"{}\", template: d }}\n\
             \x20       - just-a-name\n\
             \x20 - send: {{ channel: push, variants: [{}] }}\n\
             \x20 - send: {{ channel: push, template: a, topic: \"\", data: [1] }}\n\
             \x20 - send: {{ channel: push, channels: email, template: a }}\n\
             \x20 - send: {{ channel: push, template: a, to: me }}\n",
            "x".repeat(33),
            variants.join(", ")
        )));
        assert_eq!(
            found,
            vec![
                "steps[0].send.channel: unknown channel `pigeon`; expected one of push, email, sms, whatsapp, in_app, webhook",
                "steps[1].send.channel: `push` is listed twice",
                "steps[2].send.template: is required (or `variants`, to test several templates)",
                "steps[3].send.channel: needs at least one channel",
                "steps[4].send.variants: use either `template` or `variants`, not both",
                "steps[5].send.variants[0].weight: must be a whole number from 1 to 1000",
                "steps[5].send.variants[1].name: `A` is already the name of variants[0]",
                "steps[5].send.variants[1].template: must be a template name: up to 128 lowercase letters, digits, `_`, `.` or `-`, starting with a letter or digit",
                "steps[5].send.variants[2].name: `control` is reserved for the control group",
                "steps[5].send.variants[2].weight: must be a whole number from 1 to 1000",
                "steps[5].send.variants[2].channel: `sms` is listed twice",
                "steps[5].send.variants[3].weight: is required: a whole number from 1 to 1000",
                "steps[5].send.variants[3].name: must be 1 to 32 letters, digits, `_`, `.` or `-`",
                "steps[5].send.variants[4]: expected { name: A, weight: 50, template: NAME }, found a scalar",
                "steps[6].send.variants: at most 10 variants",
                "steps[7].send.topic: must be 1 to 64 lowercase letters, digits, `_`, `.` or `-`",
                "steps[7].send.data: expected a mapping of template variables",
                "steps[8].send.channels: use one of `channel` and `channels`, not both",
                "steps[9].send.to: unknown key; expected one of channel, channels, template, variants, topic, data",
            ]
        );
        let big = format!(
            "  - send: {{ channel: push, template: a, data: {{ text: \"{}\" }} }}\n",
            "x".repeat(MAX_DATA_BYTES)
        );
        let problem = one_problem(&flow_with(&big));
        assert_eq!(problem.field, "steps[0].send.data");
        assert!(
            problem.reason.starts_with("at most 32768 bytes"),
            "{problem}"
        );
    }

    #[test]
    fn refuses_bad_branches_updates_and_steps() {
        let found = problems(&flow_with(
            "  - branch: { if: { event: message_clicked }, then: [ exit ] }\n\
             \x20 - branch: { if: { attribute: city }, then: [ exit ] }\n\
             \x20 - branch: { if: { attribute: city, eq: Oran, neq: Alger }, then: [ exit ] }\n\
             \x20 - branch: { if: { trait: \"a b\", gte: 1 }, then: [ exit ] }\n\
             \x20 - branch: { if: { random: 100% }, then: [ exit ] }\n\
             \x20 - branch: { if: { segment: vip } }\n\
             \x20 - branch: { if: { segment: vip, random: 5 }, then: [ exit ] }\n\
             \x20 - branch: { then: [ exit ] }\n\
             \x20 - update: { set: {} }\n\
             \x20 - update: { set: { 1st: x, ok: 1 } }\n\
             \x20 - exit: 5\n\
             \x20 - stop\n\
             \x20 - { wait: 1h, send: { channel: push, template: a } }\n\
             \x20 - { id: Bad Id, wait: 1h }\n\
             \x20 - { id: same, wait: 1h }\n\
             \x20 - { id: same, wait: 1h }\n\
             \x20 - goto: nowhere\n\
             \x20 - {}\n",
        ));
        assert_eq!(
            found,
            vec![
                "steps[0].branch.if.within: is required: how far back to look, e.g. 72h",
                "steps[1].branch.if: needs exactly one operator (eq, neq, in, not_in, gt, gte, lt, lte, exists, contains), e.g. { attribute: city, eq: Oran }",
                "steps[2].branch.if: needs exactly one operator (eq, neq, in, not_in, gt, gte, lt, lte, exists, contains), e.g. { attribute: city, eq: Oran }",
                "steps[3].branch.if.trait: must be a dotted property path such as city or address.city",
                "steps[4].branch.if.random: must be between 0 and 100 %, both excluded",
                "steps[5].branch: needs steps in `then` or `else`",
                "steps[6].branch.if: use one of `segment` and `random`, not both",
                "steps[7].branch.if: is required: the condition, e.g. { segment: vip }",
                "steps[8].update.set: needs at least one attribute",
                "steps[9].update.set.1st: attribute names are up to 64 letters, digits or `_`, not starting with a digit",
                "steps[10].exit: takes no settings: write `- exit`",
                "steps[11]: expected a step such as `wait: 24h`, `send: { … }` or `exit`, found a scalar",
                "steps[12]: use one of `wait` and `send`, not both",
                "steps[13].id: must be up to 64 lowercase letters, digits, `_` or `-`, starting with a letter or digit",
                "steps[15].id: the id `same` is already used by steps[14]",
                "steps[16].goto: no step has the id `nowhere`",
                "steps[17]: expected one of wait, send, branch, update, exit, goto",
            ]
        );
        let deep = format!(
            "  - branch:\n      if: {{ segment: vip }}\n      then:\n{}",
            (1..=17)
                .map(|level| {
                    let indent = " ".repeat(8 + 6 * (level - 1));
                    format!(
                        "{indent}- branch:\n{indent}    if: {{ segment: vip }}\n{indent}    then:\n"
                    )
                })
                .collect::<String>()
                + &format!("{}- exit\n", " ".repeat(8 + 6 * 17))
        );
        let found = problems(&flow_with(&deep));
        assert!(
            found
                .iter()
                .any(|p| p.contains("steps nested deeper than 16 levels")),
            "{found:#?}"
        );
    }

    #[test]
    fn gotos_name_steps_by_id_or_path() {
        let flow = flow(&flow_with(
            "  - id: start\n    wait: 1d\n  - branch:\n      if: { event: order_completed, within: 1d }\n      then: [ exit ]\n      else: [ { goto: start } ]\n",
        ));
        assert_eq!(flow.steps[3].kind, StepKind::Goto { target: 0 });
        assert_eq!(flow.steps[3].next, None);
        assert_eq!(flow.steps[3].summary, "goto start");
        let by_path = self::flow(&flow_with(
            "  - wait: 1d\n  - branch:\n      if: { segment: vip }\n      then: [ { goto: \"steps[0]\" } ]\n",
        ));
        assert_eq!(by_path.steps[2].kind, StepKind::Goto { target: 0 });
        assert_eq!(by_path.steps[2].summary, "goto steps[0]");
        // The branch's `else` is empty: it continues after the branch, where the flow ends.
        assert_eq!(by_path.steps[1].next, None);
    }

    #[test]
    fn refuses_steps_that_can_never_end() {
        // A goto to itself.
        let problem = one_problem(&flow_with("  - wait: 1h\n  - id: spin\n    goto: spin\n"));
        assert_eq!(problem.field, "steps[1]");
        assert_eq!(
            problem.reason,
            "the steps can never end: spin loops back to spin without a wait"
        );
        assert_eq!(problem.line, 6);
        // A loop through sends only.
        let problem = one_problem(&flow_with(
            "  - send: { channel: push, template: a }\n  - branch:\n      if: { segment: vip }\n      then: [ exit ]\n      else: [ { goto: \"steps[0]\" } ]\n",
        ));
        assert_eq!(problem.field, "steps[1].branch.else[0]");
        assert_eq!(
            problem.reason,
            "the steps can never end: steps[1].branch.else[0] loops back to steps[0] without a wait"
        );
        // A loop with a wait but no way out.
        let problem = one_problem(&flow_with(
            "  - wait: 1d\n  - send: { channel: push, template: a }\n  - goto: \"steps[0]\"\n",
        ));
        assert_eq!(problem.field, "steps[2]");
        assert_eq!(
            problem.reason,
            "the steps can never end: steps[2] loops back to steps[0] and no step on the way leads to the end"
        );
        // A wait for an event counts as a wait; its timeout path leaves the loop.
        flow(&flow_with(
            "  - wait:\n      event: order_completed\n      timeout: 1d\n      on_timeout: [ exit ]\n  - send: { channel: push, template: a }\n  - goto: \"steps[0]\"\n",
        ));
        // A weekly reminder until the customer orders is fine.
        flow(&flow_with(
            "  - id: again\n    wait: 7d\n  - send: { channel: push, template: a }\n  - branch:\n      if: { event: order_completed, within: 7d }\n      else: [ { goto: again } ]\n",
        ));
        // Unreachable steps are fine, but not a loop without a wait among them.
        flow(&flow_with(
            "  - exit\n  - send: { channel: push, template: a }\n",
        ));
        let problem = one_problem(&flow_with("  - exit\n  - id: idle\n    goto: idle\n"));
        assert!(
            problem
                .reason
                .contains("idle loops back to idle without a wait")
        );
        // Two loops, two problems (a loop with a wait that no journey reaches is fine).
        let found = problems(&flow_with(
            "  - branch:\n      if: { segment: vip }\n      then: [ { goto: a } ]\n      else: [ { goto: \"steps[3]\" } ]\n  - id: a\n    goto: b\n  - id: b\n    goto: a\n  - wait: 1h\n  - goto: \"steps[3]\"\n",
        ));
        assert_eq!(
            found,
            vec![
                "steps[2]: the steps can never end: b loops back to a without a wait",
                "steps[4]: the steps can never end: steps[4] loops back to steps[3] and no step on the way leads to the end",
            ]
        );
        flow(&flow_with(
            "  - exit\n  - wait: 1h\n  - goto: \"steps[1]\"\n",
        ));
    }

    #[test]
    fn endless_on_hand_built_steps() {
        let step = |kind: StepKind, next: Option<usize>| Step {
            id: String::new(),
            summary: String::new(),
            kind,
            next,
        };
        assert!(endless(&[]).is_empty());
        let wait = StepKind::Wait(Wait::For { secs: 60 });
        // Waits and an end: nothing to report.
        assert!(endless(&[step(wait.clone(), Some(1)), step(StepKind::Exit, None)]).is_empty());
        // A wait that loops onto itself through a goto with no exit.
        let found = endless(&[
            step(wait, Some(1)),
            step(StepKind::Goto { target: 0 }, None),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, 1);
    }

    #[test]
    fn reads_a_broadcast() {
        let def = parse_broadcast(
            "kind: Broadcast\nname: spring-sale\ndescription: Spring.\nsegment: active-buyers\nexclude: [recent-buyers]\nchannel: email\ntemplate: spring-sale\ntopic: promotions\nschedule: { at: 2026-03-01T18:00:00Z }\ncontrol_group: 5%\nmax_sends_per_second: 500\nconversion: { event: order_completed, within: 3d }\nignore_frequency_caps: true\nignore_quiet_hours: false\ndata: { code: SPRING }\n",
        )
        .expect("valid");
        assert_eq!(def.name, "spring-sale");
        assert_eq!(def.description, "Spring.");
        assert_eq!(def.segment, "active-buyers");
        assert_eq!(def.exclude_segments, vec!["recent-buyers".to_owned()]);
        assert_eq!(def.channels, vec![ChannelName::Email]);
        assert_eq!(def.template.as_deref(), Some("spring-sale"));
        assert_eq!(def.topic, "promotions");
        let at = DateTime::parse_from_rfc3339("2026-03-01T18:00:00Z")
            .map(|at| at.with_timezone(&Utc))
            .expect("a timestamp");
        assert_eq!(def.schedule, BroadcastSchedule::At(at));
        assert_eq!(def.control_group_percent, 5.0);
        assert_eq!(def.max_sends_per_second, 500);
        assert_eq!(def.conversion.within_secs, 3 * 86_400);
        assert!(def.ignore_frequency_caps);
        assert!(!def.ignore_quiet_hours);
        assert_eq!(
            serde_json::Value::Object(def.data.clone()),
            json!({"code": "SPRING"})
        );
        assert!(check_broadcast(&def, "spec.").is_empty());

        let schedule = |text: &str| {
            parse_broadcast(&format!(
                "kind: Broadcast\nname: x\nsegment: vip\nchannel: push\ntemplate: t\n{text}\n"
            ))
            .map(|def| def.schedule)
        };
        let date = NaiveDate::from_ymd_opt(2026, 2, 19).expect("a date");
        let local = BroadcastSchedule::LocalTime {
            date,
            hour: 21,
            minute: 0,
            skip_if_past: false,
        };
        assert_eq!(schedule(""), Ok(BroadcastSchedule::Now));
        assert_eq!(schedule("schedule: now"), Ok(BroadcastSchedule::Now));
        assert_eq!(
            schedule("schedule: { local_time: \"2026-02-19 21:00\" }"),
            Ok(local.clone())
        );
        assert_eq!(
            schedule("schedule: { date: 2026-02-19, time: \"21:00\" }"),
            Ok(local)
        );
        assert_eq!(
            schedule("schedule: { local_time: 2026-02-19T21:30, skip_if_past: true }"),
            Ok(BroadcastSchedule::LocalTime {
                date,
                hour: 21,
                minute: 30,
                skip_if_past: true,
            })
        );
        assert_eq!(
            schedule(
                "schedule: { cron: \"0 18 1 * *\", local_time: true, starts_at: 2026-03-01T00:00:00Z }"
            ),
            Ok(BroadcastSchedule::Recurring {
                cron: "0 18 1 * *".to_owned(),
                local_time: true,
                starts_at: Some(
                    DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z")
                        .map(|at| at.with_timezone(&Utc))
                        .expect("a timestamp")
                ),
                ends_at: None,
            })
        );
    }

    #[test]
    fn refuses_bad_broadcasts() {
        let found = broadcast_problems(
            "kind: Broadcast\nname: Spring Sale\nexclude_segments: [ok, Bad]\nchannel: [push, fax]\nvariants:\n  - { name: A, weight: 0, template: a }\n  - { name: A, weight: 10, template: b }\ntopic: \"\"\nschedule: { cron: \"0 18 * * *\", starts_at: 2026-03-02T00:00:00Z, ends_at: 2026-03-01T00:00:00Z }\ncontrol_group: 60%\nmax_sends_per_second: -1\nconversion: { within: 0s }\nignore_quiet_hours: sometimes\ncolour: red\n",
        );
        assert_eq!(
            found,
            vec![
                // Missing fields are named at the document's start.
                "segment: is required",
                "name: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "exclude_segments[1]: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "channel[1]: unknown channel `fax`; expected one of push, email, sms, whatsapp, in_app, webhook",
                "variants[0].weight: must be a whole number from 1 to 1000",
                "variants[1].name: `A` is already the name of variants[0]",
                "topic: must be 1 to 64 lowercase letters, digits, `_`, `.` or `-`",
                "schedule.ends_at: must be after starts_at",
                "control_group: must be from 0 to 50 % (a control group above half the audience leaves too few to treat)",
                "max_sends_per_second: expected a whole number of sends per second (0: only the channel's limit)",
                "conversion.within: `0s` is not a duration (e.g. 90s, 15m, 24h, 7d, 2w, 1h30m)",
                "ignore_quiet_hours: expected true or false",
                "colour: unknown key; expected one of kind, name, description, segment, exclude_segments, exclude, channel, channels, template, variants, topic, schedule, control_group, max_sends_per_second, conversion, ignore_frequency_caps, ignore_quiet_hours, data",
            ]
        );
        assert_eq!(
            broadcast_problems(
                "kind: Broadcast\nname: x\nsegment: vip\ntemplate: t\nschedule: { at: tomorrow }\n"
            ),
            vec![
                "channel: needs at least one channel",
                "schedule.at: expected an RFC 3339 timestamp such as 2026-03-01T18:00:00Z",
            ]
        );
        assert_eq!(
            broadcast_problems(
                "kind: Broadcast\nname: x\nsegment: vip\nchannel: push\ntemplate: t\nschedule: { local_time: \"2026-02-30 21:00\" }\n"
            ),
            vec![
                "schedule.local_time: expected a local date and time such as \"2026-03-01 18:00\""
            ]
        );
        assert_eq!(
            broadcast_problems(
                "kind: Broadcast\nname: x\nsegment: vip\nchannel: push\ntemplate: t\nschedule: { date: 2026-02-19 }\n"
            ),
            vec!["schedule: give `local_time: \"2026-03-01 18:00\"`, or both `date` and `time`"]
        );
        assert_eq!(
            broadcast_problems(
                "kind: Broadcast\nname: x\nsegment: vip\nchannel: push\ntemplate: t\nschedule: weekly\n"
            ),
            vec![
                "schedule: expected `now`, { at: TIMESTAMP }, { local_time: \"2026-03-01 18:00\" } or { cron: \"0 18 1 * *\" }"
            ]
        );
        assert_eq!(
            broadcast_problems("kind: Flow\n"),
            vec!["kind: must be `Broadcast`"]
        );
        let huge = format!("kind: Broadcast\n# {}\n", "x".repeat(MAX_BROADCAST_BYTES));
        assert_eq!(parse_broadcast(&huge).expect_err("too large").len(), 1);
    }

    #[test]
    fn structured_specs_meet_the_document_rules() {
        let mut def = parse_broadcast(include_str!(
            "../../../../examples/flows/ramadan-broadcast.yaml"
        ))
        .expect("the example is valid");
        assert!(check_broadcast(&def, "spec.").is_empty());
        def.name = String::new();
        def.segment = "VIP".to_owned();
        def.exclude_segments = (0..21).map(|i| format!("s{i}")).collect();
        def.channels.clear();
        def.template = Some("t".to_owned());
        def.variants[1].weight = 1001;
        def.variants[1].channels = vec![ChannelName::Sms, ChannelName::Sms];
        def.variants.push(Variant {
            name: "Control".to_owned(),
            weight: 1,
            template: String::new(),
            channels: Vec::new(),
        });
        def.topic = String::new();
        def.schedule = BroadcastSchedule::LocalTime {
            date: NaiveDate::from_ymd_opt(2026, 2, 19).expect("a date"),
            hour: 24,
            minute: 0,
            skip_if_past: false,
        };
        def.control_group_percent = f64::NAN;
        def.conversion.within_secs = 31 * 86_400;
        def.conversion.goal.event = "Order".to_owned();
        def.description = "x".repeat(1001);
        let found: Vec<String> = check_broadcast(&def, "spec.")
            .iter()
            .map(|p| {
                assert_eq!((p.line, p.column), (0, 0));
                format!("{}: {}", p.field, p.reason)
            })
            .collect();
        assert_eq!(
            found,
            vec![
                "spec.name: is required",
                "spec.description: at most 1000 characters",
                "spec.segment: must be 1 to 64 lowercase letters, digits or `-`, starting with a letter",
                "spec.exclude_segments: at most 20 segments",
                "spec.channels: needs at least one channel",
                "spec.variants: use either `template` or `variants`, not both",
                "spec.variants[1].weight: must be a whole number from 1 to 1000",
                "spec.variants[1].channels: `sms` is listed twice",
                "spec.variants[2].name: `control` is reserved for the control group",
                "spec.variants[2].template: is required",
                "spec.topic: must be 1 to 64 lowercase letters, digits, `_`, `.` or `-`",
                "spec.schedule.local_time.time: must be a time of day from 00:00 to 23:59",
                "spec.control_group_percent: must be from 0 to 50 % (a control group above half the audience leaves too few to treat)",
                "spec.conversion.event: must be a snake_case event name such as order_completed (at most 64 characters)",
                "spec.conversion.within: must be a positive duration of at most 30d (the attribution window)",
            ]
        );
        // The same mistakes in a document get the same reasons, at the document's paths.
        let found = broadcast_problems(
            "kind: Broadcast\nname: x\nsegment: vip\nchannel: push\nvariants:\n  - { name: A, weight: 1001, template: a, channel: [sms, sms] }\n  - { name: Control, weight: 1, template: b }\n",
        );
        assert_eq!(
            found,
            vec![
                "variants[0].weight: must be a whole number from 1 to 1000",
                "variants[0].channel: `sms` is listed twice",
                "variants[1].name: `control` is reserved for the control group",
            ]
        );
        // A prefix without a dot, and a rule on the spec as a whole.
        let mut empty = def.clone();
        empty.template = None;
        empty.variants.clear();
        let found = check_broadcast(&empty, "spec.");
        assert!(found.iter().any(|p| p.field == "spec.template"));
    }

    #[test]
    fn conditions_as_json_both_ways() {
        let where_json = json!({
            "revenue": {"gte": 20.0, "lt": 100.0},
            "channel": {"eq": "push"},
            "items.category": {"in": ["Home", "Garden"]},
            "coupon": {"exists": false},
            "tags": {"contains": "gift", "not_in": ["x"], "neq": 3},
            "count": {"gt": 1.0, "lte": 5.0},
        });
        let conditions =
            parse_conditions(&where_json, "spec.conversion.conditions").expect("valid");
        assert_eq!(conditions.len(), 10);
        assert_eq!(conditions_json(&conditions), where_json);
        assert_eq!(
            parse_conditions(&serde_json::Value::Null, "x"),
            Ok(Vec::new())
        );
        let shorthand = parse_conditions(&json!({"channel": "push", "n": 1}), "c").expect("valid");
        assert_eq!(
            conditions_json(&shorthand),
            json!({"channel": {"eq": "push"}, "n": {"eq": 1}})
        );
        let found = parse_conditions(
            &json!({"revenue": {"gte": "a lot"}}),
            "spec.conversion.conditions",
        )
        .expect_err("not a number");
        assert_eq!(found[0].field, "spec.conversion.conditions.revenue.gte");
        assert_eq!((found[0].line, found[0].column), (0, 0));
        let found =
            parse_conditions(&json!([1]), "spec.conversion.conditions").expect_err("not a map");
        assert_eq!(found[0].field, "spec.conversion.conditions");
    }

    #[test]
    fn every_example_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flows");
        let mut names = Vec::new();
        let mut templates = Vec::new();
        let entries = std::fs::read_dir(&dir).expect("examples/flows exists");
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let kind = yaml::parse(&text)
                .ok()
                .and_then(|root| root.get("kind").and_then(Node::as_str).map(str::to_owned));
            match kind.as_deref() {
                Some("Flow") => {
                    let flow = parse_flow(&text).unwrap_or_else(|problems| {
                        panic!("{file}:\n{}", yaml::describe(&problems))
                    });
                    templates.extend(flow.templates().into_iter().map(str::to_owned));
                }
                Some("Broadcast") => {
                    let def = parse_broadcast(&text).unwrap_or_else(|problems| {
                        panic!("{file}:\n{}", yaml::describe(&problems))
                    });
                    assert!(check_broadcast(&def, "spec.").is_empty());
                    templates.extend(def.template.iter().cloned());
                    templates.extend(def.variants.iter().map(|v| v.template.clone()));
                }
                other => panic!("{file}: unknown kind {other:?}"),
            }
            names.push(file);
        }
        names.sort();
        assert_eq!(
            names,
            vec![
                "abandoned-cart.yaml",
                "onboarding.yaml",
                "post-purchase.yaml",
                "ramadan-broadcast.yaml",
                "reactivation.yaml",
                "vip-monthly-recap.yaml",
            ]
        );
        // The README lists every template the examples send (the demo creates them).
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
        for template in &templates {
            assert!(
                readme.contains(&format!("- `{template}` — ")),
                "README.md does not list {template}"
            );
        }
    }

    #[test]
    fn the_examples_say_what_the_study_says() {
        let onboarding = flow(include_str!("../../../../examples/flows/onboarding.yaml"));
        let sends = onboarding
            .steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Send(_)))
            .count();
        assert_eq!(sends, 4);
        let mut days = 0;
        for step in &onboarding.steps {
            match step.kind {
                StepKind::Wait(Wait::For { secs }) => days += secs,
                StepKind::Wait(Wait::BestTime { within_secs }) => days += within_secs,
                StepKind::Wait(Wait::UntilLocalTime { .. }) => days += 86_400,
                _ => {}
            }
        }
        assert!(days <= 15 * 86_400, "onboarding lasts at most 15 days");
        assert_eq!(onboarding.control_group_percent, 10.0);
        assert_eq!(onboarding.conversion.within_secs, 7 * 86_400);
        assert_eq!(
            onboarding.steps[0].summary,
            "send push→email: onboarding-welcome"
        );

        let reactivation = flow(include_str!("../../../../examples/flows/reactivation.yaml"));
        assert_eq!(
            reactivation.segments(),
            vec!["lapsed-30d", "lapsed-60d", "lapsed-90d"]
        );
        // Three paths, each waiting for the best time before its send, then one reminder.
        let best_times = reactivation
            .steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Wait(Wait::BestTime { .. })))
            .count();
        assert_eq!(best_times, 3);
        let last = reactivation.steps.len() - 1;
        for step in &reactivation.steps {
            if let StepKind::Send(send) = &step.kind
                && !send.variants.is_empty()
            {
                assert_eq!(
                    step.next,
                    Some(last - 1),
                    "{} goes on to the reminder",
                    step.id
                );
            }
        }

        let post_purchase = flow(include_str!(
            "../../../../examples/flows/post-purchase.yaml"
        ));
        let summaries: Vec<&str> = post_purchase
            .steps
            .iter()
            .map(|s| s.summary.as_str())
            .collect();
        assert_eq!(
            summaries,
            vec![
                "wait 2d",
                "send email: cross-sell",
                "wait for product_viewed (timeout 3d)",
                "exit",
                "send push: cross-sell-viewed",
            ]
        );

        let recap = flow(include_str!(
            "../../../../examples/flows/vip-monthly-recap.yaml"
        ));
        assert_eq!(
            recap.trigger,
            Trigger::Schedule {
                cron: "0 18 1 * *".to_owned(),
                segment: "vip".to_owned(),
                local_time: true
            }
        );
        assert_eq!(recap.re_entry, ReEntry::Always);

        let ramadan = parse_broadcast(include_str!(
            "../../../../examples/flows/ramadan-broadcast.yaml"
        ))
        .expect("valid");
        assert_eq!(ramadan.segment, "active-buyers");
        assert_eq!(
            ramadan.channels,
            vec![ChannelName::Push, ChannelName::Email]
        );
        assert_eq!(ramadan.variants.len(), 2);
        assert_eq!(ramadan.control_group_percent, 10.0);
        assert_eq!(ramadan.max_sends_per_second, 2000);
        assert_eq!(
            ramadan.schedule,
            BroadcastSchedule::LocalTime {
                date: NaiveDate::from_ymd_opt(2026, 2, 19).expect("a date"),
                hour: 21,
                minute: 0,
                skip_if_past: false,
            }
        );
    }
}

#[cfg(test)]
mod readme_tests {
    use super::*;

    /// The README's flow is the product's front door: it must stay a valid document.
    #[test]
    fn the_readme_flow_parses() {
        let readme = include_str!("../../../../README.md");
        let start = readme
            .find("```yaml\nkind: Flow")
            .expect("a flow in the README")
            + "```yaml\n".len();
        let end = start + readme[start..].find("```").expect("end of the block");
        let flow =
            parse_flow(&readme[start..end]).unwrap_or_else(|problems| panic!("{problems:?}"));
        assert_eq!(flow.name, "abandoned-cart");
        let broken = readme[start..end].replace(
            "weight: 50, template: cart-2b",
            "weight: 0, template: cart-2b",
        );
        let problems = parse_flow(&broken).expect_err("a zero weight is refused");
        println!("{}", relance_kit::yaml::describe(&problems));
        assert_eq!(problems[0].field, "steps[3].send.variants[1].weight");
    }
}
