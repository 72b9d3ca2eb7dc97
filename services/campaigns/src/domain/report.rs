//! What a flow or broadcast earned: attribution of conversions to sends (last touch within
//! the attribution window), rates, and each variant's uplift over the control group with a
//! 95 % confidence interval. Pure: the store loads the rows, this computes the figures.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};

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
    /// Held by a frequency cap (it counts in `capped` only; once sent it is a `Sent` record
    /// of its own).
    Deferred,
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
    /// Its `currency` property (ISO 4217), empty when it has none.
    pub currency: String,
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
    /// The currency of the revenue figures, from the conversion events (see [`currency_of`]).
    pub currency: String,
    pub total: Stats,
    pub control: Option<Stats>,
    pub uplift: Option<Uplift>,
    pub steps: Vec<StepFigures>,
    pub variants: Vec<VariantFigures>,
    pub channel_shares: Vec<ChannelFigures>,
}

/// The z value of a two-sided 95 % interval.
const Z_95: f64 = 1.959964;

/// A conversion event credited to the send it followed (last touch).
struct Attributed<'a> {
    customer: &'a str,
    revenue: f64,
    step: &'a str,
    variant: &'a str,
    channel: Option<ChannelName>,
}

/// Computes the report.
///
/// Messages and step visits of control journeys are left out: control customers are sent
/// nothing, so whatever such a row says is not the treated group's. An attributed event
/// whose message has no channel counts in the totals but in no channel's share.
pub fn compute(input: &ReportInput) -> Report {
    let window = window(input.window_secs);

    let mut treated_entered = 0u64;
    let mut control_entered = 0u64;
    let mut control_journeys: BTreeSet<&str> = BTreeSet::new();
    for entry in &input.entries {
        if entry.control {
            control_entered += 1;
            control_journeys.insert(&entry.journey);
        } else {
            treated_entered += 1;
        }
    }

    let messages: Vec<&MessageRecord> = input
        .messages
        .iter()
        .filter(|m| !control_journeys.contains(m.journey.as_str()))
        .collect();
    let attributed = attribute(&messages, &input.conversions, window);

    let mut total = message_stats(messages.iter().copied());
    total.entered = treated_entered;
    add_conversions(&mut total, attributed.iter());
    finish(&mut total);

    let control = if input.has_control {
        Some(control_stats(input, window, control_entered))
    } else {
        None
    };
    let total_uplift = control.as_ref().map(|c| uplift_of(&total, c));

    let mut steps = Vec::with_capacity(input.steps.len());
    for info in &input.steps {
        steps.push(step_figures(
            info,
            &input.visits,
            &control_journeys,
            &messages,
            &attributed,
            control.as_ref(),
        ));
    }

    let mut variants = Vec::with_capacity(input.variants.len());
    for (name, template, weight) in &input.variants {
        let mut entered = 0u64;
        for entry in &input.entries {
            if !entry.control && entry.variant == *name {
                entered += 1;
            }
        }
        let mut stats = message_stats(messages.iter().copied().filter(|m| m.variant == *name));
        stats.entered = entered;
        add_conversions(&mut stats, attributed.iter().filter(|a| a.variant == name));
        finish(&mut stats);
        variants.push(VariantFigures {
            name: name.clone(),
            template: template.clone(),
            weight: *weight,
            uplift: control.as_ref().map(|c| uplift_of(&stats, c)),
            stats,
        });
    }

    Report {
        currency: currency_of(&input.conversions),
        total,
        control,
        uplift: total_uplift,
        steps,
        variants,
        channel_shares: channel_shares(&attributed),
    }
}

/// The currency the conversion events report revenue in; several joined with "/" (their
/// sum mixes currencies and the report must say so), empty when none names one.
pub fn currency_of(conversions: &[ConversionEvent]) -> String {
    let mut codes: BTreeSet<&str> = BTreeSet::new();
    for conversion in conversions {
        if !conversion.currency.is_empty() {
            codes.insert(&conversion.currency);
        }
    }
    codes.into_iter().collect::<Vec<_>>().join("/")
}

