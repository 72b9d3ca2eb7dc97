//! The journey workers: claim due journeys in batches (`FOR UPDATE SKIP LOCKED`), load
//! what their steps need (profiles, memberships, activity, counters), run the state machine,
//! and write every effect — send requests into the outbox, visits, counters, the new state
//! — in the same transaction. A crash before the commit leaves the journeys due, and the
//! re-run produces the same idempotency keys, which delivery deduplicates.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use relance_kit::SharedClock;
use relance_kit::error::{ApiError, ApiResult};
use relance_proto::convert::json_to_struct;
use relance_proto::v1::{
    Channel, CustomerRef, MessageKind, MessageOrigin, SendRequest, customer_ref, send_request,
};
use tokio_util::sync::CancellationToken;

use crate::clients::{Clients, ProfileFacts};
use crate::domain::besttime::Histogram;
use crate::domain::guard::{self, CapCounts};
use crate::domain::journey::{self, Effect, Facts, JourneyState, Outcome, Phase};
use crate::domain::model::{ChannelName, FlowDef, StepKind, Wait};
use crate::store::CampaignStore;
use crate::store::activity;
use crate::store::flows::{FlowStatus, JOURNEY_ACTIVE, JOURNEY_ENDED, JOURNEY_HELD};
use crate::store::journeys::{self, DueJourney, JourneyWrite, Visit};
use crate::store::sends::{self, CapIncrement, GuardEvent, GuardKind, SendRow};

/// Members of a flow's segment whose activity makes the segment's best-time histogram.
const SEGMENT_HISTOGRAM_SAMPLE: u64 = 5000;
/// How long the workspace's best-time histogram is trusted.
const WORKSPACE_HISTOGRAM_TTL: StdDuration = StdDuration::from_secs(600);

/// The journey workers' settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Journeys claimed per transaction.
    pub batch: i64,
    /// Milliseconds between polls when nothing is due.
    pub poll_ms: u64,
}

/// Runs due journeys until shutdown.
#[derive(Clone)]
pub struct Engine {
    pub store: CampaignStore,
    pub clients: Clients,
    pub clock: SharedClock,
    pub config: EngineConfig,
    histograms: crate::store::ttl::TtlMap<Arc<Histogram>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish()
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub journeys: usize,
    pub sends: u64,
}

impl Engine {
    pub fn new(
        store: CampaignStore,
        clients: Clients,
        clock: SharedClock,
        config: EngineConfig,
    ) -> Engine {
        Engine {
            store,
            clients,
            clock,
            config,
            histograms: crate::store::ttl::TtlMap::new(WORKSPACE_HISTOGRAM_TTL),
        }
    }

