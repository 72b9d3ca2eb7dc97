//! YAML documents with positions: segments and flows are written by people, so a problem
//! must name the path of the field *and* its line and column. `serde_yaml`'s values carry
//! no positions; this module builds a small tree from the parser's marked events instead.

use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One node of a document, with where it starts (1-based line and column).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: u32,
    pub column: u32,
}

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// A scalar. `plain` is false for quoted scalars, which are always strings.
    Scalar { text: String, plain: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order; keys are scalars.
    Map(Vec<(String, Node)>),
}

/// A problem found in a document: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, e.g. `where.all[1].event.within`; empty for the document.
    pub field: String,
    /// Why, in plain words.
    pub reason: String,
    /// 1-based line; 0 when unknown.
    pub line: u32,
    /// 1-based column; 0 when unknown.
    pub column: u32,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)?;
        } else {
            write!(f, "{}: {}", self.field, self.reason)?;
        }
        if self.line > 0 {
            write!(f, " (line {}, column {})", self.line, self.column)?;
        }
        Ok(())
    }
}

/// Every problem of a document, one per line (the message of an INVALID_ARGUMENT status).
pub fn describe(problems: &[Problem]) -> String {
    let mut text = String::new();
    for (i, problem) in problems.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text.push_str(&problem.to_string());
    }
    text
}

impl Node {
    /// A problem at this node.
    pub fn problem(&self, field: &str, reason: impl Into<String>) -> Problem {
        Problem {
            field: field.to_owned(),
            reason: reason.into(),
            line: self.line,
            column: self.column,
        }
    }

