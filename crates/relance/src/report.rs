//! How `relance report` prints a campaign's report: aligned plain-text tables for the CRM
//! team (per step: sends, clicks, CTR, conversions, conversion rate, revenue; each variant's
//! uplift over the control group; each channel's share), CSV for spreadsheets, JSON for
//! scripts.
// The subcommand is wired once the campaigns client exists; until then only tests call in.

use chrono::SecondsFormat;
use prost_types::{Duration, Timestamp};
use relance_proto::convert::{struct_to_json, timestamp_to_chrono};
use relance_proto::v1 as pb;
use serde_json::{Value, json};

/// The minus sign of the tables (U+2212, as typeset figures have it).
const MINUS: char = '\u{2212}';

/// The columns of the CSV, in order.
const CSV_HEADER: [&str; 26] = [
    "record",
    "step_id",
    "variant",
    "kind",
    "summary",
    "channels",
    "template",
    "weight",
    "entered",
    "sends",
    "delivered",
    "opens",
    "clicks",
    "ctr",
    "conversions",
    "conversion_rate",
    "revenue",
    "skipped",
    "failed",
    "capped",
    "uplift_absolute",
    "uplift_relative",
    "uplift_ci_low",
    "uplift_ci_high",
    "uplift_significant",
    "uplift_p_value",
];

/// The report as aligned plain-text tables: a header (campaign, version, range, conversion
/// goal and window), the steps (a flow) or variants (a broadcast) with the treated total
/// and the control group, the uplift over control, and the conversions by channel.
pub fn render_table(report: &pb::CampaignReport) -> String {
    let mut out = String::new();
    render_header(report, &mut out);
    out.push('\n');

    let broadcast = report.kind == pb::CampaignKind::Broadcast as i32;
    if broadcast {
        render_variants_table(report, &mut out);
    } else {
        render_steps_table(report, &mut out);
    }
    out.push('\n');

    out.push_str("Uplift over control: ");
    out.push_str(&uplift_summary(report));
    out.push_str("\n\n");

    render_channels_table(report, &mut out);
    out
}

/// The report as CSV: a header row, then one row per step, per variant (a step's, or the
/// broadcast's), the control group and the treated total. Fields are quoted as RFC 4180
/// says (when they hold a comma, a quote or a line break; quotes doubled); rows end with
/// `\n`. Rates are fractions, as in the API.
pub fn render_csv(report: &pb::CampaignReport) -> String {
    let mut out = String::new();
    let header: Vec<String> = CSV_HEADER.iter().map(|h| h.to_string()).collect();
    csv_line(&mut out, &header);

    for step in &report.steps {
        let label = CsvLabel {
            record: "step",
            step_id: &step.step_id,
            kind: step_kind_name(step.kind),
            summary: &step.summary,
            channels: channel_list(&step.channels, ";"),
            ..CsvLabel::default()
        };
        csv_line(&mut out, &csv_row(&label, step.stats.as_ref(), None));
        for variant in &step.variants {
            let label = CsvLabel {
                record: "variant",
                step_id: &step.step_id,
                variant: &variant.name,
                template: &variant.template,
                weight: Some(variant.weight),
                ..CsvLabel::default()
            };
            let row = csv_row(&label, variant.stats.as_ref(), variant.uplift.as_ref());
            csv_line(&mut out, &row);
        }
    }
    for variant in &report.variants {
        let label = CsvLabel {
            record: "variant",
            variant: &variant.name,
            template: &variant.template,
            weight: Some(variant.weight),
            ..CsvLabel::default()
        };
        let row = csv_row(&label, variant.stats.as_ref(), variant.uplift.as_ref());
        csv_line(&mut out, &row);
    }
    if let Some(control) = &report.control {
        let label = CsvLabel {
            record: "control",
            ..CsvLabel::default()
        };
        csv_line(&mut out, &csv_row(&label, Some(control), None));
    }
    let label = CsvLabel {
        record: "total",
        ..CsvLabel::default()
    };
    let row = csv_row(&label, report.total.as_ref(), report.uplift.as_ref());
    csv_line(&mut out, &row);
    out
}

/// The report as pretty JSON with snake_case fields: enums by name (`flow`, `send`,
/// `push`), timestamps in RFC 3339, the window in seconds, rates as fractions; absent
/// parts (control group, uplift) are `null`.
pub fn render_json(report: &pb::CampaignReport) -> String {
    let range = report.range.unwrap_or_default();
    let mut steps = Vec::with_capacity(report.steps.len());
    for step in &report.steps {
        let mut variants = Vec::with_capacity(step.variants.len());
        for variant in &step.variants {
            variants.push(variant_json(variant));
        }
        steps.push(json!({
            "step_id": step.step_id,
            "kind": step_kind_name(step.kind),
            "summary": step.summary,
            "channels": channel_names(&step.channels),
            "stats": stats_json(&step.stats.unwrap_or_default()),
            "variants": variants,
        }));
    }
    let mut variants = Vec::with_capacity(report.variants.len());
    for variant in &report.variants {
        variants.push(variant_json(variant));
    }
    let mut shares = Vec::with_capacity(report.channel_shares.len());
    for share in &report.channel_shares {
        shares.push(json!({
            "channel": channel_name(share.channel),
            "conversions": share.conversions,
            "share": share.share,
            "revenue": share.revenue,
        }));
    }
    let value = json!({
        "kind": campaign_kind_name(report.kind),
        "name": report.name,
        "version": report.version,
        "range": {
            "from": range.from.as_ref().and_then(rfc3339),
            "to": range.to.as_ref().and_then(rfc3339),
        },
        "generated_at": report.generated_at.as_ref().and_then(rfc3339),
        "conversion": report.conversion.as_ref().map(conversion_json),
        "currency": report.currency,
        "total": stats_json(&report.total.unwrap_or_default()),
        "control": report.control.as_ref().map(stats_json),
        "uplift": report.uplift.as_ref().map(uplift_json),
        "steps": steps,
        "variants": variants,
        "channel_shares": shares,
    });
    // Printing a `Value` cannot fail; the compact form is only a formality.
    serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
}