    /// Claims and runs batches until shutdown; sleeps when nothing is due.
    pub async fn run(self, shutdown: CancellationToken) {
        let pause = StdDuration::from_millis(self.config.poll_ms.max(5));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let outcome = match self.run_batch().await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::warn!(error = %error, "journey batch failed, retrying");
                    BatchOutcome::default()
                }
            };
            if outcome.journeys as i64 >= self.config.batch {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Runs one batch of due journeys; returns what it did.
    #[tracing::instrument(skip_all, fields(journeys))]
    pub async fn run_batch(&self) -> ApiResult<BatchOutcome> {
        let started = Instant::now();
        let now = self.clock.now();
        let mut tx = self.store.pool.begin().await?;
        let due = journeys::claim_due(&mut tx, now, self.config.batch).await?;
        tracing::Span::current().record("journeys", due.len());
        if due.is_empty() {
            return Ok(BatchOutcome::default());
        }
        for journey in &due {
            let late = (now - journey.due_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("relance_campaigns_step_lateness_seconds").record(late);
        }
        let mut by_workspace: HashMap<String, Vec<DueJourney>> = HashMap::new();
        for journey in due {
            by_workspace
                .entry(journey.workspace_id.clone())
                .or_default()
                .push(journey);
        }
        let mut outcome = BatchOutcome::default();
        let mut updates: Vec<(String, String, serde_json::Map<String, serde_json::Value>)> =
            Vec::new();
        for (workspace_id, due) in by_workspace {
            outcome.journeys += due.len();
            let written = self
                .run_workspace(&mut tx, &workspace_id, due, now, &mut updates)
                .await?;
            outcome.sends += written;
        }
        // Profile updates before the commit: if the commit fails they are made again, and
        // setting the same attributes twice changes nothing.
        for (workspace_id, customer_id, set) in &updates {
            self.clients
                .set_attributes(workspace_id, customer_id, set)
                .await
                .map_err(|status| {
                    ApiError::Unavailable(format!("profiles: {}", status.message()))
                })?;
        }
        tx.commit().await?;
        if outcome.sends > 0 {
            self.store.outbox_wake.notify_one();
        }
        metrics::counter!("relance_campaigns_steps_total").increment(outcome.journeys as u64);
        metrics::histogram!("relance_campaigns_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(outcome)
    }

    async fn run_workspace(
        &self,
        tx: &mut sqlx::PgConnection,
        workspace_id: &str,
        due: Vec<DueJourney>,
        now: DateTime<Utc>,
        updates: &mut Vec<(String, String, serde_json::Map<String, serde_json::Value>)>,
    ) -> ApiResult<u64> {
        let statuses = self.store.flow_statuses(workspace_id).await?;
        let guardrails = self.store.guardrails(workspace_id).await?;
        let default_tz: Tz = guard::resolve_tz(
            Some(&guardrails.quiet_hours.default_timezone),
            chrono_tz::UTC,
        );

        // What the flows of this batch need.
        let mut defs: HashMap<(String, u32), Arc<FlowDef>> = HashMap::new();
        for journey in &due {
            let key = (journey.flow.clone(), journey.flow_version);
            if let std::collections::hash_map::Entry::Vacant(slot) = defs.entry(key) {
                slot.insert(
                    self.store
                        .definition(workspace_id, &journey.flow, journey.flow_version)
                        .await?,
                );
            }
        }
        let mut customers: Vec<String> = due.iter().map(|j| j.customer_id.clone()).collect();
        customers.sort_unstable();
        customers.dedup();

        let profiles = self
            .clients
            .profiles(workspace_id, &customers)
            .await
            .map_err(|status| ApiError::Unavailable(format!("profiles: {}", status.message())))?;

        let mut segment_names: HashSet<String> = HashSet::new();
        let mut event_names: HashSet<String> = HashSet::new();
        let mut look_back = Duration::zero();
        let mut needs_best_time = false;
        for def in defs.values() {
            if let Some(segment) = &def.audience.segment {
                segment_names.insert(segment.clone());
            }
            for segment in &def.audience.exclude_segments {
                segment_names.insert(segment.clone());
            }
            for step in &def.steps {
                match &step.kind {
                    StepKind::Branch {
                        condition: crate::domain::model::BranchCondition::Segment { segment },
                        ..
                    } => {
                        segment_names.insert(segment.clone());
                    }
                    StepKind::Wait(Wait::BestTime { .. }) => needs_best_time = true,
                    _ => {}
                }
            }
            for name in def.event_names() {
                event_names.insert(name.to_owned());
            }
            look_back = look_back.max(Duration::seconds(def.longest_event_window_secs()));
        }
        let segment_names: Vec<String> = segment_names.into_iter().collect();
        let memberships = self
            .clients
            .memberships(workspace_id, &customers, &segment_names)
            .await
            .map_err(|status| {
                ApiError::Unavailable(format!("segmentation: {}", status.message()))
            })?;

        // Activity since the earliest of: the longest branch window, the oldest journey's
        // start (for waits on events, which count from their own start).
        let oldest_entry = due.iter().map(|j| j.entered_at).min().unwrap_or(now);
        let since = (now - look_back).min(oldest_entry);
        let event_names: Vec<String> = event_names.into_iter().collect();
        let activity =
            activity::activity_of(tx, workspace_id, &customers, &event_names, since).await?;

        let mut own_histograms: HashMap<String, Histogram> = HashMap::new();
        let mut workspace_histogram = Arc::new(Histogram::default());
        if needs_best_time {
            let times = activity::acting_times(tx, workspace_id, &customers, now).await?;
            for (customer, times) in times {
                let tz = customer_tz(profiles.get(&customer), default_tz);
                let mut histogram = Histogram::default();
                for at in times {
                    histogram.add(at, tz, 1);
                }
                own_histograms.insert(customer, histogram);
            }
            workspace_histogram = self
                .workspace_histogram(workspace_id, default_tz, now)
                .await?;
        }
        // Each flow's segment (audience, or the segment that triggers it): the fallback
        // between the customer's own hours and the whole shop's.
        let mut segment_histograms: HashMap<String, Arc<Histogram>> = HashMap::new();
        if needs_best_time {
            for def in defs.values() {
                let Some(segment) = flow_segment(def) else {
                    continue;
                };
                if !segment_histograms.contains_key(segment) {
                    let histogram = self
                        .segment_histogram(workspace_id, segment, default_tz, now)
                        .await?;
                    segment_histograms.insert(segment.to_owned(), histogram);
                }
            }
        }

        // Counters are read under a per-customer lock, so two workers never both let the
        // third push of the day through.
        let capped = !guardrails.caps.rules.is_empty();
        let mut counts: HashMap<String, CapCounts> = HashMap::new();
        if capped {
            lock_customers(tx, workspace_id, &customers).await?;
            counts = sends::cap_counts(tx, workspace_id, &customers, now).await?;
        }

        let empty = serde_json::json!({});
        let no_segments = HashMap::new();
        let mut writes = Vec::with_capacity(due.len());
        let mut visits = Vec::new();
        let mut send_rows = Vec::new();
        let mut guard_events = Vec::new();
        let mut increments = Vec::new();
        for journey in due {
            let Some(def) = defs
                .get(&(journey.flow.clone(), journey.flow_version))
                .cloned()
            else {
                continue;
            };
            let status = statuses
                .get(&journey.flow)
                .copied()
                .unwrap_or(FlowStatus::Archived);
            let journey_id = journey.id.to_string();
            // A step joins the trace that started its journey (the Track call, the segment
            // change); its send request carries the step's context on to delivery.
            let step_trace = match journey.traceparent.as_deref() {
                Some(parent) => {
                    let span = tracing::info_span!("journey_step", flow = %journey.flow, journey = %journey_id);
                    relance_kit::trace::set_parent(&span, Some(parent));
                    relance_kit::trace::of_span(&span)
                }
                None => relance_kit::trace::current(),
            };
            let profile = profiles.get(&journey.customer_id);
            let tz = customer_tz(profile, default_tz);
            let member = memberships
                .get(&journey.customer_id)
                .unwrap_or(&no_segments);
            let own = own_histograms
                .remove(&journey.customer_id)
                .unwrap_or_default();
            let empty_histogram = Histogram::default();
            let segment_histogram = flow_segment(&def)
                .and_then(|segment| segment_histograms.get(segment))
                .map(|h| h.as_ref())
                .unwrap_or(&empty_histogram);
            let histograms = [
                (&own, tz),
                (segment_histogram, default_tz),
                (workspace_histogram.as_ref(), default_tz),
            ];
            let mut customer_counts = counts.remove(&journey.customer_id).unwrap_or_default();
            let before_counts = customer_counts.clone();
            let (effects, outcome) = if status == FlowStatus::Archived {
                (
                    Vec::new(),
                    Outcome::End {
                        reason: journey::EndReason::FlowArchived,
                    },
                )
            } else {
                let mut facts = Facts {
                    now,
                    journey_id: &journey_id,
                    customer_id: &journey.customer_id,
                    tz,
                    control: journey.control,
                    paused: status == FlowStatus::Paused,
                    in_audience: in_audience(&def, member),
                    attributes: profile.map(|p| &p.attributes).unwrap_or(&empty),
                    traits: profile.map(|p| &p.traits).unwrap_or(&empty),
                    segments: member,
                    activity: activity
                        .get(&journey.customer_id)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                    histograms: &histograms,
                    caps: &guardrails.caps,
                    quiet_hours: &guardrails.quiet_hours,
                    cap_counts: &mut customer_counts,
                };
                journey::advance(&def, journey.state.clone(), &mut facts)
            };
            // The counters the sends of this run added.
            for (key, count) in customer_counts_diff(&before_counts, &customer_counts) {
                for _ in 0..count {
                    increments.push(CapIncrement {
                        workspace_id: workspace_id.to_owned(),
                        customer_id: journey.customer_id.clone(),
                        key: key.clone(),
                    });
                }
            }
            counts.insert(journey.customer_id.clone(), customer_counts);
            let mut seq = journey.state.seq;
            for effect in effects {
                match effect {
                    Effect::Visited { step_id } => {
                        seq += 1;
                        visits.push(Visit {
                            journey_id: journey.id,
                            seq,
                            workspace_id: workspace_id.to_owned(),
                            flow: journey.flow.clone(),
                            step: step_id,
                            at: now,
                        });
                    }
                    Effect::Send(order) => {
                        let channel = order
                            .channels
                            .first()
                            .map(|c| c.as_str())
                            .unwrap_or("push")
                            .to_owned();
                        let request = send_request(&journey, &order);
                        let envelope =
                            relance_delivery::wire::Envelope::new(workspace_id, &request);
                        send_rows.push(SendRow {
                            workspace_id: workspace_id.to_owned(),
                            idempotency_key: order.idempotency_key.clone(),
                            journey_id: Some(journey.id),
                            flow: journey.flow.clone(),
                            flow_version: journey.flow_version,
                            broadcast: String::new(),
                            step: order.step_id.clone(),
                            variant: order.variant.clone(),
                            channel,
                            customer_id: journey.customer_id.clone(),
                            at: now,
                            envelope: serde_json::to_value(&envelope)
                                .map_err(anyhow::Error::from)?,
                            trace: step_trace.clone(),
                        });
                    }
                    Effect::HeldOut { .. } => {}
                    Effect::Update { set, .. } => {
                        updates.push((workspace_id.to_owned(), journey.customer_id.clone(), set));
                    }
                    Effect::CapDeferred { step_id, channel } => {
                        guard_events.push(guard_event(
                            workspace_id,
                            &journey,
                            &journey_id,
                            step_id,
                            GuardKind::CapDeferred,
                            channel,
                            now,
                        ));
                    }
                    Effect::CapSkipped { step_id, channel } => {
                        guard_events.push(guard_event(
                            workspace_id,
                            &journey,
                            &journey_id,
                            step_id,
                            GuardKind::CapSkipped,
                            channel,
                            now,
                        ));
                    }
                    Effect::QuietDeferred { step_id, channel } => {
                        guard_events.push(guard_event(
                            workspace_id,
                            &journey,
                            &journey_id,
                            step_id,
                            GuardKind::QuietDeferred,
                            channel,
                            now,
                        ));
                    }
                }
            }
            writes.push(journey_write(&def, journey.id, outcome, now));
        }
        journeys::insert_visits(tx, &visits).await?;
        let queued = sends::queue_sends(tx, &send_rows).await?;
        sends::insert_guard_events(tx, &guard_events).await?;
        sends::add_cap_counts(tx, &increments, now).await?;
        journeys::write_journeys(tx, &writes, now).await?;
        Ok(queued)
    }

    async fn workspace_histogram(
        &self,
        workspace_id: &str,
        tz: Tz,
        now: DateTime<Utc>,
    ) -> ApiResult<Arc<Histogram>> {
        if let Some(histogram) = self.histograms.get(workspace_id) {
            return Ok(histogram);
        }
        let histogram = Arc::new(
            self.store
                .workspace_histogram(workspace_id, tz, now)
                .await?,
        );
        self.histograms.put(workspace_id, histogram.clone());
        Ok(histogram)
    }

    /// The acting hours of a sample of the segment's members (cached like the workspace's).
    async fn segment_histogram(
        &self,
        workspace_id: &str,
        segment: &str,
        tz: Tz,
        now: DateTime<Utc>,
    ) -> ApiResult<Arc<Histogram>> {
        let key = format!("{workspace_id}\u{1f}{segment}");
        if let Some(histogram) = self.histograms.get(&key) {
            return Ok(histogram);
        }
        let members = self
            .clients
            .segment_sample(workspace_id, segment, SEGMENT_HISTOGRAM_SAMPLE)
            .await
            .map_err(|status| {
                ApiError::Unavailable(format!("segmentation: {}", status.message()))
            })?;
        let mut conn = self.store.pool.acquire().await?;
        let times = activity::acting_times(&mut conn, workspace_id, &members, now).await?;
        let mut histogram = Histogram::default();
        for at in times.values().flatten() {
            histogram.add(*at, tz, 1);
        }
        let histogram = Arc::new(histogram);
        self.histograms.put(&key, histogram.clone());
        Ok(histogram)
    }

    /// Forgets cached histograms (tests that load activity and expect it learned at once).
    pub fn forget_histograms(&self) {
        self.histograms.clear();
    }
}

/// The segment a flow's customers belong to: its audience, or the segment that starts it.
fn flow_segment(def: &FlowDef) -> Option<&str> {
    if let Some(segment) = &def.audience.segment {
        return Some(segment);
    }
    match &def.trigger {
        crate::domain::model::Trigger::SegmentEntered { segment }
        | crate::domain::model::Trigger::Schedule { segment, .. } => Some(segment),
        crate::domain::model::Trigger::Event(_) => None,
    }
}

fn customer_tz(profile: Option<&ProfileFacts>, default: Tz) -> Tz {
    guard::resolve_tz(profile.and_then(|p| p.timezone.as_deref()), default)
}

fn in_audience(def: &FlowDef, member: &HashMap<String, bool>) -> bool {
    if let Some(segment) = &def.audience.segment
        && !member.get(segment).copied().unwrap_or(false)
    {
        return false;
    }
    for segment in &def.audience.exclude_segments {
        if member.get(segment).copied().unwrap_or(false) {
            return false;
        }
    }
    true
}

/// The counters that grew between `before` and `after`, with by how much.
fn customer_counts_diff(before: &CapCounts, after: &CapCounts) -> Vec<(guard::CounterKey, u32)> {
    let mut grown = Vec::new();
    for (key, count) in after {
        let old = before.get(key).copied().unwrap_or(0);
        if *count > old {
            grown.push((key.clone(), count - old));
        }
    }
    grown
}

fn guard_event(
    workspace_id: &str,
    journey: &DueJourney,
    journey_id: &str,
    step: String,
    kind: GuardKind,
    channel: ChannelName,
    now: DateTime<Utc>,
) -> GuardEvent {
    GuardEvent {
        workspace_id: workspace_id.to_owned(),
        flow: journey.flow.clone(),
        broadcast: String::new(),
        step,
        journey_id: journey_id.to_owned(),
        customer_id: journey.customer_id.clone(),
        kind,
        channel: channel.as_str().to_owned(),
        at: now,
    }
}

/// The journey's row after the run.
fn journey_write(
    def: &FlowDef,
    id: uuid::Uuid,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> JourneyWrite {
    match outcome {
        Outcome::Sleep { at, state } => {
            let waiting_event = waiting_event(def, &state);
            JourneyWrite {
                id,
                status: JOURNEY_ACTIVE,
                end_reason: None,
                state,
                waiting_event,
                next_wake_at: Some(at.max(now)),
            }
        }
        Outcome::Hold { state } => JourneyWrite {
            id,
            status: JOURNEY_HELD,
            end_reason: None,
            state,
            waiting_event: None,
            next_wake_at: None,
        },
        Outcome::End { reason } => JourneyWrite {
            id,
            status: JOURNEY_ENDED,
            end_reason: Some(reason),
            state: JourneyState::start(),
            waiting_event: None,
            next_wake_at: None,
        },
    }
}

/// The event name a journey in a wait for an event is waiting for.
fn waiting_event(def: &FlowDef, state: &JourneyState) -> Option<String> {
    if !matches!(state.phase, Phase::AwaitingEvent { .. }) {
        return None;
    }
    match def.steps.get(state.position).map(|s| &s.kind) {
        Some(StepKind::Wait(Wait::Event { event, .. })) => Some(event.event.clone()),
        _ => None,
    }
}

/// The proto channel of a domain channel.
pub fn proto_channel(channel: ChannelName) -> Channel {
    match channel {
        ChannelName::Push => Channel::Push,
        ChannelName::Email => Channel::Email,
        ChannelName::Sms => Channel::Sms,
        ChannelName::Whatsapp => Channel::Whatsapp,
        ChannelName::InApp => Channel::InApp,
        ChannelName::Webhook => Channel::Webhook,
    }
}

/// The domain channel of a proto channel number.
pub fn domain_channel(channel: i32) -> Option<ChannelName> {
    match Channel::try_from(channel).ok()? {
        Channel::Push => Some(ChannelName::Push),
        Channel::Email => Some(ChannelName::Email),
        Channel::Sms => Some(ChannelName::Sms),
        Channel::Whatsapp => Some(ChannelName::Whatsapp),
        Channel::InApp => Some(ChannelName::InApp),
        Channel::Webhook => Some(ChannelName::Webhook),
        Channel::Unspecified => None,
    }
}

/// The request delivery gets for a flow's send: the template, the step's data plus the
/// trigger's properties as `data.trigger` (the cart's items for an abandoned-cart flow).
fn send_request(journey: &DueJourney, order: &journey::SendOrder) -> SendRequest {
    let mut data = order.data.clone();
    if journey
        .trigger_data
        .as_object()
        .is_some_and(|o| !o.is_empty())
    {
        data.insert("trigger".into(), journey.trigger_data.clone());
    }
    SendRequest {
        idempotency_key: order.idempotency_key.clone(),
        customer: Some(CustomerRef {
            id: Some(customer_ref::Id::CustomerId(journey.customer_id.clone())),
        }),
        channels: order
            .channels
            .iter()
            .map(|c| proto_channel(*c) as i32)
            .collect(),
        content: Some(send_request::Content::Template(order.template.clone())),
        topic: order.topic.clone(),
        kind: MessageKind::Marketing as i32,
        data: (!data.is_empty()).then(|| json_to_struct(&serde_json::Value::Object(data))),
        origin: Some(MessageOrigin {
            flow: journey.flow.clone(),
            flow_version: journey.flow_version,
            step: order.step_id.clone(),
            variant: order.variant.clone(),
            broadcast: String::new(),
            journey_id: journey.id.to_string(),
        }),
        ..Default::default()
    }
}

/// Takes a transaction-scoped advisory lock per customer, in a fixed order.
async fn lock_customers(
    tx: &mut sqlx::PgConnection,
    workspace_id: &str,
    customers: &[String],
) -> ApiResult<()> {
    let mut keys: Vec<String> = customers
        .iter()
        .map(|c| format!("caps:{workspace_id}:{c}"))
        .collect();
    keys.sort_unstable();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM UNNEST($1::text[]) AS k ORDER BY k")
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
