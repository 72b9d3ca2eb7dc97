//! The journey state machine: given where a journey is and what is known about its customer
//! now, what it does next — the sends and profile updates to make, and when it wakes again
//! (or how it ends). Pure: the store loads the facts, runs [`advance`] and writes the effects
//! and the new state in one transaction, so a crash before the commit re-runs the same steps
//! with the same idempotency keys.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::besttime::{self, Histogram};
use super::experiment;
use super::guard::{self, CapCounts, CapDecision, CapSettings, QuietHoursRule};
use super::matcher;
use super::model::{BranchCondition, ChannelName, FlowDef, Send, StepKind, Wait};
use super::schedule;

/// Steps one call may run before it yields (a flow's cycles always contain a timed wait,
/// so this only bounds a very long run of instant steps).
const MAX_STEPS_PER_ADVANCE: usize = 256;
/// Smallest histogram that decides a best time on its own.
pub const BEST_TIME_MIN_SAMPLES: u64 = 5;

/// Where inside its current step a journey is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// About to run the step at `position`.
    Ready,
    /// In a timed wait at `position` that ends at `until`; then the step's `next`.
    Waiting { until: DateTime<Utc> },
    /// In a wait for an event at `position`, begun at `since`.
    AwaitingEvent { since: DateTime<Utc> },
    /// A send at `position`, due first at `first_due`, held by quiet hours or a cap.
    Deferred { first_due: DateTime<Utc> },
}

/// A journey's progress, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JourneyState {
    /// The step it is at.
    pub position: usize,
    pub phase: Phase,
    /// Steps run so far: part of each send's idempotency key, so a step visited twice (a
    /// `goto` loop) sends twice, while a retried step sends once.
    pub seq: u32,
    /// The variant drawn at each send step with variants, by step id.
    pub variants: BTreeMap<String, String>,
}

impl JourneyState {
    /// A journey about to run its first step.
    pub fn start() -> JourneyState {
        JourneyState {
            position: 0,
            phase: Phase::Ready,
            seq: 0,
            variants: BTreeMap::new(),
        }
    }
}

/// Why a journey ended (see `relance.v1.JourneyEndReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    Completed = 1,
    GoalReached = 2,
    ExitStep = 3,
    LeftAudience = 4,
    FlowArchived = 5,
    HeldDropped = 6,
    CustomerDeleted = 7,
}

impl EndReason {
    /// From the stored number.
    pub fn from_i16(value: i16) -> Option<EndReason> {
        match value {
            1 => Some(EndReason::Completed),
            2 => Some(EndReason::GoalReached),
            3 => Some(EndReason::ExitStep),
            4 => Some(EndReason::LeftAudience),
            5 => Some(EndReason::FlowArchived),
            6 => Some(EndReason::HeldDropped),
            7 => Some(EndReason::CustomerDeleted),
            _ => None,
        }
    }
}

/// One thing the customer did, as the activity log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    pub name: String,
    pub at: DateTime<Utc>,
    pub properties: serde_json::Value,
}

/// Everything known about the journey's customer at this moment.
#[derive(Debug)]
pub struct Facts<'a> {
    pub now: DateTime<Utc>,
    pub journey_id: &'a str,
    pub customer_id: &'a str,
    /// The customer's timezone (or the workspace's default).
    pub tz: Tz,
    /// Held out: runs through the steps without sending.
    pub control: bool,
    /// The flow is paused: the journey holds before its next send.
    pub paused: bool,
    /// The customer is in the flow's audience (true when the flow has none).
    pub in_audience: bool,
    pub attributes: &'a serde_json::Value,
    pub traits: &'a serde_json::Value,
    /// Membership of the segments the flow's branches name.
    pub segments: &'a HashMap<String, bool>,
    /// The customer's recent activity (events the flow reacts to), any order.
    pub activity: &'a [Activity],
    /// Best-time histograms, each with the timezone its hours are read in: the customer's
    /// own (in their timezone) first, then the fallbacks (the segment's, the shop's, in the
    /// shop's timezone). The first with enough actions decides.
    pub histograms: &'a [(&'a Histogram, Tz)],
    pub caps: &'a CapSettings,
    pub quiet_hours: &'a QuietHoursRule,
    /// The customer's counts so far; a send the caps allow increments them, so two
    /// journeys of one customer in the same batch see each other's sends.
    pub cap_counts: &'a mut CapCounts,
}

