//! Consumes `profile.merged` and `profile.deleted`: re-attributes an anonymous visitor's
//! events to the customer, and erases a deleted customer's events.

use std::sync::Arc;

use futures::future::BoxFuture;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{PROFILE_DELETED, PROFILE_MERGED, ProfileDeleted, ProfileMerged};

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
