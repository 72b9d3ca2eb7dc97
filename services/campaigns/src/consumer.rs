//! Consumes the event stream and segment changes: keeps the activity flows react to and the
//! outcome of campaign messages, starts journeys (event and segment triggers), ends those
//! whose customer reached the goal, and wakes those waiting for the event. Every path is
//! idempotent: activity and messages are keyed by id, a journey by its trigger's id, and
//! ending or waking twice changes nothing.

use std::collections::HashSet;

use futures::future::BoxFuture;
use relance_kit::SharedClock;
use relance_kit::bus::{ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Received};
use relance_kit::error::ApiError;
use relance_kit::messages::{
    EVENT_KEY_PREFIX, EventBatch, EventMessage, PROFILE_DELETED, ProfileDeleted, SEGMENT_ENTERED,
    SegmentChanged,
};

use crate::clients::Clients;
use crate::domain::experiment;
use crate::domain::matcher;
use crate::domain::model::Trigger;
use crate::store::CampaignStore;
use crate::store::activity::{ActivityRow, BEST_TIME_EVENTS, MessageUpdate};
use crate::store::flows::FlowStatus;
use crate::store::journeys::NewJourney;

/// The queue campaigns consumes.
pub const QUEUE: &str = "campaigns.events";

pub fn spec() -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(QUEUE)
        .bind(EVENTS_EXCHANGE, "event.#")
        .bind(EVENTS_EXCHANGE, SEGMENT_ENTERED)
        .bind(EVENTS_EXCHANGE, PROFILE_DELETED);
    spec.prefetch = 256;
    spec
}

/// Applies events and changes.
#[derive(Debug)]
pub struct EventHandler {
    pub store: CampaignStore,
    pub clients: Clients,
    pub clock: SharedClock,
}

fn retry(error: ApiError) -> HandleError {
    HandleError::Retry(anyhow::anyhow!("{error}"))
}

fn malformed(error: serde_json::Error) -> HandleError {
    HandleError::Reject(error.into())
}

impl Handler for EventHandler {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            match message.routing_key {
                SEGMENT_ENTERED => {
                    let change: SegmentChanged =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.segment_entered(&change).await.map_err(retry)
                }
                PROFILE_DELETED => {
                    let deleted: ProfileDeleted =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    if let Some(customer_id) = &deleted.customer_id {
                        self.store
                            .erase_customer(&deleted.workspace_id, customer_id, self.clock.now())
                            .await
                            .map_err(retry)?;
                    }
                    Ok(())
                }
                key if key.starts_with(EVENT_KEY_PREFIX) => {
                    let batch: EventBatch =
                        serde_json::from_slice(message.payload).map_err(malformed)?;
                    self.events(&batch.events).await.map_err(retry)
                }
                other => Err(HandleError::Reject(anyhow::anyhow!(
                    "unexpected routing key {other}"
                ))),
            }
        })
    }
}

impl EventHandler {
    /// One batch: all of one workspace and one name.
    async fn events(&self, events: &[EventMessage]) -> Result<(), ApiError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let workspace_id = first.workspace_id.as_str();
        let name = first.name.as_str();
        let now = self.clock.now();
        let flows = self.store.live_flows(workspace_id).await?;

        // Only known customers have journeys.
        let known: Vec<&EventMessage> = events.iter().filter(|e| e.customer_id.is_some()).collect();
        if known.is_empty() {
            return Ok(());
        }

        let mut interesting = name.starts_with("message_") || BEST_TIME_EVENTS.contains(&name);
        if !interesting {
            for flow in flows.iter() {
                if flow.def.event_names().contains(&name) {
                    interesting = true;
                    break;
                }
            }
        }
        if !interesting {
            interesting = self
                .store
                .broadcast_conversion_events(workspace_id)
                .await?
                .contains(name);
        }
        if !interesting {
            return Ok(());
        }