    /// The mapping's entries, if it is one.
    pub fn as_map(&self) -> Option<&[(String, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value of `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, node)| node)
    }

    /// The sequence's items, if it is one.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// The scalar's text (quoted or not), if it is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The node as JSON, reading plain scalars as YAML 1.2 core types (null, booleans,
    /// integers, floats) and quoted ones as strings.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Scalar { text, plain: false } => serde_json::Value::String(text.clone()),
            Value::Scalar { text, plain: true } => plain_scalar(text),
            Value::Seq(items) => {
                serde_json::Value::Array(items.iter().map(Node::to_json).collect())
            }
            Value::Map(entries) => {
                let mut object = serde_json::Map::new();
                for (key, node) in entries {
                    object.insert(key.clone(), node.to_json());
                }
                serde_json::Value::Object(object)
            }
        }
    }

    /// A short name of the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

fn plain_scalar(text: &str) -> serde_json::Value {
    match text {
        "~" | "null" | "Null" | "NULL" | "" => return serde_json::Value::Null,
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(integer) = text.parse::<i64>() {
        return serde_json::Value::from(integer);
    }
    let looks_numeric = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if looks_numeric && let Ok(float) = text.parse::<f64>() {
        return serde_json::Value::from(float);
    }
    serde_json::Value::String(text.to_owned())
}

/// Parses one YAML document. Anchors and aliases are refused (a definition should read as
/// written), as are duplicate keys and non-scalar keys.
pub fn parse(text: &str) -> Result<Node, Problem> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(error) = parser.load(&mut builder, false) {
        let marker = error.marker();
        return Err(Problem {
            field: String::new(),
            reason: format!("not valid YAML: {}", error.info()),
            line: marker.line() as u32,
            column: marker.col() as u32 + 1,
        });
    }
    if let Some(problem) = builder.problem {
        return Err(problem);
    }
    builder.root.ok_or_else(|| Problem {
        field: String::new(),
        reason: "the document is empty".to_owned(),
        line: 0,
        column: 0,
    })
}

enum Open {
    Seq(Node),
    Map(Node, Option<String>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    problem: Option<Problem>,
}

impl Builder {
    fn fail(&mut self, mark: Marker, reason: &str) {
        if self.problem.is_none() {
            self.problem = Some(Problem {
                field: String::new(),
                reason: reason.to_owned(),
                line: mark.line() as u32,
                column: mark.col() as u32 + 1,
            });
        }
    }

    /// Attaches a finished node to its parent (or makes it the root).
    fn attach(&mut self, node: Node, mark: Marker) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open::Seq(seq)) => {
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Open::Map(map, pending_key)) => match pending_key.take() {
                None => match node.value {
                    Value::Scalar { text, .. } => {
                        let duplicate = map
                            .as_map()
                            .is_some_and(|entries| entries.iter().any(|(k, _)| *k == text));
                        if duplicate {
                            let reason = format!("the key `{text}` appears twice");
                            self.fail(mark, &reason);
                        } else {
                            *pending_key = Some(text);
                        }
                    }
                    Value::Null => *pending_key = Some(String::new()),
                    _ => self.fail(mark, "mapping keys must be plain text"),
                },
                Some(key) => {
                    if let Value::Map(entries) = &mut map.value {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line() as u32;
        let column = mark.col() as u32 + 1;
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                if anchor != 0 {
                    self.fail(mark, "anchors and aliases are not supported");
                }
                let plain = style == TScalarStyle::Plain;
                let value = if plain && matches!(text.as_str(), "~" | "null" | "") {
                    Value::Null
                } else {
                    Value::Scalar { text, plain }
                };
                self.attach(
                    Node {
                        value,
                        line,
                        column,
                    },
                    mark,
                );
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) if anchor != 0 => {
                self.fail(mark, "anchors and aliases are not supported");
                let value = if matches!(event, Event::SequenceStart(..)) {
                    Open::Seq(Node {
                        value: Value::Seq(Vec::new()),
                        line,
                        column,
                    })
                } else {
                    Open::Map(
                        Node {
                            value: Value::Map(Vec::new()),
                            line,
                            column,
                        },
                        None,
                    )
                };
                self.stack.push(value);
            }
            Event::SequenceStart(..) => self.stack.push(Open::Seq(Node {
                value: Value::Seq(Vec::new()),
                line,
                column,
            })),
            Event::MappingStart(..) => self.stack.push(Open::Map(
                Node {
                    value: Value::Map(Vec::new()),
                    line,
                    column,
                },
                None,
            )),
            Event::SequenceEnd => {
                if let Some(Open::Seq(node)) = self.stack.pop() {
                    self.attach(node, mark);
                }
            }
            Event::MappingEnd => {
                if let Some(Open::Map(node, _)) = self.stack.pop() {
                    self.attach(node, mark);
                }
            }
            Event::Alias(_) => self.fail(mark, "anchors and aliases are not supported"),
            Event::DocumentStart => {
                if self.root.is_some() {
                    self.fail(mark, "one document per request: remove the second `---`");
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Splits a multi-document file (`---` separators) into its documents' texts, so each can
/// be applied on its own.
pub fn split_documents(text: &str) -> Vec<String> {
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            if !current.trim().is_empty() {
                documents.push(std::mem::take(&mut current));
            }
            current.clear();
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        documents.push(current);
    }
    documents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_tree_with_positions() {
        let doc = parse("kind: Segment\nwhere:\n  all:\n    - event: order_completed\n      count: { gte: 1 }\n").expect("parses");
        let all = doc
            .get("where")
            .and_then(|w| w.get("all"))
            .and_then(Node::as_seq)
            .expect("all is a list");
        assert_eq!(all.len(), 1);
        let count = all[0].get("count").expect("count");
        assert_eq!((count.line, count.column), (5, 14));
        assert_eq!(count.to_json(), serde_json::json!({"gte": 1}));
    }

    #[test]
    fn plain_scalars_are_typed_and_quoted_ones_are_strings() {
        let doc = parse("a: 1\nb: '1'\nc: true\nd: 2.5\ne: ~\nf: 30d\n").expect("parses");
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": 1, "b": "1", "c": true, "d": 2.5, "e": null, "f": "30d"})
        );
    }

    #[test]
    fn refuses_duplicates_aliases_and_bad_syntax() {
        let duplicate = parse("a: 1\na: 2\n").expect_err("duplicate key");
        assert!(duplicate.reason.contains("appears twice"), "{duplicate}");
        assert_eq!(duplicate.line, 2);
        let alias = parse("a: &x 1\nb: *x\n").expect_err("alias");
        assert!(alias.reason.contains("anchors"), "{alias}");
        let broken = parse("a: [1, 2\n").expect_err("syntax");
        assert!(broken.reason.starts_with("not valid YAML"), "{broken}");
        assert!(parse("").is_err());
    }

    #[test]
    fn splits_documents() {
        let docs = split_documents("a: 1\n---\nb: 2\n---\n\n");
        assert_eq!(docs, vec!["a: 1\n".to_owned(), "b: 2\n".to_owned()]);
    }
}
