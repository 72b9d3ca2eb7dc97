//! Consumes accepted events and profile changes, in one queue so that a customer's
//! changes are applied in the order they were published.

use std::collections::HashMap;

use futures::future::BoxFuture;
use relance_kit::SharedClock;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{
    EventBatch, EventMessage, PROFILE_DELETED, PROFILE_MERGED, PROFILE_UPDATED, PROFILES_RESCORED,
    ProfileDeleted, ProfileMerged, ProfileUpdated, ProfilesRescored,
};

use crate::domain::SegmentError;
use crate::store::SegmentStore;
use crate::store::realtime::AfterCommit;

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

/// Applies messages in transactions (several waiting ones together); every path is
/// idempotent (events are deduplicated by id, profile changes are states, not increments).
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

/// One decoded message.
enum Change {
    Events(EventBatch),
    ProfileUpdated(ProfileUpdated),
    ProfilesRescored(ProfilesRescored),
    ProfileMerged(ProfileMerged),
    ProfileDeleted(ProfileDeleted),
}

fn decode(message: &Received<'_>) -> Result<Change, HandleError> {
    Ok(match message.routing_key {
        PROFILE_UPDATED => {
            Change::ProfileUpdated(serde_json::from_slice(message.payload).map_err(malformed)?)
        }
        PROFILES_RESCORED => {
            Change::ProfilesRescored(serde_json::from_slice(message.payload).map_err(malformed)?)
        }
        PROFILE_MERGED => {
            Change::ProfileMerged(serde_json::from_slice(message.payload).map_err(malformed)?)
        }
        PROFILE_DELETED => {
            Change::ProfileDeleted(serde_json::from_slice(message.payload).map_err(malformed)?)
        }
        key if key.starts_with(relance_kit::messages::EVENT_KEY_PREFIX) => {
            Change::Events(serde_json::from_slice(message.payload).map_err(malformed)?)
        }
        other => {
            return Err(HandleError::Reject(anyhow::anyhow!(
                "unexpected routing key {other}"
            )));
        }
    })
}

impl ChangeHandler {
    /// Applies changes in order inside one transaction. `traces` holds the trace context
    /// each change arrived in, index for index: in a batch (one span for many messages) the
    /// segment changes an event causes are announced in the event's trace; without one they
    /// join the current span's.
    async fn apply(&self, changes: &[Change], traces: &[Option<&str>]) -> Result<(), SegmentError> {
        let now = self.clock.now();
        let mut event_traces: HashMap<String, String> = HashMap::new();
        for (change, trace) in changes.iter().zip(traces) {
            if let (Change::Events(batch), Some(trace)) = (change, trace) {
                for event in &batch.events {
                    event_traces.insert(event.message_id.clone(), (*trace).to_owned());
                }
            }
        }
        let mut tx = self.store.pool().begin().await?;
        let mut after = AfterCommit::default();
        // Consecutive event batches of one workspace are applied as one (one pass of locks,
        // dedup, aggregates and evaluation for all their customers); order is kept.
        let mut pending: Vec<EventMessage> = Vec::new();
        for change in changes {
            if let Change::Events(batch) = change {
                for event in &batch.events {
                    if pending
                        .first()
                        .is_some_and(|p| p.workspace_id != event.workspace_id)
                    {
                        self.store
                            .apply_events(&mut tx, &pending, &event_traces, now, &mut after)
                            .await?;
                        pending.clear();
                    }
                    pending.push(event.clone());
                }
                continue;
            }
            if !pending.is_empty() {
                self.store
                    .apply_events(&mut tx, &pending, &event_traces, now, &mut after)
                    .await?;
                pending.clear();
            }
            match change {
                Change::ProfileUpdated(updated) => {
                    self.store
                        .profiles_updated(&mut tx, std::slice::from_ref(updated), now, &mut after)
                        .await?;
                }
                Change::ProfilesRescored(rescored) => {
                    self.store
                        .profiles_updated(&mut tx, &rescored.profiles, now, &mut after)
                        .await?;
                }
                Change::ProfileMerged(merged) => {
                    self.store
                        .profile_merged(&mut tx, merged, now, &mut after)
                        .await?;
                }
                Change::ProfileDeleted(deleted) => {
                    self.store
                        .profile_deleted(&mut tx, deleted, &mut after)
                        .await?;
                }
                Change::Events(_) => {}
            }
        }
        if !pending.is_empty() {
            self.store
                .apply_events(&mut tx, &pending, &event_traces, now, &mut after)
                .await?;
        }
        tx.commit().await?;
        self.store.finish(after).await;
        Ok(())
    }
}

/// Messages waiting in the queue are applied together, in one transaction: one commit
/// (one WAL flush) for many events instead of one each.
const MAX_BATCH: usize = 64;

impl Handler for ChangeHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let change = decode(message)?;
            // Alone, the message's changes are announced in the consuming span's trace
            // (a child of the message's); see `apply`.
            self.apply(std::slice::from_ref(&change), &[None])
                .await
                .map_err(retry)
        })
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn handle_batch<'a>(
        &'a self,
        messages: &'a [Received<'a>],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let mut changes = Vec::with_capacity(messages.len());
            let mut traces = Vec::with_capacity(messages.len());
            for message in messages {
                changes.push(decode(message)?);
                traces.push(message.trace);
            }
            self.apply(&changes, &traces).await.map_err(retry)
        })
    }
}