        let mut rows = Vec::with_capacity(known.len());
        for event in &known {
            let customer_id = event.customer_id.clone().unwrap_or_default();
            rows.push(ActivityRow {
                event_id: event.message_id.clone(),
                customer_id,
                name: event.name.clone(),
                at: event.timestamp,
                revenue: event
                    .properties
                    .get("revenue")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0),
                properties: event.properties.clone(),
            });
        }
        self.store.record_activity(workspace_id, &rows).await?;

        if name.starts_with("message_") {
            self.message_outcomes(workspace_id, &known).await?;
        }

        // Goals end journeys; waits for this event wake.
        let mut waiting = false;
        for flow in flows.iter() {
            if let Some(goal) = &flow.def.exit_when {
                let mut customers = Vec::new();
                let mut times = Vec::new();
                for event in &known {
                    if matcher::matches(goal, &event.name, &event.properties) {
                        customers.push(event.customer_id.clone().unwrap_or_default());
                        times.push(event.timestamp);
                    }
                }
                if !customers.is_empty() {
                    self.store
                        .reach_goal(workspace_id, &flow.name, &customers, &times, now)
                        .await?;
                }
            }
            for step in &flow.def.steps {
                if let crate::domain::model::StepKind::Wait(crate::domain::model::Wait::Event {
                    event,
                    ..
                }) = &step.kind
                    && event.event == name
                {
                    waiting = true;
                }
            }
        }
        if waiting {
            let customers: Vec<String> =
                known.iter().filter_map(|e| e.customer_id.clone()).collect();
            self.store
                .wake_waiting(workspace_id, name, &customers, now)
                .await?;
        }

        // Triggers.
        let mut starts = Vec::new();
        for flow in flows.iter() {
            if flow.status != FlowStatus::Active {
                continue;
            }
            let Trigger::Event(trigger) = &flow.def.trigger else {
                continue;
            };
            for event in &known {
                if !matcher::matches(trigger, &event.name, &event.properties) {
                    continue;
                }
                let customer_id = event.customer_id.clone().unwrap_or_default();
                starts.push((
                    flow,
                    NewJourney {
                        flow: flow.name.clone(),
                        version: flow.version,
                        re_entry: flow.def.re_entry,
                        control: experiment::in_control(
                            &customer_id,
                            &flow.name,
                            flow.def.control_group_percent,
                        ),
                        customer_id,
                        trigger_id: format!("event:{}", event.message_id),
                        trigger_data: event.properties.clone(),
                        wake_at: now,
                    },
                ));
            }
        }
        self.start(workspace_id, starts, now).await
    }

    /// Starts journeys, leaving out customers outside a flow's audience.
    async fn start(
        &self,
        workspace_id: &str,
        starts: Vec<(&crate::store::LiveFlow, NewJourney)>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ApiError> {
        if starts.is_empty() {
            return Ok(());
        }
        let mut admitted = Vec::with_capacity(starts.len());
        for (flow, start) in starts {
            let audience = &flow.def.audience;
            if audience.segment.is_none() && audience.exclude_segments.is_empty() {
                admitted.push(start);
                continue;
            }
            let mut names: Vec<String> = audience.exclude_segments.clone();
            if let Some(segment) = &audience.segment {
                names.push(segment.clone());
            }
            let memberships = self
                .clients
                .memberships(
                    workspace_id,
                    std::slice::from_ref(&start.customer_id),
                    &names,
                )
                .await
                .map_err(|status| {
                    ApiError::Unavailable(format!("segmentation: {}", status.message()))
                })?;
            let member = memberships
                .get(&start.customer_id)
                .cloned()
                .unwrap_or_default();
            let inside = audience
                .segment
                .as_ref()
                .is_none_or(|s| member.get(s).copied().unwrap_or(false));
            let excluded = audience
                .exclude_segments
                .iter()
                .any(|s| member.get(s).copied().unwrap_or(false));
            if inside && !excluded {
                admitted.push(start);
            }
        }
        self.store
            .start_journeys(workspace_id, &admitted, now)
            .await?;
        Ok(())
    }

    async fn segment_entered(&self, change: &SegmentChanged) -> Result<(), ApiError> {
        let Some(customer_id) = &change.customer_id else {
            return Ok(());
        };
        let now = self.clock.now();
        let flows = self.store.live_flows(&change.workspace_id).await?;
        let mut starts = Vec::new();
        for flow in flows.iter() {
            if flow.status != FlowStatus::Active {
                continue;
            }
            let Trigger::SegmentEntered { segment } = &flow.def.trigger else {
                continue;
            };
            if *segment != change.segment {
                continue;
            }
            starts.push((
                flow,
                NewJourney {
                    flow: flow.name.clone(),
                    version: flow.version,
                    re_entry: flow.def.re_entry,
                    control: experiment::in_control(
                        customer_id,
                        &flow.name,
                        flow.def.control_group_percent,
                    ),
                    customer_id: customer_id.clone(),
                    trigger_id: format!("segment:{}", change.id),
                    trigger_data: serde_json::json!({ "segment": change.segment }),
                    wake_at: now,
                },
            ));
        }
        self.start(&change.workspace_id, starts, now).await
    }

    async fn message_outcomes(
        &self,
        workspace_id: &str,
        events: &[&EventMessage],
    ) -> Result<(), ApiError> {
        let mut updates = Vec::with_capacity(events.len());
        let mut seen = HashSet::new();
        for event in events {
            let p = &event.properties;
            let text = |key: &str| {
                p.get(key)
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let flow = text("flow");
            let broadcast = text("broadcast");
            if flow.is_empty() && broadcast.is_empty() {
                continue;
            }
            let message_id = text("message_id");
            if message_id.is_empty() || !seen.insert((message_id.clone(), event.name.clone())) {
                continue;
            }
            let status = match event.name.as_str() {
                "message_sent" => Some(1),
                "message_failed" if text("status") == "skipped" => Some(2),
                "message_failed" => Some(3),
                _ => None,
            };
            updates.push(MessageUpdate {
                message_id,
                journey_id: text("journey_id"),
                flow,
                flow_version: p
                    .get("flow_version")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0) as i32,
                broadcast,
                step: text("step"),
                variant: text("variant"),
                channel: text("channel"),
                customer_id: event.customer_id.clone().unwrap_or_default(),
                status,
                at: event.timestamp,
                delivered: event.name == "message_delivered",
                opened: event.name == "message_opened" || event.name == "message_clicked",
                clicked: event.name == "message_clicked",
            });
        }
        self.store.record_messages(workspace_id, &updates).await
    }
}