/// The lines above the tables: what campaign, which version, over what range, and what
/// counted as a conversion.
fn render_header(report: &pb::CampaignReport, out: &mut String) {
    let broadcast = report.kind == pb::CampaignKind::Broadcast as i32;
    if broadcast {
        out.push_str(&format!("Broadcast report: {}\n", report.name));
    } else {
        let version = if report.version == 0 {
            "every version".to_string()
        } else {
            format!("version {}", report.version)
        };
        out.push_str(&format!("Flow report: {} ({version})\n", report.name));
    }

    let range = report.range.unwrap_or_default();
    let from = range
        .from
        .as_ref()
        .and_then(rfc3339)
        .unwrap_or_else(|| "the start".to_string());
    let to = range
        .to
        .as_ref()
        .and_then(rfc3339)
        .unwrap_or_else(|| "now".to_string());
    out.push_str(&format!("  Range:       {from} to {to}\n"));

    let conversion = match &report.conversion {
        Some(goal) => {
            let mut text = format!(
                "{} within {}",
                goal.event,
                window_text(goal.within.as_ref())
            );
            if let Some(conditions) = &goal.conditions {
                text.push_str(&format!(" where {}", struct_to_json(conditions)));
            }
            text
        }
        None => "not set".to_string(),
    };
    out.push_str(&format!("  Conversion:  {conversion}\n"));
    if !report.currency.is_empty() {
        out.push_str(&format!("  Currency:    {}\n", report.currency));
    }
    if let Some(generated) = report.generated_at.as_ref().and_then(rfc3339) {
        out.push_str(&format!("  Generated:   {generated}\n"));
    }
}

/// A flow's steps, each followed by its variants (indented), then the treated total and
/// the control group.
fn render_steps_table(report: &pb::CampaignReport, out: &mut String) {
    let has_control = report.control.is_some();
    let mut table = Table::new(&[
        ("step", Align::Left),
        ("summary", Align::Left),
        ("channel", Align::Left),
    ]);
    table.add_stats_columns(&report.currency, has_control);

    for step in &report.steps {
        let summary = if step.summary.is_empty() {
            step_kind_name(step.kind).to_string()
        } else {
            step.summary.clone()
        };
        let mut cells = vec![
            step.step_id.clone(),
            summary,
            channel_list(&step.channels, ", "),
        ];
        cells.extend(stats_cells(&step.stats.unwrap_or_default()));
        table.row(cells);
        for variant in &step.variants {
            let mut cells = vec![
                format!("  {}", variant.name),
                format!("{}, weight {}", variant.template, variant.weight),
                String::new(),
            ];
            cells.extend(stats_cells(&variant.stats.unwrap_or_default()));
            if has_control {
                cells.push(variant.uplift.as_ref().map(uplift_cell).unwrap_or_default());
            }
            table.row(cells);
        }
    }
    table.rule();
    add_group_rows(report, &mut table, 3);

    out.push_str("Steps\n");
    table.render(out);
}

/// A broadcast's variants (or, without variants, its results), then the treated total and
/// the control group.
fn render_variants_table(report: &pb::CampaignReport, out: &mut String) {
    let has_control = report.control.is_some();
    let mut table = Table::new(&[
        ("variant", Align::Left),
        ("template", Align::Left),
        ("weight", Align::Right),
    ]);
    table.add_stats_columns(&report.currency, has_control);

    for variant in &report.variants {
        let mut cells = vec![
            variant.name.clone(),
            variant.template.clone(),
            variant.weight.to_string(),
        ];
        cells.extend(stats_cells(&variant.stats.unwrap_or_default()));
        if has_control {
            cells.push(variant.uplift.as_ref().map(uplift_cell).unwrap_or_default());
        }
        table.row(cells);
    }
    if !report.variants.is_empty() {
        table.rule();
    }
    add_group_rows(report, &mut table, 3);

    out.push_str(if report.variants.is_empty() {
        "Results\n"
    } else {
        "Variants\n"
    });
    table.render(out);
}

/// The treated total (with its uplift) and the control group's rows; `lead` is the number
/// of label columns before the figures.
fn add_group_rows(report: &pb::CampaignReport, table: &mut Table, lead: usize) {
    let has_control = report.control.is_some();
    let mut total = vec!["total".to_string(), "treated".to_string()];
    total.resize(lead, String::new());
    total.extend(stats_cells(&report.total.unwrap_or_default()));
    if has_control {
        total.push(report.uplift.as_ref().map(uplift_cell).unwrap_or_default());
    }
    table.row(total);
    if let Some(control) = &report.control {
        let mut cells = vec!["control".to_string(), "held out".to_string()];
        cells.resize(lead, String::new());
        cells.extend(stats_cells(control));
        table.row(cells);
    }
}

