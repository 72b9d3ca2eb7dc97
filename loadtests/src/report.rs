//! Turns a folder of scenario results (JSON) into the ingestion section of BENCHMARKS.md.
//!
//! The section sits between `<!-- ingest:begin -->` and `<!-- ingest:end -->`; only that
//! part of the file is replaced, so other benchmark sections (segmentation,
//! recommendations, …) live beside it with markers of their own.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::stats::{IngestResult, Outcome, RateResult, median};

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Folder of `*.json` results written by the scenarios' `--json` output.
    #[arg(long)]
    pub results: PathBuf,
    /// The markdown file to update (created if missing).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// `Key=Value` rows of the run's header table (command, date, machine, …), in order.
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Name of the markers (`<!-- NAME:begin -->`); `delivery` renders the `delivery*.json`
    /// results of `relance-loadtest delivery`, `campaigns` the `campaigns*.json` ones of
    /// `relance-loadtest campaigns`, `loadtest` those of `shop-day`, `ingestion-burst` and
    /// `black-friday`, instead of the ingestion ones.
    #[arg(long, default_value = "ingest")]
    pub section: String,
}

pub fn parse_meta(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) => Ok((key.trim().to_owned(), value.trim().to_owned())),
        None => Err(format!("{text:?}: expected KEY=VALUE")),
    }
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    if args.section == "delivery" {
        let body = crate::delivery::render(&args.results, &args.meta)?;
        return write_section(&args.out, "delivery", &body);
    }
    if args.section == "loadtest" {
        let body = crate::shop::render(&args.results, &args.meta)?;
        return write_section(&args.out, "loadtest", &body);
    }
    if args.section == "campaigns" {
        let body = crate::campaigns::render(&args.results, &args.meta)?;
        return write_section(&args.out, "campaigns", &body);
    }
    let outcomes = read_results(&args.results)?;
    let body = render(&outcomes, &args.meta);
    let begin = format!("<!-- {}:begin -->", args.section);
    let end = format!("<!-- {}:end -->", args.section);
    let section = format!("{begin}\n{body}{end}\n");
    let current = match std::fs::read_to_string(&args.out) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n\n".to_owned(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", args.out.display())),
    };
    let updated = replace_section(&current, &begin, &end, &section);
    std::fs::write(&args.out, updated)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "updated the {} section of {}",
        args.section,
        args.out.display()
    );
    Ok(())
}

/// Writes `body` between `<!-- NAME:begin -->` and `<!-- NAME:end -->` of `out`.
pub fn write_section(out: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let section = format!("{begin}\n{body}{end}\n");
    let current = match std::fs::read_to_string(out) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n\n".to_owned(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", out.display())),
    };
    std::fs::write(out, replace_section(&current, &begin, &end, &section))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("updated the {name} section of {}", out.display());
    Ok(())
}

/// `text` with the part from `begin` to `end` (inclusive, plus its newline) replaced by
/// `section`; `section` appended when the markers are missing.
fn replace_section(text: &str, begin: &str, end: &str, section: &str) -> String {
    let markers = text
        .find(begin)
        .zip(text.find(end))
        .filter(|(start, stop)| start < stop);
    if let Some((start, stop)) = markers {
        let mut after = stop + end.len();
        if text[after..].starts_with('\n') {
            after += 1;
        }
        return format!("{}{section}{}", &text[..start], &text[after..]);
    }
    let separator = if text.is_empty() || text.ends_with("\n\n") {
        ""
    } else if text.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    format!("{text}{separator}{section}")
}

fn read_results(dir: &Path) -> anyhow::Result<Vec<Outcome>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut outcomes = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let outcome = serde_json::from_str(text.trim())
            .with_context(|| format!("{} is not a scenario result", path.display()))?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// 12345.6 → "12,346".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, c) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The runs of one ingestion method, summarised.
struct MethodSummary<'a> {
    label: &'static str,
    runs: Vec<&'a IngestResult>,
}

impl MethodSummary<'_> {
    fn median_rate(&self) -> f64 {
        median(
            &self
                .runs
                .iter()
                .map(|r| r.events_per_sec)
                .collect::<Vec<_>>(),
        )
    }
}

