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

/// An accepted event, published with the routing key `event.<name>` and the AMQP message id
/// `<workspace_id>:<message_id>`.
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
