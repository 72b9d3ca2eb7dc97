//! Single-event `Track` latency at a fixed request rate.
//!
//! Open loop: request `i` is due at `start + i / rate` whatever happened to the earlier ones,
//! and its latency is measured from when it was due, not from when it was actually sent. A
//! closed loop (send, wait, send) slows down exactly when the server does and so hides the
//! stalls it should report (coordinated omission).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use relance_proto::v1 as pb;

use crate::client::Target;
use crate::generate::{self, Generator, Shape};
use crate::stats::{self, Percentiles, RateResult};

#[derive(Debug, Clone, clap::Args)]
pub struct RateArgs {
    /// Requests per second.
    #[arg(long, default_value_t = 1_000, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=20_000))]
    pub rate: u32,
    /// Seconds timed.
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=600))]
    pub duration: u32,
    /// Seconds sent at the same rate first and not timed.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(0..=60))]
    pub warmup: u32,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub connections: usize,
    /// Seed of the generated events (a new one per run, or they are duplicates).
    #[arg(long, default_value_t = 1_000)]
    pub seed: u64,
    #[command(flatten)]
    pub shape: Shape,
}

/// The histograms the in-flight requests record into.
struct Recorder {
    latency: hdrhistogram::Histogram<u64>,
    service_time: hdrhistogram::Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

pub async fn track_rate(target: &Target, args: &RateArgs) -> anyhow::Result<RateResult> {
    if args.rate == 0 || args.duration == 0 {
        anyhow::bail!("--rate and --duration must be at least 1");
    }
    let warmup = u64::from(args.rate) * u64::from(args.warmup);
    let timed = u64::from(args.rate) * u64::from(args.duration);
    let total = warmup + timed;

    // Every request is built before the first is due, so that building them never delays
    // the schedule.
    let mut generator = Generator::new(args.seed, args.shape.clone(), generate::now());
    let mut events = Vec::with_capacity(total as usize);
    for _ in 0..total {
        events.push(generator.next_event().to_proto());
    }
    let clients = target.connect(args.connections).await?;

    let recorder = Arc::new(Mutex::new(Recorder {
        latency: stats::new_histogram()?,
        service_time: stats::new_histogram()?,
        ok: 0,
        errors: 0,
        first_error: None,
        last_done: None,
    }));
    let rate = f64::from(args.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let timed_start = start + Duration::from_secs_f64(warmup as f64 / rate);
    let mut in_flight = Vec::with_capacity(total as usize);
    for (index, event) in events.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let mut client = clients[index % clients.len()].clone();
        let recorder = recorder.clone();
        let is_timed = index as u64 >= warmup;
        in_flight.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = client.track(pb::TrackRequest { event: Some(event) }).await;
            let done = Instant::now();
            if !is_timed {
                return;
            }
            let mut recorder = recorder
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match result {
                Ok(_) => {
                    recorder.ok += 1;
                    stats::record(&mut recorder.latency, done - due);
                    stats::record(&mut recorder.service_time, done - sent);
                }
                Err(status) => {
                    recorder.errors += 1;
                    if recorder.first_error.is_none() {
                        recorder.first_error = Some(status.to_string());
                    }
                }
            }
            recorder.last_done = Some(recorder.last_done.map_or(done, |last| last.max(done)));
        }));
    }
    for task in in_flight {
        task.await.context("a request task panicked")?;
    }

    let recorder = recorder
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(error) = &recorder.first_error {
        eprintln!(
            "track-rate: {} of {timed} calls failed, the first with: {error}",
            recorder.errors
        );
    }
    let window = recorder
        .last_done
        .map_or(0.0, |last| (last - timed_start).as_secs_f64());
    Ok(RateResult {
        rate: args.rate,
        duration_secs: f64::from(args.duration),
        connections: clients.len(),
        sent: timed,
        ok: recorder.ok,
        errors: recorder.errors,
        achieved_rate: if window > 0.0 {
            recorder.ok as f64 / window
        } else {
            0.0
        },
        latency: Percentiles::of(&recorder.latency),
        service_time: Percentiles::of(&recorder.service_time),
        distribution: stats::distribution(&recorder.latency),
    })
}
