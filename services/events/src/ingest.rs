//! Ingestion: validate, drop repeats, store, wake the relay.

use std::sync::Arc;

use relance_kit::SharedClock;
use tokio::sync::Notify;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use relance_kit::messages::EventMessage;

use crate::domain::{self, FieldError, Limits, NewEvent, RawEvent};
use crate::relay::RelayCache;
use crate::store::{EventStore, RelayKey, Stored};

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
    /// Where committed events wait for the relay.
    pub relay_cache: Arc<RelayCache>,
}

/// The stored events as the relay publishes them.
fn to_publish(
    workspace_id: &str,
    events: Vec<NewEvent>,
    stored: Vec<Stored>,
    received_at: DateTime<Utc>,
) -> Vec<(RelayKey, EventMessage)> {
    let mut by_id: HashMap<String, NewEvent> = HashMap::with_capacity(events.len());
    for event in events {
        by_id.insert(event.message_id.clone(), event);
    }
    let mut out = Vec::with_capacity(stored.len());
    for row in stored {
        let Some(event) = by_id.remove(&row.message_id) else {
            continue;
        };
        out.push((
            row.key,
            EventMessage {
                workspace_id: workspace_id.to_owned(),
                seq: row.key.seq,
                message_id: row.message_id,
                name: event.name,
                customer_id: row.customer_id,
                anonymous_id: event.anonymous_id,
                timestamp: event.timestamp,
                received_at,
                properties: event.properties_value,
                context: event.context_value,
            },
        ));
    }
    out
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
        let submitted = events.len() as u64;
        let mut pending = self.store.insert(workspace_id, &events, now).await?;
        let stored = std::mem::take(&mut pending.stored);
        outcome.accepted = stored.len() as u64;
        outcome.duplicates = (submitted - outcome.accepted) + repeats as u64;
        // Handed over before the commit, so the relay (which sees rows only once they are
        // committed) finds them in memory instead of reading them back. Should the commit
        // fail, their keys never appear in the log: the relay never asks for them, and they
        // leave the cache once the relay has moved past them.
        if !stored.is_empty() {
            self.relay_cache.put(
                to_publish(workspace_id, events, stored, now),
                relance_kit::trace::current(),
            );
        }
        pending.commit().await?;
        if outcome.accepted > 0 {
            self.relay_wake.notify_one();
        }
        metrics::counter!("relance_events_accepted_total").increment(outcome.accepted);
        metrics::counter!("relance_events_duplicates_total").increment(outcome.duplicates);
        metrics::counter!("relance_events_rejected_total").increment(outcome.rejected.len() as u64);
        Ok(outcome)
    }
}
