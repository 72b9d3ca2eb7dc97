//! What a flow or broadcast definition says, once parsed and validated. Stored as JSON
//! beside the YAML document, so a journey runs on exactly the version it started on.

use serde::{Deserialize, Serialize};

/// The default consent topic of campaign messages.
pub const DEFAULT_TOPIC: &str = "marketing";
/// The default conversion goal's event.
pub const DEFAULT_CONVERSION_EVENT: &str = "order_completed";
/// The default attribution window: 72 h.
pub const DEFAULT_ATTRIBUTION_SECS: i64 = 72 * 3600;
/// The longest attribution window: 30 days.
pub const MAX_ATTRIBUTION_SECS: i64 = 30 * 86_400;

/// A delivery channel, named as in the documents (`push`, `email`, `sms`, `whatsapp`,
/// `in_app`, `webhook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelName {
    Push,
    Email,
    Sms,
    Whatsapp,
    InApp,
    Webhook,
}

impl ChannelName {
    /// Every channel, in the proto's order.
    pub const ALL: [ChannelName; 6] = [
        ChannelName::Push,
        ChannelName::Email,
        ChannelName::Sms,
        ChannelName::Whatsapp,
        ChannelName::InApp,
        ChannelName::Webhook,
    ];

    /// The name used in documents, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelName::Push => "push",
            ChannelName::Email => "email",
            ChannelName::Sms => "sms",
            ChannelName::Whatsapp => "whatsapp",
            ChannelName::InApp => "in_app",
            ChannelName::Webhook => "webhook",
        }
    }

    /// Reads a channel's name (`in-app` is accepted for `in_app`).
    pub fn parse(name: &str) -> Option<ChannelName> {
        match name {
            "push" => Some(ChannelName::Push),
            "email" => Some(ChannelName::Email),
            "sms" => Some(ChannelName::Sms),
            "whatsapp" => Some(ChannelName::Whatsapp),
            "in_app" | "in-app" | "inapp" => Some(ChannelName::InApp),
            "webhook" => Some(ChannelName::Webhook),
            _ => None,
        }
    }
}

/// A test of one property of an event or one profile attribute (`where:` in documents:
/// `{ channel: push }` is `Eq`, `{ revenue: { gte: 20 } }` is `Gte`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertyTest {
    Eq(serde_json::Value),
    Neq(serde_json::Value),
    In(Vec<serde_json::Value>),
    NotIn(Vec<serde_json::Value>),
    Gt(f64),
    Gte(f64),
    Lt(f64),
    Lte(f64),
    /// `exists: true` holds when the value is present and not null; `false` when absent.
    Exists(bool),
    /// The string contains the text, or the array holds the value.
    Contains(serde_json::Value),
}

/// A test at a dotted path (`items.category`; arrays on the way are searched item by item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyCondition {
    pub path: Vec<String>,
    pub test: PropertyTest,
}

/// An event name with conditions on its properties, all of which must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMatch {
    pub event: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PropertyCondition>,
}

/// What counts as a conversion, and for how long after a send (or, for the control group,
/// after entering).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    pub goal: EventMatch,
    pub within_secs: i64,
}

impl Default for Conversion {
    fn default() -> Conversion {
        Conversion {
            goal: EventMatch {
                event: DEFAULT_CONVERSION_EVENT.to_owned(),
                conditions: Vec::new(),
            },
            within_secs: DEFAULT_ATTRIBUTION_SECS,
        }
    }
}

/// What starts a journey.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `trigger: { event: cart_updated, where: {...} }`
    Event(EventMatch),
    /// `trigger: { segment_entered: lapsed-60d }`
    SegmentEntered { segment: String },
    /// `trigger: { schedule: "0 18 1 * *", segment: vip, local_time: true }`: at each
    /// occurrence, every member of the segment starts a journey.
    Schedule {
        cron: String,
        segment: String,
        local_time: bool,
    },
}