/// The uplift of `treated` over `control` (conversions, entered of each).
///
/// Two proportions, unpooled normal approximation. With an empty group there is nothing
/// to compare (zeros, p-value 1); with no variance at all (every rate 0 or 1) the
/// interval is the difference itself.
pub fn uplift(treated: (u64, u64), control: (u64, u64)) -> Uplift {
    let (c1, n1) = treated;
    let (c0, n0) = control;
    if n1 == 0 || n0 == 0 {
        return Uplift {
            p_value: 1.0,
            ..Uplift::default()
        };
    }
    let p1 = ratio(c1, n1);
    let p0 = ratio(c0, n0);
    let absolute = p1 - p0;
    let relative = if p0 == 0.0 { 0.0 } else { absolute / p0 };
    // Clamped so that more conversions than entries (a customer on several journeys)
    // cannot make the variance negative.
    let variance = (p1 * (1.0 - p1) / n1 as f64 + p0 * (1.0 - p0) / n0 as f64).max(0.0);
    let se = variance.sqrt();
    if se == 0.0 {
        let differs = absolute != 0.0;
        return Uplift {
            absolute,
            relative,
            ci_low: absolute,
            ci_high: absolute,
            significant: differs,
            p_value: if differs { 0.0 } else { 1.0 },
        };
    }
    let ci_low = absolute - Z_95 * se;
    let ci_high = absolute + Z_95 * se;
    // 2·(1 − Φ(|z|)) written as 2·Φ(−|z|), which keeps small p-values accurate.
    let z = absolute.abs() / se;
    let p_value = (2.0 * normal_cdf(-z)).clamp(0.0, 1.0);
    Uplift {
        absolute,
        relative,
        ci_low,
        ci_high,
        significant: ci_low > 0.0 || ci_high < 0.0,
        p_value,
    }
}

/// The attribution window; `None` (no limit) when too long to represent.
fn window(secs: i64) -> Option<TimeDelta> {
    TimeDelta::try_seconds(secs)
}

/// True when `at` falls in `[since, since + window]`.
fn within(since: DateTime<Utc>, at: DateTime<Utc>, window: Option<TimeDelta>) -> bool {
    if at < since {
        return false;
    }
    match window {
        Some(window) => at - since <= window,
        None => true,
    }
}

/// `num / den`, 0 when `den` is 0.
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        return 0.0;
    }
    num as f64 / den as f64
}

/// Credits each conversion event to its customer's latest sent message at or before it
/// within the window (last touch; of messages sent at the same instant, the later listed).
/// Events without such a message are dropped.
fn attribute<'a>(
    messages: &[&'a MessageRecord],
    events: &'a [ConversionEvent],
    window: Option<TimeDelta>,
) -> Vec<Attributed<'a>> {
    let mut sent: BTreeMap<&str, Vec<&MessageRecord>> = BTreeMap::new();
    for message in messages {
        if message.status == MessageStatus::Sent {
            sent.entry(message.customer.as_str())
                .or_default()
                .push(message);
        }
    }
    let mut attributed = Vec::new();
    for event in events {
        let Some(candidates) = sent.get(event.customer.as_str()) else {
            continue;
        };
        let mut last: Option<&MessageRecord> = None;
        for message in candidates {
            if !within(message.at, event.at, window) {
                continue;
            }
            if last.is_none_or(|l| message.at >= l.at) {
                last = Some(message);
            }
        }
        let Some(message) = last else {
            continue;
        };
        attributed.push(Attributed {
            customer: &event.customer,
            revenue: event.revenue,
            step: &message.step,
            variant: &message.variant,
            channel: message.channel,
        });
    }
    attributed
}

/// The message counts of a group (entered, conversions and rates are left to the caller).
fn message_stats<'a>(messages: impl Iterator<Item = &'a MessageRecord>) -> Stats {
    let mut stats = Stats::default();
    for message in messages {
        if message.capped {
            stats.capped += 1;
        }
        match message.status {
            MessageStatus::Sent => {
                stats.sends += 1;
                if message.delivered {
                    stats.delivered += 1;
                }
                if message.opened {
                    stats.opens += 1;
                }
                if message.clicked {
                    stats.clicks += 1;
                }
            }
            MessageStatus::Skipped => stats.skipped += 1,
            MessageStatus::Failed => stats.failed += 1,
            MessageStatus::Deferred => {}
        }
    }
    stats
}

/// Adds attributed events: each customer once in `conversions`, every event's revenue.
fn add_conversions<'a, 'b: 'a>(
    stats: &mut Stats,
    events: impl Iterator<Item = &'a Attributed<'b>>,
) {
    let mut customers: BTreeSet<&str> = BTreeSet::new();
    for event in events {
        customers.insert(event.customer);
        stats.revenue += event.revenue;
    }
    stats.conversions += customers.len() as u64;
}

/// Fills in the rates from the counts.
fn finish(stats: &mut Stats) {
    stats.ctr = ratio(stats.clicks, stats.sends);
    stats.conversion_rate = ratio(stats.conversions, stats.entered);
}

