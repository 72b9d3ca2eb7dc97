//! Consumes accepted events: purchases update computed traits; an event that carries both
//! a customer id and an anonymous id merges the visitor into the customer.

use std::sync::Arc;

use futures::future::BoxFuture;
use relance_kit::SharedClock;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::{EventBatch, EventMessage};

use crate::domain::{CustomerKey, ProfileError, traits};
use crate::store::{ProfileStore, TRAITS_CONSUMER};

/// The queue of accepted events.
pub fn spec() -> ConsumerSpec {
    ConsumerSpec::new(TRAITS_CONSUMER).bind(EVENTS_EXCHANGE, "event.#")
}

/// Updates traits and identities from events.
#[derive(Debug)]
pub struct EventHandler {
    pub store: ProfileStore,
    pub clock: SharedClock,
    /// Set when a purchase changed traits, so the RFM rescoring runs soon.
    pub purchases_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl EventHandler {
    /// Applies one event: a merge when it carries both ids, traits when it is a purchase.
    ///
    /// Only a database failure is an error (the batch is retried; every step is idempotent).
    /// A merge that can never succeed (the visitor belongs to someone else) is logged and
    /// skipped, so it does not hold back the rest of the batch.
    async fn apply(&self, event: &EventMessage) -> Result<(), ProfileError> {
        let now = self.clock.now();
        if let (Some(customer), Some(anonymous)) = (&event.customer_id, &event.anonymous_id) {
            match self
                .store
                .merge(&event.workspace_id, anonymous, customer, now)
                .await
            {
                Ok(_) => {}
                Err(ProfileError::Database(error)) => return Err(ProfileError::Database(error)),
                Err(refused) => {
                    tracing::warn!(workspace = %event.workspace_id, message_id = %event.message_id, error = %refused, "identity merge refused");
                }
            }
        }
        let Some(effect) = traits::effect_of(&event.name, &event.properties, event.timestamp)
        else {
            return Ok(());
        };
        let key = match (&event.customer_id, &event.anonymous_id) {
            (Some(customer), _) => CustomerKey::Customer(customer.clone()),
            (None, Some(anonymous)) => CustomerKey::Anonymous(anonymous.clone()),
            (None, None) => return Ok(()),
        };
        let applied = self
            .store
            .apply_purchase(&event.workspace_id, &event.bus_id(), &key, effect, now)
            .await?;
        if applied {
            self.purchases_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Handler for EventHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let batch: EventBatch = serde_json::from_slice(message.payload)
                .map_err(|e| HandleError::Reject(e.into()))?;
            for event in &batch.events {
                self.apply(event)
                    .await
                    .map_err(|error| HandleError::Retry(error.into()))?;
            }
            Ok(())
        })
    }
}