/// When a customer may start another journey in the same flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReEntry {
    /// Once per customer, ever (the default).
    #[default]
    Never,
    /// Again once this long has passed since the previous journey *started*, and the
    /// previous one has ended.
    After { secs: i64 },
    /// Again as soon as the previous journey has ended.
    Always,
}

/// Who may be in the flow: members of `segment` (when set), none of `exclude_segments`.
/// Checked on entry and before each send; leaving it ends the journey (LEFT_AUDIENCE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Audience {
    pub segment: Option<String>,
    #[serde(default)]
    pub exclude_segments: Vec<String>,
}

/// A parsed, validated `kind: Flow` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowDef {
    pub name: String,
    pub description: String,
    pub trigger: Trigger,
    /// The goal: an event matching it ends the journey (GOAL_REACHED).
    pub exit_when: Option<EventMatch>,
    pub conversion: Conversion,
    pub re_entry: ReEntry,
    pub audience: Audience,
    /// 0 to 50.
    pub control_group_percent: f64,
    /// Consent topic of the flow's sends unless a step names its own.
    pub topic: String,
    /// The steps, flattened depth first: index 0 is the first step; a branch's `then`
    /// steps come before its `else` steps. Every `next`/target index is inside the vector.
    pub steps: Vec<Step>,
}

/// One step, flattened. `next` is where the journey goes after it; `None` ends the journey
/// (COMPLETED).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The `id:` in the document, or its path (`steps[4]`, `steps[5].branch.else[0]`).
    pub id: String,
    /// One line for people: `wait 24h`, `send push cart-1`, `branch: message_clicked within 72h`.
    pub summary: String,
    pub kind: StepKind,
    pub next: Option<usize>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Wait(Wait),
    Send(Send),
    /// Goes to `then_to` when the condition holds, else to `else_to` (`None`: the step
    /// after the branch, i.e. `next`).
    Branch {
        condition: BranchCondition,
        then_to: Option<usize>,
        else_to: Option<usize>,
    },
    /// Sets profile attributes (`update: { set: { voucher_sent: true } }`).
    Update {
        set: serde_json::Map<String, serde_json::Value>,
    },
    /// Ends the journey (EXIT_STEP).
    Exit,
    /// Jumps to another step (`goto: step-id`); a cycle must contain a timed wait.
    Goto {
        target: usize,
    },
}

/// How long a `wait` step waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// `wait: 24h`
    For { secs: i64 },
    /// `wait: { until: "18:00" }`: the next 18:00 in the customer's timezone (now, if it
    /// is exactly 18:00).
    UntilLocalTime { hour: u32, minute: u32 },
    /// `wait: { until: best_time, within: 24h }`: the hour in the next `within` when this
    /// customer is most likely to act.
    BestTime { within_secs: i64 },
    /// `wait: { event: order_completed, where: {...}, timeout: 48h, on_timeout: [...] }`:
    /// until a matching event after the wait began (then `next`), or the timeout (then
    /// `on_timeout`'s first step, or `next` when there are none).
    Event {
        event: EventMatch,
        timeout_secs: i64,
        on_timeout: Option<usize>,
    },
}

/// One arm of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: String,
    pub weight: u32,
    pub template: String,
    /// Empty: the step's channels.
    #[serde(default)]
    pub channels: Vec<ChannelName>,
}

/// A `send` step: a template (or weighted variants) on one channel or an ordered list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Send {
    pub channels: Vec<ChannelName>,
    /// Set when there are no variants.
    pub template: Option<String>,
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// Overrides the flow's topic.
    pub topic: Option<String>,
    /// Extra template variables (`data:`), a JSON object.
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Send {
    /// Every template the step may send.
    pub fn templates(&self) -> Vec<&str> {
        let mut names = Vec::new();
        if let Some(template) = &self.template {
            names.push(template.as_str());
        }
        for variant in &self.variants {
            names.push(variant.template.as_str());
        }
        names
    }
}

