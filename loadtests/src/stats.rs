//! Latency histograms and the results each scenario prints (a line, or JSON for `report`).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency histogram in microseconds, from 1 µs to 60 s with 3 significant digits.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Records `latency`, clamping to the histogram's range (a 60 s+ call is already a failure).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Summary of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

/// The outcome of one scenario run, tagged by scenario so that `report` can read a folder of
/// them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Outcome {
    /// `ingest-batch` or `ingest-raw`.
    Ingest(IngestResult),
    /// `track-rate`.
    TrackRate(RateResult),
}

/// Throughput of a batched ingestion run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestResult {
    /// `TrackBatch`, `unnest` or `copy`.
    pub method: String,
    pub seed: u64,
    /// Events timed (warm-up batches excluded).
    pub events: u64,
    pub batch_size: usize,
    pub concurrency: usize,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    /// Events the server reported as stored (always `events` for the raw baseline).
    pub accepted: u64,
    /// Per-batch latency.
    pub batch_latency: Percentiles,
}

impl IngestResult {
    pub fn line(&self) -> String {
        format!(
            "ingest {:<10} events={} batch={} concurrency={} elapsed={:.2}s throughput={:.0} events/s accepted={} batch_latency p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.method,
            self.events,
            self.batch_size,
            self.concurrency,
            self.elapsed_secs,
            self.events_per_sec,
            self.accepted,
            self.batch_latency.p50,
            self.batch_latency.p99,
            self.batch_latency.max,
        )
    }
}

/// Latency of single `Track` calls at a fixed rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    /// Requests per second asked for.
    pub rate: u32,
    pub duration_secs: f64,
    pub connections: usize,
    /// Requests timed (warm-up excluded).
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    /// Timed requests per second actually completed over the timed window.
    pub achieved_rate: f64,
    /// From the moment each request was due to its response: includes any queueing behind a
    /// slow response (no coordinated omission).
    pub latency: Percentiles,
    /// From the moment each request was actually sent to its response.
    pub service_time: Percentiles,
    /// (percentile, milliseconds) of `latency`, for a fuller picture of the tail.
    pub distribution: Vec<(f64, f64)>,
}

impl RateResult {
    pub fn line(&self) -> String {
        format!(
            "track-rate rate={}/s duration={:.0}s sent={} ok={} errors={} latency p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms (service time p99={:.2}ms)",
            self.rate,
            self.duration_secs,
            self.sent,
            self.ok,
            self.errors,
            self.latency.p50,
            self.latency.p90,
            self.latency.p99,
            self.latency.p999,
            self.latency.max,
            self.service_time.p99,
        )
    }
}

/// The quantiles listed in a distribution table (1.0 is the maximum).
pub const DISTRIBUTION: &[f64] = &[0.50, 0.75, 0.90, 0.95, 0.99, 0.999, 0.9999, 1.0];

/// (percentile, ms) at each of [`DISTRIBUTION`].
pub fn distribution(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(DISTRIBUTION.len());
    for &quantile in DISTRIBUTION {
        let micros = if quantile >= 1.0 {
            histogram.max()
        } else {
            histogram.value_at_quantile(quantile)
        };
        out.push((quantile * 100.0, micros as f64 / 1000.0));
    }
    out
}

/// Prints a result: its line, or JSON when asked.
pub fn print(outcome: &Outcome, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(outcome)?);
    } else {
        match outcome {
            Outcome::Ingest(result) => println!("{}", result.line()),
            Outcome::TrackRate(result) => println!("{}", result.line()),
        }
    }
    Ok(())
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn percentiles_in_milliseconds() {
        let mut histogram = new_histogram().expect("histogram");
        for ms in 1..=100u64 {
            record(&mut histogram, Duration::from_millis(ms));
        }
        let p = Percentiles::of(&histogram);
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1, "{}", p.p50);
        assert!((p.max - 100.0).abs() < 0.1, "{}", p.max);
    }
}