/// A message to queue for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct SendOrder {
    pub step_id: String,
    /// `<journey>:<step>` (with `#<seq>` after the first visit of a step in a loop).
    pub idempotency_key: String,
    pub template: String,
    pub channels: Vec<ChannelName>,
    /// Empty without variants.
    pub variant: String,
    pub topic: String,
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// What the step run produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The journey reached a step (for the report's `entered` per step).
    Visited {
        step_id: String,
    },
    Send(SendOrder),
    /// A control-group journey passed a send step: nothing is sent.
    HeldOut {
        step_id: String,
    },
    /// Set these profile attributes.
    Update {
        step_id: String,
        set: serde_json::Map<String, serde_json::Value>,
    },
    /// A send was deferred by a frequency cap (counted once per send).
    CapDeferred {
        step_id: String,
        channel: ChannelName,
    },
    /// A send was skipped by a frequency cap.
    CapSkipped {
        step_id: String,
        channel: ChannelName,
    },
    /// A send waits for quiet hours to end (counted once per send).
    QuietDeferred {
        step_id: String,
        channel: ChannelName,
    },
}

/// How the run left the journey.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Wakes at `at` (or earlier, on an event it waits for).
    Sleep {
        at: DateTime<Utc>,
        state: JourneyState,
    },
    /// Holds before a send while the flow is paused.
    Hold { state: JourneyState },
    /// Ended.
    End { reason: EndReason },
}

/// Runs the journey from `state` until it must wait, hold or end.
pub fn advance(
    flow: &FlowDef,
    mut state: JourneyState,
    facts: &mut Facts<'_>,
) -> (Vec<Effect>, Outcome) {
    let mut effects = Vec::new();
    let now = facts.now;
    for _ in 0..MAX_STEPS_PER_ADVANCE {
        let Some(step) = flow.steps.get(state.position) else {
            return (
                effects,
                Outcome::End {
                    reason: EndReason::Completed,
                },
            );
        };
        // Resuming inside a step: a wait that may be over, a deferred send.
        match state.phase {
            Phase::Waiting { until } => {
                if now < until {
                    return (effects, Outcome::Sleep { at: until, state });
                }
                match move_to(&mut state, step.next) {
                    true => continue,
                    false => {
                        return (
                            effects,
                            Outcome::End {
                                reason: EndReason::Completed,
                            },
                        );
                    }
                }
            }
            Phase::AwaitingEvent { since } => {
                let StepKind::Wait(Wait::Event {
                    event,
                    timeout_secs,
                    on_timeout,
                }) = &step.kind
                else {
                    // The stored phase no longer fits the step: run it afresh.
                    state.phase = Phase::Ready;
                    continue;
                };
                let seen = facts.activity.iter().any(|activity| {
                    activity.at >= since
                        && matcher::matches(event, &activity.name, &activity.properties)
                        && belongs_to_journey(activity, facts.journey_id)
                });
                let next = if seen {
                    step.next
                } else if now >= since + Duration::seconds(*timeout_secs) {
                    on_timeout.or(step.next)
                } else {
                    let at = since + Duration::seconds(*timeout_secs);
                    return (effects, Outcome::Sleep { at, state });
                };
                match move_to(&mut state, next) {
                    true => continue,
                    false => {
                        return (
                            effects,
                            Outcome::End {
                                reason: EndReason::Completed,
                            },
                        );
                    }
                }
            }
            Phase::Ready | Phase::Deferred { .. } => {}
        }

        let resuming_send = matches!(state.phase, Phase::Deferred { .. });
        if !resuming_send {
            state.seq += 1;
            effects.push(Effect::Visited {
                step_id: step.id.clone(),
            });
        }
        let next = match &step.kind {
            StepKind::Wait(wait) => match start_wait(wait, facts) {
                WaitStart::Until(until) => {
                    state.phase = Phase::Waiting { until };
                    return (effects, Outcome::Sleep { at: until, state });
                }
                WaitStart::Event(timeout) => {
                    state.phase = Phase::AwaitingEvent { since: now };
                    return (
                        effects,
                        Outcome::Sleep {
                            at: now + timeout,
                            state,
                        },
                    );
                }
                WaitStart::Over => step.next,
            },
            StepKind::Send(send) => {
                if facts.paused {
                    state.phase = Phase::Ready;
                    if !resuming_send {
                        // The visit is counted again when the journey resumes.
                        state.seq -= 1;
                        effects.pop();
                    }
                    return (effects, Outcome::Hold { state });
                }
                if !facts.in_audience {
                    return (
                        effects,
                        Outcome::End {
                            reason: EndReason::LeftAudience,
                        },
                    );
                }
                if facts.control {
                    effects.push(Effect::HeldOut {
                        step_id: step.id.clone(),
                    });
                    step.next
                } else {
                    match run_send(flow, &step.id, send, &mut state, facts, &mut effects) {
                        SendStep::Done => step.next,
                        SendStep::Deferred(until) => {
                            return (effects, Outcome::Sleep { at: until, state });
                        }
                    }
                }
            }
            StepKind::Branch {
                condition,
                then_to,
                else_to,
            } => {
                let taken = if branch_holds(condition, &step.id, facts) {
                    then_to
                } else {
                    else_to
                };
                taken.or(step.next)
            }
            StepKind::Update { set } => {
                effects.push(Effect::Update {
                    step_id: step.id.clone(),
                    set: set.clone(),
                });
                step.next
            }
            StepKind::Exit => {
                return (
                    effects,
                    Outcome::End {
                        reason: EndReason::ExitStep,
                    },
                );
            }
            StepKind::Goto { target } => Some(*target),
        };
        if !move_to(&mut state, next) {
            return (
                effects,
                Outcome::End {
                    reason: EndReason::Completed,
                },
            );
        }
    }
    // A long run of instant steps: continue in the next round, at once.
    (effects, Outcome::Sleep { at: now, state })
}

