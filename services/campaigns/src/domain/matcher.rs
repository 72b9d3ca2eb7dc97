//! `where:` conditions on event properties and profile attributes.

use super::model::{EventMatch, PropertyCondition};

/// True when the event has the match's name and every condition holds on its properties.
pub fn matches(event: &EventMatch, name: &str, properties: &serde_json::Value) -> bool {
    let _ = (event, name, properties);
    unimplemented!("filled in by the parse/matcher work")
}

/// True when the condition holds on the JSON object (properties, attributes or traits).
pub fn passes(condition: &PropertyCondition, object: &serde_json::Value) -> bool {
    let _ = (condition, object);
    unimplemented!("filled in by the parse/matcher work")
}