/// The uplift of one group's figures over the control group's.
fn uplift_of(stats: &Stats, control: &Stats) -> Uplift {
    uplift(
        (stats.conversions, stats.entered),
        (control.conversions, control.entered),
    )
}

/// The control group: a customer converts with an event in `[entered, entered + window]`
/// of one of their control entries (each event's revenue counted once).
fn control_stats(input: &ReportInput, window: Option<TimeDelta>, entered: u64) -> Stats {
    let mut entries: BTreeMap<&str, Vec<DateTime<Utc>>> = BTreeMap::new();
    for entry in &input.entries {
        if entry.control {
            entries
                .entry(entry.customer.as_str())
                .or_default()
                .push(entry.at);
        }
    }
    let mut stats = Stats {
        entered,
        ..Stats::default()
    };
    let mut customers: BTreeSet<&str> = BTreeSet::new();
    for event in &input.conversions {
        let Some(times) = entries.get(event.customer.as_str()) else {
            continue;
        };
        if !times.iter().any(|at| within(*at, event.at, window)) {
            continue;
        }
        customers.insert(&event.customer);
        stats.revenue += event.revenue;
    }
    stats.conversions = customers.len() as u64;
    finish(&mut stats);
    stats
}

/// One flow step's figures, with its variants' when it has some.
fn step_figures(
    info: &StepInfo,
    visits: &[StepVisit],
    control_journeys: &BTreeSet<&str>,
    messages: &[&MessageRecord],
    attributed: &[Attributed<'_>],
    control: Option<&Stats>,
) -> StepFigures {
    let mut journeys: BTreeSet<&str> = BTreeSet::new();
    for visit in visits {
        if visit.step == info.id && !control_journeys.contains(visit.journey.as_str()) {
            journeys.insert(&visit.journey);
        }
    }
    let mut stats = message_stats(messages.iter().copied().filter(|m| m.step == info.id));
    stats.entered = journeys.len() as u64;
    add_conversions(&mut stats, attributed.iter().filter(|a| a.step == info.id));
    finish(&mut stats);

    let mut variants = Vec::with_capacity(info.variants.len());
    for (name, template, weight) in &info.variants {
        // Assigned journeys: any message of the variant, skipped or failed ones included.
        let mut assigned: BTreeSet<&str> = BTreeSet::new();
        for message in messages {
            if message.step == info.id && message.variant == *name {
                assigned.insert(&message.journey);
            }
        }
        let mut variant = message_stats(
            messages
                .iter()
                .copied()
                .filter(|m| m.step == info.id && m.variant == *name),
        );
        variant.entered = assigned.len() as u64;
        add_conversions(
            &mut variant,
            attributed
                .iter()
                .filter(|a| a.step == info.id && a.variant == name),
        );
        finish(&mut variant);
        variants.push(VariantFigures {
            name: name.clone(),
            template: template.clone(),
            weight: *weight,
            uplift: control.map(|c| uplift_of(&variant, c)),
            stats: variant,
        });
    }

    StepFigures {
        info: info.clone(),
        stats,
        variants,
    }
}

/// Each channel's distinct converted customers and revenue, largest share first (ties in
/// channel order).
fn channel_shares(attributed: &[Attributed<'_>]) -> Vec<ChannelFigures> {
    let mut per_channel: BTreeMap<ChannelName, (BTreeSet<&str>, f64)> = BTreeMap::new();
    for event in attributed {
        let Some(channel) = event.channel else {
            continue;
        };
        let (customers, revenue) = per_channel.entry(channel).or_default();
        customers.insert(event.customer);
        *revenue += event.revenue;
    }
    let mut sum = 0u64;
    for (customers, _) in per_channel.values() {
        sum += customers.len() as u64;
    }
    let mut shares = Vec::with_capacity(per_channel.len());
    for (channel, (customers, revenue)) in per_channel {
        let conversions = customers.len() as u64;
        shares.push(ChannelFigures {
            channel,
            conversions,
            share: ratio(conversions, sum),
            revenue,
        });
    }
    // Shares have one denominator, so ordering by conversions orders by share; the sort
    // is stable, so ties keep the channel order of the map.
    shares.sort_by_key(|c| std::cmp::Reverse(c.conversions));
    shares
}

/// The standard normal CDF Φ.
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The complementary error function, by the Chebyshev fit of Numerical Recipes (`erfcc`):
/// fractional error below 1.2e-7 everywhere, so tail probabilities stay accurate too.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let ans = t * poly.exp();
    if x >= 0.0 { ans } else { 2.0 - ans }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hours: i64) -> DateTime<Utc> {
        let start = Utc
            .with_ymd_and_hms(2025, 5, 1, 0, 0, 0)
            .single()
            .expect("a valid date");
        start + TimeDelta::hours(hours)
    }

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not {expected} ± {tolerance}"
        );
    }

    fn entry(customer: &str, control: bool, variant: &str) -> Entry {
        Entry {
            customer: customer.to_string(),
            journey: format!("j-{customer}"),
            at: at(0),
            control,
            variant: variant.to_string(),
        }
    }

    fn visit(customer: &str, step: &str, hours: i64) -> StepVisit {
        StepVisit {
            journey: format!("j-{customer}"),
            step: step.to_string(),
            at: at(hours),
        }
    }

    /// `flags`: `d` delivered, `o` opened, `c` clicked, `x` capped.
    fn message(
        customer: &str,
        step: &str,
        variant: &str,
        channel: ChannelName,
        status: MessageStatus,
        hours: i64,
        flags: &str,
    ) -> MessageRecord {
        MessageRecord {
            customer: customer.to_string(),
            journey: format!("j-{customer}"),
            step: step.to_string(),
            variant: variant.to_string(),
            channel: Some(channel),
            status,
            at: at(hours),
            delivered: flags.contains('d'),
            opened: flags.contains('o'),
            clicked: flags.contains('c'),
            capped: flags.contains('x'),
        }
    }

    fn conversion(customer: &str, hours: i64, revenue: f64) -> ConversionEvent {
        ConversionEvent {
            customer: customer.to_string(),
            at: at(hours),
            revenue,
            currency: "GBP".to_owned(),
        }
    }

    #[test]
    fn the_currency_comes_from_the_conversion_events() {
        let mut conversions = vec![conversion("a", 1, 10.0), conversion("b", 2, 20.0)];
        assert_eq!(currency_of(&conversions), "GBP");
        conversions[1].currency = "EUR".to_owned();
        assert_eq!(
            currency_of(&conversions),
            "EUR/GBP",
            "mixed currencies are named"
        );
        conversions[0].currency.clear();
        conversions[1].currency.clear();
        assert_eq!(currency_of(&conversions), "", "unknown rather than guessed");
    }

    fn variant(name: &str, template: &str, weight: u32) -> (String, String, u32) {
        (name.to_string(), template.to_string(), weight)
    }

    /// A flow of three steps: `pn1` (push, variants A and B), `wait` (24 h), `mail`
    /// (e-mail). Ten treated customers c1–c10 (c1–c5 drew A, c6–c10 B) and four control
    /// customers k1–k4, all entering at hour 0; a 72 h window.
    fn flow_input() -> ReportInput {
        use MessageStatus::{Failed, Sent, Skipped};
        let mut entries = Vec::new();
        for i in 1..=10 {
            entries.push(entry(&format!("c{i}"), false, ""));
        }
        for i in 1..=4 {
            entries.push(entry(&format!("k{i}"), true, ""));
        }
        let mut visits = Vec::new();
        for i in 1..=10 {
            visits.push(visit(&format!("c{i}"), "pn1", 0));
        }
        // c1 comes back to pn1 (a goto): still one journey.
        visits.push(visit("c1", "pn1", 30));
        for i in 1..=8 {
            visits.push(visit(&format!("c{i}"), "wait", 0));
        }
        // A control journey walking the flow: not the treated group's.
        visits.push(visit("k1", "wait", 0));
        for i in 1..=6 {
            visits.push(visit(&format!("c{i}"), "mail", 24));
        }
        let push = ChannelName::Push;
        let email = ChannelName::Email;
        let messages = vec![
            message("c1", "pn1", "A", push, Sent, 0, "doc"),
            message("c2", "pn1", "A", push, Sent, 0, "do"),
            message("c3", "pn1", "A", push, Sent, 0, "d"),
            message("c4", "pn1", "A", push, Sent, 0, "d"),
            message("c5", "pn1", "A", push, Skipped, 0, "x"),
            message("c6", "pn1", "B", push, Sent, 0, "doc"),
            message("c7", "pn1", "B", push, Sent, 0, "d"),
            message("c8", "pn1", "B", push, Sent, 0, "d"),
            message("c9", "pn1", "B", push, Sent, 0, "d"),
            // The flags of a message not sent do not count.
            message("c10", "pn1", "B", push, Failed, 0, "d"),
            message("c1", "mail", "", email, Sent, 24, "do"),
            message("c2", "mail", "", email, Sent, 24, "doc"),
            message("c3", "mail", "", email, Sent, 24, "d"),
            message("c4", "mail", "", email, Skipped, 24, "o"),
            message("c5", "mail", "", email, Sent, 24, ""),
            message("c6", "mail", "", email, Sent, 24, "d"),
        ];
        let conversions = vec![
            // c1: pushed at 0 and mailed at 24, buys at 30 and 40 → both to the mail (last
            // touch), c1 counted once, revenue 150.
            conversion("c1", 30, 100.0),
            conversion("c1", 40, 50.0),
            // c2 buys at 10, before the mail: to pn1 A.
            conversion("c2", 10, 80.0),
            // c6 at 20: pn1 B.
            conversion("c6", 20, 60.0),
            // c7 at 100: 100 h after the push, outside the window.
            conversion("c7", 100, 70.0),
            // c8 at 72: exactly the window, inside.
            conversion("c8", 72, 40.0),
            // c5 at 5: its push was skipped, the mail comes later.
            conversion("c5", 5, 30.0),
            // c3 at −1: before any send.
            conversion("c3", -1, 25.0),
            // c10 at 2: its push failed.
            conversion("c10", 2, 20.0),
            // Control: k1 at 10 (in) and at −2 (before entering), k2 at 80 (out), k3 at 1
            // and 50 (in, counted once, revenue 25), k4 never.
            conversion("k1", 10, 90.0),
            conversion("k1", -2, 5.0),
            conversion("k2", 80, 35.0),
            conversion("k3", 1, 10.0),
            conversion("k3", 50, 15.0),
        ];
        let steps = vec![
            StepInfo {
                id: "pn1".to_string(),
                kind: "send".to_string(),
                summary: "send push (A/B)".to_string(),
                channels: vec![push],
                variants: vec![variant("A", "cart-a", 50), variant("B", "cart-b", 50)],
            },
            StepInfo {
                id: "wait".to_string(),
                kind: "wait".to_string(),
                summary: "wait 24h".to_string(),
                channels: Vec::new(),
                variants: Vec::new(),
            },
            StepInfo {
                id: "mail".to_string(),
                kind: "send".to_string(),
                summary: "send email cart-mail".to_string(),
                channels: vec![email],
                variants: Vec::new(),
            },
        ];
        ReportInput {
            entries,
            visits,
            messages,
            conversions,
            window_secs: 72 * 3600,
            steps,
            variants: Vec::new(),
            has_control: true,
        }
    }

    #[test]
    fn a_flow_report_counts_messages_and_attributes_conversions_to_the_last_touch() {
        let report = compute(&flow_input());

        // Sends: 8 pushes + 5 mails; delivered 8 + 4; opens c1 c2 c6 + c1 c2; clicks c1 c6
        // + c2. Converted: c1, c2, c6, c8 → 4 of 10; revenue 150 + 80 + 60 + 40.
        let total = &report.total;
        assert_eq!(total.entered, 10);
        assert_eq!(total.sends, 13);
        assert_eq!(total.delivered, 12);
        assert_eq!(total.opens, 5);
        assert_eq!(total.clicks, 3);
        close(total.ctr, 3.0 / 13.0, 1e-12);
        assert_eq!(total.skipped, 2);
        assert_eq!(total.failed, 1);
        assert_eq!(total.capped, 1);
        assert_eq!(total.conversions, 4);
        close(total.conversion_rate, 0.4, 1e-12);
        close(total.revenue, 330.0, 1e-9);

        // Control: k1 and k3 of 4; revenue 90 + 10 + 15.
        let control = report.control.as_ref().expect("a control group");
        assert_eq!(control.entered, 4);
        assert_eq!(control.conversions, 2);
        close(control.conversion_rate, 0.5, 1e-12);
        close(control.revenue, 115.0, 1e-9);
        assert_eq!(control.sends, 0);

        // 4/10 vs 2/4: absolute −0.1, relative −0.2, se = sqrt(.4·.6/10 + .5·.5/4)
        // = sqrt(.0865) = 0.294109, CI −0.1 ± 0.576443, p = 2·(1 − Φ(0.340010)) = 0.733849.
        let total_uplift = report.uplift.as_ref().expect("an uplift");
        close(total_uplift.absolute, -0.1, 1e-12);
        close(total_uplift.relative, -0.2, 1e-12);
        close(total_uplift.ci_low, -0.676443, 1e-6);
        close(total_uplift.ci_high, 0.476443, 1e-6);
        assert!(!total_uplift.significant);
        close(total_uplift.p_value, 0.733849, 1e-6);

        assert_eq!(report.steps.len(), 3);
        assert!(report.variants.is_empty());

        // pn1: 10 journeys (c1's second visit is the same journey); c2, c6, c8 converted
        // (c1's purchases went to the mail), revenue 80 + 60 + 40.
        let pn1 = &report.steps[0];
        assert_eq!(pn1.info.id, "pn1");
        assert_eq!(pn1.stats.entered, 10);
        assert_eq!(pn1.stats.sends, 8);
        assert_eq!(pn1.stats.delivered, 8);
        assert_eq!(pn1.stats.opens, 3);
        assert_eq!(pn1.stats.clicks, 2);
        close(pn1.stats.ctr, 0.25, 1e-12);
        assert_eq!(pn1.stats.skipped, 1);
        assert_eq!(pn1.stats.failed, 1);
        assert_eq!(pn1.stats.capped, 1);
        assert_eq!(pn1.stats.conversions, 3);
        close(pn1.stats.conversion_rate, 0.3, 1e-12);
        close(pn1.stats.revenue, 180.0, 1e-9);

        // A: c1–c5 (c5's skipped push still assigns it); c2 converted.
        // 1/5 vs 2/4: absolute −0.3, relative −0.6, se = sqrt(.2·.8/5 + .25/4)
        // = sqrt(.0945) = 0.307409, CI −0.3 ± 0.602510, p = 0.329114.
        assert_eq!(pn1.variants.len(), 2);
        let a = &pn1.variants[0];
        assert_eq!(
            (a.name.as_str(), a.template.as_str(), a.weight),
            ("A", "cart-a", 50)
        );
        assert_eq!(a.stats.entered, 5);
        assert_eq!(a.stats.sends, 4);
        assert_eq!(a.stats.opens, 2);
        assert_eq!(a.stats.clicks, 1);
        assert_eq!(a.stats.skipped, 1);
        assert_eq!(a.stats.capped, 1);
        assert_eq!(a.stats.failed, 0);
        assert_eq!(a.stats.conversions, 1);
        close(a.stats.conversion_rate, 0.2, 1e-12);
        close(a.stats.revenue, 80.0, 1e-9);
        let a_uplift = a.uplift.as_ref().expect("an uplift");
        close(a_uplift.absolute, -0.3, 1e-12);
        close(a_uplift.relative, -0.6, 1e-12);
        close(a_uplift.ci_low, -0.902510, 1e-6);
        close(a_uplift.ci_high, 0.302510, 1e-6);
        assert!(!a_uplift.significant);
        close(a_uplift.p_value, 0.329114, 1e-6);

        // B: c6–c10; c6 and c8 converted, revenue 100. 2/5 vs 2/4: absolute −0.1,
        // se = sqrt(.4·.6/5 + .25/4) = sqrt(.1105) = 0.332415, CI −0.1 ± 0.651522.
        let b = &pn1.variants[1];
        assert_eq!(b.name, "B");
        assert_eq!(b.stats.entered, 5);
        assert_eq!(b.stats.sends, 4);
        assert_eq!(b.stats.delivered, 4);
        assert_eq!(b.stats.opens, 1);
        assert_eq!(b.stats.clicks, 1);
        assert_eq!(b.stats.failed, 1);
        assert_eq!(b.stats.conversions, 2);
        close(b.stats.revenue, 100.0, 1e-9);
        let b_uplift = b.uplift.as_ref().expect("an uplift");
        close(b_uplift.ci_low, -0.751522, 1e-6);
        close(b_uplift.ci_high, 0.551522, 1e-6);
        close(b_uplift.p_value, 0.763545, 1e-6);

        // wait: c1–c8 (k1's control journey left out), no messages, no conversions.
        let wait = &report.steps[1];
        assert_eq!(wait.stats.entered, 8);
        assert_eq!(wait.stats.sends, 0);
        assert_eq!(wait.stats.conversions, 0);
        assert_eq!(wait.stats.conversion_rate, 0.0);
        assert_eq!(wait.stats.ctr, 0.0);
        assert!(wait.variants.is_empty());

        // mail: c1–c6; sends c1 c2 c3 c5 c6 (c4 skipped, its open flag ignored); c1
        // converted twice, counted once, revenue 150.
        let mail = &report.steps[2];
        assert_eq!(mail.stats.entered, 6);
        assert_eq!(mail.stats.sends, 5);
        assert_eq!(mail.stats.delivered, 4);
        assert_eq!(mail.stats.opens, 2);
        assert_eq!(mail.stats.clicks, 1);
        close(mail.stats.ctr, 0.2, 1e-12);
        assert_eq!(mail.stats.skipped, 1);
        assert_eq!(mail.stats.conversions, 1);
        close(mail.stats.conversion_rate, 1.0 / 6.0, 1e-12);
        close(mail.stats.revenue, 150.0, 1e-9);

        // Channels: push c2 c6 c8, e-mail c1 → 3/4 and 1/4.
        assert_eq!(report.channel_shares.len(), 2);
        let push = &report.channel_shares[0];
        assert_eq!(push.channel, ChannelName::Push);
        assert_eq!(push.conversions, 3);
        close(push.share, 0.75, 1e-12);
        close(push.revenue, 180.0, 1e-9);
        let email = &report.channel_shares[1];
        assert_eq!(email.channel, ChannelName::Email);
        assert_eq!(email.conversions, 1);
        close(email.share, 0.25, 1e-12);
        close(email.revenue, 150.0, 1e-9);
    }

    #[test]
    fn without_a_control_group_there_is_no_uplift() {
        let mut input = flow_input();
        input.has_control = false;
        let report = compute(&input);
        assert!(report.control.is_none());
        assert!(report.uplift.is_none());
        for step in &report.steps {
            for variant in &step.variants {
                assert!(variant.uplift.is_none());
            }
        }
        // The treated figures do not change.
        assert_eq!(report.total.conversions, 4);
        assert_eq!(report.total.entered, 10);
    }

    #[test]
    fn a_broadcast_report_has_variants_and_ties_between_channels_keep_channel_order() {
        use MessageStatus::{Sent, Skipped};
        let entries = vec![
            entry("b1", false, "A"),
            entry("b2", false, "A"),
            entry("b3", false, "B"),
            entry("b4", false, "B"),
            entry("q1", true, ""),
            entry("q2", true, ""),
        ];
        let messages = vec![
            message("b1", "", "A", ChannelName::Push, Sent, 0, "doc"),
            message("b2", "", "A", ChannelName::Push, Sent, 0, "d"),
            message("b3", "", "B", ChannelName::Sms, Sent, 0, "dc"),
            message("b4", "", "B", ChannelName::Sms, Skipped, 0, ""),
        ];
        // SMS conversions listed first: the tie is still broken by channel order.
        let conversions = vec![
            conversion("b3", 2, 20.0),
            conversion("b3", 3, 5.0),
            conversion("b1", 1, 10.0),
            conversion("q1", 4, 7.0),
        ];
        let input = ReportInput {
            entries,
            visits: Vec::new(),
            messages,
            conversions,
            window_secs: 72 * 3600,
            steps: Vec::new(),
            variants: vec![variant("A", "promo-a", 70), variant("B", "promo-b", 30)],
            has_control: true,
        };
        let report = compute(&input);

        assert!(report.steps.is_empty());
        assert_eq!(report.total.entered, 4);
        assert_eq!(report.total.sends, 3);
        assert_eq!(report.total.conversions, 2);
        close(report.total.revenue, 35.0, 1e-9);

        assert_eq!(report.variants.len(), 2);
        let a = &report.variants[0];
        assert_eq!(
            (a.name.as_str(), a.template.as_str(), a.weight),
            ("A", "promo-a", 70)
        );
        assert_eq!(a.stats.entered, 2);
        assert_eq!(a.stats.sends, 2);
        assert_eq!(a.stats.clicks, 1);
        close(a.stats.ctr, 0.5, 1e-12);
        assert_eq!(a.stats.conversions, 1);
        close(a.stats.revenue, 10.0, 1e-9);
        let b = &report.variants[1];
        assert_eq!(b.stats.entered, 2);
        assert_eq!(b.stats.sends, 1);
        assert_eq!(b.stats.skipped, 1);
        assert_eq!(b.stats.conversions, 1);
        close(b.stats.conversion_rate, 0.5, 1e-12);
        close(b.stats.revenue, 25.0, 1e-9);

        // 1/2 vs 1/2: no difference; se = sqrt(.25/2 + .25/2) = 0.5, CI ±0.979982, p 1.
        let control = report.control.as_ref().expect("a control group");
        assert_eq!((control.entered, control.conversions), (2, 1));
        let a_uplift = a.uplift.as_ref().expect("an uplift");
        close(a_uplift.absolute, 0.0, 1e-12);
        close(a_uplift.ci_low, -0.979982, 1e-6);
        close(a_uplift.ci_high, 0.979982, 1e-6);
        assert!(!a_uplift.significant);
        close(a_uplift.p_value, 1.0, 1e-6);

        let channels: Vec<(ChannelName, u64)> = report
            .channel_shares
            .iter()
            .map(|c| (c.channel, c.conversions))
            .collect();
        assert_eq!(
            channels,
            vec![(ChannelName::Push, 1), (ChannelName::Sms, 1)]
        );
        close(report.channel_shares[0].share, 0.5, 1e-12);
        close(report.channel_shares[1].revenue, 25.0, 1e-9);
    }

    #[test]
    fn a_window_too_long_to_represent_has_no_limit() {
        let input = ReportInput {
            entries: vec![entry("c1", false, "")],
            messages: vec![message(
                "c1",
                "",
                "",
                ChannelName::Email,
                MessageStatus::Sent,
                0,
                "",
            )],
            conversions: vec![conversion("c1", 24 * 365 * 10, 12.0)],
            window_secs: i64::MAX,
            ..ReportInput::default()
        };
        let report = compute(&input);
        assert_eq!(report.total.conversions, 1);
        close(report.total.revenue, 12.0, 1e-9);
    }

    #[test]
    fn an_empty_input_gives_zeros() {
        let report = compute(&ReportInput::default());
        assert_eq!(report, Report::default());
    }

    #[test]
    fn uplift_of_three_percent_over_two_is_not_significant_at_a_thousand_each() {
        // p1 = .03, p0 = .02: absolute .01, relative .5,
        // se = sqrt(.03·.97/1000 + .02·.98/1000) = sqrt(4.87e-5) = 0.00697854,
        // CI .01 ± 1.959964·0.00697854 = .01 ± 0.01367768 → [−0.003678, 0.023678],
        // z = 1.432964, p = 2·(1 − Φ(z)) = 0.151868.
        let u = uplift((30, 1000), (20, 1000));
        close(u.absolute, 0.01, 1e-12);
        close(u.relative, 0.5, 1e-12);
        close(u.ci_low, -0.003678, 1e-6);
        close(u.ci_high, 0.023678, 1e-6);
        assert!(!u.significant);
        close(u.p_value, 0.151868, 1e-6);
    }

    #[test]
    fn uplift_of_six_percent_over_three_is_significant_at_a_thousand_each() {
        // absolute .03, relative 1, se = sqrt(.06·.94/1000 + .03·.97/1000) = 0.00924662,
        // CI .03 ± 0.01812304 → [0.011877, 0.048123], z = 3.244420, p = 0.001177.
        let u = uplift((60, 1000), (30, 1000));
        close(u.absolute, 0.03, 1e-12);
        close(u.relative, 1.0, 1e-12);
        close(u.ci_low, 0.011877, 1e-6);
        close(u.ci_high, 0.048123, 1e-6);
        assert!(u.significant);
        close(u.p_value, 0.001177, 1e-6);
    }

    #[test]
    fn uplift_of_an_empty_group_is_zero_with_p_value_one() {
        let expected = Uplift {
            p_value: 1.0,
            ..Uplift::default()
        };
        assert_eq!(uplift((0, 0), (5, 10)), expected);
        assert_eq!(uplift((5, 10), (0, 0)), expected);
    }

    #[test]
    fn uplift_without_variance_is_the_difference_itself() {
        // 3/3 vs 0/5: both rates certain; relative 0 because the control rate is 0.
        let u = uplift((3, 3), (0, 5));
        assert_eq!(
            u,
            Uplift {
                absolute: 1.0,
                relative: 0.0,
                ci_low: 1.0,
                ci_high: 1.0,
                significant: true,
                p_value: 0.0,
            }
        );
        let none = uplift((0, 10), (0, 10));
        assert!(!none.significant);
        assert_eq!(none.p_value, 1.0);
        assert_eq!((none.ci_low, none.ci_high), (0.0, 0.0));
    }

    #[test]
    fn the_normal_cdf_matches_its_table() {
        close(normal_cdf(1.96), 0.975002, 1e-6);
        close(normal_cdf(0.0), 0.5, 1e-7);
        close(normal_cdf(1.0), 0.841345, 1e-6);
        close(normal_cdf(-1.0), 0.158655, 1e-6);
        // The tail keeps its relative accuracy: Φ(−3) = 0.001349898, Φ(−6) = 9.8659e-10.
        close(normal_cdf(-3.0), 0.001_349_898, 1e-9);
        close(normal_cdf(-6.0) / 9.8659e-10, 1.0, 1e-4);
    }
}
