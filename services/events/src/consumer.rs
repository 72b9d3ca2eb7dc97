//! Consumes `profile.merged` and `profile.deleted`: re-attributes an anonymous visitor's
//! events to the customer, and erases a deleted customer's events.

use std::sync::Arc;

use futures::future::BoxFuture;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{
    INGEST_KEY_PREFIX, IngestEvents, PROFILE_DELETED, PROFILE_MERGED, ProfileDeleted, ProfileMerged,
};

use crate::domain::RawEvent;
use crate::ingest::Ingestor;
use crate::store::EventStore;

/// The queue of identity changes.
pub fn spec() -> ConsumerSpec {
    ConsumerSpec::new("events.identity")
        .bind(EVENTS_EXCHANGE, PROFILE_MERGED)
        .bind(EVENTS_EXCHANGE, PROFILE_DELETED)
}

/// Handles identity changes; both are idempotent by nature (upsert, delete).
#[derive(Debug)]
pub struct IdentityHandler {
    pub store: Arc<EventStore>,
}

impl Handler for IdentityHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            match message.routing_key {
                PROFILE_MERGED => {
                    let merged: ProfileMerged = serde_json::from_slice(message.payload)
                        .map_err(|e| HandleError::Reject(e.into()))?;
                    let moved = self.store.link_identity(&merged).await?;
                    tracing::info!(workspace = %merged.workspace_id, moved, "anonymous events re-attributed");
                }
                PROFILE_DELETED => {
                    let deleted: ProfileDeleted = serde_json::from_slice(message.payload)
                        .map_err(|e| HandleError::Reject(e.into()))?;
                    let erased = self.store.erase(&deleted).await?;
                    tracing::info!(workspace = %deleted.workspace_id, erased, "customer's events erased");
                }
                other => {
                    return Err(HandleError::Reject(anyhow::anyhow!(
                        "unexpected routing key {other}"
                    )));
                }
            }
            Ok(())
        })
    }
}

/// The queue of events other services record about their own work (`ingest.*`).
pub fn ingest_spec() -> ConsumerSpec {
    ConsumerSpec::new("events.ingest").bind(EVENTS_EXCHANGE, &format!("{INGEST_KEY_PREFIX}#"))
}

/// Takes in [`IngestEvents`] as a TrackBatch would: validated, deduplicated on the message
/// id (so a redelivered batch adds nothing), stored and relayed.
#[derive(Debug)]
pub struct IngestHandler {
    pub ingestor: Ingestor,
}

impl Handler for IngestHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let batch: IngestEvents = serde_json::from_slice(message.payload)
                .map_err(|e| HandleError::Reject(e.into()))?;
            let mut raw = Vec::with_capacity(batch.events.len());
            for event in batch.events {
                raw.push(RawEvent {
                    message_id: event.message_id,
                    name: event.name,
                    customer_id: event.customer_id.unwrap_or_default(),
                    anonymous_id: event.anonymous_id.unwrap_or_default(),
                    timestamp: Some(Some(event.timestamp)),
                    properties: event.properties,
                    context: vec![("source".to_owned(), "relance".to_owned())],
                });
            }
            let outcome = self.ingestor.ingest(&batch.workspace_id, raw).await?;
            for (index, error) in &outcome.rejected {
                tracing::warn!(workspace = %batch.workspace_id, index, field = %error.field, reason = %error.reason, "ingested event refused");
            }
            Ok(())
        })
    }
}