fn render(outcomes: &[Outcome], meta: &[(String, String)]) -> String {
    let mut ingest = Vec::new();
    let mut rates = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Ingest(result) => ingest.push(result),
            Outcome::TrackRate(result) => rates.push(result),
        }
    }
    let methods = [
        ("TrackBatch", "`TrackBatch` (gRPC → events service)"),
        ("unnest", "raw `INSERT … unnest`"),
        ("copy", "raw `COPY FROM STDIN`"),
    ];
    let summaries: Vec<MethodSummary> = methods
        .iter()
        .map(|(method, label)| MethodSummary {
            label,
            runs: ingest
                .iter()
                .copied()
                .filter(|r| r.method == *method)
                .collect(),
        })
        .filter(|s| !s.runs.is_empty())
        .collect();

    let mut md = String::new();
    md.push_str("## Event ingestion\n\n");
    md.push_str("_Written by `bash bench/run.sh` (`make bench`) from the runs below; rerun it rather than editing this section._\n\n");
    if !meta.is_empty() {
        md.push_str("| | |\n|---|---|\n");
        for (key, value) in meta {
            let _ = writeln!(md, "| {key} | {value} |");
        }
        md.push('\n');
    }

    if let Some(first) = ingest.first() {
        let runs = summaries.iter().map(|s| s.runs.len()).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "### Batched ingestion: `TrackBatch` vs raw Postgres\n\n\
             {} events per run in batches of {}, {} concurrent callers (one connection each), \
             same generated rows for every method; median of {} run(s) each, runs interleaved.\n",
            thousands(first.events as f64),
            first.batch_size,
            first.concurrency,
            runs,
        );
        md.push_str(
            "`TrackBatch` is the whole service: gRPC decoding, validation, the dedup table \
             (`event_ids`), the partitioned event log with its three secondary indexes, and — \
             concurrently — the relay, which reads accepted events back and publishes each one \
             to RabbitMQ with publisher confirms (nothing is bound to the benchmark's exchange, \
             so the broker drops them once confirmed: a lower bound of the broker's work). The \
             raw baseline writes the same rows into one plain table with only its primary key, \
             with the service stopped.\n\n",
        );
        md.push_str("| Method | events/s (median) | vs raw `unnest` | batch p50 | batch p99 | events/s of each run |\n");
        md.push_str("|---|---:|---:|---:|---:|---|\n");
        let raw = summaries
            .iter()
            .find(|s| s.runs[0].method == "unnest")
            .map(MethodSummary::median_rate);
        for summary in &summaries {
            let rate = summary.median_rate();
            let share = raw
                .filter(|r| *r > 0.0)
                .map_or("–".to_owned(), |r| format!("{:.0}%", 100.0 * rate / r));
            let p50 = median(
                &summary
                    .runs
                    .iter()
                    .map(|r| r.batch_latency.p50)
                    .collect::<Vec<_>>(),
            );
            let p99 = median(
                &summary
                    .runs
                    .iter()
                    .map(|r| r.batch_latency.p99)
                    .collect::<Vec<_>>(),
            );
            let each: Vec<String> = summary
                .runs
                .iter()
                .map(|r| thousands(r.events_per_sec))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} ms | {:.1} ms | {} |",
                summary.label,
                thousands(rate),
                share,
                p50,
                p99,
                each.join(" · ")
            );
        }
        md.push('\n');
        let batch = summaries
            .iter()
            .find(|s| s.runs[0].method == "TrackBatch")
            .map(MethodSummary::median_rate);
        if let (Some(batch), Some(raw)) = (batch, raw) {
            let share = 100.0 * batch / raw;
            let verdict = if share >= 40.0 { "meets" } else { "misses" };
            let _ = writeln!(
                md,
                "**`TrackBatch` reaches {share:.0}% of the raw `unnest` baseline — {verdict} the ≥ 40% target.**\n"
            );
        }
    }

    for result in &rates {
        render_rate(&mut md, result);
    }
    md
}

fn render_rate(md: &mut String, result: &RateResult) {
    let _ = writeln!(
        md,
        "### Single `Track` at {} requests/s\n\n\
         Open loop for {:.0} s after a warm-up, over {} HTTP/2 connections; latency is measured \
         from when each request was due, so a stall counts against every request queued \
         behind it. {} sent, {} failed, {:.0} completed/s.\n",
        thousands(f64::from(result.rate)),
        result.duration_secs,
        result.connections,
        thousands(result.sent as f64),
        result.errors,
        result.achieved_rate,
    );
    md.push_str("| | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|\n");
    for (label, p) in [
        ("latency (from due time)", &result.latency),
        ("service time (from send)", &result.service_time),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            p.p50, p.p90, p.p99, p.p999, p.max
        );
    }
    md.push('\n');
    md.push_str("HDR distribution of the latency:\n\n| percentile | ms |\n|---:|---:|\n");
    for (percentile, ms) in &result.distribution {
        let _ = writeln!(
            md,
            "| {} | {ms:.2} |",
            (percentile * 1000.0).round() / 1000.0
        );
    }
    md.push('\n');
    let verdict = if result.latency.p99 < 10.0 && result.errors == 0 {
        "meets"
    } else {
        "misses"
    };
    let _ = writeln!(
        md,
        "**p99 = {:.2} ms — {verdict} the < 10 ms target.**\n",
        result.latency.p99
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_markers() {
        let text = "# B\n\nintro\n<!-- ingest:begin -->\nold\n<!-- ingest:end -->\n\n<!-- seg:begin -->\nS\n<!-- seg:end -->\n";
        let out = replace_section(
            text,
            "<!-- ingest:begin -->",
            "<!-- ingest:end -->",
            "<!-- ingest:begin -->\nnew\n<!-- ingest:end -->\n",
        );
        assert_eq!(
            out,
            "# B\n\nintro\n<!-- ingest:begin -->\nnew\n<!-- ingest:end -->\n\n<!-- seg:begin -->\nS\n<!-- seg:end -->\n"
        );
    }

    #[test]
    fn appends_when_markers_are_missing() {
        let out = replace_section(
            "# B\n",
            "<!-- x:begin -->",
            "<!-- x:end -->",
            "<!-- x:begin -->\nX\n<!-- x:end -->\n",
        );
        assert_eq!(out, "# B\n\n<!-- x:begin -->\nX\n<!-- x:end -->\n");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
