//! The segmentation domain, pure: the definition language ([`parse`] → [`model`]), its
//! evaluation and time boundaries ([`eval`]), and which events feed which aggregate
//! ([`aggregate`]).

pub mod aggregate;
pub mod eval;
pub mod model;
pub mod parse;

use relance_kit::yaml::Problem;

pub use model::{Condition, Definition, EventSelector};

/// A definition ready to evaluate, with what it depends on.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub definition: Definition,
    /// Every event selector the condition reads, once each.
    pub selectors: Vec<EventSelector>,
    /// Event names that can move the membership.
    pub event_names: Vec<String>,
    /// Segments referred to through `in_segment`.
    pub depends_on: Vec<String>,
    /// Whether time alone can change the answer.
    pub time_dependent: bool,
    /// Whether it reads profile attributes or traits (a profile change can move it).
    pub reads_profile: bool,
}

impl Compiled {
    pub fn new(definition: Definition) -> Compiled {
        let mut selectors: Vec<EventSelector> = Vec::new();
        let mut reads_profile = false;
        let mut stack = vec![&definition.condition];
        while let Some(node) = stack.pop() {
            match node {
                Condition::All(children) | Condition::Any(children) => {
                    stack.extend(children.iter())
                }
                Condition::Not(child) => stack.push(child),
                Condition::Event(event) => {
                    let mut found = vec![&event.events];
                    if let Some(follow_up) = &event.not_followed_by {
                        found.push(&follow_up.events);
                    }
                    for selector in found {
                        let id = aggregate::selector_id(selector);
                        if !selectors.iter().any(|s| aggregate::selector_id(s) == id) {
                            selectors.push(selector.clone());
                        }
                    }
                }
                Condition::Attribute(_) => reads_profile = true,
                Condition::InSegment(_) => {}
            }
        }
        let mut event_names: Vec<String> = selectors.iter().map(|s| s.name.clone()).collect();
        event_names.sort();
        event_names.dedup();
        Compiled {
            depends_on: eval::dependencies(&definition.condition),
            time_dependent: eval::time_dependent(&definition.condition),
            reads_profile,
            event_names,
            selectors,
            definition,
        }
    }

    pub fn name(&self) -> &str {
        &self.definition.name
    }
}

/// Who a membership or an aggregate belongs to: a known customer or an anonymous visitor.
/// Stored as `c:<customer_id>` / `v:<anonymous_id>`, so customers sort before visitors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Person {
    Customer(String),
    Visitor(String),
}

impl Person {
    /// The person an event is about (the customer when both ids are known).
    pub fn of(customer_id: Option<&str>, anonymous_id: Option<&str>) -> Option<Person> {
        match (customer_id, anonymous_id) {
            (Some(c), _) if !c.is_empty() => Some(Person::Customer(c.to_owned())),
            (_, Some(a)) if !a.is_empty() => Some(Person::Visitor(a.to_owned())),
            _ => None,
        }
    }

    pub fn key(&self) -> String {
        match self {
            Person::Customer(id) => format!("c:{id}"),
            Person::Visitor(id) => format!("v:{id}"),
        }
    }

    pub fn from_key(key: &str) -> Option<Person> {
        if let Some(id) = key.strip_prefix("c:") {
            return Some(Person::Customer(id.to_owned()));
        }
        key.strip_prefix("v:")
            .map(|id| Person::Visitor(id.to_owned()))
    }
}

/// What can go wrong in segmentation.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The document has problems (each with its path).
    #[error("{}", relance_kit::yaml::describe(.0))]
    Invalid(Vec<Problem>),
    /// A request field is not acceptable.
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    /// No such (active) segment in the workspace.
    #[error("no segment named {0:?}")]
    NotFound(String),
    /// Another active segment refers to it.
    #[error(
        "segment {name:?} is used by {used_by:?} through in_segment; archive or change those first"
    )]
    InUse { name: String, used_by: Vec<String> },
    /// Postgres failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<SegmentError> for relance_kit::ApiError {
    fn from(error: SegmentError) -> relance_kit::ApiError {
        use relance_kit::ApiError;
        match error {
            SegmentError::Invalid(problems) => {
                // One problem per line, each starting with its path; the first one's path
                // is the status's field.
                let mut lines = problems.iter().map(ToString::to_string);
                let first = problems.first();
                let field = match first {
                    Some(p) if !p.field.is_empty() => p.field.clone(),
                    _ => "yaml".to_owned(),
                };
                let first_line = lines.next().unwrap_or_default();
                let first_reason = first_line
                    .strip_prefix(&format!("{field}: "))
                    .unwrap_or(&first_line)
                    .to_owned();
                let mut reason = first_reason;
                for line in lines {
                    reason.push('\n');
                    reason.push_str(&line);
                }
                ApiError::InvalidArgument { field, reason }
            }
            SegmentError::InvalidField { field, reason } => {
                ApiError::InvalidArgument { field, reason }
            }
            error @ SegmentError::NotFound(_) => ApiError::NotFound(error.to_string()),
            error @ SegmentError::InUse { .. } => ApiError::FailedPrecondition(error.to_string()),
            SegmentError::Database(error) => ApiError::from(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_selectors_names_and_dependencies() {
        let definition = parse::parse_definition(
            "kind: Segment\nname: x\nwhere:\n  all:\n    - event: cart_updated\n      within: 7d\n      not_followed_by: { event: order_completed, within: 24h }\n    - event: order_completed\n    - in_segment: vip\n",
        )
        .expect("valid");
        let compiled = Compiled::new(definition);
        assert_eq!(
            compiled.selectors.len(),
            2,
            "order_completed twice is one selector"
        );
        assert_eq!(
            compiled.event_names,
            vec!["cart_updated", "order_completed"]
        );
        assert_eq!(compiled.depends_on, vec!["vip"]);
        assert!(compiled.time_dependent);
        assert!(!compiled.reads_profile);
    }

    #[test]
    fn persons_round_trip_and_customers_sort_first() {
        let c = Person::of(Some("42"), Some("anon")).expect("person");
        assert_eq!(c.key(), "c:42");
        assert_eq!(
            Person::from_key("v:abc"),
            Some(Person::Visitor("abc".into()))
        );
        assert!(Person::Customer("z".into()).key() < Person::Visitor("a".into()).key());
    }

    #[test]
    fn invalid_documents_list_every_problem_by_path() {
        let problems = parse::parse_definition("kind: Segment\nname: x\nwhere:\n  all:\n    - event: a\n      within: 3x\n    - trait: t\n      gtt: 1\n")
            .expect_err("invalid");
        let status =
            tonic::Status::from(relance_kit::ApiError::from(SegmentError::Invalid(problems)));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let lines: Vec<&str> = status.message().lines().collect();
        assert_eq!(lines.len(), 2, "{}", status.message());
        assert!(
            lines[0].starts_with("where.all[0].within: \"3x\" is not a duration"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("where.all[1].gtt: unknown operator"),
            "{}",
            lines[1]
        );
    }
}
