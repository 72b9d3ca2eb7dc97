//! Consumes accepted events and profile changes, in one queue so that a customer's
//! changes are applied in the order they were published.

use futures::future::BoxFuture;
use relance_kit::SharedClock;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{
    EventBatch, PROFILE_DELETED, PROFILE_MERGED, PROFILE_UPDATED, PROFILES_RESCORED,
    ProfileDeleted, ProfileMerged, ProfileUpdated, ProfilesRescored,
};

use crate::domain::SegmentError;
use crate::store::SegmentStore;

/// The queue segmentation consumes.
pub const QUEUE: &str = "segmentation.changes";

pub fn spec() -> ConsumerSpec {
    ConsumerSpec::new(QUEUE)
        .bind(EVENTS_EXCHANGE, "event.#")
        .bind(EVENTS_EXCHANGE, PROFILE_UPDATED)
        .bind(EVENTS_EXCHANGE, PROFILES_RESCORED)
        .bind(EVENTS_EXCHANGE, PROFILE_MERGED)
        .bind(EVENTS_EXCHANGE, PROFILE_DELETED)
}

/// Applies each message in one transaction; every path is idempotent (events are
/// deduplicated by id, profile changes are states, not increments).
#[derive(Debug)]
pub struct ChangeHandler {
    pub store: SegmentStore,
    pub clock: SharedClock,
}

fn retry(error: SegmentError) -> HandleError {
    HandleError::Retry(error.into())
}

fn malformed(error: serde_json::Error) -> HandleError {
    HandleError::Reject(error.into())
}

impl Handler for ChangeHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let now = self.clock.now();
            match message.routing_key {
                PROFILE_UPDATED => {
                    let updated: ProfileUpdated =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.store
                        .profiles_updated(std::slice::from_ref(&updated), now)
                        .await
                        .map_err(retry)?;
                }
                PROFILES_RESCORED => {
                    let rescored: ProfilesRescored =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.store
                        .profiles_updated(&rescored.profiles, now)
                        .await
                        .map_err(retry)?;
                }
                PROFILE_MERGED => {
                    let merged: ProfileMerged =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.store
                        .profile_merged(&merged, now)
                        .await
                        .map_err(retry)?;
                }
                PROFILE_DELETED => {
                    let deleted: ProfileDeleted =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.store.profile_deleted(&deleted).await.map_err(retry)?;
                }
                key if key.starts_with(relance_kit::messages::EVENT_KEY_PREFIX) => {
                    let batch: EventBatch =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    // A batch holds one workspace's events; split defensively all the same.
                    let mut start = 0;
                    while start < batch.events.len() {
                        let workspace = &batch.events[start].workspace_id;
                        let mut end = start + 1;
                        while end < batch.events.len()
                            && batch.events[end].workspace_id == *workspace
                        {
                            end += 1;
                        }
                        self.store
                            .apply_events(&batch.events[start..end], now)
                            .await
                            .map_err(retry)?;
                        start = end;
                    }
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