/// What a `branch` tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchCondition {
    /// `if: { event: message_clicked, where: { channel: push }, within: 72h }`: such an
    /// event happened in the last `within` (and, for `message_*` events, belongs to this
    /// journey).
    Event { event: EventMatch, within_secs: i64 },
    /// `if: { attribute: city, eq: Oran }` on the profile's attributes.
    Attribute(PropertyCondition),
    /// `if: { trait: orders_count, gte: 3 }` on the profile's computed traits.
    Trait(PropertyCondition),
    /// `if: { segment: vip }`: the customer is a member now.
    Segment { segment: String },
    /// `if: { random: 30 }`: 30 % of journeys take `then`, decided by a hash of the
    /// journey and the step (the same answer on every retry).
    Random { percent: f64 },
}

impl FlowDef {
    /// Segments the flow reads (trigger, audience, branches): they must exist.
    pub fn segments(&self) -> Vec<&str> {
        let mut names = Vec::new();
        match &self.trigger {
            Trigger::SegmentEntered { segment } | Trigger::Schedule { segment, .. } => {
                names.push(segment.as_str())
            }
            Trigger::Event(_) => {}
        }
        if let Some(segment) = &self.audience.segment {
            names.push(segment.as_str());
        }
        for segment in &self.audience.exclude_segments {
            names.push(segment.as_str());
        }
        for step in &self.steps {
            if let StepKind::Branch {
                condition: BranchCondition::Segment { segment },
                ..
            } = &step.kind
            {
                names.push(segment.as_str());
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Templates the flow sends: they must exist.
    pub fn templates(&self) -> Vec<&str> {
        let mut names = Vec::new();
        for step in &self.steps {
            if let StepKind::Send(send) = &step.kind {
                names.extend(send.templates());
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Event names the flow reacts to (trigger, goal, conversion, waits, branches): the
    /// consumer keeps these in the activity log.
    pub fn event_names(&self) -> Vec<&str> {
        let mut names = vec![self.conversion.goal.event.as_str()];
        if let Trigger::Event(event) = &self.trigger {
            names.push(event.event.as_str());
        }
        if let Some(goal) = &self.exit_when {
            names.push(goal.event.as_str());
        }
        for step in &self.steps {
            match &step.kind {
                StepKind::Wait(Wait::Event { event, .. }) => names.push(event.event.as_str()),
                StepKind::Branch {
                    condition: BranchCondition::Event { event, .. },
                    ..
                } => names.push(event.event.as_str()),
                _ => {}
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The longest look-back a branch on events needs, in seconds.
    pub fn longest_event_window_secs(&self) -> i64 {
        let mut longest = 0;
        for step in &self.steps {
            if let StepKind::Branch {
                condition: BranchCondition::Event { within_secs, .. },
                ..
            } = &step.kind
            {
                longest = longest.max(*within_secs);
            }
        }
        longest
    }

    /// The index of the step with this id.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|step| step.id == id)
    }
}

/// A parsed, validated `kind: Broadcast` document (the domain form of `BroadcastSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastDef {
    pub name: String,
    pub description: String,
    pub segment: String,
    #[serde(default)]
    pub exclude_segments: Vec<String>,
    pub channels: Vec<ChannelName>,
    pub template: Option<String>,
    #[serde(default)]
    pub variants: Vec<Variant>,
    pub topic: String,
    pub schedule: BroadcastSchedule,
    pub control_group_percent: f64,
    /// 0: only the channel's global limit.
    pub max_sends_per_second: u32,
    pub conversion: Conversion,
    pub ignore_frequency_caps: bool,
    pub ignore_quiet_hours: bool,
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// When a broadcast goes out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BroadcastSchedule {
    /// At once.
    Now,
    /// Once, at this instant.
    At(chrono::DateTime<chrono::Utc>),
    /// Once, at the same local time in every timezone (in waves).
    LocalTime {
        date: chrono::NaiveDate,
        hour: u32,
        minute: u32,
        skip_if_past: bool,
    },
    /// Repeatedly, on a 5-field cron expression.
    Recurring {
        cron: String,
        local_time: bool,
        starts_at: Option<chrono::DateTime<chrono::Utc>>,
        ends_at: Option<chrono::DateTime<chrono::Utc>>,
    },
}
