//! `relance reco …`: offline evaluation of the recommendation models on the Online Retail
//! data, and the model's life in a running Relance (train, info, rollback).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{NaiveDate, TimeZone as _, Utc};
use relance_proto::v1 as pb;
use relance_recommendations::domain::dataset::{Dataset, Kind};
use relance_recommendations::domain::eval::{self, Holdout, Row, TrainingSide, View};
use relance_recommendations::domain::serve::{Blend, Rules};
use relance_recommendations::domain::train::{self, PersonalOptions, TrainOptions};
use relance_recommendations::serving::Serving;
use relance_recommendations::training::{self, TrainJob};
use relance_retail_data::Reader;

#[derive(Debug, clap::Subcommand)]
pub enum RecoCommand {
    /// Temporal hold-out on the Online Retail file: the served model against popularity,
    /// item-kNN and EASE baselines (HR@10, Recall@20, NDCG@10, coverage).
    Eval(EvalArgs),
    /// Train a workspace's models from the events in Postgres, in this process, and make
    /// the new version current (running replicas load it within seconds).
    Train(TrainArgs),
    /// The model version serving a workspace, the previous one and older ones.
    Info {
        #[command(flatten)]
        target: crate::client::Target,
        /// Older versions to list too.
        #[arg(long, default_value_t = 3)]
        history: u32,
    },
    /// Make an earlier model version current again (by default the previous one).
    Rollback {
        #[command(flatten)]
        target: crate::client::Target,
        /// The version; 0 means the previous one.
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The workspace whose events are read.
    #[arg(long)]
    workspace: String,
    /// Use only events before this day (00:00 UTC), for back-tests; default now.
    #[arg(long)]
    cutoff: Option<NaiveDate>,
    /// Days of events before the cutoff.
    #[arg(long)]
    lookback_days: Option<f64>,
    /// Store the version without making it current.
    #[arg(long)]
    keep_current: bool,
    /// Also write each customer's recent interactions to Redis (after an import made
    /// without the service running, or a Redis flush).
    #[arg(long)]
    seed_history: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The Online Retail CSV (gzipped or plain).
    #[arg(long, default_value = "examples/data/online-retail.csv.gz")]
    file: PathBuf,
    /// Train on purchases before this day (00:00 UTC).
    #[arg(long, default_value = "2011-11-09")]
    cutoff: NaiveDate,
    /// Test on each customer's purchases in this many days after the cutoff.
    #[arg(long, default_value_t = 30)]
    horizon_days: i64,
    /// λ of the EASE baseline.
    #[arg(long, default_value_t = 200.0)]
    ease_lambda: f64,
    /// λ of the served (sparse EASE) model.
    #[arg(long, default_value_t = PersonalOptions::default().lambda)]
    lambda: f64,
    /// Neighbours per item of the served model.
    #[arg(long, default_value_t = PersonalOptions::default().neighbours)]
    neighbours: usize,
    /// Weights kept per source item of the served model.
    #[arg(long, default_value_t = PersonalOptions::default().max_out)]
    max_out: usize,
    /// Half-life of a history entry's weight in the served model, in days.
    #[arg(long, default_value_t = Rules::default().history_half_life_days)]
    half_life_days: f64,
    /// Weight old history entries keep (0–1).
    #[arg(long, default_value_t = Rules::default().history_floor)]
    history_floor: f64,
    /// Skip the dense baselines (item-kNN, EASE), which need n² memory.
    #[arg(long)]
    no_dense: bool,
}

pub async fn run(
    settings: relance_kit::Settings,
    command: RecoCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        RecoCommand::Eval(args) => {
            tokio::task::spawn_blocking(move || evaluate(&args)).await??;
            Ok(ExitCode::SUCCESS)
        }
        RecoCommand::Train(args) => train(settings, args).await,
        RecoCommand::Info { target, history } => {
            let mut clients = target.connect().await?;
            let info = clients
                .recommendations
                .model_info(pb::ModelInfoRequest { history })
                .await
                .context("Recommendations.ModelInfo")?
                .into_inner();
            print_info(&info);
            Ok(ExitCode::SUCCESS)
        }
        RecoCommand::Rollback { target, version } => {
            let mut clients = target.connect().await?;
            let info = clients
                .recommendations
                .rollback(pb::RollbackModelRequest { version })
                .await
                .context("Recommendations.Rollback")?
                .into_inner();
            print_info(&info);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn train(settings: relance_kit::Settings, args: TrainArgs) -> anyhow::Result<ExitCode> {
    let (store, history, config) = relance_recommendations::connect(&settings).await?;
    let serving = Serving::new();
    let cutoff = match args.cutoff {
        Some(day) => Some(Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).context("cutoff")?)),
        None => None,
    };
    let job = TrainJob {
        workspace_id: args.workspace.clone(),
        kinds: Vec::new(),
        lookback_days: args.lookback_days.unwrap_or(config.train.lookback_days),
        cutoff,
        options: config.train.clone(),
        keep_current: args.keep_current,
        seed_history: args.seed_history,
    };
    let started = Instant::now();
    let outcome = training::run(
        &store,
        &history,
        &serving,
        job,
        relance_kit::Clock::now(&relance_kit::SystemClock),
    )
    .await?;
    let record = &outcome.record;
    println!(
        "trained version {}: {} items, {} customers, {} interactions in {:.1} s, model {} bytes{}{}",
        record.version,
        record.item_count,
        record.customer_count,
        record.interaction_count,
        started.elapsed().as_secs_f64(),
        record.memory_bytes,
        if outcome.activated {
            ", current"
        } else {
            ", stored (not current)"
        },
        if args.seed_history {
            format!(
                ", histories of {} people written to Redis",
                outcome.seeded_people
            )
        } else {
            String::new()
        }
    );
    if let Some(peak) = training::peak_memory_bytes() {
        println!(
            "peak memory of this process: {:.0} MiB",
            peak as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(info: &pb::ModelInfoResponse) {
    let line = |label: &str, model: &pb::ModelVersion| {
        let trained = model
            .trained_at
            .as_ref()
            .and_then(relance_proto::convert::timestamp_to_chrono)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        println!(
            "{label:<9} v{:<4} trained {trained}  {} items  {} customers  {} interactions  {}",
            model.version,
            model.item_count,
            model.customer_count,
            model.interaction_count,
            model.algorithm
        );
    };
    match &info.current {
        Some(current) => line("current", current),
        None => println!("no model trained yet: answers come from the fallback chain"),
    }
    if let Some(previous) = &info.previous {
        line("previous", previous);
    }
    for older in &info.history {
        line("older", older);
    }
    if info.training {
        println!("a training is running");
    }
}

/// The Online Retail purchases of known customers (cancellations and guests left out),
/// one basket per invoice.
pub fn online_retail_dataset(file: &Path) -> anyhow::Result<Dataset> {
    let mut reader = Reader::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut data = Dataset::default();
    for invoice in &mut reader {
        let invoice = invoice?;
        let Some(customer) = &invoice.customer_id else {
            continue;
        };
        if invoice.is_cancellation || invoice.lines.is_empty() {
            continue;
        }
        let at = crate::import::to_utc(invoice.invoiced_at).timestamp();
        let basket = data.new_basket();
        for line in &invoice.lines {
            data.add(customer, &line.stock_code, basket, at, Kind::Purchase);
        }
    }
    Ok(data)
}

fn evaluate(args: &EvalArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let data = online_retail_dataset(&args.file)?;
    let cutoff = Utc
        .from_utc_datetime(&args.cutoff.and_hms_opt(0, 0, 0).context("cutoff")?)
        .timestamp();
    let holdout = Holdout::new(&data, cutoff, args.horizon_days);
    let side = TrainingSide::new(&data, cutoff);
    let catalog = side.trained_items();
    println!(
        "Online Retail: {} customers, {} items, {} purchase lines; cutoff {} (+{} days): {} test customers, {} items trained on ({:.1} s to read)",
        data.people.len(),
        data.items.len(),
        data.interactions.len(),
        args.cutoff,
        args.horizon_days,
        holdout.customers.len(),
        catalog,
        started.elapsed().as_secs_f64()
    );
    let mut rows: Vec<(Row, f64)> = Vec::new();
    let views = [View::All, View::New];

    let timer = Instant::now();
    let lists: Vec<_> = views
        .iter()
        .map(|view| eval::popularity_lists(&data, &holdout, 30.0, *view))
        .collect();
    let seconds = timer.elapsed().as_secs_f64();
    for (view, lists) in views.iter().zip(&lists) {
        rows.push((
            eval::score("popularity (30 d)", *view, &holdout, lists, catalog),
            seconds,
        ));
    }

    if !args.no_dense {
        let timer = Instant::now();
        let cosine = eval::cosine_matrix(&side);
        let seconds = timer.elapsed().as_secs_f64();
        for view in views {
            let lists = eval::matrix_lists(&cosine, side.n_items, &holdout, view);
            rows.push((
                eval::score("item-kNN (cosine)", view, &holdout, &lists, catalog),
                seconds,
            ));
        }
        drop(cosine);
        let timer = Instant::now();
        let ease = eval::ease_matrix(&side, args.ease_lambda, 2)
            .context("the Gram matrix is not positive definite")?;
        let seconds = timer.elapsed().as_secs_f64();
        let name = format!("EASE (λ={})", args.ease_lambda);
        for view in views {
            let lists = eval::matrix_lists(&ease, side.n_items, &holdout, view);
            rows.push((eval::score(&name, view, &holdout, &lists, catalog), seconds));
        }
    }

    let options = TrainOptions {
        cutoff,
        personal: PersonalOptions {
            lambda: args.lambda,
            neighbours: args.neighbours,
            max_out: args.max_out,
        },
        ..TrainOptions::default()
    };
    let timer = Instant::now();
    let trained = train::train(&data, &options);
    let seconds = timer.elapsed().as_secs_f64();
    let rules = Rules {
        history_half_life_days: args.half_life_days,
        history_floor: args.history_floor,
        ..Rules::default()
    };
    let personal_only = Blend {
        predicted: 1.0,
        trending: 0.0,
        explore: 0.0,
    };
    let mut serving = Vec::new();
    for (name, blend) in [
        (
            format!(
                "Relance personal (sparse EASE λ={} k={})",
                args.lambda, args.neighbours
            ),
            personal_only,
        ),
        ("Relance served (home 70/20/10)".to_owned(), Blend::DEFAULT),
    ] {
        let timer = Instant::now();
        let mut requests = 0;
        for view in views {
            let lists = eval::served_lists(&trained, &holdout, view, &rules, &blend);
            requests += lists.top10.len() + lists.top20.len();
            rows.push((eval::score(&name, view, &holdout, &lists, catalog), seconds));
        }
        serving.push((name, requests, timer.elapsed()));
    }
    print_table(&rows);
    println!();
    for (name, requests, elapsed) in serving {
        println!(
            "{name}: {requests} answers in {:.2} s, {:.0} µs each on one thread (ranking and rules, without the network and Redis)",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / requests.max(1) as f64
        );
    }
    Ok(())
}

fn print_table(rows: &[(Row, f64)]) {
    for view in [View::All, View::New] {
        println!();
        println!(
            "| {:<44} | {:>9} | {:>6} | {:>9} | {:>7} | {:>8} | {:>7} |",
            format!("view: {}", view.name()),
            "customers",
            "HR@10",
            "Recall@20",
            "NDCG@10",
            "coverage",
            "train s"
        );
        println!(
            "|{:-<46}|{:->11}|{:->8}|{:->11}|{:->9}|{:->10}|{:->9}|",
            "", ":", ":", ":", ":", ":", ":"
        );
        for (row, seconds) in rows.iter().filter(|(row, _)| row.view == view) {
            println!(
                "| {:<44} | {:>9} | {:>6.3} | {:>9.3} | {:>7.3} | {:>8.3} | {:>7.1} |",
                row.method,
                row.customers,
                row.hr_at_10,
                row.recall_at_20,
                row.ndcg_at_10,
                row.coverage,
                seconds
            );
        }
    }
}
