//! `relance-loadtest`: load scenarios against a running Relance, with HDR histograms.
//!
//! - `ingest-batch`: `TrackBatch` throughput.
//! - `ingest-raw`: the same rows written straight into Postgres, the baseline.
//! - `track-rate`: single `Track` latency at a fixed rate (open loop).
//! - `report`: results (JSON) → the ingestion section of BENCHMARKS.md.
//! - `reco-latency`, `reco-max`, `reco-generate`, `reco-report`: recommendations (`reco.rs`).
//! - `delivery`: the delivery service's whole pipeline, in-process, with its baselines
//!   (`delivery.rs`); `report --section delivery` writes its section.
//! - `campaigns`: due journeys at 1 M pending, their lateness, a 1 M broadcast, in-process,
//!   with their baselines (`campaigns.rs`); `report --section campaigns` writes its section.
//! - `shop-day`, `ingestion-burst`, `black-friday`: the whole platform under a storefront's
//!   traffic, a burst of events, a broadcast to 1 M during the traffic (`shop.rs`);
//!   `report --section loadtest` writes their section.
//!
//! `bench/run.sh` runs them all; see loadtests/README.md.
#![forbid(unsafe_code)]

mod campaigns;
mod chaos;
mod client;
mod delivery;
mod generate;
mod ingest;
mod rate;
mod reco;
mod report;
mod segments;
mod shop;
mod stats;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::stats::Outcome;