/// Each channel's share of the attributed conversions.
fn render_channels_table(report: &pb::CampaignReport, out: &mut String) {
    out.push_str("Conversions by channel\n");
    if report.channel_shares.is_empty() {
        out.push_str("  no attributed conversions\n");
        return;
    }
    let mut table = Table::new(&[
        ("channel", Align::Left),
        ("conversions", Align::Right),
        ("share", Align::Right),
        (&revenue_header(&report.currency), Align::Right),
    ]);
    for share in &report.channel_shares {
        table.row(vec![
            channel_name(share.channel).to_string(),
            count(share.conversions),
            percent(share.share),
            money(share.revenue),
        ]);
    }
    table.render(out);
}

/// The treated group's uplift in one line, e.g. `+1.20 pts [−0.36, +2.76] not significant
/// (relative +60.0 %, p = 0.151)`.
fn uplift_summary(report: &pb::CampaignReport) -> String {
    let Some(control) = &report.control else {
        return "no control group".to_string();
    };
    let Some(uplift) = &report.uplift else {
        return "not computed".to_string();
    };
    let mut details = Vec::new();
    if control.conversion_rate > 0.0 {
        details.push(format!("relative {}%", signed(uplift.relative * 100.0, 1)));
    }
    if uplift.p_value < 0.001 {
        details.push("p < 0.001".to_string());
    } else {
        details.push(format!("p = {:.3}", uplift.p_value));
    }
    format!("{} ({})", uplift_cell(uplift), details.join(", "))
}

/// How a table cell is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A plain-text table: columns sized to their widest cell, separated by two spaces, every
/// line padded to the same width (rules included), so that it reads as a block.
struct Table {
    columns: Vec<(String, Align)>,
    /// `None` is a rule (a line of dashes).
    rows: Vec<Option<Vec<String>>>,
}

impl Table {
    fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            columns: columns
                .iter()
                .map(|(name, align)| (name.to_string(), *align))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// The figures' columns, matching [`stats_cells`], and the uplift's when there is a
    /// control group.
    fn add_stats_columns(&mut self, currency: &str, has_control: bool) {
        for name in [
            "entered",
            "sends",
            "delivered",
            "opens",
            "clicks",
            "CTR %",
            "conversions",
            "conv. rate %",
        ] {
            self.columns.push((name.to_string(), Align::Right));
        }
        self.columns.push((revenue_header(currency), Align::Right));
        if has_control {
            self.columns
                .push(("uplift over control".to_string(), Align::Left));
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Some(cells));
    }

    fn rule(&mut self) {
        self.rows.push(None);
    }

    fn render(&self, out: &mut String) {
        let mut widths: Vec<usize> = self.columns.iter().map(|(name, _)| width(name)).collect();
        for cells in self.rows.iter().flatten() {
            for (i, cell) in cells.iter().enumerate() {
                if i < widths.len() && width(cell) > widths[i] {
                    widths[i] = width(cell);
                }
            }
        }
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        let rule = "-".repeat(total);

        let header: Vec<String> = self.columns.iter().map(|(name, _)| name.clone()).collect();
        self.line(&header, &widths, out);
        out.push_str(&rule);
        out.push('\n');
        for row in &self.rows {
            match row {
                Some(cells) => self.line(cells, &widths, out),
                None => {
                    out.push_str(&rule);
                    out.push('\n');
                }
            }
        }
    }

    fn line(&self, cells: &[String], widths: &[usize], out: &mut String) {
        for (i, (_, align)) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let cell = cells.get(i).map_or("", String::as_str);
            let fill = " ".repeat(widths[i].saturating_sub(width(cell)));
            match align {
                Align::Left => {
                    out.push_str(cell);
                    out.push_str(&fill);
                }
                Align::Right => {
                    out.push_str(&fill);
                    out.push_str(cell);
                }
            }
        }
        out.push('\n');
    }
}

/// The width of a cell in characters (the minus sign is one character, three bytes).
fn width(text: &str) -> usize {
    text.chars().count()
}

/// The figures' cells, in the order of [`Table::add_stats_columns`].
fn stats_cells(stats: &pb::ReportStats) -> Vec<String> {
    vec![
        count(stats.entered),
        count(stats.sends),
        count(stats.delivered),
        count(stats.opens),
        count(stats.clicks),
        percent(stats.ctr),
        count(stats.conversions),
        percent(stats.conversion_rate),
        money(stats.revenue),
    ]
}

/// `+1.20 pts [−0.36, +2.76] not significant`: the difference in conversion rate and its
/// 95 % interval, in percentage points.
fn uplift_cell(uplift: &pb::Uplift) -> String {
    let verdict = if uplift.significant {
        "significant"
    } else {
        "not significant"
    };
    format!(
        "{} pts [{}, {}] {verdict}",
        signed(uplift.absolute * 100.0, 2),
        signed(uplift.ci_low * 100.0, 2),
        signed(uplift.ci_high * 100.0, 2),
    )
}

/// The revenue column's header, with the currency when known.
fn revenue_header(currency: &str) -> String {
    if currency.is_empty() {
        return "revenue".to_string();
    }
    format!("revenue ({currency})")
}

/// A count with thousands separators: `2,400`.
fn count(value: u64) -> String {
    group_thousands(&value.to_string())
}

/// A fraction as a percentage with two decimals (`0.0759` → `7.59%`); a share too small
/// to show is `<0.01%` rather than a misleading `0.00%`.
fn percent(fraction: f64) -> String {
    if !fraction.is_finite() {
        return "n/a".to_string();
    }
    let pct = fraction * 100.0;
    if pct > 0.0 && pct < 0.005 {
        return "<0.01%".to_string();
    }
    format!("{pct:.2}%")
}