/// Moves to `next` (ready to run it); false when there is none (the journey is over).
fn move_to(state: &mut JourneyState, next: Option<usize>) -> bool {
    state.phase = Phase::Ready;
    match next {
        Some(position) => {
            state.position = position;
            true
        }
        None => false,
    }
}

/// `message_*` events count for the journey that sent the message only: a click on
/// another flow's message is not this flow's click.
fn belongs_to_journey(activity: &Activity, journey_id: &str) -> bool {
    if !activity.name.starts_with("message_") {
        return true;
    }
    match activity
        .properties
        .get("journey_id")
        .and_then(serde_json::Value::as_str)
    {
        Some(id) => id == journey_id,
        None => false,
    }
}

enum WaitStart {
    Until(DateTime<Utc>),
    Event(Duration),
    Over,
}

fn start_wait(wait: &Wait, facts: &Facts<'_>) -> WaitStart {
    let now = facts.now;
    match wait {
        Wait::For { secs } => WaitStart::Until(now + Duration::seconds(*secs)),
        Wait::UntilLocalTime { hour, minute } => {
            let local_today = now.with_timezone(&facts.tz).date_naive();
            let mut until = schedule::local_instant(local_today, *hour, *minute, facts.tz);
            if until < now {
                let tomorrow = local_today.succ_opt().unwrap_or(local_today);
                until = schedule::local_instant(tomorrow, *hour, *minute, facts.tz);
            }
            if until <= now {
                WaitStart::Over
            } else {
                WaitStart::Until(until)
            }
        }
        Wait::BestTime { within_secs } => {
            let mut at = now;
            for (histogram, tz) in facts.histograms {
                if histogram.total() >= BEST_TIME_MIN_SAMPLES {
                    at = besttime::best_send_time(
                        now,
                        *within_secs,
                        *tz,
                        &[histogram],
                        BEST_TIME_MIN_SAMPLES,
                    );
                    break;
                }
            }
            if at <= now {
                WaitStart::Over
            } else {
                WaitStart::Until(at)
            }
        }
        Wait::Event { timeout_secs, .. } => WaitStart::Event(Duration::seconds(*timeout_secs)),
    }
}

enum SendStep {
    Done,
    Deferred(DateTime<Utc>),
}

