//! Consumes accepted events: purchases update computed traits; an event that carries both
//! a customer id and an anonymous id merges the visitor into the customer.

use std::sync::Arc;

use futures::future::BoxFuture;
use relance_kit::SharedClock;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::messages::EventMessage;

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

fn retry_or_reject(error: ProfileError) -> HandleError {
    match error {
        ProfileError::Database(error) => HandleError::Retry(error.into()),
        // A merge that conflicts or an invalid id will never succeed: dead-letter it.
        other => HandleError::Reject(other.into()),
    }
}

impl Handler for EventHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            let event: EventMessage = serde_json::from_slice(message.payload)
                .map_err(|e| HandleError::Reject(e.into()))?;
            let now = self.clock.now();
            if let (Some(customer), Some(anonymous)) = (&event.customer_id, &event.anonymous_id) {
                self.store
                    .merge(&event.workspace_id, anonymous, customer, now)
                    .await
                    .map_err(retry_or_reject)?;
            }
            let Some(effect) = traits::effect_of(&event.name, &event.properties, event.timestamp)
            else {
                return Ok(());
            };
            let key = match (&event.customer_id, &event.anonymous_id) {
                (Some(customer), _) => CustomerKey::Customer(customer.clone()),
                (None, Some(anonymous)) => CustomerKey::Anonymous(anonymous.clone()),
                (None, None) => {
                    return Err(HandleError::Reject(anyhow::anyhow!("event without any id")));
                }
            };
            let applied = self
                .store
                .apply_purchase(&event.workspace_id, &event.bus_id(), &key, effect, now)
                .await
                .map_err(retry_or_reject)?;
            if applied {
                self.purchases_seen
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
    }
}