/// An amount with thousands separators and two decimals: `1,234.50`.
fn money(amount: f64) -> String {
    if !amount.is_finite() {
        return "n/a".to_string();
    }
    let text = format!("{:.2}", amount.abs());
    let (whole, cents) = text.split_once('.').unwrap_or((text.as_str(), "00"));
    let grouped = format!("{}.{cents}", group_thousands(whole));
    if amount < 0.0 && !is_zero_text(&text) {
        return format!("{MINUS}{grouped}");
    }
    grouped
}

/// A signed number with `decimals` decimals, `+` or `−` always shown; what rounds to zero
/// is `+0.00`.
fn signed(value: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, value.abs());
    if value < 0.0 && !is_zero_text(&text) {
        return format!("{MINUS}{text}");
    }
    format!("+{text}")
}

/// True when a formatted number is all zeros (`0.00`).
fn is_zero_text(text: &str) -> bool {
    text.chars().all(|c| c == '0' || c == '.')
}

/// Inserts a comma every three digits from the right.
fn group_thousands(digits: &str) -> String {
    let chars: Vec<char> = digits.chars().collect();
    let first = match chars.len() % 3 {
        0 => chars.len().min(3),
        rest => rest,
    };
    let mut out: String = chars[..first].iter().collect();
    for group in chars[first..].chunks(3) {
        out.push(',');
        out.extend(group);
    }
    out
}

/// The attribution window as written in documents: `72h`, `90m`, `1h30m`, `45s`; unset
/// means the default, 72 h.
fn window_text(window: Option<&Duration>) -> String {
    let Some(window) = window else {
        return "72h".to_string();
    };
    let secs = window.seconds;
    if window.nanos != 0 {
        return format!("{:.3}s", secs as f64 + f64::from(window.nanos) / 1e9);
    }
    if secs != 0 && secs % 3600 == 0 {
        return format!("{}h", secs / 3600);
    }
    if secs != 0 && secs % 60 == 0 {
        let (hours, minutes) = (secs / 3600, secs % 3600 / 60);
        if hours == 0 {
            return format!("{minutes}m");
        }
        return format!("{hours}h{minutes}m");
    }
    format!("{secs}s")
}

