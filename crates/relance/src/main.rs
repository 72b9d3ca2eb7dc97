//! `relance`: the one binary of the platform. `relance serve --all` runs every service in
//! one process; in production each Deployment runs `relance serve <service>`.
#![forbid(unsafe_code)]

mod campaign;
mod client;
mod delivery;
mod demo;
mod demo_campaigns;
mod demo_templates;
mod import;
mod profile;
mod reco;
mod report;
mod segment;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ingestion decodes, re-encodes and hands over many small values per event; mimalloc's
/// thread-local free lists make that allocation cheaper than glibc's (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Relance: customer engagement for e-commerce — profiles, events, segments,
/// recommendations, flows and delivery, on your own infrastructure.
#[derive(Debug, Parser)]
#[command(name = "relance", version)]
struct Cli {
    /// A TOML configuration file (settings can also come from RELANCE_* variables).
    #[arg(long, global = true, env = "RELANCE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run services: `relance serve profiles events`, or `relance serve --all`.
    Serve(serve::ServeArgs),
    /// Apply every service's database migrations, then exit.
    Migrate,
    /// Create or revoke API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Import data into a running Relance.
    #[command(subcommand)]
    Import(import::ImportCommand),
    /// Read, export or erase a customer's profile.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Apply segments, flows and broadcasts: `relance apply -f examples/segments/ -f examples/flows/`.
    Apply(segment::ApplyArgs),
    /// Read segments: list, get, count, members, preview.
    #[command(subcommand)]
    Segment(segment::SegmentCommand),
    /// Recommendations: offline evaluation, training, model versions.
    #[command(subcommand)]
    Reco(reco::RecoCommand),
    /// Delivery: the dead-letter queue of send requests.
    #[command(subcommand)]
    Delivery(delivery::DeliveryCommand),
    /// Flows: list, get, pause, resume, archive, a customer's journeys.
    #[command(subcommand)]
    Flow(campaign::FlowCommand),
    /// Broadcasts: list, get, cancel.
    #[command(subcommand)]
    Broadcast(campaign::BroadcastCommand),
    /// What a flow or broadcast earned: `relance report flow abandoned-cart --from 2025-05-01`.
    #[command(subcommand)]
    Report(campaign::ReportCommand),
    /// Start the platform, import the Online Retail sample and show what it made of it.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key and print it (it cannot be shown again).
    Create {
        /// The workspace (a slug such as `acme-dz`); created if new.
        #[arg(long)]
        workspace: String,
        /// `admin` (everything) or `ingest` (events and recommendations only). Repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A name to recognise the key by.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// Revoke the keys of a workspace that start with a prefix (the first 8 characters).
    Revoke {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        prefix: String,
    },
}

/// Exit codes scripts can rely on.
pub mod exit {
    /// Something failed (message on stderr).
    pub const FAILURE: u8 = 1;
    /// The command line was wrong (clap's own code).
    pub const USAGE: u8 = 2;
    /// The command ran, but some input was refused (counts printed).
    pub const PARTIAL: u8 = 3;
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
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = relance_kit::Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve(args) => serve::run(settings, args).await,
        Command::Migrate => serve::migrate(&settings).await,
        Command::Key(KeyCommand::Create {
            workspace,
            scopes,
            name,
        }) => {
            let mut parsed = Vec::new();
            for scope in &scopes {
                match relance_kit::auth::Scope::parse(scope) {
                    Some(scope) => parsed.push(scope),
                    None => anyhow::bail!("--scope: {scope:?} is not a scope (admin or ingest)"),
                }
            }
            let keys = serve::key_store(&settings).await?;
            let key = keys.create_key(&workspace, &parsed, &name).await?;
            println!("{key}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Key(KeyCommand::Revoke { workspace, prefix }) => {
            let keys = serve::key_store(&settings).await?;
            let revoked = keys.revoke(&workspace, &prefix).await?;
            println!("revoked {revoked} key(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(command) => import::run(command).await,
        Command::Profile(command) => profile::run(command).await,
        Command::Apply(args) => segment::apply(args).await,
        Command::Segment(command) => segment::run(command).await,
        Command::Reco(command) => reco::run(settings, command).await,
        Command::Delivery(command) => delivery::run(settings, command).await,
        Command::Flow(command) => campaign::run_flow(command).await,
        Command::Broadcast(command) => campaign::run_broadcast(command).await,
        Command::Report(command) => campaign::run_report(command).await,
        Command::Demo(args) => demo::run(settings, args).await,
    }
}
