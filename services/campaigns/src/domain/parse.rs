//! Reads `kind: Flow` and `kind: Broadcast` YAML documents into the model, collecting every
//! problem with the path of the field at fault, its line and its column.

use relance_kit::yaml::Problem;

use super::model::{BroadcastDef, FlowDef};

/// Largest accepted flow document.
pub const MAX_FLOW_BYTES: usize = 256 * 1024;
/// Largest accepted broadcast document.
pub const MAX_BROADCAST_BYTES: usize = 64 * 1024;

/// Parses and validates a flow document (everything but the existence of the segments and
/// templates it names, which the caller checks against the other services).
pub fn parse_flow(text: &str) -> Result<FlowDef, Vec<Problem>> {
    let _ = text;
    unimplemented!()
}

/// Parses and validates a broadcast document.
pub fn parse_broadcast(text: &str) -> Result<BroadcastDef, Vec<Problem>> {
    let _ = text;
    unimplemented!()
}

/// Checks a broadcast built from a structured spec; each problem's field starts with
/// `prefix` (e.g. `spec.`), as in `spec.variants[1].weight`.
pub fn check_broadcast(def: &BroadcastDef, prefix: &str) -> Vec<Problem> {
    let _ = (def, prefix);
    unimplemented!()
}

/// Checks a flow or broadcast name: 1 to 64 characters, lowercase letters, digits and `-`,
/// starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let _ = name;
    unimplemented!()
}

/// `90s`, `15m`, `1h`, `7d`, `2w`, `1h30m` → seconds; `None` when unreadable or not positive.
pub fn parse_duration_secs(text: &str) -> Option<i64> {
    let _ = text;
    unimplemented!()
}

/// Seconds → the shortest document form (`72h` stays `3d`, `5400` is `1h30m`).
pub fn format_duration(secs: i64) -> String {
    let _ = secs;
    unimplemented!()
}