/// A timestamp in RFC 3339 (`2025-05-01T00:00:00Z`); `None` when out of range.
fn rfc3339(ts: &Timestamp) -> Option<String> {
    let time = timestamp_to_chrono(ts)?;
    Some(time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// The channel's name as in documents.
fn channel_name(channel: i32) -> &'static str {
    match pb::Channel::try_from(channel) {
        Ok(pb::Channel::Push) => "push",
        Ok(pb::Channel::Email) => "email",
        Ok(pb::Channel::Sms) => "sms",
        Ok(pb::Channel::Whatsapp) => "whatsapp",
        Ok(pb::Channel::InApp) => "in_app",
        Ok(pb::Channel::Webhook) => "webhook",
        Ok(pb::Channel::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// The channels' names.
fn channel_names(channels: &[i32]) -> Vec<&'static str> {
    channels.iter().map(|c| channel_name(*c)).collect()
}

/// The channels' names joined by `separator`.
fn channel_list(channels: &[i32], separator: &str) -> String {
    channel_names(channels).join(separator)
}

/// A step kind's name as in documents.
fn step_kind_name(kind: i32) -> &'static str {
    match pb::FlowStepKind::try_from(kind) {
        Ok(pb::FlowStepKind::Wait) => "wait",
        Ok(pb::FlowStepKind::Send) => "send",
        Ok(pb::FlowStepKind::Branch) => "branch",
        Ok(pb::FlowStepKind::Update) => "update",
        Ok(pb::FlowStepKind::Exit) => "exit",
        Ok(pb::FlowStepKind::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// `flow` or `broadcast`.
fn campaign_kind_name(kind: i32) -> &'static str {
    match pb::CampaignKind::try_from(kind) {
        Ok(pb::CampaignKind::Flow) => "flow",
        Ok(pb::CampaignKind::Broadcast) => "broadcast",
        Ok(pb::CampaignKind::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// What a CSV row is about (the columns before the figures).
#[derive(Default)]
struct CsvLabel<'a> {
    record: &'a str,
    step_id: &'a str,
    variant: &'a str,
    kind: &'a str,
    summary: &'a str,
    channels: String,
    template: &'a str,
    weight: Option<u32>,
}

/// One CSV row: the label, the figures (zeros when absent), the uplift (empty when absent).
fn csv_row(
    label: &CsvLabel<'_>,
    stats: Option<&pb::ReportStats>,
    uplift: Option<&pb::Uplift>,
) -> Vec<String> {
    let stats = stats.copied().unwrap_or_default();
    let mut row = vec![
        label.record.to_string(),
        label.step_id.to_string(),
        label.variant.to_string(),
        label.kind.to_string(),
        label.summary.to_string(),
        label.channels.clone(),
        label.template.to_string(),
        label.weight.map(|w| w.to_string()).unwrap_or_default(),
        stats.entered.to_string(),
        stats.sends.to_string(),
        stats.delivered.to_string(),
        stats.opens.to_string(),
        stats.clicks.to_string(),
        stats.ctr.to_string(),
        stats.conversions.to_string(),
        stats.conversion_rate.to_string(),
        stats.revenue.to_string(),
        stats.skipped.to_string(),
        stats.failed.to_string(),
        stats.capped.to_string(),
    ];
    match uplift {
        Some(u) => row.extend([
            u.absolute.to_string(),
            u.relative.to_string(),
            u.ci_low.to_string(),
            u.ci_high.to_string(),
            u.significant.to_string(),
            u.p_value.to_string(),
        ]),
        None => row.resize(CSV_HEADER.len(), String::new()),
    }
    row
}

/// Appends one CSV line, quoting fields as RFC 4180 says.
fn csv_line(out: &mut String, fields: &[String]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if field.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push('\n');
}

fn stats_json(stats: &pb::ReportStats) -> Value {
    json!({
        "entered": stats.entered,
        "sends": stats.sends,
        "delivered": stats.delivered,
        "opens": stats.opens,
        "clicks": stats.clicks,
        "ctr": stats.ctr,
        "conversions": stats.conversions,
        "conversion_rate": stats.conversion_rate,
        "revenue": stats.revenue,
        "skipped": stats.skipped,
        "failed": stats.failed,
        "capped": stats.capped,
    })
}

fn uplift_json(uplift: &pb::Uplift) -> Value {
    json!({
        "absolute": uplift.absolute,
        "relative": uplift.relative,
        "ci_low": uplift.ci_low,
        "ci_high": uplift.ci_high,
        "significant": uplift.significant,
        "p_value": uplift.p_value,
    })
}

fn variant_json(variant: &pb::VariantReport) -> Value {
    json!({
        "name": variant.name,
        "template": variant.template,
        "weight": variant.weight,
        "stats": stats_json(&variant.stats.unwrap_or_default()),
        "uplift": variant.uplift.as_ref().map(uplift_json),
    })
}

/// The goal, its conditions as JSON and its window in seconds (a whole number unless the
/// window has a fraction of a second).
fn conversion_json(goal: &pb::ConversionGoal) -> Value {
    let within = goal.within.as_ref().map(|d| {
        if d.nanos == 0 {
            json!(d.seconds)
        } else {
            json!(d.seconds as f64 + f64::from(d.nanos) / 1e9)
        }
    });
    json!({
        "event": goal.event,
        "conditions": goal.conditions.as_ref().map(struct_to_json),
        "within_seconds": within,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value as PbValue, value::Kind};

    fn ts(text: &str) -> Timestamp {
        let time = chrono::DateTime::parse_from_rfc3339(text).expect("an RFC 3339 time");
        relance_proto::convert::chrono_to_timestamp(time.to_utc())
    }

    #[allow(clippy::too_many_arguments)]
    fn stats(
        entered: u64,
        sends: u64,
        clicks: u64,
        ctr: f64,
        conversions: u64,
        rate: f64,
        revenue: f64,
    ) -> pb::ReportStats {
        pb::ReportStats {
            entered,
            sends,
            delivered: sends.saturating_sub(10),
            opens: clicks * 2,
            clicks,
            ctr,
            conversions,
            conversion_rate: rate,
            revenue,
            skipped: 3,
            failed: 1,
            capped: 2,
        }
    }

    fn uplift(absolute: f64, ci_low: f64, ci_high: f64, p_value: f64) -> pb::Uplift {
        pb::Uplift {
            absolute,
            relative: absolute / 0.0453,
            ci_low,
            ci_high,
            significant: ci_low > 0.0 || ci_high < 0.0,
            p_value,
        }
    }

    fn send_step(id: &str, summary: &str, stats: pb::ReportStats) -> pb::StepReport {
        pb::StepReport {
            step_id: id.to_string(),
            kind: pb::FlowStepKind::Send as i32,
            summary: summary.to_string(),
            channels: vec![pb::Channel::Push as i32],
            stats: Some(stats),
            variants: Vec::new(),
        }
    }

    fn variant(
        name: &str,
        template: &str,
        stats: pb::ReportStats,
        uplift: Option<pb::Uplift>,
    ) -> pb::VariantReport {
        pb::VariantReport {
            name: name.to_string(),
            template: template.to_string(),
            weight: 50,
            stats: Some(stats),
            uplift,
        }
    }

    fn share(channel: pb::Channel, conversions: u64, share: f64, revenue: f64) -> pb::ChannelShare {
        pb::ChannelShare {
            channel: channel as i32,
            conversions,
            share,
            revenue,
        }
    }

    /// The onboarding flow's abandoned-cart pushes of the Jumia study (1–20 May 2025), with
    /// an A/B test on the first push and a control group.
    fn flow_report() -> pb::CampaignReport {
        let mut pn1 = send_step(
            "pn1",
            "send push cart-1",
            stats(2384, 2400, 181, 0.0759, 98, 0.0411, 1_234_567.5),
        );
        pn1.variants = vec![
            variant(
                "A",
                "cart-1a",
                stats(1192, 1200, 95, 0.0792, 55, 0.0461, 700_000.0),
                Some(uplift(0.012, -0.0036, 0.0276, 0.131)),
            ),
            variant(
                "B",
                "cart-1b",
                stats(1192, 1200, 86, 0.0717, 43, 0.0361, 534_567.5),
                Some(uplift(-0.0092, -0.0240, 0.0056, 0.223)),
            ),
        ];
        let wait = pb::StepReport {
            step_id: "wait-1".to_string(),
            kind: pb::FlowStepKind::Wait as i32,
            summary: String::new(),
            stats: Some(pb::ReportStats {
                entered: 2384,
                ..pb::ReportStats::default()
            }),
            ..pb::StepReport::default()
        };
        let branch = pb::StepReport {
            step_id: "steps[2]".to_string(),
            kind: pb::FlowStepKind::Branch as i32,
            summary: "branch: \"cart_updated\", within 24h".to_string(),
            stats: Some(pb::ReportStats {
                entered: 2300,
                ..pb::ReportStats::default()
            }),
            ..pb::StepReport::default()
        };
        let pn2 = send_step(
            "pn2",
            "send push cart-2",
            stats(1888, 1900, 182, 0.0678, 54, 0.0286, 410_000.0),
        );
        let pn3 = send_step(
            "pn3",
            "send push cart-3",
            stats(682, 684, 22, 0.0322, 6, 0.0088, 52_000.25),
        );

        let mut conditions = Struct::default();
        let mut gte = Struct::default();
        gte.fields.insert(
            "gte".to_string(),
            PbValue {
                kind: Some(Kind::NumberValue(20.0)),
            },
        );
        conditions.fields.insert(
            "revenue".to_string(),
            PbValue {
                kind: Some(Kind::StructValue(gte)),
            },
        );

        pb::CampaignReport {
            kind: pb::CampaignKind::Flow as i32,
            name: "abandoned-cart".to_string(),
            version: 2,
            range: Some(pb::TimeRange {
                from: Some(ts("2025-05-01T00:00:00Z")),
                to: Some(ts("2025-05-21T00:00:00Z")),
            }),
            generated_at: Some(ts("2025-05-21T08:30:00Z")),
            conversion: Some(pb::ConversionGoal {
                event: "order_completed".to_string(),
                conditions: Some(conditions),
                within: Some(Duration {
                    seconds: 72 * 3600,
                    nanos: 0,
                }),
            }),
            currency: "DZD".to_string(),
            total: Some(stats(2384, 4984, 385, 0.0772, 158, 0.0663, 1_696_567.75)),
            control: Some(pb::ReportStats {
                entered: 265,
                conversions: 12,
                conversion_rate: 0.0453,
                revenue: 98_000.0,
                ..pb::ReportStats::default()
            }),
            uplift: Some(uplift(0.021, -0.0069, 0.0489, 0.137)),
            steps: vec![pn1, wait, branch, pn2, pn3],
            variants: Vec::new(),
            channel_shares: vec![
                share(pb::Channel::Push, 152, 0.9638, 1_600_000.0),
                share(pb::Channel::Email, 5, 0.0288, 80_000.0),
                share(pb::Channel::Whatsapp, 1, 0.0073, 16_000.0),
                share(pb::Channel::InApp, 0, 0.000_01, 567.75),
            ],
        }
    }

    /// A broadcast with two variants and no control group.
    fn broadcast_report() -> pb::CampaignReport {
        pb::CampaignReport {
            kind: pb::CampaignKind::Broadcast as i32,
            name: "ramadan-2025-day1".to_string(),
            range: Some(pb::TimeRange {
                from: Some(ts("2025-03-01T00:00:00Z")),
                to: None,
            }),
            conversion: Some(pb::ConversionGoal {
                event: "order_completed".to_string(),
                conditions: None,
                within: Some(Duration {
                    seconds: 5400,
                    nanos: 0,
                }),
            }),
            total: Some(stats(20_000, 19_500, 900, 0.0462, 400, 0.02, 0.0)),
            variants: vec![
                variant(
                    "short-copy",
                    "ramadan-a",
                    stats(10_000, 9_800, 500, 0.0510, 230, 0.023, 0.0),
                    None,
                ),
                variant(
                    "long-copy",
                    "ramadan-b",
                    stats(10_000, 9_700, 400, 0.0412, 170, 0.017, 0.0),
                    None,
                ),
            ],
            ..pb::CampaignReport::default()
        }
    }

    /// The lines of each table, by title (the title line itself left out).
    fn tables(text: &str) -> Vec<(String, Vec<String>)> {
        let titles = ["Steps", "Variants", "Results", "Conversions by channel"];
        let mut found = Vec::new();
        for block in text.split("\n\n") {
            let mut lines = block.lines();
            let Some(title) = lines.next() else {
                continue;
            };
            if titles.contains(&title) {
                found.push((title.to_string(), lines.map(str::to_string).collect()));
            }
        }
        found
    }

    fn assert_aligned(title: &str, lines: &[String]) {
        assert!(lines.len() >= 3, "{title}: {lines:?}");
        let first = width(&lines[0]);
        for line in lines {
            assert_eq!(width(line), first, "{title}: {line:?}");
        }
    }

    /// Reads CSV as RFC 4180 writes it (quoted fields, doubled quotes, line breaks inside
    /// quotes).
    fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if quoted {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        field.push('"');
                        chars.next();
                    } else {
                        quoted = false;
                    }
                } else {
                    field.push(c);
                }
                continue;
            }
            match c {
                '"' => quoted = true,
                ',' => row.push(std::mem::take(&mut field)),
                '\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                _ => field.push(c),
            }
        }
        assert!(
            !quoted && field.is_empty() && row.is_empty(),
            "the CSV ends with a line break"
        );
        rows
    }

    #[test]
    fn a_flow_report_renders_as_aligned_tables_with_the_study_figures() {
        let text = render_table(&flow_report());

        assert!(
            text.starts_with("Flow report: abandoned-cart (version 2)\n"),
            "{text}"
        );
        assert!(
            text.contains("2025-05-01T00:00:00Z to 2025-05-21T00:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains(r#"order_completed within 72h where {"revenue":{"gte":20}}"#),
            "{text}"
        );
        assert!(text.contains("Currency:    DZD"), "{text}");

        let found = tables(&text);
        let titles: Vec<&str> = found.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(titles, vec!["Steps", "Conversions by channel"]);
        for (title, lines) in &found {
            assert_aligned(title, lines);
        }

        let steps = &found[0].1;
        // Header, rule, 5 steps, 2 variants, rule, total, control.
        assert_eq!(steps.len(), 12, "{steps:#?}");
        assert!(steps[0].starts_with("step "), "{}", steps[0]);
        assert!(steps[0].contains("CTR %") && steps[0].contains("conv. rate %"));
        assert!(steps[0].contains("revenue (DZD)"));
        let pn1 = &steps[2];
        assert!(pn1.starts_with("pn1 "), "{pn1}");
        for figure in [
            "send push cart-1",
            "push",
            "2,384",
            "2,400",
            "181",
            "7.59%",
            "98",
            "4.11%",
            "1,234,567.50",
        ] {
            assert!(pn1.contains(figure), "{figure} missing from {pn1}");
        }
        let a = &steps[3];
        assert!(a.starts_with("  A "), "{a}");
        assert!(a.contains("cart-1a, weight 50"), "{a}");
        assert!(
            a.contains("+1.20 pts [\u{2212}0.36, +2.76] not significant"),
            "{a}"
        );
        assert!(steps[4].contains("\u{2212}0.92 pts [\u{2212}2.40, +0.56] not significant"));
        // A step without a summary shows its kind.
        let wait: Vec<&str> = steps[5].split_whitespace().take(2).collect();
        assert_eq!(wait, vec!["wait-1", "wait"], "{}", steps[5]);
        assert!(
            steps
                .iter()
                .any(|l| l.starts_with("pn3 ") && l.contains("3.22%") && l.contains("0.88%"))
        );
        let total = &steps[10];
        assert!(total.starts_with("total "), "{total}");
        assert!(
            total.contains("+2.10 pts [\u{2212}0.69, +4.89] not significant"),
            "{total}"
        );
        let control = &steps[11];
        assert!(control.starts_with("control "), "{control}");
        assert!(
            control.contains("265") && control.contains("4.53%") && control.contains("98,000.00")
        );

        assert!(
            text.contains(
                "Uplift over control: +2.10 pts [\u{2212}0.69, +4.89] not significant \
                 (relative +46.4%, p = 0.137)"
            ),
            "{text}"
        );

        // A significant uplift with a tiny p-value.
        let mut significant = flow_report();
        significant.uplift = Some(uplift(0.03, 0.012, 0.048, 0.0004));
        assert!(render_table(&significant).contains(
            "Uplift over control: +3.00 pts [+1.20, +4.80] significant \
                 (relative +66.2%, p < 0.001)"
        ));

        let channels = &found[1].1;
        assert_eq!(channels.len(), 6, "{channels:#?}");
        assert!(channels[2].starts_with("push ") && channels[2].contains("96.38%"));
        assert!(channels[3].starts_with("email ") && channels[3].contains("2.88%"));
        assert!(channels[4].starts_with("whatsapp ") && channels[4].contains("0.73%"));
        assert!(channels[5].starts_with("in_app ") && channels[5].contains("<0.01%"));
    }

    #[test]
    fn a_broadcast_report_renders_its_variants_without_an_uplift_column() {
        let text = render_table(&broadcast_report());
        assert!(
            text.starts_with("Broadcast report: ramadan-2025-day1\n"),
            "{text}"
        );
        assert!(text.contains("2025-03-01T00:00:00Z to now"), "{text}");
        assert!(text.contains("order_completed within 1h30m\n"), "{text}");
        assert!(
            text.contains("Uplift over control: no control group"),
            "{text}"
        );
        assert!(
            text.contains("Conversions by channel\n  no attributed conversions\n"),
            "{text}"
        );

        let found = tables(&text);
        let titles: Vec<&str> = found.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(titles, vec!["Variants", "Conversions by channel"]);
        let (title, lines) = &found[0];
        assert_eq!(title, "Variants");
        assert_aligned(title, lines);
        // Header, rule, 2 variants, rule, total.
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(!lines[0].contains("uplift"));
        assert!(lines[2].starts_with("short-copy  ramadan-a ") && lines[2].contains("5.10%"));
        assert!(lines[5].starts_with("total ") && lines[5].contains("20,000"));
    }

    #[test]
    fn the_csv_has_one_row_per_step_variant_control_and_total() {
        let report = flow_report();
        let text = render_csv(&report);
        let rows = parse_csv(&text);
        // Header, 5 steps, 2 variants, control, total.
        assert_eq!(rows.len(), 10);
        for row in &rows {
            assert_eq!(row.len(), CSV_HEADER.len(), "{row:?}");
        }
        assert_eq!(rows[0], CSV_HEADER.map(str::to_string).to_vec());

        let records: Vec<(&str, &str, &str)> = rows[1..]
            .iter()
            .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str()))
            .collect();
        assert_eq!(
            records,
            vec![
                ("step", "pn1", ""),
                ("variant", "pn1", "A"),
                ("variant", "pn1", "B"),
                ("step", "wait-1", ""),
                ("step", "steps[2]", ""),
                ("step", "pn2", ""),
                ("step", "pn3", ""),
                ("control", "", ""),
                ("total", "", ""),
            ]
        );
        // The branch's summary, with a comma and quotes, is read back whole.
        assert_eq!(rows[5][4], "branch: \"cart_updated\", within 24h");
        assert!(
            text.contains(r#""branch: ""cart_updated"", within 24h""#),
            "{text}"
        );

        let column = |name: &str| {
            CSV_HEADER
                .iter()
                .position(|h| *h == name)
                .expect("a column")
        };
        let pn1 = &rows[1];
        assert_eq!(pn1[column("kind")], "send");
        assert_eq!(pn1[column("channels")], "push");
        assert_eq!(pn1[column("sends")], "2400");
        assert_eq!(pn1[column("ctr")], "0.0759");
        assert_eq!(pn1[column("revenue")], "1234567.5");
        assert_eq!(pn1[column("uplift_absolute")], "");
        let a = &rows[2];
        assert_eq!(a[column("template")], "cart-1a");
        assert_eq!(a[column("weight")], "50");
        assert_eq!(a[column("uplift_ci_low")], "-0.0036");
        assert_eq!(a[column("uplift_significant")], "false");
        let total = &rows[9];
        assert_eq!(total[column("conversions")], "158");
        assert_eq!(total[column("uplift_p_value")], "0.137");
    }

    #[test]
    fn the_json_has_snake_case_fields_names_for_enums_and_rfc3339_times() {
        let text = render_json(&flow_report());
        let value: Value = serde_json::from_str(&text).expect("valid JSON");

        assert_eq!(value["kind"], "flow");
        assert_eq!(value["name"], "abandoned-cart");
        assert_eq!(value["version"], 2);
        assert_eq!(value["range"]["from"], "2025-05-01T00:00:00Z");
        assert_eq!(value["range"]["to"], "2025-05-21T00:00:00Z");
        assert_eq!(value["generated_at"], "2025-05-21T08:30:00Z");
        assert_eq!(value["conversion"]["event"], "order_completed");
        assert_eq!(value["conversion"]["within_seconds"], 259_200);
        assert_eq!(value["conversion"]["conditions"]["revenue"]["gte"], 20.0);
        assert_eq!(value["currency"], "DZD");
        assert_eq!(value["total"]["conversion_rate"], 0.0663);
        assert_eq!(value["control"]["entered"], 265);
        assert_eq!(value["uplift"]["ci_high"], 0.0489);
        assert_eq!(value["uplift"]["significant"], false);

        let steps = value["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), 5);
        assert_eq!(steps[0]["step_id"], "pn1");
        assert_eq!(steps[0]["kind"], "send");
        assert_eq!(steps[0]["channels"], json!(["push"]));
        assert_eq!(steps[0]["stats"]["ctr"], 0.0759);
        assert_eq!(steps[0]["variants"][0]["name"], "A");
        assert_eq!(steps[0]["variants"][0]["uplift"]["p_value"], 0.131);
        assert_eq!(steps[1]["kind"], "wait");
        assert_eq!(steps[2]["kind"], "branch");
        assert_eq!(value["variants"], json!([]));
        assert_eq!(value["channel_shares"][3]["channel"], "in_app");
        assert_eq!(value["channel_shares"][0]["share"], 0.9638);

        let broadcast: Value =
            serde_json::from_str(&render_json(&broadcast_report())).expect("valid JSON");
        assert_eq!(broadcast["kind"], "broadcast");
        assert_eq!(broadcast["range"]["to"], Value::Null);
        assert_eq!(broadcast["control"], Value::Null);
        assert_eq!(broadcast["uplift"], Value::Null);
        assert_eq!(broadcast["conversion"]["conditions"], Value::Null);
        assert_eq!(broadcast["variants"][1]["name"], "long-copy");
        assert_eq!(broadcast["variants"][1]["uplift"], Value::Null);
    }

    #[test]
    fn figures_are_formatted_for_reading() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(123_456), "123,456");
        assert_eq!(count(2400), "2,400");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(money(0.0), "0.00");
        assert_eq!(money(1_234_567.5), "1,234,567.50");
        assert_eq!(money(-1234.5), "\u{2212}1,234.50");
        assert_eq!(money(-0.001), "0.00");
        assert_eq!(percent(0.0759), "7.59%");
        assert_eq!(percent(0.0), "0.00%");
        assert_eq!(percent(0.000_01), "<0.01%");
        assert_eq!(signed(1.2, 2), "+1.20");
        assert_eq!(signed(-0.36, 2), "\u{2212}0.36");
        assert_eq!(signed(-0.001, 2), "+0.00");
        assert_eq!(window_text(None), "72h");
        assert_eq!(
            window_text(Some(&Duration {
                seconds: 1800,
                nanos: 0
            })),
            "30m"
        );
        assert_eq!(
            window_text(Some(&Duration {
                seconds: 45,
                nanos: 0
            })),
            "45s"
        );
        assert_eq!(
            window_text(Some(&Duration {
                seconds: 30 * 86_400,
                nanos: 0
            })),
            "720h"
        );
    }

    #[test]
    fn channels_and_kinds_have_their_document_names() {
        let names: Vec<&str> = (1..=6).map(channel_name).collect();
        assert_eq!(
            names,
            vec!["push", "email", "sms", "whatsapp", "in_app", "webhook"]
        );
        assert_eq!(channel_name(0), "unspecified");
        assert_eq!(channel_name(99), "unknown");
        assert_eq!(step_kind_name(pb::FlowStepKind::Exit as i32), "exit");
        assert_eq!(
            campaign_kind_name(pb::CampaignKind::Broadcast as i32),
            "broadcast"
        );
    }
}
