//! What a flow or broadcast earned: attribution of conversions to sends (last touch within
//! the attribution window), rates, and each variant's uplift over the control group with a
//! 95 % confidence interval. Pure: the store loads the rows, this computes the figures.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::model::ChannelName;

/// A customer who entered the campaign (a journey started; a broadcast recipient).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub customer: String,
    /// The journey's id, or the broadcast run's recipient key.
    pub journey: String,
    pub at: DateTime<Utc>,
    pub control: bool,
    /// For a broadcast: the variant drawn (empty without variants).
    pub variant: String,
}

/// A journey reaching a step (send steps and the others alike).
#[derive(Debug, Clone, PartialEq)]
pub struct StepVisit {
    pub journey: String,
    pub step: String,
    pub at: DateTime<Utc>,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    /// Handed to a provider or stored in an inbox.
    Sent,
    /// Not sent: consent, address, or a frequency cap with the skip policy.
    Skipped,
    /// Failed for good.
    Failed,
}

/// One message of the campaign, with what the customer did with it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    pub customer: String,
    pub journey: String,
    /// The step's id; empty for a broadcast.
    pub step: String,
    /// The variant's name; empty without variants.
    pub variant: String,
    pub channel: Option<ChannelName>,
    pub status: MessageStatus,
    /// When it was sent (or skipped / failed).
    pub at: DateTime<Utc>,
    pub delivered: bool,
    pub opened: bool,
    pub clicked: bool,
    /// True when a frequency cap deferred or skipped it.
    pub capped: bool,
}

/// A conversion event of a customer of the campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversionEvent {
    pub customer: String,
    pub at: DateTime<Utc>,
    pub revenue: f64,
}

/// How a step is shown in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub id: String,
    /// `wait`, `send`, `branch`, `update`, `exit`, `goto`.
    pub kind: String,
    pub summary: String,
    pub channels: Vec<ChannelName>,
    /// (name, template, weight) of each variant of a send step.
    pub variants: Vec<(String, String, u32)>,
}

/// Everything the report is computed from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportInput {
    pub entries: Vec<Entry>,
    pub visits: Vec<StepVisit>,
    pub messages: Vec<MessageRecord>,
    pub conversions: Vec<ConversionEvent>,
    /// The attribution window, seconds.
    pub window_secs: i64,
    /// The flow's steps in order; empty for a broadcast.
    pub steps: Vec<StepInfo>,
    /// A broadcast's variants (name, template, weight); empty for a flow.
    pub variants: Vec<(String, String, u32)>,
    /// Whether the campaign has a control group (percent > 0).
    pub has_control: bool,
}

/// The figures of one group (see `relance.v1.ReportStats`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub entered: u64,
    pub sends: u64,
    pub delivered: u64,
    pub opens: u64,
    pub clicks: u64,
    pub ctr: f64,
    pub conversions: u64,
    pub conversion_rate: f64,
    pub revenue: f64,
    pub skipped: u64,
    pub failed: u64,
    pub capped: u64,
}

/// A difference in conversion rate with its 95 % confidence interval (two proportions,
/// unpooled normal approximation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Uplift {
    pub absolute: f64,
    pub relative: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub significant: bool,
    pub p_value: f64,
}

/// One variant's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantFigures {
    pub name: String,
    pub template: String,
    pub weight: u32,
    pub stats: Stats,
    pub uplift: Option<Uplift>,
}

/// One step's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFigures {
    pub info: StepInfo,
    pub stats: Stats,
    pub variants: Vec<VariantFigures>,
}

/// One channel's share of the attributed conversions.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelFigures {
    pub channel: ChannelName,
    pub conversions: u64,
    pub share: f64,
    pub revenue: f64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    pub total: Stats,
    pub control: Option<Stats>,
    pub uplift: Option<Uplift>,
    pub steps: Vec<StepFigures>,
    pub variants: Vec<VariantFigures>,
    pub channel_shares: Vec<ChannelFigures>,
}

/// Computes the report.
pub fn compute(input: &ReportInput) -> Report {
    let _ = input;
    let _: BTreeMap<(), ()> = BTreeMap::new();
    unimplemented!()
}

/// The uplift of `treated` over `control` (conversions, entered of each).
pub fn uplift(treated: (u64, u64), control: (u64, u64)) -> Uplift {
    let _ = (treated, control);
    unimplemented!()
}
