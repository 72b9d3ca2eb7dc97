//! Ingestion: validate, drop repeats, store, wake the relay.

use std::sync::Arc;

use relance_kit::SharedClock;
use tokio::sync::Notify;

use crate::domain::{self, FieldError, Limits, RawEvent};
use crate::store::EventStore;

/// The outcome of ingesting a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events stored now.
    pub accepted: u64,
    /// Events already stored (same message id), now or earlier in the same batch.
    pub duplicates: u64,
    /// (index in the batch, what is wrong).
    pub rejected: Vec<(usize, FieldError)>,
}

/// Validates and stores events for one workspace at a time.
#[derive(Debug, Clone)]
pub struct Ingestor {
    pub store: Arc<EventStore>,
    pub clock: SharedClock,
    pub limits: Limits,
    /// Notified after each commit so that the relay publishes at once.
    pub relay_wake: Arc<Notify>,
}

impl Ingestor {
    /// Validates every event, stores the valid ones in one statement, and reports the rest.
    pub async fn ingest(&self, workspace_id: &str, batch: Vec<RawEvent>) -> sqlx::Result<Outcome> {
        let now = self.clock.now();
        let mut valid = Vec::with_capacity(batch.len());
        let mut outcome = Outcome::default();
        for (index, raw) in batch.into_iter().enumerate() {
            match domain::validate(raw, now, &self.limits, || uuid::Uuid::now_v7().to_string()) {
                Ok(event) => valid.push((index, event)),
                Err(error) => outcome.rejected.push((index, error)),
            }
        }
        let (unique, repeats) = domain::first_of_each_id(valid);
        let events: Vec<_> = unique.into_iter().map(|(_, event)| event).collect();
        let stored = self.store.insert(workspace_id, &events, now).await?;
        if stored > 0 {
            self.relay_wake.notify_one();
        }
        outcome.accepted = stored;
        outcome.duplicates = (events.len() as u64 - stored) + repeats as u64;
        metrics::counter!("relance_events_accepted_total").increment(outcome.accepted);
        metrics::counter!("relance_events_duplicates_total").increment(outcome.duplicates);
        metrics::counter!("relance_events_rejected_total").increment(outcome.rejected.len() as u64);
        Ok(outcome)
    }
}
