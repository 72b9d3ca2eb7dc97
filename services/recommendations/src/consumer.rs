//! Consumes the event stream: interactions go to the customers' histories (Redis), catalog
//! events to the catalog, merges and erasures to the histories. Every path is idempotent:
//! history members are keyed by event id, catalog writes are states with a time.

use std::sync::Arc;

use futures::future::BoxFuture;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{
    EVENT_KEY_PREFIX, EventBatch, PROFILE_DELETED, PROFILE_MERGED, ProfileDeleted, ProfileMerged,
};
use tokio::sync::Notify;

use crate::domain::catalog;
use crate::store::history::{History, PersonKey, Recorded};
use crate::store::{RecoStore, items_of, kind_of};

/// The queue recommendations consumes (one per deployment: replicas share it).
pub const QUEUE: &str = "recommendations.history";

/// A catalog item created or replaced; properties are the item's fields.
pub const CATALOG_ITEM_UPDATED: &str = "catalog_item_updated";
/// A catalog item removed; properties hold its `id`.
pub const CATALOG_ITEM_DELETED: &str = "catalog_item_deleted";

pub fn spec() -> ConsumerSpec {
    ConsumerSpec::new(QUEUE)
        .bind(EVENTS_EXCHANGE, "event.#")
        .bind(EVENTS_EXCHANGE, PROFILE_MERGED)
        .bind(EVENTS_EXCHANGE, PROFILE_DELETED)
}

#[derive(Debug)]
pub struct HistoryHandler {
    pub store: RecoStore,
    pub history: History,
    /// Wakes the snapshot refresh after a catalog change.
    pub catalog_changed: Arc<Notify>,
}

fn retry(error: impl Into<anyhow::Error>) -> HandleError {
    HandleError::Retry(error.into())
}

impl HistoryHandler {
    async fn events(&self, batch: EventBatch) -> Result<(), HandleError> {
        let mut recorded: Vec<(String, Recorded)> = Vec::new();
        for event in &batch.events {
            if event.name == CATALOG_ITEM_UPDATED || event.name == CATALOG_ITEM_DELETED {
                self.catalog_event(event).await?;
                continue;
            }
            let Some(kind) = kind_of(&event.name) else {
                continue;
            };
            let person = match (&event.customer_id, &event.anonymous_id) {
                (Some(customer), _) => PersonKey::Customer(customer.clone()),
                (None, Some(visitor)) => PersonKey::Visitor(visitor.clone()),
                (None, None) => continue,
            };
            for item in items_of(&event.properties) {
                recorded.push((
                    event.workspace_id.clone(),
                    Recorded {
                        person: person.clone(),
                        item,
                        kind,
                        at: event.timestamp.timestamp(),
                        // Keyed by time, as seeding from the event log keys them: a
                        // redelivery and a later `--seed-history` add nothing.
                        event_id: format!("t{}", event.timestamp.timestamp()),
                    },
                ));
            }
        }
        // One pipeline per workspace of the batch.
        recorded.sort_by(|a, b| a.0.cmp(&b.0));
        let mut start = 0;
        while start < recorded.len() {
            let workspace = recorded[start].0.clone();
            let mut end = start;
            while end < recorded.len() && recorded[end].0 == workspace {
                end += 1;
            }
            let entries: Vec<Recorded> = recorded[start..end]
                .iter()
                .map(|(_, r)| r.clone())
                .collect();
            self.history
                .record(&workspace, &entries)
                .await
                .map_err(retry)?;
            start = end;
        }
        Ok(())
    }

    async fn catalog_event(
        &self,
        event: &relance_kit::messages::EventMessage,
    ) -> Result<(), HandleError> {
        let at = event.timestamp;
        if event.name == CATALOG_ITEM_DELETED {
            let Some(id) = event.properties.get("id").and_then(|v| v.as_str()) else {
                tracing::warn!(message_id = %event.message_id, "catalog deletion without properties.id, skipped");
                return Ok(());
            };
            self.store
                .delete_items(&event.workspace_id, &[id.to_owned()], at)
                .await
                .map_err(retry)?;
        } else {
            let item = match catalog::item_from_json(&event.properties) {
                Ok(item) => item,
                Err(error) => {
                    // The event was accepted by the events service; refusing it here would
                    // only dead-letter the whole batch. Counted and logged instead.
                    metrics::counter!("relance_recommendations_catalog_events_refused_total")
                        .increment(1);
                    tracing::warn!(message_id = %event.message_id, %error, "catalog event refused");
                    return Ok(());
                }
            };
            self.store
                .upsert_items(&event.workspace_id, &[item], at)
                .await
                .map_err(retry)?;
        }
        self.catalog_changed.notify_one();
        Ok(())
    }
}

impl Handler for HistoryHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let malformed = |e: serde_json::Error| HandleError::Reject(e.into());
            match message.routing_key {
                PROFILE_MERGED => {
                    let merged: ProfileMerged =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.history
                        .merge(
                            &merged.workspace_id,
                            &merged.anonymous_id,
                            &merged.customer_id,
                        )
                        .await
                        .map_err(retry)
                }
                PROFILE_DELETED => {
                    let deleted: ProfileDeleted =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    let mut people: Vec<PersonKey> = deleted
                        .anonymous_ids
                        .iter()
                        .map(|a| PersonKey::Visitor(a.clone()))
                        .collect();
                    if let Some(customer) = &deleted.customer_id {
                        people.push(PersonKey::Customer(customer.clone()));
                    }
                    self.history
                        .erase(&deleted.workspace_id, &people)
                        .await
                        .map_err(retry)
                }
                key if key.starts_with(EVENT_KEY_PREFIX) => {
                    let batch: EventBatch =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.events(batch).await
                }
                other => Err(HandleError::Reject(anyhow::anyhow!(
                    "unexpected routing key {other}"
                ))),
            }
        })
    }
}