/// The guardrails, then the send: quiet hours first (a send in the night waits for the
/// morning and is then checked against the caps of that day), then the caps.
fn run_send(
    flow: &FlowDef,
    step_id: &str,
    send: &Send,
    state: &mut JourneyState,
    facts: &mut Facts<'_>,
    effects: &mut Vec<Effect>,
) -> SendStep {
    let now = facts.now;
    let first_due = match state.phase {
        Phase::Deferred { first_due } => first_due,
        _ => now,
    };
    let was_deferred = matches!(state.phase, Phase::Deferred { .. });
    let variant = experiment::pick_variant(&send.variants, facts.customer_id, &flow.name, step_id);
    let (template, channels) = match variant {
        Some(variant) => {
            let channels = if variant.channels.is_empty() {
                send.channels.clone()
            } else {
                variant.channels.clone()
            };
            (variant.template.clone(), channels)
        }
        None => (
            send.template.clone().unwrap_or_default(),
            send.channels.clone(),
        ),
    };
    // The first channel is the one the guardrails count: delivery may fall back to a later
    // one, but the customer is interrupted once either way.
    let Some(&primary) = channels.first() else {
        return SendStep::Done;
    };

    if let Some(until) = guard::quiet_until(facts.quiet_hours, primary, now, facts.tz) {
        if !was_deferred {
            effects.push(Effect::QuietDeferred {
                step_id: step_id.to_owned(),
                channel: primary,
            });
        }
        state.phase = Phase::Deferred { first_due };
        return SendStep::Deferred(until);
    }
    match guard::cap_decision(
        facts.caps,
        primary,
        now,
        first_due,
        facts.tz,
        facts.cap_counts,
    ) {
        CapDecision::Allow => {}
        CapDecision::Defer { until } => {
            if !was_deferred {
                effects.push(Effect::CapDeferred {
                    step_id: step_id.to_owned(),
                    channel: primary,
                });
            }
            state.phase = Phase::Deferred { first_due };
            return SendStep::Deferred(until);
        }
        CapDecision::Skip => {
            effects.push(Effect::CapSkipped {
                step_id: step_id.to_owned(),
                channel: primary,
            });
            return SendStep::Done;
        }
    }
    for key in guard::counter_keys(facts.caps, primary, now, facts.tz) {
        *facts.cap_counts.entry(key).or_insert(0) += 1;
    }
    let variant_name = variant.map(|v| v.name.clone()).unwrap_or_default();
    if !variant_name.is_empty() {
        state
            .variants
            .insert(step_id.to_owned(), variant_name.clone());
    }
    effects.push(Effect::Send(SendOrder {
        step_id: step_id.to_owned(),
        idempotency_key: idempotency_key(facts.journey_id, step_id, state.seq),
        template,
        channels,
        variant: variant_name,
        topic: send.topic.clone().unwrap_or_else(|| flow.topic.clone()),
        data: send.data.clone(),
    }));
    SendStep::Done
}

/// `<journey>:<step>#<seq>`: the same on every retry of the step (the journey's `seq`
/// only moves when the run commits), different on each visit of a loop.
pub fn idempotency_key(journey_id: &str, step_id: &str, seq: u32) -> String {
    format!("{journey_id}:{step_id}#{seq}")
}

