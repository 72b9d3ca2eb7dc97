//! The JSON bodies that travel on RabbitMQ between services: the contract of the bus,
//! beside the gRPC contract in `proto/`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Routing key prefix of accepted events on [`crate::bus::EVENTS_EXCHANGE`].
pub const EVENT_KEY_PREFIX: &str = "event.";
/// Routing key of [`ProfileMerged`].
pub const PROFILE_MERGED: &str = "profile.merged";
/// Routing key of [`ProfileDeleted`].
pub const PROFILE_DELETED: &str = "profile.deleted";
/// Routing key of [`ProfileUpdated`].
pub const PROFILE_UPDATED: &str = "profile.updated";
/// Routing key of [`ProfilesRescored`].
pub const PROFILES_RESCORED: &str = "profile.rescored";
/// Routing key of a [`SegmentChanged`] that is an entry.
pub const SEGMENT_ENTERED: &str = "segment.entered";
/// Routing key of a [`SegmentChanged`] that is an exit.
pub const SEGMENT_EXITED: &str = "segment.exited";

/// An accepted event. Events travel in an [`EventBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The workspace it belongs to.
    pub workspace_id: String,
    /// The events service's sequence number.
    pub seq: i64,
    /// The sender's (or generated) unique id.
    pub message_id: String,
    /// Snake-case event name.
    pub name: String,
    /// Known customer, if any (filled in when the anonymous id was merged before).
    pub customer_id: Option<String>,
    /// Anonymous visitor, if any.
    pub anonymous_id: Option<String>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// When Relance accepted it.
    pub received_at: DateTime<Utc>,
    /// The event's properties (a JSON object).
    pub properties: serde_json::Value,
    /// The event's context (a JSON object of strings).
    pub context: serde_json::Value,
}

impl EventMessage {
    /// The id consumers deduplicate on: unique across workspaces.
    pub fn bus_id(&self) -> String {
        format!("{}:{}", self.workspace_id, self.message_id)
    }
}

/// Accepted events of one workspace and one name, published with the routing key
/// `event.<name>`: one AMQP message carries many events, because the broker's cost is per
/// message. Within a batch, events are in commit order. Across names, consumers must not
/// rely on delivery order (use each event's `timestamp`), and they deduplicate per event
/// on [`EventMessage::bus_id`], since a batch can be redelivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The events, all of the same workspace and name.
    pub events: Vec<EventMessage>,
}

impl EventBatch {
    /// The AMQP message id of the batch: the first event's id and the batch size.
    pub fn bus_id(&self) -> String {
        match self.events.first() {
            Some(first) => format!("{}+{}", first.bus_id(), self.events.len()),
            None => "empty".to_owned(),
        }
    }
}

/// An anonymous id was attached to a known customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileMerged {
    /// The workspace.
    pub workspace_id: String,
    /// The anonymous id that now belongs to `customer_id`.
    pub anonymous_id: String,
    /// The known customer.
    pub customer_id: String,
}

/// A customer was erased: every service erases what it holds on these ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileDeleted {
    /// The workspace.
    pub workspace_id: String,
    /// The known customer's id, if the profile had one.
    pub customer_id: Option<String>,
    /// Every anonymous id of the profile.
    pub anonymous_ids: Vec<String>,
}

/// A profile's attributes, addresses, consent or traits changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUpdated {
    /// The workspace.
    pub workspace_id: String,
    /// The known customer's id, if any.
    pub customer_id: Option<String>,
    /// The profile's anonymous ids.
    pub anonymous_ids: Vec<String>,
    /// Which parts changed: `attributes`, `addresses`, `consent`, `traits`, `timezone`, `locale`.
    pub changed: Vec<String>,
    /// When.
    pub at: DateTime<Utc>,
    /// The profile's attributes after the change, so that consumers (segments) need not
    /// call back.
    pub attributes: serde_json::Value,
    /// The computed traits after the change (orders_count, revenue, first/last purchase,
    /// rfm scores).
    pub traits: serde_json::Value,
    /// IANA timezone, if known.
    pub timezone: Option<String>,
}

/// RFM rescoring moved the scores of many customers at once: one message per chunk of
/// them (a `profile.updated` each would flood the broker after a large import).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfilesRescored {
    /// The workspace.
    pub workspace_id: String,
    /// Each moved profile, as in [`ProfileUpdated`] (`changed` is `["traits"]`).
    pub profiles: Vec<ProfileUpdated>,
}

/// A customer entered or left a segment (routing key `segment.entered` / `segment.exited`
/// on the events exchange).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentChanged {
    /// Unique per change: consumers deduplicate on it.
    pub id: String,
    /// The workspace.
    pub workspace_id: String,
    /// The segment's name.
    pub segment: String,
    /// The segment version whose membership changed.
    pub version: u32,
    /// True for an entry, false for an exit.
    pub entered: bool,
    /// The known customer, if the member is one.
    pub customer_id: Option<String>,
    /// The anonymous visitor, if the member is one (and not known).
    pub anonymous_id: Option<String>,
    /// The time that caused the change: the event's timestamp, the window boundary that
    /// passed, or the moment a new definition took effect.
    pub reason_at: DateTime<Utc>,
    /// What caused it: `event`, `profile`, `time`, `merge` or `definition`.
    pub cause: String,
    /// When segmentation decided it.
    pub at: DateTime<Utc>,
}

/// Routing key prefix of [`IngestEvents`]: events a service records about its own work
/// (`ingest.message_sent`), taken in by the events service like a TrackBatch.
pub const INGEST_KEY_PREFIX: &str = "ingest.";

/// Events to add to the event log, published by a service (delivery's `message_sent`,
/// `message_clicked`…) on the events exchange with the routing key `ingest.<name>`. The
/// events service deduplicates on each event's `message_id`, so a republished batch adds
/// nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestEvents {
    /// The workspace.
    pub workspace_id: String,
    /// The events.
    pub events: Vec<IngestEvent>,
}

/// One event of [`IngestEvents`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestEvent {
    /// Unique id: the events service drops a second event with the same id.
    pub message_id: String,
    /// Snake-case name.
    pub name: String,
    /// Known customer, if any.
    pub customer_id: Option<String>,
    /// Anonymous visitor, if any.
    pub anonymous_id: Option<String>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// Properties (a JSON object).
    pub properties: serde_json::Value,
}
