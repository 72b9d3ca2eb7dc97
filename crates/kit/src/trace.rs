//! W3C trace context where a span cannot go: in outbox rows, journeys and queued send
//! requests, which are picked up later by another task or process. Each carries the
//! `traceparent` of the span that caused it, so one trace runs from a Track call through the
//! segment change and the journey step to the provider call.

use std::collections::HashMap;

use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and column value) name of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, if it belongs to a sampled or recorded trace.
pub fn current() -> Option<String> {
    of_span(&tracing::Span::current())
}

/// The `traceparent` of `span`.
pub fn of_span(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier);
    });
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the trace `traceparent` names; nothing when it is absent or not
/// a valid trace context (the span then starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert(TRACEPARENT.to_owned(), traceparent.to_owned());
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    let _ = span.set_parent(parent);
}