fn branch_holds(condition: &BranchCondition, step_id: &str, facts: &Facts<'_>) -> bool {
    match condition {
        BranchCondition::Event { event, within_secs } => {
            let since = facts.now - Duration::seconds(*within_secs);
            facts.activity.iter().any(|activity| {
                activity.at >= since
                    && activity.at <= facts.now
                    && matcher::matches(event, &activity.name, &activity.properties)
                    && belongs_to_journey(activity, facts.journey_id)
            })
        }
        BranchCondition::Attribute(condition) => matcher::passes(condition, facts.attributes),
        BranchCondition::Trait(condition) => matcher::passes(condition, facts.traits),
        BranchCondition::Segment { segment } => {
            facts.segments.get(segment).copied().unwrap_or(false)
        }
        BranchCondition::Random { percent } => {
            experiment::random_branch(facts.journey_id, step_id, *percent)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::guard::{CapPeriod, CapPolicy, CapRule};
    use crate::domain::model::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, 0)
            .single()
            .expect("valid time")
    }

    fn step(id: &str, kind: StepKind, next: Option<usize>) -> Step {
        Step {
            id: id.into(),
            summary: String::new(),
            kind,
            next,
        }
    }

    fn send(template: &str) -> StepKind {
        StepKind::Send(Send {
            channels: vec![ChannelName::Push],
            template: Some(template.into()),
            variants: Vec::new(),
            topic: None,
            data: Default::default(),
        })
    }

    fn flow(steps: Vec<Step>) -> FlowDef {
        FlowDef {
            name: "f".into(),
            description: String::new(),
            trigger: Trigger::Event(EventMatch {
                event: "signed_up".into(),
                conditions: Vec::new(),
            }),
            exit_when: None,
            conversion: Conversion::default(),
            re_entry: ReEntry::Never,
            audience: Audience::default(),
            control_group_percent: 0.0,
            topic: "marketing".into(),
            steps,
        }
    }

    struct World {
        attributes: serde_json::Value,
        traits: serde_json::Value,
        segments: HashMap<String, bool>,
        activity: Vec<Activity>,
        caps: CapSettings,
        quiet: QuietHoursRule,
        counts: CapCounts,
        histogram: Histogram,
    }

    impl World {
        fn new() -> World {
            World {
                attributes: serde_json::json!({}),
                traits: serde_json::json!({}),
                segments: HashMap::new(),
                activity: Vec::new(),
                caps: CapSettings::default(),
                quiet: QuietHoursRule {
                    enabled: false,
                    ..QuietHoursRule::default()
                },
                counts: CapCounts::new(),
                histogram: Histogram::default(),
            }
        }

        fn run(
            &mut self,
            flow: &FlowDef,
            state: JourneyState,
            now: DateTime<Utc>,
            tz: Tz,
        ) -> (Vec<Effect>, Outcome) {
            let histograms = [(&self.histogram, chrono_tz::UTC)];
            let mut facts = Facts {
                now,
                journey_id: "j1",
                customer_id: "c1",
                tz,
                control: false,
                paused: false,
                in_audience: true,
                attributes: &self.attributes,
                traits: &self.traits,
                segments: &self.segments,
                activity: &self.activity,
                histograms: &histograms,
                caps: &self.caps,
                quiet_hours: &self.quiet,
                cap_counts: &mut self.counts,
            };
            advance(flow, state, &mut facts)
        }
    }

    fn sends(effects: &[Effect]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for effect in effects {
            if let Effect::Send(order) = effect {
                out.push((order.template.clone(), order.idempotency_key.clone()));
            }
        }
        out
    }

    fn sleeping(outcome: Outcome) -> (DateTime<Utc>, JourneyState) {
        match outcome {
            Outcome::Sleep { at, state } => (at, state),
            other => panic!("expected a sleep, got {other:?}"),
        }
    }

    #[test]
    fn a_wait_sleeps_then_the_next_send_goes_with_a_stable_key() {
        let flow = flow(vec![
            step("s0", send("t0"), Some(1)),
            step("w", StepKind::Wait(Wait::For { secs: 3600 }), Some(2)),
            step("s1", send("t1"), None),
        ]);
        let mut world = World::new();
        let (effects, outcome) = world.run(&flow, JourneyState::start(), at(9, 0), chrono_tz::UTC);
        assert_eq!(
            sends(&effects),
            vec![("t0".to_owned(), "j1:s0#1".to_owned())]
        );
        let (wake, state) = sleeping(outcome);
        assert_eq!(wake, at(10, 0));
        // Woken early (an unrelated event): it sleeps again, nothing sent.
        let (effects, outcome) = world.run(&flow, state.clone(), at(9, 30), chrono_tz::UTC);
        assert!(effects.is_empty());
        assert_eq!(sleeping(outcome).0, at(10, 0));
        // On time: the second send, then the end.
        let (effects, outcome) = world.run(&flow, state.clone(), at(10, 0), chrono_tz::UTC);
        assert_eq!(
            sends(&effects),
            vec![("t1".to_owned(), "j1:s1#3".to_owned())]
        );
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::Completed
            }
        );
        // A retry of the same run (the commit failed) produces the same key.
        let (again, _) = world.run(&flow, state, at(10, 0), chrono_tz::UTC);
        assert_eq!(sends(&again), sends(&effects));
    }

    #[test]
    fn until_a_local_time_waits_for_that_time_in_the_customers_timezone() {
        let flow = flow(vec![
            step(
                "w",
                StepKind::Wait(Wait::UntilLocalTime {
                    hour: 18,
                    minute: 0,
                }),
                Some(1),
            ),
            step("s", send("t"), None),
        ]);
        let mut world = World::new();
        // 09:00 UTC is 10:00 in Algiers: 18:00 there is 17:00 UTC today.
        let (_, outcome) = world.run(
            &flow,
            JourneyState::start(),
            at(9, 0),
            chrono_tz::Africa::Algiers,
        );
        assert_eq!(sleeping(outcome).0, at(17, 0));
        // 09:00 UTC is 18:00 in Tokyo: it is already the time, the send goes now.
        let (effects, outcome) = world.run(
            &flow,
            JourneyState::start(),
            at(9, 0),
            chrono_tz::Asia::Tokyo,
        );
        assert_eq!(sends(&effects).len(), 1);
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::Completed
            }
        );
        // 10:00 UTC is 19:00 in Tokyo: tomorrow's 18:00, 09:00 UTC the next day.
        let (_, outcome) = world.run(
            &flow,
            JourneyState::start(),
            at(10, 0),
            chrono_tz::Asia::Tokyo,
        );
        assert_eq!(sleeping(outcome).0, at(9, 0) + Duration::days(1));
    }

    #[test]
    fn branches_on_attributes_traits_segments_and_events_of_this_journey() {
        let condition = |c: BranchCondition| {
            flow(vec![
                step(
                    "b",
                    StepKind::Branch {
                        condition: c,
                        then_to: Some(1),
                        else_to: Some(2),
                    },
                    None,
                ),
                step("yes", send("yes"), None),
                step("no", send("no"), None),
            ])
        };
        let mut world = World::new();
        world.attributes = serde_json::json!({ "tier": "gold" });
        world.traits = serde_json::json!({ "orders_count": 4 });
        world.segments.insert("vip".into(), true);
        let template = |world: &mut World, flow: &FlowDef| {
            let (effects, _) = world.run(flow, JourneyState::start(), at(9, 0), chrono_tz::UTC);
            sends(&effects)[0].0.clone()
        };
        let attribute = condition(BranchCondition::Attribute(PropertyCondition {
            path: vec!["tier".into()],
            test: PropertyTest::Eq(serde_json::json!("gold")),
        }));
        assert_eq!(template(&mut world, &attribute), "yes");
        let traits = condition(BranchCondition::Trait(PropertyCondition {
            path: vec!["orders_count".into()],
            test: PropertyTest::Gte(5.0),
        }));
        assert_eq!(template(&mut world, &traits), "no");
        let segment = condition(BranchCondition::Segment {
            segment: "vip".into(),
        });
        assert_eq!(template(&mut world, &segment), "yes");
        let clicked = condition(BranchCondition::Event {
            event: EventMatch {
                event: "message_clicked".into(),
                conditions: vec![PropertyCondition {
                    path: vec!["channel".into()],
                    test: PropertyTest::Eq(serde_json::json!("push")),
                }],
            },
            within_secs: 72 * 3600,
        });
        // A click on another journey's message does not count; one on this journey's does.
        world.activity.push(Activity {
            name: "message_clicked".into(),
            at: at(8, 0),
            properties: serde_json::json!({ "channel": "push", "journey_id": "other" }),
        });
        assert_eq!(template(&mut world, &clicked), "no");
        world.activity.push(Activity {
            name: "message_clicked".into(),
            at: at(8, 0),
            properties: serde_json::json!({ "channel": "push", "journey_id": "j1" }),
        });
        assert_eq!(template(&mut world, &clicked), "yes");
    }

    #[test]
    fn a_random_split_is_the_same_on_every_retry_and_near_its_share() {
        let flow = flow(vec![
            step(
                "split",
                StepKind::Branch {
                    condition: BranchCondition::Random { percent: 30.0 },
                    then_to: Some(1),
                    else_to: None,
                },
                None,
            ),
            step("then", send("then"), None),
        ]);
        let mut taken = 0;
        for i in 0..2000 {
            let journey = format!("j{i}");
            let first = experiment::random_branch(&journey, "split", 30.0);
            assert_eq!(first, experiment::random_branch(&journey, "split", 30.0));
            if first {
                taken += 1;
            }
        }
        assert!(
            (500..700).contains(&taken),
            "{taken} of 2000 took the 30 % branch"
        );
        let mut world = World::new();
        let (a, _) = world.run(&flow, JourneyState::start(), at(9, 0), chrono_tz::UTC);
        let (b, _) = world.run(&flow, JourneyState::start(), at(9, 0), chrono_tz::UTC);
        assert_eq!(a, b);
    }

    #[test]
    fn a_wait_for_an_event_ends_on_the_event_or_takes_the_timeout_path() {
        let flow = flow(vec![
            step(
                "w",
                StepKind::Wait(Wait::Event {
                    event: EventMatch {
                        event: "app_opened".into(),
                        conditions: Vec::new(),
                    },
                    timeout_secs: 2 * 86_400,
                    on_timeout: Some(2),
                }),
                Some(1),
            ),
            step("opened", send("opened"), None),
            step("nudge", send("nudge"), Some(1)),
        ]);
        let mut world = World::new();
        let (_, outcome) = world.run(&flow, JourneyState::start(), at(9, 0), chrono_tz::UTC);
        let (wake, waiting) = sleeping(outcome);
        assert_eq!(wake, at(9, 0) + Duration::days(2));
        // An app open before the wait began does not end it.
        world.activity.push(Activity {
            name: "app_opened".into(),
            at: at(8, 0),
            properties: serde_json::json!({}),
        });
        let (effects, _) = world.run(&flow, waiting.clone(), at(12, 0), chrono_tz::UTC);
        assert!(sends(&effects).is_empty());
        // One after it does.
        world.activity.push(Activity {
            name: "app_opened".into(),
            at: at(11, 0),
            properties: serde_json::json!({}),
        });
        let (effects, _) = world.run(&flow, waiting.clone(), at(12, 0), chrono_tz::UTC);
        assert_eq!(sends(&effects)[0].0, "opened");
        // Without it, the timeout path, then the step after the wait.
        world.activity.clear();
        let (effects, outcome) =
            world.run(&flow, waiting, at(9, 0) + Duration::days(2), chrono_tz::UTC);
        let templates: Vec<String> = sends(&effects).into_iter().map(|s| s.0).collect();
        assert_eq!(templates, vec!["nudge", "opened"]);
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::Completed
            }
        );
    }

    #[test]
    fn quiet_hours_defer_then_the_caps_decide_in_the_morning() {
        let flow = flow(vec![step("s", send("t"), None)]);
        let mut world = World::new();
        world.quiet = QuietHoursRule::default(); // 22:00–08:00
        world.caps = CapSettings {
            rules: vec![CapRule {
                channel: Some(ChannelName::Push),
                period: CapPeriod::Day,
                max: 1,
            }],
            policy: CapPolicy::Skip,
        };
        // 23:00 in UTC: quiet until 08:00.
        let (effects, outcome) = world.run(&flow, JourneyState::start(), at(23, 0), chrono_tz::UTC);
        assert!(matches!(effects.last(), Some(Effect::QuietDeferred { .. })));
        let (wake, deferred) = sleeping(outcome);
        assert_eq!(wake, at(8, 0) + Duration::days(1));
        // In the morning it goes and counts; a second journey that day is skipped by the cap.
        let (effects, _) = world.run(&flow, deferred.clone(), wake, chrono_tz::UTC);
        assert_eq!(sends(&effects).len(), 1);
        let (effects, outcome) = world.run(
            &flow,
            JourneyState::start(),
            wake + Duration::hours(1),
            chrono_tz::UTC,
        );
        assert!(sends(&effects).is_empty());
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::CapSkipped { .. }))
        );
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::Completed
            }
        );
    }

    #[test]
    fn a_paused_flow_holds_before_a_send_and_control_journeys_send_nothing() {
        let flow = flow(vec![step("s", send("t"), None)]);
        let mut world = World::new();
        let histograms = [(&world.histogram, chrono_tz::UTC)];
        let mut facts = Facts {
            now: at(9, 0),
            journey_id: "j1",
            customer_id: "c1",
            tz: chrono_tz::UTC,
            control: false,
            paused: true,
            in_audience: true,
            attributes: &world.attributes,
            traits: &world.traits,
            segments: &world.segments,
            activity: &world.activity,
            histograms: &histograms,
            caps: &world.caps,
            quiet_hours: &world.quiet,
            cap_counts: &mut world.counts,
        };
        let (effects, outcome) = advance(&flow, JourneyState::start(), &mut facts);
        assert!(effects.is_empty());
        assert_eq!(
            outcome,
            Outcome::Hold {
                state: JourneyState::start()
            }
        );
        facts.paused = false;
        facts.control = true;
        let (effects, outcome) = advance(&flow, JourneyState::start(), &mut facts);
        assert!(sends(&effects).is_empty());
        assert!(effects.iter().any(|e| matches!(e, Effect::HeldOut { .. })));
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::Completed
            }
        );
        facts.control = false;
        facts.in_audience = false;
        let (_, outcome) = advance(&flow, JourneyState::start(), &mut facts);
        assert_eq!(
            outcome,
            Outcome::End {
                reason: EndReason::LeftAudience
            }
        );
    }
}