/// The same allocator as the `relance` binary: the load generator builds many small values
/// per event and shares the two cores with the service, so its own cost should be small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load scenarios for Relance's event ingestion.
#[derive(Debug, Parser)]
#[command(name = "relance-loadtest", version, about)]
struct Cli {
    /// Print the result as one JSON object instead of a line.
    #[arg(long, global = true)]
    json: bool,
    /// Also write the result as JSON to this file (what `report` reads).
    #[arg(long, global = true)]
    save: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// TrackBatch throughput against the events service.
    IngestBatch {
        #[command(flatten)]
        target: client::Target,
        #[command(flatten)]
        load: ingest::Load,
    },
    /// The raw baseline: the same rows inserted straight into a plain Postgres table.
    IngestRaw {
        #[command(flatten)]
        target: ingest::RawTarget,
        #[command(flatten)]
        load: ingest::Load,
    },
    /// Single Track latency at a fixed request rate.
    TrackRate {
        #[command(flatten)]
        target: client::Target,
        #[command(flatten)]
        args: rate::RateArgs,
    },
    /// Write the results of a folder of runs into BENCHMARKS.md.
    Report(report::ReportArgs),
    /// Batch evaluation of a segment: evaluator, SQL baseline, full build.
    SegmentBatch(segments::BatchArgs),
    /// Track acknowledged → segment.entered published, at a fixed rate.
    SegmentLatency {
        #[command(flatten)]
        target: client::Target,
        #[command(flatten)]
        args: segments::LatencyArgs,
    },
    /// Write the segmentation results into BENCHMARKS.md.
    SegmentReport(segments::ReportArgs),
    /// Recommend (or the no-op Ping) latency at a fixed request rate.
    RecoLatency {
        #[command(flatten)]
        target: client::Target,
        #[command(flatten)]
        args: reco::LatencyArgs,
    },
    /// The most Recommend (or Ping) answers per second, C requests always in flight.
    RecoMax {
        #[command(flatten)]
        target: client::Target,
        #[command(flatten)]
        args: reco::MaxArgs,
    },
    /// A large synthetic shop written into Postgres, to train recommendations at scale.
    RecoGenerate(reco::GenerateArgs),
    /// Write the recommendations results into BENCHMARKS.md.
    RecoReport(reco::ReportArgs),
    /// Messages/s through the delivery pipeline (queue → render with products → fake
    /// provider → ledger) for push and e-mail, against the bus and the fake alone; runs the
    /// services in-process.
    Delivery(delivery::DeliveryArgs),
    /// Due journeys per second with 1 M pending, their lateness at a steady rate, and a
    /// broadcast to 1 M customers, against a raw SQL floor and the bus alone; runs profiles
    /// and campaigns in-process with fake segmentation and delivery servers.
    Campaigns(campaigns::CampaignsArgs),
    /// The whole platform under load while each service is killed and RabbitMQ, Redis and
    /// PostgreSQL restart: recovery times, zero loss, zero duplicates (`make chaos`).
    Chaos(chaos::ChaosArgs),
    /// A storefront's traffic (sessions: Track, TrackBatch, Recommend, sign-ups) at a fixed
    /// session rate with an abandoned-cart flow; end-to-end time event → push at the fake FCM.
    ShopDay(shop::ShopArgs),
    /// Track/TrackBatch at a base rate, a burst, the base rate again: latency per phase, the
    /// events relay's backlog and how long it takes to drain.
    IngestionBurst(shop::BurstArgs),
    /// A broadcast to `--audience` customers while shop-day traffic continues: shop latency
    /// before vs during, the broadcast's queued/s and sent/s.
    BlackFriday(shop::BlackFridayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let outcome = match cli.command {
        Command::IngestBatch { target, load } => {
            Outcome::Ingest(ingest::track_batch(&target, &load).await?)
        }
        Command::IngestRaw { target, load } => Outcome::Ingest(ingest::raw(&target, &load).await?),
        Command::TrackRate { target, args } => {
            Outcome::TrackRate(rate::track_rate(&target, &args).await?)
        }
        Command::Report(args) => return report::run(&args),
        Command::SegmentBatch(args) => {
            let result = segments::batch(&args).await?;
            println!("{}", serde_json::to_string(&result)?);
            return Ok(());
        }
        Command::SegmentLatency { target, args } => {
            let result = segments::latency(&target, &args).await?;
            println!("{}", serde_json::to_string(&result)?);
            return Ok(());
        }
        Command::SegmentReport(args) => return segments::report(&args),
        // These write their own JSON: `--out FILE`, or the global `--save FILE`.
        Command::RecoLatency { target, args } => {
            let result = reco::latency(&target, &args).await?;
            let out = args.run.out.as_deref().or(cli.save.as_deref());
            return reco::emit(&result, &result.line(), out, cli.json);
        }
        Command::RecoMax { target, args } => {
            let result = reco::max(&target, &args).await?;
            let out = args.run.out.as_deref().or(cli.save.as_deref());
            return reco::emit(&result, &result.line(), out, cli.json);
        }
        Command::RecoGenerate(args) => {
            let result = reco::generate(&args).await?;
            let out = args.out.as_deref().or(cli.save.as_deref());
            return reco::emit(&result, &result.line(), out, cli.json);
        }
        Command::RecoReport(args) => return reco::report(&args),
        Command::Delivery(args) => {
            let result = delivery::run(&args).await?;
            return reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json);
        }
        Command::Campaigns(args) => {
            let result = campaigns::run(&args).await?;
            return reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json);
        }
        Command::Chaos(args) => {
            let result = chaos::run(&args).await?;
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = chaos::render(&result, &command, &chaos::machine());
            println!("{report}");
            if let Some(path) = &args.benchmarks {
                report::write_section(path, "chaos", &report)?;
            }
            reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json)?;
            if !result.passed() {
                anyhow::bail!("chaos: loss, duplicates or a fault not recovered from (see above)");
            }
            return Ok(());
        }
        Command::ShopDay(args) => {
            let result = shop::shop_day(&args).await?;
            return reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json);
        }
        Command::IngestionBurst(args) => {
            let result = shop::ingestion_burst(&args).await?;
            return reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json);
        }
        Command::BlackFriday(args) => {
            let result = shop::black_friday(&args).await?;
            return reco::emit(&result, &result.line(), cli.save.as_deref(), cli.json);
        }
    };
    if let Some(path) = &cli.save {
        std::fs::write(path, serde_json::to_string_pretty(&outcome)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    stats::print(&outcome, cli.json)
}
